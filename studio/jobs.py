"""The studio's job registry: the one training job of this process, its folders, and what a page shows.

A web page never owns a job (its handlers stop when the browser goes away); it asks the `Studio`, which
lives as long as the server, to start or stop one, and polls `Studio.view()` for a `RunView`: a summary
of the job's events that any number of browsers can read at once. The last run of an earlier server
process is read back from its `events.jsonl`, so a restarted server still shows it.
"""

from __future__ import annotations

import json
import re
import threading
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from lora_core.config import TrainConfig

MAX_CURVE_POINTS = 400  # the loss curve shown is averaged down to this many points
UPLOADS = "uploads"
RUN_NAME = re.compile(r"[^A-Za-z0-9_.-]+")


class BusyError(RuntimeError):
    """A job is already training; only one trains per device."""


@dataclass
class RunView:
    """What a page shows of one run, built from its events."""

    job_id: int = 0  # 0: no run; runs of this process count from 1, one read back from disk is -1
    state: str = "idle"  # idle | preparing | running | stopping | complete | interrupted | error
    output_path: str = ""
    step: int = 0
    total_steps: int = 0
    percent: float = 0.0
    loss: float | None = None
    it_per_s: float = 0.0
    eta_s: float = -1.0
    epoch: int = 0
    device: str = ""
    model_family: str = ""
    loss_points: list[tuple[int, float]] = field(default_factory=list)
    samples: list[tuple[str, str, int]] = field(default_factory=list)  # (image path, prompt, step)
    checkpoints: list[tuple[int, str]] = field(default_factory=list)  # (step, path)
    final_path: str | None = None
    message: str = ""  # the error or interruption, in words
    error_field: str | None = None
    n_events: int = 0

    @property
    def active(self) -> bool:
        return self.state in ("preparing", "running", "stopping")

    def curve(self, max_points: int = MAX_CURVE_POINTS) -> list[tuple[int, float]]:
        """The loss curve, averaged over equal windows of steps when it has more points than a plot needs."""
        points = self.loss_points
        if len(points) <= max_points:
            return list(points)
        size = -(-len(points) // max_points)
        return [(window[-1][0], sum(loss for _, loss in window) / len(window))
                for window in (points[i:i + size] for i in range(0, len(points), size))]


def add_event(view: RunView, event: dict[str, Any]) -> None:
    """Fold one event (as `Event.to_dict()` gives it, or a line of events.jsonl) into the view."""
    kind = event.get("type")
    view.n_events += 1
    if kind == "started":
        view.total_steps = event["total_steps"]
        view.device, view.model_family = event["device"], event["model_family"]
        view.output_path = event.get("output_path", view.output_path)
    elif kind == "progress":
        for name in ("step", "total_steps", "percent", "loss", "it_per_s", "eta_s", "epoch"):
            setattr(view, name, event[name])
        if event["loss"] is not None:
            view.loss_points.append((event["step"], event["loss"]))
    elif kind == "sample":
        view.samples.append((event["image_path"], event["prompt"], event["step"]))
    elif kind == "checkpoint":
        view.checkpoints.append((event["step"], event["path"]))
    elif kind == "complete":
        view.state, view.final_path, view.step = "complete", event["final_path"], event["step"]
        view.percent = 100.0
    elif kind == "interrupted":
        view.state, view.message, view.step = "interrupted", event["message"], event["step"]
        if event.get("checkpoint_path"):
            view.checkpoints.append((event["step"], event["checkpoint_path"]))
    elif kind == "error":
        view.state, view.message, view.error_field = "error", event["message"], event.get("field")


def read_run(folder: Path) -> RunView | None:
    """The view of a finished run from its events.jsonl (a run that was still going when its server
    stopped shows as interrupted)."""
    log = folder / "events.jsonl"
    if not log.is_file():
        return None
    view = RunView(job_id=-1, state="preparing", output_path=str(folder))
    for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            add_event(view, json.loads(line))
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # a line cut short by a killed process
    if view.active:
        view.state, view.message = "interrupted", "the server stopped while this run was training"
    return view


class Studio:
    """One per server process: owns the worker, the outputs folder and the current job."""

    def __init__(self, outputs_root: str | Path, processes: int | str = 1):
        """`processes`: data-parallel training processes per job: a number, or "all" for every visible GPU.
        More than one runs the engine through `accelerate launch` in a child process (lora_core/launcher.py)."""
        self.processes = processes
        self.outputs_root = Path(outputs_root).resolve()
        self.outputs_root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._worker = None
        self._job = None
        self._job_id = 0
        self._view = RunView()
        self._seen = 0
        self._previous = self._latest_run_on_disk()

    # --- folders ---
    def run_folder(self, run_name: str) -> Path:
        """Where a run of this name writes: a folder directly under the outputs root."""
        name = RUN_NAME.sub("-", run_name.strip()).strip("-.")[:64]
        if not name or name == UPLOADS:
            raise ValueError(f"run name {run_name!r} cannot be used as a folder name; use letters, digits, "
                             "'-', '_' or '.'")
        return self.outputs_root / name

    def new_upload_folder(self) -> Path:
        """A fresh folder for one upload: the client's names never choose it."""
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        return self.outputs_root / UPLOADS / f"{stamp}-{uuid.uuid4().hex[:8]}"

    def _fresh(self, folder: Path) -> Path:
        """`folder`, or `folder-2`, `-3`... when an earlier run already wrote there."""
        candidate, number = folder, 1
        while candidate.exists() and any(candidate.iterdir()):
            number += 1
            candidate = folder.with_name(f"{folder.name}-{number}")
        return candidate

    # --- the job ---
    def start(self, config: TrainConfig, resume: bool = False) -> int:
        """Start training `config` in the background; the new job's id. A new run gets a fresh output
        folder; with `resume` it continues from the newest complete state in `config.output_path`.
        Raises BusyError while a job trains. Safe to call from many threads at once: one wins."""
        from lora_core.worker import BusyError as WorkerBusy
        from lora_core.worker import Worker

        with self._lock:
            if self._job is not None and self._job.running:
                raise BusyError(_busy_message(self._view))
            output = Path(config.output_path) if resume else self._fresh(Path(config.output_path))
            if not output.resolve().is_relative_to(self.outputs_root):
                raise ValueError(f"output folder {output} is outside {self.outputs_root}")
            config = config.model_copy(update={"output_path": str(output)})
            if self.num_processes() > 1:
                from lora_core.launcher import launch

                job = launch(config, self.num_processes(), extra_args=["--resume"] if resume else ())
            else:
                if self._worker is None:
                    self._worker = Worker()
                try:
                    job = self._worker.submit(config, resume=resume)
                except WorkerBusy as error:
                    raise BusyError(str(error)) from None
            self._job, self._job_id = job, self._job_id + 1
            self._view = RunView(job_id=self._job_id, state="preparing", output_path=str(output))
            self._seen = 0
            return self._job_id

    def stop(self) -> bool:
        """Ask the running job to stop after its current step (it saves a checkpoint). False when none runs."""
        with self._lock:
            if self._job is None or not self._job.running:
                return False
            self._job.request_stop()
            return True

    def num_processes(self) -> int:
        if self.processes == "all":
            from lora_core.launcher import device_count

            return max(1, device_count())
        return int(self.processes)

    def shutdown(self, timeout: float = 8.0) -> None:
        """Stop the running job and wait up to `timeout` s for its checkpoint (SIGTERM: `docker stop` waits 10 s)."""
        with self._lock:
            job = self._job
        if job is not None and job.running:
            job.request_stop()
            job.wait(timeout)

    def view(self) -> RunView:
        """The current (or last) run. Cheap to call every second from every open page."""
        with self._lock:
            if self._job is None:
                return self._previous or self._view
            events = self._job.snapshot()
            for event in events[self._seen:]:
                add_event(self._view, event.to_dict())
            self._seen = len(events)
            if self._view.state in ("preparing", "running", "stopping"):
                if not self._job.running and self._job.terminal is None:
                    self._view.state, self._view.message = "error", "training ended without a result"
                elif self._job.stop_requested:
                    self._view.state = "stopping"
                elif self._view.step:
                    self._view.state = "running"
            return self._view

    def current_config(self) -> TrainConfig | None:
        """The config of this process's latest job (what a page that opens later shows in its form)."""
        with self._lock:
            return None if self._job is None else self._job.config

    def last_output(self) -> Path | None:
        """The output folder of the run shown (the one Resume continues)."""
        view = self.view()
        return Path(view.output_path) if view.output_path else None

    def wait(self, timeout: float | None = None) -> RunView:
        """Block until the current job ends (for scripts and tests)."""
        job = self._job
        if job is not None:
            job.wait(timeout)
        return self.view()

    def _latest_run_on_disk(self) -> RunView | None:
        logs = [log for log in self.outputs_root.glob("*/events.jsonl") if log.parent.name != UPLOADS]
        if not logs:
            return None
        return read_run(max(logs, key=lambda log: log.stat().st_mtime).parent)


def _busy_message(view: RunView) -> str:
    where = f" (step {view.step} of {view.total_steps})" if view.total_steps else ""
    return (f"a training job is already running{where} in {view.output_path}; only one job trains on this "
            "device at a time. Stop it, or wait for it to finish, then start again.")
