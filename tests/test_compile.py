"""compile_unet (auto / on / off), regional compilation and the cuda_graphs option: the decision, its refusals and
fallbacks, and (e2e) that compiled steps train what eager steps train, resume included."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import ROOT, SHAPES_DATASET, tiny_config
from safetensors.torch import load_file

from lora_core import compile as unet_compile
from lora_core import models
from lora_core.config import ConfigError
from lora_core.configfile import parse_config
from lora_core.training import train

BASE = {"dataset_path": "d", "base_model": "builtin:tiny-sd", "output_path": "o", "trigger_words": ["x"]}
SMALL_SD_PARAMS = 13_481_084  # builtin:small-sd's UNet, the CPU benchmark model


def never_asked() -> int:
    raise AssertionError("the UNet size is not needed for this decision")


def threshold_steps(config, device_type: str, params: int) -> int:
    """The fewest steps at which auto compiles, from the module's own figures."""
    step_s = unet_compile.estimated_step_s(config, device_type, params)
    needed = unet_compile.WIN_MARGIN * unet_compile.COMPILE_S[device_type]
    return math.ceil(needed / (step_s * unet_compile.STEP_SAVING[device_type]))


def test_compile_unet_reads_true_and_false_as_on_and_off_and_defaults_to_auto():
    assert parse_config(BASE).compile_unet == "auto"
    assert parse_config({**BASE, "compile_unet": True}).compile_unet == "on"
    assert parse_config({**BASE, "compile_unet": False}).compile_unet == "off"
    with pytest.raises(ConfigError) as error:
        parse_config({**BASE, "compile_unet": "sometimes"})
    assert error.value.field == "compile_unet"


@pytest.mark.parametrize("device_type", ["cpu", "cuda"])
def test_auto_compiles_at_and_above_the_break_even_length_and_not_below(device_type):
    config = parse_config({**BASE, "resolution": 512, "batch_size": 4})
    steps = threshold_steps(config, device_type, SMALL_SD_PARAMS)
    assert steps > 1
    below = unet_compile.decide(config, device_type, steps - 1, lambda: SMALL_SD_PARAMS)
    at = unet_compile.decide(config, device_type, steps, lambda: SMALL_SD_PARAMS)
    above = unet_compile.decide(config, device_type, steps * 3, lambda: SMALL_SD_PARAMS)
    assert (below.compile, at.compile, above.compile) == (False, True, True)
    assert "too short" in below.reason and "long enough" in at.reason and f"{steps} steps" in at.reason
    assert not any(d.cuda_graphs for d in (below, at, above))


def test_auto_counts_a_second_batch_shape_as_a_second_compile():
    config = parse_config({**BASE, "resolution": 512, "batch_size": 4})
    steps = threshold_steps(config, "cpu", SMALL_SD_PARAMS)
    assert unet_compile.decide(config, "cpu", steps, lambda: SMALL_SD_PARAMS, shapes=1).compile
    assert not unet_compile.decide(config, "cpu", steps, lambda: SMALL_SD_PARAMS, shapes=3).compile
    assert unet_compile.decide(config, "cpu", 2 * steps, lambda: SMALL_SD_PARAMS, shapes=3).compile


@pytest.mark.parametrize("setting, expected", [("on", True), ("off", False)])
def test_on_and_off_force_it_whatever_the_length(setting, expected):
    config = parse_config({**BASE, "compile_unet": setting})
    for steps in (1, 10**6):
        decision = unet_compile.decide(config, "cpu", steps, never_asked)
        assert decision.compile is expected and f"compile_unet is {setting}" in decision.reason


def tiny_sd_params() -> int:
    source = models.resolve("builtin:tiny-sd")
    return models.model_sizes(source, models.inspect(source)).unet_params


def test_the_demo_preset_and_the_test_configs_come_out_off():
    params = tiny_sd_params()
    demo = json.loads((ROOT / "presets" / "demo-toy-cpu.json").read_text())
    configs = {"demo preset": demo, "tiny test config": tiny_config(SHAPES_DATASET, ROOT / "unused"),
               # the longest test run: the browser test starts 5000 steps, then stops it
               "5000 steps": tiny_config(SHAPES_DATASET, ROOT / "unused", steps=5000)}
    for name, data in configs.items():
        config = parse_config(data)
        assert config.compile_unet == "auto", name
        for device_type in ("cpu", "cuda"):
            decision = unet_compile.decide(config, device_type, config.steps, lambda: params)
            assert not decision.compile, (name, device_type, decision.reason)


def test_cuda_graphs_refuses_what_the_config_alone_shows():
    cases = {("cuda_graphs", "compile_unet"): {"compile_unet": "off"},
             ("cuda_graphs", "device"): {"device": "cpu"},
             ("cuda_graphs", "train_text_encoder"): {"train_text_encoder": True}}
    for fields, options in cases.items():
        with pytest.raises(ConfigError) as error:
            parse_config({**BASE, "cuda_graphs": True, **options})
        assert [field for field, _ in error.value.problems] == list(fields)
        assert "cuda_graphs" in str(error.value) and "set" in str(error.value)  # names the fix


def test_cuda_graphs_apply_on_cuda_with_one_batch_shape_and_make_auto_compile():
    config = parse_config({**BASE, "cuda_graphs": True})
    decision = unet_compile.decide(config, "cuda", 5, never_asked, shapes=1)
    assert decision.compile and decision.cuda_graphs and "with CUDA graphs" in decision.reason


