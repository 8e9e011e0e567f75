"""What the dataset doctor needs to know about one image, from one read of its file: the content hash, the
size and mode from the header, and, from a downscaled decode, perceptual hashes, sharpness and transparency.

Perceptual hashes (Pillow + numpy, no extra package): dHash compares neighbouring pixels of a 9x8 greyscale
thumbnail, pHash takes the signs of the low frequencies of a 32x32 DCT against their median. Both are 64-bit
and survive resizing and JPEG re-encoding (a few bits change), which is what makes near-duplicates findable.

Decoding is downscaled: JPEG through `Image.draft` (the decoder itself skips detail), other formats through
`Image.reduce`, so a 24 Mpx photo costs little more than a thumbnail. Results are cached by the file's
SHA-256 (`FactsCache`): a second look at an unchanged dataset reads each file once to hash it and decodes nothing.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from lora_core import dataset

VERSION = 3  # bump when what is measured changes: cached facts of another version are measured again
ANALYSIS_SIDE = 512  # the shorter side sharpness is measured at: SD's training size, where blur shows
OPAQUE = 250  # alpha at or above this counts as opaque
ORIENTATION_TAG = 0x0112
# EXIF orientation -> the transpose that undoes it (what ImageOps.exif_transpose does).
TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
             5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
             8: Image.Transpose.ROTATE_90}
MAX_FILE_BYTES = 1024**3  # a 64 Mpx image (dataset.MAX_PIXELS) is far smaller in any format; more is not one
MAX_CACHE_ENTRIES = 100_000  # about 20 MB of JSON; beyond it the oldest half is dropped


@dataclass
class ImageFacts:
    sha256: str
    width: int = 0  # as training sees it: after the EXIF rotation
    height: int = 0
    mode: str = ""  # Pillow's mode as stored: RGB, RGBA, P, CMYK, I;16, ...
    format: str = ""
    orientation: int = 1  # EXIF orientation; not 1 means training rotates the image
    frames: int = 1
    transparent: float = 0.0  # fraction of pixels that are not opaque
    dhash: int = 0
    phash: int = 0
    sharpness: float = 0.0  # fine over coarse detail (see sharpness()); about 1 means blurred, 0 unknown
    error: str | None = None  # why the image could not be read (training refuses it too)
    version: int = VERSION


def file_sha256(path: Path) -> tuple[str, bytes]:
    """The hash and the bytes of a regular file (read once: the bytes are decoded next)."""
    with dataset.open_regular(path) as handle:
        data = handle.read(MAX_FILE_BYTES + 1)
    if len(data) > MAX_FILE_BYTES:
        raise ValueError(f"over {MAX_FILE_BYTES // 1024**3} GiB, larger than any image training takes")
    return hashlib.sha256(data).hexdigest(), data


def measure(data: bytes, sha256: str) -> ImageFacts:
    """The facts of an image's bytes; `error` says why there are none."""
    facts = ImageFacts(sha256)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            facts.mode, facts.format = image.mode, image.format or ""
            facts.frames = getattr(image, "n_frames", 1)
            facts.orientation = int(image.getexif().get(ORIENTATION_TAG, 1) or 1)
            width, height = image.size
            if (problem := dataset.size_problem(width, height)) is not None:
                facts.error = problem
                return facts
            swapped = facts.orientation in (5, 6, 7, 8)
            facts.width, facts.height = (height, width) if swapped else (width, height)
            _pixel_facts(facts, _small(image))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        facts.error = f"over the {dataset.MAX_PIXELS // 1_000_000} Mpx limit; downscale it"
    except UnidentifiedImageError:
        facts.error = "not a readable image (unknown format or not an image)"
    except (OSError, SyntaxError, EOFError, ValueError) as error:
        facts.error = f"damaged or truncated image ({error})"
    return facts


