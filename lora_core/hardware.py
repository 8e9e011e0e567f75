"""The device: which one, which precision, how much memory a run needs, and what there is."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from lora_core.config import TrainConfig
from lora_core.families.base import ACTIVATION_BYTES_PER_UNIT
from lora_core.models import ModelSizes
from lora_core.offload import IN_FLIGHT
from lora_core.quantize import STORED_BYTES

GIB = 1024**3


@dataclass
class DeviceInfo:
    kind: str  # cuda | cpu
    name: str
    total_memory_gib: float | None
    free_memory_gib: float | None
    count: int
    torch_version: str

    def to_dict(self) -> dict:
        return asdict(self)


def pick_device(config: TrainConfig) -> torch.device:
    if config.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device is 'cuda' but PyTorch sees no CUDA GPU; set device to 'auto' or 'cpu', "
                           "or install a CUDA build of torch")
    if config.device == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")


def describe(device: torch.device) -> DeviceInfo:
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return DeviceInfo("cuda", torch.cuda.get_device_name(device), round(total / GIB, 2), round(free / GIB, 2),
                          torch.cuda.device_count(), torch.__version__)
    try:
        import psutil

        memory = psutil.virtual_memory()
        total, free = memory.total / GIB, memory.available / GIB
    except ImportError:
        total = free = None
    return DeviceInfo("cpu", "CPU", total and round(total, 2), free and round(free, 2), 1, torch.__version__)


def resolve_precision(config: TrainConfig, device: torch.device) -> str:
    """The accelerate mixed-precision mode: 'no', 'fp16' or 'bf16'."""
    if device.type == "cpu":
        if config.mixed_precision in ("fp16",):
            raise RuntimeError("mixed_precision 'fp16' needs a CUDA GPU; use 'no' or 'auto' on the CPU")
        return "bf16" if config.mixed_precision == "bf16" else "no"
    if config.mixed_precision != "auto":
        return config.mixed_precision
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def weight_dtype(precision: str) -> torch.dtype:
    """The dtype of the frozen base weights; the trained LoRA weights stay fp32."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision, torch.float32)


@dataclass
class MemoryEstimate:
    total_gib: float
    frozen_weights_gib: float
    lora_and_optimizer_gib: float
    activations_gib: float
    gradient_checkpointing: bool
    covers: str
    base_quantization: str = "none"
    offload_blocks: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


FIT_MARGIN = 1.1  # the estimate came out 1.5-8 % under the measured peaks on an H200 (bench/RESULTS.md)


def lora_parameter_count(config: TrainConfig, sizes: ModelSizes) -> tuple[int, int]:
    """The trained parameters (UNet, text encoders). LoHa holds two LoRA-sized pairs per layer; LoKr's Kronecker
    factors are smaller than a LoRA of the same rank, so its count here is an upper bound."""
    rank = config.lora_rank * (2 if config.network_type == "loha" else 1)
    unet = sizes.lora_params_per_rank[config.lora_target] * rank
    unet += sizes.lora_outputs[config.lora_target] if config.use_dora else 0
    text = 0
    if config.train_text_encoder:
        text = sizes.text_lora_params_per_rank * rank + (sizes.text_lora_outputs if config.use_dora else 0)
    return unet, text


# Bytes per trained parameter: fp32 weight + fp32 gradient + the optimizer's state (AdamW's two fp32 moments;
# bitsandbytes' 8-bit AdamW keeps them in one byte each; Adafactor and Prodigy counted as AdamW, an upper bound)
LORA_BYTES = {"adamw8bit": 4 + 4 + 2, "paged_adamw8bit": 4 + 4 + 2}
LORA_BYTES_DEFAULT = 4 + 4 + 8


def frozen_bytes(params: int, quantizable: dict[str, int], bytes_per: int, quantization: str) -> float:
    """`params` frozen weights at `bytes_per`, those `quantization` stores small at its size (quantize.py)."""
    if quantization == "none":
        return float(params * bytes_per)
    small = quantizable.get(quantization, 0)
    return (params - small) * bytes_per + small * STORED_BYTES[quantization]


def offloaded_bytes(sizes: ModelSizes, bytes_per: int, quantization: str, blocks: int) -> float:
    """What offloading the first `blocks` blocks takes off the device: their frozen weights as stored, less the
    IN_FLIGHT largest of them, which are on the device at once while the step runs (offload.py)."""
    stored = [frozen_bytes(params, quantizable, bytes_per, quantization)
              for params, quantizable in zip(sizes.block_params[:blocks], sizes.block_quantizable[:blocks],
                                             strict=True)]
    return sum(stored) - sum(sorted(stored, reverse=True)[:IN_FLIGHT])


