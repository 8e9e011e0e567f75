"""A quantised frozen base (base_quantization), the memory picker (memory_mode) and the low-memory refusals.

On the CPU with the tiny built-ins: each mode the CPU runs (fp8 by diffusers' layerwise casting, int8 by torchao)
trains to completion with a loss curve close to the full-precision run's, and its file is the same adapter,
read on the ordinary base; nf4 (bitsandbytes, CUDA) and the paged optimizer are refused at their fields. The
picker is tested on the real size tables of SDXL and FLUX.1-dev (built on the meta device) with injected free
memory.
"""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch
from helpers import SHAPES_DATASET, tiny_config
from safetensors import safe_open

from lora_core import hardware, lorafile, memory, models, plan, quantize
from lora_core.config import ConfigError
from lora_core.configfile import parse_config
from lora_core.errors import UserError
from lora_core.training import train

BASE = dict(dataset_path="d", output_path="o", trigger_words=["t"], batch_size=1)
CPU_MODES = ("fp8", "int8")
# The largest relative gap allowed between a quantised run's loss and the full-precision run's at the same step
# (same seed, same noise, same data). fp8 e4m3 keeps 3 mantissa bits: each weight is off by up to 1/16 of itself
# (about 1/32 on average), and a layer's output, a sum over many such weights, by a few tenths of a percent (over
# 4 steps the tiny models measured at most 0.44 % for SD 1, 0.26 % SDXL, 0.12 % FLUX, 0.02 % SD 3); int8 with a
# scale per row is 16 times finer (at most 0.035 %, SDXL). Step to step these losses move by 5-40 %: a gap of 2 %
# (fp8) or 0.5 % (int8) is far below that and 4-14 times what was measured, while a broken hook (weights lost,
# scales dropped, the LoRA not on the path) moves the loss by far more than a rounding does.
LOSS_TOLERANCE = {"fp8": 0.02, "int8": 0.005}
TINY = {"sd": "builtin:tiny-sd", "flux": "builtin:tiny-flux"}


def sizes_of(name: str) -> models.ModelSizes:
    source = models.resolve(f"builtin:{name}")
    return models.model_sizes(source, models.inspect(source))  # counted on the meta device


@pytest.fixture(scope="module")
def big_sizes() -> dict[str, models.ModelSizes]:
    return {"sdxl": sizes_of("sdxl-arch"), "flux": sizes_of("flux-dev-arch")}


def usable(mode: str) -> bool:
    return quantize.unavailable_reason(mode, "cuda") is None


# ----------------------------------------------------------------------------------------------------
# the estimate and the picker


@pytest.mark.parametrize("arch", ["sdxl", "flux"])
def test_the_estimate_counts_each_saving(big_sizes, arch):
    config = parse_config({**BASE, "base_model": "x", "resolution": 1024})
    sizes = big_sizes[arch]
    full = hardware.estimate_memory(config, sizes, "bf16", False)
    fp8 = hardware.estimate_memory(config, sizes, "bf16", True, "fp8")  # fp8 saves memory with recomputation:
    unchecked = hardware.estimate_memory(config, sizes, "bf16", False, "fp8")  # without, every upcast copy stays
    assert unchecked.frozen_weights_gib > full.frozen_weights_gib
    nf4 = hardware.estimate_memory(config, sizes, "bf16", False, "nf4")
    checkpointed = hardware.estimate_memory(config, sizes, "bf16", True)
    # nearly every weight of a UNet or a transformer sits in a linear or a convolution
    # fp8 leaves what diffusers' layerwise casting skips: norms, and FLUX's AdaLayerNorm linears (a quarter of
    # it); and the convolutions, whose backward would read a float8 weight (quantize.FP8_KEEPS: SDXL's ResNets)
    assert 0.5 < fp8.frozen_weights_gib / full.frozen_weights_gib < (0.6 if arch == "sdxl" else 0.66)
    assert 0.28 < nf4.frozen_weights_gib / full.frozen_weights_gib < 0.4  # nf4 leaves the convolutions
    assert checkpointed.activations_gib < 0.4 * full.activations_gib
    eight_bit = hardware.estimate_memory(parse_config({**BASE, "base_model": "x", "resolution": 1024,
                                                       "optimizer": "adamw8bit"}), sizes, "bf16", False)
    assert eight_bit.lora_and_optimizer_gib == pytest.approx(full.lora_and_optimizer_gib * 10 / 16, abs=1e-3)
    if arch == "flux":  # FLUX.1-dev's 11.9 billion parameters: 22.2 GiB in bf16, 14.1 in fp8, 11.1 in int8
        int8 = hardware.estimate_memory(config, sizes, "bf16", False, "int8")
        assert 21.5 < full.frozen_weights_gib < 23 and 13.5 < fp8.frozen_weights_gib < 14.5
        assert 10.8 < int8.frozen_weights_gib < 11.6


