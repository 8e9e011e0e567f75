"""The scoring options (scores of every checkpoint, the overfitting warning, early stop), part of the one
configuration model: `TrainConfig` inherits them. What they drive: lora_core/scoring.py (the scores),
lora_core/scores.py (the recommendation and warnings), lora_core/heldout_watch.py (the live warning, early stop).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field, model_validator

from lora_core.errors import FieldConflict


def _sampling() -> dict[str, Any]:
    return {"group": "sampling"}


class ScoringOptions(BaseModel):
    score_at_end: bool = Field(False, description=(
        "When the run completes, score every saved checkpoint and the final LoRA (held-out loss, concept "
        "strength, likeness, bleed; `python -m lora_core score` does it later) into scores.json, with a "
        "recommended checkpoint and strength. Costs a few small drawings per checkpoint."),
        json_schema_extra=_sampling())
    overfit_patience: int = Field(3, ge=1, le=1000, description=(
        "Warn of overfitting (an `overfitting` event, shown live and in the report) when the held-out loss has "
        "stayed more than 10 % above its lowest value for this many evaluations in a row. Needs held-out images."),
        json_schema_extra=_sampling())
    early_stop_patience: int = Field(0, ge=0, le=1000, description=(
        "Stop training when the held-out loss has not reached a new lowest value for this many evaluations in "
        "a row, and keep the LoRA of its lowest as lora_best.safetensors (saved at each new lowest). 0: off. "
        "Needs held-out images (validation_images or validation_dataset_path)."),
        json_schema_extra=_sampling())

    @model_validator(mode="after")
    def _early_stop_needs_held_out_images(self) -> Any:
        held_out = getattr(self, "validation_images", None) is not None or \
            getattr(self, "validation_dataset_path", None) is not None
        if self.early_stop_patience and not held_out:
            raise FieldConflict(("early_stop_patience",), "early stop watches the held-out loss, and no images are "
                                "held out; set validation_images (e.g. 2) or validation_dataset_path, or set "
                                "early_stop_patience to 0")
        return self
