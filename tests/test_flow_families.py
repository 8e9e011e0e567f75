"""The flow-matching families (FLUX.1, SD 3.x) on their tiny built-ins: training end to end, the file reproduces
the trained transformer exactly, resume is bit-identical, the training math equals a plain loop written after
diffusers' `train_dreambooth_lora_flux.py` / `train_dreambooth_lora_sd3.py`, and their options and folders are
checked where they apply."""

import json

import pytest
import torch
from helpers import run_job_here, tiny_config
from safetensors.torch import load_file

from lora_core import builtin, families, lorafile, models, plan
from lora_core.config import ConfigError
from lora_core.configfile import parse_config
from lora_core.training import train

FAMILIES = {"flux": "builtin:tiny-flux", "sd3": "builtin:tiny-sd3"}


def flow_config(dataset, output, family: str, **overrides) -> dict:
    config = tiny_config(dataset, output, **{"resolution": 64, "bucketing": False, "lora_alpha": 3, **overrides})
    config["base_model"] = FAMILIES[family]
    return config


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def trained(request, tmp_path_factory):
    """One short run of each family (held-out images, samples, a checkpoint), shared by the tests below."""
    from helpers import SHAPES_DATASET

    output = tmp_path_factory.mktemp(request.param) / "out"
    events = []
    config = parse_config(flow_config(SHAPES_DATASET, output, request.param, steps=4, validation_images=2))
    result = train(config, events.append, lambda: False)
    return request.param, config, result, events


def transformer_output(transformer, family: str, seed: int = 3) -> torch.Tensor:
    """The transformer's prediction for fixed inputs, called as the trainer calls it (Family.predict)."""
    kind = families.get(family)
    generator = torch.Generator().manual_seed(seed)
    config = transformer.config
    text_width = config.joint_attention_dim
    latents = torch.randn(2, config.in_channels // (4 if family == "flux" else 1), 8, 8, generator=generator)
    inputs = {"encoder_hidden_states": torch.randn(2, 7, text_width, generator=generator),
              "pooled_projections": torch.randn(2, config.pooled_projection_dim, generator=generator)}
    if family == "flux":
        inputs["guidance"] = 1.0
    with torch.no_grad():
        return kind.predict(transformer, latents, torch.tensor([0.3, 0.8]), inputs)


@pytest.mark.e2e
def test_a_flow_family_trains_end_to_end_with_every_event(trained):
    family, config, result, events = trained
    kinds = [event.type for event in events]
    assert kinds.count("complete") == 1 and kinds[-1] == "complete"
    assert events[0].model_family.startswith(("FLUX.1-dev", "SD 3.5 Medium"))
    assert [e.step for e in events if e.type == "validation"] == [0, 3, 4]
    assert all(torch.isfinite(torch.tensor(e.loss)) for e in events if e.type in ("progress", "validation"))
    assert any(e.type == "sample" for e in events) and (config.output_path and result.final_path.exists())
    header = json.loads(result.final_path.read_bytes()[8:8 + int.from_bytes(result.final_path.read_bytes()[:8],
                                                                             "little")])["__metadata__"]
    expected = {"flux": "flux-1-dev/lora", "sd3": "stable-diffusion-3-5-medium/lora"}[family]
    assert header["modelspec.architecture"] == expected and header["ss_network_alpha"] == "3.0"


@pytest.mark.e2e
def test_the_file_in_the_original_layout_reproduces_the_trained_transformer_exactly(trained):
    family, config, result, _ = trained
    tensors = load_file(str(result.final_path))
    assert tensors and all(key.startswith("lora_unet_") for key in tensors)
    assert all(f"{key.partition('.')[0]}.alpha" in tensors for key in tensors)  # every module carries its alpha
    if family == "flux":  # q, k and v fused into one projection, as ComfyUI / Forge / sd-scripts name it
        assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in tensors
        assert "lora_unet_single_blocks_0_linear1.lora_up.weight" in tensors
    else:
        assert "lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight" in tensors
        assert "lora_unet_joint_blocks_0_x_block_attn2_qkv.lora_down.weight" in tensors  # SD 3.5M's attn2
    source = models.resolve(config.base_model)
    pipeline = models.load_pipeline(source, models.inspect(source))
    before = transformer_output(pipeline.transformer, family)
    lorafile.apply_lora(pipeline, result.final_path)
    expected = transformer_output(result.unet.eval(), family)
    assert not torch.allclose(before, expected, atol=1e-4)  # the LoRA changed something
    torch.testing.assert_close(transformer_output(pipeline.transformer, family), expected, rtol=0, atol=1e-5)


@pytest.mark.e2e
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_stopped_and_resumed_flow_run_is_bit_identical_to_one_run_straight(dataset_dir, tmp_path, family):
    options = dict(steps=4, checkpoint_steps=100, validation_steps=100, lora_target="attention_mlp")
    straight, _ = run_job_here(parse_config(flow_config(dataset_dir, tmp_path / "straight", family, **options)))
    resumed_config = parse_config(flow_config(dataset_dir, tmp_path / "resumed", family, **options))
    stopped, _ = run_job_here(resumed_config, stop_after_step=2)
    assert stopped.type == "interrupted" and stopped.step == 2
    final, _ = run_job_here(resumed_config, resume=True)
    assert straight.type == final.type == "complete"
    a, b = load_file(straight.final_path), load_file(final.final_path)
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


def test_each_built_in_is_read_as_its_family_with_its_pixel_step(tmp_path):
    flux = models.inspect(models.resolve("builtin:tiny-flux"))
    assert (flux.family, flux.variant, flux.prediction_type) == ("flux", "dev", "flow")
    assert flux.pixel_multiple == 2 * builtin.BUILTINS["tiny-flux"].vae_scale_factor
    assert models.inspect(models.resolve("builtin:tiny-flux-schnell")).variant == "schnell"
    sd3 = models.inspect(models.resolve("builtin:tiny-sd3"))
    assert (sd3.family, sd3.variant, sd3.description) == ("sd3", "sd35-medium", "SD 3.5 Medium")
    folder = builtin.builtin_folder("tiny-flux")  # a diffusers folder is read from its configs alike
    assert models.inspect(models.ModelSource("folder", str(folder), str(folder))) == flux


def test_a_folder_of_a_family_the_studio_cannot_train_is_named_with_what_it_can(tmp_path):
    folder = tmp_path / "qwen"
    (folder / "transformer").mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "QwenImagePipeline",
                                                         "transformer": ["diffusers", "QwenImageTransformer2DModel"]}))
    (folder / "transformer" / "config.json").write_text(json.dumps({"_class_name": "QwenImageTransformer2DModel"}))
    with pytest.raises(models.ModelError) as error:
        models.inspect(models.resolve(str(folder)))
    message = str(error.value)
    assert "QwenImagePipeline" in message and "QwenImageTransformer2DModel" in message
    assert "FLUX.1" in message and "SD 3.x" in message and "SDXL" in message
    assert "download" not in message  # not the old "download the whole model again"


