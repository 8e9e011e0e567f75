"""Compiling the UNet for the fit loop: whether (`compile_unet` auto / on / off), how (regional or whole-model),
and whether with CUDA graphs (`cuda_graphs`).

Regional compilation (diffusers' `compile_repeated_blocks`) compiles only the blocks a model declares as repeated
(`_repeated_blocks`: `BasicTransformerBlock` for the SD UNets); blocks of the same shape share one compiled graph,
so the first compile is a fraction of the whole model's at about the same step time (bench/RESULTS.md). A model
that declares no repeated blocks is compiled whole.

The compiled blocks are used by the training forward only: samples and export run the same modules eagerly.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Hashable
from dataclasses import dataclass

import torch

from lora_core.config import TrainConfig

# --- the figures "auto" decides by (bench/RESULTS.md, "Regional compilation") ---
# First compile of the UNet's repeated blocks with a cold inductor cache, seconds. CPU: small-sd, 128², batch 4,
# one thread: 74 s on the 2-core benchmark VM when it was quiet (load 1), 488 s under load 7 (bench/RESULTS.md
# rows 18 and 21); 120 s leaves room for a busier machine without waiting for the loaded figure. CUDA: not
# measured yet (bench/gpu_check.sh will); a guess.
COMPILE_S = {"cpu": 120.0, "cuda": 60.0}
# Fraction of the eager step time that compiling saves. CPU: 14 % measured for whole-model compile (7
# interleaved runs), regional about the same or better (bench/RESULTS.md), taken as 12 %. CUDA: a guess until
# the GPU check measures it.
STEP_SAVING = {"cpu": 0.12, "cuda": 0.10}
# Eager training-step FLOP rate, TFLOP/s, to turn a step's FLOPs into seconds. CPU: small-sd on the benchmark
# machine (7 GFLOP per batch-4 step in ~0.2 s). CUDA: the H200's batch-16 figure (158), the fastest measured, so
# that the step time and what compiling saves come out low rather than high.
EAGER_TFLOPS = {"cpu": 0.036, "cuda": 158.0}
# Training FLOPs per UNet parameter per latent pixel per image: SD 1.5 at 512² is 1.725 TFLOP per image
# (bench/flops.py) for 859.5 M parameters on 64 x 64 latent pixels.
FLOP_PER_PARAM_PIXEL = 1.725e12 / (859.5e6 * 64 * 64)
WIN_MARGIN = 2.0  # compile only when the run saves at least twice the compile time: the figures are rough
MAX_GRAPH_SHAPES = 4  # CUDA graphs: at most this many batch shapes (each is captured on its own)


@dataclass(frozen=True)
class CompileDecision:
    """What `compile_unet` and `cuda_graphs` come to for one run, and why (the `started` event carries it)."""

    compile: bool
    cuda_graphs: bool
    reason: str


def estimated_step_s(config: TrainConfig, device_type: str, unet_params: int) -> float:
    """Seconds of one eager optimizer step, from the UNet's FLOPs at the run's size and a device FLOP rate."""
    latent_pixels = (config.resolution // 8) ** 2
    flop = FLOP_PER_PARAM_PIXEL * unet_params * latent_pixels * config.batch_size
    return flop * config.gradient_accumulation_steps / (EAGER_TFLOPS[device_type] * 1e12)


def batch_shapes(buckets_of_images: list[Hashable], batch_size: int, repeats: int = 1,
                 num_processes: int = 1) -> set[tuple[Hashable, int]]:
    """The (bucket, per-process batch size) pairs the fit loop will see: each bucket's full batches and its short
    last one (buckets.global_batches cuts them so)."""
    shapes = set()
    global_batch = batch_size * num_processes
    for bucket, count in Counter(buckets_of_images).items():
        total = count * repeats
        if total >= global_batch:
            shapes.add((bucket, batch_size))
        if short := total % global_batch:
            shapes.add((bucket, max(1, math.ceil(short / num_processes))))
    return shapes


def decide(config: TrainConfig, device_type: str, total_steps: int, unet_params: Callable[[], int],
           shapes: int = 1, num_processes: int = 1) -> CompileDecision:
    """`compile_unet` 'on' / 'off' as given; 'auto': on when the run's estimated saving (steps x estimated eager
    step x STEP_SAVING) is at least WIN_MARGIN x the compile time (once per batch shape, at most twice: after a
    second shape torch compiles for dynamic shapes). `cuda_graphs` asks for compiling; it falls back (with the
    reason) where graphs cannot apply at run time."""
    graphs, graph_note = _cuda_graphs(config, device_type, shapes, num_processes)
    if config.compile_unet == "off":
        return CompileDecision(False, False, "compile_unet is off")
    if config.compile_unet == "on" or config.cuda_graphs:
        why = "compile_unet is on" if config.compile_unet == "on" else "cuda_graphs asks for it"
        return CompileDecision(True, graphs, why + graph_note)
    compile_s = COMPILE_S[device_type] * min(shapes, 2)
    saving = total_steps * estimated_step_s(config, device_type, unet_params()) * STEP_SAVING[device_type]
    wins = saving >= WIN_MARGIN * compile_s
    verdict = "the run is long enough to win it back" if wins else "too short a run to win it back"
    return CompileDecision(wins, False, f"auto: compiling takes about {compile_s:.0f} s and would save about "
                                        f"{saving:.0f} s over {total_steps} steps, {verdict}")


def _cuda_graphs(config: TrainConfig, device_type: str, shapes: int, num_processes: int) -> tuple[bool, str]:
    """(apply, note): the config has already refused what it can see (cpu, text encoder, compile off)."""
    if not config.cuda_graphs:
        return False, ""
    reasons = []
    if device_type != "cuda":
        reasons.append("there is no CUDA device")
    if shapes > MAX_GRAPH_SHAPES:
        reasons.append(f"the batches come in {shapes} shapes (buckets and short last batches; at most "
                       f"{MAX_GRAPH_SHAPES}: set bucketing off or make the image count a multiple of batch_size)")
    if config.gradient_accumulation_steps > 1:
        reasons.append("gradient_accumulation_steps > 1 keeps gradients across captured steps")
    if num_processes > 1:
        reasons.append("several processes (DDP's gradient hooks) are not captured")
    if reasons:
        return False, "; cuda_graphs falls back to plain compile: " + ", ".join(reasons)
    return True, "; with CUDA graphs"


# ----------------------------------------------------------------------------------------------------
# compiling


class CompiledUNet:
    """The fit loop's forward: the UNet (or its prepared wrapper) with its repeated blocks compiled, or the
    whole model compiled, or (`scope` 'off') the module itself. Call it like the module."""

    def __init__(self, model: torch.nn.Module, decision: CompileDecision, scope: str = "auto"):
        """`scope` 'auto': regional where the model declares repeated blocks, else whole; 'whole' or 'regional'
        to force one (the benchmark compares them)."""
        self.model = model
        self.reason = decision.reason
        self.cuda_graphs = decision.compile and decision.cuda_graphs
        self._regions: list[tuple[torch.nn.Module, Callable]] = []
        self._forward: Callable = model
        if not decision.compile:
            self.scope = "off"
            return
        options = {"mode": "reduce-overhead"} if self.cuda_graphs else {}
        blocks = repeated_blocks(model) if scope != "whole" else []
        if scope == "regional" and not blocks:
            raise ValueError(f"{type(getattr(model, 'module', model)).__name__} declares no repeated blocks to "
                             "compile regionally")
        if blocks:
            for block in blocks:
                block.compile(**options)  # what ModelMixin.compile_repeated_blocks does, one block at a time
                self._regions.append((block, block._compiled_call_impl))
            self.scope = "regional"
            self._set_regions(enabled=False)  # samples and export see the eager modules
        else:
            self.scope = "whole"
            self._forward = torch.compile(model, **options)

    def __call__(self, *args, **kwargs):
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's graph outputs are no longer read
        if not self._regions:
            return self._forward(*args, **kwargs)
        self._set_regions(enabled=True)
        try:
            return self.model(*args, **kwargs)
        finally:
            self._set_regions(enabled=False)

    def _set_regions(self, enabled: bool) -> None:
        for block, compiled in self._regions:
            block._compiled_call_impl = compiled if enabled else None


def repeated_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The submodules whose class the model (or the model inside a wrapper such as DDP) declares repeated."""
    inner = getattr(model, "module", model)
    names = set(getattr(inner, "_repeated_blocks", None) or ())
    return [module for module in inner.modules() if type(module).__name__ in names]


def compile_unet(model: torch.nn.Module, decision: CompileDecision, scope: str = "auto") -> CompiledUNet:
    """The forward for `model` (the UNet, or the wrapper accelerate made of it), compiled as decided."""
    return CompiledUNet(model, decision, scope)


def compile_for_run(model: torch.nn.Module, config: TrainConfig, total_steps: int,
                    buckets_of_images: list[Hashable], accelerator) -> CompiledUNet:
    """The fit loop's hook: decide for this run (its device, length and batch shapes), then compile."""
    shapes = batch_shapes(buckets_of_images, config.batch_size, config.repeats, accelerator.num_processes)
    decision = decide(config, accelerator.device.type, total_steps,
                      lambda: sum(p.numel() for p in model.parameters()), len(shapes), accelerator.num_processes)
    return compile_unet(model, decision)
