"""The data order and the per-step choices: which entries make each batch, and what is done to each one.

`buckets.BucketBatchSampler` yields batches of (epoch, entry) keys; `Collate` turns one into a `Batch` with
every per-step choice made on the host (caption dropout, flip, crop, tag order, and whatever the latent
source draws), each from a generator seeded by (seed, epoch, entry) and never the global RNG: a resumed run
and every process of a multi-process run make the same choices. Entry e is image `Layout.entry_images[e]`
(each image its concept's `repeats` times per epoch, lora_core/concepts.py; with one concept, e % num_images),
and each sample's caption options are its concept's.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Protocol

import torch

from lora_core import buckets, captions, concepts, dataset
from lora_core.config import TrainConfig


def seed_of(*parts: object) -> int:
    """A well-mixed 63-bit seed from any tuple of values (torch generators seeded with nearby integers
    give correlated first draws)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") & (2**63 - 1)


@dataclass
class Batch:
    """One micro-batch of entries of one bucket, with the per-step choices made on the host."""

    images: torch.Tensor  # int64 per sample: index of the image in the dataset report
    flips: torch.Tensor  # bool per sample
    drops: torch.Tensor  # bool per sample: the caption is dropped (empty)
    time_ids: torch.Tensor  # float per sample: (orig h, orig w, crop top, crop left, target h, target w)
    bucket: int  # index into Layout.buckets; the same for every sample
    captions: list[str] | None = None  # when captions vary per step; None means the cached embeddings
    latent_inputs: dict[str, torch.Tensor] = field(default_factory=dict)  # what the latent source loaded
    masks: torch.Tensor | None = None  # uint8 (N, 1, H, W) loss masks cut as the pixels (mask_source; masks.py)

    def _map(self, change: Callable[[torch.Tensor], torch.Tensor]) -> Batch:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values["latent_inputs"] = {name: change(t) for name, t in self.latent_inputs.items()}
        return Batch(**{name: change(v) if torch.is_tensor(v) else v for name, v in values.items()})

    def to(self, device: torch.device, non_blocking: bool = False) -> Batch:  # accelerate moves a batch by .to
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> Batch:  # the DataLoader pins a batch by .pin_memory
        return self._map(lambda t: t.pin_memory())


class Layout:
    """Where each image sits: its bucket, its row among the bucket's images, the size it is resized to
    (covering the bucket) and where the bucket-sized crop is cut."""

    def __init__(self, config: TrainConfig, report: dataset.DatasetReport, assigned: list[buckets.Bucket]):
        self.records = report.images
        self.buckets = sorted(set(assigned))
        self.bucket_of_image = [self.buckets.index(bucket) for bucket in assigned]
        seen: dict[int, int] = {}
        self.row_in_bucket = []  # images are numbered within their bucket in dataset order
        for bucket in self.bucket_of_image:
            self.row_in_bucket.append(seen.get(bucket, 0))
            seen[bucket] = self.row_in_bucket[-1] + 1
        self.covers = [buckets.cover_and_crop(r.width, r.height, assigned[i]) for i, r in enumerate(self.records)]
        self.variants = 2 if config.flip_horizontal else 1  # cached latents: one per side
        self.concepts = concepts.of_report(report, config)
        self.entry_images = concepts.entry_images(report, config)
        self.image_weights = [self.concepts[record.concept].weight for record in self.records]  # loss weights

    def bucket(self, image: int) -> buckets.Bucket:
        return self.buckets[self.bucket_of_image[image]]

    def crop_origin(self, image: int, generator: torch.Generator | None) -> tuple[int, int]:
        """(top, left) of the bucket-sized crop in the covering image: centred, or random when a generator
        is given."""
        bucket = self.bucket(image)
        width, height = self.covers[image]
        if generator is None:
            return (height - bucket.height) // 2, (width - bucket.width) // 2
        top = int(torch.randint(0, height - bucket.height + 1, (), generator=generator))
        left = int(torch.randint(0, width - bucket.width + 1, (), generator=generator))
        return top, left

    def concept(self, image: int) -> concepts.ConceptSpec:
        return self.concepts[self.records[image].concept]

    @property
    def entry_buckets(self) -> list[int]:
        """The bucket of each entry."""
        return [self.bucket_of_image[image] for image in self.entry_images]


