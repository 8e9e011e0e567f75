"""Optimizers and learning-rate schedules, chosen by name in the config.

AdamW is torch's fused kernel on CUDA and on the CPU (one pass over all parameters instead of a dozen small
operations per tensor: 1.5 ms per step instead of 7 for small-sd's 256 LoRA tensors on the CPU). AdamW 8-bit
(and its paged form, CUDA only: the plan refuses it on the CPU) needs `bitsandbytes`, Prodigy needs
`prodigyopt`; asking for one that is not installed is an error naming the package. Adafactor is transformers'.
"""

from __future__ import annotations

import torch
from diffusers.optimization import get_scheduler

from lora_core.config import TrainConfig
from lora_core.errors import UserError

FUSED_ADAMW_DEVICES = ("cuda", "cpu")


class OptimizerError(UserError, ImportError):
    field = "optimizer"


def make_optimizer(config: TrainConfig, groups: list[dict], device: torch.device) -> torch.optim.Optimizer:
    decay = config.adam_weight_decay
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, weight_decay=decay, fused=device.type in FUSED_ADAMW_DEVICES)
    if config.optimizer in ("adamw8bit", "paged_adamw8bit"):
        try:
            import bitsandbytes
        except ImportError:
            raise OptimizerError(f"optimizer {config.optimizer!r} needs the bitsandbytes package: pip install "
                                 "bitsandbytes; or choose optimizer 'adamw'") from None
        kind = bitsandbytes.optim.AdamW8bit if config.optimizer == "adamw8bit" else bitsandbytes.optim.PagedAdamW8bit
        return kind(groups, weight_decay=decay)
    if config.optimizer == "prodigy":
        try:
            from prodigyopt import Prodigy
        except ImportError:
            raise OptimizerError("optimizer 'prodigy' needs the prodigyopt package: pip install prodigyopt") from None
        # Prodigy estimates the step size itself; learning_rate is a multiplier, 1.0 as its authors advise.
        return Prodigy(groups, weight_decay=decay, safeguard_warmup=config.lr_warmup_steps > 0,
                       use_bias_correction=True)
    if config.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(groups, scale_parameter=False, relative_step=False, warmup_init=False,
                         weight_decay=decay)
    raise OptimizerError(f"unknown optimizer {config.optimizer!r}")


def make_lr_scheduler(config: TrainConfig, optimizer: torch.optim.Optimizer, total_steps: int):
    return get_scheduler(config.lr_scheduler, optimizer, num_warmup_steps=config.lr_warmup_steps,
                         num_training_steps=total_steps, num_cycles=config.lr_scheduler_num_cycles)
