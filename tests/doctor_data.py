"""Datasets for the dataset doctor's tests and its speed measurement: clean pictures (each a different
random scene with the same fine grain, so none is blurrier than the rest and none is like another), and one
planted instance of each defect the doctor looks for."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

WORDS = ["red", "blue", "green", "amber", "violet", "teal", "ochre", "grey", "white", "black", "golden", "silver",
         "dog", "cat", "fox", "owl", "horse", "hare", "deer", "bear", "lynx", "crow", "swan", "wolf", "beach",
         "forest", "street", "kitchen", "meadow", "harbour", "garden", "desert", "attic", "bridge", "river", "castle"]
TRIGGER = "zkdog"


def scene(seed: int, size: tuple[int, int] = (448, 384)) -> Image.Image:
    """A random low-frequency picture with fine grain: different seeds look nothing alike."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8), "RGB")
    smooth = np.asarray(coarse.resize(size, Image.Resampling.BICUBIC), dtype=np.float32)
    grain = rng.uniform(-24, 24, smooth.shape[:2] + (1,))
    return Image.fromarray((smooth + grain).clip(0, 255).astype(np.uint8), "RGB")


def caption(seed: int) -> str:
    rng = np.random.default_rng(10_000 + seed)
    picked = rng.choice(len(WORDS), 6, replace=False)
    return f"{TRIGGER}, " + ", ".join(f"{WORDS[a]} {WORDS[b]}" for a, b in zip(picked[:3], picked[3:], strict=True))


def clean(folder: Path, count: int, size: tuple[int, int] = (448, 384), suffix: str = ".png",
          first_seed: int = 0) -> list[str]:
    """`count` clean captioned images; their names."""
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(first_seed, first_seed + count):
        name = f"clean_{i:04d}{suffix}"
        scene(i, size).save(folder / name, quality=92) if suffix == ".jpg" else scene(i, size).save(folder / name)
        (folder / name).with_suffix(".txt").write_text(caption(i), encoding="utf-8")
        names.append(name)
    return names


def _save(folder: Path, name: str, image: Image.Image, text: str | None, **options) -> str:
    image.save(folder / name, **options)
    if text is not None:
        (folder / name).with_suffix(".txt").write_text(text, encoding="utf-8")
    return name


def reencoded(path: Path, scale: float = 0.7, quality: int = 70) -> Image.Image:
    """The picture resized and JPEG-compressed again: a near-duplicate."""
    image = Image.open(path).convert("RGB")
    image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue()))


def planted(folder: Path) -> dict[str, str]:
    """One of each defect in `folder` beside clean images: kind -> the file the doctor must name."""
    clean(folder, 12)
    files = {"duplicate": "dup_copy.png", "near_duplicate": "near_copy.jpg"}
    (folder / files["duplicate"]).write_bytes((folder / "clean_0000.png").read_bytes())
    (folder / "dup_copy.txt").write_text(caption(100), encoding="utf-8")
    _save(folder, files["near_duplicate"], reencoded(folder / "clean_0001.png"), caption(101), quality=90)
    files["blurry"] = _save(folder, "soft.png", scene(102).filter(ImageFilter.GaussianBlur(4)), caption(102))
    files["upscaled"] = _save(folder, "tiny.png", scene(103, (160, 150)), caption(103))
    files["cropped"] = _save(folder, "panorama.png", scene(104, (2000, 250)), caption(104))
    long_caption = caption(105) + ", " + ", ".join(f"{WORDS[i % len(WORDS)]} detail number {i}" for i in range(40))
    files["caption_too_long"] = _save(folder, "wordy.png", scene(105), long_caption)
    files["trigger_missing"] = _save(folder, "no_trigger.png", scene(106), caption(106).split(", ", 1)[1])
    files["caption_missing"] = _save(folder, "no_caption.png", scene(107), None)
    _save(folder, "twin_a.png", scene(108), f"{TRIGGER}, a dog sitting on grass in the sun")
    twin = f"{TRIGGER}, A dog sitting on grass, in the sun."
    files["similar_captions"] = _save(folder, "twin_b.png", scene(109), twin)
    rgba = scene(110).convert("RGBA")
    alpha = np.full((rgba.height, rgba.width), 255, np.uint8)
    alpha[:, : rgba.width // 2] = 0
    rgba.putalpha(Image.fromarray(alpha, "L"))
    files["transparent"] = _save(folder, "cutout.png", rgba, caption(110))
    files["converted"] = _save(folder, "print.jpg", scene(111).convert("CMYK"), caption(111), quality=92)
    grey16 = (np.asarray(scene(112).convert("L"), np.float32) * 257).astype(np.uint16)
    _save(folder, "deep.png", Image.fromarray(grey16), caption(112))
    _save(folder, "indexed.png", scene(113).quantize(256), caption(113))
    exif = Image.Exif()
    exif[0x0112] = 6
    files["rotated"] = _save(folder, "sideways.jpg", scene(114), caption(114), quality=92, exif=exif.tobytes())
    return files


def make_set(folder: Path, count: int, captions: dict[int, str | None] | None = None) -> Path:
    """`count` tiny identical images with tag captions (`captions` overrides some; None: no caption file)."""
    folder.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 20, 30)).save(buffer, format="PNG")
    raw = buffer.getvalue()
    for i in range(count):
        (folder / f"img_{i:04d}.png").write_bytes(raw)
        text = (captions or {}).get(i, f"zkdog, tag{i % 3}, shared")
        if text is not None:
            (folder / f"img_{i:04d}.txt").write_text(text)
    return folder
