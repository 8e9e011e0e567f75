"""A quantised frozen base (`base_quantization`): the denoiser's weights (and a big frozen text encoder's) stored
in fewer bits, through the libraries that do it, while the LoRA's weights, gradients and optimizer state stay fp32.

- fp8: diffusers' layerwise casting: weights stored as float8_e4m3fn, each layer upcast to the compute dtype for
  its forward. Applied after the adapter, which diffusers skips (peft's layers stay fp32). CPU and CUDA.
- int8: torchao's int8 weight-only linears (`Int8WeightOnlyConfig`); peft attaches its TorchaoLoraLinear on top.
  CPU and CUDA.
- nf4: bitsandbytes' Linear4bit (QLoRA's NormalFloat4); peft attaches its bnb 4-bit LoRA on top. The studio
  allows it on CUDA only: bitsandbytes' CPU 4-bit path is a slow pure-PyTorch fallback it does not train on.

The exported LoRA holds only the adapter's tensors, so it is the same file a full-precision run writes; it is
used on the ordinary base.
"""

from __future__ import annotations

import importlib.util
import re
import warnings
from collections.abc import Callable

import torch

MODES = ("fp8", "int8", "nf4")
# Bytes each quantised weight takes, with its scales: int8 one fp32 scale per output row (counted as 1.0: rows
# are thousands of weights wide); nf4 half a byte plus one fp32 absmax per 64-weight block.
STORED_BYTES = {"fp8": 1.0, "int8": 1.0, "nf4": 0.5 + 4 / 64}
LIBRARIES = {"int8": "torchao", "nf4": "bitsandbytes"}
CUDA_ONLY = {"nf4": "bitsandbytes' 4-bit kernels are CUDA ones (its CPU path is a slow pure-PyTorch fallback the "
                    "studio does not train on)"}
ADAPTER_LAYER_MARKS = ("lora_", "hada_", "lokr_")  # peft's adapter module names: never quantised


def unavailable_reason(mode: str, device_type: str) -> str | None:
    """Why `mode` cannot run here (a CUDA-only mode on the CPU, a library not installed), else None."""
    if mode == "none":
        return None
    if mode in CUDA_ONLY and device_type != "cuda":
        return (f"base_quantization {mode!r} needs a CUDA GPU: {CUDA_ONLY[mode]}; on the CPU use 'fp8' or "
                "'int8', or 'none'")
    library = LIBRARIES.get(mode)
    if library is not None and importlib.util.find_spec(library) is None:
        return f"base_quantization {mode!r} needs the {library} package: pip install {library}; or use 'fp8'"
    return None


# Convolutions stay in the compute dtype under fp8: a convolution's backward reads the weight tensor it saved,
# which layerwise casting has cast back to float8 by then ("expected scalar type Float but found
# Float8_e4m3fn"); a linear's saves a transposed view of the upcast copy and is unaffected.
FP8_KEEPS = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)


def quantizable(module: torch.nn.Module, mode: str, within: str = "") -> int:
    """The parameters `mode` stores in fewer bits: the linear weights (int8, nf4); for fp8 the weights and biases
    of the linears diffusers' layerwise casting reaches (not the convolutions: FP8_KEEPS), which skips norms
    (FLUX's AdaLayerNorm linears, about a quarter of its weights), embeddings and the model's own skip list.
    `within`: only those under that submodule path (a block), judged as in the whole model."""
    inside = (lambda name: name.startswith(within + ".")) if within else (lambda name: True)
    if mode != "fp8":
        return sum(layer.weight.numel() for name, layer in module.named_modules()
                   if isinstance(layer, torch.nn.Linear) and not _is_adapter(name) and inside(name))
    from diffusers.hooks._common import _GO_LC_SUPPORTED_PYTORCH_LAYERS

    skips = _fp8_skip_patterns(module)
    reached = {id(p): p.numel() for name, layer in module.named_modules()
               if isinstance(layer, _GO_LC_SUPPORTED_PYTORCH_LAYERS) and not isinstance(layer, FP8_KEEPS)
               and not _skipped(name, skips) and inside(name)
               for p in layer.parameters(recurse=False)}  # by identity: a tied weight is stored once
    return sum(reached.values())


def _skipped(name: str, patterns: tuple[str, ...]) -> bool:
    """As diffusers' layerwise casting decides: a pattern searched in the module's path and in each of its
    parents' (a skipped parent skips its subtree)."""
    parts = name.split(".")
    return any(re.search(pattern, ".".join(parts[:end])) for end in range(1, len(parts) + 1) for pattern in patterns)


