"""Captions as training sees them: trigger words, tag shuffling with kept tokens, and caption dropout.

Everything random here takes a `torch.Generator` seeded by the caller from (seed, epoch, entry), never the
global RNG, so a resumed or multi-process run draws the same captions.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the page's server scans datasets (dataset.py imports this) and never loads torch
    import torch


def split_tags(caption: str) -> list[str]:
    return [tag.strip() for tag in caption.split(",") if tag.strip()]


def with_trigger(trigger_words: list[str], caption: str, placement: str = "first") -> str:
    """The caption an image trains with before any per-step change.

    'first' and 'shuffled' put the trigger words in front; 'none' leaves a caption as written (it should hold
    the trigger words itself). An image without a caption gets the trigger words in every case."""
    caption = " ".join(caption.split())
    if placement == "none" and caption:
        return caption
    trigger = ", ".join(trigger_words)
    return f"{trigger}, {caption}" if caption else trigger


def kept_tags(trigger_words: list[str], keep_tokens: int, placement: str) -> int:
    """How many leading tags shuffling leaves in place: `keep_tokens`, counting the trigger words, and at
    least all the trigger words when they are placed 'first'."""
    return max(keep_tokens, len(trigger_words)) if placement == "first" else keep_tokens


def shuffle_tags(caption: str, keep: int, generator: torch.Generator) -> str:
    """Shuffle the comma-separated tags after the first `keep`."""
    import torch

    tags = split_tags(caption)
    head, tail = tags[:keep], tags[keep:]
    order = torch.randperm(len(tail), generator=generator).tolist()
    return ", ".join(head + [tail[i] for i in order])


def dropped(probability: float, generator: torch.Generator) -> bool:
    """True when the whole caption is dropped (trained as the empty, unconditional caption)."""
    import torch

    return probability > 0 and torch.rand((), generator=generator).item() < probability
