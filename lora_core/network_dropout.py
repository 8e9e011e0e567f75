"""sd-scripts' three LoRA dropouts (networks/lora.py's LoRAModule.forward) on peft's adapters, in training only.

On the down (A) matrix's output `lx`, each training forward of a LoRA module:
- `module_dropout` p: with probability p the module adds nothing this forward (one CPU draw per module, as
  sd-scripts' `torch.rand(1)`);
- `network_dropout` p (sd-scripts' neuron dropout): `dropout(lx, p)`, each rank-space value dropped and the
  rest scaled by 1 / (1 - p);
- `rank_dropout` p: each sample's ranks dropped (one mask per sample over the rank axis, shared by its tokens
  or pixels) and the rest scaled by 1 / (1 - p), as if the rank were smaller.

They are forward hooks on each adapter's `lora_A` module, which peft calls as `lora_B(lora_A(dropout(x)))`:
they act only while the module is in training mode (samples, the validation loss and the exported weights never
see them). One difference from sd-scripts, on purpose: a dropped module's output is zeroed rather than skipped,
so its up matrix still takes part in the graph (a zero gradient): under several processes DDP needs every
parameter in every step's graph. peft's own `lora_dropout` (on the input x) is a different, older option.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

HOOK_ATTRIBUTE = "_studio_dropout_hook"  # set on each hooked module, so that adding an adapter twice hooks once


class RankSpaceDropout:
    def __init__(self, network: float, rank: float, module: float):
        self.network, self.rank, self.module = network, rank, module

    def __call__(self, lora_a: torch.nn.Module, args: Any, lx: torch.Tensor) -> torch.Tensor | None:
        if not lora_a.training:
            return None
        if self.module and torch.rand(1).item() < self.module:
            return lx * 0  # nothing added this forward (see the module's docstring for why not skipped)
        if self.network:
            lx = F.dropout(lx, p=self.network)
        if self.rank:
            lx = lx * rank_mask(lx, self.rank, isinstance(lora_a, torch.nn.Conv2d)) / (1 - self.rank)
        return lx


def rank_mask(lx: torch.Tensor, p: float, channels_first: bool) -> torch.Tensor:
    """Keep (1) or drop (0) each rank of each sample, shaped to broadcast over `lx`: (B, R, 1, 1) for a
    convolution's output, (B, 1, R) for a linear layer's over tokens, (B, R) for one vector per sample."""
    rank = lx.shape[1] if channels_first else lx.shape[-1]
    mask = (torch.rand((lx.shape[0], rank), device=lx.device) > p).to(lx.dtype)
    if channels_first:
        return mask.view(*mask.shape, *[1] * (lx.ndim - 2))
    return mask.view(mask.shape[0], *[1] * (lx.ndim - 2), rank)


def install(model: torch.nn.Module, config: Any) -> int:
    """Hook every `lora_A` module of `model`'s adapters when a dropout is set; returns how many were hooked."""
    network, rank, module = (getattr(config, name, 0.0) for name in ("network_dropout", "rank_dropout",
                                                                     "module_dropout"))
    if not (network or rank or module):
        return 0
    hook = RankSpaceDropout(network, rank, module)
    count = 0
    for name, child in model.named_modules():
        if name.rsplit(".", 2)[-2:-1] == ["lora_A"] and not hasattr(child, HOOK_ATTRIBUTE):
            setattr(child, HOOK_ATTRIBUTE, child.register_forward_hook(hook))
            count += 1
    return count
