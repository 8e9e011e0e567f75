"""Which images the validation loss holds out (validation_images or validation_dataset_path), apart from the
loss itself (validation.py), so that the page checks a form's hold-out before it queues a job with the rule the
run plan applies, without loading a model."""

from __future__ import annotations

import hashlib
from pathlib import Path

from lora_core import dataset
from lora_core.config import TrainConfig
from lora_core.errors import UserError


class HeldOutError(UserError):
    """The held-out images cannot be had as asked; `field` is the option at fault."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(message)


def held_out_count(option: int | float, num_images: int) -> int:
    """Images to hold out: a count as given, a fraction of `num_images` rounded (at least one)."""
    return option if isinstance(option, int) else max(1, round(option * num_images))


def split(report: dataset.DatasetReport, config: TrainConfig) -> dataset.DatasetReport | None:
    """The held-out images as a report of their own (None when none are asked for). With validation_images
    they are taken out of `report.images`, which keeps the rest in order."""
    if config.validation_dataset_path is not None:
        return _scan_folder(config)
    if config.validation_images is None:
        return None
    images = report.images
    count = held_out_count(config.validation_images, len(images))
    if count >= len(images):
        raise HeldOutError("validation_images", f"holding out {count} of the {len(images)} usable images in "
                           f"{report.folder} leaves none to train on; hold out fewer (a count below "
                           f"{len(images)} or a smaller fraction), or give validation_dataset_path instead")
    order = sorted(range(len(images)), key=lambda i: hashlib.sha256(Path(images[i].path).name.encode()).digest())
    chosen = set(order[:count])
    report.images = [record for i, record in enumerate(images) if i not in chosen]
    return dataset.DatasetReport(folder=report.folder, images=[images[i] for i in sorted(chosen)])


def _scan_folder(config: TrainConfig) -> dataset.DatasetReport:
    folder = Path(str(config.validation_dataset_path))
    if not folder.is_dir():
        raise HeldOutError("validation_dataset_path", f"validation_dataset_path {folder} is not a folder; point it "
                           "at a folder of held-out images with optional .txt captions")
    try:
        return dataset.scan(folder, config.trigger_words, config.trigger_placement)
    except dataset.DatasetError as error:
        raise HeldOutError("validation_dataset_path", str(error)) from None
