"""The dataset: scan a folder of images and captions, and turn each image into a training tensor.

Every file gets a verdict in the report: used (with its caption and size) or refused (with the reason).
Nothing but a regular file is ever opened (a FIFO, socket or device with an image name would block the scan
or never end; a link loop is refused like any unreadable file). Images are decoded defensively: the pixel
count and the aspect ratio are checked before decoding (so what training resizes them to stays bounded),
EXIF orientation is applied, and every mode (RGBA, P, L, CMYK, 16-bit, animated) is converted properly to
8-bit RGB. Captions are cut to what a text encoder can use, with a warning naming the file.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from lora_core import buckets, captions
from lora_core.errors import UserError

log = logging.getLogger("lora_core")

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}
MASK_SUFFIX = ".mask.png"  # `cat.mask.png` is the loss mask of `cat.png` (masks.py), never an image to train on
MAX_PIXELS = 64_000_000  # refuse before decoding: a 64 Mpx RGB image is already ~200 MB in memory
MIN_SIDE = 8
REDUCIBLE = {"L", "LA", "I", "F", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr"}  # modes Image.reduce takes
SCAN_SLOTS = threading.BoundedSemaphore(2)  # scans at once in one process (a page server's users share it)
# Training scales the shorter side to the resolution (up to 2048): a 10:1 image then covers at most 42 Mpx.
# Buckets are at most 8:1 (min_bucket 256, max 2048), so anything longer is cropped away in any case.
MAX_ASPECT_RATIO = 10.0
# CLIP reads 75 tokens (sd-scripts' long prompts 225, ~900 characters); the rest is headroom for shuffled tags.
MAX_CAPTION_CHARS = 2000
MAX_TAGS = 256
MAX_CAPTION_FILE_BYTES = 64 * 1024  # more is not a caption; the file is read only this far
# Files listed here (one name a line, '#' starts a comment) are left out of training but kept on disk: the
# dataset doctor's "exclude" writes it, and a person may edit it. Each listed image is refused with this reason.
EXCLUDE_FILE = ".lora-studio-exclude"
EXCLUDED_REASON = f"excluded from training in {EXCLUDE_FILE} (the file is kept; remove its line to train on it)"
FILE_KINDS = {stat.S_IFIFO: "a named pipe (FIFO)", stat.S_IFSOCK: "a socket", stat.S_IFCHR: "a character device",
              stat.S_IFBLK: "a block device", stat.S_IFDIR: "a folder"}


class DatasetError(UserError):
    field = "dataset_path"


@dataclass
class ImageRecord:
    path: str
    caption: str
    width: int
    height: int
    caption_file: bool
    concept: int = 0  # index into DatasetReport.concepts (lora_core/concepts.py); 0 is dataset_path's


@dataclass
class DatasetReport:
    folder: str
    images: list[ImageRecord] = field(default_factory=list)
    refused: list[dict[str, str]] = field(default_factory=list)  # {"file", "reason"}
    ignored: list[str] = field(default_factory=list)  # files that are neither images nor captions
    buckets: dict[str, int] = field(default_factory=dict)  # bucket "WxH" -> images, once assigned
    warnings: list[str] = field(default_factory=list)  # e.g. a caption cut to MAX_CAPTION_CHARS
    concepts: list = field(default_factory=list)  # concepts.ConceptSpec of each concept, once add_concepts ran

    @property
    def captioned(self) -> int:
        return sum(record.caption_file for record in self.images)

    def to_dict(self) -> dict:
        return {"folder": self.folder, "num_images": len(self.images), "num_captioned": self.captioned,
                "images": [asdict(record) for record in self.images], "refused": self.refused,
                "ignored": self.ignored, "buckets": self.buckets, "warnings": self.warnings}


def build_caption(trigger_words: list[str], caption: str, placement: str = "first") -> str:
    """Trigger words go in front of the caption, or are the caption where there is none."""
    return captions.with_trigger(trigger_words, caption, placement)


def _read_caption(image_path: Path, folder: Path, warn: list[str]) -> tuple[str, bool]:
    """The caption beside an image (a regular file inside the folder), cut to what training can use."""
    caption_path = image_path.with_suffix(".txt")
    if not os.path.lexists(caption_path):
        return "", False
    try:
        _inside_folder(caption_path, folder)
        with open_regular(caption_path) as handle:
            raw = handle.read(MAX_CAPTION_FILE_BYTES + 1)
    except ValueError as error:
        warn.append(f"{caption_path.name}: not used as a caption ({error})")
        return "", False
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = raw[:MAX_CAPTION_FILE_BYTES].decode("latin-1")
    caption, cut = limit_caption(text)
    if cut or len(raw) > MAX_CAPTION_FILE_BYTES:
        warn.append(f"{caption_path.name}: caption cut to {len(caption)} characters and "
                    f"{len(captions.split_tags(caption))} tags (at most {MAX_CAPTION_CHARS} characters and "
                    f"{MAX_TAGS} tags; a text encoder reads about 75 tokens)")
    return caption, True


def limit_caption(text: str) -> tuple[str, bool]:
    """The caption with whitespace collapsed, cut at a tag boundary to MAX_CAPTION_CHARS and MAX_TAGS; and
    whether anything was cut."""
    caption = " ".join(text[:MAX_CAPTION_CHARS * 4].split())
    cut = len(text) > MAX_CAPTION_CHARS * 4
    parts = caption.split(",")
    if len(parts) > MAX_TAGS:
        caption, cut = ",".join(parts[:MAX_TAGS]), True
    if len(caption) > MAX_CAPTION_CHARS:
        head = caption[:MAX_CAPTION_CHARS]
        caption, cut = (head.rsplit(",", 1)[0] if "," in head else head), True
    return caption.strip().rstrip(",").strip(), cut


def open_regular(path: Path):
    """Open a regular file for reading, or raise ValueError saying what it is instead. Checked before the
    open (a socket cannot be opened at all) and after it on the open file, which was opened O_NONBLOCK so
    that a FIFO swapped in between the two never waits for a writer."""
    try:
        _require_regular(os.stat(path).st_mode)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as error:
        raise ValueError(f"cannot be opened ({error.strerror or error})") from None
    try:
        _require_regular(os.fstat(fd).st_mode)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "rb")


def _require_regular(mode: int) -> None:
    if not stat.S_ISREG(mode):
        raise ValueError(f"{FILE_KINDS.get(stat.S_IFMT(mode), 'not a regular file')}; only regular files are read")


def _inside_folder(path: Path, folder: Path) -> None:
    """A link must resolve (no loop, no dangling) to a file inside the dataset folder; ValueError if not."""
    if not path.is_symlink():
        return
    try:
        target = path.resolve(strict=True)
    except RuntimeError:  # Python 3.11 says "Symlink loop"
        raise ValueError("a symbolic link loop") from None
    except OSError as error:
        reason = "a symbolic link loop" if error.errno == 40 else "a symbolic link to nothing (dangling)"
        raise ValueError(reason) from None
    if not target.is_relative_to(folder.resolve()):
        raise ValueError("symbolic link that points outside the dataset folder")


def size_problem(width: int, height: int) -> str | None:
    """Why an image of this size cannot be trained on (before decoding it), or None. Uploads use it too."""
    if width * height > MAX_PIXELS:
        return f"{width}x{height} is over the {MAX_PIXELS // 1_000_000} Mpx limit; downscale it"
    if min(width, height) < MIN_SIDE:
        return f"{width}x{height} is too small to train on (under {MIN_SIDE} px)"
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        return (f"{width}x{height} is more than {MAX_ASPECT_RATIO:g}:1; scaled to the training resolution it "
                "would need gigabytes. Crop it to a less extreme shape")
    return None


@contextmanager
def _image_errors() -> Iterator[None]:
    """What Pillow raises for a file that is not a usable image, as ValueError with the reason."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ValueError(f"over the {MAX_PIXELS // 1_000_000} Mpx limit ({error}); downscale it") from None
    except UnidentifiedImageError:
        raise ValueError("not a readable image (unknown format or not an image)") from None
    except (OSError, SyntaxError, EOFError) as error:
        raise ValueError(f"damaged or truncated image ({error})") from None


def open_image(path: Path, max_side: int | None = None) -> Image.Image:
    """Decode one image to 8-bit RGB, or raise ValueError with the reason. `max_side`: only a copy about this
    big is needed (a thumbnail): a JPEG is decoded downscaled (draft), anything else reduced right after
    decoding, before the conversion that costs several bytes a pixel."""
    with _image_errors(), open_regular(path) as handle:
        image = Image.open(handle)
        if (problem := size_problem(*image.size)) is not None:
            raise ValueError(problem)
        image.seek(0)  # animated GIF/WebP: the first frame
        if max_side:
            image.draft("RGB", (max_side, max_side))
        image.load()
    if max_side and (factor := max(image.size) // (2 * max_side)) > 1:
        size = (max(1, image.width // factor), max(1, image.height // factor))
        # reduce averages, but not every mode has it (16-bit, palette, 1-bit): those are sampled instead
        image = image.reduce(factor) if image.mode in REDUCIBLE else image.resize(size, Image.Resampling.NEAREST)
    return to_rgb(ImageOps.exif_transpose(image))


def image_size(path: Path) -> tuple[int, int]:
    """The size an image trains at (EXIF rotation applied), from its header, without decoding it whole; raises
    ValueError like open_image. Damage is looked for cheaply: a JPEG is decoded at an eighth of its size,
    other formats are checked by Pillow's verify (a PNG's chunk checksums), never decoded."""
    with _image_errors(), open_regular(path) as handle:
        image = Image.open(handle)
        width, height = image.size
        if (problem := size_problem(width, height)) is not None:
            raise ValueError(problem)
        if image.format == "JPEG":
            image.draft("RGB", (max(1, width // 8), max(1, height // 8)))
            image.load()
        else:
            image.verify()  # only right after opening; the image cannot be used after it
            handle.seek(0)
            image = Image.open(handle)
        # EXIF orientations that swap the sides. A PNG's EXIF after its pixels is found only by decoding them
        # (Pillow's getexif loads the image): only one before them is read, as most writers put it.
        exif = image.format != "PNG" or "exif" in image.info
        turned = exif and image.getexif().get(0x0112, 1) in (5, 6, 7, 8)
    return (height, width) if turned else (width, height)


def to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float32)  # 4 bytes a pixel, not 8: a 64 Mpx image is 256 MB here
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


def read_excluded(folder: Path) -> set[str]:
    """The file names `EXCLUDE_FILE` in `folder` lists (none when it is missing or unreadable)."""
    path = folder / EXCLUDE_FILE
    try:
        with open_regular(path) as handle:
            text = handle.read(MAX_CAPTION_FILE_BYTES * 16).decode("utf-8", errors="replace")
    except ValueError:
        return set()
    return {name for line in text.splitlines() if (name := line.split("#", 1)[0].strip())}


def scan(folder: str | Path, trigger_words: list[str], trigger_placement: str = "first",
         decode: bool = True) -> DatasetReport:
    """Look at every file in the folder (not recursive) and decide which images are usable. `decode`: decode
    each image whole (training does); False reads sizes from headers and checks cheaply (`image_size`), as a
    page server does, where a 16-bit 8000 x 8000 PNG decoded whole would cost gigabytes. At most SCAN_SLOTS
    scans run at once in one process; others wait."""
    with SCAN_SLOTS:
        return _scan(Path(folder), trigger_words, trigger_placement, decode)


def _scan(folder: Path, trigger_words: list[str], trigger_placement: str, decode: bool) -> DatasetReport:
    if not folder.is_dir():
        raise DatasetError(f"dataset_path {folder} is not a folder; point it at a folder of images "
                           "with optional .txt captions")
    report = DatasetReport(folder=str(folder))
    excluded = read_excluded(folder) if os.path.lexists(folder / EXCLUDE_FILE) else set()
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or (path.is_dir() and not path.is_symlink()):
            continue
        suffix = path.suffix.lower()
        if suffix == ".txt" or is_mask_file(path.name):
            continue
        if suffix not in IMAGE_SUFFIXES:
            report.ignored.append(path.name)
            continue
        if path.name in excluded:
            report.refused.append({"file": path.name, "reason": EXCLUDED_REASON})
            continue
        try:
            _inside_folder(path, folder)
            width, height = open_image(path).size if decode else image_size(path)
        except ValueError as error:
            report.refused.append({"file": path.name, "reason": str(error)})
            continue
        caption, has_file = _read_caption(path, folder, report.warnings)
        report.images.append(ImageRecord(str(path), build_caption(trigger_words, caption, trigger_placement),
                                         width, height, has_file))
    if not report.images:
        reasons = "; ".join(f"{item['file']}: {item['reason']}" for item in report.refused[:5])
        raise DatasetError(f"no usable image in {folder} (supported: {', '.join(sorted(IMAGE_SUFFIXES))})"
                           + (f"; refused: {reasons}" if reasons else ""))
    return report


def is_mask_file(name: str) -> bool:
    return name.lower().endswith(MASK_SUFFIX)


def warn_about(report: DatasetReport, shown: int = 20) -> None:
    """One warning line on stderr naming the refused files (and one for the captions that were cut)."""
    if report.refused:
        names = ", ".join(f"{item['file']} ({item['reason']})" for item in report.refused[:shown])
        more = f" and {len(report.refused) - shown} more" if len(report.refused) > shown else ""
        log.warning("%d of %d images in %s were refused and are left out: %s%s", len(report.refused),
                    len(report.refused) + len(report.images), report.folder, names, more)
    if report.warnings:
        log.warning("dataset: %s", "; ".join(report.warnings[:shown]))


def resize_and_crop(image: Image.Image, size: int) -> Image.Image:
    """Scale the shorter side to `size`, then centre-crop the longer one."""
    scale = size / min(image.size)
    width, height = max(size, round(image.width * scale)), max(size, round(image.height * scale))
    _check_resized(image, (width, height))
    image = image.resize((width, height), Image.Resampling.BICUBIC, reducing_gap=3.0)
    left, top = (width - size) // 2, (height - size) // 2
    return image.crop((left, top, left + size, top + size))


def _check_resized(image: Image.Image, size: tuple[int, int]) -> None:
    """The last line of defence where the memory is spent (scan() already refuses extreme shapes)."""
    if size[0] * size[1] > MAX_PIXELS:
        raise DatasetError(f"{image.width}x{image.height} would be resized to {size[0]}x{size[1]}, over the "
                           f"{MAX_PIXELS // 1_000_000} Mpx limit; crop the image to a less extreme shape")


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
    image = open_image(Path(record.path))
    _check_resized(image, size)
    image = image.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).transpose(2, 0, 1).copy())
