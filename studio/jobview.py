"""What a page shows of one job: its run's record with what the server knows of the job (`RunView`), and what
Start answers (`Submitted`). The registry that makes them is studio/jobs.py.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from lora_core.runrecord import FAILED, STARTING, RunRecord, ended_before
from lora_core.runtail import RecordTail
from studio.jobfiles import JobFiles, find_job, job_of
from studio.runs import read_record

MAX_CURVE_POINTS = 400  # the loss curve shown is averaged down to this many points
READ_SECONDS = 2.0  # an ended job looked up by its id: its events are read for at most this long at once
IDLE = "idle"  # the page's view when there is no run at all (not a run's state)


@dataclass
class Submitted:
    """What Start answers: the new job's id, whether it runs now or waits, and where it writes."""

    job_id: str
    state: str  # running | queued
    position: int  # 1-based place in the queue; 0 when it runs
    output_path: str

    @classmethod
    def of(cls, job_id: str, position: int | None, output_path: str) -> Submitted:
        """A job that runs now (no queue position) or waits at `position`."""
        return cls(job_id, "queued" if position else "running", position or 0, output_path)

    def to_dict(self) -> dict[str, Any]:
        return {"job_id": self.job_id, "state": self.state, "position": self.position,
                "output_path": self.output_path}


@dataclass
class RunView(RunRecord):
    """What a page shows of one job's run: the run's record (lora_core/runrecord.py), settled with what this
    server knows of the job's process, and the job's id. `state` is "idle" only for no run at all."""

    state: str = IDLE
    job_id: str = ""  # "" : no run
    stderr_tail: list[str] = field(default_factory=list)  # the job's last stderr lines, for a failed run

    def curve(self, max_points: int = MAX_CURVE_POINTS) -> list[tuple[int, float]]:
        """The loss curve, averaged over equal windows of steps when it has more points than a plot needs."""
        points = self.loss_points
        if len(points) <= max_points:
            return list(points)
        size = -(-len(points) // max_points)
        return [(window[-1][0], sum(loss for _, loss in window) / len(window))
                for window in (points[i:i + size] for i in range(0, len(points), size))]


def job_tail(folder: Path, job_id: str) -> RecordTail:
    """Follows a job's run folder into a RunView."""
    return RecordTail(folder, RunView(job_id=job_id, state=STARTING, output_path=str(folder)))


def read_to_end(tail: RecordTail, seconds: float | None = None) -> RunRecord:
    """The record with every event written so far folded in (one look reads 1 MiB: a long run's end, or an
    earlier part's, is further on), reading for at most `seconds` (None: to the end)."""
    deadline = math.inf if seconds is None else time.monotonic() + seconds
    tail.update()
    while tail.behind and time.monotonic() < deadline:
        read = tail.size - tail.behind
        tail.update()
        if tail.size - tail.behind <= read:  # nothing more read: the file went, or cannot be read now
            break
    return tail.record


def ended_job(outputs_root: Path, job_id: str) -> tuple[RecordTail, JobFiles] | None:
    """An ended job that this server does not follow (it ended before a restart), found by its id from its
    folder in .studio/jobs: its events and its files; None for no such job, or one that has not ended (a
    job still running is followed by the registry itself). A training's part ends only after it started:
    the run's end before it is an earlier part's."""
    found = find_job(outputs_root, job_id)
    if found is None:
        return None
    files, record, events = found
    tail = job_tail(events, job_id)
    read_to_end(tail, READ_SECONDS)
    started = record.get("started_at")
    try:
        since = datetime.fromisoformat(str(started)).timestamp() if started else None
    except (TypeError, ValueError, OverflowError):
        since = None
    training = record.get("kind", "train") == "train"
    if tail.behind or not tail.record.ended or (training and ended_before(tail.record, since)):
        return None  # (events too long to read in READ_SECONDS: not found this time, nor cached)
    return tail, files


def folder_view(folder: Path) -> RunView | None:
    """The view of a run folder on disk, for no job of this server (a page opened after a restart)."""
    job = job_of(folder)  # the run's newest training job (none for a CLI run)
    job_id = str(job.record().get("job_id", "")) if job else ""
    try:
        view = read_record(folder, into=RunView(job_id=job_id, state=STARTING, output_path=str(folder)))
    except Exception as error:  # noqa: BLE001  (a damaged newest run must not cost the Train tab)
        return RunView(job_id=job_id, state=FAILED, output_path=str(folder),
                       message=f"this run's files cannot be read ({type(error).__name__}: {str(error)[:200]})")
    if not isinstance(view, RunView):
        return None
    return replace(view, stderr_tail=job.stderr_tail()) if view.state == FAILED and job else view
