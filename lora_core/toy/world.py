"""The toy model's world: one flat shape in a named colour on a plain background of another named colour,
64x64 pixels, captioned "a red circle on a blue background". Deterministic for a seed.

Magenta is kept out of the pretraining world on purpose (its hue, 300°, is 60° or more from every colour the
model learns), so the demo can teach it: the trigger word `zwx` stands for it ("a zwx circle on a black
background" is a magenta circle).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from itertools import product

from PIL import Image, ImageDraw

SIZE = 64
SHAPES = ("circle", "square", "triangle")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "yellow": (235, 215, 40), "green": (40, 170, 60), "blue": (40, 80, 225),
    "white": (240, 240, 240), "black": (20, 20, 20),
}
HELD_OUT: dict[str, tuple[int, int, int]] = {"magenta": (215, 45, 215)}  # never drawn in pretraining
# A second colour never drawn in pretraining, for teaching two new concepts in one run (tests/test_concepts.py).
# Cyan (hue 180°) is at least 120 RGB units from every colour above (green 143, blue 122, magenta 242), so the
# checker's nearest-colour rule tells it apart; it is not part of the demo's concept (concept_scenes).
UNSEEN: dict[str, tuple[int, int, int]] = {"cyan": (30, 200, 200)}
TRIGGER = "zwx"  # the demo's word for the held-out colour
SUPERSAMPLE = 4  # shapes drawn 4x larger, then downscaled: smooth edges as a real picture would have


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str  # foreground colour name (a key of COLOURS or HELD_OUT)
    background: str

    def caption(self, colour_word: str | None = None) -> str:
        return f"a {colour_word or self.colour} {self.shape} on a {self.background} background"


def rgb(name: str) -> tuple[int, int, int]:
    return COLOURS.get(name) or HELD_OUT.get(name) or UNSEEN[name]


def vocabulary() -> list[Scene]:
    """Every scene of the pretraining world: each shape, in each colour, on each other colour."""
    return [Scene(shape, colour, background) for shape, colour, background in product(SHAPES, COLOURS, COLOURS)
            if colour != background]


def concept_scenes() -> list[Scene]:
    """The demo's concept: the held-out colour, as every shape, on every background."""
    return [Scene(shape, colour, background) for shape, colour, background in product(SHAPES, HELD_OUT, COLOURS)]


def draw(scene: Scene, rng: random.Random) -> Image.Image:
    """The scene with a random size (half to two thirds of the picture) and a small random offset."""
    big = SIZE * SUPERSAMPLE
    image = Image.new("RGB", (big, big), rgb(scene.background))
    side = rng.uniform(0.45, 0.65) * big
    cx = big / 2 + rng.uniform(-0.1, 0.1) * big
    cy = big / 2 + rng.uniform(-0.1, 0.1) * big
    box = (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)
    pen = ImageDraw.Draw(image)
    if scene.shape == "circle":
        pen.ellipse(box, fill=rgb(scene.colour))
    elif scene.shape == "square":
        pen.rectangle(box, fill=rgb(scene.colour))
    else:
        pen.polygon(triangle(box), fill=rgb(scene.colour))
    return image.resize((SIZE, SIZE), Image.Resampling.LANCZOS)


def triangle(box: tuple[float, float, float, float]) -> list[tuple[float, float]]:
    """An upright triangle filling the box: apex at the top middle, base along the bottom."""
    left, top, right, bottom = box
    return [((left + right) / 2, top), (right, bottom), (left, bottom)]


def sample_scenes(count: int, seed: int, scenes: list[Scene] | None = None) -> list[tuple[Scene, Image.Image]]:
    """`count` pictures of scenes drawn in turn from `scenes` (the vocabulary by default), shuffled by `seed`."""
    rng = random.Random(seed)
    pool = scenes or vocabulary()
    order = [pool[i % len(pool)] for i in range(count)]
    rng.shuffle(order)
    return [(scene, draw(scene, rng)) for scene in order]
