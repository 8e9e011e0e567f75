"""Reading files that are data, from folders anyone may have put anything in (a run folder, the outputs folder).

Every such file is opened without blocking (O_NONBLOCK: a FIFO named events.jsonl or config.json never hangs
the reader), without following a link at its last component (O_NOFOLLOW), checked to be a regular file after
opening (fstat, so nothing can be swapped in between the check and the read), and read only up to a cap. A
file that fails any of this raises OSError naming it; `read_json` answers None instead, as a missing file does.
Torch-free: the page reads runs with it on every poll.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

MAX_JSON_BYTES = 4 * 1024**2  # a config.json, job.json or queue.json is a few KB; more is not one of ours
_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)


def open_regular(path: str | Path, follow_links: bool = False) -> BinaryIO:
    """`path` opened for reading as a regular file (never a FIFO, device, socket or folder; never through a
    link unless `follow_links`); OSError otherwise. The caller closes it."""
    flags = _FLAGS | (0 if follow_links else getattr(os, "O_NOFOLLOW", 0))
    fd = os.open(path, flags)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise OSError(errno.EINVAL, f"{path} is not a regular file", str(path))
        os.set_blocking(fd, True)  # a regular file: reads never wait for a writer anyway
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_capped(path: str | Path, limit: int, offset: int = 0) -> tuple[bytes, int]:
    """At most `limit` bytes of the regular file `path` from `offset`, and the file's size when it was read."""
    with open_regular(path) as handle:
        size = os.fstat(handle.fileno()).st_size
        handle.seek(offset)
        return handle.read(max(0, limit)), size


def lines_of(path: str | Path, max_line_bytes: int) -> Iterator[bytes]:
    """The non-blank lines of the regular file `path`, one at a time; a line longer than `max_line_bytes` (a
    sparse file's zeros) is passed over without ever being held whole."""
    with open_regular(path) as handle:
        while line := handle.readline(max_line_bytes + 1):
            if len(line) > max_line_bytes:
                while line and not line.endswith(b"\n"):  # the rest of the over-long line
                    line = handle.readline(max_line_bytes)
            elif line.strip():
                yield line


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def read_json(path: str | Path, limit: int = MAX_JSON_BYTES) -> Any:
    """The JSON in `path`, or None when it is missing, not a regular file, over `limit` bytes, not UTF-8, not
    strict JSON (NaN and Infinity are refused: a step or a count is never one) or nested too deep."""
    try:
        data, size = read_capped(path, limit + 1)
        if size > limit or len(data) > limit:
            return None
        return json.loads(data.decode("utf-8"), parse_constant=_no_constants)
    except (OSError, ValueError, RecursionError):
        return None
