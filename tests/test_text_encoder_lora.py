"""LoRA on the text encoder(s): trained at its own learning rate, exported under kohya's `lora_te*_` names,
reproduced exactly by diffusers' `load_lora_weights`, and resumed bit-identically."""

from __future__ import annotations

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from helpers import tiny_config
from safetensors import safe_open
from safetensors.torch import load_file

from lora_core import builtin
from lora_core.checkpoint import ResumeError
from lora_core.configfile import parse_config
from lora_core.training import train

# a large text-encoder rate so that its LoRA (lora_B starts at zero) really moves in a few steps
OPTIONS = dict(train_text_encoder=True, text_encoder_lr=5e-2, lora_dropout=0.1, batch_size=1)
PROMPT = "shapestyle, a red circle"


def run(config: dict, resume: bool = False, stop_at: int | None = None):
    events = []

    def should_stop() -> bool:
        return stop_at is not None and any(e.type == "progress" and e.step >= stop_at for e in events)

    return train(parse_config(config), events.append, should_stop, resume=resume), events


def encode(pipeline, family: str) -> list[torch.Tensor]:
    with torch.no_grad():
        if family == "sdxl":
            embeds, _, pooled, _ = pipeline.encode_prompt(PROMPT, device=torch.device("cpu"),
                                                          do_classifier_free_guidance=False)
            return [embeds, pooled]
        return [pipeline.encode_prompt(PROMPT, torch.device("cpu"), 1, False)[0]]


def unet_inputs(family: str) -> dict:
    generator = torch.Generator().manual_seed(0)
    inputs = dict(sample=torch.randn(1, 4, 32, 32, generator=generator), timestep=torch.tensor([500]))
    if family == "sdxl":
        inputs.update(encoder_hidden_states=torch.randn(1, 77, 64, generator=generator),
                      added_cond_kwargs={"text_embeds": torch.randn(1, 32, generator=generator),
                                         "time_ids": torch.tensor([[256.0, 256.0, 0.0, 0.0, 256.0, 256.0]])})
    else:
        inputs.update(encoder_hidden_states=torch.randn(1, 77, 32, generator=generator))
    return inputs


def load(family: str):
    if family == "sdxl":
        return StableDiffusionXLPipeline.from_pretrained(builtin.builtin_folder("tiny-sdxl"))
    return StableDiffusionPipeline.from_pretrained(builtin.builtin_folder("tiny-sd"), safety_checker=None)


@pytest.mark.e2e
@pytest.mark.parametrize(("family", "prefixes"), [("sd1", ["lora_te_"]), ("sdxl", ["lora_te1_", "lora_te2_"])])
def test_text_encoder_lora_loaded_by_diffusers_reproduces_the_trained_model(dataset_dir, tmp_path, family,
                                                                            prefixes):
    config = tiny_config(dataset_dir, tmp_path / "out", steps=2, **OPTIONS)
    config["base_model"] = "builtin:tiny-sdxl" if family == "sdxl" else "builtin:tiny-sd"
    result, events = run(config)  # the last step's samples come from the prompt, through the trained encoders
    assert events[-1].type == "complete" and any(e.type == "sample" for e in events)
    assert len(result.text_encoders) == len(prefixes)

    with safe_open(str(result.final_path), "pt") as handle:
        keys = list(handle.keys())
        assert handle.metadata()["ss_text_encoder_lr"] == "0.05"
    assert {key.split("_text_model_")[0] + "_" for key in keys if "_text_model_" in key} == set(prefixes)
    assert all(key.startswith(("lora_unet_", *prefixes)) for key in keys)
    state = load_file(str(result.final_path))
    for prefix in prefixes:  # the up weights started at zero: each encoder's LoRA has really moved
        assert max(state[k].abs().max().item() for k in keys if k.startswith(prefix) and "lora_up" in k) > 1e-3

    base = encode(load(family), family)
    trained = load(family)
    for index, encoder in enumerate(result.text_encoders):
        setattr(trained, "text_encoder_2" if index else "text_encoder", encoder.eval())
    expected = encode(trained, family)
    assert (expected[0] - base[0]).abs().max() > 1e-3, "the text-encoder LoRA must change the embeddings"

    pipeline = load(family)
    pipeline.load_lora_weights(str(result.final_path))
    for loaded, wanted in zip(encode(pipeline, family), expected, strict=True):
        torch.testing.assert_close(loaded, wanted, rtol=0, atol=1e-5)
    inputs = unet_inputs(family)
    with torch.no_grad():
        torch.testing.assert_close(pipeline.unet(**inputs).sample, result.unet.eval()(**inputs).sample,
                                   rtol=0, atol=1e-5)


@pytest.mark.e2e
def test_resume_with_a_trained_text_encoder_is_bit_identical(dataset_dir, tmp_path):
    options = dict(OPTIONS, steps=4, checkpoint_steps=2, validation_steps=1000)
    whole, _ = run(tiny_config(dataset_dir, tmp_path / "whole", **options))
    config = tiny_config(dataset_dir, tmp_path / "out", **options)
    first, _ = run(config, stop_at=2)
    assert first.interrupted and first.step == 2
    frozen = tiny_config(dataset_dir, tmp_path / "out", **dict(options, train_text_encoder=False))
    with pytest.raises(ResumeError, match="train_text_encoder"):  # its state has text-encoder weights
        run(frozen, resume=True)
    second, events = run(config, resume=True)
    assert events[0].resumed_from_step == 2 and second.step == 4
    expected, resumed = load_file(str(whole.final_path)), load_file(str(second.final_path))
    assert expected.keys() == resumed.keys() and any(key.startswith("lora_te_") for key in expected)
    different = [key for key in expected if not torch.equal(expected[key], resumed[key])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[0]}"


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_per_step_encoding_equals_the_pipelines_encode_prompt(family):
    from lora_core import families
    from lora_core.conditioning import frozen_encoder, trained_encoder
    from lora_core.models import text_encoders

    pipeline, cpu, texts, model = load(family), torch.device("cpu"), [PROMPT, ""], families.get(family)
    ours = trained_encoder(model, pipeline, text_encoders(pipeline), cpu, torch.float32)(texts)
    theirs = frozen_encoder(model, pipeline, cpu, torch.float32)(texts)
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name


def test_the_memory_estimate_counts_text_encoders_that_stay_on_the_device():
    from lora_core import hardware, models

    base = dict(dataset_path="d", base_model="builtin:tiny-sd", output_path="o", trigger_words=["t"])
    source = models.resolve("builtin:tiny-sd")
    sizes = models.model_sizes(source, models.inspect(source))
    frozen = hardware.estimate_memory(parse_config(base), sizes, "no", False)
    trained = hardware.estimate_memory(parse_config({**base, "train_text_encoder": True}), sizes, "no", False)
    added = (trained.total_gib - frozen.total_gib) * hardware.GIB
    assert abs(added - sizes.text_params * 4) < 0.002 * hardware.GIB  # fp32 weights; rounding of the GiB figures
    assert "text encoder" in trained.covers.split(" on the device")[0]
    assert "text encoder" not in frozen.covers.split(" on the device")[0]