def test_t5_is_counted_small_only_while_it_stays_on_the_device(big_sizes):
    sizes = big_sizes["flux"]
    assert sizes.text_quantizable["int8"] > 4.5e9  # T5-XXL's encoder linears; CLIP-L (trained) is not counted
    cached = parse_config({**BASE, "base_model": "x"})
    shuffled = parse_config({**BASE, "base_model": "x", "shuffle_tags": True})
    cached_saving = (hardware.estimate_memory(cached, sizes, "bf16", True).frozen_weights_gib
                     - hardware.estimate_memory(cached, sizes, "bf16", True, "fp8").frozen_weights_gib)
    assert cached_saving == pytest.approx(sizes.unet_quantizable["fp8"] / 1024**3, abs=0.01)  # no T5 in it
    with_t5 = hardware.estimate_memory(shuffled, sizes, "bf16", True).frozen_weights_gib
    with_t5_fp8 = hardware.estimate_memory(shuffled, sizes, "bf16", True, "fp8").frozen_weights_gib
    assert with_t5 - with_t5_fp8 > 0.9 * (sizes.unet_quantizable["fp8"] + sizes.text_quantizable["fp8"]) / 1024**3


@pytest.mark.parametrize("arch", ["sdxl", "flux"])
def test_auto_picks_the_fastest_combination_that_fits(big_sizes, arch):
    config = parse_config({**BASE, "base_model": "x", "resolution": 1024, "memory_mode": "auto"})
    sizes = big_sizes[arch]
    candidates = memory.candidates(sizes)
    needed = {c: hardware.estimate_memory(config, sizes, "bf16", c[1], c[0], c[2]).total_gib * hardware.FIT_MARGIN
              for c in candidates}
    for free in (3.0, 6.0, 8.0, 10.0, 12.0, 16.0, 24.0, 32.0, 48.0, 80.0):
        choice = memory.pick(config, "bf16", free, sizes)
        chosen = (choice.base_quantization, choice.gradient_checkpointing, choice.offload_blocks)
        fitting = [c for c in candidates if needed[c] <= free]
        assert chosen == (fitting[0] if fitting else min(candidates, key=needed.get)), free
        assert choice.fits is bool(fitting)
        assert choice.summary.startswith(f"your GPU with {free:g} GiB free: ")
        assert f"est. {choice.estimate.total_gib:.1f} GiB" in choice.summary
    assert memory.pick(config, "bf16", 200.0, sizes).base_quantization == "none"  # a big card: nothing traded


def test_the_picks_for_the_cards_people_own(big_sizes):
    """The choices the estimate makes for the issue's cards (estimates: GPU measurements still to come)."""
    config = parse_config({**BASE, "base_model": "x", "resolution": 1024, "memory_mode": "auto"})
    sdxl_8 = memory.pick(config, "bf16", 7.5, big_sizes["sdxl"])  # an 8 GB card's free memory
    assert sdxl_8.fits and sdxl_8.gradient_checkpointing and sdxl_8.base_quantization in ("fp8", "none")
    flux_16 = memory.pick(config, "bf16", 15.5, big_sizes["flux"])
    assert flux_16.fits and flux_16.base_quantization != "none"
    if usable("nf4"):
        assert memory.pick(config, "bf16", 11.5, big_sizes["flux"]).fits


def test_auto_is_a_no_op_on_the_cpu_and_says_so(big_sizes):
    config = parse_config({**BASE, "base_model": "x", "memory_mode": "auto"})
    choice = memory.choose(config, "no", torch.device("cpu"), None, lambda: big_sizes["sdxl"])
    assert (choice.base_quantization, choice.gradient_checkpointing) == ("none", False)
    assert "changes nothing" in choice.summary
    off = memory.choose(parse_config({**BASE, "base_model": "x"}), "no", torch.device("cpu"), None,
                        lambda: big_sizes["sdxl"])
    assert off.summary == ""


# ----------------------------------------------------------------------------------------------------
# the fields and their refusals


def test_auto_chooses_the_fields_itself_and_dora_needs_the_real_weights():
    with pytest.raises(ConfigError) as caught:
        parse_config({**BASE, "base_model": "x", "memory_mode": "auto", "base_quantization": "fp8"})
    assert {f for f, _ in caught.value.problems} == {"memory_mode", "base_quantization"}
    with pytest.raises(ConfigError) as caught:
        parse_config({**BASE, "base_model": "x", "base_quantization": "int8", "use_dora": True})
    assert {f for f, _ in caught.value.problems} == {"base_quantization", "use_dora"}


