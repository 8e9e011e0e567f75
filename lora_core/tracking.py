"""Experiment logs people already use: TensorBoard scalars and images, fed from the event stream.

A tracker is an event listener like `EventLog`: `progress` becomes the loss, learning-rate and speed scalars,
`validation` the held-out loss (`validation/loss`), `sample` becomes an image, each at the event's step. It is
fed where the events are (the main process), so it adds nothing to the training step, and a failing tracker
only logs a warning: it never stops training.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from lora_core.config import ConfigError, TrainConfig
from lora_core.events import Event

log = logging.getLogger("lora_core.tracking")

TENSORBOARD_HINT = "'tensorboard' needs the tensorboard package: pip install tensorboard (or set log_with to 'none')"


class TrackerUnavailable(ConfigError):
    """The tracker `log_with` names cannot run here; a config problem of that field."""

    def __init__(self, reason: str):
        super().__init__([("log_with", reason)])


def log_dir(config: TrainConfig) -> Path:
    return Path(config.output_path) / "logs"


def unavailable_reason(config: TrainConfig) -> str | None:
    """Why the tracker the config asks for cannot run here, or None (for the preflight report)."""
    if config.log_with == "tensorboard" and not _has_tensorboard():
        return TENSORBOARD_HINT
    return None


def _has_tensorboard() -> bool:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


def open_tracker(config: TrainConfig) -> TensorBoardTracker | None:
    """The tracker `config.log_with` names, or None; TrackerUnavailable when its package is missing."""
    if config.log_with == "none":
        return None
    return TensorBoardTracker(log_dir(config))


class TensorBoardTracker:
    def __init__(self, folder: Path):
        if not _has_tensorboard():
            raise TrackerUnavailable(TENSORBOARD_HINT)
        from torch.utils.tensorboard import SummaryWriter

        self.folder = folder
        self.writer = SummaryWriter(log_dir=str(folder))
        self._prompts: dict[str, int] = {}
        self._warned = False

    def __call__(self, event: Event) -> None:
        try:
            self._log(event)
        except Exception as error:  # a log must never stop a training run
            if not self._warned:
                log.warning("TensorBoard logging failed (training goes on): %s", error)
                self._warned = True

    def _log(self, event: Event) -> None:
        if event.type == "progress":
            if event.loss is not None:
                self.writer.add_scalar("train/loss", event.loss, event.step)
            self.writer.add_scalar("train/learning_rate", event.lr, event.step)
            if event.it_per_s > 0:
                self.writer.add_scalar("train/steps_per_second", event.it_per_s, event.step)
        elif event.type == "validation":
            self.writer.add_scalar("validation/loss", event.loss, event.step)
            if getattr(event, "ema_loss", None) is not None:
                self.writer.add_scalar("validation/ema_loss", event.ema_loss, event.step)
        elif event.type == "sample":
            import numpy as np
            from PIL import Image

            if event.prompt not in self._prompts:
                self._prompts[event.prompt] = len(self._prompts)
                self.writer.add_text(f"samples/prompt_{self._prompts[event.prompt]}", event.prompt, event.step)
            with Image.open(event.image_path) as image:
                pixels = np.asarray(image.convert("RGB"))
            self.writer.add_image(f"samples/prompt_{self._prompts[event.prompt]}", pixels, event.step,
                                  dataformats="HWC")
        elif event.terminal:
            self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def tee(*listeners: Callable[[Event], None]) -> Callable[[Event], None]:
    """One listener that calls each of `listeners` in turn."""

    def emit(event: Event) -> None:
        for listener in listeners:
            listener(event)

    return emit
