"""LoRA variants (targets, DoRA), optimizers and loss options: each exported exactly, each trains and resumes."""

import json
import shutil
import sys

import pytest
import torch
from diffusers import StableDiffusionPipeline
from helpers import run_job_here, tiny_config
from safetensors import safe_open
from safetensors.torch import load_file
from test_text_encoder_lora import OPTIONS, encode, load, run, unet_inputs

from lora_core import builtin, models, objective
from lora_core.configfile import parse_config
from lora_core.lora import add_lora, kohya_state_dict, save_lora
from lora_core.lorafile import diffusers_state_dict
from lora_core.training import train

BASE = dict(dataset_path="d", output_path="o", base_model="builtin:tiny-sd", trigger_words=["t"])


def unet_output(unet) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    latents, text = torch.randn(1, 4, 32, 32, generator=generator), torch.randn(1, 77, 32, generator=generator)
    with torch.no_grad():
        return unet(latents, torch.tensor([300]), encoder_hidden_states=text).sample


def tiny_pipeline():
    return StableDiffusionPipeline.from_pretrained(builtin.builtin_folder("tiny-sd"), safety_checker=None)


@pytest.mark.e2e
@pytest.mark.parametrize("target", ["attention_mlp", "locon"])
def test_variants_export_exactly(tmp_path, target):
    config = parse_config({**BASE, "lora_rank": 4, "lora_alpha": 6, "lora_target": target})
    trained = tiny_pipeline().unet
    torch.manual_seed(2)
    add_lora(trained, config)
    with torch.no_grad():
        for name, param in trained.named_parameters():
            if "lora_B" in name:
                param.add_(torch.randn_like(param) * 0.05)
    expected = unet_output(trained)
    path = save_lora(tmp_path / "lora.safetensors", kohya_state_dict(trained, config), {})
    with safe_open(str(path), "pt") as handle:
        keys = list(handle.keys())
    assert any("resnets_0_conv1" in key for key in keys) == (target == "locon")
    assert any("ff_net_2" in key for key in keys)
    pipeline = tiny_pipeline()
    pipeline.load_lora_weights(str(path))
    torch.testing.assert_close(unet_output(pipeline.unet), expected, rtol=0, atol=2e-5)


@pytest.mark.e2e
@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_dora_loaded_by_diffusers_reproduces_the_trained_model(dataset_dir, tmp_path, family):
    """DoRA on the UNet (LoCon targets: linear and conv layers) and the text encoder(s), trained, written in
    the kohya layout (`dora_scale`), and loaded back by `load_lora_weights` through
    `lorafile.diffusers_state_dict` (diffusers' own SD loaders drop `dora_scale`), alpha != rank."""
    config = tiny_config(dataset_dir, tmp_path / "out", steps=2, use_dora=True, lora_target="locon",
                         **dict(OPTIONS, lora_dropout=0.0))
    config["base_model"] = "builtin:tiny-sdxl" if family == "sdxl" else "builtin:tiny-sd"
    result, events = run(config)
    assert events[-1].type == "complete"

    with safe_open(str(result.final_path), "pt") as handle:
        header = handle.metadata()
    assert header["ss_network_module"] == "lycoris.kohya" and header["ss_network_dim"] == "4"
    assert json.loads(header["ss_network_args"])["dora_wd"] == "True"
    state = load_file(str(result.final_path))
    assert {float(state[key]) for key in state if key.endswith(".alpha")} == {8.0}
    prefixes = ["lora_unet_", *(["lora_te1_", "lora_te2_"] if family == "sdxl" else ["lora_te_"])]
    for prefix in prefixes[:1 + len(result.text_encoders)]:
        assert [key for key in state if key.startswith(prefix) and key.endswith(".dora_scale")], prefix
    assert any(key.endswith("conv1.dora_scale") or key.endswith("in_layers_2.dora_scale") for key in state)

    base_unet = load(family).unet
    inputs = unet_inputs(family)
    with torch.no_grad():
        expected_unet = result.unet.eval()(**inputs).sample
        assert (expected_unet - base_unet(**inputs).sample).abs().max() > 1e-4
    trained = load(family)
    for index, encoder in enumerate(result.text_encoders):
        setattr(trained, ["text_encoder", "text_encoder_2"][index], encoder.eval())
    expected_text = encode(trained, family)

    pipeline = load(family)
    pipeline.load_lora_weights(diffusers_state_dict(result.final_path, pipeline))
    with torch.no_grad():
        torch.testing.assert_close(pipeline.unet(**inputs).sample, expected_unet, rtol=0, atol=1e-5)
    for loaded, wanted in zip(encode(pipeline, family), expected_text, strict=True):
        torch.testing.assert_close(loaded, wanted, rtol=0, atol=1e-5)


