"""Atomic file writes: a killed process never leaves a half-written file under its final name.

A write that fails because the disk is full raises `DiskFullError`, which names the file, its folder, the
space the write needed and the space that is free, whatever library did the writing (safetensors reports
a full disk as its own error type, with no file name).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from lora_core.errors import UserError


def _umask() -> int:
    """The process's umask now: read from /proc where it can be (setting it to read it back, the only other
    way, briefly changes it for every thread)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """What open() gives a new file now (0644 under the usual umask 022)."""
    return 0o666 & ~_umask()


FILE_MODE = file_mode()  # as at import; atomic_write asks file_mode() each time, so a later umask counts
TMP_SUFFIX = ".tmp"
# How libraries that do not raise OSError (safetensors' Rust writer) spell a full disk.
DISK_FULL_WORDS = ("No space left on device", "StorageFull", "code: 28,", "Disk quota exceeded")


class DiskFullError(UserError, OSError):
    """No room on the disk for a file; names the file, the folder, what was needed and what is free."""

    field = "output_path"

    def __init__(self, path: Path, needed: int | None = None, written: int | None = None, note: str = ""):
        self.path, self.needed, self.written, self.note = Path(path), needed, written, note
        folder = self.path.parent
        free = _free_bytes(folder)
        if needed:
            need = f"about {_size(needed)}"
        elif written:
            need = f"more than the {_size(written)} written before the disk filled"
        else:
            need = "more space than is free"
        have = f"{_size(free)} is free there" if free is not None else "the free space is unknown"
        super().__init__(f"the disk is full: writing {self.path.name} in {folder} needed {need}, and {have}; "
                         "free space on that disk or set output_path to another disk" + (f". {note}" if note else ""))
        self.errno, self.filename = errno.ENOSPC, str(self.path)

    def __str__(self) -> str:
        return str(self.args[0])

    def __reduce__(self):  # picklable with its own arguments (OSError's default would pass errno, strerror)
        return (type(self), (self.path, self.needed, self.written, self.note))


def is_disk_full(error: BaseException) -> bool:
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return any(word in str(error) for word in DISK_FULL_WORDS)


@contextmanager
def named_disk_full(path: Path, needed: int | None = None) -> Iterator[None]:
    """Turn a full-disk failure of whatever writes `path` into a DiskFullError naming it."""
    try:
        yield
    except DiskFullError:
        raise
    except Exception as error:
        if is_disk_full(error):
            raise DiskFullError(path, needed, _written(path)) from None
        raise


def atomic_write(path: Path, write: Callable[[Path], None], needed: int | None = None) -> Path:
    """Call `write(tmp)` on a temporary file beside `path`, fsync it, then rename it into place. The file
    gets the permissions a plain open() would give it (mkstemp's own 0600, or the one safetensors gives
    the file it writes, would hide it from other users).

    `needed`: the bytes the file will take, when known, for the message if the disk is full."""
    path = Path(path)
    tmp: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
        os.close(fd)
        tmp = Path(tmp_name)
        write(tmp)
        normal_mode(tmp)  # after the write: safetensors' writer makes its file anew, 0600 like mkstemp's
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        tmp = None
    except BaseException as error:
        written = _written(tmp) if tmp is not None else None
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        if isinstance(error, Exception) and not isinstance(error, DiskFullError) and is_disk_full(error):
            raise DiskFullError(path, needed, written) from None
        raise
    _fsync_dir(path.parent)
    return path


def normal_mode(path: Path) -> None:
    """Give `path` the permissions a plain open() would (0644 under umask 022): a file someone downloads or
    another program loads must not be 0600 because a library or mkstemp wrote it so."""
    with contextlib.suppress(OSError, NotImplementedError):  # Windows files have no such modes
        os.chmod(path, file_mode())


def atomic_write_text(path: Path, text: str) -> Path:
    data = text.encode("utf-8")
    return atomic_write(path, lambda tmp: tmp.write_bytes(data), needed=len(data))


def remove_stale_temporaries(folder: Path, recursive: bool = False) -> list[Path]:
    """Delete `.*.tmp` files that killed atomic writes left in `folder`; the removed paths. Every one goes: the
    folders swept (a run's) hold no file another process writes (the server's are in OUTPUTS/.studio/jobs)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    pattern = f"**/.*{TMP_SUFFIX}" if recursive else f".*{TMP_SUFFIX}"
    removed = []
    for leftover in folder.glob(pattern):
        try:
            if leftover.is_file() and not leftover.is_symlink():
                leftover.unlink()
                removed.append(leftover)
        except OSError:
            continue
    return removed


def _written(path: Path) -> int | None:
    try:
        return Path(path).stat().st_size or None
    except OSError:
        return None


def _free_bytes(folder: Path) -> int | None:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def _size(count: int | None) -> str:
    if count is None:
        return "an unknown size"
    for unit, scale in (("GB", 1024**3), ("MB", 1024**2), ("KB", 1024)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count} bytes"


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
