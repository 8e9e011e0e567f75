"""Typed events: the only thing callers of the engine see.

Each event serialises to one JSON object with `type` and an ISO-8601 `timestamp`.
`complete`, `error` and `interrupted` are terminal: exactly one of them ends every run; a grid or sweep
(grid.py) ends with `grid_complete`, `error` or `interrupted`.
"""

from __future__ import annotations

import json
import threading
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


@dataclass(kw_only=True)
class Event:
    type: ClassVar[str] = "event"
    terminal: ClassVar[bool] = False
    timestamp: str = field(default_factory=_now)

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type, **asdict(self)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), allow_nan=False, default=str)


@dataclass(kw_only=True)
class Started(Event):
    type: ClassVar[str] = "started"
    total_steps: int
    num_images: int
    device: str
    mixed_precision: str
    model_family: str
    output_path: str
    num_processes: int = 1  # data-parallel processes (devices) training together
    resumed_from_step: int | None = None  # set when the run continues from a saved training state
    gradient_checkpointing: bool = False  # as decided for this run (the config may say 'auto')


@dataclass(kw_only=True)
class Progress(Event):
    type: ClassVar[str] = "progress"
    step: int
    total_steps: int
    loss: float | None
    percent: float
    lr: float
    it_per_s: float
    eta_s: float
    epoch: int


@dataclass(kw_only=True)
class Checkpoint(Event):
    type: ClassVar[str] = "checkpoint"
    step: int
    path: str


@dataclass(kw_only=True)
class Sample(Event):
    type: ClassVar[str] = "sample"
    step: int
    image_path: str
    prompt: str


@dataclass(kw_only=True)
class Complete(Event):
    type: ClassVar[str] = "complete"
    terminal: ClassVar[bool] = True
    final_path: str
    total_time: float
    step: int


@dataclass(kw_only=True)
class Error(Event):
    type: ClassVar[str] = "error"
    terminal: ClassVar[bool] = True
    message: str
    step: int | None = None
    field: str | None = None


@dataclass(kw_only=True)
class Interrupted(Event):
    type: ClassVar[str] = "interrupted"
    terminal: ClassVar[bool] = True
    step: int
    message: str
    checkpoint_path: str | None


class EventLog:
    """Appends events as JSON lines to `events.jsonl` (flushed per line) and forwards them to a listener."""

    def __init__(self, path: Path | None, listener=None):
        self._lock = threading.Lock()
        self._listener = listener
        self._file = None
        if path is not None:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
            except OSError:  # the run itself reports the unwritable folder as an error event
                self._file = None

    def __call__(self, event: Event) -> None:
        line = event.to_json()
        with self._lock:
            if self._file is not None:
                self._file.write(line + "\n")
                self._file.flush()
        if self._listener is not None:
            self._listener(event)

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None


@dataclass(kw_only=True)
class ValidationReport(Event):
    """`--validate-only`'s one line: `ok`, each problem as {field, message}, warnings, and what was checked
    (`details`: dataset, model, device, devices, memory_estimate, total_steps), written at the top level."""

    type: ClassVar[str] = "validation_report"
    terminal: ClassVar[bool] = True  # the only line of a validate-only run
    ok: bool
    problems: list[dict[str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        return {**data.pop("details"), **data}

    @classmethod
    def from_report(cls, report: dict[str, Any]) -> ValidationReport:
        """From preflight's report dict (`ok`, `problems`, `warnings` and the rest)."""
        rest = {key: value for key, value in report.items() if key not in ("ok", "problems", "warnings", "type",
                                                                          "timestamp")}
        return cls(ok=bool(report.get("ok")), problems=list(report.get("problems", [])),
                   warnings=list(report.get("warnings", [])), details=rest,
                   **({"timestamp": report["timestamp"]} if "timestamp" in report else {}))


@dataclass(kw_only=True)
class GridProgress(Event):
    """One cell of a checkpoint x prompt grid or a strength sweep is drawn (grid.py)."""

    type: ClassVar[str] = "grid_progress"
    kind: str  # grid | sweep
    done: int
    total: int
    row: str
    column: str


@dataclass(kw_only=True)
class GridComplete(Event):
    type: ClassVar[str] = "grid_complete"
    terminal: ClassVar[bool] = True
    kind: str
    path: str
    width: int
    height: int
    total_time: float


EVENT_TYPES: dict[str, type[Event]] = {cls.type: cls for cls in (Started, Progress, Checkpoint, Sample, Complete,
                                                                  Error, Interrupted, ValidationReport, GridProgress,
                                                                  GridComplete)}


def event_from_dict(data: dict[str, Any]) -> Event:
    """The inverse of `Event.to_dict`: the typed event of one JSON object (keys it does not know are dropped)."""
    cls = EVENT_TYPES.get(data.get("type")) if isinstance(data, dict) else None
    if cls is None:
        raise ValueError(f"not an event: {data!r:.200}")
    if cls is ValidationReport:
        return ValidationReport.from_report(data)
    names = {item.name for item in fields(cls)}
    try:
        return cls(**{key: value for key, value in data.items() if key in names})
    except TypeError as error:
        raise ValueError(f"a {cls.type} event without its fields ({error}): {data!r:.200}") from None


def parse_event(line: str) -> Event:
    """One JSON line of the CLI's stdout or of events.jsonl as a typed event; ValueError if it is not one."""
    try:
        data = json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(f"not JSON ({error.msg}): {line[:200]!r}") from None
    return event_from_dict(data)


def read_events(path: Path) -> list[Event]:
    """Every event in an events.jsonl file, in order; a torn last line (a killed process) is skipped."""
    events = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            try:
                events.append(parse_event(line))
            except ValueError:
                continue
    return events
