"""Conditioning sources: how a batch's captions become the denoiser's conditioning keyword arguments.

- `CachedConditioning`: fixed captions (no `shuffle_tags`) and frozen text encoders: every caption encoded
  once before training, one row per image, plus the empty caption's for `caption_dropout`;
- `EncodedConditioning`: the batch's captions (shuffled, or seen by a text encoder being trained) encoded
  every step by the function it is built with: the frozen encoders', or the trained ones' through the
  accelerator's wrappers (so that their gradients are averaged across processes).

The family turns the text conditioning and the batch's size/crop ids into the denoiser's inputs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from lora_core.batches import Batch
from lora_core.families import Family

Encode = Callable[[list[str]], dict[str, torch.Tensor]]


class CachedConditioning:
    def __init__(self, family: Family, rows: dict[str, torch.Tensor], empty: dict[str, torch.Tensor]):
        self.family, self.rows, self.empty = family, rows, empty

    def __call__(self, batch: Batch) -> dict[str, Any]:
        text = {}
        for name, table in self.rows.items():
            rows = table[batch.images.to(table.device)]
            if name in self.empty:
                drops = batch.drops.to(table.device).view(-1, *[1] * (rows.dim() - 1))
                rows = torch.where(drops, self.empty[name], rows)
            text[name] = rows
        return self.family.denoiser_inputs(text, batch.time_ids)


class EncodedConditioning:
    def __init__(self, family: Family, encode: Encode, trains: bool):
        self.family, self.encode, self.trains = family, encode, trains

    def __call__(self, batch: Batch) -> dict[str, Any]:
        with torch.set_grad_enabled(self.trains and torch.is_grad_enabled()):
            text = self.encode(batch.captions)
        return self.family.denoiser_inputs(text, batch.time_ids)


ConditioningSource = CachedConditioning | EncodedConditioning


@torch.no_grad()
def cache_captions(family: Family, encode: Encode, captions: list[str], dropout: bool) -> CachedConditioning:
    return CachedConditioning(family, encode(captions), encode([""]) if dropout else {})


def frozen_encoder(family: Family, pipeline, device: torch.device, dtype: torch.dtype,
                   settings: dict | None = None) -> Encode:
    """captions -> text conditioning from the pipeline's frozen text encoders (`settings`: the family's
    run_settings, e.g. the T5 length)."""
    return lambda texts: family.encode_captions(pipeline, texts, device, dtype, settings)


def trained_encoder(family: Family, pipeline, encoders: list, device: torch.device, dtype: torch.dtype,
                    settings: dict | None = None) -> Encode:
    """captions -> text conditioning through `encoders` (the family's trainable ones, in the pipeline's order,
    as the accelerator wrapped them; any frozen one, such as T5, from `pipeline`). It computes what
    `pipeline.encode_prompt` does, which cannot call a wrapped module."""
    return lambda texts: family.encode_with(pipeline, encoders, texts, device, dtype, settings)
