"""The reference: LoRA training the way diffusers' `examples/text_to_image/train_text_to_image_lora.py` does it.

Per step it decodes and transforms the images (a DataLoader with no workers, as the script's default), encodes
them with the VAE, encodes the captions with the text encoder(s), adds noise, runs the UNet against the
scheduler's target (noise, or velocity for v-prediction), optionally min-SNR weighted, and reads the loss
back (`.item()`, as the script does for its logged `train_loss`). Weights are fp32 on the CPU; under mixed
precision the frozen models are in that dtype, the UNet runs under autocast (what `accelerator.prepare` adds on
one device) and the LoRA weights keep the UNet's dtype (the script casts them to fp32 only for fp16). AdamW is
torch's default implementation. SDXL follows `train_text_to_image_lora_sdxl.py`: fp32 VAE, size conditioning.

This is the yardstick of the benchmark and of the parity tests, so it stays short and plain on purpose.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr
from peft import LoraConfig
from PIL import Image

TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0"]
DTYPES = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class ReferenceSettings:
    resolution: int = 512
    batch_size: int = 1
    rank: int = 16
    alpha: float = 16
    learning_rate: float = 1e-4
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"  # no | bf16 | fp16
    seed: int = 42
    snr_gamma: float = 0.0  # the script's --snr_gamma (min-SNR weighting); 0 is its default None


class ImageCaptionDataset(torch.utils.data.Dataset):
    """Opens, resizes and crops each image when it is fetched, as the script's `preprocess_train` does."""

    def __init__(self, images: list[Path], captions: list[str], resolution: int):
        self.images, self.captions, self.resolution = images, captions, resolution

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        image = Image.open(self.images[index]).convert("RGB")
        width, height = image.size
        scale = self.resolution / min(width, height)  # Resize(resolution) then CenterCrop(resolution)
        size = (max(self.resolution, round(width * scale)), max(self.resolution, round(height * scale)))
        resized = image.resize(size, Image.Resampling.BILINEAR)
        left, top = (resized.width - self.resolution) // 2, (resized.height - self.resolution) // 2
        crop = resized.crop((left, top, left + self.resolution, top + self.resolution))
        pixels = torch.from_numpy(np.asarray(crop, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)
        return {"pixel_values": pixels, "caption": self.captions[index],
                "time_ids": torch.tensor([height, width, top, left, self.resolution, self.resolution])}


class ReferenceLoop:
    """Build with a diffusers pipeline (SD 1.x/2.x or SDXL); each `step()` trains one batch and returns the loss."""

    def __init__(self, pipeline, images: list[Path], captions: list[str], settings: ReferenceSettings,
                 device: torch.device):
        self.pipeline, self.settings, self.device = pipeline, settings, device
        self.dtype = DTYPES[settings.mixed_precision]
        self.sdxl = hasattr(pipeline, "text_encoder_2")
        torch.manual_seed(settings.seed)
        encoders = [pipeline.text_encoder] + ([pipeline.text_encoder_2] if self.sdxl else [])
        for module in (pipeline.unet, pipeline.vae, *encoders):
            module.requires_grad_(False)
            module.to(device, dtype=self.dtype)
        if self.sdxl:
            pipeline.vae.to(dtype=torch.float32)  # the SDXL script keeps the VAE in fp32 (it overflows in fp16)
        self.unet = pipeline.unet
        self.unet.add_adapter(LoraConfig(r=settings.rank, lora_alpha=settings.alpha, init_lora_weights="gaussian",
                                         target_modules=TARGET_MODULES))
        self.params = [p for p in self.unet.parameters() if p.requires_grad]
        if settings.mixed_precision == "fp16":
            for param in self.params:
                param.data = param.data.float()
        self.unet.train()
        self.optimizer = torch.optim.AdamW(self.params, lr=settings.learning_rate, weight_decay=settings.weight_decay)
        self.noise_scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)
        self.loader = torch.utils.data.DataLoader(
            ImageCaptionDataset(images, captions, settings.resolution), batch_size=settings.batch_size,
            shuffle=True, generator=torch.Generator().manual_seed(settings.seed))
        self.batches = iter(self.loader)

    def next_batch(self) -> dict:
        try:
            return next(self.batches)
        except StopIteration:  # a new epoch
            self.batches = iter(self.loader)
            return next(self.batches)

    def step(self) -> float:
        batch = self.next_batch()
        vae = self.pipeline.vae
        pixels = batch["pixel_values"].to(self.device, dtype=vae.dtype)
        posterior = vae.encode(pixels).latent_dist
        latents = self.sample_posterior(posterior, batch).to(self.dtype) * vae.config.scaling_factor
        noise, timesteps = self.draw_noise(latents)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        if self.noise_scheduler.config.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        conditioning = self.encode_captions(batch)
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            prediction = self.unet(noisy, timesteps, **conditioning).sample
        if not self.settings.snr_gamma:
            loss = F.mse_loss(prediction.float(), target.float())
        else:  # min-SNR weighting, as the script computes it
            snr = compute_snr(self.noise_scheduler, timesteps)
            weights = torch.stack([snr, self.settings.snr_gamma * torch.ones_like(timesteps)], dim=1).min(dim=1)[0]
            if self.noise_scheduler.config.prediction_type == "v_prediction":
                weights = weights / (snr + 1)
            else:
                weights = weights / snr
            loss = F.mse_loss(prediction.float(), target.float(), reduction="none")
            loss = (loss.mean(dim=list(range(1, len(loss.shape)))) * weights).mean()
        train_loss = loss.item()  # the script logs the loss every step
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.settings.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad()
        return train_loss

    # The script's own random draws; the parity tests override these to replay the trainer's.

    def sample_posterior(self, posterior, batch: dict) -> torch.Tensor:
        return posterior.sample()

    def draw_noise(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
                                  device=self.device)
        return noise, timesteps

    def encode_captions(self, batch: dict) -> dict:
        """Tokenize and encode the batch's captions, every step (the text encoders are frozen)."""
        with torch.no_grad():
            if not self.sdxl:
                embeds, _ = self.pipeline.encode_prompt(batch["caption"], self.device, 1, False)
                return {"encoder_hidden_states": embeds}
            embeds, _, pooled, _ = self.pipeline.encode_prompt(batch["caption"], device=self.device,
                                                               do_classifier_free_guidance=False)
        time_ids = batch["time_ids"].to(self.device, dtype=embeds.dtype)
        return {"encoder_hidden_states": embeds, "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}
