"""The toy model's committed weights: a diffusers folder checked against its SHA256SUMS before every use."""

from __future__ import annotations

import hashlib
from pathlib import Path

from lora_core.errors import UserError

WEIGHTS = Path(__file__).resolve().parent / "weights"
SUMS = "SHA256SUMS"
REBUILD = "rebuild them with `python -m lora_core.toy pretrain` (see the README) or restore them from git"


def digest(path: Path) -> str:
    sha = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()


def write_sums(folder: Path) -> Path:
    """SHA256SUMS for every file of the folder (`sha256sum -c` reads it)."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != SUMS)
    lines = [f"{digest(p)}  {p.relative_to(folder).as_posix()}" for p in files]
    (folder / SUMS).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder / SUMS


def verified_folder(folder: Path = WEIGHTS) -> Path:
    """`folder` once every file SHA256SUMS lists is present with its recorded hash."""
    sums = folder / SUMS
    if not sums.is_file():
        raise UserError(f"{sums} is missing: the toy model's weights are incomplete; {REBUILD}", "base_model")
    for line in sums.read_text(encoding="utf-8").splitlines():
        expected, _, name = line.partition("  ")
        path = folder / name
        if not path.is_file():
            raise UserError(f"{path} is missing from the toy model's weights; {REBUILD}", "base_model")
        if digest(path) != expected:
            raise UserError(f"{path} does not match its SHA-256 in {sums} (damaged or changed); {REBUILD}",
                            "base_model")
    return folder
