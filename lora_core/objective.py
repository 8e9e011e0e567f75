"""What the denoiser is trained to predict, how noise levels are drawn, and how each sample's error is weighted.

A family picks its objective (`Family.objective`); the training step and the held-out validation loss both
call the same `Objective.loss`, so the two can never drift apart. Two objectives exist:

`DDPMObjective` (the SD UNet families): integer timesteps drawn uniformly from the DDPM schedule;
- target: the noise (epsilon models) or the velocity (v-prediction, read from the model's scheduler);
- zero-terminal-SNR: rescale the noise schedule so the last timestep is pure noise (for v-prediction models);
- min-SNR-gamma: weight each sample by min(SNR, gamma) / SNR (epsilon) or / (SNR + 1) (v), which stops
  the low-noise timesteps from dominating (Hang et al. 2023); 0 turns it off;
- sd-scripts' loss_type (l1, Huber, smooth L1 with huber_schedule), debiased estimation and a timestep range
  (min_timestep, max_timestep, which the validation loss's strata also span): losses.py, config_loss.py.

`FlowObjective` (rectified flow: SD 3.x, FLUX.1), as diffusers' `train_dreambooth_lora_sd3.py` and
`train_dreambooth_lora_flux.py` train them: `x_t = (1 - sigma) x0 + sigma noise`, target `noise - x0`.
- sigma is drawn by `timestep_sampling`: `uniform`, `logit_normal` (sigmoid of N(logit_mean, logit_std)) and
  `mode` (mode_scale) draw u and take sigma from the scheduler's grid at index u * 1000, as diffusers' scripts
  do (the grid of SD 3's scheduler is already shifted by 3; FLUX's is not, its shift being for inference);
  `sigmoid` takes sigma = sigmoid(N(0, 1) * sigmoid_scale) directly, `shift` then shifts it by
  `discrete_flow_shift`, and `flux_shift` by the resolution-dependent shift FLUX uses at inference (kohya's);
- `loss_weighting`: none, sigma_sqrt (sigma^-2) or cosmap (diffusers' `compute_loss_weighting_for_sd3`);
- `precondition_outputs` (SD 3's script's default): the prediction becomes `x_t - sigma * pred`, compared with x0;
- `loss_type` (l1, huber, smooth_l1 with the exponential or constant huber_schedule), as sd-scripts' FLUX and
  SD 3 scripts honour it.

Noise offset adds a per-channel constant to the noise so a model can learn very dark or bright images.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr

from lora_core import losses
from lora_core.config import TrainConfig
from lora_core.errors import UserError

Predict = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (noisy latents, levels) -> prediction


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
                   timesteps: torch.Tensor, prediction_type: str, min_snr_gamma: float,
                   pixel_weights: torch.Tensor | None = None,
                   sample_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error in fp32, optionally min-SNR weighted per sample (as diffusers' scripts do);
    `pixel_weights` (N, 1, h, w), the loss mask's, multiply each latent pixel's error (masks.py), and
    `sample_weights` (N,) each sample's (regularisation images' prior_loss_weight, concepts.py)."""
    if min_snr_gamma == 0 and pixel_weights is None and sample_weights is None:
        return F.mse_loss(prediction.float(), target.float())
    errors = F.mse_loss(prediction.float(), target.float(), reduction="none")
    per_sample = (errors if pixel_weights is None else errors * pixel_weights).mean(dim=list(range(1, errors.ndim)))
    if min_snr_gamma:
        per_sample = per_sample * min_snr_weights(noise_scheduler, timesteps, prediction_type, min_snr_gamma)
    return weighted_mean(per_sample, sample_weights)


def weighted_mean(per_sample: torch.Tensor, sample_weights: torch.Tensor | None) -> torch.Tensor:
    """The batch's loss: each sample's loss times its weight (None: 1), averaged over the samples."""
    return (per_sample if sample_weights is None else per_sample * sample_weights.to(per_sample.device)).mean()


def min_snr_weights(noise_scheduler: DDPMScheduler, timesteps: torch.Tensor, prediction_type: str,
                    min_snr_gamma: float) -> torch.Tensor:
    snr = compute_snr(noise_scheduler, timesteps).clamp(min=1e-8)  # zero-terminal-SNR makes the last one 0
    weights = torch.clamp(snr, max=min_snr_gamma)
    return weights / (snr + 1) if prediction_type == "v_prediction" else weights / snr