def _fp8_skip_patterns(module: torch.nn.Module) -> tuple[str, ...]:
    from diffusers.hooks.layerwise_casting import DEFAULT_SKIP_MODULES_PATTERN

    own = (getattr(module, "_skip_layerwise_casting_patterns", None) or ())
    keep = (getattr(module, "_keep_in_fp32_modules", None) or ())
    return (*DEFAULT_SKIP_MODULES_PATTERN, *own, *keep, *ADAPTER_LAYER_MARKS)


def _is_adapter(name: str) -> bool:
    return any(mark in name for mark in ADAPTER_LAYER_MARKS)


def with_adapter(module: torch.nn.Module, mode: str, device: torch.device, dtype: torch.dtype,
                 add_adapter: Callable[[], list[torch.nn.Parameter]],
                 before_move: Callable[[], object] | None = None) -> list[torch.nn.Parameter]:
    """The frozen `module` quantised in `mode` ('none': not quantised) with its adapter (`add_adapter`, which
    returns the fp32 LoRA), then moved to `device`. It is quantised on the CPU where it loaded, so the
    full-precision weights never reach the device (a 12 GB card could not hold FLUX's in bf16). int8 and nf4 come
    first so that peft attaches its layer for that backend; fp8 comes after, as diffusers' layerwise casting
    skips peft's layers. `before_move` runs last on the CPU (block offloading takes its weights there)."""
    module.to(dtype=dtype)
    if mode in ("int8", "nf4"):
        quantize(module, mode, dtype)
    with warnings.catch_warnings():
        # peft's TorchaoLoraLinear warns that merge() will not work; the studio never merges into the base
        warnings.filterwarnings("ignore", message=".*TorchaoLoraLinear was instantiated without")
        params = add_adapter()
    if mode == "fp8":
        quantize(module, mode, dtype)
    if before_move is not None:
        before_move()
    module.to(device)
    return params


def quantize(module: torch.nn.Module, mode: str, compute_dtype: torch.dtype) -> None:
    """Store `module`'s frozen weights (not an adapter's) in `mode`, computing in `compute_dtype`."""
    if mode == "fp8":
        _fp8(module, compute_dtype)
    elif mode == "int8":
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        quantize_(module, Int8WeightOnlyConfig(),
                  filter_fn=lambda layer, name: isinstance(layer, torch.nn.Linear) and not _is_adapter(name))
    elif mode == "nf4":
        _nf4(module, compute_dtype)
    else:
        raise ValueError(f"unknown base_quantization {mode!r}")


def _fp8(module: torch.nn.Module, compute_dtype: torch.dtype) -> None:
    enable = getattr(module, "enable_layerwise_casting", None)
    if enable is not None:  # a diffusers model: its own skip list (norms, patch embedding) and peft's layers
        enable(storage_dtype=torch.float8_e4m3fn, compute_dtype=compute_dtype, skip_modules_classes=FP8_KEEPS)
        return
    from diffusers.hooks import apply_layerwise_casting

    # a transformers text encoder (T5): the same default skips, and the modules it keeps in fp32 (T5's `wo`, whose
    # forward casts its input to the weight's dtype, which would be float8)
    apply_layerwise_casting(module, storage_dtype=torch.float8_e4m3fn, compute_dtype=compute_dtype,
                            skip_modules_pattern=_fp8_skip_patterns(module), skip_modules_classes=FP8_KEEPS)
    # transformers' `dtype` reads the parameters (float8 now), and pipelines cast the encoder's output to it; a
    # diffusers model reports the compute dtype itself. The instance's class gets that property (it is frozen and
    # never saved, so nothing else sees the subclass).
    kind = type(module)
    module.__class__ = type(kind.__name__, (kind,), {"dtype": property(lambda self: compute_dtype)})


def _nf4(module: torch.nn.Module, compute_dtype: torch.dtype) -> None:
    """Each linear (but an adapter's) becomes bitsandbytes' Linear4bit; it quantises when moved to the GPU."""
    import bitsandbytes

    for name, layer in list(module.named_modules()):
        if not isinstance(layer, torch.nn.Linear) or _is_adapter(name):
            continue
        replacement = bitsandbytes.nn.Linear4bit(layer.in_features, layer.out_features, bias=layer.bias is not None,
                                                 compute_dtype=compute_dtype, quant_type="nf4",
                                                 device=layer.weight.device)
        replacement.weight = bitsandbytes.nn.Params4bit(layer.weight.data, requires_grad=False, quant_type="nf4")
        if layer.bias is not None:
            replacement.bias = torch.nn.Parameter(layer.bias.data, requires_grad=False)
        parent_name, _, child = name.rpartition(".")
        setattr(module.get_submodule(parent_name) if parent_name else module, child, replacement)