def estimate_memory(config: TrainConfig, sizes: ModelSizes, precision: str, checkpointing: bool,
                    quantization: str = "none", offloaded: int = 0) -> MemoryEstimate:
    """Peak memory of the training step on the device: frozen weights kept there (the denoiser's, and a big frozen
    text encoder's, stored in `quantization` when not 'none'; less the `offloaded` blocks' but two in flight),
    LoRA weights with gradients and optimizer state, and UNet activations for one batch (fewer with
    `checkpointing`). It does not cover the sample-image pass, the allocator's cache beyond that, or (on the CPU)
    the Python process itself."""
    bytes_per = 4 if precision == "no" else 2
    text_on_device = config.train_text_encoder or config.shuffle_tags or any(  # captions encoded every step
        concept.shuffle_tags for concept in config.concepts)
    frozen = frozen_bytes(sizes.unet_params, sizes.unet_quantizable, bytes_per, quantization)
    if quantization == "fp8" and not checkpointing:
        # each layer's upcast copy is what its backward saved (a view of it), so without recomputation every
        # copy lives until the backward: fp8 storage saves nothing at the peak then, it adds
        frozen += sizes.unet_quantizable.get("fp8", 0) * bytes_per
    frozen -= offloaded_bytes(sizes, bytes_per, quantization, offloaded) if offloaded else 0
    frozen += sizes.vae_params * bytes_per if config.latent_cache == "off" else 0
    if text_on_device:
        frozen += frozen_bytes(sizes.text_params, sizes.text_quantizable, bytes_per, quantization)
    lora = sum(lora_parameter_count(config, sizes)) * LORA_BYTES.get(config.optimizer, LORA_BYTES_DEFAULT)
    latent = config.resolution // 8
    activations = (ACTIVATION_BYTES_PER_UNIT * config.batch_size * latent * latent * sizes.activation_units
                   * bytes_per / 2)
    if checkpointing:
        activations *= sizes.checkpointed_share
    if config.preservation_prompt is not None:  # the class prompt's pass keeps its own activations too
        activations *= 2
    return MemoryEstimate(round((frozen + lora + activations) / GIB, 3), round(frozen / GIB, 3),
                          round(lora / GIB, 3), round(activations / GIB, 3), checkpointing,
                          _covers(config, text_on_device, quantization, offloaded, sizes.denoiser_label),
                          quantization, offloaded)


def _covers(config: TrainConfig, text_on_device: bool, quantization: str, offloaded: int = 0,
            denoiser: str = "UNet") -> str:
    kept = [denoiser] + (["VAE"] if config.latent_cache == "off" else []) + (["text encoder"] if text_on_device else [])
    trained = f"{denoiser} and text-encoder" if config.train_text_encoder else denoiser
    stored = "" if quantization == "none" else f" ({quantization} where quantised)"
    stored += f" but {offloaded} offloaded blocks' (two of them in flight)" if offloaded else ""
    state = "8-bit AdamW state" if config.optimizer in LORA_BYTES else "AdamW state"
    return (f"frozen {', '.join(kept)} weights on the device{stored}, {trained} LoRA weights + gradients in fp32 + "
            f"{state}, {denoiser} activations for one batch; not " + ("the text encoders' activations (small), "
            if text_on_device else "the text encoders (used once to cache captions, then moved off), ")
            + "the sample-image pass, a quantised layer's transient upcast, or allocator slack")


def free_device_memory_gib(device: torch.device) -> float | None:
    """What a new job can use on a CUDA device: the driver's free memory plus what this process's allocator
    holds cached but unused. None on the CPU."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return round((free + cached) / GIB, 2)


def use_gradient_checkpointing(config: TrainConfig, precision: str, free_gib: float | None,
                               sizes: Callable[[], ModelSizes], quantization: str = "none") -> bool:
    """'on' and 'off' as given. 'auto': on when the step without it would not fit in `free_gib` (with
    FIT_MARGIN for the estimate's error); off where there is no device memory to fit in (the CPU)."""
    if config.gradient_checkpointing != "auto":
        return config.gradient_checkpointing == "on"
    if free_gib is None:
        return False
    return estimate_memory(config, sizes(), precision, False, quantization).total_gib * FIT_MARGIN > free_gib
