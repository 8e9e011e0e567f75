"""Safe ingestion of an uploaded dataset: loose images and .txt captions, or .zip archives.

Nothing a client sends decides where a file lands: every accepted file is written into a fresh folder
the server owns, under a name the server chooses (`0001_<safe stem>.png`, with its caption beside it
as `0001_<safe stem>.txt`). Everything refused is listed with the reason: path traversal, absolute
paths and drive letters, links, nested archives, files that are neither images nor captions, damaged
members, members over the size or count limits, and zip bombs: one member of a compression ratio no real image has,
or many members that together expand past the archive's budget (counted on the bytes really written, so
small members cannot add up unnoticed; writing stops at the budget). An image whose header gives a size
training refuses (too many pixels, too small, too extreme an aspect ratio) is refused here too. Whatever
is refused is deleted, and so is an upload left without a usable image. Each image is checked as the page's
scan checks it (`dataset.image_size`: header and checksums, never decoded whole); training's own scan decodes
it. An archive whose directory is bigger than the file limit allows is refused before zipfile reads it.
Upload folders no run or job uses are deleted after UNUSED_UPLOAD_DAYS (studio/cleanup.py).
"""

from __future__ import annotations

import re
import shutil
import stat
import struct
import zipfile
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from lora_core.errors import UserError
from studio.cleanup import UNUSED_UPLOAD_DAYS, remove_unused  # noqa: F401  (where the page and tests find them)

CAPTION_SUFFIX = ".txt"
ARCHIVE_SUFFIXES = {".zip", ".tar", ".gz", ".tgz", ".bz2", ".xz", ".7z", ".rar", ".zst", ".lz", ".lzma"}
# First bytes of archive formats: a "photo.png" that is really an archive is a nested archive too.
ARCHIVE_MAGIC = (b"PK\x03\x04", b"PK\x05\x06", b"\x1f\x8b", b"7z\xbc\xaf\x27\x1c", b"Rar!", b"BZh",
                 b"\xfd7zXZ", b"\x28\xb5\x2f\xfd")
CHUNK = 1024 * 1024
MAX_LISTED_REFUSALS = 200  # past this, one summary line instead of one line per member
DRIVE = re.compile(r"^[A-Za-z]:")
UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9_-]+")
# zipfile reads an archive's whole central directory into memory, one object per member, as it opens it (2
# million empty members: seconds and hundreds of MB before the first is looked at). Its end record says how
# many members and how many directory bytes there are: more than MEMBERS_PER_FILE per allowed file (at least
# MIN_MEMBERS: folders, captions and files to refuse are members too), or more than DIRECTORY_BYTES_PER_MEMBER a
# member, and the archive is refused before zipfile reads its directory (at most 5 MB of it by default).
MEMBERS_PER_FILE, MIN_MEMBERS, DIRECTORY_BYTES_PER_MEMBER = 4, 10_000, 512


@dataclass(frozen=True)
class UploadLimits:
    max_files: int = 2000  # images and captions together
    max_file_bytes: int = 64 * 1024**2  # one image or caption
    max_total_bytes: int = 4 * 1024**3  # everything written
    max_ratio: float = 100.0  # uncompressed / compressed size of one zip member
    ratio_floor_bytes: int = 1024**2  # small members (captions) may compress well; the ratio is checked above this
    # All members of one archive together: at most this many times the archive's size (images barely
    # compress; captions do), or the floor for small archives, whichever is more.
    max_archive_ratio: float = 10.0
    archive_floor_bytes: int = 16 * 1024**2


class UploadError(UserError):
    """The upload as a whole cannot be used (nothing was given, or nothing usable was in it)."""

    field = "dataset_path"


