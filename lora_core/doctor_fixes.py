"""The dataset doctor's one-click fixes. None deletes or overwrites a user's image:

- `exclude` lists files in the dataset's `.lora-studio-exclude` (dataset.EXCLUDE_FILE), which the scan honours;
  `include` takes them off the list again.
- `add_trigger` puts the trigger word first in captions that lack it (writing each .txt atomically).
- `convert` writes an 8-bit RGB PNG beside the image (EXIF rotation applied, CMYK/16-bit/palette converted,
  transparency put on a background colour), gives it a copy of the caption, and excludes the original, which
  stays on disk.

Every name must be a plain file name in the dataset folder; a path, or a link that leads out of it, is refused.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
from PIL import Image

from lora_core import dataset
from lora_core.errors import UserError
from lora_core.files import atomic_write, atomic_write_text


class FixError(UserError):
    field = "dataset_path"


def _inside(folder: Path, name: str) -> Path:
    """`folder/name` for a plain file name whose real path stays in the folder; FixError otherwise."""
    if not name or name in (".", "..") or Path(name).name != name or "\\" in name or "\x00" in name:
        raise FixError(f"{name!r} is not a file name in the dataset folder")
    path = folder / name
    if not path.resolve().is_relative_to(folder.resolve()):
        raise FixError(f"{name} leads outside the dataset folder; nothing was changed")
    return path


def excluded(folder: str | Path) -> set[str]:
    return dataset.read_excluded(Path(folder))


def exclude(folder: str | Path, names: list[str]) -> list[str]:
    """Leave `names` out of training (they stay on disk); the names newly excluded."""
    folder = Path(folder)
    for name in names:
        if not _inside(folder, name).exists():
            raise FixError(f"{name} is not in {folder}")
    current = _exclude_lines(folder)
    listed = set(dataset.read_excluded(folder))
    added = [name for name in dict.fromkeys(names) if name not in listed]
    if added:
        atomic_write_text(folder / dataset.EXCLUDE_FILE, "".join(f"{line}\n" for line in current + added))
    return added


def include(folder: str | Path, names: list[str]) -> list[str]:
    """Take `names` off the exclude list (the undo of `exclude`); the names that were on it."""
    folder = Path(folder)
    drop = set(names)
    listed = drop & dataset.read_excluded(folder)  # before the list is rewritten
    lines = _exclude_lines(folder)
    kept = [line for line in lines if line.split("#", 1)[0].strip() not in drop]
    if len(kept) != len(lines):
        atomic_write_text(folder / dataset.EXCLUDE_FILE, "".join(f"{line}\n" for line in kept))
    return sorted(listed)


def _exclude_lines(folder: Path) -> list[str]:
    path = folder / dataset.EXCLUDE_FILE
    if not path.exists():
        return ["# files left out of training (kept on disk); written by LoRA Studio, one name a line"]
    _inside(folder, dataset.EXCLUDE_FILE)
    return _read_text(path).splitlines()


def _read_text(path: Path) -> str:
    """A small text file of the dataset, read as training reads captions (a FIFO or device is refused)."""
    try:
        with dataset.open_regular(path) as handle:
            return handle.read(dataset.MAX_CAPTION_FILE_BYTES * 16).decode("utf-8-sig", errors="replace")
    except ValueError as error:
        raise FixError(f"{path.name}: {error}") from None


def add_trigger(folder: str | Path, names: list[str], trigger: str) -> list[str]:
    """Put `trigger` first in the captions of the images `names` that lack it (a caption file is created
    where there is none); the image names whose caption changed."""
    folder, trigger = Path(folder), " ".join(trigger.split())
    if not trigger:
        raise FixError("the trigger word is empty")
    changed = []
    for name in names:
        caption_path = _inside(folder, name).with_suffix(".txt")
        _inside(folder, caption_path.name)
        text = " ".join(_read_text(caption_path).split()) if caption_path.exists() else ""
        if re.search(rf"(?<!\w){re.escape(trigger)}(?!\w)", text, re.IGNORECASE):
            continue
        atomic_write_text(caption_path, f"{trigger}, {text}" if text else trigger)
        changed.append(name)
    return changed


def convert(folder: str | Path, name: str, background: tuple[int, int, int] = (255, 255, 255)) -> str:
    """Write `name` as an 8-bit RGB PNG beside it (never over an existing file), copy its caption, exclude the
    original; the new file's name."""
    folder = Path(folder)
    source = _inside(folder, name)
    try:
        image = _flattened(source, background)
    except ValueError as error:
        raise FixError(f"{name} cannot be converted: {error}") from None
    target = _free_name(folder, f"{source.stem}_rgb")
    atomic_write(target, lambda tmp: image.save(tmp, format="PNG"))
    caption = source.with_suffix(".txt")
    if caption.is_file() and not caption.is_symlink():
        atomic_write_text(target.with_suffix(".txt"), _read_text(caption))
    exclude(folder, [name])
    return target.name


def _flattened(path: Path, background: tuple[int, int, int]) -> Image.Image:
    """The image as training would see it, but transparency put on `background` instead of white."""
    with dataset.open_regular(path) as handle, Image.open(handle) as image:
        image.load()
        has_alpha = image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info
        if not has_alpha:
            return dataset.open_image(path)
        from PIL import ImageOps

        rgba = ImageOps.exif_transpose(image).convert("RGBA")
    alpha = np.asarray(rgba, dtype=np.float32)[..., 3:] / 255.0
    pixels = np.asarray(rgba, dtype=np.float32)[..., :3] * alpha + np.array(background, np.float32) * (1 - alpha)
    return Image.fromarray(pixels.round().clip(0, 255).astype(np.uint8), "RGB")


def _free_name(folder: Path, stem: str) -> Path:
    for number in range(1000):
        candidate = folder / (f"{stem}.png" if number == 0 else f"{stem}_{number}.png")
        if not os.path.lexists(candidate) and not os.path.lexists(candidate.with_suffix(".txt")):
            return candidate
    raise FixError(f"no free name for {stem}.png in {folder}")
