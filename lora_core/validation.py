"""Validation loss on held-out images: a curve that says whether the LoRA generalises or only memorises.

- `holdout.split(report, config)` (holdout.py, apart so that the page can check it): the held-out images,
  which never train: `validation_images` of the scanned
  dataset (picked by a hash of their file names, so neither the seed nor the order of the folder decides),
  or the images of `validation_dataset_path`.
- `ValidationSet.build(...)` (once, in setup): each held-out image's latent (centre crop, no flip, the VAE
  posterior's noise from a fixed seed), its caption's conditioning when no text encoder trains, and
  DRAWS_PER_IMAGE (noise, timestep) pairs from a generator of its own, seeded by the image's content alone.
  The training RNG (global, the noise stream, the data order) is never drawn on, so turning validation on
  does not change the training; every evaluation, in every run whatever its seed, sees the same draws.
- `ValidationSet.loss(run)`: the training objective's own `loss` (objective.py: target and weighting; no noise
  offset) in eval mode under no_grad, the mean over images and draws, so the value is comparable across steps
  and runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from lora_core import batches, conditioning, dataset, hardware, latents
from lora_core.config import TrainConfig
from lora_core.families import Family

DRAWS_PER_IMAGE = 4  # (noise, level) pairs per image; the noise levels are spread over four equal strata
SEED_TAG = "lora-studio validation"  # the draws depend on this and the image, never on the run's seed


@dataclass
class HeldOutImage:
    latent: torch.Tensor  # (C, h, w) on the device, in the weights' dtype
    caption: str  # as training would see it: the trigger words in place, never dropped or shuffled
    time_ids: torch.Tensor  # (DRAWS_PER_IMAGE, 6) size/crop ids (SDXL)
    noise: torch.Tensor  # (DRAWS_PER_IMAGE, C, h, w)
    levels: torch.Tensor  # (DRAWS_PER_IMAGE,) noise levels: integer timesteps or sigmas, as the objective draws


class ValidationSet:
    """The held-out images, ready to be evaluated; `text` is their cached conditioning (frozen encoders),
    None when a text encoder trains (the captions are then encoded with its current LoRA each time)."""

    def __init__(self, family: Family, images: list[HeldOutImage], text: dict[str, torch.Tensor] | None):
        self.family, self.images, self.text = family, images, text

    @classmethod
    @torch.no_grad()
    def build(cls, config: TrainConfig, family: Family, report: dataset.DatasetReport, pixel_multiple: int, vae,
              device: torch.device, dtype: torch.dtype, levels_at: Callable[[torch.Tensor], torch.Tensor],
              text: dict[str, torch.Tensor] | None) -> ValidationSet:
        """Encode the held-out images with the VAE (in fp32, then put back where it was) and draw their noise;
        `levels_at` (the objective's `levels_from_uniform`) turns the strata into noise levels."""
        layout = batches.Layout(config, report, dataset.assign_buckets(report, config, pixel_multiple))
        vae_device, vae_dtype = vae.device, vae.dtype
        vae.to(device, dtype=torch.float32)
        images = []
        for index, record in enumerate(layout.records):
            digest = latents.file_digest(record.path)
            pixels = latents.cached_variants(layout, index)[0]  # the centre crop, unflipped
            latent = latents.encode_each(vae, [pixels], [batches.seed_of(SEED_TAG, digest, "vae")], device)[0]
            generator = torch.Generator().manual_seed(batches.seed_of(SEED_TAG, digest, "draws"))
            noise = torch.randn((DRAWS_PER_IMAGE, *latent.shape), generator=generator)
            strata = torch.arange(DRAWS_PER_IMAGE) + torch.rand(DRAWS_PER_IMAGE, generator=generator)
            levels = levels_at(strata / DRAWS_PER_IMAGE)
            bucket, (top, left) = layout.bucket(index), layout.crop_origin(index, None)
            ids = torch.tensor([[record.height, record.width, top, left, bucket.height, bucket.width]],
                               dtype=torch.float32).expand(DRAWS_PER_IMAGE, -1)
            images.append(HeldOutImage(latent.to(dtype), record.caption, ids.to(device), noise.to(device, dtype),
                                       levels.to(device)))
        vae.to(vae_device, dtype=vae_dtype)
        return cls(family, images, text)

    def __len__(self) -> int:
        return len(self.images)

    @torch.no_grad()
    def loss(self, run: Any) -> float:  # a setup.Run (not imported: setup imports this module)
        """The mean held-out loss with the run's current LoRA (the UNet and text encoders left in eval mode;
        the caller puts them back to train)."""
        denoiser = run.bare_unet
        for module in (denoiser, *run.text_encoders):
            module.eval()
        encode = self._encoder(run)
        total = torch.zeros((), device=run.device)
        for index, image in enumerate(self.images):
            text = encode(index, image.caption)
            latent = image.latent.unsqueeze(0).expand(DRAWS_PER_IMAGE, *image.latent.shape)
            inputs = {**self.family.denoiser_inputs(text, image.time_ids), **run.plan.settings}

            def predict(noisy: torch.Tensor, levels: torch.Tensor, inputs: dict = inputs) -> torch.Tensor:
                with run.accelerator.autocast():
                    return self.family.predict(denoiser, noisy, levels, inputs)

            total += run.objective.loss(predict, latent, image.noise, image.levels)
        return float(total.item()) / len(self.images)

    def _encoder(self, run: Any):
        """(image index, caption) -> the text conditioning for its DRAWS_PER_IMAGE rows."""

        def rows(text: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return {name: t.expand(DRAWS_PER_IMAGE, *t.shape[1:]) for name, t in text.items()}

        if self.text is not None:
            return lambda index, caption: rows({name: t[index:index + 1] for name, t in self.text.items()})
        # the plain modules, not the accelerator's wrappers: only the main process evaluates
        encode = conditioning.trained_encoder(self.family, run.pipeline, run.text_encoders, run.device,
                                              hardware.weight_dtype(run.plan.precision), run.plan.settings)
        return lambda index, caption: rows(encode([caption]))
