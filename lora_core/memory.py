"""What a run does to fit its device: the quantised base and checkpointing it uses (`memory_mode`), and the
refusals of low-memory settings the device or the installed libraries cannot honour, each at its field.

`memory_mode: auto` on a CUDA device with a known free memory tries the combinations fastest first and takes the
first whose estimate (hardware.estimate_memory, with FIT_MARGIN for its error) fits: keeping every weight in the
compute dtype beats storing it in fp8 (one cast per layer and step), which beats recomputing activations
(checkpointing costs about a third more compute), and int8 (dequantised per layer and step) comes next. For
FLUX.1 and SD 3.x it then tries an fp8, then an int8 base with checkpointing and the fewest offloaded blocks that
fit (`offload_blocks`: each one crosses the PCIe bus twice a step, but the math is unchanged); nf4, the lossiest,
comes last.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from lora_core import hardware, quantize
from lora_core.config import TrainConfig
from lora_core.errors import UserError
from lora_core.models import ModelSizes

# (base_quantization, gradient_checkpointing), fastest first
# fp8 only with checkpointing: without recomputation each layer's upcast copy lives until the backward
# (hardware.estimate_memory), so it would not save memory at the peak
CANDIDATES = (("none", False), ("none", True), ("fp8", True), ("int8", True), ("nf4", True))
OFFLOAD_MODES = ("fp8", "int8")  # then, with checkpointing, offloading blocks (nf4's Linear4bit is not offloaded)
LAST_RESORT = ("nf4",)  # after offloading (candidates)
OFFLOAD_DEVICES = frozenset({"cuda"})  # where offload_blocks applies: on the CPU the weights are in host memory
CUDA_ONLY_OPTIMIZERS = {"paged_adamw8bit": "paging moves the optimizer state to host memory when the GPU runs "
                                           "short, which means nothing on the CPU; use optimizer 'adamw8bit'",
                        "paged_lion8bit": "paging moves the optimizer state to host memory when the GPU runs "
                                          "short, which means nothing on the CPU; use optimizer 'lion8bit'"}


class QuantizationError(UserError):
    field = "base_quantization"


class LowMemoryOptimizerError(UserError):
    field = "optimizer"


class OffloadError(UserError):
    field = "offload_blocks"


def check_device(config: TrainConfig, device_type: str, processes: int = 1) -> None:
    """Refuse, at its field with the reason, a base_quantization or optimizer this device or install cannot run."""
    if (reason := quantize.unavailable_reason(config.base_quantization, device_type)) is not None:
        raise QuantizationError(reason)
    if config.base_quantization != "none" and processes > 1:
        # DDP broadcasts every parameter at the start, float8 and torchao / bitsandbytes tensors included; not
        # tested on several GPUs, so not offered there
        raise QuantizationError(f"base_quantization {config.base_quantization!r} is for one GPU; with "
                                f"{processes} processes set it to 'none'")
    if config.offload_blocks and processes > 1:
        # DDP broadcasts and buckets every parameter; the offloaded ones are placeholders between uses
        raise OffloadError(f"offload_blocks is for one GPU; with {processes} processes set it to 0")
    if config.optimizer in CUDA_ONLY_OPTIMIZERS and device_type != "cuda":
        raise LowMemoryOptimizerError(f"optimizer {config.optimizer!r} needs a CUDA GPU: "
                                      f"{CUDA_ONLY_OPTIMIZERS[config.optimizer]}")


@dataclass
class MemoryChoice:
    base_quantization: str
    gradient_checkpointing: bool
    estimate: hardware.MemoryEstimate
    summary: str  # for people: what was chosen and why ('' when memory_mode is off)
    fits: bool | None = None  # memory_mode auto on CUDA: whether the chosen combination's estimate fits
    offload_blocks: int = 0  # blocks kept on the CPU during the step (0 on the CPU, where it changes nothing)

    def to_dict(self) -> dict:
        return {**asdict(self), "estimate": self.estimate.to_dict()}


def describe(quantization: str, checkpointing: bool, offloaded: int = 0) -> str:
    parts = ([] if quantization == "none" else [f"{quantization} base"]) + (["checkpointing"] if checkpointing else [])
    parts += [f"{offloaded} block{'s' if offloaded != 1 else ''} offloaded"] if offloaded else []
    return " + ".join(parts) or "full-precision base, no checkpointing"


def choose(config: TrainConfig, precision: str, device: torch.device, free_gib: float | None,
           sizes: Callable[[], ModelSizes], processes: int = 1) -> MemoryChoice:
    """The base storage and checkpointing the run uses, with its estimate. memory_mode 'off': the fields as
    given (checkpointing 'auto' decided by the estimate); 'auto': picked for `free_gib` on CUDA."""
    blocks = len(sizes().block_params) if config.offload_blocks else 0
    if config.offload_blocks > blocks:  # the family allows it (check_config), the model is too short
        raise OffloadError(f"offload_blocks {config.offload_blocks} is more than this model's {blocks} "
                           f"transformer blocks; use at most {blocks}")
    if config.memory_mode == "off" or device.type != "cuda" or free_gib is None:
        quantization = config.base_quantization
        offloaded = config.offload_blocks if device.type in OFFLOAD_DEVICES else 0
        # offloading needs checkpointing (the config refuses 'off'): 'auto' turns it on
        checkpointing = bool(offloaded) or hardware.use_gradient_checkpointing(config, precision, free_gib, sizes,
                                                                                quantization)
        summary = "" if config.memory_mode == "off" else (
            "memory_mode 'auto' changes nothing here: there is no GPU memory to fit (the CPU trains with the "
            "full-precision base and no checkpointing)")
        if config.offload_blocks and not offloaded:
            summary = ("offload_blocks changes nothing here: on the CPU the weights are already in host memory. "
                       + summary).strip()
        return MemoryChoice(quantization, checkpointing, hardware.estimate_memory(
            config, sizes(), precision, checkpointing, quantization, offloaded), summary, offload_blocks=offloaded)
    return pick(config, precision, free_gib, sizes(), processes)


def candidates(sizes: ModelSizes, processes: int = 1) -> list[tuple[str, bool, int]]:
    """What memory_mode auto may choose, fastest first, as (base_quantization, checkpointing, offloaded blocks):
    CANDIDATES this install can run, then (one GPU, a family with blocks to offload) an fp8 or int8 base with
    checkpointing and 1, 2, ... blocks offloaded, and nf4 last: offloading costs time but nothing in quality,
    while nf4 is the lossiest storage."""
    usable = [(mode, ckpt, 0) for mode, ckpt in CANDIDATES if quantize.unavailable_reason(mode, "cuda") is None
              and (mode == "none" or processes == 1)]  # a quantised base is for one GPU (check_device)
    offloading = [(mode, True, blocks) for mode in OFFLOAD_MODES if processes == 1  # offloading is for one GPU too
                  and quantize.unavailable_reason(mode, "cuda") is None
                  for blocks in range(1, len(sizes.block_params) + 1)]  # the fewest first: each costs transfers
    return ([c for c in usable if c[0] not in LAST_RESORT] + offloading
            + [c for c in usable if c[0] in LAST_RESORT])


def pick(config: TrainConfig, precision: str, free_gib: float, sizes: ModelSizes,
         processes: int = 1) -> MemoryChoice:
    """The first of `candidates` whose estimate x FIT_MARGIN fits `free_gib`; when none does, the smallest,
    marked as not fitting."""
    tried = []
    for mode, checkpointing, blocks in candidates(sizes, processes):
        estimate = hardware.estimate_memory(config, sizes, precision, checkpointing, mode, blocks)
        if estimate.total_gib * hardware.FIT_MARGIN <= free_gib:
            return _chosen(free_gib, mode, checkpointing, blocks, estimate)
        tried.append((estimate, mode, checkpointing, blocks))
    estimate, mode, checkpointing, blocks = min(tried, key=lambda t: t[0].total_gib)
    return MemoryChoice(mode, checkpointing, estimate, f"your GPU with {free_gib:g} GiB free: nothing fits; the "
                        f"smallest is {describe(mode, checkpointing, blocks)}, est. {estimate.total_gib:.1f} GiB: "
                        "lower batch_size or resolution", fits=False, offload_blocks=blocks)


def _chosen(free_gib: float, mode: str, checkpointing: bool, blocks: int,
            estimate: hardware.MemoryEstimate) -> MemoryChoice:
    return MemoryChoice(mode, checkpointing, estimate, f"your GPU with {free_gib:g} GiB free: "
                        f"{describe(mode, checkpointing, blocks)}, est. {estimate.total_gib:.1f} GiB", fits=True,
                        offload_blocks=blocks)
