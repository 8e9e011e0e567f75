"""The dataset doctor's caption checks: captions longer than the text encoder reads (and what it never
reads), a missing trigger word, missing captions, and captions so alike that the model cannot tell the
images apart.

Token counts: with a real tokenizer (`TokenCounter.from_model`: the base model's own CLIP tokenizer, from a
local diffusers folder or the Hugging Face cache, never downloaded) they are exact. Otherwise they are
estimated the way CLIP splits text: lower-cased, cut into letter runs, single digits and punctuation runs
(CLIP's own pre-token pattern); a letter run costs one token per 8 letters (CLIP's 49k-word vocabulary holds
most English words whole, rare and made-up words split), a punctuation run one per 2 characters. T5
(SentencePiece) is estimated at one token per 5 letters plus one per punctuation mark. The message says
"about" for an estimate.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lora_core import captions as caption_rules

CLIP_PRETOKENS = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|(?:[^\s\w]|_)+", re.IGNORECASE)
CLIP_SPECIAL = 2  # the start and end tokens, inside the 77
EPSILON = 1e-9  # 0.9 * 10 is 9.000000000000002 in floating point: a Jaccard of exactly 9/10 must count
MIN_VOCAB = 258  # a real tokenizer has at least the 256 byte tokens and its two special ones


@dataclass
class EncoderLimit:
    name: str  # "CLIP", "T5"
    tokens: int  # what the encoder reads, special tokens included


@dataclass
class TokenCount:
    tokens: int
    cut: str  # the text the encoder never reads ('' when all of it fits)
    exact: bool


def estimate_tokens(text: str, limit: EncoderLimit) -> TokenCount:
    """The estimated token count of `text` for `limit`'s encoder, and the part past the limit."""
    clip = limit.name.upper().startswith("CLIP")
    used, cut_at = (CLIP_SPECIAL if clip else 1), None  # T5 appends one end token
    for match in CLIP_PRETOKENS.finditer(text.lower()):
        piece = match.group()
        if piece[0].isalpha():
            cost = math.ceil(len(piece) / (8 if clip else 5))
        elif piece[0].isdigit():
            cost = 1
        else:
            cost = math.ceil(len(piece) / 2) if clip else len(piece)
        if used + cost > limit.tokens and cut_at is None:
            cut_at = match.start()
        used += cost
    return TokenCount(used, _from_word_start(text, cut_at) if cut_at is not None else "", exact=False)


def _from_word_start(text: str, cut_at: int) -> str:
    """The text from the start of the word the limit falls in: what people read as the part that is lost."""
    return text[text.rfind(" ", 0, cut_at) + 1:].strip()


class TokenCounter:
    """Counts tokens with a real tokenizer (a transformers fast tokenizer with offsets), else estimates."""

    def __init__(self, tokenizer=None):
        self.tokenizer = tokenizer

    @classmethod
    def from_model(cls, base_model: str) -> TokenCounter:
        """The CLIP tokenizer of a local diffusers folder, or of a hub model already in the Hugging Face cache
        (never downloaded); the estimate when neither loads. A built-in test model's byte-level tokenizer
        says nothing about a real model's, so it gets the estimate too."""
        folder = Path(base_model).expanduser()
        if folder.is_dir():
            if not (folder / "tokenizer" / "vocab.json").is_file():
                return cls()
            source, options = str(folder / "tokenizer"), {}
        elif base_model.startswith("builtin:") or base_model.count("/") != 1 or base_model.endswith(".safetensors"):
            return cls()
        else:
            source, options = base_model, {"subfolder": "tokenizer"}
        try:
            from transformers import CLIPTokenizerFast

            tokenizer = CLIPTokenizerFast.from_pretrained(source, local_files_only=True, **options)
        except Exception:  # any tokenizer that does not load offline: the estimate is still useful
            return cls()
        # transformers 5 answers a model it has no files for with an empty tokenizer (2 tokens), not an error
        return cls(tokenizer) if len(tokenizer) >= MIN_VOCAB else cls()

    def count(self, text: str, limit: EncoderLimit) -> TokenCount:
        if self.tokenizer is None or not limit.name.upper().startswith("CLIP"):
            return estimate_tokens(text, limit)
        encoded = self.tokenizer(text, add_special_tokens=True, return_offsets_mapping=True, truncation=False,
                                 verbose=False)
        ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
        if len(ids) <= limit.tokens:
            return TokenCount(len(ids), "", exact=True)
        first_cut = offsets[limit.tokens - 1][0]  # the end token takes the last place
        return TokenCount(len(ids), _from_word_start(text, first_cut), exact=True)


@dataclass
class CaptionEntry:
    file: str  # the image's file name
    raw: str  # the caption file's text ('' when there is none)
    has_file: bool
    trained: str  # what the encoder gets: trigger words placed as the config says


def too_long(entries: list[CaptionEntry], limits: list[EncoderLimit], counter: TokenCounter,
             add: Callable[..., None]) -> None:
    for limit in limits:
        for entry in entries:
            count = counter.count(entry.trained, limit)
            if not count.cut:
                continue
            about = "" if count.exact else "about "
            add("caption_too_long", [entry.file], f"the caption is {about}{count.tokens} {limit.name} tokens; "
                f"the {limit.name} text encoder reads {limit.tokens} and never sees: “{_short(count.cut)}”",
                "words past the limit are cut off before training: they teach nothing, and whatever they "
                "describe gets bound to the words that remain (or to the trigger)",
                "shorten the caption: keep what differs between images, drop what is the same in all of them",
                "warning")


