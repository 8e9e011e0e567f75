"""Sample images during training: each sample prompt rendered with the current LoRA and a fixed seed, so
that steps compare. The prompts are encoded once, before training (unless a text encoder trains: then the
pipeline encodes each prompt with the current LoRA)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lora_core import latents, models
from lora_core.config import TrainConfig
from lora_core.families import Family
from lora_core.files import atomic_write


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
                 vae, device: torch.device, output: Path, step: int) -> list[tuple[Path, str]]:
    """Render each prompt with `denoiser` (the trained LoRA without its dropout) and the family's sampler;
    written as samples/step_<N>[_<index>].png."""
    vae_device, vae_dtype = vae.device, vae.dtype
    vae.to(device, dtype=torch.float32)
    for module in (denoiser, *models.text_encoders(pipeline)):
        module.eval()
    sampler = family.sample_scheduler(pipeline.scheduler.config)
    pipe = type(pipeline)(**{**pipeline.components, family.denoiser: denoiser, "vae": vae, "scheduler": sampler})
    pipe.set_progress_bar_config(disable=True)
    results = []
    for index, (prompt, kwargs) in enumerate(inputs):
        generator = torch.Generator(device).manual_seed(config.seed + index)
        with torch.autocast(device.type, dtype=denoiser.dtype, enabled=device.type == "cuda"):
            drawn = pipe(**kwargs, **family.sampling_kwargs(config), num_inference_steps=config.sample_inference_steps,
                         height=config.resolution, width=config.resolution, generator=generator,
                         output_type="latent").images
        image = to_image(latents.decode(vae, family.spatial_latents(pipe, drawn, config.resolution,
                                                                    config.resolution))[0])
        path = output / "samples" / (f"step_{step}.png" if index == 0 else f"step_{step}_{index}.png")
        atomic_write(path, lambda tmp, image=image: image.save(tmp, format="PNG"))
        results.append((path, prompt))
    vae.to(vae_device, dtype=vae_dtype)
    return results


def to_image(pixels: torch.Tensor):
    """(3, H, W) pixels in [-1, 1] -> an RGB PIL image."""
    from PIL import Image

    array = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array)
