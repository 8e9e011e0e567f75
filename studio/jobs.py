"""The studio's job registry: every job is a process working for a run folder; what a page shows of it.

A web page never owns a job (its handlers stop when the browser goes away); it asks the `Studio`, which lives
as long as the server, to `submit`, `stop`, `cancel` or `move_up` one, and polls `view()` for a RunView
(studio/jobview.py): the run's record (lora_core/runrecord.py, the one the Runs list reads) settled with what
this server knows of the job's process. A job runs in its own session (studio/launcher.py), so it outlives
the server: a restarted server follows the jobs still running again (their `job.json`, in the job's own folder
under `outputs/.studio/jobs`, studio/jobfiles.py), and a job that died without a final event is recorded as
failed with its exit status and the tail of its stderr.

Start puts a job in the queue (studio/queue.py, `outputs/.studio/queue.json`); it starts when a device is free: one
job per GPU (N processes wait for N), one at a time on the CPU, at once for a kind that takes none (the doctor);
`free_devices()` alone decides. Every kind (studio/pipeline.py) goes through `submit_job`, the queue, `_launch`
and the same supervision. Nothing here imports torch.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import threading
import time
import uuid
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from lora_core.config import TrainConfig
from lora_core.errors import UserError
from lora_core.eventlog import EventLog
from lora_core.events import Error
from lora_core.runrecord import EVENTS_FILE, FAILED, QUEUED, RunFiles, ended_before, settle
from lora_core.runtail import RecordTail
from studio import cleanup, pipeline, runs
from studio.jobfiles import JobFiles, jobs_folder, migrate
from studio.jobview import RunView, Submitted, ended_job, folder_view, job_tail, read_to_end
from studio.launcher import JobProcess, device_count
from studio.pipeline import BusyError, check_free, find_jobs, job_command, job_folder, record_end, target_of
from studio.queue import JobQueue, QueuedJob, QueueFull
from studio.starter import Starter

log = logging.getLogger("studio.jobs")

UPLOADS = "uploads"
RUN_NAME = re.compile(r"[^A-Za-z0-9_.-]+")
TICK_S = 0.5  # how often the registry looks at its running jobs
TOOLS = ("grid", "sweep", "score", "caption", "doctor")  # job kinds besides training: `python -m lora_core KIND ARGS`


@dataclass
class ActiveJob:
    job_id: str
    process: JobProcess
    tail: RecordTail
    config: TrainConfig | None = None
    stop_requested: bool = False
    kind: str = "train"  # or grid | sweep | score | caption | doctor
    queued: QueuedJob | None = None  # what was started (None: adopted from an earlier server)

    @property
    def devices(self) -> list[int]:
        return list(self.process.record.get("devices", []))


class Studio:
    """One per server process: the outputs folder, its running jobs and the devices they hold."""

    def __init__(self, outputs_root: str | Path, processes: int | str = 1, devices: int | None = None):
        """`processes`: data-parallel training processes per job: a number, or "all" for every visible GPU
        (more than one runs the engine through `accelerate launch`). `devices`: the GPUs this machine has
        (None: ask CUDA when first needed; 0: the CPU, where one job runs at a time)."""
        self.processes = processes
        self.outputs_root = Path(outputs_root).resolve()
        self.outputs_root.mkdir(parents=True, exist_ok=True)
        self._devices = devices
        self._lock = threading.RLock()
        self._wake = threading.Condition(self._lock)
        self._active: dict[str, ActiveJob] = {}
        self._tails: dict[str, RecordTail] = {}  # job id -> its run's events, for every job seen by this server
        self._configs: dict[str, TrainConfig] = {}
        self._job_files: dict[str, JobFiles] = {}  # job id -> its own folder (its stderr.log), for every job seen
        self._current = ""  # the job a page shows when it asks for none
        self._closed = self._closing = False
        # Jobs run in the environment the server started with: a later change to this process's (a test's
        # PYTEST_CURRENT_TEST, a library's setting) would differ from the starter's and make every job spawn.
        self._environment = dict(os.environ)
        self.starter = Starter(base=self._environment)  # forks one-process jobs and short children: no new import
        if devices is None:  # counted by a child process (launcher.device_count): ahead of the first Start
            threading.Thread(target=device_count, args=(self.starter,), name="count-devices", daemon=True).start()
        with self._lock:
            self._queue = JobQueue(self.outputs_root, owned=self._owns)  # jobs queued before a restart wait on
            self.damaged = list(self._queue.damaged)  # entries of damaged files, each left out (and logged)
            self.damaged += migrate(self.outputs_root)  # an older server's job files, out of its run folders
            for job_id in self._adopt_running_jobs():  # started just before the old server died: not again
                self._queue.jobs = [job for job in self._queue.jobs if job.job_id != job_id]
            for message in self.damaged[len(self._queue.damaged):]:
                log.warning("%s", message)
            self._previous = self._latest_run_on_disk() if not self._current else None
            self._dispatch()
        self._thread = threading.Thread(target=self._supervise, name="studio-jobs", daemon=True)
        self._thread.start()

    # --- folders ---
    def _owns(self, folder: Path) -> bool:
        """Whether `folder` is one this server may write: inside its outputs root, not the root itself."""
        return folder.is_relative_to(self.outputs_root) and folder != self.outputs_root

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

    def next_folder(self, run_name: str) -> Path:
        """The folder a new run of this name would write to now (a suffix when the name's folder is taken)."""
        with self._lock:
            return self._fresh(self.run_folder(run_name))

    def _fresh(self, folder: Path) -> Path:
        """`folder`, or `folder-2`, `-3`... when an earlier run already wrote there."""
        candidate, number = folder, 1
        taken = self._queue.folders() | {target_of(job.queued) for job in self._active.values() if job.queued}
        while (candidate.exists() and any(candidate.iterdir())) or candidate.resolve() in taken:
            number += 1
            candidate = folder.with_name(f"{folder.name}-{number}")
        return candidate

    # --- devices ---
    def num_processes(self) -> int:
        """Training processes (devices) per job."""
        if self.processes == "all":
            return max(1, self.device_count())
        return int(self.processes)

    def device_count(self) -> int:
        """GPUs on this machine; 0 for the CPU."""
        if self._devices is None:
            self._devices = device_count(self.starter)
        return self._devices

    def free_devices(self) -> list[int] | None:
        """The devices no running job holds: GPU indices, or [] for a free CPU; None when none is free.

        The one place that decides whether a job may start now."""
        with self._lock:
            if self.device_count() == 0:
                return None if any(job.kind not in pipeline.DEVICELESS for job in self._active.values()) else []
            held = {device for job in self._active.values() for device in job.devices}
            free = [device for device in range(self.device_count()) if device not in held]
            return free or None

    def _devices_for(self, wanted: int) -> list[int] | None:
        free = self.free_devices()
        if free is None:
            return None
        if self.device_count() == 0:
            return []
        return free[:wanted] if len(free) >= wanted else None

    # --- jobs ---
    def submit(self, config: TrainConfig, resume: bool = False) -> Submitted:
        """Queue training `config`; it starts at once when a device is free. A new run gets a fresh output
        folder; with `resume` it continues from the newest complete state in `config.output_path`.
        Raises BusyError when that folder already has a queued or running job (of this server, or any process
        holding its lock), ValueError for a folder outside the outputs. Safe to call from many threads."""
        with self._lock:
            output = Path(config.output_path) if resume else self._fresh(Path(config.output_path))
            if not output.resolve().is_relative_to(self.outputs_root):
                raise ValueError(f"output folder {output} is outside {self.outputs_root}")
            config = config.model_copy(update={"output_path": str(output)})
            job_id = f"{datetime.now():%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"
            submitted = self.submit_job(QueuedJob.of(job_id, config, resume, self.num_processes()))
            self._configs[job_id] = config
            return submitted

    def submit_tool(self, kind: str, folder: Path, args: list[str]) -> Submitted:
        """Queue `python -m lora_core KIND FOLDER ARGS`: a grid, sweep or score of the run in FOLDER, captioning or the
        doctor of the dataset FOLDER. It waits for a device like training (the doctor, pipeline.DEVICELESS, needs
        none); its job folder (events, stderr, job.json) is OUTPUTS/.studio/jobs/<job id>."""
        if kind not in TOOLS:
            raise ValueError(f"unknown job kind {kind!r}; one of {', '.join(TOOLS)}")
        folder = Path(folder).resolve()
        outside = not folder.is_relative_to(self.outputs_root) or folder == self.outputs_root
        if kind in pipeline.DRAWN and outside:  # captioning and the doctor work on a dataset folder
            raise ValueError(f"run folder {folder} is outside {self.outputs_root}")
        job_id = f"{datetime.now():%Y%m%d-%H%M%S}-{kind}-{uuid.uuid4().hex[:6]}"
        own = jobs_folder(self.outputs_root) / job_id  # the job's folder: its events, stderr and job.json
        return self.submit_job(QueuedJob(job_id, str(own), {}, kind=kind, args=[str(folder), *args]))

    def submit_job(self, job: QueuedJob) -> Submitted:
        """Queue any job (the one way in): refused (BusyError) when its target folder is busy or the queue
        is full; an OSError writing the queue (a full disk) refuses it too, and it never runs later."""
        with self._lock:
            check_free(target_of(job), job.kind, self._busy())
            try:
                self._queue.add(job)
            except QueueFull as error:
                raise BusyError(str(error)) from None
            self._dispatch()
            return Submitted.of(job.job_id, self._queue.position(job.job_id), job.output_path)

    def cancel(self, job_id: str) -> bool:
        """Take a queued job out of the queue (nothing of it was written); False when it is not queued."""
        with self._lock:
            return self._queue.remove(job_id) is not None

    def move_up(self, job_id: str) -> int | None:
        """Move a queued job one place up; its new 1-based position, None when it is not queued."""
        with self._lock:
            return self._queue.move_up(job_id)

    def queued(self) -> list[dict[str, Any]]:
        """The queue in order, a row a job (pipeline.queue_row: its id, position, kind, model, target...)."""
        with self._lock:
            return [pipeline.queue_row(job, index + 1) for index, job in enumerate(self._queue.jobs)]

    def _busy(self) -> dict[Path, set[str]]:
        """The folders this server's queued and running jobs work on, with their kinds."""
        busy: dict[Path, set[str]] = {}
        for job in [*self._queue.jobs, *(active.queued for active in self._active.values() if active.queued)]:
            busy.setdefault(target_of(job), set()).add(job.kind)
        for active in self._active.values():
            if active.queued is None:  # adopted: job.json says what it works on
                target = Path(str(active.process.record.get("target") or active.process.folder)).resolve()
                busy.setdefault(target, set()).add(active.kind)
        return busy

    def _dispatch(self) -> None:
        """Start queued jobs: those that take no device at once, the others in order while the head of the
        queue finds enough free devices."""
        for job in [job for job in self._queue.jobs if job.kind in pipeline.DEVICELESS and not self._closing]:
            self._launch(job, [])
        while self._queue.jobs and not self._closing:
            head = self._queue.jobs[0]
            devices = self._devices_for(head.processes)
            if devices is None:
                return
            self._launch(head, devices)

    def _launch(self, queued: QueuedJob, devices: list[int]) -> None:
        """Start a job taken off the queue. Its job.json (with its id) is written before it leaves the
        queue file, so a restart in between finds it started, never queued again."""
        folder, own = Path(queued.output_path), job_folder(self.outputs_root, queued)  # its events; its files
        tail = job_tail(folder, queued.job_id)
        self._tails[queued.job_id], self._job_files[queued.job_id] = tail, JobFiles(own)
        try:
            check_free(target_of(queued), queued.kind, {})  # another process may have taken it while it waited
            command, config = job_command(queued, own)
            # the doctor imports no torch: spawned, it runs in a second; the starter would first import the engine
            starter = None if queued.kind in pipeline.DEVICELESS else self.starter
            process = JobProcess.start(own, command, config, num_processes=queued.processes, devices=devices,
                                       env=self._environment, starter=starter, before_start=lambda: (
                                           folder.mkdir(parents=True, exist_ok=True),  # listed from now on
                                           self._queue.remove(queued.job_id)),
                                       record={"job_id": queued.job_id, "kind": queued.kind,
                                               "target": str(target_of(queued))})
        except (OSError, UserError, BusyError) as error:  # the job's view says why it never started
            with contextlib.suppress(OSError):  # out of memory's queue already: the file is rewritten later
                self._queue.remove(queued.job_id)
            log.warning("job %s could not start: %s", queued.job_id, error)
            message, where = f"the {queued.kind} job could not start: {error}", getattr(error, "field", None)
            if queued.resume and not isinstance(error, BusyError):  # the run's record says the resume failed
                event_log = EventLog(folder / EVENTS_FILE)
                event_log(Error(message=message, field=where))
                event_log.close()
            else:  # a job that never started leaves no folder behind, only this view in memory
                tail.update()  # (a run held by another process: what it wrote so far, then this refusal)
                tail.record.add(Error(message=message, field=where))
            return
        self._track(ActiveJob(queued.job_id, process, tail, config, kind=queued.kind, queued=queued))
        self._wake.notify_all()

    def _track(self, job: ActiveJob) -> None:
        if read_to_end(job.tail).ended:  # a resumed run: the earlier part's end is not this job's
            job.tail.record.begin_part()
        self._active[job.job_id] = job
        self._tails[job.job_id] = job.tail
        if job.config is not None:
            self._configs[job.job_id] = job.config
        if job.kind == "train":  # the Train panel shows training; a grid is followed from its run
            self._current = job.job_id

    def stop(self, job_id: str | None = None) -> bool:
        """Ask a running job (by default every one) to stop after its current step; it saves a checkpoint.
        False when no such job runs."""
        with self._lock:
            jobs = [job for key, job in self._active.items() if job_id in (None, key)]
            for job in jobs:
                job.stop_requested = True
                job.process.record["stop_requested"] = True
                with contextlib.suppress(OSError):
                    job.process.save()
                job.process.terminate()
            return bool(jobs)

    def running(self) -> list[str]:
        """Ids of the jobs running now."""
        with self._lock:
            return list(self._active)

    def view(self, job_id: str | None = None) -> RunView:
        """A job's run (by default the current or last one). Cheap to call every second from every page."""
        with self._lock:
            key = job_id or self._current
            tail = self._tails.get(key)
            if tail is None and (position := self._queue.position(key)):
                queued = self._queue.get(key)
                return RunView(job_id=key, state=QUEUED, output_path=queued.output_path if queued else "",
                               message=f"Queued: position {position} of {len(self._queue.jobs)}")
            if tail is None and job_id and (found := ended_job(self.outputs_root, job_id)):  # ended before a restart
                (tail, self._job_files[key]), self._tails[key] = found, found[0]
            if tail is None:
                return (self._previous or RunView()) if job_id is None else RunView(job_id=job_id)
            tail.update()
            job = self._active.get(key)
            if job is not None and not job.process.alive():
                self._reap()  # records a job lost without a final event; the device is free from now on
                tail.update()
                job = self._active.get(key)
            view = settle(tail.record, alive=job is not None, stop_requested=job is not None and job.stop_requested)
            if view.state == FAILED and not view.stderr_tail and key in self._job_files:
                view = replace(view, stderr_tail=self._job_files[key].stderr_tail())
            return view

    def current_config(self) -> TrainConfig | None:
        """The config of the current job (what a page that opens later shows in its form)."""
        with self._lock:
            return self._configs.get(self._current)

    def last_output(self) -> Path | None:
        """The output folder of the run shown (the one Resume continues)."""
        view = self.view()
        return Path(view.output_path) if view.output_path else None

    def wait(self, job_id: str | None = None, timeout: float | None = None) -> RunView:
        """Block until a job (by default the current one) ends (for scripts and tests)."""
        deadline = math.inf if timeout is None else time.monotonic() + timeout
        key = job_id or self._current
        with self._lock:
            while (key in self._active or self._queue.position(key)) and time.monotonic() < deadline:
                self._wake.wait(max(0.01, min(TICK_S, deadline - time.monotonic())))
        return self.view(key)

    def shutdown(self, timeout: float = 8.0, stop_jobs: bool = True) -> None:
        """Stop watching the jobs. With `stop_jobs` (SIGTERM to the server, e.g. `docker stop`, which waits
        10 s), first ask every running job to stop and wait up to `timeout` s for their checkpoints. Queued
        jobs stay in outputs/.studio/queue.json for the next server."""
        with self._lock:
            self._closing = True  # nothing queued starts from now on
        if stop_jobs and self.stop():
            deadline = time.monotonic() + timeout
            with self._lock:
                while self._active and time.monotonic() < deadline:
                    self._wake.wait(min(TICK_S, max(0.01, deadline - time.monotonic())))
        with self._lock:
            self._closed = True
            self._wake.notify_all()
        self.starter.close()  # the jobs it started run on

    # --- the supervisor thread ---
    def _supervise(self) -> None:
        with self._lock:
            while not self._closed:
                self._reap()
                self._dispatch()
                cleanup.prune_jobs_hourly(self.outputs_root, lambda: list(self._active))  # old job folders
                self._wake.wait(TICK_S)

    def _reap(self) -> None:
        """Forget jobs whose process ended; one that ended without a final event is recorded as failed."""
        for job_id, job in list(self._active.items()):
            if job.process.alive():
                continue
            if not read_to_end(job.tail).ended:  # a long run's end is past 1 MiB
                record_end(job.process, job.tail)
            del self._active[job_id]
            self._wake.notify_all()

    def _adopt_running_jobs(self) -> set[str]:
        """Jobs of an earlier server process, of every kind: those still running (or still starting: a
        job.json without a pid, whose job is found by its lock) are followed again, those that died without a
        final event are recorded as failed. The ids of every job found, started or not: never started twice."""
        found, seen = [], set()
        for process in find_jobs(self.outputs_root, self.damaged):
            job_id = str(process.record.get("job_id") or process.folder.name)
            seen.add(job_id)
            tail = job_tail(process.events_folder, job_id)
            self._job_files[job_id] = JobFiles(process.folder)
            if read_to_end(tail).ended:  # its job is over, unless that end is an earlier part's (a resume starting)
                if not ended_before(tail.record, process.started()):
                    continue
                tail.record.begin_part()
            kind = str(process.record.get("kind") or "train")
            job = ActiveJob(job_id, process, tail, kind=kind if kind in ("train", *TOOLS) else "train",
                            stop_requested=bool(process.record.get("stop_requested")))
            found.append((process.start_time, job))
        for _, job in sorted(found, key=lambda item: item[0]):
            self._active[job.job_id] = job
            self._tails[job.job_id] = job.tail
            if job.kind == "train":
                self._current = job.job_id
        self._reap()
        return seen

    def _latest_run_on_disk(self) -> RunView | None:
        folders = runs.run_folders(self.outputs_root)
        newest = max(folders, default=None, key=lambda folder: RunFiles(folder).events.stat().st_mtime
                     if RunFiles(folder).events.is_file() else 0.0)
        return None if newest is None else folder_view(newest)
