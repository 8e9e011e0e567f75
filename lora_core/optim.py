"""Optimizers and learning-rate schedules, chosen by name in the config.

AdamW is torch's fused kernel on CUDA and on the CPU (one pass over all parameters instead of a dozen small
operations per tensor: 1.5 ms per step instead of 7 for small-sd's 256 LoRA tensors on the CPU). AdamW 8-bit
(and its paged form, CUDA only: the plan refuses it on the CPU) needs `bitsandbytes`, Prodigy needs
`prodigyopt`; asking for one that is not installed is an error naming the package. Adafactor is transformers'.

The others through the libraries that maintain them: Lion (`lion-pytorch`; its 8-bit and paged 8-bit forms from
bitsandbytes, the paged one CUDA only), schedule-free AdamW (`schedulefree`) and CAME (`came-pytorch`).
Schedule-free AdamW trains at an interpolation of its iterates and holds their average, which is what the model
should use: `averaged_weights` switches to it for samples, the validation loss and the LoRA file, then puts the
training point back exactly (a copy, not the optimizer's inverse interpolation, which is not bit-exact), so a
run's checkpoint state holds the training point and a resumed run continues bit for bit.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from diffusers.optimization import get_scheduler

from lora_core.config import TrainConfig
from lora_core.errors import UserError

FUSED_ADAMW_DEVICES = ("cuda", "cpu")
SCHEDULE_FREE = ("adamw_schedulefree",)
LION_BETAS = (0.9, 0.99)  # the Lion paper's and lion-pytorch's
CAME_BETAS, CAME_EPS = (0.9, 0.999, 0.9999), (1e-30, 1e-16)  # the CAME authors' defaults


class OptimizerError(UserError, ImportError):
    field = "optimizer"


def make_optimizer(config: TrainConfig, groups: list[dict], device: torch.device) -> torch.optim.Optimizer:
    decay = config.adam_weight_decay
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, weight_decay=decay, fused=device.type in FUSED_ADAMW_DEVICES)
    if config.optimizer in ("adamw8bit", "paged_adamw8bit", "lion8bit", "paged_lion8bit"):
        bnb = _imported("bitsandbytes", config)
        kind = {"adamw8bit": bnb.optim.AdamW8bit, "paged_adamw8bit": bnb.optim.PagedAdamW8bit,
                "lion8bit": bnb.optim.Lion8bit, "paged_lion8bit": bnb.optim.PagedLion8bit}[config.optimizer]
        return kind(groups, weight_decay=decay)
    if config.optimizer == "prodigy":
        # Prodigy estimates the step size itself; learning_rate is a multiplier, 1.0 as its authors advise.
        return _imported("prodigyopt", config).Prodigy(groups, weight_decay=decay,
                                                       safeguard_warmup=config.lr_warmup_steps > 0,
                                                       use_bias_correction=True)
    if config.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(groups, scale_parameter=False, relative_step=False, warmup_init=False,
                         weight_decay=decay)
    return _maintained_elsewhere(config, groups)


def _maintained_elsewhere(config: TrainConfig, groups: list[dict]) -> torch.optim.Optimizer:
    decay = config.adam_weight_decay
    if config.optimizer == "lion":
        # lion-pytorch multiplies the decay by the learning rate (p -= lr * wd * p), as AdamW does
        return _imported("lion_pytorch", config).Lion(groups, betas=LION_BETAS, weight_decay=decay)
    if config.optimizer == "adamw_schedulefree":
        # its own warmup (on the average's weights); the learning-rate schedule stays constant
        optimizer = _imported("schedulefree", config).AdamWScheduleFree(
            groups, weight_decay=decay, warmup_steps=config.lr_warmup_steps, foreach=False)
        optimizer.train()  # it starts in eval mode; steps need train mode
        return optimizer
    if config.optimizer == "came":
        return _imported("came_pytorch", config).CAME(groups, lr=config.learning_rate, betas=CAME_BETAS, eps=CAME_EPS,
                                                      weight_decay=decay)  # lr: a default it asserts on
    raise OptimizerError(f"unknown optimizer {config.optimizer!r}")


PACKAGES = {"bitsandbytes": "bitsandbytes", "prodigyopt": "prodigyopt", "lion_pytorch": "lion-pytorch",
            "schedulefree": "schedulefree", "came_pytorch": "came-pytorch"}


def _imported(module: str, config: TrainConfig):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise OptimizerError(f"optimizer {config.optimizer!r} needs the {PACKAGES[module]} package: pip install "
                             f"{PACKAGES[module]}; or choose optimizer 'adamw'") from None


@contextmanager
def averaged_weights(config: TrainConfig, optimizer):
    """With a schedule-free optimizer, the weights hold its average (what samples, the validation loss and the
    LoRA file should use) inside the block, and exactly the training point again after it. Reentrant; other
    optimizers train on the weights they return, and nothing changes."""
    if config.optimizer not in SCHEDULE_FREE or not optimizer.param_groups[0].get("train_mode", False):
        yield
        return
    params = [p for group in optimizer.param_groups for p in group["params"]]
    training_point = [p.detach().clone() for p in params]
    optimizer.eval()
    try:
        yield
    finally:
        optimizer.train()  # the mode; the interpolation back is not bit-exact, so the copy puts the point back
        with torch.no_grad():
            for param, saved in zip(params, training_point, strict=True):
                param.copy_(saved)


def make_lr_scheduler(config: TrainConfig, optimizer: torch.optim.Optimizer, total_steps: int):
    warmup = 0 if config.optimizer in SCHEDULE_FREE else config.lr_warmup_steps  # it warms up itself
    return get_scheduler(config.lr_scheduler, optimizer, num_warmup_steps=warmup,
                         num_training_steps=total_steps, num_cycles=config.lr_scheduler_num_cycles)
