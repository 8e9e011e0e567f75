"""Several concepts in one dataset, and the regularisation images: one merged DatasetReport for the rest of the run.

`dataset_path` (with the run's trigger words, repeats and caption options) is concept 0; each of
`config.concepts` is scanned with its own trigger words and appended with its index in `ImageRecord.concept`;
the regularisation folder (`regularization_path`) comes last, as a concept marked `regularization`, whose
images keep their own captions (no trigger words) and whose loss is weighted by `prior_loss_weight`.
Everything downstream (buckets, latents, cached captions) works per image and needs nothing else; what varies
per concept (repeats, caption options, resolution, loss weight) is read from `report.concepts`.

Sampling: an epoch holds each image `repeats` times (entry order: the first pass over every image, then the
second pass over those with 2 or more repeats, ...; with one concept, exactly the images `repeats` times as
before). Regularisation images are balanced as sd-scripts does unless `regularization_repeats` is given: as many
regularisation entries as training entries per epoch, cycling through the class images (or taking the first
ones when there are more of them).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lora_core import buckets, dataset
from lora_core.config import TrainConfig
from lora_core.errors import UserError

NO_CAPTION_REASON = "a regularisation image needs a .txt caption (its class prompt, e.g. 'a red circle'); add one"


class ConceptError(UserError):
    """A concept's or the regularisation folder's problem, under its field (`concepts.1.path`, ...)."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(message)


@dataclass
class ConceptSpec:
    """One concept as the run uses it."""

    name: str  # the folder's name, as sd-scripts' ss_dataset_dirs keys it
    folder: str
    trigger_words: list[str]
    repeats: int
    shuffle_tags: bool
    keep_tokens: int
    caption_dropout: float
    resolution: int
    regularization: bool = False
    weight: float = 1.0  # the loss weight of its samples: prior_loss_weight for the regularisation images

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _first(config: TrainConfig) -> ConceptSpec:
    return ConceptSpec(_name(config.dataset_path), config.dataset_path, list(config.trigger_words), config.repeats,
                       config.shuffle_tags, config.keep_tokens, config.caption_dropout, config.resolution)


def _name(folder: str) -> str:
    return Path(folder).name or str(folder)


def specs(config: TrainConfig) -> list[ConceptSpec]:
    """The training concepts (not the regularisation images), dataset_path first."""
    found = [_first(config)]
    for item in config.concepts:
        found.append(ConceptSpec(_name(item.path), item.path, list(item.trigger_words), item.repeats,
                                 item.shuffle_tags, item.keep_tokens, item.caption_dropout,
                                 item.resolution or config.resolution))
    return found


def of_report(report: dataset.DatasetReport, config: TrainConfig) -> list[ConceptSpec]:
    """The report's concepts (a report scanned without `add_concepts`: just dataset_path's)."""
    return getattr(report, "concepts", None) or specs(config)


def add_concepts(report: dataset.DatasetReport, config: TrainConfig) -> dataset.DatasetReport:
    """Append every further concept's images and the regularisation images to `report` (dataset_path's, with
    its held-out images already taken out), and record the concepts in `report.concepts`."""
    found = specs(config)
    for index, spec in enumerate(found[1:], start=1):
        scanned = _scan(spec.folder, spec.trigger_words, config.trigger_placement, f"concepts.{index - 1}.path")
        _merge(report, scanned, index, spec.name)
    if config.regularization_path is not None:
        scanned = _scan(config.regularization_path, [], "none", "regularization_path", regularization=True)
        spec = ConceptSpec(_name(config.regularization_path), config.regularization_path, [], 0, False, 0, 0.0,
                           config.resolution, regularization=True, weight=config.prior_loss_weight)
        found.append(spec)
        _merge(report, scanned, len(found) - 1, spec.name)
        spec.repeats = config.regularization_repeats  # 0: balanced (entry_images)
    report.concepts = found
    return report


