"""The training loop in process: reproducible, exact export, lengths from steps or epochs."""

import pytest
import torch
from diffusers import StableDiffusionPipeline
from helpers import run_job_here, tiny_config
from safetensors.torch import load_file

from lora_core import builtin
from lora_core.config import parse_config
from lora_core.training import train

pytestmark = pytest.mark.e2e  # every test here trains or serves end to end


def run(config_dict):
    events = []
    result = train(parse_config(config_dict), events.append, lambda: False)
    return result, events


def unet_output(unet):
    generator = torch.Generator().manual_seed(3)
    latents, text = torch.randn(2, 4, 32, 32, generator=generator), torch.randn(2, 77, 32, generator=generator)
    with torch.no_grad():
        return unet(latents, torch.tensor([10, 900]), encoder_hidden_states=text).sample


def test_final_file_reproduces_the_trained_unet_exactly(dataset_dir, tmp_path):
    result, events = run(tiny_config(dataset_dir, tmp_path / "out", steps=4, lora_rank=8, lora_alpha=3,
                                     validation_steps=100))
    assert events[-1].type == "complete" and result.step == 4
    trained = unet_output(result.unet.eval())
    pipeline = StableDiffusionPipeline.from_pretrained(builtin.builtin_folder("tiny-sd"), safety_checker=None)
    pipeline.load_lora_weights(str(result.final_path))
    torch.testing.assert_close(unet_output(pipeline.unet), trained, rtol=0, atol=1e-5)


def test_same_seed_gives_bit_identical_lora_and_another_seed_does_not(dataset_dir, tmp_path):
    options = dict(steps=3, validation_steps=100, checkpoint_steps=100)
    first, _ = run(tiny_config(dataset_dir, tmp_path / "a", **options))
    second, _ = run(tiny_config(dataset_dir, tmp_path / "b", **options))
    third, _ = run(tiny_config(dataset_dir, tmp_path / "c", **options, seed=8))
    a, b, c = (load_file(str(r.final_path)) for r in (first, second, third))
    assert all(torch.equal(a[key], b[key]) for key in a)
    assert any(not torch.equal(a[key], c[key]) for key in a)


def test_epochs_decide_the_length_when_steps_are_not_given(dataset_dir, tmp_path):
    config = tiny_config(dataset_dir, tmp_path / "out", validation_steps=100, checkpoint_steps=100)
    del config["training_params"]["steps"]
    config["training_params"].update(epochs=2, batch_size=4)  # 6 images: 2 steps per epoch
    result, events = run(config)
    assert result.step == 4 and events[0].total_steps == 4


def test_gradient_accumulation_counts_optimizer_steps(dataset_dir, tmp_path):
    result, events = run(tiny_config(dataset_dir, tmp_path / "out", steps=2, gradient_accumulation_steps=3,
                                     validation_steps=100))
    assert [e.step for e in events if e.type == "progress"] == [1, 2]


def test_uncached_latents_train_too(dataset_dir, tmp_path):
    result, events = run(tiny_config(dataset_dir, tmp_path / "out", steps=2, latent_cache="off",
                                     validation_steps=100))
    assert events[-1].type == "complete" and result.final_path.is_file()


def test_a_job_stops_on_request_with_one_final_event(dataset_dir, tmp_path):
    config = parse_config(tiny_config(dataset_dir, tmp_path / "out", steps=500, validation_steps=1000,
                                      checkpoint_steps=1000))
    terminal, events = run_job_here(config, stop_after_step=2)
    assert terminal.type == "interrupted" and 2 <= terminal.step < 500
    assert [e.type for e in events if e.terminal] == ["interrupted"] and events[-1] == terminal


def test_a_failure_inside_the_job_is_an_error_event(dataset_dir, tmp_path):
    config = parse_config(tiny_config(dataset_dir, tmp_path / "out", resolution=264))  # not a multiple of 16
    terminal, _ = run_job_here(config)
    assert terminal.type == "error" and "multiple of 16" in terminal.message


def test_sdxl_trains_and_its_lora_reproduces_the_trained_unet(dataset_dir, tmp_path):
    from diffusers import StableDiffusionXLPipeline
    from safetensors import safe_open

    config = tiny_config(dataset_dir, tmp_path / "out", steps=2, validation_steps=2, lora_rank=4, lora_alpha=2)
    config["base_model"] = "builtin:tiny-sdxl"
    result, events = run(config)
    assert events[0].model_family == "SDXL" and events[-1].type == "complete"
    assert any(e.type == "sample" for e in events)
    with safe_open(str(result.final_path), "pt") as handle:
        assert handle.metadata()["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    generator = torch.Generator().manual_seed(0)
    inputs = dict(sample=torch.randn(1, 4, 32, 32, generator=generator), timestep=torch.tensor([500]),
                  encoder_hidden_states=torch.randn(1, 77, 64, generator=generator),
                  added_cond_kwargs={"text_embeds": torch.randn(1, 32, generator=generator),
                                     "time_ids": torch.tensor([[256.0, 256.0, 0.0, 0.0, 256.0, 256.0]])})
    with torch.no_grad():
        expected = result.unet.eval()(**inputs).sample
        pipeline = StableDiffusionXLPipeline.from_pretrained(builtin.builtin_folder("tiny-sdxl"))
        pipeline.load_lora_weights(str(result.final_path))
        torch.testing.assert_close(pipeline.unet(**inputs).sample, expected, rtol=0, atol=1e-5)


def test_jobs_with_different_precisions_run_one_after_another_in_one_process(dataset_dir, tmp_path):
    for index, precision in enumerate(["no", "bf16", "no"]):  # a library user's process, many jobs
        config = parse_config(tiny_config(dataset_dir, tmp_path / str(index), steps=1, mixed_precision=precision,
                                          validation_steps=100))
        terminal, _ = run_job_here(config)
        assert terminal.type == "complete", terminal
