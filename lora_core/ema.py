"""An exponential moving average (EMA) of the LoRA weights, kept beside the training (ema_decay).

`LoraEMA` holds an fp32 copy of every trained parameter (the denoiser's LoRA and, with train_text_encoder, the
text encoders'), on the parameter's device. After every `ema_update_every`-th optimizer step it moves towards
the current weights: `shadow = d * shadow + (1 - d) * weight`, where the k-th update (k = 0, 1, ...) uses
`d = min(ema_decay, (1 + k) / (10 + k))`, diffusers' EMAModel warm-up: the first updates follow the weights
closely, so the average is not held back by the untrained start (an average of a few hundred steps at 0.999
would otherwise be mostly the LoRA's initial zeros).

Files: each checkpoint's LoRA `lora_step_N.safetensors` gets `lora_step_N.ema.safetensors` beside it, written by
the same export (the family's names, the same metadata plus `lora_studio.weights` "ema" and the EMA's
settings); the run ends with `lora_final.ema.safetensors`, or, with ema_use_for_final, with the EMA in
`lora_final.safetensors` and the raw weights in `lora_final.raw.safetensors`. The training state folder holds
`ema.safetensors` (the fp32 shadow by parameter name and the update count), so --resume continues the same
average bit for bit.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from lora_core.checkpoint import ResumeError
from lora_core.config import TrainConfig

STATE_FILE = "ema.safetensors"  # in a training state folder (checkpoint.py)
UPDATES_KEY = "__ema_updates__"  # the update count, stored with the shadow tensors
RAW_FINAL, EMA_FINAL = "lora_final.raw.safetensors", "lora_final.ema.safetensors"


def warmup_decay(decay: float, updates: int) -> float:
    """The decay of the update after `updates` earlier ones (diffusers' EMAModel without inv_gamma/power)."""
    return min(decay, (1 + updates) / (10 + updates))


class LoraEMA:
    def __init__(self, params: dict[str, torch.Tensor], decay: float, every: int):
        self.decay, self.every, self.updates = decay, every, 0
        self.shadow = {name: p.detach().to(torch.float32, copy=True) for name, p in params.items()}

    @torch.no_grad()
    def update(self, params: dict[str, torch.Tensor], step: int) -> None:
        """After optimizer step `step`: move the average towards `params` (on every `every`-th step)."""
        if step % self.every:
            return
        weight = 1.0 - warmup_decay(self.decay, self.updates)
        for name, param in params.items():
            self.shadow[name].lerp_(param.detach().float(), weight)
        self.updates += 1

    @contextmanager
    def applied(self, params: dict[str, torch.Tensor]) -> Iterator[None]:
        """The EMA weights in the model's parameters for the time of the block, the trained ones back after."""
        saved = {name: p.detach().clone() for name, p in params.items()}
        with torch.no_grad():
            for name, param in params.items():
                param.copy_(self.shadow[name])
        try:
            yield
        finally:
            with torch.no_grad():
                for name, param in params.items():
                    param.copy_(saved[name])

    def state_tensors(self) -> dict[str, torch.Tensor]:
        state = {name: t.detach().cpu().contiguous() for name, t in self.shadow.items()}
        return {**state, UPDATES_KEY: torch.tensor([self.updates], dtype=torch.int64)}

    def load(self, folder: Path) -> None:
        """Restore the average saved in a training state folder, exactly."""
        path = folder / STATE_FILE
        if not path.is_file():
            raise ResumeError(f"cannot resume from {folder}: it holds no EMA ({STATE_FILE}) though ema_decay is "
                              "set; resume with the ema_decay the run was started with, or start a new run")
        tensors = load_file(str(path))
        updates = int(tensors.pop(UPDATES_KEY).item())
        if set(tensors) != set(self.shadow):
            raise ResumeError(f"cannot resume from {folder}: its EMA's layers differ from this model's LoRA")
        for name, tensor in tensors.items():
            self.shadow[name].copy_(tensor)
        self.updates = updates


def make(config: TrainConfig, params: dict[str, torch.Tensor]) -> LoraEMA | None:
    """The run's EMA, started from the LoRA's initial weights; None when ema_decay is 0."""
    return LoraEMA(params, config.ema_decay, config.ema_update_every) if config.ema_decay > 0 else None


def metadata(config: TrainConfig, ema: LoraEMA | None, weights: str) -> dict[str, str]:
    """Header fields saying which weights a file holds ("raw" or "ema") and how the EMA was kept."""
    if ema is None:
        return {}
    settings = {"decay": config.ema_decay, "update_every": config.ema_update_every, "updates": ema.updates,
                "warmup": "min(decay, (1 + k) / (10 + k))"}
    return {"lora_studio.weights": weights, "lora_studio.ema": json.dumps(settings)}


def sibling(path: Path) -> Path:
    """`lora_step_N.safetensors` -> `lora_step_N.ema.safetensors`."""
    return path.with_name(f"{path.stem}.ema.safetensors")


Export = Callable[..., Path]  # training.export_lora(run, path, epochs=None, companions=False, extra=None)


def export_checkpoint(run: Any, path: Path, export: Export) -> Path:
    """The EMA file beside a checkpoint's LoRA `path`."""
    with run.ema.applied(run.lora_params):
        return export(run, sibling(path), extra=metadata(run.config, run.ema, "ema"))


def export_final(run: Any, output: Path, export: Export, epochs: int) -> Path:
    """The raw and the EMA final files; the path of lora_final.safetensors (the EMA with ema_use_for_final)."""
    ema_first = run.config.ema_use_for_final
    raw = export(run, output / (RAW_FINAL if ema_first else "lora_final.safetensors"), epochs=epochs,
                 companions=not ema_first, extra=metadata(run.config, run.ema, "raw"))
    with run.ema.applied(run.lora_params):
        averaged = export(run, output / ("lora_final.safetensors" if ema_first else EMA_FINAL), epochs=epochs,
                          companions=ema_first, extra=metadata(run.config, run.ema, "ema"))
    return averaged if ema_first else raw


def held_out_loss(run: Any) -> float | None:
    """The held-out validation loss with the EMA weights (None without an EMA, or when it is not finite)."""
    if run.ema is None:
        return None
    with run.ema.applied(run.lora_params):
        loss = run.held_out.loss(run)
    return loss if math.isfinite(loss) else None


def for_samples(run: Any):
    """A context in which the samples are drawn: with the EMA weights when ema_samples asks for them."""
    return run.ema.applied(run.lora_params) if run.ema is not None and run.config.ema_samples else nullcontext()