def test_cuda_only_modes_are_refused_on_the_cpu_at_their_field(tmp_path):
    config = parse_config(tiny_config(SHAPES_DATASET, tmp_path / "out", base_quantization="nf4", device="cpu"))
    report = plan.plan_report(config)
    assert not report["ok"]
    problem = next(p for p in report["problems"] if p["field"] == "base_quantization")
    assert "needs a CUDA GPU" in problem["message"] and "'fp8'" in problem["message"]
    with pytest.raises(UserError) as caught:
        plan.make_plan(config)
    assert caught.value.field == "base_quantization" and "CUDA" in str(caught.value)
    paged = parse_config(tiny_config(SHAPES_DATASET, tmp_path / "out", optimizer="paged_adamw8bit", device="cpu"))
    problem = plan.plan_report(paged)["problems"][0]
    assert problem["field"] == "optimizer" and "adamw8bit" in problem["message"]


def test_a_missing_library_is_named_at_the_field(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else real(name, *a))
    config = parse_config(tiny_config(SHAPES_DATASET, tmp_path / "out", base_quantization="int8"))
    problem = plan.plan_report(config)["problems"][0]
    assert problem["field"] == "base_quantization" and "pip install torchao" in problem["message"]


@pytest.mark.e2e
def test_the_validate_only_report_shows_the_quantised_estimate(tmp_path):
    config = parse_config(tiny_config(SHAPES_DATASET, tmp_path / "out", base_quantization="fp8",
                                      gradient_checkpointing="on"))
    report = plan.plan_report(config)
    assert report["ok"], report["problems"]
    assert report["memory_estimate"]["base_quantization"] == "fp8"
    full = plan.plan_report(parse_config(tiny_config(SHAPES_DATASET, tmp_path / "out",
                                                     gradient_checkpointing="on")))
    assert report["memory_estimate"]["frozen_weights_gib"] < full["memory_estimate"]["frozen_weights_gib"]
    auto = plan.plan_report(parse_config(tiny_config(SHAPES_DATASET, tmp_path / "out", memory_mode="auto")))
    assert auto["ok"] and "changes nothing" in auto["memory_mode"]["summary"]  # the CPU: said, not done
    assert auto["memory_mode"]["base_quantization"] == "none"


def test_nf4s_layers_take_a_lora_on_top():
    """The nf4 hook on its own (the CPU refuses the mode for training; bitsandbytes' CPU fallback still builds and
    runs the layers): every frozen linear becomes a Linear4bit, quantised to 4 bits when moved to its device, and
    a peft LoRA on top of it gets gradients while the 4-bit weights get none."""
    bitsandbytes = pytest.importorskip("bitsandbytes")
    from peft import LoraConfig, inject_adapter_in_model

    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 64))
    quantize.quantize(model, "nf4", torch.float32)
    assert all(isinstance(model[i], bitsandbytes.nn.Linear4bit) for i in (0, 2))
    inject_adapter_in_model(LoraConfig(r=4, target_modules=["0", "2"], init_lora_weights="gaussian"), model)
    model.to("cpu")
    assert model[0].base_layer.weight.dtype == torch.uint8  # two 4-bit weights a byte
    model(torch.randn(2, 64)).sum().backward()
    assert {name for name, p in model.named_parameters() if p.grad is not None} == {
        f"{i}.lora_{ab}.default.weight" for i in (0, 2) for ab in "AB"}


# ----------------------------------------------------------------------------------------------------
# training on a quantised base (CPU)


def run(tmp_path, family: str, mode: str):
    overrides = dict(steps=4, resolution=64, bucketing=False, batch_size=2, checkpoint_steps=100,
                     validation_steps=100, sample_inference_steps=1, lora_alpha=4, base_quantization=mode,
                     shuffle_tags=family == "flux")  # FLUX: T5 stays on the device and is quantised too
    config = tiny_config(SHAPES_DATASET, tmp_path / f"{family}-{mode}", **overrides)
    config["base_model"] = TINY[family]
    events = []
    result = train(parse_config(config), events.append, lambda: False)
    return [e.loss for e in events if e.type == "progress"], result, events


@pytest.fixture(scope="module")
def full_precision(tmp_path_factory):
    return {family: run(tmp_path_factory.mktemp("full"), family, "none") for family in TINY}


