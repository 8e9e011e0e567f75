"""The loss, noise and timestep options (config_loss.py, losses.py) against their reference formulas, written
here afresh from sd-scripts' definitions (library/train_util.py, library/custom_train_functions.py), and the
flow-matching families refusing them. Tensors only: no model is trained here (test_optimizers.py trains)."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDPMScheduler
from pydantic import ValidationError

from lora_core import families, losses
from lora_core.config import TrainConfig
from lora_core.lora import network_args, sd_scripts_fields
from lora_core.objective import DDPMObjective

BASE = dict(dataset_path="d", base_model="builtin:tiny-sd", output_path="o", trigger_words=["x"])


def config(**options) -> TrainConfig:
    return TrainConfig(**BASE, **options)


@pytest.fixture(scope="module")
def scheduler() -> DDPMScheduler:
    # SD 1.5's schedule: scaled_linear betas 0.00085 .. 0.012 over 1000 steps
    return DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


TIMESTEPS = torch.tensor([0, 1, 250, 500, 998, 999])


def reference_threshold(schedule: str, c: float, scale: float, t: int, alpha_bar: float) -> float:
    if schedule == "exponential":
        return math.exp(-(-math.log(c) / 1000) * t) * scale
    if schedule == "snr":
        sigma = math.sqrt((1 - alpha_bar) / alpha_bar)
        return (1 - c) / (1 + sigma) ** 2 + c
    return c * scale


@pytest.mark.parametrize("schedule", ["snr", "exponential", "constant"])
def test_huber_thresholds_follow_sd_scripts_schedules(scheduler, schedule):
    got = losses.huber_threshold(schedule, 0.1, 2.0, TIMESTEPS, scheduler.alphas_cumprod, 1000)
    expected = [reference_threshold(schedule, 0.1, 2.0, int(t), float(scheduler.alphas_cumprod[t]))
                for t in TIMESTEPS]
    assert got.tolist() == pytest.approx(expected, rel=1e-5)
    if schedule == "snr":  # nearly l2 at low noise, c at pure noise
        assert got[0] > 0.9 and got[-1] == pytest.approx(0.1, abs=0.01)


def reference_elementwise(d: float, loss_type: str, c: float) -> float:
    if loss_type == "l2":
        return d * d
    if loss_type == "l1":
        return abs(d)
    pseudo = math.sqrt(d * d + c * c) - c
    return 2 * c * pseudo if loss_type == "huber" else 2 * pseudo


@pytest.mark.parametrize("loss_type", ["l2", "l1", "huber", "smooth_l1"])
def test_elementwise_losses_equal_their_formulas(loss_type):
    generator = torch.Generator().manual_seed(0)
    prediction, target = torch.randn(2, 4, 3, 3, generator=generator), torch.randn(2, 4, 3, 3, generator=generator)
    c = torch.tensor([0.1, 0.7])
    got = losses.elementwise_loss(prediction, target, loss_type, c)
    for row in range(2):
        diffs = (prediction[row] - target[row]).flatten().tolist()
        expected = [reference_elementwise(d, loss_type, float(c[row])) for d in diffs]
        assert got[row].flatten().tolist() == pytest.approx(expected, rel=1e-5, abs=1e-7)


def test_huber_is_squared_near_zero_and_linear_far_out():
    c = torch.tensor([0.1])
    small, large = torch.full((1, 1, 1, 1), 1e-2), torch.full((1, 1, 1, 1), 100.0)
    zero = torch.zeros(1, 1, 1, 1)
    assert losses.elementwise_loss(small, zero, "huber", c).item() == pytest.approx(1e-4, rel=1e-2)  # d^2
    assert losses.elementwise_loss(large, zero, "huber", c).item() == pytest.approx(2 * 0.1 * (100 - 0.1),
                                                                                   rel=1e-3)  # 2c|d|


def objective_loss(scheduler, prediction_type: str, gamma: float, **options) -> tuple[torch.Tensor, tuple]:
    generator = torch.Generator().manual_seed(1)
    latents, noise = torch.randn(3, 4, 4, 4, generator=generator), torch.randn(3, 4, 4, 4, generator=generator)
    prediction = torch.randn(3, 4, 4, 4, generator=generator)
    levels = torch.tensor([5, 400, 990])
    objective = DDPMObjective(scheduler, prediction_type, gamma, config(**options))
    loss = objective.loss(lambda noisy, t: prediction, latents, noise, levels)
    return loss, (latents, noise, prediction, levels)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_huber_with_min_snr_and_debiasing_is_sd_scripts_loss(scheduler, prediction_type):
    loss, (latents, noise, prediction, levels) = objective_loss(
        scheduler, prediction_type, 5.0, loss_type="huber", huber_schedule="snr", huber_c=0.2,
        debiased_estimation_loss=True)
    total = 0.0
    for row, t in enumerate(levels.tolist()):
        alpha_bar = float(scheduler.alphas_cumprod[t])
        if prediction_type == "v_prediction":
            target = math.sqrt(alpha_bar) * noise[row] - math.sqrt(1 - alpha_bar) * latents[row]
        else:
            target = noise[row]
        c = reference_threshold("snr", 0.2, 1.0, t, alpha_bar)
        diffs = (prediction[row] - target).flatten().tolist()
        per_sample = sum(reference_elementwise(d, "huber", c) for d in diffs) / len(diffs)
        snr = alpha_bar / (1 - alpha_bar)
        min_snr = min(snr, 5.0) / (snr + 1 if prediction_type == "v_prediction" else snr)
        capped = min(snr, 1000.0)
        debiased = 1 / (capped + 1) if prediction_type == "v_prediction" else 1 / math.sqrt(capped)
        total += per_sample * min_snr * debiased
    assert loss.item() == pytest.approx(total / len(levels), rel=1e-4)


def test_the_plain_loss_is_unchanged_by_the_options_at_their_defaults(scheduler):
    plain, (_, noise, prediction, _) = objective_loss(scheduler, "epsilon", 0.0)
    assert plain.item() == pytest.approx(((prediction - noise) ** 2).mean().item(), rel=1e-6)
    l1, _ = objective_loss(scheduler, "epsilon", 0.0, loss_type="l1")
    assert l1.item() == pytest.approx((prediction - noise).abs().mean().item(), rel=1e-6)


def test_the_timestep_range_bounds_training_and_validation_levels(scheduler):
    objective = DDPMObjective(scheduler, "epsilon", 5.0, config(min_timestep=200, max_timestep=300))
    drawn = objective.draw_levels(4000, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert drawn.min().item() == 200 and drawn.max().item() == 299  # max is exclusive, as sd-scripts' randint
    strata = objective.levels_from_uniform(torch.tensor([0.0, 0.125, 0.999]))
    assert strata.tolist() == [200, 212, 299]
    with pytest.raises(ValidationError, match="min_timestep 300 must be below max_timestep 300"):
        config(min_timestep=300, max_timestep=300)


def reference_pyramid(noise: torch.Tensor, generator: torch.Generator, iterations: int, discount: float):
    """sd-scripts' pyramid_noise_like with its random ratio drawn from `generator` (rand, then randn)."""
    b, c, h, w = noise.shape
    out = noise.clone()
    for i in range(iterations):
        r = torch.rand((), generator=generator).item() * 2 + 2
        hn, wn = max(1, int(h / r ** i)), max(1, int(w / r ** i))
        coarse = torch.randn(b, c, hn, wn, generator=generator)
        out = out + torch.nn.Upsample(size=(h, w), mode="bilinear")(coarse) * discount ** i
        if hn == 1 or wn == 1:
            break
    return out / out.std()


