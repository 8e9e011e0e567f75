"""Concept bleed at the end of a run with several concepts: does one concept's trigger draw another concept?

Measured with the denoising loss, so it needs no judge of pictures and works for every family. For each
concept A, a few of its images (IMAGES_PER_CONCEPT) are noised with the validation loss's fixed draws
(validation.py) and denoised by the trained model under three captions: their own (A's trigger words), the
caption with A's trigger words replaced by a made-up word no concept trains (NEUTRAL_WORD: the reference, which
keeps what the LoRA learned of these images in general, their shapes and backgrounds, but nothing of A's own),
and the caption with A's trigger words replaced by concept B's:

    bleed(B -> A) = (loss_neutral - loss_with_B) / (loss_neutral - loss_own)

1: B's trigger words draw A as well as A's own do; 0: no better than a word the LoRA never saw; below 0: they
draw something further from A (B's own concept, as they should). A concept whose own trigger words do no better
than the neutral word has no figure (None). The `concept_bleed` event carries the table (`loss_bare` is the
neutral caption's loss); the report shows it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import torch

from lora_core import conditioning, dataset, models, validation
from lora_core.events import ConceptBleed, Event
from lora_core.preservation import class_caption

IMAGES_PER_CONCEPT = 4
# Stands in for the trigger words in the reference caption: a made-up word no concept trains, so the reference
# keeps the LoRA's general gain on these images (their shapes, backgrounds, style) but none of a concept's own.
NEUTRAL_WORD = "vroqt"


def _swap(caption: str, own: list[str], other: list[str]) -> str:
    """The caption with its trigger words replaced by `other`'s (joined), or removed when `other` is empty."""
    text = class_caption(caption, own, " ".join(other))
    return re.sub(r"\s*,(\s*,)+", ",", " ".join(text.split())).strip(" ,")


def measure(run: Any) -> list[dict[str, Any]]:
    """The bleed table, one row per ordered pair of the run's training concepts (not the class images)."""
    found = [(index, spec) for index, spec in enumerate(run.plan.dataset.concepts) if not spec.regularization]
    if len(found) < 2:
        return []
    encode = _frozen_encoder(run)
    rows = []
    for index, spec in found:
        records = [r for r in run.plan.dataset.images if r.concept == index][:IMAGES_PER_CONCEPT]
        held = validation.ValidationSet.build(
            run.config.model_copy(update={"resolution": spec.resolution}), run.family,
            dataset.DatasetReport(spec.folder, records), run.plan.info.pixel_multiple, run.pipeline.vae,
            run.device, models_dtype(run), run.objective.levels_from_uniform, None)

        def loss_with(words: list[str], records=records, spec=spec, held=held) -> float:
            held.text = encode([_swap(record.caption, spec.trigger_words, words) for record in records])
            return held.loss(run)

        own, bare = loss_with(spec.trigger_words), loss_with([NEUTRAL_WORD])
        for _, other in found:
            if other is spec:
                continue
            with_other = loss_with(other.trigger_words)
            gain = bare - own
            rows.append({"concept": spec.name, "trigger_words": other.trigger_words, "from_concept": other.name,
                         "loss_own": own, "loss_bare": bare, "loss_with_other": with_other,
                         "bleed": round((bare - with_other) / gain, 4) if gain > 0 else None})
    for module in (run.unet, *run.text_encoders):
        module.train()
    return rows


def models_dtype(run: Any) -> torch.dtype:
    from lora_core import hardware

    return hardware.weight_dtype(run.plan.precision)


def _frozen_encoder(run: Any) -> Callable[[list[str]], dict[str, torch.Tensor]]:
    """captions -> conditioning by the frozen text encoders, each moved to the device for the call and back."""
    encoders = models.text_encoders(run.pipeline)
    encode = conditioning.frozen_encoder(run.family, run.pipeline, run.device, models_dtype(run), run.plan.settings)

    @torch.no_grad()
    def encoding(captions: list[str]) -> dict[str, torch.Tensor]:
        places = [next(encoder.parameters()).device for encoder in encoders]
        for encoder in encoders:
            encoder.to(run.device)
        try:
            return encode(captions)
        finally:
            for encoder, place in zip(encoders, places, strict=True):
                encoder.to(place)

    return encoding


def maybe_measure(run: Any, emit: Callable[[Event], None]) -> None:
    """Emit the bleed table on the main process when the run has two or more concepts and frozen text
    encoders (a trained one would need its own LoRA in the comparison: not measured)."""
    if not run.main or run.config.train_text_encoder or not run.config.concepts:
        return
    rows = measure(run)
    if rows:
        emit(ConceptBleed(step=run.step, rows=rows))
