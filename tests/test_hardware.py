"""Gradient checkpointing: on, off, or 'auto' (on only when the step would not fit in the device's free memory)."""

from __future__ import annotations

import pytest
from helpers import tiny_config

from lora_core import hardware, models, plan
from lora_core.configfile import config_to_file_dict, parse_config
from lora_core.training import train

BASE = dict(dataset_path="d", output_path="o", base_model="builtin:sd15-arch", trigger_words=["t"], resolution=512,
            batch_size=4)


@pytest.fixture(scope="module")
def sd15_sizes():
    source = models.resolve("builtin:sd15-arch")
    return models.model_sizes(source, models.inspect(source))  # counted on the meta device


def never_asked():
    raise AssertionError("the model sizes were not needed for this decision")


def test_true_and_false_read_as_on_and_off_and_auto_is_the_default():
    assert parse_config({**BASE, "gradient_checkpointing": True}).gradient_checkpointing == "on"
    assert parse_config({**BASE, "gradient_checkpointing": False}).gradient_checkpointing == "off"
    config = parse_config(BASE)
    assert config.gradient_checkpointing == "auto"
    written = config_to_file_dict(parse_config({**BASE, "gradient_checkpointing": True}))
    assert written["training_params"]["gradient_checkpointing"] == "on"
    assert parse_config(written).gradient_checkpointing == "on"
    with pytest.raises(ValueError, match="gradient_checkpointing"):
        parse_config({**BASE, "gradient_checkpointing": "sometimes"})


def test_auto_turns_checkpointing_on_only_when_the_step_would_not_fit(sd15_sizes):
    config = parse_config(BASE)
    needed = hardware.estimate_memory(config, sd15_sizes, "bf16", checkpointing=False).total_gib
    with_it = hardware.estimate_memory(config, sd15_sizes, "bf16", checkpointing=True).total_gib
    assert with_it < 0.7 * needed
    assert not hardware.use_gradient_checkpointing(config, "bf16", needed * 2, lambda: sd15_sizes)
    assert hardware.use_gradient_checkpointing(config, "bf16", needed * 0.9, lambda: sd15_sizes)
    assert hardware.use_gradient_checkpointing(config, "bf16", needed * 1.05, lambda: sd15_sizes)  # the margin
    assert not hardware.use_gradient_checkpointing(config, "bf16", None, never_asked)  # the CPU: nothing to fit in


@pytest.mark.parametrize(("setting", "expected"), [("on", True), ("off", False)])
def test_on_and_off_are_obeyed_whatever_the_free_memory(setting, expected):
    config = parse_config({**BASE, "gradient_checkpointing": setting})
    for free in (None, 0.01, 1000.0):
        assert hardware.use_gradient_checkpointing(config, "bf16", free, never_asked) is expected


@pytest.mark.e2e
def test_auto_checkpointing_in_a_real_run_and_in_the_preflight(dataset_dir, tmp_path, monkeypatch):
    """On the CPU 'auto' stays off; with a device that has too little free memory (faked) the run turns it on,
    says so in its started event, and the preflight reports the estimate with it."""
    events = []
    result = train(parse_config(tiny_config(dataset_dir, tmp_path / "cpu", steps=1)), events.append, lambda: False)
    assert events[0].gradient_checkpointing is False and not result.unet.is_gradient_checkpointing

    monkeypatch.setattr(hardware, "free_device_memory_gib", lambda device: 1e-4)
    config = parse_config(tiny_config(dataset_dir, tmp_path / "small", steps=1))
    events = []
    result = train(config, events.append, lambda: False)
    assert events[0].gradient_checkpointing is True and result.unet.is_gradient_checkpointing
    assert events[-1].type == "complete"
    estimate = plan.plan_report(config)["memory_estimate"]
    assert estimate["gradient_checkpointing"] is True


def test_running_out_of_gpu_memory_names_the_fixes():
    import torch

    from lora_core.job import describe_failure

    message = describe_failure(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert "gradient_checkpointing to 'on'" in message and "batch_size" in message
    assert "Tried to allocate 2.00 GiB" in message