def test_multires_noise_is_sd_scripts_pyramid_with_unit_spread():
    noise = torch.randn(2, 4, 32, 24, generator=torch.Generator().manual_seed(3))
    got = losses.pyramid_noise(noise, torch.Generator().manual_seed(9), 6, 0.3)
    expected = reference_pyramid(noise, torch.Generator().manual_seed(9), 6, 0.3)
    assert torch.allclose(got, expected, atol=1e-6)
    assert got.std().item() == pytest.approx(1.0, rel=1e-5)
    # the coarse levels make neighbouring pixels agree, where white noise's do not
    def neighbour_correlation(x):
        return torch.corrcoef(torch.stack([x[..., :-1].flatten(), x[..., 1:].flatten()]))[0, 1].item()
    strong = losses.pyramid_noise(noise, torch.Generator().manual_seed(9), 6, 0.8)
    assert abs(neighbour_correlation(noise)) < 0.05 < 0.2 < neighbour_correlation(strong)


def test_the_side_stream_is_repeatable_and_leaves_the_main_stream_alone():
    from lora_core.distributed import SampleNoise

    latents, cpu = torch.zeros(2, 4, 8, 8), torch.device("cpu")
    plain, sided = SampleNoise(seed=5, batch_size=2), SampleNoise(seed=5, batch_size=2)
    assert torch.equal(plain(latents)[0], sided(latents)[0])
    first = torch.randn(3, generator=sided.side_generator(cpu))
    assert torch.equal(first, torch.randn(3, generator=sided.side_generator(cpu)))  # a resumed run repeats it
    assert torch.equal(plain(latents)[0], sided(latents)[0])  # the main stream did not move
    assert not torch.equal(first, torch.randn(3, generator=sided.side_generator(cpu)))  # a new draw, new values