def _small(image: Image.Image) -> Image.Image:
    """The image decoded at about ANALYSIS_SIDE on its shorter side (never below), EXIF rotation applied."""
    orientation = int(image.getexif().get(ORIENTATION_TAG, 1) or 1)
    image.seek(0)
    if image.format == "JPEG":
        image.draft(image.mode, (ANALYSIS_SIDE, ANALYSIS_SIDE))
    image.load()
    factor = min(image.size) // ANALYSIS_SIDE
    if factor >= 2:
        image = _reducible(image).reduce(factor)
    return image.transpose(TRANSPOSE[orientation]) if orientation in TRANSPOSE else image


def _reducible(image: Image.Image) -> Image.Image:
    """The image in a mode `reduce` takes (it refuses palette, 1-bit and 32/16-bit integer images), keeping
    the transparency that is measured next."""
    if image.mode in ("L", "RGB", "RGBA", "LA", "CMYK", "F"):
        return image
    if image.mode in ("P", "PA", "1"):
        return image.convert("RGBA" if _has_alpha(image) else "RGB")
    return dataset.to_rgb(image)  # 16- and 32-bit integer images, rescaled as training does


def _pixel_facts(facts: ImageFacts, image: Image.Image) -> None:
    if _has_alpha(image):
        alpha = np.asarray(image.convert("RGBA"))[..., 3]
        facts.transparent = float(np.mean(alpha < OPAQUE))
    plain = image.mode in ("L", "RGB") and "transparency" not in image.info
    # transparency on white, 16-bit rescaled: as training sees it
    grey = image.convert("L") if plain else dataset.to_rgb(image).convert("L")
    # The hashes squash the image to 32x32 and 9x8 anyway: a box average to 128x128 first makes the Lanczos
    # resizes cheap (they were a third of the time) and changes no bit that matters.
    thumb = grey.resize((128, 128), Image.Resampling.BOX) if min(grey.size) > 128 else grey
    facts.dhash, facts.phash = dhash(thumb), phash(thumb)
    facts.sharpness = sharpness(grey)


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info


def _bits(flags: np.ndarray) -> int:
    return int("".join("1" if flag else "0" for flag in flags.ravel()), 2)


def dhash(grey: Image.Image) -> int:
    """64 bits: is each pixel of a 9x8 thumbnail brighter than its right-hand neighbour."""
    pixels = np.asarray(grey.resize((9, 8), Image.Resampling.LANCZOS), dtype=np.float32)
    return _bits(pixels[:, 1:] > pixels[:, :-1])


def _dct_matrix(size: int) -> np.ndarray:
    k, n = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    matrix = np.cos(np.pi * (2 * n + 1) * k / (2 * size)) * np.sqrt(2 / size)
    matrix[0] /= np.sqrt(2)
    return matrix


DCT32 = _dct_matrix(32)


def phash(grey: Image.Image) -> int:
    """64 bits: the 8x8 lowest frequencies of a 32x32 DCT, each above or below their median."""
    pixels = np.asarray(grey.resize((32, 32), Image.Resampling.LANCZOS), dtype=np.float64)
    low = (DCT32 @ pixels @ DCT32.T)[:8, :8]
    return _bits(low > np.median(low))


def _gradient_energy(pixels: np.ndarray) -> float:
    across, down = (pixels[:, 1:] - pixels[:, :-1]).ravel(), (pixels[1:] - pixels[:-1]).ravel()
    return float(np.dot(across, across) + np.dot(down, down))


