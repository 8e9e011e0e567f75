"""What a run does to fit its device: the quantised base and checkpointing it uses (`memory_mode`), and the
refusals of low-memory settings the device or the installed libraries cannot honour, each at its field.

`memory_mode: auto` on a CUDA device with a known free memory tries the combinations fastest first and takes the
first whose estimate (hardware.estimate_memory, with FIT_MARGIN for its error) fits: keeping every weight in the
compute dtype beats storing it in fp8 (one cast per layer and step), which beats recomputing activations
(checkpointing costs about a third more compute), and int8 / nf4 (dequantised per layer and step) come last.
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
CANDIDATES = (("none", False), ("fp8", False), ("none", True), ("fp8", True), ("int8", True), ("nf4", True))
CUDA_ONLY_OPTIMIZERS = {"paged_adamw8bit": "paging moves the optimizer state to host memory when the GPU runs "
                                           "short, which means nothing on the CPU; use optimizer 'adamw8bit'"}


class QuantizationError(UserError):
    field = "base_quantization"


class LowMemoryOptimizerError(UserError):
    field = "optimizer"


def check_device(config: TrainConfig, device_type: str, processes: int = 1) -> None:
    """Refuse, at its field with the reason, a base_quantization or optimizer this device or install cannot run."""
    if (reason := quantize.unavailable_reason(config.base_quantization, device_type)) is not None:
        raise QuantizationError(reason)
    if config.base_quantization != "none" and processes > 1:
        # DDP broadcasts every parameter at the start, float8 and torchao / bitsandbytes tensors included; not
        # tested on several GPUs, so not offered there
        raise QuantizationError(f"base_quantization {config.base_quantization!r} is for one GPU; with "
                                f"{processes} processes set it to 'none'")
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

    def to_dict(self) -> dict:
        return {**asdict(self), "estimate": self.estimate.to_dict()}


def describe(quantization: str, checkpointing: bool) -> str:
    parts = ([] if quantization == "none" else [f"{quantization} base"]) + (["checkpointing"] if checkpointing else [])
    return " + ".join(parts) or "full-precision base, no checkpointing"


def choose(config: TrainConfig, precision: str, device: torch.device, free_gib: float | None,
           sizes: Callable[[], ModelSizes], processes: int = 1) -> MemoryChoice:
    """The base storage and checkpointing the run uses, with its estimate. memory_mode 'off': the fields as
    given (checkpointing 'auto' decided by the estimate); 'auto': picked for `free_gib` on CUDA."""
    if config.memory_mode == "off" or device.type != "cuda" or free_gib is None:
        quantization = config.base_quantization
        checkpointing = hardware.use_gradient_checkpointing(config, precision, free_gib, sizes, quantization)
        summary = "" if config.memory_mode == "off" else (
            "memory_mode 'auto' changes nothing here: there is no GPU memory to fit (the CPU trains with the "
            "full-precision base and no checkpointing)")
        return MemoryChoice(quantization, checkpointing,
                            hardware.estimate_memory(config, sizes(), precision, checkpointing, quantization), summary)
    return pick(config, precision, free_gib, sizes(), processes)


def pick(config: TrainConfig, precision: str, free_gib: float, sizes: ModelSizes,
         processes: int = 1) -> MemoryChoice:
    """The fastest candidate this install can run whose estimate x FIT_MARGIN fits `free_gib`; when none does, the
    smallest, marked as not fitting."""
    usable = [(mode, ckpt) for mode, ckpt in CANDIDATES if quantize.unavailable_reason(mode, "cuda") is None
              and (mode == "none" or processes == 1)]  # a quantised base is for one GPU (check_device)
    estimate = None
    for mode, checkpointing in usable:
        estimate = hardware.estimate_memory(config, sizes, precision, checkpointing, mode)
        if estimate.total_gib * hardware.FIT_MARGIN <= free_gib:
            return MemoryChoice(mode, checkpointing, estimate, f"your GPU with {free_gib:g} GiB free: "
                                f"{describe(mode, checkpointing)}, est. {estimate.total_gib:.1f} GiB", fits=True)
    mode, checkpointing = usable[-1]
    assert estimate is not None  # CANDIDATES' first needs no library
    return MemoryChoice(mode, checkpointing, estimate, f"your GPU with {free_gib:g} GiB free: nothing fits; the "
                        f"smallest is {describe(mode, checkpointing)}, est. {estimate.total_gib:.1f} GiB: lower "
                        "batch_size or resolution", fits=False)
