"""events.jsonl, written and read: a run's typed events (events.py) as one JSON line each.

Written by `EventLog` (the listener first, so a full disk never loses an event; a torn last line cut off), read by
`read_events` as data (lora_core.safefile: a regular file, a line at a time, over-long lines passed over unread).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from pathlib import Path

from lora_core.events import Error, Event, parse_event

log = logging.getLogger("lora_core")

MAX_EVENT_LINE_BYTES = 1024**2  # an event is a few hundred bytes; a dataset event with its findings a few KB


class EventLog:
    """Forwards each event to a listener (stdout, a queue) and then appends it to `events.jsonl`.

    The listener comes first, so the file failing (a full disk) never loses an event: the failure is logged
    once on stderr, the partial line is cut off again (no torn line is left), and the file is not written
    any more. The file is opened at the first event, but never for an `output_path` error (a refused folder,
    or one holding another run, gets no file from this run); a torn last line a killed process left is cut off.
    """

    def __init__(self, path: Path | None, listener=None):
        self._lock = threading.Lock()
        self._listener = listener
        self.path = Path(path) if path is not None else None
        self._fd: int | None = None
        self.write_error: OSError | None = None

    def __call__(self, event: Event) -> None:
        line = (event.to_json() + "\n").encode("utf-8")
        try:
            if self._listener is not None:
                self._listener(event)
        finally:
            with self._lock:
                self._append(event, line)

    def _append(self, event: Event, line: bytes) -> None:
        if self.path is None or self.write_error is not None:
            return
        if self._fd is None:
            if isinstance(event, Error) and event.field == "output_path":
                return
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._fd = _open_for_append(self.path)
            except OSError as error:
                self._give_up(error)
                return
        end = os.fstat(self._fd).st_size
        try:
            view = memoryview(line)
            while view:
                view = view[os.write(self._fd, view):]
        except OSError as error:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, end)
            self._give_up(error)

    def _give_up(self, error: OSError) -> None:
        self.write_error = error
        log.warning("cannot write %s (%s); the events go on only to the caller (stdout)", self.path,
                    error.strerror or error)
        self._close_fd()

    def _close_fd(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None

    def close(self) -> None:
        with self._lock:
            self._close_fd()


def _open_for_append(path: Path) -> int:
    """Open events.jsonl to append, first cutting off a last line without its newline (a killed writer's)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
    try:
        size = os.fstat(fd).st_size
        if size:
            tail_start = max(0, size - 65536)
            tail = os.pread(fd, size - tail_start, tail_start)
            if not tail.endswith(b"\n"):
                cut = tail.rfind(b"\n")
                if cut >= 0:
                    os.ftruncate(fd, tail_start + cut + 1)
                elif tail_start == 0:
                    os.ftruncate(fd, 0)
                else:  # a torn line longer than 64 KiB: end it, so the next event starts a line of its own
                    os.write(fd, b"\n")
    except OSError:
        os.close(fd)
        raise
    return fd


def read_events(path: Path) -> list[Event]:
    """Every event in an events.jsonl file, in order; a line that is not a whole event (a torn one) is skipped.
    The file is data: read as lora_core.safefile reads (a regular file, a line at a time, over-long ones
    passed over unread)."""
    from lora_core.safefile import lines_of

    events = []
    for line in lines_of(path, MAX_EVENT_LINE_BYTES):
        try:
            events.append(parse_event(line.decode("utf-8", errors="replace")))
        except ValueError:
            continue
    return events