@pytest.mark.e2e
def test_dora_resumes_bit_identically(dataset_dir, tmp_path):
    options = dict(steps=3, checkpoint_steps=1, validation_steps=1000, use_dora=True)
    whole, _ = run(tiny_config(dataset_dir, tmp_path / "whole", **options))
    first, _ = run(tiny_config(dataset_dir, tmp_path / "out", **options), stop_at=1)
    assert first.interrupted
    second, events = run(tiny_config(dataset_dir, tmp_path / "out", **options), resume=True)
    assert events[0].resumed_from_step == 1
    expected, resumed = load_file(str(whole.final_path)), load_file(str(second.final_path))
    assert expected.keys() == resumed.keys() and any(key.endswith(".dora_scale") for key in expected)
    assert all(torch.equal(expected[key], resumed[key]) for key in expected)


@pytest.mark.e2e
@pytest.mark.parametrize("optimizer", ["adamw", "prodigy", "adafactor"])
def test_each_optimizer_trains_and_resumes(dataset_dir, tmp_path, optimizer):
    lr = 1.0 if optimizer == "prodigy" else 1e-3
    options = dict(optimizer=optimizer, learning_rate=lr, validation_steps=100, checkpoint_steps=1)
    first = train(parse_config(tiny_config(dataset_dir, tmp_path / "out", steps=2, **options)), lambda e: None,
                  lambda: False)
    assert first.final_path.is_file()
    events = []
    resumed = train(parse_config(tiny_config(dataset_dir, tmp_path / "out", steps=3, **options)), events.append,
                    lambda: False, resume=True)
    assert events[0].resumed_from_step == 2 and resumed.step == 3
    with safe_open(str(resumed.final_path), "pt") as handle:
        assert handle.metadata()["ss_optimizer"].split(".")[-1].lower().startswith(optimizer[:4])


def test_adamw_is_fused_on_the_cpu_and_steps_like_the_plain_one():
    from lora_core.optim import make_optimizer

    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(16, 8)) for _ in range(3)]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    initial = [p.detach().clone() for p in params]
    config = parse_config(BASE)
    fused = make_optimizer(config, [{"params": params, "lr": 1e-2}], torch.device("cpu"))
    plain = torch.optim.AdamW([{"params": twins, "lr": 1e-2}], weight_decay=config.adam_weight_decay, foreach=False)
    assert fused.defaults["fused"] is True
    for _ in range(3):
        for p, twin in zip(params, twins, strict=True):
            p.grad = torch.randn_like(p)
            twin.grad = p.grad.clone()
        fused.step()
        plain.step()
    for p, twin in zip(params, twins, strict=True):
        torch.testing.assert_close(p, twin, rtol=1e-5, atol=1e-6)
    assert all((p - start).abs().max() > 1e-3 for p, start in zip(params, initial, strict=True))


