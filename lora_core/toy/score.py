"""Drawing with the toy pipeline and judging what it drew: the vocabulary score and the concept rate."""

from __future__ import annotations

import random

import torch
from diffusers import DPMSolverMultistepScheduler
from PIL import Image

from lora_core.toy import checker, world

GUIDANCE = 3.0
SAMPLING_STEPS = 20
VOCABULARY_PROMPTS = 60
CONCEPT_PROMPT = f"a {world.TRIGGER} circle on a black background"  # = a magenta circle on black


def vocabulary_set(count: int = VOCABULARY_PROMPTS) -> list[tuple[world.Scene, int]]:
    """A fixed set of vocabulary scenes, each with its own seed."""
    scenes = random.Random(0).sample(world.vocabulary(), count)
    return [(scene, 1000 + index) for index, scene in enumerate(scenes)]


def prepare(pipeline):
    """The pipeline set to draw as the trainer's samples do: DPM-Solver, no progress bars."""
    if not isinstance(pipeline.scheduler, DPMSolverMultistepScheduler):
        pipeline.scheduler = DPMSolverMultistepScheduler.from_config(pipeline.scheduler.config)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@torch.no_grad()
def draw(pipeline, prompts: list[str], seeds: list[int], guidance: float = GUIDANCE,
         steps: int = SAMPLING_STEPS, batch: int = 16) -> list[Image.Image]:
    prepare(pipeline)
    images: list[Image.Image] = []
    for start in range(0, len(prompts), batch):
        generators = [torch.Generator().manual_seed(seed) for seed in seeds[start:start + batch]]
        images += pipeline(prompts[start:start + batch], generator=generators, guidance_scale=guidance,
                           num_inference_steps=steps, height=world.SIZE, width=world.SIZE).images
    return images


def vocabulary_score(pipeline, count: int = VOCABULARY_PROMPTS, guidance: float = GUIDANCE) -> float:
    """The share of a fixed set of vocabulary prompts drawn right (shape, colour and background)."""
    chosen = vocabulary_set(count)
    images = draw(pipeline, [scene.caption() for scene, _ in chosen], [seed for _, seed in chosen], guidance)
    return sum(checker.judge(image).matches(scene) for (scene, _), image in zip(chosen, images, strict=True)) / count


def concept_rate(pipeline, prompt: str = CONCEPT_PROMPT, seeds: range = range(20),
                 guidance: float = GUIDANCE) -> float:
    """The share of seeds for which `prompt` comes out in the held-out colour."""
    images = draw(pipeline, [prompt] * len(seeds), list(seeds), guidance)
    colour = next(iter(world.HELD_OUT))
    return sum(checker.judge(image).colour == colour for image in images) / len(seeds)


def before_after(base, trained, prompt: str = CONCEPT_PROMPT, seeds: range = range(8),
                 zoom: int = 2) -> Image.Image:
    """Two labelled rows for the README: `prompt` drawn by the base pipeline, then with the LoRA loaded."""
    from PIL import ImageDraw

    rows = [("base model", draw(base, [prompt] * len(seeds), list(seeds))),
            ("with the demo LoRA", draw(trained, [prompt] * len(seeds), list(seeds)))]
    side, label = world.SIZE * zoom, 22
    sheet = Image.new("RGB", (side * len(seeds), (side + label) * len(rows) + label), "white")
    pen = ImageDraw.Draw(sheet)
    pen.text((4, 4), f'"{prompt}", {len(seeds)} seeds', fill="black")
    for row, (name, images) in enumerate(rows):
        top = label + row * (side + label)
        pen.text((4, top + 4), name, fill="black")
        for column, image in enumerate(images):
            sheet.paste(image.resize((side, side), Image.Resampling.NEAREST), (column * side, top + label))
    return sheet
