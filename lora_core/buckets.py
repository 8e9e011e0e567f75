"""Aspect-ratio bucketing: train each image near its own shape instead of cropping everything square.

A bucket is a (width, height) of about `resolution`² pixels whose sides are multiples of the model's pixel
multiple. Each image goes to the bucket closest to its aspect ratio (compared in log space, so portrait and
landscape are treated alike), is resized to cover it and cropped. Batches never mix buckets.

`BucketBatchSampler` is the data order: a pure function of (seed, epoch), so that a resumed run and every
process of a multi-process run see the same batches.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True, order=True)
class Bucket:
    width: int
    height: int

    @property
    def name(self) -> str:
        return f"{self.width}x{self.height}"


def make_buckets(resolution: int, multiple: int, min_side: int, max_side: int) -> list[Bucket]:
    """Every bucket whose area is at most resolution² and as close to it as the multiple allows, with sides
    in [min_side, max_side] (rounded to multiples). Always includes the square bucket."""
    area = resolution * resolution
    low = max(multiple, math.ceil(min_side / multiple) * multiple)
    high = max(low, max_side // multiple * multiple)
    found = {Bucket(resolution // multiple * multiple, resolution // multiple * multiple)}
    for width in range(low, high + 1, multiple):
        height = min(high, area // width // multiple * multiple)
        if height >= low:
            found.add(Bucket(width, height))
            found.add(Bucket(height, width))
    return sorted(found, key=lambda b: b.width / b.height)


def closest_bucket(width: int, height: int, buckets: list[Bucket]) -> Bucket:
    """The bucket nearest the image's aspect ratio; between equally near ones, the larger."""
    ratio = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b.width / b.height) - ratio), -b.width * b.height))


def no_upscale_bucket(width: int, height: int, bucket: Bucket, multiple: int) -> Bucket:
    """For an image smaller than its bucket: a bucket of the image's own size, rounded down to multiples,
    so the image is only ever cropped, never enlarged (kohya's bucket_no_upscale)."""
    if width * height >= bucket.width * bucket.height:
        return bucket
    return Bucket(max(multiple, width // multiple * multiple), max(multiple, height // multiple * multiple))


def assign(sizes: list[tuple[int, int]], resolution: int, multiple: int, min_side: int, max_side: int,
           no_upscale: bool = False) -> list[Bucket]:
    """The bucket of each image, given its (width, height)."""
    buckets = make_buckets(resolution, multiple, min_side, max_side)
    assigned = []
    for width, height in sizes:
        bucket = closest_bucket(width, height, buckets)
        assigned.append(no_upscale_bucket(width, height, bucket, multiple) if no_upscale else bucket)
    return assigned


def square(sizes: list[tuple[int, int]], resolution: int) -> list[Bucket]:
    """Bucketing off: every image in the one square bucket."""
    return [Bucket(resolution, resolution)] * len(sizes)


def table(assigned: list[Bucket]) -> dict[str, int]:
    """Bucket name -> image count, widest aspect first: what the dataset report shows."""
    counts: dict[Bucket, int] = {}
    for bucket in assigned:
        counts[bucket] = counts.get(bucket, 0) + 1
    return {bucket.name: counts[bucket] for bucket in sorted(counts, key=lambda b: (b.width / b.height, b.width))}


def cover_and_crop(width: int, height: int, bucket: Bucket) -> tuple[int, int]:
    """The size to resize an image to so that it covers the bucket (then cropped to it)."""
    scale = max(bucket.width / width, bucket.height / height)
    return max(bucket.width, round(width * scale)), max(bucket.height, round(height * scale))


def global_batches(buckets_of_entries: list[int], global_batch: int, seed: int, epoch: int) -> list[list[int]]:
    """One epoch's global batches of entry indices: a permutation drawn from (seed, epoch), split by bucket
    (keeping the permuted order), cut into batches of `global_batch`, and the batches shuffled."""
    import torch  # here: the page's server scans datasets and previews buckets without torch

    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(len(buckets_of_entries), generator=generator).tolist()
    by_bucket: dict[int, list[int]] = {}
    for entry in order:
        by_bucket.setdefault(buckets_of_entries[entry], []).append(entry)
    batches = [entries[start:start + global_batch] for entries in by_bucket.values()
               for start in range(0, len(entries), global_batch)]
    if len(by_bucket) == 1:  # one bucket: the plain permutation, in order
        return batches
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


def batches_per_epoch(buckets_of_entries: list, global_batch: int) -> int:
    """Global batches in one epoch: each bucket's entries in batches of `global_batch`, the last one short."""
    counts: dict = {}
    for bucket in buckets_of_entries:
        counts[bucket] = counts.get(bucket, 0) + 1
    return sum(math.ceil(count / global_batch) for count in counts.values())


class BucketBatchSampler:
    """Batches of (epoch, entry) pairs, each from one bucket, for `batch_size` per process.

    Each global batch (`batch_size * num_processes` entries of one bucket) is yielded as `num_processes`
    consecutive per-process batches; accelerate's sharding gives process i the i-th of each group, so N
    processes with batch b see exactly the samples of one process with batch N*b. A short last batch of a
    bucket is split the same way; a process whose share would be empty repeats an entry of that batch (a
    process cannot skip a step), which only happens with several processes.
    """

    batch_size = None  # tells accelerate the batches vary in length

    def __init__(self, buckets_of_entries: list[int], batch_size: int, seed: int, num_processes: int = 1):
        self.buckets_of_entries = buckets_of_entries
        self.per_process, self.num_processes = batch_size, num_processes
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _global(self) -> list[list[int]]:
        return global_batches(self.buckets_of_entries, self.per_process * self.num_processes, self.seed,
                              self.epoch)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for entries in self._global():
            for process in range(self.num_processes):
                share = entries[process * self.per_process:(process + 1) * self.per_process]
                yield [(self.epoch, entry) for entry in (share or entries[process % len(entries):][:1])]

    def __len__(self) -> int:
        return len(self._global()) * self.num_processes