def _scan(folder: str, trigger_words: list[str], placement: str, field: str,
          regularization: bool = False) -> dataset.DatasetReport:
    try:
        scanned = dataset.scan(folder, trigger_words, placement)
    except dataset.DatasetError as error:
        raise ConceptError(field, str(error).replace("dataset_path", field)) from None
    if regularization:
        bare = [record for record in scanned.images if not record.caption_file or not record.caption]
        scanned.refused += [{"file": Path(record.path).name, "reason": NO_CAPTION_REASON} for record in bare]
        scanned.images = [record for record in scanned.images if record.caption_file and record.caption]
        if not scanned.images:
            raise ConceptError(field, f"no regularisation image in {folder} has a caption; {NO_CAPTION_REASON}")
    return scanned


def _merge(report: dataset.DatasetReport, scanned: dataset.DatasetReport, index: int, name: str) -> None:
    for record in scanned.images:
        record.concept = index
    report.images += scanned.images
    report.refused += [{**item, "file": f"{name}/{item['file']}"} for item in scanned.refused]
    report.ignored += [f"{name}/{file}" for file in scanned.ignored]
    report.warnings += [f"{name}: {warning}" for warning in scanned.warnings]


def entry_images(report: dataset.DatasetReport, config: TrainConfig) -> list[int]:
    """The image of each entry of an epoch (see the module's docstring for the order and the balance)."""
    found = of_report(report, config)
    concept_of = [record.concept for record in report.images]
    train = [i for i, concept in enumerate(concept_of) if not found[concept].regularization]
    most = max([found[concept_of[i]].repeats for i in train], default=1)
    entries = [i for rep in range(most) for i in train if found[concept_of[i]].repeats > rep]
    regular = [i for i, concept in enumerate(concept_of) if found[concept].regularization]
    if regular:
        repeats = found[concept_of[regular[0]]].repeats
        entries += regular * repeats if repeats else [regular[k % len(regular)] for k in range(len(entries))]
    return entries


def assign_buckets(report: dataset.DatasetReport, config: TrainConfig, multiple: int) -> list[buckets.Bucket]:
    """Each image's bucket, at its concept's resolution (the run's unless the concept sets its own), also
    recorded as the report's bucket table."""
    found = of_report(report, config)
    assigned: list[buckets.Bucket | None] = [None] * len(report.images)
    for resolution in sorted({spec.resolution for spec in found}):
        rows = [i for i, record in enumerate(report.images) if found[record.concept].resolution == resolution]
        if not rows:
            continue
        part = dataset.DatasetReport(report.folder, [report.images[i] for i in rows])
        for row, bucket in zip(rows, dataset.assign_buckets(part, config.model_copy(
                update={"resolution": resolution}), multiple), strict=True):
            assigned[row] = bucket
    report.buckets = buckets.table(assigned)  # type: ignore[arg-type]
    return assigned  # type: ignore[return-value]


def check_resolutions(config: TrainConfig, check) -> None:
    """Each concept's own resolution through the plan's `check(config)` (the model's step, the bucket range),
    its problem under `concepts.N.resolution`."""
    for index, item in enumerate(config.concepts):
        if item.resolution is None:
            continue
        field = f"concepts.{index}.resolution"
        if config.bucketing and not config.min_bucket_resolution <= item.resolution <= config.max_bucket_resolution:
            raise ConceptError(field, f"with bucketing, a concept's resolution {item.resolution} must lie between "
                               f"min_bucket_resolution {config.min_bucket_resolution} and max_bucket_resolution "
                               f"{config.max_bucket_resolution}")
        try:
            check(config.model_copy(update={"resolution": item.resolution}))
        except UserError as error:
            raise ConceptError(field, str(error)) from None


def per_step_captions(config: TrainConfig) -> bool:
    """Whether captions are encoded every step (some concept shuffles its tags, or a text encoder trains)."""
    return config.train_text_encoder or any(spec.shuffle_tags for spec in specs(config))


