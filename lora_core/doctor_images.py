"""The dataset doctor's image checks, on the facts `imagehash` measured: duplicates (exact, near, and across
the training and held-out sets), blur relative to the set, upscaling and cropping at the training size,
transparency, and the conversions training does without a word (CMYK, 16-bit, palette, EXIF rotation)."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass

from lora_core import buckets
from lora_core.imagehash import ImageFacts, close_pairs

Add = Callable[..., None]


@dataclass
class Shape:
    """How training sizes images (from the config, else TrainConfig's defaults)."""

    resolution: int = 512
    bucketing: bool = True
    min_bucket: int = 256
    max_bucket: int = 2048
    no_upscale: bool = False
    multiple: int = 64  # the model's pixel step (64 for SD)


def exact_duplicates(items: list[tuple[str, ImageFacts]], add: Add) -> set[frozenset[str]]:
    """Files with the same content; the pairs found, so near-duplicates do not repeat them."""
    by_hash: dict[str, list[str]] = {}
    for name, facts in items:
        by_hash.setdefault(facts.sha256, []).append(name)
    found = set()
    for names in by_hash.values():
        if len(names) > 1:
            add("duplicate", names, f"{len(names)} files have exactly the same content",
                "a duplicate trains that picture twice as often as the others: the LoRA overfits to it "
                "(its pose, background and colours come back in everything)",
                f"exclude all but {names[0]}", "warning", actions=["exclude"])
            found.add(frozenset(names))
    return found


def _close_pairs(first: list[ImageFacts], second: list[ImageFacts] | None, distance: int) -> list[tuple[int, int]]:
    """Index pairs whose dHash and pHash both differ in at most `distance` bits (both must agree: either
    alone matches some unrelated images of simple shapes). Without `second`, pairs within `first`."""
    hashes = [(f.dhash, f.phash) for f in first]
    if second is None:
        return close_pairs(hashes, hashes, distance, same=True)
    return close_pairs(hashes, [(f.dhash, f.phash) for f in second], distance, same=False)


def near_duplicates(items: list[tuple[str, ImageFacts]], distance: int, exact: set[frozenset[str]],
                    add: Add) -> None:
    facts = [f for _, f in items]
    parent = list(range(len(items)))
    for i, j in _close_pairs(facts, None, distance):
        if facts[i].sha256 != facts[j].sha256:
            parent[_root(parent, j)] = _root(parent, i)
    groups: dict[int, list[str]] = {}
    for i, (name, _) in enumerate(items):
        groups.setdefault(_root(parent, i), []).append(name)
    for names in groups.values():
        if len(names) > 1 and frozenset(names) not in exact:
            add("near_duplicate", names, f"{len(names)} images are the same picture (resized, re-encoded or "
                "slightly edited)", "near-copies weigh that picture several times over the others, and the "
                "LoRA learns its details as the subject", "keep the best one (e.g. the largest) and exclude "
                "the others", "warning", actions=["exclude"])


def leakage(train: list[tuple[str, ImageFacts]], held: list[tuple[str, ImageFacts]], distance: int,
            add: Add) -> None:
    """Held-out images that are (near) copies of training images: their validation loss measures memory."""
    pairs = _close_pairs([f for _, f in train], [f for _, f in held], distance)
    by_hash: dict[str, list[int]] = {}
    for i, (_, facts) in enumerate(train):
        by_hash.setdefault(facts.sha256, []).append(i)
    exact = [(i, j) for j, (_, facts) in enumerate(held) for i in by_hash.get(facts.sha256, [])]
    seen = set()
    for i, j in exact + pairs:
        if (i, j) in seen:
            continue
        seen.add((i, j))
        add("leakage", [train[i][0], held[j][0]], f"held-out {held[j][0]} is (nearly) the same picture as "
            f"training image {train[i][0]}", "the validation loss should measure how the LoRA does on pictures "
            "it never saw; a copy of a training image makes it look better than it is, and hides overfitting",
            f"replace {held[j][0]} with a different picture, or exclude {train[i][0]} from training", "error",
            actions=["exclude"])


def blurry(items: list[tuple[str, ImageFacts]], absolute: float, relative: float, minimum: int, add: Add) -> None:
    """Images whose finest detail is missing (sharpness under `absolute`) and, in a set of at least `minimum`
    images, also far below the set's median: a set of soft paintings is not a set of blurry photos."""
    measured = [f.sharpness for _, f in items if f.sharpness > 0]
    median = statistics.median(measured) if len(measured) >= minimum else None
    for name, facts in items:
        if not 0 < facts.sharpness < absolute or (median is not None and facts.sharpness >= relative * median):
            continue
        against = f" (the set's median is {median:.1f})" if median is not None else ""
        add("blurry", [name], f"blurry: its detail ratio is {facts.sharpness:.2f}, under {absolute:g}{against}; "
            "its finest detail is missing", "the LoRA learns blur as part of the subject or style, and its "
            "images come out soft", "replace it with a sharper picture, or exclude it", "warning",
            actions=["exclude"])


def _training_size(width: int, height: int, shape: Shape) -> tuple[float, float]:
    """(scale, fraction cut away) of an image as training resizes and crops it."""
    if not shape.bucketing:
        return shape.resolution / min(width, height), 1 - min(width, height) / max(width, height)
    bucket = buckets.assign([(width, height)], shape.resolution, shape.multiple, shape.min_bucket,
                            shape.max_bucket, shape.no_upscale)[0]
    cover_w, cover_h = buckets.cover_and_crop(width, height, bucket)
    return cover_w / width, 1 - bucket.width * bucket.height / (cover_w * cover_h)


def sizes(items: list[tuple[str, ImageFacts]], shape: Shape, max_upscale: float, max_cut: float, add: Add) -> None:
    for name, facts in items:
        scale, cut = _training_size(facts.width, facts.height, shape)
        if scale > max_upscale:
            add("upscaled", [name], f"{facts.width}x{facts.height} is enlarged {scale:.1f}x to train at "
                f"{shape.resolution}", "an enlarged image is soft and blocky: the LoRA learns that softness",
                f"use a larger original (at least {round(min(facts.width, facts.height) * scale / max_upscale)} "
                "px on the shorter side), lower resolution, or exclude it", "warning", actions=["exclude"])
        if cut > max_cut:
            how = "its bucket" if shape.bucketing else "the centre square (bucketing is off)"
            add("cropped", [name], f"{facts.width}x{facts.height}: cropping to {how} cuts away {cut:.0%} of it",
                "what is cut off never trains, and a subject cut at the edge is learned cut",
                "crop it yourself to a less extreme shape" + ("" if shape.bucketing else ", or turn bucketing on"),
                "info")


def transparency(items: list[tuple[str, ImageFacts]], minimum: float, add: Add) -> None:
    for name, facts in items:
        if facts.transparent >= minimum:
            add("transparent", [name], f"{facts.transparent:.0%} of it is transparent; training puts it on white",
                "the LoRA learns a flat white background (and white fringes) as part of the subject",
                "put the subject on a real background, or convert it yourself onto the colour you want", "warning",
                actions=["convert"])


def conversions(items: list[tuple[str, ImageFacts]], add: Add) -> None:
    for name, facts in items:
        notes = []
        if facts.mode == "CMYK":
            notes.append("CMYK colours are converted to RGB without a colour profile (colours shift)")
        if facts.mode.startswith("I") or facts.mode == "F":
            notes.append(f"{facts.mode} (16-bit or float) is scaled down to 8 bits")
        if facts.mode in ("P", "PA"):
            notes.append("a palette image is expanded to RGB (banding of a palette stays)")
        if facts.frames > 1:
            notes.append(f"only the first of its {facts.frames} frames is used")
        if notes:
            add("converted", [name], "; ".join(notes), "training converts it silently; what it trains on may "
                "not look like what you see", "convert it once to an RGB PNG and check it (one click: convert; "
                "the original is kept)", "info", actions=["convert"])
        if facts.orientation != 1:
            add("rotated", [name], f"EXIF orientation {facts.orientation}: training rotates it as a photo viewer "
                "would", "some tools ignore the EXIF rotation; if the stored pixels are what you meant, training "
                "sees it sideways", "check the thumbnail is upright; convert to bake the rotation in",
                "info", actions=["convert"])


def unreadable(items: list[tuple[str, ImageFacts]], add: Add) -> None:
    for name, facts in items:
        if facts.error:
            add("unreadable", [name], facts.error, "training refuses this file: it is left out",
                "re-export it as PNG or JPEG, or remove it", "error")


def _root(parent: list[int], i: int) -> int:
    while parent[i] != i:
        parent[i] = parent[parent[i]]
        i = parent[i]
    return i
