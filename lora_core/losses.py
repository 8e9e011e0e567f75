"""The DDPM objective's loss and noise options (config_loss.py), as sd-scripts defines them.

- `huber_threshold`: the per-sample Huber c of `huber_schedule` (sd-scripts' `get_huber_threshold_if_needed`):
  snr: (1 - c) / (1 + sigma_t)^2 + c with sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t); exponential:
  scale * exp(ln(c) * t / T); constant: c * scale.
- `elementwise_loss`: l2 (d^2), l1 (|d|), huber 2c(sqrt(d^2 + c^2) - c), smooth_l1 2(sqrt(d^2 + c^2) - c)
  (sd-scripts' `conditional_loss`; its "huber" is the pseudo-Huber loss, smooth everywhere).
- `debiased_weights`: 1 / sqrt(SNR) (epsilon) or 1 / (SNR + 1) (v-prediction), SNR capped at 1000
  (sd-scripts' `apply_debiased_estimation`, Yu et al. 2024).
- `pyramid_noise`: multi-resolution noise (sd-scripts' `pyramid_noise_like`): for level i a standard-normal
  image of size (h, w) / r^i, r drawn in [2, 4) per level, bilinearly upscaled and scaled by discount^i, added
  to the noise, which is then divided by its standard deviation over the whole batch. The draws come from the
  run's own noise generator (distributed.SampleNoise), not Python's `random`, so a resumed run draws the same.

The order of the per-sample weights is sd-scripts': the elementwise loss, its mean per sample, min-SNR, then
debiasing, then the batch mean.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

SNR_CAP = 1000.0  # sd-scripts caps the SNR of debiasing there (timestep 0's SNR is near infinite)
MIN_SNR = 1e-8  # zero-terminal-SNR makes the last timestep's SNR 0


def huber_threshold(schedule: str, c: float, scale: float, timesteps: torch.Tensor,
                    alphas_cumprod: torch.Tensor | None, num_timesteps: int) -> torch.Tensor:
    """Huber's c for each sample at its timestep (integer, or a flow model's sigma x 1000: no `alphas_cumprod`,
    so no snr schedule)."""
    if schedule == "exponential":
        return torch.exp(math.log(c) / num_timesteps * timesteps.float()) * scale
    if schedule == "snr" and alphas_cumprod is not None:
        alpha_bar = alphas_cumprod.to(timesteps.device)[timesteps].float()
        sigmas = ((1.0 - alpha_bar) / alpha_bar) ** 0.5
        return (1 - c) / (1 + sigmas) ** 2 + c
    if schedule == "constant":
        return torch.full(timesteps.shape, c * scale, device=timesteps.device)
    if schedule == "snr":
        raise ValueError("huber_schedule 'snr' reads a DDPM noise schedule; a flow model has none")
    raise ValueError(f"unknown huber_schedule {schedule!r}")


def elementwise_loss(prediction: torch.Tensor, target: torch.Tensor, loss_type: str,
                     huber_c: torch.Tensor | None = None) -> torch.Tensor:
    """The error of each element, in fp32; `huber_c` is per sample (huber and smooth_l1)."""
    prediction, target = prediction.float(), target.float()
    if loss_type == "l2":
        return F.mse_loss(prediction, target, reduction="none")
    if loss_type == "l1":
        return F.l1_loss(prediction, target, reduction="none")
    if huber_c is None:
        raise ValueError(f"loss_type {loss_type!r} needs a Huber threshold")
    c = huber_c.float().view(-1, *[1] * (prediction.ndim - 1))
    smooth = torch.sqrt((prediction - target) ** 2 + c ** 2) - c
    if loss_type == "huber":
        return 2 * c * smooth
    if loss_type == "smooth_l1":
        return 2 * smooth
    raise ValueError(f"unknown loss_type {loss_type!r}")


def snr_of(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    alpha_bar = alphas_cumprod.to(timesteps.device)[timesteps].float()
    return alpha_bar / (1 - alpha_bar)


def debiased_weights(snr: torch.Tensor, v_prediction: bool) -> torch.Tensor:
    snr = snr.clamp(min=MIN_SNR, max=SNR_CAP)
    return 1 / (snr + 1) if v_prediction else 1 / torch.sqrt(snr)


def pyramid_noise(noise: torch.Tensor, generator: torch.Generator, iterations: int,
                  discount: float) -> torch.Tensor:
    """Multi-resolution noise like `noise` (batch, channels, h, w); see the module's docstring."""
    batch, channels, height, width = noise.shape
    dtype, noise = noise.dtype, noise.float().clone()
    for level in range(iterations):
        ratio = float(torch.rand((), generator=generator, device=generator.device)) * 2 + 2
        small_h, small_w = max(1, int(height / ratio ** level)), max(1, int(width / ratio ** level))
        small = torch.randn((batch, channels, small_h, small_w), generator=generator, device=generator.device)
        noise += F.interpolate(small.to(noise.device), size=(height, width), mode="bilinear") * discount ** level
        if small_h == 1 or small_w == 1:
            break  # the coarsest level is a single pixel
    return (noise / noise.std()).to(dtype)