@pytest.mark.e2e
def test_missing_optimizer_package_is_a_clear_error(dataset_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if it were not installed
    config = parse_config(tiny_config(dataset_dir, tmp_path / "out", optimizer="adamw8bit"))
    terminal, _ = run_job_here(config)
    assert terminal.type == "error" and terminal.field == "optimizer"
    assert "pip install bitsandbytes" in terminal.message


def test_min_snr_weights_match_the_formula():
    scheduler = objective.noise_scheduler_for(tiny_pipeline().scheduler.config, parse_config(BASE))
    timesteps = torch.tensor([0, 500, 999])
    prediction, target = torch.ones(3, 4, 8, 8), torch.zeros(3, 4, 8, 8)
    alphas = scheduler.alphas_cumprod[timesteps]
    snr = alphas / (1 - alphas)
    expected_eps = (torch.clamp(snr, max=5.0) / snr).mean()
    expected_v = (torch.clamp(snr, max=5.0) / (snr + 1)).mean()
    got_eps = objective.diffusion_loss(prediction, target, scheduler, timesteps, "epsilon", 5.0)
    got_v = objective.diffusion_loss(prediction, target, scheduler, timesteps, "v_prediction", 5.0)
    torch.testing.assert_close(got_eps, expected_eps.float(), rtol=1e-5, atol=0)
    torch.testing.assert_close(got_v, expected_v.float(), rtol=1e-5, atol=0)
    assert objective.diffusion_loss(prediction, target, scheduler, timesteps, "epsilon", 0).item() == 1.0


def test_zero_terminal_snr_and_noise_offset():
    config = parse_config({**BASE, "zero_terminal_snr": True})
    scheduler = objective.noise_scheduler_for(tiny_pipeline().scheduler.config, config)
    assert scheduler.alphas_cumprod[-1] < 1e-6
    noise, offsets = torch.zeros(2, 4, 8, 8), torch.randn(2, 4, 1, 1)
    shifted = objective.offset_noise(noise, offsets, 0.1)
    torch.testing.assert_close(shifted.mean(dim=(2, 3)), 0.1 * offsets[:, :, 0, 0])
    assert objective.offset_noise(noise, offsets, 0.0) is noise


@pytest.mark.e2e
def test_v_prediction_is_read_from_the_scheduler_and_trains_on_velocity(dataset_dir, tmp_path):
    folder = tmp_path / "v-model"
    shutil.copytree(builtin.builtin_folder("tiny-sd"), folder)
    scheduler_file = folder / "scheduler" / "scheduler_config.json"
    scheduler = json.loads(scheduler_file.read_text(encoding="utf-8"))
    scheduler_file.write_text(json.dumps({**scheduler, "prediction_type": "v_prediction"}), encoding="utf-8")
    info = models.inspect(models.resolve(str(folder)))
    assert info.prediction_type == "v_prediction" and "v-prediction" in info.description

    seen = []
    real_target = objective.target_for

    def spy(noise_scheduler, latents, noise, timesteps, prediction_type):
        seen.append(prediction_type)
        return real_target(noise_scheduler, latents, noise, timesteps, prediction_type)

    objective.target_for = spy
    try:
        config = tiny_config(dataset_dir, tmp_path / "out", steps=1, validation_steps=100, zero_terminal_snr=True)
        config["base_model"] = str(folder)
        train(parse_config(config), lambda e: None, lambda: False)
    finally:
        objective.target_for = real_target
    assert seen == ["v_prediction"]


@pytest.mark.parametrize(("target", "dora", "network"), [("attention", False, "lora"), ("attention_mlp", True, "lora"),
                                                       ("locon", True, "lora"), ("locon", False, "loha")])
def test_the_memory_estimate_counts_every_lora_parameter(target, dora, network):
    """The estimate's LoRA parameter count (read from configs on the meta device) equals what peft adds (LoHa:
    two LoRA-sized pairs per layer)."""
    from lora_core.hardware import lora_parameter_count
    from lora_core.lora import add_text_encoder_lora

    config = parse_config({**BASE, "lora_rank": 4, "lora_target": target, "use_dora": dora, "network_type": network,
                           "train_text_encoder": True})
    source = models.resolve("builtin:tiny-sd")
    sizes = models.model_sizes(source, models.inspect(source))
    pipeline = tiny_pipeline()
    unet_params = sum(p.numel() for p in add_lora(pipeline.unet, config))
    text_params = sum(p.numel() for p in add_text_encoder_lora(pipeline.text_encoder, config))
    assert lora_parameter_count(config, sizes) == (unet_params, text_params)
