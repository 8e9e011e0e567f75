"""Preservation without images: ai-toolkit's differential output preservation (`preservation_prompt`).

Each training caption with its trigger words replaced by the class word is its class prompt ("a zwx circle"
-> "a red circle" for class word 'red'). On every step, on the step's own noisy latents and noise levels,
the base model (the LoRA switched off, no gradient) predicts the class prompt; that prediction is the target
of the LoRA model on the same class prompt, and the mean squared difference, times `preservation_weight`, is
added to the training loss. So the LoRA learns the trigger words but leaves what the class word draws as the
base drew it. The class prompts are encoded once by the frozen text encoders (train_text_encoder is refused
with it: config_concepts.py).

The cost: two more denoiser passes per step (one without gradient).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

from lora_core import conditioning, models
from lora_core.batches import Batch

Predict = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def class_caption(caption: str, trigger_words: list[str], class_word: str) -> str:
    """The caption with each trigger word (as a whole word) replaced by the class word."""
    for word in sorted(trigger_words, key=len, reverse=True):  # a longer trigger first: "zwx dog" before "zwx"
        caption = re.sub(rf"(?<!\w){re.escape(word)}(?!\w)", class_word, caption)
    return caption


@contextlib.contextmanager
def adapters_off(module: torch.nn.Module) -> Iterator[None]:
    """The module's peft adapters (LoRA, LoHa, LoKr, DoRA) switched off inside the block. The flag is set
    directly: peft's enable_adapters also flips the adapters' requires_grad, which the optimizer's parameters
    must keep."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [layer for layer in module.modules() if isinstance(layer, BaseTunerLayer)]
    before = [layer._disable_adapters for layer in layers]
    for layer in layers:
        layer._disable_adapters = True
    try:
        yield
    finally:
        for layer, state in zip(layers, before, strict=True):
            layer._disable_adapters = state


class Preservation:
    """The class prompts' conditioning (one row per dataset image) and the loss of the step in progress."""

    def __init__(self, rows: conditioning.CachedConditioning, weight: float):
        self.rows, self.weight = rows, weight
        self.pending: torch.Tensor | None = None

    @classmethod
    def build(cls, plan, pipeline, device: torch.device, dtype: torch.dtype) -> Preservation | None:
        """Encode every image's class prompt with the frozen text encoders (moved to the device for it and back
        to where they were); None when preservation_prompt is not set."""
        config = plan.config
        if config.preservation_prompt is None:
            return None
        found = plan.dataset.concepts
        prompts = [class_caption(record.caption, found[record.concept].trigger_words if found else
                                 config.trigger_words, config.preservation_prompt) for record in plan.dataset.images]
        encoders = models.text_encoders(pipeline)
        places = [next(encoder.parameters()).device for encoder in encoders]
        for encoder in encoders:
            encoder.to(device)
        with torch.no_grad():
            encode = conditioning.frozen_encoder(plan.family, pipeline, device, dtype, plan.settings)
            rows = conditioning.cache_captions(plan.family, encode, prompts, dropout=False)
        for encoder, place in zip(encoders, places, strict=True):
            encoder.to(place)
        return cls(rows, config.preservation_weight)

    def wrap(self, run, batch: Batch, predict: Predict) -> Predict:
        """`predict` (the training prediction), which also computes the step's preservation loss on the same
        noisy latents and levels (taken by `take_loss`)."""
        inputs = {**self.rows(batch), **run.plan.settings}

        def predicting(noisy: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
            prediction = predict(noisy, levels)
            with torch.no_grad(), adapters_off(run.bare_unet), run.accelerator.autocast():
                prior = run.family.predict(run.forward, noisy, levels, inputs)
            with run.accelerator.autocast():
                ours = run.family.predict(run.forward, noisy, levels, inputs)
            self.pending = self.weight * F.mse_loss(ours.float(), prior.float())
            return prediction

        return predicting

    def take_loss(self) -> torch.Tensor:
        loss, self.pending = self.pending, None
        if loss is None:
            raise RuntimeError("the objective did not call the wrapped prediction")
        return loss
