"""The flow-matching families' training math equals a plain loop written after diffusers' own scripts
(`examples/dreambooth/train_dreambooth_lora_flux.py` and `train_dreambooth_lora_sd3.py`): the same noise levels
from the same random state, the same noisy input, the same call of the transformer (FLUX's packing, ids and
guidance; SD 3's raw timestep), the same target, preconditioning and weighting, hence the same loss and the same
gradients. The loop below is the scripts' code reduced to one step, not the engine's."""

import copy

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

from lora_core import families, models
from lora_core.config import TrainConfig

SEED, BATCH = 11, 3


def built(name: str):
    source = models.resolve(f"builtin:{name}")
    return models.load_pipeline(source, models.inspect(source))


def config(**options) -> TrainConfig:
    return TrainConfig(dataset_path="d", base_model="b", output_path="o", trigger_words=["x"], **options)


def step_inputs(pipeline, family: str):
    """Latents, noise and text conditioning as the scripts have them after encoding (random here)."""
    generator = torch.Generator().manual_seed(SEED)
    transformer = pipeline.transformer.config
    channels = transformer.in_channels // 4 if family == "flux" else transformer.in_channels
    latents = torch.randn(BATCH, channels, 8, 8, generator=generator)
    noise = torch.randn(BATCH, channels, 8, 8, generator=generator)
    text = torch.randn(BATCH, 9, transformer.joint_attention_dim, generator=generator)
    pooled = torch.randn(BATCH, transformer.pooled_projection_dim, generator=generator)
    return latents, noise, text, pooled


def script_sigmas(scheduler, scheme: str, n_dim: int = 4):
    """The scripts' draw: u from compute_density_for_timestep_sampling on the global RNG, an index into the
    scheduler's timesteps, and get_sigmas' lookup of sigma by timestep."""
    torch.manual_seed(SEED)
    u = compute_density_for_timestep_sampling(weighting_scheme=scheme, batch_size=BATCH, logit_mean=0.0,
                                              logit_std=1.0, mode_scale=1.29)
    indices = (u * scheduler.config.num_train_timesteps).long()
    timesteps = scheduler.timesteps[indices]
    step_indices = [(scheduler.timesteps == t).nonzero().item() for t in timesteps]
    sigmas = scheduler.sigmas[step_indices].flatten()
    return timesteps, sigmas.view(-1, *[1] * (n_dim - 1))


def script_flux_loss(pipeline, latents, noise, text, pooled, scheme: str, guidance: float) -> torch.Tensor:
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipeline.scheduler.config)
    timesteps, sigmas = script_sigmas(scheduler, scheme)
    noisy = (1.0 - sigmas) * latents + sigmas * noise
    b, c, h, w = noisy.shape
    packed = FluxPipeline._pack_latents(noisy, b, c, h, w)
    image_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, noisy.device, noisy.dtype)
    text_ids = torch.zeros(text.shape[1], 3)
    guidance_tensor = torch.tensor([guidance]).expand(b) if pipeline.transformer.config.guidance_embeds else None
    prediction = pipeline.transformer(hidden_states=packed, timestep=timesteps / 1000, guidance=guidance_tensor,
                                      pooled_projections=pooled, encoder_hidden_states=text, txt_ids=text_ids,
                                      img_ids=image_ids, return_dict=False)[0]
    scale = pipeline.vae_scale_factor
    prediction = FluxPipeline._unpack_latents(prediction, height=h * scale, width=w * scale, vae_scale_factor=scale)
    weighting = compute_loss_weighting_for_sd3(weighting_scheme=scheme, sigmas=sigmas)
    target = noise - latents
    return torch.mean((weighting.float() * (prediction.float() - target.float()) ** 2).reshape(b, -1), 1).mean()


def script_sd3_loss(pipeline, latents, noise, text, pooled, scheme: str, precondition: bool) -> torch.Tensor:
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipeline.scheduler.config)
    timesteps, sigmas = script_sigmas(scheduler, scheme)
    noisy = (1.0 - sigmas) * latents + sigmas * noise
    prediction = pipeline.transformer(hidden_states=noisy, timestep=timesteps, encoder_hidden_states=text,
                                      pooled_projections=pooled, return_dict=False)[0]
    if precondition:
        prediction = prediction * (-sigmas) + noisy
    weighting = compute_loss_weighting_for_sd3(weighting_scheme=scheme, sigmas=sigmas)
    target = latents if precondition else noise - latents
    b = latents.shape[0]
    return torch.mean((weighting.float() * (prediction.float() - target.float()) ** 2).reshape(b, -1), 1).mean()


