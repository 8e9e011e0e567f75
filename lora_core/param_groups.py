"""The optimizer's parameter groups: the denoiser's LoRA at learning_rate, the text encoders' at text_encoder_lr,
and with LoRA+ (`loraplus_lr_ratio`, Hayou et al. 2024) each split in two: the down (A) matrices at the rate,
the up (B) ones at ratio times it, as sd-scripts' `networks/lora.py` groups them (its `lora_up` is peft's
`lora_B`). Block-wise rates (`down_lr_weight`, ...: blocks.py) split the denoiser's by block weight too. A
group's learning rate follows the schedule like any other (the scheduler scales each group's)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from lora_core import blocks
from lora_core.config import TrainConfig

UP_MATRIX = "lora_B"  # peft's name of the up matrix (`<module>.lora_B.<adapter>.weight`)


def up_matrices(modules: list[torch.nn.Module]) -> set[int]:
    """The ids of the LoRA up matrices among the modules' parameters."""
    return {id(param) for module in modules for name, param in module.named_parameters()
            if UP_MATRIX in name.split(".")}


def optimizer_groups(config: TrainConfig, params: list, text_params: list, modules: list[torch.nn.Module],
                     namer: Callable[[str], str] | None = None) -> list[dict]:
    """[{"params", "lr"}, ...]: one group per network, block weight and matrix kind, in the order denoiser (its
    blocks by weight, as block-wise rates give them: blocks.py, with `namer` the family's kohya names), then
    text encoders."""
    up = up_matrices(modules) if config.loraplus_lr_ratio != 1 else set()
    weights = {}
    if namer is not None and modules:
        trained = {id(p) for p in params}
        named = [(name, p) for name, p in modules[0].named_parameters() if id(p) in trained]
        weights = blocks.param_block_weights(named, namer, config)
    groups = []
    for members, lr in ((params, config.learning_rate), (text_params, config.text_encoder_lr)):
        by_rate: dict[tuple[float, bool], list] = {}
        for param in members:
            by_rate.setdefault((weights.get(id(param), 1.0), id(param) in up), []).append(param)
        for (weight, is_up), group in sorted(by_rate.items(), key=lambda item: (-item[0][0], item[0][1])):
            groups.append({"params": group, "lr": lr * weight * (config.loraplus_lr_ratio if is_up else 1)})
    return groups