def trigger_missing(entries: list[CaptionEntry], trigger_words: list[str], placement: str, majority: float,
                    add: Callable[..., None]) -> None:
    """With trigger words from the config, only placement 'none' relies on the captions holding them; without
    a config, the trigger is a first tag most captions share."""
    captioned = [entry for entry in entries if entry.raw]
    if len(captioned) < 3:
        return
    if trigger_words and placement != "none":
        return
    for trigger in trigger_words or inferred_triggers(entries, majority):
        missing = [entry.file for entry in captioned if not _holds(entry.raw, trigger)]
        if missing and (len(captioned) - len(missing)) / len(captioned) >= majority:
            add("trigger_missing", missing, f"“{trigger}” is in {len(captioned) - len(missing)} of "
                f"{len(captioned)} captions but not in these", "the LoRA ties the subject to the trigger word "
                "only through images whose caption has it; the others teach it without the trigger, so the "
                "trigger controls it less", f"put “{trigger}” first in these captions (one click: add trigger)",
                "warning")


def inferred_triggers(entries: list[CaptionEntry], majority: float) -> list[str]:
    """Without a config: the first tags that at least `majority` of the captions start with."""
    captioned = [entry for entry in entries if entry.raw]
    firsts = Counter(tags[0].lower() for entry in captioned if (tags := caption_rules.split_tags(entry.raw)))
    return [tag for tag, count in firsts.items() if captioned and count / len(captioned) >= majority]


def _holds(caption: str, word: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(word.lower())}(?!\w)", caption.lower()) is not None


def empty_captions(entries: list[CaptionEntry], majority: float, add: Callable[..., None]) -> None:
    captioned = sum(bool(entry.raw) for entry in entries)
    missing = [entry.file for entry in entries if not entry.raw]
    if missing and entries and captioned / len(entries) >= majority:
        add("caption_missing", missing, f"{len(missing)} image(s) have no caption (or an empty one) while "
            f"{captioned} of {len(entries)} have one", "an image without a caption trains on the trigger words "
            "alone, so everything in it (background, clothes, style) becomes part of what the trigger means",
            "write a caption for each (the caption editor), or exclude the image", "warning")


def similar_captions(entries: list[CaptionEntry], trigger_words: list[str], threshold: float,
                     add: Callable[..., None]) -> None:
    """Groups of captions whose word sets overlap by `threshold` (Jaccard) or more, trigger words aside."""
    words = [(entry.file, _words(entry.raw, trigger_words)) for entry in entries if entry.raw]
    words = [(name, bag) for name, bag in words if bag]
    parent = list(range(len(words)))
    for i, j in _similar_pairs([bag for _, bag in words], threshold):
        parent[_root(parent, j)] = _root(parent, i)
    groups: dict[int, list[str]] = {}
    for i in range(len(words)):
        groups.setdefault(_root(parent, i), []).append(words[i][0])
    for names in groups.values():
        if len(names) > 1:
            add("similar_captions", sorted(names), f"{len(names)} captions are identical or nearly so",
                "the caption is how the model tells images apart: identical captions on different pictures "
                "make it learn their differences (pose, background, clothes) as part of the trigger",
                "describe what differs in each image (pose, setting, clothing, lighting)", "info")


def _similar_pairs(bags: list[frozenset[str]], threshold: float) -> list[tuple[int, int]]:
    """Pairs with Jaccard >= threshold, by prefix filtering: with each set's words ordered rarest first, two
    sets that similar share a word among the first |set| - ceil(threshold * |set|) + 1 of either, so only
    sets sharing such a word are compared (comparing all pairs took 6 s for 3,000 captions)."""
    frequency = Counter(word for bag in bags for word in bag)
    index: dict[str, list[int]] = {}
    pairs = []
    for i in sorted(range(len(bags)), key=lambda k: len(bags[k])):
        ordered = sorted(bags[i], key=lambda word: (frequency[word], word))
        prefix = ordered[:len(ordered) - math.ceil(threshold * len(ordered) - EPSILON) + 1]
        candidates = {j for word in prefix for j in index.get(word, ())}
        for j in candidates:  # j's set is no larger than i's (sorted by size)
            if len(bags[i] & bags[j]) >= threshold * len(bags[i] | bags[j]) - EPSILON:
                pairs.append((j, i))
        for word in prefix:
            index.setdefault(word, []).append(i)
    return pairs


def _words(caption: str, trigger_words: list[str]) -> frozenset[str]:
    drop = {word for trigger in trigger_words for word in re.findall(r"\w+", trigger.lower())}
    return frozenset(word for word in re.findall(r"\w+", caption.lower()) if word not in drop)


def _root(parent: list[int], i: int) -> int:
    while parent[i] != i:
        parent[i] = parent[parent[i]]
        i = parent[i]
    return i


def _short(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "…"
