"""One record of a run: the files of a run folder, and the run's state folded from its events.

A run is a folder (directly under the page's outputs folder, or anywhere for the CLI) and its history; a job
is a process doing work for a run. Every reader of a run (the page's live view, its Runs list, the HTML report)
folds the same typed events (events.jsonl, `eventlog.read_events`) with `RunRecord.add` into one state, said in
one vocabulary:

    queued    waiting in the page's queue (queue.json); nothing of it is written yet
    starting  its process exists but no training step (or grid cell) is done yet: loading, caching
    running   steps (cells) are being done
    stopping  a stop was asked, or the final event is written and the process is still ending
    complete  it ended with its result (`complete`, or a grid's `grid_complete`)
    stopped   it ended without a result and can be resumed: a Stop (`interrupted`), or a process that ended
              without a final event
    failed    it ended with an `error`

The events alone give starting/running/complete/stopped/failed; `settle` adds what only the caller knows
about the job's process (alive, a stop asked). A resume appends to the same events.jsonl: the record keeps
the history before it (a step recorded twice keeps its newest value) and `resumed_at` lists the step each
resume continued from. Torch-free: the page reads runs with it on every poll.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

from lora_core.events import Event, Started
from lora_core.safefile import read_json as read_json

EVENTS_FILE = "events.jsonl"  # the run's events, appended by its jobs (eventlog.EventLog)
CONFIG_FILE = "config.json"  # the resolved config the engine wrote for the run
REPORT_FILE = "training_report.html"  # report.py's page of the run
# A run's record stays small however long the run: each curve keeps at most 2 * MAX_POINTS points (evenly
# thinned, `Curve`), the newest MAX_LISTED samples and checkpoints; one look reads at most READ_BYTES of
# events and one line longer than MAX_LINE_BYTES (a sparse file's zeros) is skipped, never held whole.
MAX_POINTS, MAX_LISTED = 500, 500
READ_BYTES, MAX_LINE_BYTES = 1024**2, 1024**2

QUEUED, STARTING, RUNNING, STOPPING = "queued", "starting", "running", "stopping"
COMPLETE, STOPPED, FAILED = "complete", "stopped", "failed"
STATES = (QUEUED, STARTING, RUNNING, STOPPING, COMPLETE, STOPPED, FAILED)
ACTIVE = frozenset({STARTING, RUNNING, STOPPING})
ENDED = frozenset({COMPLETE, STOPPED, FAILED})
NO_FINAL_EVENT = "the run has no final event (its process ended without one)"
R = TypeVar("R", bound="RunRecord")


@dataclass(frozen=True)
class RunFiles:
    """The files of one run folder, by what they are."""

    folder: Path

    @property
    def events(self) -> Path:
        return self.folder / EVENTS_FILE

    @property
    def config(self) -> Path:
        return self.folder / CONFIG_FILE

    @property
    def report(self) -> Path:
        return self.folder / REPORT_FILE

    def is_run(self) -> bool:
        """Whether the folder holds a run's events (a page's job not started yet is the page's to know:
        studio/jobfiles.py keeps its files apart, in the server's own folder)."""
        return self.events.is_file()


class SampleImage(NamedTuple):
    path: str
    prompt: str
    step: int


class SavedLora(NamedTuple):
    step: int
    path: str


