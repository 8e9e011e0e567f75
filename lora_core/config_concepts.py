"""Several concepts in one run, regularisation images and preservation without images: part of the one
configuration model (TrainConfig inherits `ConceptOptions`).

- `concepts`: more folders, each with its own trigger words, repeats, caption options and optionally its own
  resolution (sd-scripts' subsets, OneTrainer's concepts). `dataset_path` with the run's own trigger words,
  repeats and caption options is always the first concept; a config without `concepts` has just that one, and
  both go through the same code (lora_core/concepts.py).
- `regularization_path`: class images with their own captions, trained beside the concepts with their loss
  weighted by `prior_loss_weight` (DreamBooth's prior preservation, as sd-scripts and diffusers do it).
- `preservation_prompt`: ai-toolkit's differential output preservation: each caption with its trigger words
  replaced by this class word is the class prompt, whose prediction by the base (LoRA off) the LoRA model must
  match on the same noisy latents, weighted by `preservation_weight` (lora_core/preservation.py).
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator, model_validator

from lora_core.config_flow import MAX_PATH_CHARS, path_text_problem
from lora_core.config_paths import DATA_PATH, DATA_PATH_KEY
from lora_core.errors import FieldConflict

MAX_CONCEPTS = 32
# The hint the page reads to know a field is a folder on the server that the datasets-root check must cover
# (as dataset_path is); for `concepts` it is each item's `path`.
Word = Annotated[str, StringConstraints(min_length=1, max_length=200)]


def _advanced(**extra: Any) -> dict[str, Any]:
    return {"group": "advanced", **extra}


class Concept(BaseModel):
    """One more folder of training images, with its own trigger words and caption options."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field(min_length=1, max_length=MAX_PATH_CHARS, description=(
        "Folder of this concept's images with optional same-named .txt captions."))
    trigger_words: list[Word] = Field(min_length=1, max_length=32, description=(
        "This concept's own trigger words, placed as the run's trigger_placement says."))
    repeats: int = Field(1, ge=1, le=1000, description="Times each of its images appears per epoch.")
    shuffle_tags: bool = Field(False, description="Shuffle its captions' tags every step.")
    keep_tokens: int = Field(0, ge=0, le=255, description="With shuffle_tags, the first N tags stay in place.")
    caption_dropout: float = Field(0.0, ge=0, le=1.0, description=(
        "Probability that one of its images trains with the empty caption on a step."))
    resolution: int | None = Field(None, ge=64, le=2048, multiple_of=8, description=(
        "Its own training size (buckets around resolution² pixels); empty: the run's resolution."))

    @field_validator("path")
    @classmethod
    def _path_text(cls, value: str) -> str:
        if problem := path_text_problem(value):
            raise ValueError(problem)
        return value

    @field_validator("trigger_words", mode="before")
    @classmethod
    def _one_word_is_a_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("trigger_words")
    @classmethod
    def _no_blank_words(cls, value: list[str]) -> list[str]:
        if any(not word.strip() for word in value):
            raise ValueError("entries must not be blank")
        return value


class ConceptOptions(BaseModel):
    concepts: list[Concept] = Field(default_factory=list, max_length=MAX_CONCEPTS, description=(
        "More concepts trained in the same run, each an object with path, trigger_words and optionally repeats, "
        "shuffle_tags, keep_tokens, caption_dropout and resolution (sd-scripts' subsets, OneTrainer's concepts). "
        "dataset_path with the run's trigger_words, repeats and caption options is the first concept. Each "
        "epoch shows every concept's images `repeats` times; the dataset event and the report count each."),
        json_schema_extra=_advanced(**{DATA_PATH_KEY: "path", "editor": "json",
                                       "allowed": "list of objects (README: Several concepts)"}))
    regularization_path: str | None = Field(None, max_length=MAX_PATH_CHARS, description=(
        "Folder of class images (e.g. ordinary pictures of what the concept is a kind of), each with a .txt "
        "caption (an image without one is refused), trained beside the concepts as they are captioned: "
        "DreamBooth's prior preservation. Their loss is weighted by prior_loss_weight."),
        json_schema_extra=_advanced(**DATA_PATH))
    regularization_repeats: int = Field(0, ge=0, le=1000, description=(
        "Times each regularisation image appears per epoch. 0: balanced as sd-scripts does, as many "
        "regularisation entries per epoch as training entries (the class images cycled, or the first ones "
        "taken)."), json_schema_extra=_advanced())
    prior_loss_weight: float = Field(1.0, ge=0, le=100, description=(
        "Weight of the regularisation images' loss against the concepts' (sd-scripts' and diffusers' "
        "prior_loss_weight)."), json_schema_extra=_advanced())
    preservation_prompt: str | None = Field(None, max_length=200, description=(
        "Differential output preservation (ai-toolkit's): the class word that replaces the trigger words in "
        "each caption to make its class prompt. Every step the base model (LoRA off, no gradient) predicts the "
        "class prompt on the step's noisy latents, and the LoRA model is trained to predict the same, so what "
        "the class word draws stays as it was. A third denoiser pass per step. Empty: off."),
        json_schema_extra=_advanced())
    preservation_weight: float = Field(1.0, gt=0, le=100, description=(
        "Weight of the preservation loss against the training loss (ai-toolkit's multiplier)."),
        json_schema_extra=_advanced())

    @field_validator("regularization_path")
    @classmethod
    def _reg_path_text(cls, value: str | None) -> str | None:
        if value is not None and (problem := path_text_problem(value)):
            raise ValueError(problem)
        return value

    @field_validator("preservation_prompt")
    @classmethod
    def _blank_is_off(cls, value: str | None) -> str | None:
        return value if value is None or value.strip() else None

    @model_validator(mode="after")
    def _concept_options_agree(self) -> Any:
        if self.preservation_prompt is not None and getattr(self, "train_text_encoder", False):
            # the prior would need the text encoders without their LoRA too: not built (yet)
            raise FieldConflict(("preservation_prompt", "train_text_encoder"), "differential output "
                                "preservation works with frozen text encoders only; turn train_text_encoder off "
                                "or clear preservation_prompt")
        if self.regularization_repeats and self.regularization_path is None:
            raise FieldConflict(("regularization_repeats", "regularization_path"), "regularization_repeats needs "
                                "regularization_path (a folder of class images); set one or clear the other")
        return self