def any_dropout(config: TrainConfig) -> bool:
    return any(spec.caption_dropout > 0 for spec in specs(config))


def counts(report: dataset.DatasetReport, config: TrainConfig) -> list[dict[str, Any]]:
    """Per concept: its folder, trigger words, images, repeats and entries per epoch (the dataset event and
    the report show these)."""
    found, entries = of_report(report, config), entry_images(report, config)
    images = [0] * len(found)
    per_epoch = [0] * len(found)
    for record in report.images:
        images[record.concept] += 1
    for image in entries:
        per_epoch[report.images[image].concept] += 1
    return [{"name": spec.name, "folder": spec.folder, "trigger_words": spec.trigger_words,
             "regularization": spec.regularization, "num_images": images[index], "repeats": spec.repeats,
             "entries_per_epoch": per_epoch[index], "resolution": spec.resolution}
            for index, spec in enumerate(found)]


def metadata(report: dataset.DatasetReport, config: TrainConfig) -> dict[str, str]:
    """sd-scripts' fields for the dataset's folders: ss_dataset_dirs per concept, ss_reg_dataset_dirs,
    ss_num_reg_images and ss_prior_loss_weight."""
    rows = counts(report, config)
    train = {row["name"]: {"n_repeats": row["repeats"], "img_count": row["num_images"]}
             for row in rows if not row["regularization"]}
    regular = {row["name"]: {"n_repeats": row["repeats"] or row["entries_per_epoch"] // max(1, row["num_images"]),
                             "img_count": row["num_images"]} for row in rows if row["regularization"]}
    fields = {"ss_dataset_dirs": json.dumps(train), "ss_reg_dataset_dirs": json.dumps(regular),
              "ss_num_train_images": str(sum(row["entries_per_epoch"] for row in rows if not row["regularization"])),
              "ss_num_reg_images": str(sum(row["entries_per_epoch"] for row in rows if row["regularization"]))}
    if regular:
        fields["ss_prior_loss_weight"] = str(config.prior_loss_weight)
    if config.preservation_prompt is not None:
        fields["lora_studio.preservation_prompt"] = config.preservation_prompt
        fields["lora_studio.preservation_weight"] = str(config.preservation_weight)
    return fields


def sample_weights(image_weights: list[float], batch_images, device) -> Any:
    """Each sample's loss weight (its concept's: prior_loss_weight for a regularisation image), or None when
    every image weighs 1 (the plain mean, as before)."""
    if all(weight == 1.0 for weight in image_weights):
        return None
    import torch

    return torch.tensor(image_weights, device=device)[batch_images.to(device)]


def doctor_configs(config: TrainConfig) -> list[tuple[str, TrainConfig]]:
    """(folder, the config as that folder trains) for each further concept and the regularisation folder, for
    the dataset doctor (`python -m lora_core doctor DATASET --config FILE` checks DATASET as dataset_path and
    then each of these). The class images are checked without trigger words (they have none)."""
    alone = {"concepts": [], "regularization_path": None, "regularization_repeats": 0,
             "validation_images": None, "validation_dataset_path": None}
    found = [(spec.folder, config.model_copy(update={
        **alone, "dataset_path": spec.folder, "trigger_words": spec.trigger_words, "resolution": spec.resolution,
        "repeats": spec.repeats, "shuffle_tags": spec.shuffle_tags, "keep_tokens": spec.keep_tokens,
        "caption_dropout": spec.caption_dropout})) for spec in specs(config)[1:]]
    if config.regularization_path is not None:
        found.append((config.regularization_path, config.model_copy(update={
            **alone, "dataset_path": config.regularization_path, "trigger_words": [], "trigger_placement": "none"})))
    return found


def entry_buckets(report: dataset.DatasetReport, config: TrainConfig, assigned: list[buckets.Bucket]) -> list:
    """The bucket of each entry of an epoch (entry_images)."""
    return [assigned[image] for image in entry_images(report, config)]