@pytest.mark.parametrize("family, overrides, field", [
    ("flux", {"min_snr_gamma": 3.0}, "min_snr_gamma"),
    ("flux", {"lora_target": "locon"}, "lora_target"),
    ("flux", {"use_t5_encoder": False}, "use_t5_encoder"),
    ("sd3", {"flux_guidance": 3.5}, "flux_guidance"),
    ("sd3", {"noise_offset": 0.05}, "noise_offset"),
    ("flux", {"use_dora": True}, "use_dora"),
])
def test_an_option_the_family_cannot_honour_is_refused_at_its_field(dataset_dir, tmp_path, family, overrides,
                                                                     field):
    config = parse_config(flow_config(dataset_dir, tmp_path / "out", family, **overrides))
    with pytest.raises(ConfigError) as error:
        plan.make_plan(config)
    assert error.value.field == field
    report = plan.plan_report(config)
    assert not report["ok"] and report["problems"][0]["field"] == field


def test_the_unet_families_defaults_do_not_trouble_a_flow_run(dataset_dir, tmp_path):
    """min_snr_gamma's default (5) is the UNet families'; left alone it is not an error for FLUX."""
    report = plan.plan_report(parse_config(flow_config(dataset_dir, tmp_path / "out", "flux")))
    assert report["ok"], report["problems"]
    assert report["model"]["family"] == "FLUX.1-dev" and report["memory_estimate"]["total_gib"] > 0


@pytest.mark.e2e
def test_sd3s_diffusers_companion_file_loads_whole_in_diffusers_at_the_trained_strength(trained):
    """diffusers' SD 3 loader reads no kohya names (and Forge no diffusers ones): an SD 3 run also writes
    lora_final.diffusers.safetensors, which `load_lora_weights` reads whole and which gives the trained output."""
    family, config, result, _ = trained
    companion = result.final_path.with_name("lora_final.diffusers.safetensors")
    if family != "sd3":
        assert not companion.exists()
        return
    from diffusers import StableDiffusion3Pipeline

    keys = load_file(str(companion)).keys()
    assert keys and all(key.startswith("transformer.") for key in keys)
    pipeline = StableDiffusion3Pipeline.from_pretrained(builtin.builtin_folder("tiny-sd3"))
    pipeline.load_lora_weights(str(companion))
    pipeline.fuse_lora()
    pipeline.unload_lora_weights()
    torch.testing.assert_close(transformer_output(pipeline.transformer, family),
                               transformer_output(result.unet.eval(), family), rtol=0, atol=1e-5)


@pytest.mark.e2e
def test_a_sweep_draws_a_flow_run_from_its_file_and_puts_the_base_back(trained):
    """Grids and sweeps add the file's changes to the weights themselves (diffusers reads these names only for
    FLUX.1's own sizes, and never SD 3's): scale 0 is the base model, and unloading restores it exactly."""
    import numpy as np

    from lora_core.drawing import Renderer
    from lora_core.grid import render_sweep

    family, config, result, _ = trained
    renderer = Renderer(config.model_copy(update={"sample_inference_steps": 2}))
    base = np.asarray(renderer.draw("shapestyle", 5))
    renderer.load(result.final_path)
    renderer.set_scale(0)
    assert np.array_equal(np.asarray(renderer.draw("shapestyle", 5)), base)
    renderer.set_scale(1)
    assert not np.array_equal(np.asarray(renderer.draw("shapestyle", 5)), base)
    renderer.unload()
    assert np.array_equal(np.asarray(renderer.draw("shapestyle", 5)), base)
    assert "flow-matching Euler" in renderer.sampling
    sweep = render_sweep(result.final_path.parent, {"scales": [0, 1]}, renderer=renderer)
    assert sweep.path.exists() and sweep.path.parent == result.final_path.parent