class Keys(torch.utils.data.Dataset):
    """The DataLoader's dataset: each key the sampler yields is its own item; `Collate` does the work."""

    def __init__(self, size: int):
        self.size = size

    def __getitem__(self, key):
        return key

    def __len__(self) -> int:
        return self.size


def sampler(config: TrainConfig, layout: Layout, num_processes: int) -> buckets.BucketBatchSampler:
    """Same-bucket batches, a function of (seed, epoch)."""
    return buckets.BucketBatchSampler(layout.entry_buckets, config.batch_size, config.seed, num_processes)


@dataclass
class Choice:
    """What was decided for one sample of one step."""

    image: int
    flip: bool
    drop: bool
    top: int
    left: int


class HostLoader(Protocol):
    """What a latent source reads or draws on the host for one sample (after the other choices)."""

    def load(self, choice: Choice, generator: torch.Generator) -> dict[str, torch.Tensor]: ...


class MaskLoader(Protocol):
    """The loss mask of one sample, cut as its pixels are (masks.MaskSource)."""

    def load(self, choice: Choice) -> torch.Tensor: ...


class Collate:
    """The DataLoader's collate_fn: keys -> a Batch, every choice drawn in a fixed order from the key's own
    generator, each draw only when its option is on."""

    def __init__(self, config: TrainConfig, layout: Layout, latents: HostLoader, masks: MaskLoader | None = None):
        self.config, self.layout, self.latents, self.masks = config, layout, latents, masks
        self.per_step_captions = concepts.per_step_captions(config)

    def __call__(self, keys: list[tuple[int, int]]) -> Batch:
        config, layout = self.config, self.layout
        choices, time_ids, texts, inputs = [], [], [], []
        for epoch, entry in keys:
            image = layout.entry_images[entry]
            concept = layout.concept(image)
            generator = torch.Generator().manual_seed(seed_of(config.seed, epoch, entry))
            drop = captions.dropped(concept.caption_dropout, generator)
            flip = config.flip_horizontal and bool(torch.rand((), generator=generator) < 0.5)
            top, left = layout.crop_origin(image, generator if config.crop == "random" else None)
            choice = Choice(image, flip, drop, top, left)
            record, bucket = layout.records[image], layout.bucket(image)
            mirrored_left = layout.covers[image][0] - bucket.width - left if flip else left  # as seen flipped
            time_ids.append([record.height, record.width, top, mirrored_left, bucket.height, bucket.width])
            if self.per_step_captions:
                texts.append(self.caption(record.caption, drop, generator, concept))
            inputs.append(self.latents.load(choice, generator))
            choices.append(choice)
        masks = torch.stack([self.masks.load(c) for c in choices]) if self.masks is not None else None
        return Batch(torch.tensor([c.image for c in choices]), torch.tensor([c.flip for c in choices]),
                     torch.tensor([c.drop for c in choices]), torch.tensor(time_ids, dtype=torch.float32),
                     layout.bucket_of_image[choices[0].image], captions=texts or None,
                     latent_inputs={name: torch.stack([i[name] for i in inputs]) for name in inputs[0]}, masks=masks)

    def caption(self, caption: str, drop: bool, generator: torch.Generator,
                concept: concepts.ConceptSpec) -> str:
        """This step's caption: empty when dropped, its tags shuffled with its concept's shuffle_tags (a
        trained text encoder sees every caption every step)."""
        if not concept.shuffle_tags:
            return "" if drop else caption
        keep = captions.kept_tags(concept.trigger_words, concept.keep_tokens, self.config.trigger_placement)
        return "" if drop else captions.shuffle_tags(caption, keep, generator)