def sharpness(grey: Image.Image) -> float:
    """How much finer the image's detail is than its detail at half the size: the gradient energy at the
    shorter side ANALYSIS_SIDE over that of the image halved. A sharp edge keeps its whole step at either scale
    (about 2-4, fine texture and grain far more); a blurred edge spreads over pixels, and halving the image
    only halves its width (about 1). Flat areas weigh nothing, so a plain background does not read as blur
    (the plain Laplacian variance did). Smaller images are measured as they are (enlarging blurs)."""
    scale = ANALYSIS_SIDE / min(grey.size)
    if scale < 1:
        grey = grey.resize((max(1, round(grey.width * scale)), max(1, round(grey.height * scale))),
                           Image.Resampling.BOX)
    if min(grey.size) < 8:
        return 0.0
    fine = _gradient_energy(np.asarray(grey, dtype=np.float32))
    coarse = _gradient_energy(np.asarray(grey.resize((grey.width // 2, grey.height // 2), Image.Resampling.BOX),
                                         dtype=np.float32))
    return fine / coarse if coarse > 0 else 0.0


POPCOUNT = np.array([bin(value).count("1") for value in range(256)], dtype=np.uint8)
CHUNK_ROWS = 256  # rows of the distance matrix at a time: 256 x 10,000 images x 8 bytes is 20 MB


def close_pairs(first: list[tuple[int, int]], second: list[tuple[int, int]], distance: int,
                same: bool) -> list[tuple[int, int]]:
    """Index pairs (i into first, j into second) whose (dHash, pHash) both differ in at most `distance` bits;
    with `same` (second is first) each pair once, i < j. Computed a block of rows at a time, so 10,000 images
    need megabytes, not the gigabytes of the whole n x n x 64 bit matrix."""
    if not first or not second:
        return []
    columns = [np.array([pair[k] for pair in second], dtype=np.uint64) for k in (0, 1)]
    found = []
    for start in range(0, len(first), CHUNK_ROWS):
        rows = first[start:start + CHUNK_ROWS]
        near = np.ones((len(rows), len(second)), dtype=bool)
        for k in (0, 1):
            xor = np.array([pair[k] for pair in rows], dtype=np.uint64)[:, None] ^ columns[k][None, :]
            near &= POPCOUNT[xor.view(np.uint8)].reshape(len(rows), len(second), 8).sum(axis=2) <= distance
        for i, j in zip(*np.nonzero(near), strict=True):
            if not same or start + i < j:
                found.append((start + int(i), int(j)))
    return found


def cache_dir() -> Path:
    """$LORA_STUDIO_CACHE, else $XDG_CACHE_HOME/lora-studio, else ~/.cache/lora-studio: a user cache, never the
    dataset folder (which may be read-only, and whose files the user owns)."""
    if os.environ.get("LORA_STUDIO_CACHE"):
        return Path(os.environ["LORA_STUDIO_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "lora-studio"


class FactsCache:
    """ImageFacts by file SHA-256, in one JSON file. A damaged or foreign file is ignored (measured again);
    saving is atomic and best-effort (a read-only cache folder only costs the time)."""

    def __init__(self, path: Path | None):
        self.path, self.entries, self.changed = path, {}, False
        if path is not None and path.is_file():
            with contextlib.suppress(OSError, ValueError):
                loaded = json.loads(path.read_text(encoding="utf-8"))
                self.entries = loaded if isinstance(loaded, dict) else {}

    def get(self, sha256: str) -> ImageFacts | None:
        entry = self.entries.get(sha256)
        if not isinstance(entry, dict) or entry.get("version") != VERSION:
            return None
        names = {item.name for item in fields(ImageFacts)}
        try:
            return ImageFacts(**{key: value for key, value in entry.items() if key in names})
        except TypeError:
            return None

    def put(self, facts: ImageFacts) -> None:
        self.entries[facts.sha256] = asdict(facts)
        self.changed = True

    def save(self) -> None:
        if self.path is None or not self.changed:
            return
        from lora_core.files import atomic_write_text

        if len(self.entries) > MAX_CACHE_ENTRIES:
            self.entries = dict(list(self.entries.items())[len(self.entries) // 2:])
        with contextlib.suppress(OSError):
            atomic_write_text(self.path, json.dumps(self.entries))
        self.changed = False


def image_facts(path: Path, cache: FactsCache) -> ImageFacts:
    """The facts of one file, from the cache when its content was measured before."""
    try:
        sha, data = file_sha256(path)
    except ValueError as error:
        return ImageFacts("", error=str(error))
    cached = cache.get(sha)
    if cached is not None:
        return cached
    facts = measure(data, sha)
    cache.put(facts)
    return facts
