"""A deterministic judge of toy pictures (no model weights): which shape, in which colour, on which background.

The background colour is the median of the border pixels; the foreground is every pixel far from it (and must
be of one colour, not noise); each colour is the palette name nearest the mean of its pixels (the held-out
colour and the second unseen one, world.UNSEEN, included, so a picture of either can be recognised); the shape
is the template (circle, square, triangle fitted to the foreground's bounding box) that overlaps the foreground
mask best.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from lora_core.toy import world

FOREGROUND_DISTANCE = 90.0  # RGB distance from the background colour that makes a pixel foreground
MIN_AREA = 0.04  # a foreground under 4 % of the picture is no shape at all
MIN_OVERLAP = 0.6  # the best template must overlap the mask this well (intersection over union)
MAX_SPREAD = 70.0  # a foreground whose pixels lie further than this from their mean colour is no flat shape


@dataclass(frozen=True)
class Verdict:
    shape: str | None  # None: no recognisable shape
    colour: str | None
    background: str

    def matches(self, scene: world.Scene) -> bool:
        return (self.shape, self.colour, self.background) == (scene.shape, scene.colour, scene.background)


def palette() -> dict[str, np.ndarray]:
    return {name: np.array(world.rgb(name), dtype=np.float64)
            for name in (*world.COLOURS, *world.HELD_OUT, *world.UNSEEN)}


def nearest_colour(mean: np.ndarray) -> str:
    return min(palette().items(), key=lambda item: float(np.linalg.norm(item[1] - mean)))[0]


def _templates(box: tuple[int, int, int, int], size: int) -> dict[str, np.ndarray]:
    masks = {}
    for shape in world.SHAPES:
        canvas = Image.new("L", (size, size), 0)
        pen = ImageDraw.Draw(canvas)
        if shape == "circle":
            pen.ellipse(box, fill=255)
        elif shape == "square":
            pen.rectangle(box, fill=255)
        else:
            pen.polygon(world.triangle(box), fill=255)
        masks[shape] = np.asarray(canvas) > 127
    return masks


def judge(image: Image.Image) -> Verdict:
    pixels = np.asarray(image.convert("RGB").resize((world.SIZE, world.SIZE)), dtype=np.float64)
    border = np.concatenate([pixels[:2].reshape(-1, 3), pixels[-2:].reshape(-1, 3),
                             pixels[:, :2].reshape(-1, 3), pixels[:, -2:].reshape(-1, 3)])
    background = np.median(border, axis=0)
    mask = np.linalg.norm(pixels - background, axis=2) > FOREGROUND_DISTANCE
    background_name = nearest_colour(pixels[~mask].mean(axis=0) if (~mask).any() else background)
    if mask.mean() < MIN_AREA:
        return Verdict(None, None, background_name)
    foreground = pixels[mask]
    if float(np.linalg.norm(foreground - foreground.mean(axis=0), axis=1).mean()) > MAX_SPREAD:
        return Verdict(None, None, background_name)
    colour = nearest_colour(foreground.mean(axis=0))
    rows, cols = np.nonzero(mask)
    # the bounding box of the central 98 % of foreground pixels: a few stray pixels do not stretch it
    top, bottom = np.percentile(rows, [1, 99])
    left, right = np.percentile(cols, [1, 99])
    box = (int(round(left)), int(round(top)), int(round(right)), int(round(bottom)))
    best, overlap = None, 0.0
    for shape, template in _templates(box, world.SIZE).items():
        iou = float((template & mask).sum()) / max(1.0, float((template | mask).sum()))
        if iou > overlap:
            best, overlap = shape, iou
    return Verdict(best if overlap >= MIN_OVERLAP else None, colour, background_name)
