"""Following a run as it is written: a run folder's events.jsonl read incrementally into its RunRecord.

The page's live view and Runs list look at a run on every poll; each look reads only what was appended since
the last (at most READ_BYTES), so a million-step run costs no more than a short one (runrecord.py folds).
"""

from __future__ import annotations

from pathlib import Path

from lora_core.events import parse_event
from lora_core.runrecord import EVENTS_FILE, MAX_LINE_BYTES, READ_BYTES, RunFiles, RunRecord
from lora_core.safefile import read_capped


class RecordTail:
    """Follows one run folder's events.jsonl into a record, reading only what was appended since the last look,
    at most `READ_BYTES` a look (`behind` says what is left). The file is data: opened as a regular file without
    blocking; a line that is not a well-formed event is skipped, as read_events does, and costs only itself."""

    def __init__(self, folder: Path, record: RunRecord | None = None):
        self.files = RunFiles(Path(folder))
        self.record = record if record is not None else RunRecord()
        self._offset = 0
        self._partial = b""
        self._skipping = False  # inside a line longer than MAX_LINE_BYTES, read past to its end
        self.size = 0  # the file's size at the last look
        self.problem = ""  # why the file could not be read at the last look ("" : it could, or is missing)

    @property
    def folder(self) -> Path:
        return self.files.folder

    @property
    def behind(self) -> int:
        """Bytes written but not read yet."""
        return max(0, self.size - self._offset)

    def update(self, max_bytes: int = READ_BYTES) -> RunRecord:
        try:
            data, self.size = read_capped(self.files.events, max_bytes, self._offset)
            self.problem = ""
        except FileNotFoundError:
            return self.record
        except OSError as error:
            self.problem = f"{EVENTS_FILE} cannot be read: {error.strerror or error}"
            return self.record
        self._offset += len(data)
        for line in self._lines(data):
            try:
                self.record.add(parse_event(line.decode("utf-8")))
            except (ValueError, TypeError, ArithmeticError, UnicodeDecodeError):
                continue  # not a whole, well-formed event: skipped
        return self.record

    def _lines(self, data: bytes) -> list[bytes]:
        chunk = self._partial + data
        if self._skipping:
            cut = chunk.find(b"\n")
            if cut < 0:
                self._partial = b""
                return []
            chunk, self._skipping = chunk[cut + 1:], False
        lines = chunk.split(b"\n")
        self._partial = lines.pop()  # a line still being written (or cut short by a killed process)
        if len(self._partial) > MAX_LINE_BYTES:
            self._partial, self._skipping = b"", True
        return [line for line in lines if line.strip() and len(line) <= MAX_LINE_BYTES]
