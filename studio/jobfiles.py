"""The server's own files of a job: `OUTPUTS/.studio/jobs/<job id>/`, for every kind, training included.

A run folder holds what the run is (its config, events, checkpoints, LoRAs, report: what a CLI run also
has); the server's bookkeeping of the process that works for it lives here, in a folder the engine never
sweeps:

    job.json          the job's id, kind, target (a training's run folder), token, pid, start time, command,
                      devices, whether a stop was asked (studio/launcher.py `JobProcess`)
    job_config.json   the config a training job was started with (its `--config`)
    stderr.log        the job's stderr
    events.jsonl      a tool job's events (a training's go into its run folder's events.jsonl)
    .job.lock         the job folder's lock, held by the job's command wrapper (lora_core/job.py) with its token

A run's training jobs are found by their job.json's `target` (`training_jobs`), read once per job folder and
remembered: the Runs list asks on every poll. Any job is found by its id (`find_job`: an id a client sends,
so only one of the form the server makes), also one that ended before the server restarted. A job.json an
older server left in a run folder is moved here when a server starts (`migrate`). Which folders go when is
studio/cleanup.py's `prune_jobs` (a training's go with its run: `remove_jobs_of`). Nothing here imports torch.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import threading
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_core import runlock
from lora_core.files import atomic_write_text
from lora_core.safefile import open_regular, read_json
from studio.queue import JOB_ID, STUDIO_DIR

log = logging.getLogger("studio.jobfiles")
JOBS = "jobs"  # under OUTPUTS/.studio: one folder per job
JOB_FILE = "job.json"
JOB_CONFIG_FILE = "job_config.json"
STDERR_FILE = "stderr.log"
STDERR_TAIL_LINES = 20
# The ids the server gives jobs (studio/jobs.py): a training's 20250101-120000-a1b2c3, a tool's
# 20250101-120000-doctor-a1b2c3. An id from a client names a job folder only when it is one of these.
SERVER_JOB_ID = re.compile(r"[0-9]{8}-[0-9]{6}(-[a-z]{1,16})?-[0-9a-f]{6}")


def jobs_folder(outputs_root: str | Path) -> Path:
    return Path(outputs_root) / STUDIO_DIR / JOBS


@dataclass(frozen=True)
class JobFiles:
    """The files of one job folder, by what they are."""

    folder: Path

    @property
    def job(self) -> Path:
        return self.folder / JOB_FILE

    @property
    def job_config(self) -> Path:
        return self.folder / JOB_CONFIG_FILE

    @property
    def stderr(self) -> Path:
        return self.folder / STDERR_FILE

    def record(self) -> dict[str, Any]:
        """job.json as the starting process wrote it ({} when there is none or it cannot be read)."""
        data = read_json(self.job)
        return data if isinstance(data, dict) else {}

    def stderr_tail(self, lines: int = STDERR_TAIL_LINES) -> list[str]:
        """The last non-empty lines of stderr.log (read from its last 64 KiB)."""
        try:
            with open_regular(self.stderr) as handle:
                handle.seek(max(0, os.fstat(handle.fileno()).st_size - 64 * 1024))
                text = handle.read(64 * 1024).decode("utf-8", errors="replace")
        except OSError:
            return []
        kept: deque[str] = deque(maxlen=lines)
        for line in text.splitlines():
            if line.strip():
                kept.append(line.rstrip())
        return list(kept)


_known: dict[tuple[str, str], tuple[str, str] | None] = {}  # (root, job folder) -> (run name, started_at)
_known_lock = threading.Lock()


def training_jobs(outputs_root: str | Path) -> dict[str, JobFiles]:
    """The newest training job of each run under `outputs_root`: {run folder name: its job's files}. A
    job.json whose target is not a folder directly under the root (damaged, forged) names no run."""
    root = Path(outputs_root).resolve()
    try:
        names = [entry.name for entry in os.scandir(jobs_folder(root)) if entry.is_dir(follow_symlinks=False)]
    except OSError:
        return {}
    newest: dict[str, tuple[str, str]] = {}
    for name in names:
        key = (str(root), name)
        with _known_lock:
            known = _known.get(key, False)
        if known is False:
            known = _run_of(root, JobFiles(jobs_folder(root) / name).record())
            if known is not None:  # a job.json not written yet (or damaged) is read again next time
                with _known_lock:
                    _known[key] = known
        if known is not None and (known[0] not in newest or newest[known[0]] < (known[1], name)):
            newest[known[0]] = (known[1], name)
    return {run: JobFiles(jobs_folder(root) / name) for run, (_, name) in newest.items()}


def _run_of(root: Path, record: dict[str, Any]) -> tuple[str, str] | None:
    """(run folder name, started_at) of a training job's record; None for any other."""
    target = record.get("target")
    if record.get("kind", "train") != "train" or not isinstance(target, str) or "\0" in target:
        return None
    path = Path(target)
    if not path.is_absolute() or path.parent != root or path.name in ("", ".", "..") or path.name.startswith("."):
        return None
    return path.name, str(record.get("started_at", ""))


def find_job(outputs_root: str | Path, job_id: str) -> tuple[JobFiles, dict[str, Any], Path] | None:
    """The job folder of `job_id` (an id a client sent: only an id the server makes, so never a path), its
    job.json and the folder its events are in (a training's run folder directly under the root, a tool's job
    folder); None when there is no such job, or its job.json is damaged or names another job."""
    if not isinstance(job_id, str) or not SERVER_JOB_ID.fullmatch(job_id):
        return None
    root = Path(outputs_root).resolve()
    files = JobFiles(jobs_folder(root) / job_id)
    if files.folder.is_symlink() or not files.folder.is_dir():
        return None
    record = files.record()
    if record.get("job_id") != job_id:
        return None
    if record.get("kind", "train") != "train":
        return files, record, files.folder
    run = _run_of(root, record)
    return (files, record, root / run[0]) if run is not None else None


def job_of(run_folder: str | Path) -> JobFiles | None:
    """The newest training job of the run in `run_folder` (a folder directly under the outputs root)."""
    folder = Path(run_folder)
    return training_jobs(folder.parent).get(folder.name)


def remove_jobs_of(run_folder: str | Path) -> list[Path]:
    """Delete the job folders of every training job of a run being deleted (none that a process holds)."""
    folder = Path(run_folder)
    root = folder.parent.resolve()
    removed = []
    for name in list(_named(root, folder.name)):
        path = jobs_folder(root) / name
        if runlock.holder(path) is None and not path.is_symlink():
            removed.append(remove_job_folder(path))
        with _known_lock:
            _known.pop((str(root), name), None)
    return removed


def remove_job_folder(folder: Path) -> Path:
    """Delete one job folder (its caller made sure no job uses it), forgetting what was read of it."""
    shutil.rmtree(folder, ignore_errors=True)
    with _known_lock:
        _known.pop((str(folder.parent.parent.parent.resolve()), folder.name), None)
    return folder


def _named(root: Path, run: str) -> list[str]:
    training_jobs(root)  # every readable job.json of the root is known from here on
    with _known_lock:
        return [name for (where, name), known in _known.items() if where == str(root) and known and known[0] == run]


def migrate(outputs_root: str | Path) -> list[str]:
    """Move the job files an older server kept in its run folders (job.json, job_config.json, stderr.log) into
    a job folder of their own, as the job's `target`; what could not be moved, in words (logged)."""
    root = Path(outputs_root).resolve()
    said = []
    for old in sorted(root.glob(f"*/{JOB_FILE}")):
        run = old.parent
        if run.name.startswith(".") or run.is_symlink() or old.is_symlink():
            continue
        if not old.is_file():  # a FIFO, a folder: no job record, left where it is (nothing reads it now)
            said.append(f"{old} is not a regular file; it is no job record and was left where it is")
            continue
        record = read_json(old)
        record = record if isinstance(record, dict) else {}
        job_id = str(record.get("job_id", ""))
        name = job_id if JOB_ID.fullmatch(job_id) else f"moved-{run.name}"[:80]
        folder = jobs_folder(root) / name
        try:
            folder.mkdir(parents=True, exist_ok=True)
            if record:  # damaged: moved as it is, where find_jobs says it is damaged
                record.setdefault("target", str(run))
                record.setdefault("kind", "train")
                atomic_write_text(old, json.dumps(record, indent=2) + "\n")
            for file in (JOB_FILE, JOB_CONFIG_FILE, STDERR_FILE):
                if (run / file).is_file() and not (run / file).is_symlink():
                    os.replace(run / file, folder / file)
        except OSError as error:
            said.append(f"the job files of {run} could not be moved to {folder}: {error}")
    for message in said:
        log.warning("%s", message)
    return said