def test_huber_options_without_a_huber_loss_are_refused_at_their_field():
    with pytest.raises(ValidationError, match="huber_c shape"):
        config(huber_c=0.3)
    assert config(loss_type="smooth_l1", huber_c=0.3, huber_schedule="constant").huber_c == 0.3


@pytest.mark.parametrize("family", ["flux", "sd3"])
@pytest.mark.parametrize("option,value", [("debiased_estimation_loss", True),
                                          ("min_timestep", 100), ("max_timestep", 900),
                                          ("multires_noise_iterations", 6)])
def test_flow_families_refuse_the_ddpm_options_at_their_field(family, option, value):
    problems = dict(families.get(family).check_config(config(min_snr_gamma=0, **{option: value})))
    assert option in problems and "rectified flow" in problems[option]
    assert not families.get("sdxl").check_config(config(**{option: value}))


def test_the_options_reach_sd_scripts_metadata_fields():
    chosen = config(loss_type="huber", huber_schedule="exponential", huber_c=0.2, debiased_estimation_loss=True,
                    multires_noise_iterations=8, multires_noise_discount=0.1, loraplus_lr_ratio=16)
    fields = sd_scripts_fields(chosen, 4, False, 1, None)
    assert fields["ss_loss_type"] == "huber" and fields["ss_huber_schedule"] == "exponential"
    assert fields["ss_huber_c"] == "0.2" and fields["ss_debiased_estimation"] == "True"
    assert fields["ss_multires_noise_iterations"] == "8" and fields["ss_multires_noise_discount"] == "0.1"
    assert sd_scripts_fields(config(), 4, False, 1, None)["ss_multires_noise_iterations"] == "None"
    assert network_args(chosen)["loraplus_lr_ratio"] == "16.0"


def test_zero_terminal_snr_keeps_every_option_finite_at_pure_noise():
    from lora_core.objective import noise_scheduler_for

    base = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
    options = dict(loss_type="smooth_l1", debiased_estimation_loss=True, zero_terminal_snr=True)
    for prediction_type in ("epsilon", "v_prediction"):
        rescaled = noise_scheduler_for(base, config(**options))
        assert rescaled.alphas_cumprod[-1] < 1e-6  # the last timestep is pure noise: SNR 0
        objective = DDPMObjective(rescaled, prediction_type, 5.0, config(**options))
        latents = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
        loss = objective.loss(lambda noisy, t: torch.zeros_like(noisy), latents, torch.randn_like(latents),
                              torch.tensor([999, 0]))
        assert torch.isfinite(loss)


def test_flow_families_take_the_loss_types_with_a_schedule_they_can_read():
    flux = families.get("flux")
    problems = dict(flux.check_config(config(min_snr_gamma=0, loss_type="huber")))
    assert "exponential" in problems["huber_schedule"]  # the default snr schedule needs a DDPM schedule
    assert not flux.check_config(config(min_snr_gamma=0, loss_type="huber", huber_schedule="exponential"))
    assert not flux.check_config(config(min_snr_gamma=0, loss_type="l1"))


def test_the_flow_objectives_huber_is_sd_scripts_at_sigma_times_1000():
    from lora_core.objective import FlowObjective

    chosen = config(min_snr_gamma=0, loss_type="huber", huber_schedule="exponential", huber_c=0.2,
                    loss_weighting="cosmap")
    objective = FlowObjective(chosen, torch.linspace(1, 0.001, 1000), False, 0.25)
    generator = torch.Generator().manual_seed(2)
    latents, noise = torch.randn(2, 4, 3, 3, generator=generator), torch.randn(2, 4, 3, 3, generator=generator)
    prediction = torch.randn(2, 4, 3, 3, generator=generator)
    sigmas = torch.tensor([0.25, 0.9])
    loss = objective.loss(lambda noisy, s: prediction, latents, noise, sigmas)
    total = 0.0
    for row, sigma in enumerate(sigmas.tolist()):
        c = reference_threshold("exponential", 0.2, 1.0, sigma * 1000, 0.0)
        weight = 2 / (math.pi * (1 - 2 * sigma + 2 * sigma ** 2))
        diffs = (prediction[row] - (noise[row] - latents[row])).flatten().tolist()
        total += weight * sum(reference_elementwise(d, "huber", c) for d in diffs) / len(diffs)
    assert loss.item() == pytest.approx(total / 2, rel=1e-5)