def engine_loss(pipeline, family: str, options: dict, latents, noise, text, pooled) -> torch.Tensor:
    """The engine's step on the same inputs: the family's objective draws from a generator seeded alike."""
    kind = families.get(family)
    run_config = config(**options)
    info = models.inspect(models.resolve(f"builtin:tiny-{family}"))
    objective = kind.objective(run_config, pipeline.scheduler.config, info)
    levels = objective.draw_levels(BATCH, torch.Generator().manual_seed(SEED), torch.device("cpu"))
    inputs = {"encoder_hidden_states": text, "pooled_projections": pooled, **kind.run_settings(run_config, info)}
    return objective.loss(lambda noisy, lv: kind.predict(pipeline.transformer, noisy, lv, inputs),
                          latents, noise, levels)


def gradients(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("scheme, loss_weighting", [("logit_normal", "none"), ("mode", "none"),
                                                    ("uniform", "none"), ("sigma_sqrt", "sigma_sqrt"),
                                                    ("cosmap", "cosmap")])
@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_one_step_equals_the_diffusers_scripts_loss_and_gradients(family, scheme, loss_weighting):
    """Both take the scheduler's grid; the script's `weighting_scheme` picks the density and the weighting at
    once (sigma_sqrt and cosmap draw uniformly there), the engine has one option for each."""
    pipeline = built(f"tiny-{family}")
    theirs_pipeline = copy.deepcopy(pipeline)
    inputs = step_inputs(pipeline, family)
    sampling = scheme if scheme in ("logit_normal", "mode", "uniform") else "uniform"
    options = {"timestep_sampling": sampling, "loss_weighting": loss_weighting}
    if family == "flux":
        theirs = script_flux_loss(theirs_pipeline, *inputs, scheme=scheme, guidance=1.0)
    else:
        theirs = script_sd3_loss(theirs_pipeline, *inputs, scheme=scheme, precondition=True)
    ours = engine_loss(pipeline, family, options, *inputs)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    ours.backward()
    theirs.backward()
    mine, reference = gradients(pipeline.transformer), gradients(theirs_pipeline.transformer)
    assert mine.keys() == reference.keys() and mine
    for name in mine:
        torch.testing.assert_close(mine[name], reference[name], rtol=1e-4, atol=1e-6)


def test_sd3_without_preconditioning_and_flux_with_another_guidance_still_match():
    sd3 = built("tiny-sd3")
    inputs = step_inputs(sd3, "sd3")
    theirs = script_sd3_loss(copy.deepcopy(sd3), *inputs, scheme="logit_normal", precondition=False)
    ours = engine_loss(sd3, "sd3", {"precondition_outputs": "off"}, *inputs)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    flux = built("tiny-flux")
    inputs = step_inputs(flux, "flux")
    theirs = script_flux_loss(copy.deepcopy(flux), *inputs, scheme="logit_normal", guidance=3.5)
    torch.testing.assert_close(engine_loss(flux, "flux", {"flux_guidance": 3.5}, *inputs), theirs, rtol=1e-5,
                               atol=1e-6)
    assert not torch.allclose(engine_loss(flux, "flux", {"flux_guidance": 1.0}, *inputs), theirs)


def test_kohyas_sigmoid_and_shift_draws_follow_their_formulas():
    grid = torch.linspace(1, 0.001, 1000)
    from lora_core.objective import FlowObjective, flux_shift_mu, shifted

    def draw(**options):
        objective = FlowObjective(config(**options), grid, precondition=False, tokens_per_latent_pixel=0.25)
        return objective.draw_levels(4096, torch.Generator().manual_seed(SEED), torch.device("cpu"))

    normal = torch.randn(4096, generator=torch.Generator().manual_seed(SEED))
    torch.testing.assert_close(draw(timestep_sampling="sigmoid", sigmoid_scale=1.5), torch.sigmoid(normal * 1.5))
    torch.testing.assert_close(draw(timestep_sampling="shift", discrete_flow_shift=3.0),
                               shifted(torch.sigmoid(normal), 3.0))
    mu = flux_shift_mu(64 * 64 // 4)  # 512 px: a 64x64 latent, 1024 tokens
    torch.testing.assert_close(draw(timestep_sampling="flux_shift", resolution=512),
                               shifted(torch.sigmoid(normal), torch.exp(torch.tensor(mu)).item()))
    assert flux_shift_mu(256) == pytest.approx(0.5) and flux_shift_mu(4096) == pytest.approx(1.15)
    assert draw(timestep_sampling="shift").mean() > draw(timestep_sampling="sigmoid").mean()  # more noise
