"""Masked loss (mask_source): per-image masks that say which pixels the loss counts.

- 'file': a grey-scale `NAME.mask.png` beside the image `NAME.<ext>` (white: trains, black: does not; read as
  8-bit luminance), of the image's own size. 'alpha': the image's alpha channel. An image without a mask trains
  whole (the dataset report's warnings list them). Mask files are not images to train on: `dataset.scan` and the
  dataset doctor pass over `*.mask.png`.
- Each mask goes through exactly the image's geometry: EXIF orientation, resized (bicubic, as
  `dataset.load_covering`) to cover the image's bucket, then cut and mirrored per sample with the same `Choice`
  (batches.py) as the pixels or the cached latent of that sample, so it stays aligned whatever the latent cache
  holds (a cached flip variant gets the mirrored mask). The covering masks are kept in host memory (one byte per
  pixel) and cut in the DataLoader's collate.
- `loss_weights`: the step's mask averaged ('area') down to the latent grid, as sd-scripts' apply_masked_loss,
  made a weight `mask_floor + (1 - mask_floor) x mask`; the objective multiplies each latent pixel's squared error
  by it and takes the mean over all of them. Like sd-scripts, that mean is not divided by the mask's area: a
  small mask gives a small loss (and smaller steps), and the held-out validation loss stays unmasked.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from lora_core import dataset
from lora_core.batches import Batch, Choice, Layout
from lora_core.config import TrainConfig

FULL = 255
log = logging.getLogger("lora_core")


def mask_file(image_path: Path) -> Path:
    """`folder/cat.jpg` -> `folder/cat.mask.png`."""
    return image_path.with_name(image_path.stem + dataset.MASK_SUFFIX)


def _read(path: Path, folder: Path) -> Image.Image:
    try:
        dataset._inside_folder(path, folder)
        with dataset.open_regular(path) as handle:
            image = Image.open(handle)
            image.load()
    except (ValueError, OSError, SyntaxError) as error:
        raise dataset.DatasetError(f"the mask {path} cannot be read ({error}); fix or remove it") from None
    return ImageOps.exif_transpose(image)


def read_mask(record: dataset.ImageRecord, source: str) -> Image.Image | None:
    """The image's mask as an 'L' image of the image's size (after EXIF orientation), or None: no mask, the
    whole image trains."""
    image_path = Path(record.path)
    if source == "file":
        path = mask_file(image_path)
        if not os.path.lexists(path):
            return None
        mask = dataset.to_rgb(_read(path, image_path.parent)).convert("L")  # 16-bit and palette PNGs too
    else:
        image = _read(image_path, image_path.parent)
        if image.mode == "P" and "transparency" in image.info:
            image = image.convert("RGBA")
        if image.mode not in ("RGBA", "LA", "PA"):
            return None
        path, mask = image_path, image.convert("RGBA").getchannel("A")
    if mask.size != (record.width, record.height):
        raise dataset.DatasetError(f"the mask {path} is {mask.width}x{mask.height} but its image {image_path.name} "
                                   f"is {record.width}x{record.height}; draw the mask at the image's size")
    return mask


def covering_mask(record: dataset.ImageRecord, cover: tuple[int, int], source: str) -> torch.Tensor | None:
    """The mask resized to `cover` (the size the image is resized to before its crop), uint8 (H, W)."""
    mask = read_mask(record, source)
    if mask is None:
        return None
    mask = mask.resize(cover, Image.Resampling.BICUBIC, reducing_gap=3.0)
    return torch.from_numpy(np.asarray(mask, dtype=np.uint8).copy())


class MaskSource:
    """Each image's covering mask (None: no mask), cut for one sample as the sample's pixels are cut."""

    def __init__(self, layout: Layout, source: str):
        self.layout = layout
        self.covers = [covering_mask(record, layout.covers[i], source) for i, record in enumerate(layout.records)]

    @property
    def unmasked(self) -> list[str]:
        return [record.path for record, cover in zip(self.layout.records, self.covers, strict=True) if cover is None]

    def load(self, choice: Choice) -> torch.Tensor:
        """uint8 (1, bucket height, bucket width): the mask of the sample `choice` describes."""
        bucket = self.layout.bucket(choice.image)
        cover = self.covers[choice.image]
        if cover is None:
            return torch.full((1, bucket.height, bucket.width), FULL, dtype=torch.uint8)
        crop = cover[choice.top:choice.top + bucket.height, choice.left:choice.left + bucket.width]
        return (crop.flip(-1) if choice.flip else crop).unsqueeze(0)


def check_dataset(config: TrainConfig, report: dataset.DatasetReport) -> None:
    """Before any model loads (the plan, --validate-only): every mask readable and of its image's size, and at
    least one image masked."""
    if config.mask_source == "none":
        return
    if all(read_mask(record, config.mask_source) is None for record in report.images):
        _refuse_no_masks(config)


def _refuse_no_masks(config: TrainConfig) -> None:
    where = "no `NAME.mask.png` beside any image" if config.mask_source == "file" else "no image with an alpha channel"
    raise dataset.DatasetError(f"mask_source {config.mask_source!r} but {config.dataset_path} has {where}; add the "
                               "masks, or set mask_source 'none'")


def make_source(config: TrainConfig, layout: Layout) -> MaskSource | None:
    if config.mask_source == "none":
        return None
    source = MaskSource(layout, config.mask_source)
    if len(source.unmasked) == len(layout.records):
        _refuse_no_masks(config)
    if source.unmasked:
        names = ", ".join(Path(path).name for path in source.unmasked[:10])
        log.warning("mask_source %r: %d images have no mask and train whole: %s", config.mask_source,
                    len(source.unmasked), names)
    return source


def loss_weights(batch: Batch, latents: torch.Tensor, config: TrainConfig) -> torch.Tensor | None:
    """The per-latent-pixel loss weights (N, 1, h, w) of a masked batch; None without masks."""
    if batch.masks is None:
        return None
    mask = batch.masks.to(latents.device, torch.float32) / FULL
    mask = F.interpolate(mask, size=latents.shape[-2:], mode="area")
    return config.mask_floor + (1.0 - config.mask_floor) * mask


def metadata(config: TrainConfig) -> dict[str, str]:
    """sd-scripts' `ss_masked_loss` (and its alpha-mask flag), plus how the studio weighted the rest."""
    if config.mask_source == "none":
        return {"ss_masked_loss": "False"}
    return {"ss_masked_loss": "True", "ss_alpha_mask": str(config.mask_source == "alpha"),
            "lora_studio.mask_source": config.mask_source, "lora_studio.mask_floor": str(config.mask_floor)}
