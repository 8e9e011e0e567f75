"""What the UNet is trained to predict, and how each sample's error is weighted.

- target: the noise (epsilon models) or the velocity (v-prediction, read from the model's scheduler);
- zero-terminal-SNR: rescale the noise schedule so the last timestep is pure noise (for v-prediction models);
- min-SNR-gamma: weight each sample by min(SNR, gamma) / SNR (epsilon) or / (SNR + 1) (v), which stops
  the low-noise timesteps from dominating (Hang et al. 2023); 0 turns it off;
- noise offset: add a per-channel constant to the noise so the model can learn very dark or bright images.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr

from lora_core.config import TrainConfig


def noise_scheduler_for(scheduler_config, config: TrainConfig) -> DDPMScheduler:
    return DDPMScheduler.from_config(scheduler_config, rescale_betas_zero_snr=config.zero_terminal_snr)


def offset_noise(noise: torch.Tensor, offsets: torch.Tensor | None, strength: float) -> torch.Tensor:
    """`offsets` is standard-normal noise of shape (batch, channels, 1, 1), drawn with the rest of the noise."""
    return noise if offsets is None or strength == 0 else noise + strength * offsets


def target_for(noise_scheduler: DDPMScheduler, latents: torch.Tensor, noise: torch.Tensor,
               timesteps: torch.Tensor, prediction_type: str) -> torch.Tensor:
    if prediction_type == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    return noise


def diffusion_loss(prediction: torch.Tensor, target: torch.Tensor, noise_scheduler: DDPMScheduler,
                   timesteps: torch.Tensor, prediction_type: str, min_snr_gamma: float) -> torch.Tensor:
    """Mean squared error in fp32, optionally min-SNR weighted per sample (as diffusers' scripts do)."""
    if min_snr_gamma == 0:
        return F.mse_loss(prediction.float(), target.float())
    snr = compute_snr(noise_scheduler, timesteps).clamp(min=1e-8)  # zero-terminal-SNR makes the last one 0
    weights = torch.clamp(snr, max=min_snr_gamma)
    weights = weights / (snr + 1) if prediction_type == "v_prediction" else weights / snr
    per_sample = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(
        dim=list(range(1, prediction.ndim)))
    return (per_sample * weights).mean()