@dataclass
class RunRecord:
    """What a run's events say about it, folded one event at a time (`add`)."""

    state: str = STARTING
    step: int = 0
    total_steps: int = 0
    percent: float = 0.0
    loss: float | None = None
    it_per_s: float = 0.0
    eta_s: float = -1.0
    epoch: int = 0
    device: str = ""
    model_family: str = ""
    output_path: str = ""
    start: Started | None = None  # the latest `started`: what this part of the run trains with
    starts: int = 0  # `started` events: 0 for a job that failed before training started
    started_at: str = ""  # ISO time of the first start
    last_at: str = ""  # ISO time of the newest event
    resumed_at: list[int] = field(default_factory=list)  # the step each resume continued from
    loss_points: list[tuple[int, float]] = field(default_factory=lambda: Curve())  # by step, across resumes
    lr_points: list[tuple[int, float]] = field(default_factory=lambda: Curve())
    validation_points: list[tuple[int, float]] = field(default_factory=lambda: Curve())  # the held-out loss
    samples: list[SampleImage] = field(default_factory=list)
    checkpoints: list[SavedLora] = field(default_factory=list)  # by step, each file once
    final_path: str | None = None  # the LoRA (training) or the PNG (grid, sweep)
    total_time: float | None = None
    message: str = ""  # the error, or why it stopped
    error_field: str | None = None  # the config field at fault, when the user can fix it
    terminal: Event | None = None  # the final event of the latest part
    findings: list[dict] = field(default_factory=list)  # the dataset doctor's, from the latest `dataset` event
    concepts: list[dict] = field(default_factory=list)  # per concept counts, from the latest `dataset` event
    bleed: list[dict] = field(default_factory=list)  # the `concept_bleed` table (lora_core/bleed.py)
    overfitting: list[dict] = field(default_factory=list)  # `overfitting` events: {step, reason, message, ...}
    scores_path: str | None = None  # scores.json, once a scoring (score_at_end) wrote it
    n_events: int = 0

    @property
    def active(self) -> bool:
        return self.state in ACTIVE

    @property
    def ended(self) -> bool:
        return self.state in ENDED

    @property
    def duration_s(self) -> float | None:
        """First start to the newest event."""
        try:
            first, last = datetime.fromisoformat(self.started_at), datetime.fromisoformat(self.last_at)
        except (TypeError, ValueError):
            return None
        return max(0.0, (last - first).total_seconds())

    @property
    def saved_so_far(self) -> str | None:
        """The LoRA to offer for download: the final one, else (stopped, failed) the newest checkpoint on disk."""
        if self.final_path and Path(self.final_path).is_file():
            return self.final_path
        return next((path for _, path in reversed(self.checkpoints) if Path(path).is_file()), None)

    def add(self, event: Event) -> None:
        """Fold one event into the record."""
        self.n_events += 1
        self.last_at = event.timestamp or self.last_at
        fold = _FOLDS.get(event.type)
        if fold is not None:
            fold(self, event)

    def begin_part(self) -> None:
        """A new part of the run begins (a resume): the end of the earlier part is not this part's."""
        self.state, self.message, self.error_field = STARTING, "", None
        self.final_path, self.total_time, self.terminal = None, None, None

    def add_all(self, events: list[Event]) -> RunRecord:
        for event in events:
            self.add(event)
        return self


def _started(record: RunRecord, event: Event) -> None:
    record.starts += 1
    record.started_at = record.started_at or event.timestamp
    if record.starts > 1:  # a resume: older logs without resumed_from_step continued from the last step seen
        record.resumed_at.append(event.resumed_from_step if event.resumed_from_step is not None else record.step)
    record.start, record.total_steps = event, event.total_steps
    record.device, record.model_family = event.device, event.model_family
    record.output_path = event.output_path or record.output_path
    record.begin_part()


def _progress(record: RunRecord, event: Event) -> None:
    for name in ("step", "total_steps", "percent", "it_per_s", "eta_s", "epoch"):
        setattr(record, name, getattr(event, name))
    if event.loss is not None:
        record.loss = event.loss
        _put_point(record.loss_points, event.step, event.loss)
    _put_point(record.lr_points, event.step, event.lr)
    record.state = RUNNING


def _validation(record: RunRecord, event: Event) -> None:
    _put_point(record.validation_points, event.step, event.loss)


def _sample(record: RunRecord, event: Event) -> None:
    record.samples.append(SampleImage(event.image_path, event.prompt, event.step))
    del record.samples[:-MAX_LISTED]


def _checkpoint(record: RunRecord, event: Event) -> None:
    _put_checkpoint(record, event.step, event.path)


def _complete(record: RunRecord, event: Event) -> None:
    record.state, record.final_path, record.step = COMPLETE, event.final_path, event.step
    record.percent, record.total_time, record.terminal = 100.0, event.total_time, event


def _interrupted(record: RunRecord, event: Event) -> None:
    record.state, record.message, record.step, record.terminal = STOPPED, event.message, event.step, event
    if event.checkpoint_path:
        _put_checkpoint(record, event.step, event.checkpoint_path)


def _error(record: RunRecord, event: Event) -> None:
    record.state, record.message, record.error_field, record.terminal = FAILED, event.message, event.field, event


def _grid_progress(record: RunRecord, event: Event) -> None:
    """A grid or sweep job: the cells drawn read as steps."""
    record.step, record.total_steps = event.done, event.total
    record.percent = round(100.0 * event.done / max(1, event.total), 2)
    record.state = RUNNING


def _grid_complete(record: RunRecord, event: Event) -> None:
    record.state, record.final_path, record.percent = COMPLETE, event.path, 100.0
    record.total_time, record.terminal = event.total_time, event


def _caption_started(record: RunRecord, event: Event) -> None:
    """A caption job: the images captioned read as steps, as a grid's cells do."""
    record.total_steps, record.device = event.total, event.device
    record.started_at = record.started_at or event.timestamp


def _caption_complete(record: RunRecord, event: Event) -> None:
    record.state, record.final_path, record.percent = COMPLETE, event.folder, 100.0
    record.total_time, record.terminal = event.total_time, event
    record.message = (f"{event.written} captions written, {event.kept} kept"
                      + (f", {event.num_refused} images refused" if event.num_refused else ""))


