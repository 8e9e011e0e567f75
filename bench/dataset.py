"""The benchmark's dataset: synthetic photo-like JPEGs with captions, the same for every phase (and, in
`python -m bench compare`, for both commits: the same seed makes the same files)."""

from __future__ import annotations

from pathlib import Path


def make_dataset(folder: Path, count: int, size: int, seed: int = 0) -> Path:
    import numpy as np
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    colors = {"red": (200, 40, 40), "blue": (40, 60, 200), "green": (40, 160, 60), "yellow": (220, 200, 40),
              "white": (235, 235, 235), "black": (20, 20, 20)}
    names = list(colors)
    ramp = np.linspace(0.6, 1.0, size, dtype=np.float32)[:, None, None]
    for index in range(count):
        shape_color, background = rng.choice(names, 2, replace=False)
        array = (np.array(colors[background], np.float32) * ramp * np.ones((size, size, 3), np.float32))
        image = Image.fromarray(array.clip(0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(image)
        box = sorted(rng.integers(size // 8, size - size // 8, 2)), sorted(rng.integers(size // 8, size - size // 8, 2))
        corners = (box[0][0], box[1][0], box[0][1] + size // 16, box[1][1] + size // 16)
        shape = "circle" if index % 2 else "square"
        (draw.ellipse if shape == "circle" else draw.rectangle)(corners, fill=colors[shape_color])
        image.save(folder / f"image_{index:03d}.jpg", quality=92)
        (folder / f"image_{index:03d}.txt").write_text(f"a {shape_color} {shape} on a {background} background\n")
    return folder