@dataclass
class UploadReport:
    folder: str
    stored: list[dict[str, str]] = field(default_factory=list)  # {"original", "stored"}
    refused: list[dict[str, str]] = field(default_factory=list)  # {"file", "reason"}
    notes: list[str] = field(default_factory=list)
    total_bytes: int = 0
    archive_sizes: dict[str, int] = field(default_factory=dict, repr=False)  # archive name -> its bytes
    archive_written: dict[str, int] = field(default_factory=dict, repr=False)  # archive name -> bytes out

    @property
    def num_images(self) -> int:
        return sum(Path(item["stored"]).suffix != CAPTION_SUFFIX for item in self.stored)

    @property
    def num_captions(self) -> int:
        return len(self.stored) - self.num_images

    def refuse(self, name: str, reason: str) -> None:
        if len(self.refused) < MAX_LISTED_REFUSALS:
            self.refused.append({"file": name, "reason": reason})
        elif len(self.refused) == MAX_LISTED_REFUSALS:
            self.refused.append({"file": "…", "reason": f"more files were refused; only the first "
                                                      f"{MAX_LISTED_REFUSALS} are listed"})

    def to_dict(self) -> dict:
        data = {key: value for key, value in asdict(self).items() if not key.startswith("archive_")}
        return {**data, "num_images": self.num_images, "num_captions": self.num_captions}


@dataclass
class _Candidate:
    """One file that passed the name checks, not yet written. `key` pairs an image with its caption."""

    name: str  # as the client gave it, for the report
    key: tuple[str, str]  # (folder inside the upload, stem)
    suffix: str  # lower case
    size: int  # declared size in bytes
    open: Callable[[], AbstractContextManager[BinaryIO]]
    compressed: int | None = None  # compressed size of a zip member; None for a loose file
    archive: str | None = None  # the archive it comes from


def ingest(paths: list[str | Path], dest: str | Path, limits: UploadLimits | None = None) -> UploadReport:
    """Copy the usable images and captions among `paths` (loose files and .zip archives) into `dest`.

    `dest` must not exist yet (or be empty): the server makes one folder per upload.
    """
    limits = limits or UploadLimits()
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    if any(dest.iterdir()):
        raise UploadError(f"upload folder {dest} is not empty; each upload needs a fresh folder")
    if not paths:
        raise UploadError("no files were uploaded; add images (with optional .txt captions) or one .zip")
    report = UploadReport(folder=str(dest))
    archives: list[zipfile.ZipFile] = []
    try:
        candidates = list(_collect(paths, report, archives, limits))
        _write_all(_within_limits(candidates, report, limits), dest, report, limits)
    finally:
        for archive in archives:
            archive.close()
    return report


# ----------------------------------------------------------------------------------------------------
# collecting candidates


def _collect(paths: list[str | Path], report: UploadReport, archives: list[zipfile.ZipFile],
             limits: UploadLimits) -> Iterator[_Candidate]:
    for raw in sorted(paths, key=lambda p: Path(p).name):
        path = Path(raw)
        name = path.name
        if path.is_symlink():
            report.refuse(name, "a symbolic link; upload the file itself")
        elif not path.is_file():
            report.refuse(name, "not a regular file")
        elif path.suffix.lower() == ".zip":
            archive = _open_zip(path, report, limits)
            if archive is not None:
                archives.append(archive)
                report.archive_sizes[name] = path.stat().st_size
                yield from _zip_members(archive, name, path.stat().st_size, report)
        elif (reason := _suffix_problem(name)) is not None:
            report.refuse(name, reason)
        else:
            yield _Candidate(name, ("", Path(name).stem), Path(name).suffix.lower(), path.stat().st_size,
                             partial(path.open, "rb"))


def _open_zip(path: Path, report: UploadReport, limits: UploadLimits) -> zipfile.ZipFile | None:
    if (problem := _directory_problem(path, limits)) is not None:
        report.refuse(path.name, problem)
        return None
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as error:
        report.refuse(path.name, f"not a readable .zip archive ({error})")
        return None


def _zip_members(archive: zipfile.ZipFile, archive_name: str, archive_size: int,
                 report: UploadReport) -> Iterator[_Candidate]:
    for info in archive.infolist():
        name = _member_name(info, report, archive_name)
        shown = f"{archive_name}:{name}"
        if info.is_dir():
            continue
        reason = (_path_problem(name) or _member_problem(info, archive_size) or _suffix_problem(name))
        if reason is not None:
            report.refuse(shown, reason)
            continue
        parts = PurePosixPath(name.replace("\\", "/"))
        yield _Candidate(shown, (str(parts.parent), parts.stem), parts.suffix.lower(), info.file_size,
                         lambda info=info: archive.open(info), compressed=info.compress_size, archive=archive_name)


