"""The optimizer's parameter groups: the denoiser's LoRA at learning_rate, the text encoders' at text_encoder_lr,
and with LoRA+ (`loraplus_lr_ratio`, Hayou et al. 2024) each split in two: the down (A) matrices at the rate,
the up (B) ones at ratio times it, as sd-scripts' `networks/lora.py` groups them (its `lora_up` is peft's
`lora_B`). A group's learning rate follows the schedule like any other (the scheduler scales each group's)."""

from __future__ import annotations

import torch

from lora_core.config import TrainConfig

UP_MATRIX = "lora_B"  # peft's name of the up matrix (`<module>.lora_B.<adapter>.weight`)


def up_matrices(modules: list[torch.nn.Module]) -> set[int]:
    """The ids of the LoRA up matrices among the modules' parameters."""
    return {id(param) for module in modules for name, param in module.named_parameters()
            if UP_MATRIX in name.split(".")}


def optimizer_groups(config: TrainConfig, params: list, text_params: list,
                     modules: list[torch.nn.Module]) -> list[dict]:
    """[{"params", "lr"}, ...]: one group per network and rate, in the order denoiser, text encoders."""
    up = up_matrices(modules) if config.loraplus_lr_ratio != 1 else set()
    groups = []
    for members, lr in ((params, config.learning_rate), (text_params, config.text_encoder_lr)):
        if not members:
            continue
        ups = [p for p in members if id(p) in up]
        downs = [p for p in members if id(p) not in up]
        groups.append({"params": downs, "lr": lr})
        if ups:
            groups.append({"params": ups, "lr": lr * config.loraplus_lr_ratio})
    return groups
