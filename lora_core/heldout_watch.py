"""Watching the held-out loss during training: the overfitting warning and the early stop.

After each validation loss, `HeldOutWatch.add(step, loss)` says whether it is a new lowest value and returns
the events it calls for: one `overfitting` event (reason heldout_rising) the first time the loss has stayed
more than RISE above its lowest for `overfit_patience` evaluations in a row, and, with `early_stop_patience` > 0, one
(reason early_stop) when it has not reached a new lowest for that many evaluations, which ends the training.
The lowest value is the run's best; with early stop on, training.py saves its LoRA as lora_best.safetensors
at each new lowest. The scores (scoring.py) measure that file too, with the same held-out images and draws, so
the lowest held-out loss among the scored LoRAs is its (or a checkpoint's of its step), which the recommendation
picks unless a LoRA within 1 % of it has more concept over bleed. A resumed run watches afresh from its first
evaluation after the resume. Torch-free.
"""

from __future__ import annotations

from lora_core.config import TrainConfig
from lora_core.events import Event, Overfitting

BEST_FILE = "lora_best.safetensors"  # beside lora_final.safetensors
RISE = 0.10  # "above its lowest" for the warning: more than 10 % above it. The held-out loss of a few images
# wanders by several percent between evaluations of a sound run (the toy demo: up to 5 %; with all 18 pictures
# at a high learning rate up to 17 % once, never 10 % three times in a row), an overfitting one stays far above.


class HeldOutWatch:
    def __init__(self, config: TrainConfig):
        self.overfit_patience, self.early_stop_patience = config.overfit_patience, config.early_stop_patience
        self.best: tuple[int, float] | None = None  # (step, loss) of the lowest held-out loss so far
        self.above = 0  # evaluations in a row without a new lowest (early stop)
        self.risen = 0  # evaluations in a row more than RISE above the lowest (the warning)
        self.warned = self.stopping = False

    def add(self, step: int, loss: float, best_path: str | None = None) -> tuple[bool, list[Event]]:
        """(whether `loss` is the lowest so far, the events it calls for). `best_path`: where the best LoRA is
        kept (named in the early stop's event)."""
        if self.best is None or loss < self.best[1]:
            self.best, self.above, self.risen = (step, loss), 0, 0
            return True, []
        best_step, best_loss = self.best
        self.above += 1
        self.risen = self.risen + 1 if loss > best_loss * (1 + RISE) else 0
        events: list[Event] = []
        if self.risen >= self.overfit_patience and not self.warned:
            self.warned = True
            events.append(Overfitting(step=step, reason="heldout_rising", best_step=best_step, message=(
                f"the held-out loss has stayed more than {RISE:.0%} above its lowest ({best_loss:.4g} at step "
                f"{best_step:,}) for {self.risen} evaluations in a row: the LoRA is likely overfitting; a "
                f"checkpoint near step {best_step:,} may be better than the final one")))
        if self.early_stop_patience and self.above >= self.early_stop_patience and not self.stopping:
            self.stopping = True
            events.append(Overfitting(step=step, reason="early_stop", best_step=best_step, best_path=best_path,
                                      message=(f"early stop: no new lowest held-out loss for {self.above} "
                                               f"evaluations (early_stop_patience); the best, step {best_step:,}, "
                                               f"is kept as {BEST_FILE}")))
        return False, events