def _directory_problem(path: Path, limits: UploadLimits) -> str | None:
    """Why an archive's directory is too big to read (from its end record alone), or None."""
    try:
        with open(path, "rb") as handle:
            end = zipfile._EndRecData(handle)  # the end record (zip64 too), as ZipFile itself reads it first
    except (OSError, AttributeError, ValueError, struct.error):
        return None  # not readable as a zip: ZipFile says why
    if not end:
        return None
    members, size = end[zipfile._ECD_ENTRIES_TOTAL], end[zipfile._ECD_SIZE]
    most = max(MEMBERS_PER_FILE * limits.max_files, MIN_MEMBERS)
    if members > most or size > most * DIRECTORY_BYTES_PER_MEMBER:
        return (f"holds {members} members in a {size}-byte directory; an upload takes at most {limits.max_files} "
                "files, so the archive was not opened: split it")
    return None


def _member_name(info: zipfile.ZipInfo, report: UploadReport, archive_name: str) -> str:
    """The member's name as text. Names not flagged UTF-8 were decoded as cp437 by zipfile; many tools
    write UTF-8 without the flag, so try that. Either way the file is stored under a name we choose."""
    name = info.filename
    if info.flag_bits & 0x800 or name.isascii():
        return name
    raw = name.encode("cp437", errors="replace")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        report.notes.append(f"{archive_name}: the name {name!r} is not UTF-8; it is stored under a safe name")
        return name


def _path_problem(name: str) -> str | None:
    if "\x00" in name:
        return "the name contains a NUL character"
    if name.startswith(("/", "\\")):
        return "an absolute path; archive members must be relative"
    if DRIVE.match(name):
        return "a Windows drive path; archive members must be relative"
    if ".." in re.split(r"[/\\]", name):
        return "path traversal ('..'); archive members must stay inside the archive"
    return None


def _member_problem(info: zipfile.ZipInfo, archive_size: int) -> str | None:
    kind = stat.S_IFMT(info.external_attr >> 16)  # Unix file type; 0 when the archiver did not record one
    if kind == stat.S_IFLNK:
        return "a symbolic link; links are never followed"
    if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
        return "not a regular file (a device, pipe or socket)"
    if info.flag_bits & 0x1:
        return "encrypted; upload an unencrypted archive"
    if info.compress_size > archive_size:
        return "damaged: its compressed size is larger than the whole archive"
    return None


def _image_suffixes() -> set[str]:
    from lora_core.dataset import IMAGE_SUFFIXES  # here, not at the top: the dataset module may import torch

    return IMAGE_SUFFIXES


def _suffix_problem(name: str) -> str | None:
    suffix = PurePosixPath(name.replace("\\", "/")).suffix.lower()
    image_suffixes = _image_suffixes()
    if suffix in ARCHIVE_SUFFIXES:
        return "an archive inside the upload; nested archives are not opened, unpack it first"
    if suffix not in image_suffixes and suffix != CAPTION_SUFFIX:
        return (f"not an image or caption (accepted: {', '.join(sorted(image_suffixes))} and "
                f"{CAPTION_SUFFIX})")
    return None


# ----------------------------------------------------------------------------------------------------
# limits and writing


def _within_limits(candidates: list[_Candidate], report: UploadReport, limits: UploadLimits) -> list[_Candidate]:
    kept, total = [], 0
    for candidate in candidates:
        if candidate.size > limits.max_file_bytes:
            report.refuse(candidate.name, f"{candidate.size} bytes is over the limit of {limits.max_file_bytes} "
                                          "bytes per file; downscale or recompress it")
        elif _bomb(candidate.size, candidate.compressed, limits):
            report.refuse(candidate.name, _bomb_reason(limits))
        elif len(kept) >= limits.max_files:
            report.refuse(candidate.name, f"over the limit of {limits.max_files} files per upload")
        elif total + candidate.size > limits.max_total_bytes:
            report.refuse(candidate.name, f"the upload would exceed {limits.max_total_bytes} bytes in total")
        else:
            kept.append(candidate)
            total += candidate.size
    return kept


