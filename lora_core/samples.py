"""Sample images during training: each sample prompt rendered with the current LoRA and a fixed seed, so
that steps compare. The prompts are encoded once, before training (unless a text encoder trains: then the
pipeline encodes each prompt with the current LoRA)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lora_core import latents, models
from lora_core.config import TrainConfig
from lora_core.families import Family
from lora_core.files import atomic_write


class DrawingStopped(Exception):
    """A stop was asked between two denoising steps of an image: that image is abandoned. `drawn`: the images
    written before it."""

    drawn: list[tuple[Path, str]] = []


def stop_between_steps(should_stop: Callable[[], bool] | None) -> dict[str, Any]:
    """Pipeline kwargs that check `should_stop` after every denoising step and raise DrawingStopped, so a
    Stop during a sample, grid or sweep is answered within one denoising step, not after the whole image
    (a diffusers pipeline calls `callback_on_step_end` after each step; raising leaves it at once, where its
    own `_interrupt` would still run the remaining loop and return)."""
    if should_stop is None:
        return {}

    def check(pipe, step: int, timestep, tensors: dict[str, Any]) -> dict[str, Any]:
        if should_stop():
            raise DrawingStopped(f"stopped at denoising step {step + 1}")
        return tensors

    return {"callback_on_step_end": check}


def prompts_of(config: TrainConfig) -> list[str]:
    return config.sample_prompts or [", ".join(config.trigger_words)]


def prompt_inputs(family: Family, pipeline, prompts: list[str], device: torch.device,
                  encode: bool = True, settings: dict | None = None) -> list[tuple[str, dict[str, Any]]]:
    """(prompt, pipeline kwargs) per prompt; without `encode` the prompt itself, which the pipeline encodes."""
    if not encode:
        return [(prompt, {"prompt": prompt}) for prompt in prompts]
    return [(prompt, family.sample_inputs(pipeline, prompt, device, settings)) for prompt in prompts]


@torch.no_grad()
def make_samples(config: TrainConfig, family: Family, pipeline, denoiser, inputs: list[tuple[str, dict[str, Any]]],
                 vae, device: torch.device, output: Path, step: int,
                 should_stop: Callable[[], bool] | None = None) -> list[tuple[Path, str]]:
    """Render each prompt with `denoiser` (the trained LoRA without its dropout) and the family's sampler;
    written as samples/step_<N>[_<index>].png. DrawingStopped when `should_stop` says so between two
    denoising steps (the images already written stay)."""
    vae_device, vae_dtype = vae.device, vae.dtype
    vae.to(device, dtype=torch.float32)
    for module in (denoiser, *models.text_encoders(pipeline)):
        module.eval()
    sampler = family.sample_scheduler(pipeline.scheduler.config)
    pipe = type(pipeline)(**{**pipeline.components, family.denoiser: denoiser, "vae": vae, "scheduler": sampler})
    pipe.set_progress_bar_config(disable=True)
    results = []
    try:
        for index, (prompt, kwargs) in enumerate(inputs):
            image = draw(config, family, pipe, vae, kwargs, config.seed + index, device,
                         getattr(pipe, family.denoiser).dtype, should_stop)
            path = output / "samples" / (f"step_{step}.png" if index == 0 else f"step_{step}_{index}.png")
            atomic_write(path, lambda tmp, image=image: image.save(tmp, format="PNG"))
            results.append((path, prompt))
    except DrawingStopped as stopped:
        stopped.drawn = results
        raise
    finally:
        vae.to(vae_device, dtype=vae_dtype)
    return results


@torch.no_grad()
def draw(config: TrainConfig, family: Family, pipe, vae, kwargs: dict[str, Any], seed: int, device: torch.device,
         dtype: torch.dtype, should_stop: Callable[[], bool] | None = None):
    """One image (PIL): the one pipeline call of the trainer's samples and of the grid's and sweep's cells
    (drawing.Renderer), so that a grid cell is the sample the trainer drew. `kwargs`: the prompt, or its
    embeddings; `seed` seeds the initial noise on `device`; the denoiser runs under autocast to `dtype` on CUDA
    (fp32 runs as is); the latents, unpacked to the image's grid where the family packs them, are decoded by
    `vae` (in fp32). DrawingStopped when `should_stop` says so between two denoising steps."""
    drawn = draw_latents(config, family, pipe, kwargs, seed, device, dtype, should_stop)
    return to_image(latents.decode(vae, drawn)[0])


def draw_latents(config: TrainConfig, family: Family, pipe, kwargs: dict[str, Any], seed: int, device: torch.device,
                 dtype: torch.dtype, should_stop: Callable[[], bool] | None = None, steps: int | None = None,
                 size: int | None = None) -> torch.Tensor:
    """`draw`'s latents before decoding, (1, C, h, w) on the image's grid: `steps` sampler steps (default the
    run's sample_inference_steps) at `size` px (default its resolution); the scores draw small and few."""
    steps, size = steps or config.sample_inference_steps, size or config.resolution
    generator = torch.Generator(device).manual_seed(seed)
    with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda" and dtype != torch.float32):
        drawn = pipe(**kwargs, **family.sampling_kwargs(config), num_inference_steps=steps, height=size,
                     width=size, generator=generator, output_type="latent", **stop_between_steps(should_stop)).images
    return family.spatial_latents(pipe, drawn, size, size)


def to_image(pixels: torch.Tensor):
    """(3, H, W) pixels in [-1, 1] -> an RGB PIL image."""
    from PIL import Image

    array = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array)
