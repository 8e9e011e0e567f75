"""The job queue: jobs waiting for a device, in order, kept in `outputs/.studio/queue.json` (written atomically).

The file survives a server restart; the registry (studio/jobs.py) starts the head of the queue whenever
enough devices are free. It lives in the server's own folder (`STUDIO_DIR`), which no run folder is and no
engine's sweep of leftovers touches. Each entry is checked when read: one that is damaged (a wrong type, a
path outside the folders the server owns, a NUL) is dropped and said, never the whole queue. The queue holds
at most `MAX_QUEUED` jobs. Nothing here starts a process or imports torch.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from lora_core.config import ConfigError, TrainConfig
from lora_core.configfile import config_to_file_dict, parse_config
from lora_core.files import atomic_write_text
from lora_core.runrecord import read_json

log = logging.getLogger("studio.queue")
STUDIO_DIR = ".studio"  # under the outputs root: the server's own files (the queue, tool jobs' folders)
QUEUE_FILE = "queue.json"
MAX_QUEUED = 100
KINDS = ("train", "grid", "sweep", "score", "caption", "doctor")
JOB_ID = re.compile(r"[A-Za-z0-9_.-]{1,80}")


class QueueFull(RuntimeError):
    """The queue already holds MAX_QUEUED jobs."""


def queue_path(outputs_root: Path) -> Path:
    return Path(outputs_root) / STUDIO_DIR / QUEUE_FILE


@dataclass
class QueuedJob:
    """One job waiting for a device: what it will train, where, and on how many devices."""

    job_id: str
    output_path: str
    config: dict[str, Any]  # the config as a config file holds it (output_path already decided)
    resume: bool = False
    processes: int = 1
    queued_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    kind: str = "train"  # train, or a tool: grid | sweep | score (drawn from a run) | caption | doctor
    args: list[str] = field(default_factory=list)  # a tool's command line after its name (the run folder first)

    def train_config(self) -> TrainConfig:
        return parse_config(self.config)

    @classmethod
    def of(cls, job_id: str, config: TrainConfig, resume: bool, processes: int) -> QueuedJob:
        return cls(job_id, config.output_path, config_to_file_dict(config), resume, processes)


class JobQueue:
    """Jobs in the order they will start. Not thread-safe: the registry calls it under its lock."""

    def __init__(self, outputs_root: Path, owned: Callable[[Path], bool] | None = None):
        """`owned(path)`: whether a queued job's folder is one the server may write (default: under the root)."""
        self.root = Path(outputs_root).resolve()
        self.path = queue_path(self.root)
        self._owned = owned or (lambda path: path.is_relative_to(self.root) and path != self.root)
        self.damaged: list[str] = []  # what was dropped from the file, said on the page and in the log
        old = self.root / QUEUE_FILE  # where servers before the .studio folder kept it
        if old.is_file() and not old.is_symlink() and not self.path.exists():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            old.replace(self.path)
        self.jobs: list[QueuedJob] = self._load()

    def _load(self) -> list[QueuedJob]:
        items = read_json(self.path)
        if items is None and self.path.exists():
            self.damaged.append(f"{self.path} could not be read as a list of jobs; the queue starts empty")
        kept: list[QueuedJob] = []
        for index, item in enumerate(items if isinstance(items, list) else []):
            try:
                job = self._checked(item)
            except (ConfigError, ValueError, TypeError, OverflowError, RecursionError) as error:
                self.damaged.append(f"queued job {index + 1} of {self.path} was dropped: {error}")
                continue
            if job.job_id not in {other.job_id for other in kept}:
                kept.append(job)
        for message in self.damaged:
            log.warning("%s", message)
        return kept[:MAX_QUEUED]

    def _checked(self, item: Any) -> QueuedJob:
        """One entry of the file as a job, or ValueError saying what is wrong with it."""
        if not isinstance(item, dict):
            raise ValueError("not an object")
        job = QueuedJob(**item)
        if not isinstance(job.job_id, str) or not JOB_ID.fullmatch(job.job_id):
            raise ValueError(f"job_id {str(job.job_id)[:80]!r} is not one this server makes")
        if job.kind not in KINDS:
            raise ValueError(f"kind {str(job.kind)[:40]!r} is not one of {', '.join(KINDS)}")
        texts = [job.output_path, *job.args] if isinstance(job.args, list) else None
        if texts is None or not all(isinstance(text, str) and "\0" not in text for text in texts):
            raise ValueError("its output_path and args must be text without NUL")
        if not self._owned(Path(job.output_path).resolve()):
            raise ValueError(f"its folder {job.output_path[:200]} is outside the folders this server owns")
        if type(job.processes) is not int or not 1 <= job.processes <= 1024 or not isinstance(job.config, dict):
            raise ValueError(f"processes {str(job.processes)[:20]} must be a whole number from 1 and config an object")
        job.resume = bool(job.resume)
        if job.kind == "train":  # a config that no longer validates (the model changed) is dropped, and said
            job.train_config()
        return job

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path, json.dumps([asdict(job) for job in self.jobs], indent=2) + "\n")

    def add(self, job: QueuedJob) -> int:
        """Append `job`; its 1-based position. QueueFull when the queue is full; when the file cannot be
        written (a full disk) the job is not queued either: a Start refused never runs later."""
        if len(self.jobs) >= MAX_QUEUED:
            raise QueueFull(f"the queue already holds {MAX_QUEUED} jobs; wait for some to start, or cancel some")
        self.jobs.append(job)
        try:
            self.save()
        except BaseException:
            self.jobs.remove(job)
            raise
        return len(self.jobs)

    def position(self, job_id: str) -> int | None:
        """1-based place in the queue, or None when the job is not queued."""
        return next((index + 1 for index, job in enumerate(self.jobs) if job.job_id == job_id), None)

    def get(self, job_id: str) -> QueuedJob | None:
        return next((job for job in self.jobs if job.job_id == job_id), None)

    def remove(self, job_id: str) -> QueuedJob | None:
        job = self.get(job_id)
        if job is not None:
            self.jobs.remove(job)
            self.save()
        return job

    def move_up(self, job_id: str) -> int | None:
        """Swap the job with the one before it; its new position (None when it is not queued)."""
        index = next((i for i, job in enumerate(self.jobs) if job.job_id == job_id), None)
        if index is None:
            return None
        if index > 0:
            self.jobs[index - 1], self.jobs[index] = self.jobs[index], self.jobs[index - 1]
            self.save()
        return max(index, 1)

    def folders(self) -> set[Path]:
        return {Path(job.output_path).resolve() for job in self.jobs}