@pytest.mark.e2e
@pytest.mark.parametrize("family", sorted(TINY))
@pytest.mark.parametrize("mode", CPU_MODES)
def test_a_quantised_base_trains_close_to_full_precision_and_its_lora_reads_on_the_ordinary_base(
        full_precision, tmp_path, family, mode):
    losses, result, events = run(tmp_path, family, mode)
    reference, reference_result, _ = full_precision[family]
    assert [e.type for e in events][-1] == "complete" and len(losses) == 4
    gaps = [abs(a - b) / b for a, b in zip(losses, reference, strict=True)]
    assert max(gaps) <= LOSS_TOLERANCE[mode], gaps
    assert max(gaps) > 0, "the base was not quantised"
    final, reference_final = result.final_path, reference_result.final_path
    with safe_open(str(final), "pt") as file, safe_open(str(reference_final), "pt") as reference_file:
        names = file.keys()
        assert set(names) == set(reference_file.keys())  # the same adapter: nothing of the quantised base
        assert all(file.get_slice(k).get_shape() == reference_file.get_slice(k).get_shape() for k in names)
        assert file.metadata()["lora_studio.base_quantization"] == mode
        assert "use it on the ordinary base" in file.metadata()["lora_studio.base_quantization_note"]
        assert "lora_studio.base_quantization" not in reference_file.metadata()
    pipeline = models.load_pipeline(models.resolve(TINY[family]), models.inspect(models.resolve(TINY[family])))
    assert all(p.dtype == torch.float32 for p in pipeline.components["unet" if family == "sd" else "transformer"]
               .parameters())  # the ordinary base
    if family == "sd":
        pipeline.load_lora_weights(str(final))  # diffusers' own reader, on the unquantised base
        assert any("lora" in name for name, _ in pipeline.unet.named_parameters())
    else:
        assert lorafile.apply_lora(pipeline, final) > 0  # every layer names a module of the ordinary base


@pytest.mark.e2e
@pytest.mark.parametrize("base", ["builtin:tiny-sd", "builtin:tiny-sdxl", "builtin:tiny-sd3", "builtin:tiny-flux"])
def test_every_familys_text_encoders_leave_the_device_once_captions_are_cached(tmp_path, base):
    """setup.encode_text_once sends each text encoder (SDXL's two, SD 3's three, FLUX's CLIP and T5) back to the
    CPU after the one-off pass: each is moved twice, to the device and back."""
    from lora_core import setup

    config = tiny_config(SHAPES_DATASET, tmp_path / "out", resolution=64, bucketing=False)
    config["base_model"] = base
    run_plan = plan.make_plan(parse_config(config))
    pipeline, _ = setup.load_frozen_models(run_plan)
    moved: dict[int, list[str]] = {}
    for encoder in models.text_encoders(pipeline):
        def to(*args, _encoder=encoder, _to=encoder.to, **kwargs):
            target = next((a for a in args if isinstance(a, str | torch.device)), kwargs.get("device"))
            if target is not None:
                moved.setdefault(id(_encoder), []).append(str(target))
            return _to(*args, **kwargs)
        encoder.to = to
    _, cached, _ = setup.encode_text_once(run_plan, pipeline, torch.device("cpu"), torch.float32)
    assert cached is not None
    encoders = models.text_encoders(pipeline)
    assert len(encoders) == {"builtin:tiny-sd": 1, "builtin:tiny-sdxl": 2, "builtin:tiny-sd3": 3,
                             "builtin:tiny-flux": 2}[base]
    # on the CPU the device is the CPU too: what shows the encoder left is the second move, after the pass
    assert all(moved[id(encoder)] == ["cpu", "cpu"] for encoder in encoders), moved


def test_a_quantised_base_is_for_one_gpu(big_sizes):
    config = parse_config({**BASE, "base_model": "x", "base_quantization": "fp8"})
    with pytest.raises(UserError) as caught:
        memory.check_device(config, "cuda", processes=2)
    assert caught.value.field == "base_quantization" and "one GPU" in str(caught.value)
    auto = parse_config({**BASE, "base_model": "x", "resolution": 1024, "memory_mode": "auto"})
    assert memory.pick(auto, "bf16", 8.0, big_sizes["sdxl"], processes=2).base_quantization == "none"


@pytest.mark.parametrize("name", ["tiny-sd", "tiny-flux"])
def test_the_estimate_counts_what_each_mode_really_stores_small(tmp_path, name):
    """quantize.quantizable (the estimate's count) equals what the libraries stored small: float8 parameters after
    layerwise casting (which skips FLUX's AdaLayerNorm linears), torchao int8 weights."""
    from lora_core import builtin

    pipeline = builtin.build_pipeline(name, tmp_path / "tokenizer")
    denoiser = pipeline.unet if name == "tiny-sd" else pipeline.transformer
    modules = [denoiser] + ([pipeline.text_encoder_2] if name == "tiny-flux" else [])  # FLUX's T5 too
    for module in modules:
        expected = {mode: quantize.quantizable(module, mode) for mode in CPU_MODES}
        fp8 = copy.deepcopy(module)
        quantize.quantize(fp8, "fp8", torch.float32)
        assert expected["fp8"] == sum(p.numel() for p in fp8.parameters() if p.dtype == torch.float8_e4m3fn) > 0
        int8 = copy.deepcopy(module)
        quantize.quantize(int8, "int8", torch.float32)
        assert expected["int8"] == sum(p.numel() for p in int8.parameters() if "Int8" in type(p).__name__) > 0