@pytest.mark.parametrize("device_type, shapes, options, processes, why", [
    ("cpu", 1, {}, 1, "no CUDA device"),
    ("cuda", unet_compile.MAX_GRAPH_SHAPES + 1, {}, 1, "shapes"),
    ("cuda", 1, {"gradient_accumulation_steps": 2}, 1, "gradient_accumulation_steps"),
    ("cuda", 1, {}, 2, "several processes"),
])
def test_cuda_graphs_fall_back_to_plain_compile_with_the_reason(device_type, shapes, options, processes, why):
    config = parse_config({**BASE, "cuda_graphs": True, **options})  # device auto: the machine decides
    decision = unet_compile.decide(config, device_type, 5, never_asked, shapes=shapes, num_processes=processes)
    assert decision.compile and not decision.cuda_graphs
    assert "falls back to plain compile" in decision.reason and why in decision.reason


def test_batch_shapes_count_full_and_short_last_batches_per_bucket():
    assert unet_compile.batch_shapes(["a"] * 8, 4) == {("a", 4)}
    assert unet_compile.batch_shapes(["a"] * 6, 4) == {("a", 4), ("a", 2)}
    assert unet_compile.batch_shapes(["a"] * 3, 4) == {("a", 3)}
    assert unet_compile.batch_shapes(["a"] * 3, 4, repeats=4) == {("a", 4)}
    assert unet_compile.batch_shapes(["a"] * 4 + ["b"] * 2, 2) == {("a", 2), ("b", 2)}
    assert unet_compile.batch_shapes(["a"] * 6, 2, num_processes=2) == {("a", 2), ("a", 1)}


def tiny_unet():
    """A UNet2DConditionModel with a few transformer blocks (its `_repeated_blocks`), built in milliseconds."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(block_out_channels=(8, 16), layers_per_block=1, cross_attention_dim=8,
                                attention_head_dim=2, norm_num_groups=4, sample_size=8,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))


def test_regional_compile_targets_the_declared_repeated_blocks_and_leaves_them_eager_between_calls():
    unet = tiny_unet()
    forward = unet_compile.compile_unet(unet, unet_compile.CompileDecision(True, False, "test"))
    blocks = unet_compile.repeated_blocks(unet)
    assert forward.scope == "regional" and len(blocks) >= 2 and len(forward._regions) == len(blocks)
    assert {type(block).__name__ for block in blocks} == set(unet._repeated_blocks)
    assert all(block._compiled_call_impl is None for block in blocks)  # samples and export run eagerly
    whole = unet_compile.compile_unet(tiny_unet(), unet_compile.CompileDecision(True, False, "test"), "whole")
    assert whole.scope == "whole" and all(b._compiled_call_impl is None for b in unet_compile.repeated_blocks(
        whole.model))
    off = unet_compile.compile_unet(unet, unet_compile.CompileDecision(False, False, "off"))
    assert off.scope == "off" and off._forward is unet


def test_a_model_without_repeated_blocks_is_compiled_whole():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    assert unet_compile.compile_unet(model, unet_compile.CompileDecision(True, False, "test")).scope == "whole"
    with pytest.raises(ValueError, match="no repeated blocks"):
        unet_compile.compile_unet(model, unet_compile.CompileDecision(True, False, "test"), "regional")


# ----------------------------------------------------------------------------------------------------
# end to end: compiled steps against eager ones, and resume with compile on

STEPS = 4
OPTIONS = dict(steps=STEPS, checkpoint_steps=2, validation_steps=1000, progress_steps=1, bucketing=False,
               resolution=256)
# Tolerances. Compiling fuses and reorders float32 arithmetic, which changes results by about 1e-7 relative per
# operation; over 4 AdamW steps the losses agree to ~1e-7 (measured) and the LoRA weights to ~1e-5 relative
# (AdamW divides by the root of tiny second moments, which magnifies rounding in near-zero gradients). A real
# fault (a LoRA left out of the compiled graph, a wrong scale, a stale weight) changes both by 1e-2 or more.
LOSS_RTOL = 1e-4
WEIGHT_RTOL = 1e-3


def run(folder, resume=False, stop_at=None, **options):
    events = []

    def should_stop() -> bool:
        return stop_at is not None and any(e.type == "progress" and e.step >= stop_at for e in events)

    config = parse_config(tiny_config(SHAPES_DATASET, folder, **{**OPTIONS, **options}))
    result = train(config, events.append, should_stop, resume=resume)
    return result, events


def losses(events) -> dict[int, float]:
    return {e.step: e.loss for e in events if e.type == "progress"}


def relative_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    num = math.sqrt(sum(float((a[k].float() - b[k].float()).pow(2).sum()) for k in a))
    den = math.sqrt(sum(float(a[k].float().pow(2).sum()) for k in a))
    return num / den


@pytest.fixture(scope="module")
def eager_run(tmp_path_factory):
    result, events = run(tmp_path_factory.mktemp("eager") / "out", compile_unet="off")
    return load_file(str(result.final_path)), events


@pytest.mark.e2e
def test_compiled_steps_match_eager_ones_and_resume_stays_correct(eager_run, tmp_path):
    eager_lora, eager_events = eager_run
    assert eager_events[0].compile_unet == "off"

    first, events = run(tmp_path / "out", compile_unet="on", stop_at=2)
    started = events[0]
    assert started.compile_unet == "regional" and started.compile_reason == "compile_unet is on"
    assert first.interrupted and events[-1].step == 2
    second, resumed = run(tmp_path / "out", resume=True, compile_unet="on")
    assert resumed[0].resumed_from_step == 2 and resumed[0].compile_unet == "regional"

    compiled = {**losses(events), **losses(resumed)}
    assert compiled.keys() == set(range(1, STEPS + 1))
    for step, loss in losses(eager_events).items():
        assert compiled[step] == pytest.approx(loss, rel=LOSS_RTOL), step
    assert relative_difference(eager_lora, load_file(str(second.final_path))) < WEIGHT_RTOL