def _doctor_complete(record: RunRecord, event: Event) -> None:
    """A doctor job: done, its findings file is the result (the page reads them from there)."""
    record.state, record.final_path, record.percent = COMPLETE, event.path, 100.0
    record.total_time, record.terminal = event.total_time, event
    record.message = f"{event.num_images} image(s) checked: {event.num_findings} finding(s)"


def _dataset(record: RunRecord, event: Event) -> None:
    record.findings = list(event.findings or [])
    record.concepts = list(getattr(event, "concepts", None) or [])


def _bleed(record: RunRecord, event: Event) -> None:
    record.bleed = list(event.rows)


def _overfitting(record: RunRecord, event: Event) -> None:
    record.overfitting.append({"step": event.step, "reason": event.reason, "message": event.message,
                               "best_step": event.best_step, "best_path": event.best_path})


def _score_progress(record: RunRecord, event: Event) -> None:
    """A score job's LoRAs read as its steps; the scoring at the end of a training run changes nothing."""
    if not record.starts:
        _grid_progress(record, event)


def _score_complete(record: RunRecord, event: Event) -> None:
    record.scores_path = event.path
    if not record.starts:  # a score job of its own: done
        record.state, record.final_path, record.percent = COMPLETE, event.path, 100.0
        record.total_time, record.terminal = event.total_time, event


_FOLDS: dict[str, Callable[[RunRecord, Any], None]] = {
    "started": _started, "dataset": _dataset, "progress": _progress, "validation": _validation, "sample": _sample,
    "checkpoint": _checkpoint, "complete": _complete, "interrupted": _interrupted, "error": _error,
    "grid_progress": _grid_progress, "grid_complete": _grid_complete, "caption_started": _caption_started,
    "caption_progress": _grid_progress, "caption_complete": _caption_complete, "concept_bleed": _bleed,
    "overfitting": _overfitting, "score_progress": _score_progress, "score_complete": _score_complete,
    "doctor_progress": _grid_progress, "doctor_complete": _doctor_complete}


class Curve(list):
    """(step, value) points by step, thinned evenly: a point is kept when its step is a multiple of `stride`;
    past 2 * MAX_POINTS points every other one goes and the stride doubles, so a million-step run keeps about
    as many points as a plot can show, spread over the whole run."""

    def __init__(self, points: Any = ()):
        super().__init__(points)
        self.stride = 1

    def put(self, step: int, value: float) -> None:
        """Points at `step` or later (a part of the run a resume replays) are replaced."""
        while self and self[-1][0] >= step:
            self.pop()
        if step % self.stride:
            return
        self.append((step, value))
        if len(self) > 2 * MAX_POINTS:
            self.stride *= 2
            self[:] = [point for point in self if point[0] % self.stride == 0]


def _put_point(points: list[tuple[int, float]], step: int, value: float) -> None:
    """Append (step, value) to a curve (a plain list from older callers is made one)."""
    if isinstance(points, Curve):
        points.put(step, value)
        return
    while points and points[-1][0] >= step:
        points.pop()
    points.append((step, value))


def _put_checkpoint(record: RunRecord, step: int, path: str) -> None:
    if all(saved.path != path for saved in record.checkpoints):
        bisect.insort(record.checkpoints, SavedLora(step, path))
        del record.checkpoints[:-MAX_LISTED]


def settle(record: R, alive: bool | None, stop_requested: bool = False) -> R:
    """The record as it stands once what is known of its job's process is added to its events: `alive` (None:
    not known, e.g. a job.json without its pid yet), and whether a stop was asked. A copy when that changes
    its state (the record itself goes on folding events)."""
    if alive and (record.ended or stop_requested):  # a final event written while the process still ends
        return replace(record, state=STOPPING)
    if alive is False and record.active:
        return replace(record, state=STOPPED if record.starts else FAILED, message=record.message or NO_FINAL_EVENT)
    return record


def ended_before(record: RunRecord, since: Any) -> bool:
    """Whether the record's final event was written before a process took the run's lock at `since` (seconds
    since the epoch): that process, holding the run now, is a later part of it (a resume)."""
    if record.terminal is None or not isinstance(since, int | float):
        return False
    try:
        return datetime.fromisoformat(record.terminal.timestamp).timestamp() < since
    except (TypeError, ValueError):
        return False


def process_alive(job_record: dict[str, Any]) -> bool | None:
    """Whether the process a job.json names still runs (its start time guards against a reused pid); None
    when the record has no pid yet (a job the starter has not forked)."""
    if job_record and "pid" not in job_record:
        return None  # written before the starter forked the job: its process is not known yet
    try:
        pid, start_time = int(job_record["pid"]), float(job_record["start_time"])
    except (KeyError, TypeError, ValueError, OverflowError):
        return False  # no job.json (a CLI run), or one that names no process
    if pid <= 0:
        return False  # -1 or 0 name no one process (os.kill would signal a whole group)
    import psutil

    try:
        process = psutil.Process(pid)
        return abs(process.create_time() - start_time) < 1.0 and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
