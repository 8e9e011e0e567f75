"""The reproducibility manifest: `manifest.json` in a run folder says what the run was made of, so that it can be
trained again (`python -m lora_core rerun`) and a difference named when it cannot.

It holds the resolved config, the SHA-256 of every file in every dataset folder the config names (training,
held-out, and any other `*_path` folder field: `dataset_folders`), the package versions, the device and its
driver, the project's git commit (when there is one), the seeds, the base model's identity and how the samples
were drawn. It is written atomically when training starts (`status` "started") and completed at the end
(`status` "complete", with the final LoRA's tensor hash). Torch-free except `device_info`, which reads the
device through torch only when torch is already loaded (training).
"""

from __future__ import annotations

import hashlib
import json
import platform
import subprocess
import sys
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from lora_core.files import atomic_write_text

MANIFEST_FILE = "manifest.json"
FORMAT = 1
# what decides the numbers a run produces; a rerun refuses when one of these differs
PACKAGES = ("torch", "diffusers", "transformers", "peft", "accelerate", "safetensors", "huggingface-hub",
            "tokenizers", "numpy", "pillow", "pydantic", "bitsandbytes", "torchao", "lion-pytorch", "schedulefree",
            "came-pytorch", "lycoris-lora")
# a field naming a folder of images, or a list of them (and a concept's `path`)
DATASET_SUFFIXES = ("_path", "_folder", "_dir", "_paths", "_folders", "_dirs")
NOT_DATASETS = ("output", "cache", "log", "model", "component")  # path fields that hold no training data
QUICK_BYTES = 1 << 20  # a large weight file is identified by its size and its first and last MiB


class ManifestError(ValueError):
    field = "run"


def dataset_folders(config: Any) -> dict[str, str]:
    """Every dataset folder the config names, by its field (`dataset_path`, `validation_dataset_path`, and any
    other field, also nested in a list of concepts, whose name ends in `_path`, `_folder` or `_dir` or is `path`,
    except the run's own output, caches, logs and models): the one place that knows which of the config's paths
    hold training data."""
    found: dict[str, str] = {}

    def walk(value: Any, where: str) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                walk(inner, f"{where}.{key}" if where else str(key))
        elif isinstance(value, list):
            for index, inner in enumerate(value):
                walk(inner, f"{where}[{index}]")
        elif isinstance(value, str) and value:
            name = where.rpartition(".")[2].partition("[")[0]
            if (name.endswith(DATASET_SUFFIXES) or name == "path") and not any(w in name for w in NOT_DATASETS):
                found[where] = value

    walk(config.model_dump(mode="json"), "")
    return found


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def folder_hashes(folder: str | Path) -> dict[str, str]:
    """SHA-256 of every file under `folder` by its relative path (images, captions, the exclude list), hidden
    folders and hidden files other than `.lora-studio-exclude` left out; {} for a missing folder."""
    from lora_core.dataset import EXCLUDE_FILE

    root = Path(folder)
    if not root.is_dir():
        return {}
    hashes = {}
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root)
        if any(part.startswith(".") for part in relative.parts[:-1]) or not path.is_file() or (
                relative.name.startswith(".") and relative.name != EXCLUDE_FILE):
            continue
        hashes[relative.as_posix()] = file_sha256(path)
    return hashes


def dataset_hashes(config: Any) -> dict[str, dict[str, Any]]:
    return {field: {"folder": folder, "files": folder_hashes(folder)}
            for field, folder in dataset_folders(config).items()}


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def device_info(device: str = "cpu") -> dict[str, Any]:
    """The device a run trained on: a GPU's name, CUDA version and NVIDIA driver, or the CPU's model name."""
    info: dict[str, Any] = {"type": device.split(":")[0], "platform": platform.platform(),
                            "cpu": _cpu_name()}
    torch = sys.modules.get("torch")
    if torch is not None:
        info["torch_threads"] = torch.get_num_threads()
        if info["type"] == "cuda" and torch.cuda.is_available():
            index = int(device.split(":")[1]) if ":" in device else 0
            info.update(gpu=torch.cuda.get_device_name(index), cuda=torch.version.cuda,
                        capability=".".join(map(str, torch.cuda.get_device_capability(index))),
                        driver=_nvidia_driver())
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _nvidia_driver() -> str | None:
    try:  # Linux: the kernel module says its version; nothing to install for it
        first = Path("/proc/driver/nvidia/version").read_text(encoding="utf-8").splitlines()[0]
    except (OSError, IndexError):
        return None
    words = first.split()
    return next((w for w in words if w[:1].isdigit() and "." in w), first.strip())


def git_commit() -> dict[str, Any] | None:
    """The project's commit and whether its tracked files differ from it; None without git or a checkout."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": bool(dirty)} if commit else None


def quick_identity(path: Path) -> dict[str, Any]:
    """A weight file's size and the SHA-256 of its first and last MiB: cheap for a 20 GB file, and a changed
    file almost always changes its header (first MiB) or its tail."""
    size = path.stat().st_size
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        digest.update(handle.read(QUICK_BYTES))
        if size > 2 * QUICK_BYTES:
            handle.seek(size - QUICK_BYTES)
        digest.update(handle.read(QUICK_BYTES))
    return {"size": size, "head_tail_sha256": digest.hexdigest()}


def base_model_identity(source: Any) -> dict[str, Any]:
    """What the base model was: a hub id and the revision its snapshot folder names; a built-in's files (small:
    hashed whole); a local folder's or single file's weight files by `quick_identity`."""
    identity: dict[str, Any] = {"name": source.name, "kind": source.kind}
    location = Path(source.location)
    if source.kind == "folder" and location.parent.name == "snapshots":  # the hub cache: .../snapshots/<rev>
        identity["revision"] = location.name
    elif source.kind == "builtin" and location.is_dir():
        identity["files"] = folder_hashes(location)
    elif source.kind == "builtin":
        identity["built_from_seed"] = True  # built in memory from a fixed seed by this package's code
    elif source.kind == "single_file":
        identity["file"] = quick_identity(location)
    elif location.is_dir():
        identity["files"] = {p.relative_to(location).as_posix(): quick_identity(p)
                             for p in sorted(location.rglob("*.safetensors"))}
    return identity


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def write(folder: str | Path, manifest: dict[str, Any]) -> Path:
    return atomic_write_text(Path(folder) / MANIFEST_FILE, json.dumps(manifest, indent=2) + "\n")


def read(folder: str | Path) -> dict[str, Any]:
    """A run's manifest, or a ManifestError saying why there is none to use."""
    path = Path(folder) / MANIFEST_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ManifestError(f"{folder} has no {MANIFEST_FILE}: runs trained before manifests were written have "
                            "none; train its config.json again instead") from None
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise ManifestError(f"{path} cannot be read ({error})") from None
    if not isinstance(data, dict) or not isinstance(data.get("config"), dict):
        raise ManifestError(f"{path} is not a run manifest (no config in it)")
    return data


def file_differences(before: dict[str, str], now_: dict[str, str]) -> dict[str, list[str]]:
    return {"changed": sorted(k for k in before.keys() & now_.keys() if before[k] != now_[k]),
            "missing": sorted(before.keys() - now_.keys()), "new": sorted(now_.keys() - before.keys())}
