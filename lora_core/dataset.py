"""The dataset: scan a folder of images and captions, and turn each image into a training tensor.

Every file gets a verdict in the report: used (with its caption and size) or refused (with the reason).
Images are decoded defensively: the pixel count is checked before decoding, EXIF orientation is applied,
and every mode (RGBA, P, L, CMYK, 16-bit, animated) is converted properly to 8-bit RGB.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from lora_core import buckets, captions
from lora_core.errors import UserError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}
MAX_PIXELS = 64_000_000  # refuse before decoding: a 64 Mpx RGB image is already ~200 MB in memory
MIN_SIDE = 8


class DatasetError(UserError):
    field = "dataset_path"


@dataclass
class ImageRecord:
    path: str
    caption: str
    width: int
    height: int
    caption_file: bool


@dataclass
class DatasetReport:
    folder: str
    images: list[ImageRecord] = field(default_factory=list)
    refused: list[dict[str, str]] = field(default_factory=list)  # {"file", "reason"}
    ignored: list[str] = field(default_factory=list)  # files that are neither images nor captions
    buckets: dict[str, int] = field(default_factory=dict)  # bucket "WxH" -> images, once assigned

    @property
    def captioned(self) -> int:
        return sum(record.caption_file for record in self.images)

    def to_dict(self) -> dict:
        return {"folder": self.folder, "num_images": len(self.images), "num_captioned": self.captioned,
                "images": [asdict(record) for record in self.images], "refused": self.refused,
                "ignored": self.ignored, "buckets": self.buckets}


def build_caption(trigger_words: list[str], caption: str, placement: str = "first") -> str:
    """Trigger words go in front of the caption, or are the caption where there is none."""
    return captions.with_trigger(trigger_words, caption, placement)


def _read_caption(image_path: Path) -> tuple[str, bool]:
    caption_path = image_path.with_suffix(".txt")
    if not caption_path.is_file():
        return "", False
    raw = caption_path.read_bytes()
    try:
        return raw.decode("utf-8-sig").strip(), True
    except UnicodeDecodeError:
        return raw.decode("latin-1").strip(), True


def open_image(path: Path) -> Image.Image:
    """Decode one image to 8-bit RGB, or raise ValueError with the reason."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(path)
            width, height = image.size
            if width * height > MAX_PIXELS:
                raise ValueError(f"{width}x{height} is over the {MAX_PIXELS // 1_000_000} Mpx limit; downscale it")
            if min(width, height) < MIN_SIDE:
                raise ValueError(f"{width}x{height} is too small to train on (under {MIN_SIDE} px)")
            image.seek(0)  # animated GIF/WebP: the first frame
            image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ValueError(f"over the {MAX_PIXELS // 1_000_000} Mpx limit ({error}); downscale it") from None
    except UnidentifiedImageError:
        raise ValueError("not a readable image (unknown format or not an image)") from None
    except (OSError, SyntaxError, EOFError) as error:
        raise ValueError(f"damaged or truncated image ({error})") from None
    return to_rgb(ImageOps.exif_transpose(image))


def to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if array.max() > 255 else 255.0
        image = Image.fromarray((array / peak * 255.0).clip(0, 255).astype(np.uint8), "L")
    if image.mode == "F":
        array = np.asarray(image, dtype=np.float64)
        image = Image.fromarray((array.clip(0, 1) * 255.0).astype(np.uint8), "L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    return image.convert("RGB")


def scan(folder: str | Path, trigger_words: list[str], trigger_placement: str = "first") -> DatasetReport:
    """Look at every file in the folder (not recursive) and decide which images are usable."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"dataset_path {folder} is not a folder; point it at a folder of images "
                           "with optional .txt captions")
    report = DatasetReport(folder=str(folder))
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or path.is_dir():
            continue
        suffix = path.suffix.lower()
        if suffix == ".txt":
            continue
        if suffix not in IMAGE_SUFFIXES:
            report.ignored.append(path.name)
            continue
        try:
            if path.is_symlink() and not path.resolve().is_relative_to(folder.resolve()):
                raise ValueError("symbolic link that points outside the dataset folder")
            image = open_image(path)
        except ValueError as error:
            report.refused.append({"file": path.name, "reason": str(error)})
            continue
        caption, has_file = _read_caption(path)
        report.images.append(ImageRecord(str(path), build_caption(trigger_words, caption, trigger_placement),
                                         image.width, image.height, has_file))
    if not report.images:
        reasons = "; ".join(f"{item['file']}: {item['reason']}" for item in report.refused[:5])
        raise DatasetError(f"no usable image in {folder} (supported: {', '.join(sorted(IMAGE_SUFFIXES))})"
                           + (f"; refused: {reasons}" if reasons else ""))
    return report


def resize_and_crop(image: Image.Image, size: int) -> Image.Image:
    """Scale the shorter side to `size`, then centre-crop the longer one."""
    scale = size / min(image.size)
    width, height = max(size, round(image.width * scale)), max(size, round(image.height * scale))
    image = image.resize((width, height), Image.Resampling.BICUBIC, reducing_gap=3.0)
    left, top = (width - size) // 2, (height - size) // 2
    return image.crop((left, top, left + size, top + size))


def assign_buckets(report: DatasetReport, config, multiple: int) -> list[buckets.Bucket]:
    """Each image's bucket under `config` (a TrainConfig), also recorded as the report's bucket table."""
    sizes = [(record.width, record.height) for record in report.images]
    if config.bucketing:
        assigned = buckets.assign(sizes, config.resolution, multiple, config.min_bucket_resolution,
                                  config.max_bucket_resolution, config.bucket_no_upscale)
    else:
        assigned = buckets.square(sizes, config.resolution)
    report.buckets = buckets.table(assigned)
    return assigned


def load_covering(record: ImageRecord, bucket: buckets.Bucket):
    """The image resized to cover `bucket` (not yet cropped), as a uint8 tensor (3, H, W)."""
    import torch

    size = buckets.cover_and_crop(record.width, record.height, bucket)
    image = open_image(Path(record.path)).resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).transpose(2, 0, 1).copy())


def load_pixels(record: ImageRecord, size: int):
    """The image as a float tensor in [-1, 1], shape (3, size, size)."""
    import torch

    image = resize_and_crop(open_image(Path(record.path)), size)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array.transpose(2, 0, 1).copy())