def _write_all(candidates: list[_Candidate], dest: Path, report: UploadReport, limits: UploadLimits) -> None:
    images = [c for c in candidates if c.suffix != CAPTION_SUFFIX]
    captions = {c.key: c for c in candidates if c.suffix == CAPTION_SUFFIX}
    paired: set[tuple[str, str]] = set()
    for index, image in enumerate(images, start=1):
        stem = f"{index:04d}_{_safe_stem(image.key[1])}"
        if not _write_one(image, dest / f"{stem}{image.suffix}", report, limits):
            continue
        caption = captions.get(image.key)
        if caption is not None:
            paired.add(image.key)
            _write_one(caption, dest / f"{stem}{CAPTION_SUFFIX}", report, limits)
    for key, caption in captions.items():
        if key not in paired:
            report.refuse(caption.name, "a caption without an image of the same name")
    if not report.num_images:
        shutil.rmtree(dest, ignore_errors=True)
        reasons = "; ".join(f"{item['file']}: {item['reason']}" for item in report.refused[:5])
        raise UploadError("no usable image in the upload" + (f" ({reasons})" if reasons else ""))


def _write_one(candidate: _Candidate, target: Path, report: UploadReport, limits: UploadLimits) -> bool:
    """Copy at most the declared size (plus one byte, to notice a lie) and at most what the upload's and the
    archive's budgets have left; 'x' mode never overwrites or follows an existing link. What is refused is
    deleted."""
    written, problem = 0, None
    allowed = _budget_left(candidate, report, limits)
    try:
        if allowed <= 0:
            problem = _budget_reason(candidate, limits)
        else:
            with candidate.open() as source, open(target, "xb") as out:
                while chunk := source.read(min(CHUNK, candidate.size + 1 - written)):
                    if written == 0 and chunk.startswith(ARCHIVE_MAGIC):
                        problem = "an archive under an image or caption name; nested archives are not opened"
                        break
                    written += len(chunk)
                    if written > candidate.size:
                        problem = "damaged: it holds more data than its header says"
                        break
                    if _bomb(written, candidate.compressed, limits):
                        problem = _bomb_reason(limits)
                        break
                    if written > allowed:
                        problem = _budget_reason(candidate, limits)
                        break
                    out.write(chunk)
    except (zipfile.BadZipFile, OSError, EOFError, RuntimeError, NotImplementedError) as error:
        problem = f"damaged or unreadable ({error})"
    if candidate.archive is not None:  # what was read counts, kept or not: the budget is the work done
        report.archive_written[candidate.archive] = report.archive_written.get(candidate.archive, 0) + written
    if problem is None and candidate.suffix != CAPTION_SUFFIX:
        problem = _image_problem(target)
    if problem is not None:
        target.unlink(missing_ok=True)
        report.refuse(candidate.name, problem)
        return False
    report.stored.append({"original": candidate.name, "stored": target.name})
    report.total_bytes += written
    return True


def _budget_left(candidate: _Candidate, report: UploadReport, limits: UploadLimits) -> int:
    left = limits.max_total_bytes - report.total_bytes
    if candidate.archive is not None:
        budget = max(limits.max_archive_ratio * report.archive_sizes.get(candidate.archive, 0),
                     limits.archive_floor_bytes)
        left = min(left, int(budget) - report.archive_written.get(candidate.archive, 0))
    return left


def _budget_reason(candidate: _Candidate, limits: UploadLimits) -> str:
    if candidate.archive is None:
        return f"the upload would exceed {limits.max_total_bytes} bytes in total"
    return (f"{candidate.archive} expands to more than {limits.max_archive_ratio:g}x its size in total (or "
            f"{limits.archive_floor_bytes} bytes); unpacking stopped there. Real images barely compress: "
            "this looks like a zip bomb")


def _image_problem(path: Path) -> str | None:
    """Why a written image cannot be trained on: its size (from the header) or damage, found as the page's
    scan finds it (dataset.image_size: never decoded whole), or None. A refused image is deleted, and an
    upload left without a usable image is deleted whole (`_write_all`)."""
    from lora_core.dataset import image_size

    try:
        image_size(path)
    except ValueError as error:
        return str(error)
    return None


def _bomb(size: int, compressed: int | None, limits: UploadLimits) -> bool:
    """Checked on the header's sizes and again on the bytes actually read (a header can lie)."""
    return compressed is not None and size > limits.ratio_floor_bytes and size > limits.max_ratio * max(compressed, 1)


def _bomb_reason(limits: UploadLimits) -> str:
    return f"a zip bomb: it expands more than {limits.max_ratio:g}x; no real image compresses that well"


def _safe_stem(stem: str) -> str:
    return UNSAFE_CHARS.sub("_", stem).strip("_")[:40] or "file"
