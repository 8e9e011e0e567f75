"""One writer per run folder, enforced by the file system: `take(folder)` holds an flock on `folder/.job.lock`.

Whoever writes a run folder (a training job the page started, `python -m lora_core train` or a face over it
with or without `--resume`, a job of a second server) takes the exclusive lock from inside its own process
before it writes anything, and keeps it for the rest of its life: the kernel releases it when the process ends,
however it ends (SIGKILL included), so a lock is never stale. A second writer is refused with `FolderBusy`,
which names the folder and the process holding it. A grid or sweep only reads the run's LoRAs and writes its
own PNG beside them, so it takes the lock shared: several may draw one run at once, while training (which
rewrites those LoRAs) is refused until they end, and they are refused while it trains.

The exclusive holder writes who it is into the lock file (pid, start time, command, the page's job token,
and `since`: when it took the lock). `holder(folder)` is what every reader (Runs list, live view, delete,
resume, a restarted server) asks to tell whether a live process holds the run. Asking takes the lock for a
moment, which is why `take` retries for `WAIT_S` before it refuses. Linux and macOS (flock); torch-free.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_core.errors import UserError

LOCK_FILE = ".job.lock"
TOKEN_VARIABLE = "LORA_JOB_TOKEN"  # set by the page's launcher: the token its job.json holds
JOB_FOLDER_VARIABLE = "LORA_JOB_FOLDER"  # set by the page's launcher: the job's own folder (its lock; a tool's events)
WAIT_S = 2.0  # a reader's probe holds the lock for microseconds; a writer is refused only after this long
_HELD: dict[tuple[str, bool], FolderLock] = {}  # this process's locks, by folder and mode (taken once each)


class FolderBusy(UserError):
    """Another live process holds the run folder."""

    field = "output_path"


@dataclass
class FolderLock:
    folder: Path
    shared: bool
    fd: int
    created: list[Path] = field(default_factory=list)  # the folders `take` made, deepest first

    def release(self) -> None:
        """Give the lock back (a process that ends gives it back anyway). Folders the lock itself made and
        nothing else wrote into (a run refused before it wrote anything) are removed again. Given back once:
        a second call (the command wrapper's, after run_job's of the same folder) does nothing."""
        if self.fd < 0:
            return
        _HELD.pop((str(self.folder), self.shared), None)
        with contextlib.suppress(OSError):
            if self.created and os.listdir(self.folder) == [LOCK_FILE]:
                lock_path(self.folder).unlink()  # still held: a taker re-checks the file it locked (`take`)
                for made in self.created:
                    made.rmdir()
        with contextlib.suppress(OSError):
            os.close(self.fd)
        self.fd = -1  # the number may be another file's from now on


def lock_path(folder: str | Path) -> Path:
    return Path(folder) / LOCK_FILE


def take(folder: str | Path, *, shared: bool = False, wait_s: float = WAIT_S) -> FolderLock:
    """Hold `folder`'s lock for the rest of this process, or until `release` (exclusive: the one writer;
    shared: a reader that writes only files of its own). Idempotent within a process. FolderBusy when another
    process holds it."""
    folder = Path(folder).resolve()
    if (str(folder), shared) in _HELD:
        return _HELD[(str(folder), shared)]
    created = [path for path in (folder, *folder.parents) if not path.exists()]
    folder.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + wait_s
    while True:
        fd = os.open(lock_path(folder), os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        if _try(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX):
            if _same_file(fd, lock_path(folder)):
                break
            os.close(fd)  # locked a lock file its holder removed on release: lock the one there now
            continue
        os.close(fd)
        if time.monotonic() >= deadline:
            raise FolderBusy(f"{folder} is in use by {describe(holder(folder))}; only one process may write a "
                             "run folder at a time: stop that job (or wait for it to end), or choose another "
                             "output_path")
        time.sleep(0.05)
    if not shared:
        with contextlib.suppress(OSError):  # a full disk: the lock holds all the same, only who is unsaid
            _write_holder(fd)
    lock = FolderLock(folder, shared, fd, created)
    _HELD[(str(folder), shared)] = lock
    return lock


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except OSError:
        return False


def _write_holder(fd: int) -> None:
    import psutil

    me = psutil.Process()
    text = json.dumps({"pid": os.getpid(), "start_time": me.create_time(), "since": time.time(),
                       "command": " ".join([sys.executable, *sys.argv]),
                       "token": os.environ.get(TOKEN_VARIABLE, "")}).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, text, 0)


def holder(folder: str | Path) -> dict[str, Any] | None:
    """Who holds `folder`'s lock now: the writer's {pid, start_time, command, token} (as far as it wrote
    it), {"shared": True} for readers only, None when no live process holds it (or there is no lock file)."""
    path = lock_path(folder)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)
                     | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        return None
    try:
        if not os.path.samestat(os.fstat(fd), os.stat(path)) or not _is_regular(fd):
            return None  # not a plain file (a FIFO, a swapped link): nobody's lock
        if _try(fd, fcntl.LOCK_SH):  # no writer; readers?
            fcntl.flock(fd, fcntl.LOCK_UN)
            if not _try(fd, fcntl.LOCK_EX):
                return {"shared": True}
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        return {**_read_holder(fd), "shared": False}
    except OSError:
        return None
    finally:
        os.close(fd)


def held_by(folder: str | Path) -> dict[str, Any] | None:
    """The exclusive holder of `folder` (a job writing it), or None: readers alone do not count."""
    who = holder(folder)
    return who if who is not None and not who.get("shared") else None


def _is_regular(fd: int) -> bool:
    import stat

    return stat.S_ISREG(os.fstat(fd).st_mode)


def _try(fd: int, mode: int) -> bool:
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _read_holder(fd: int) -> dict[str, Any]:
    try:
        data = json.loads(os.pread(fd, 4096, 0).decode("utf-8"))
    except (OSError, ValueError):
        return {}  # being written this moment, or damaged: held all the same
    return {key: data[key] for key in ("pid", "start_time", "since", "command", "token")
            if isinstance(data, dict) and key in data}


def describe(who: dict[str, Any] | None) -> str:
    if not who:
        return "another process"
    if who.get("shared"):
        return "a grid or sweep reading it (a shared lock)"
    pid, command = who.get("pid"), str(who.get("command", ""))[:200]
    return f"process {pid} ({command})" if command else f"process {pid}"
