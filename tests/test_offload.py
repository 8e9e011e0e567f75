"""Block offloading (offload_blocks) for the transformer families: the hooks on the tiny FLUX and SD 3 transformers
(the same loss and LoRA gradients as without, at most two blocks on the device, the LoRA never moved, the weights
really gone between uses), the estimate and memory_mode auto on FLUX.1-dev's real size table (meta device), the
refusals at their fields, and whole runs with offloading forced on the CPU (where the studio itself makes it a
no-op: the weights are already in host memory) that equal runs without it, resume included.

No GPU is exercised here: on the CPU the "device" is the CPU, so the side stream, pinned memory and the
asynchronous copies are not; bench/gpu_check.sh measures those.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from helpers import SHAPES_DATASET, run_job_here, tiny_config
from safetensors.torch import load_file

from lora_core import builtin, families, hardware, memory, models, offload, plan
from lora_core.config import ConfigError
from lora_core.configfile import parse_config
from lora_core.errors import UserError
from lora_core.setup import prepare_unet

BASE = dict(dataset_path="d", output_path="o", trigger_words=["t"], batch_size=1)
TINY = {"flux": "tiny-flux", "sd3": "tiny-sd3"}
GIB = 1024**3


@pytest.fixture(scope="module")
def flux_sizes() -> models.ModelSizes:
    source = models.resolve("builtin:flux-dev-arch")
    return models.model_sizes(source, models.inspect(source))  # counted on the meta device


@pytest.fixture(scope="module")
def transformers(tmp_path_factory) -> dict[str, torch.nn.Module]:
    folder = tmp_path_factory.mktemp("tokenizers")
    return {family: builtin.build_pipeline(name, folder / family).transformer for family, name in TINY.items()}


# ----------------------------------------------------------------------------------------------------
# the hooks, on the tiny transformers


def prepared(transformer, family: str, blocks: int, quantization: str = "none"):
    """A copy of `transformer` as the trainer prepares it (LoRA on attention + MLP, checkpointing), with its LoRA
    drawn away from zero so that every gradient path is live; and its offloader (None for 0 blocks)."""
    kind = families.get(family)
    model = copy.deepcopy(transformer)
    config = parse_config({**BASE, "base_model": "x", "lora_target": "attention_mlp"})
    params = prepare_unet(model, config, torch.device("cpu"), torch.float32, True, kind, quantization)
    torch.manual_seed(0)
    for param in params:
        torch.nn.init.normal_(param, std=0.05)
    return model, params, offload.offload(model, kind.offloadable_blocks(model), blocks, torch.device("cpu"))


def step(model, family: str, seed: int) -> torch.Tensor:
    """One training step's forward and backward, called as the trainer calls the transformer (Family.predict)."""
    generator = torch.Generator().manual_seed(seed)
    config = model.config
    latents = torch.randn(2, config.in_channels // (4 if family == "flux" else 1), 8, 8, generator=generator)
    inputs = {"encoder_hidden_states": torch.randn(2, 7, config.joint_attention_dim, generator=generator),
              "pooled_projections": torch.randn(2, config.pooled_projection_dim, generator=generator)}
    if family == "flux":
        inputs["guidance"] = 1.0
    loss = families.get(family).predict(model, latents, torch.tensor([0.3, 0.8]), inputs).square().mean()
    loss.backward()
    return loss.detach()


def frozen_sizes(block: torch.nn.Module) -> list[int]:
    return [p.numel() for p in block.parameters() if not p.requires_grad]


@pytest.mark.parametrize("family", sorted(TINY))
@pytest.mark.parametrize("quantization", ["none", "fp8", "int8"])
def test_offloading_every_block_changes_no_loss_and_no_gradient(transformers, family, quantization):
    if quantization == "int8":
        pytest.importorskip("torchao")
    plain, plain_params, _ = prepared(transformers[family], family, 0, quantization)
    model, params, offloader = prepared(transformers[family], family, 99, quantization)
    blocks = families.get(family).offloadable_blocks(model)
    assert offloader is not None and len(offloader.blocks) == len(blocks) >= 2
    for seed in (1, 2):  # two steps: the second starts from what the first left loaded
        torch.testing.assert_close(step(model, family, seed), step(plain, family, seed), rtol=0, atol=0)
        for ours, theirs in zip(params, plain_params, strict=True):
            torch.testing.assert_close(ours.grad, theirs.grad, rtol=0, atol=0)
            ours.grad = theirs.grad = None
    # between steps only block 0 (kept for the next forward) holds its frozen weights; the others are placeholders
    assert all(size > 0 for size in frozen_sizes(blocks[0]))
    assert all(size == 0 for block in blocks[1:] for size in frozen_sizes(block))
    assert offloader.most_loaded <= offload.IN_FLIGHT
    # the LoRA never moved: the optimizer's parameters are still the model's
    assert {id(p) for p in params} == {id(p) for p in model.parameters() if p.requires_grad}


def forward_only(model, family: str, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    config = model.config
    latents = torch.randn(1, config.in_channels // (4 if family == "flux" else 1), 8, 8, generator=generator)
    inputs = {"encoder_hidden_states": torch.randn(1, 7, config.joint_attention_dim, generator=generator),
              "pooled_projections": torch.randn(1, config.pooled_projection_dim, generator=generator)}
    if family == "flux":
        inputs["guidance"] = 1.0
    return families.get(family).predict(model, latents, torch.tensor([0.5]), inputs).square().mean()


@pytest.mark.parametrize("family", sorted(TINY))
def test_the_weights_are_gone_between_uses_and_the_backward_brings_them_back(transformers, family, monkeypatch):
    """After a training forward only the last offloaded block (the backward's first) holds its weights; the
    backward's recomputations need them brought back: with the copies stopped, they meet the empty placeholders
    and fail loudly."""
    model, _, offloader = prepared(transformers[family], family, 99)
    blocks = offloader.blocks
    loss = forward_only(model, family, 1)
    assert all(size == 0 for block in blocks[:-1] for size in frozen_sizes(block))
    assert all(size > 0 for size in frozen_sizes(blocks[-1]))
    loss.backward()  # brings them back one by one
    loss = forward_only(model, family, 2)
    monkeypatch.setattr(offloader, "_load", lambda index: None)
    monkeypatch.setattr(offloader, "_ensure", lambda index: None)
    with pytest.raises(RuntimeError, match="matrix|shape|size"):  # a matmul with a weight of no elements
        loss.backward()
    monkeypatch.undo()
    with torch.no_grad():  # a sample's forward (no backward to come): every block leaves after its use
        fresh, _, _ = prepared(transformers[family], family, 99)
        forward_only(fresh, family, 3)
    assert all(size == 0 for block in families.get(family).offloadable_blocks(fresh) for size in
               frozen_sizes(block))


def test_without_checkpointing_autograd_keeps_the_weights_so_offloading_would_free_nothing():
    """Why offload_blocks needs checkpointing: a plain forward's graph holds each layer's weight until the
    backward, so taking the weight off the layer after its forward frees nothing (and the backward still works)."""
    layer = torch.nn.Linear(8, 8).requires_grad_(False)
    inputs = torch.randn(2, 3, 8, requires_grad=True)
    output = layer(inputs)
    layer._parameters["weight"] = torch.nn.Parameter(torch.empty(0), requires_grad=False)
    output.sum().backward()
    assert inputs.grad is not None


def test_offloading_needs_checkpointing(transformers):
    model = copy.deepcopy(transformers["sd3"])
    with pytest.raises(ValueError, match="checkpointing"):
        offload.offload(model, families.get("sd3").offloadable_blocks(model), 1, torch.device("cpu"))


# ----------------------------------------------------------------------------------------------------
# the estimate and memory_mode auto (FLUX.1-dev's size table, meta device)


def test_the_estimate_takes_the_offloaded_blocks_off_but_two_in_flight(flux_sizes):
    config = parse_config({**BASE, "base_model": "x", "resolution": 1024})
    assert len(flux_sizes.block_params) == 19 + 38  # double-stream, then single-stream blocks
    assert flux_sizes.block_params[0] > 2 * flux_sizes.block_params[-1]
    for mode, bytes_per in (("none", 2), ("fp8", 1)):
        full = hardware.estimate_memory(config, flux_sizes, "bf16", True, mode)
        assert hardware.estimate_memory(config, flux_sizes, "bf16", True, mode, 2).total_gib == full.total_gib
        eight = hardware.estimate_memory(config, flux_sizes, "bf16", True, mode, 8)
        # six double blocks' weights leave (the two in flight stay), at 2 bytes, or 1 for what fp8 stores
        per_block = (flux_sizes.block_quantizable[0]["fp8"] if mode == "fp8" else 0) * bytes_per + (
            flux_sizes.block_params[0] - (flux_sizes.block_quantizable[0]["fp8"] if mode == "fp8" else 0)) * 2
        saving = full.frozen_weights_gib - eight.frozen_weights_gib
        assert saving == pytest.approx(6 * per_block / GIB, abs=2e-3)
        assert eight.offload_blocks == 8 and "8 offloaded blocks" in eight.covers
        assert "transformer activations" in eight.covers and "UNet" not in eight.covers  # the family's word
        assert eight.activations_gib == full.activations_gib and eight.lora_and_optimizer_gib == \
            full.lora_and_optimizer_gib
    everything = hardware.estimate_memory(config, flux_sizes, "bf16", True, "none", 57)
    assert everything.frozen_weights_gib < 2.0  # the embedders, the output layer and two blocks in flight


def test_auto_offloads_the_fewest_blocks_that_fit_a_12_gb_card(flux_sizes):
    config = parse_config({**BASE, "base_model": "x", "resolution": 1024, "memory_mode": "auto"})
    choice = memory.pick(config, "bf16", 11.5, flux_sizes)
    assert choice.fits and choice.gradient_checkpointing and choice.base_quantization == "fp8"
    assert choice.offload_blocks > 0
    assert choice.summary == (f"your GPU with 11.5 GiB free: fp8 base + checkpointing + {choice.offload_blocks} "
                              f"blocks offloaded, est. {choice.estimate.total_gib:.1f} GiB")
    fewer = hardware.estimate_memory(config, flux_sizes, "bf16", True, "fp8", choice.offload_blocks - 1)
    assert fewer.total_gib * hardware.FIT_MARGIN > 11.5  # the fewest that fit
    # offloading comes after every quantised mode without it, and before nf4
    order = memory.candidates(flux_sizes)
    first_offload = next(i for i, c in enumerate(order) if c[2])
    assert {c[0] for c in order[:first_offload]} <= {"none", "fp8", "int8"}
    assert all(c[0] == "nf4" for c in order[first_offload:] if not c[2])
    assert not any(c[2] for c in memory.candidates(flux_sizes, processes=2))  # offloading is for one GPU
    assert memory.pick(config, "bf16", 80.0, flux_sizes).offload_blocks == 0  # a big card: nothing traded


def test_a_unet_has_no_blocks_to_offload():
    source = models.resolve("builtin:sdxl-arch")
    assert models.model_sizes(source, models.inspect(source)).block_params == []


# ----------------------------------------------------------------------------------------------------
# the fields and their refusals


@pytest.mark.parametrize(("options", "fields"), [
    ({"gradient_checkpointing": "off"}, {"offload_blocks", "gradient_checkpointing"}),
    ({"memory_mode": "auto"}, {"memory_mode", "offload_blocks"}),
    ({"compile_unet": "on"}, {"offload_blocks", "compile_unet"}),
    ({"base_quantization": "nf4"}, {"offload_blocks", "base_quantization"}),
])
def test_what_offloading_cannot_go_with_is_refused_at_both_fields(options, fields):
    with pytest.raises(ConfigError) as caught:
        parse_config({**BASE, "base_model": "x", "offload_blocks": 4, **options})
    assert {f for f, _ in caught.value.problems} == fields


def test_the_unet_families_and_too_many_blocks_are_refused_at_the_field(tmp_path):
    sd = parse_config(tiny_config(SHAPES_DATASET, tmp_path / "sd", offload_blocks=2))
    problem = next(p for p in plan.plan_report(sd)["problems"] if p["field"] == "offload_blocks")
    assert "SD 1.x" in problem["message"] and "set it to 0" in problem["message"]
    too_many = tiny_config(SHAPES_DATASET, tmp_path / "flux", offload_blocks=50, resolution=64, bucketing=False)
    too_many["base_model"] = "builtin:tiny-flux"
    problem = next(p for p in plan.plan_report(parse_config(too_many))["problems"] if p["field"] == "offload_blocks")
    assert "3 transformer blocks" in problem["message"]
    with pytest.raises(UserError) as caught:
        memory.check_device(parse_config({**BASE, "base_model": "x", "offload_blocks": 2}), "cuda", processes=2)
    assert caught.value.field == "offload_blocks" and "one GPU" in str(caught.value)


def test_on_the_cpu_offloading_is_a_no_op_that_says_so(tmp_path):
    config = tiny_config(SHAPES_DATASET, tmp_path / "out", offload_blocks=2, resolution=64, bucketing=False)
    config["base_model"] = "builtin:tiny-flux"
    report = plan.plan_report(parse_config(config))
    assert report["ok"], report["problems"]
    assert "offload_blocks changes nothing here" in report["memory_mode"]["summary"]
    assert report["memory_mode"]["offload_blocks"] == report["memory_estimate"]["offload_blocks"] == 0
    assert plan.make_plan(parse_config(config)).offload_blocks == 0


# ----------------------------------------------------------------------------------------------------
# whole runs, with offloading forced on the CPU


def flow_run(tmp_path: Path, family: str, name: str, **options) -> dict:
    config = tiny_config(SHAPES_DATASET, tmp_path / name, **{
        "steps": 4, "resolution": 64, "bucketing": False, "batch_size": 2, "checkpoint_steps": 100,
        "validation_steps": 100, "lora_target": "attention_mlp", "gradient_checkpointing": "on", **options})
    config["base_model"] = f"builtin:{TINY[family]}"
    return config


@pytest.fixture
def offloading_on_the_cpu(monkeypatch):
    monkeypatch.setattr(memory, "OFFLOAD_DEVICES", frozenset({"cuda", "cpu"}))


@pytest.mark.e2e
@pytest.mark.parametrize("family", sorted(TINY))
def test_a_run_with_offloading_equals_one_without_and_resumes(tmp_path, family, offloading_on_the_cpu):
    plain, plain_events = run_job_here(parse_config(flow_run(tmp_path, family, "plain")))
    config = parse_config(flow_run(tmp_path, family, "offloaded", offload_blocks=2))
    offloaded, events = run_job_here(config)
    assert plain.type == offloaded.type == "complete"
    started = next(e for e in events if e.type == "started")
    assert started.offload_blocks == 2 and started.gradient_checkpointing
    losses = [[e.loss for e in run if e.type == "progress"] for run in (plain_events, events)]
    assert len(losses[0]) == 4 and losses[0] == pytest.approx(losses[1], rel=1e-6, abs=0)
    a, b = load_file(plain.final_path), load_file(offloaded.final_path)
    assert a.keys() == b.keys()  # the same file: offloading is not in it
    assert all(torch.allclose(a[key], b[key], rtol=1e-5, atol=1e-7) for key in a)
    # stopped after step 2 and resumed, with offloading: bit-identical to the straight offloaded run
    resumed = parse_config(flow_run(tmp_path, family, "resumed", offload_blocks=2))
    stopped, _ = run_job_here(resumed, stop_after_step=2)
    assert stopped.type == "interrupted"
    final, _ = run_job_here(resumed, resume=True)
    c = load_file(final.final_path)
    assert c.keys() == b.keys() and all(torch.equal(b[key], c[key]) for key in b)