class Objective:
    """Noise levels and the loss of one family's training. `levels` are whatever the objective draws (integer
    timesteps, or sigmas in [0, 1]); the family turns them into the denoiser's timestep argument."""

    def draw_levels(self, count: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
        raise NotImplementedError

    def levels_from_uniform(self, u: torch.Tensor) -> torch.Tensor:
        """Levels at fixed quantiles `u` in [0, 1) (the validation loss's strata), on the training grid."""
        raise NotImplementedError

    def loss(self, predict: Predict, latents: torch.Tensor, noise: torch.Tensor, levels: torch.Tensor,
             pixel_weights: torch.Tensor | None = None, sample_weights: torch.Tensor | None = None) -> torch.Tensor:
        """Noise `latents` to `levels`, predict, and return the (weighted) mean error in fp32; `pixel_weights`
        (N, 1, h, w): the loss mask's weight of each latent pixel (masks.py), `sample_weights` (N,) each sample's
        (concepts.py: prior_loss_weight); None: all 1."""
        raise NotImplementedError


class DDPMObjective(Objective):
    """`config` adds the loss options of config_loss.py (loss_type, Huber, debiasing, the timestep range; see
    losses.py); without one, the plain l2 loss over every timestep."""

    def __init__(self, scheduler: DDPMScheduler, prediction_type: str, min_snr_gamma: float,
                 config: TrainConfig | None = None):
        self.scheduler, self.prediction_type, self.min_snr_gamma = scheduler, prediction_type, min_snr_gamma
        self.num_timesteps = scheduler.config.num_train_timesteps
        self.config = config
        self.low, self.high = (config.min_timestep, config.max_timestep) if config else (0, self.num_timesteps)
        if self.high > self.num_timesteps:
            raise ObjectiveError(f"max_timestep {self.high} is beyond this model's {self.num_timesteps} training "
                                 f"timesteps; use at most {self.num_timesteps}")

    def draw_levels(self, count: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
        return torch.randint(self.low, self.high, (count,), generator=generator, device=device)

    def levels_from_uniform(self, u: torch.Tensor) -> torch.Tensor:
        return (self.low + u * (self.high - self.low)).long().clamp(self.low, self.high - 1)

    def loss(self, predict: Predict, latents: torch.Tensor, noise: torch.Tensor, levels: torch.Tensor,
             pixel_weights: torch.Tensor | None = None, sample_weights: torch.Tensor | None = None) -> torch.Tensor:
        noisy = self.scheduler.add_noise(latents, noise, levels)
        target = target_for(self.scheduler, latents, noise, levels, self.prediction_type)
        prediction = predict(noisy, levels)
        c = self.config
        if c is None or (c.loss_type == "l2" and not c.debiased_estimation_loss):
            return diffusion_loss(prediction, target, self.scheduler, levels, self.prediction_type,
                                  self.min_snr_gamma, pixel_weights, sample_weights)
        return weighted_mean(self.option_loss(prediction, target, levels, pixel_weights), sample_weights)

    def option_loss(self, prediction: torch.Tensor, target: torch.Tensor, levels: torch.Tensor,
                    pixel_weights: torch.Tensor | None = None) -> torch.Tensor:
        """Each sample's loss with config_loss.py's options, in sd-scripts' order (losses.py)."""
        c, alphas = self.config, self.scheduler.alphas_cumprod
        huber_c = losses.huber_threshold(c.huber_schedule, c.huber_c, c.huber_scale, levels, alphas,
                                         self.num_timesteps) if c.loss_type in ("huber", "smooth_l1") else None
        errors = losses.elementwise_loss(prediction, target, c.loss_type, huber_c)
        if pixel_weights is not None:  # the loss mask, applied before the mean as sd-scripts' masked loss is
            errors = errors * pixel_weights
        per_sample = errors.mean(dim=list(range(1, prediction.ndim)))
        v_prediction = self.prediction_type == "v_prediction"
        if self.min_snr_gamma:
            per_sample = per_sample * min_snr_weights(self.scheduler, levels, self.prediction_type,
                                                      self.min_snr_gamma)
        if c.debiased_estimation_loss:
            per_sample = per_sample * losses.debiased_weights(losses.snr_of(alphas, levels), v_prediction)
        return per_sample


class ObjectiveError(UserError):
    field = "max_timestep"


FLUX_SHIFT_TOKENS = (256, 4096)  # FLUX's inference shift: mu 0.5 at 256 image tokens, 1.15 at 4096
FLUX_SHIFT_MU = (0.5, 1.15)


def flux_shift_mu(image_tokens: int) -> float:
    """The resolution-dependent shift FLUX's pipeline uses at inference (diffusers' `calculate_shift`)."""
    (x1, x2), (y1, y2) = FLUX_SHIFT_TOKENS, FLUX_SHIFT_MU
    return y1 + (y2 - y1) / (x2 - x1) * (image_tokens - x1)


def shifted(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    return shift * sigmas / (1 + (shift - 1) * sigmas)


class FlowObjective(Objective):
    """Rectified flow (see the module's docstring). `grid` is the scheduler's sigmas for the 1000 training
    timesteps, highest first (a fresh FlowMatchEulerDiscreteScheduler's `sigmas`, one per training timestep)."""

    def __init__(self, config: TrainConfig, grid: torch.Tensor, precondition: bool, tokens_per_latent_pixel: float):
        self.config, self.grid, self.precondition = config, grid.float(), precondition
        self.tokens_per_latent_pixel = tokens_per_latent_pixel  # for flux_shift: image tokens of a latent pixel

    def _from_grid(self, u: torch.Tensor) -> torch.Tensor:
        indices = (u * len(self.grid)).long().clamp(0, len(self.grid) - 1)
        return self.grid.to(u.device)[indices]

    def draw_levels(self, count: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
        c, scheme = self.config, self.config.timestep_sampling
        if scheme == "uniform":
            return self._from_grid(torch.rand(count, generator=generator, device=device))
        if scheme == "logit_normal":
            normal = torch.randn(count, generator=generator, device=device)
            return self._from_grid(torch.sigmoid(normal * c.logit_std + c.logit_mean))
        if scheme == "mode":
            u = torch.rand(count, generator=generator, device=device)
            return self._from_grid(1 - u - c.mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u))
        sigmas = torch.sigmoid(torch.randn(count, generator=generator, device=device) * c.sigmoid_scale)
        if scheme == "shift":
            return shifted(sigmas, c.discrete_flow_shift)
        if scheme == "flux_shift":
            return shifted(sigmas, math.exp(self._mu))
        return sigmas  # sigmoid

    @property
    def _mu(self) -> float:
        latent_side = self.config.resolution / 8  # the token count at the run's resolution, as kohya's flux_shift
        return flux_shift_mu(int(latent_side * latent_side * self.tokens_per_latent_pixel))

    def levels_from_uniform(self, u: torch.Tensor) -> torch.Tensor:
        return self._from_grid(u)

    def loss(self, predict: Predict, latents: torch.Tensor, noise: torch.Tensor, levels: torch.Tensor,
             pixel_weights: torch.Tensor | None = None, sample_weights: torch.Tensor | None = None) -> torch.Tensor:
        sigmas = levels.to(latents.dtype).view(-1, *[1] * (latents.ndim - 1))
        noisy = (1 - sigmas) * latents + sigmas * noise
        prediction = predict(noisy, levels).float()
        if self.precondition:
            prediction, target = noisy.float() - sigmas.float() * prediction, latents.float()
        else:
            target = (noise - latents).float()
        weights = self.weighting(levels.float()).view(-1, *[1] * (latents.ndim - 1))
        if pixel_weights is not None:
            weights = weights * pixel_weights
        per_sample = (weights * self.error(prediction, target, levels)).reshape(len(latents), -1).mean(dim=1)
        return weighted_mean(per_sample, sample_weights)

    def error(self, prediction: torch.Tensor, target: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
        """Squared, or `loss_type`'s error as sd-scripts' FLUX / SD 3 scripts take it: the Huber threshold of the
        exponential or constant schedule at timestep sigma x 1000 (their `snr` needs a DDPM schedule)."""
        c = self.config
        if c.loss_type == "l2":
            return (prediction - target) ** 2
        huber_c = losses.huber_threshold(c.huber_schedule, c.huber_c, c.huber_scale, levels.float() * 1000,
                                         None, 1000) if c.loss_type in ("huber", "smooth_l1") else None
        return losses.elementwise_loss(prediction, target, c.loss_type, huber_c)

    def weighting(self, sigmas: torch.Tensor) -> torch.Tensor:
        if self.config.loss_weighting == "sigma_sqrt":
            return sigmas ** -2.0  # as diffusers computes it
        if self.config.loss_weighting == "cosmap":
            return 2 / (math.pi * (1 - 2 * sigmas + 2 * sigmas ** 2))
        return torch.ones_like(sigmas)
