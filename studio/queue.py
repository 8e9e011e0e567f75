"""The job queue: jobs waiting for a device, in order, kept in `outputs/queue.json` (written atomically).

The file survives a server restart; the registry (studio/jobs.py) starts the head of the queue whenever
enough devices are free. Nothing here starts a process or imports torch.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from lora_core.config import ConfigError, TrainConfig
from lora_core.configfile import config_to_file_dict, parse_config
from lora_core.files import atomic_write_text

log = logging.getLogger("studio.queue")
QUEUE_FILE = "queue.json"


@dataclass
class QueuedJob:
    """One job waiting for a device: what it will train, where, and on how many devices."""

    job_id: str
    output_path: str
    config: dict[str, Any]  # the config as a config file holds it (output_path already decided)
    resume: bool = False
    processes: int = 1
    queued_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    kind: str = "train"  # train, or a tool drawn from a run: grid | sweep | score
    args: list[str] = field(default_factory=list)  # a tool's command line after its name (the run folder first)

    def train_config(self) -> TrainConfig:
        return parse_config(self.config)

    @classmethod
    def of(cls, job_id: str, config: TrainConfig, resume: bool, processes: int) -> QueuedJob:
        return cls(job_id, config.output_path, config_to_file_dict(config), resume, processes)


class JobQueue:
    """Jobs in the order they will start. Not thread-safe: the registry calls it under its lock."""

    def __init__(self, outputs_root: Path):
        self.path = outputs_root / QUEUE_FILE
        self.jobs: list[QueuedJob] = self._load()

    def _load(self) -> list[QueuedJob]:
        if not self.path.is_file():
            return []
        try:
            items = json.loads(self.path.read_text(encoding="utf-8"))
            jobs = [QueuedJob(**item) for item in items]
        except (OSError, ValueError, TypeError) as error:
            log.warning("ignoring an unreadable %s: %s", self.path, error)
            return []
        kept = []
        for job in jobs:  # a config that no longer validates (the model changed) is dropped, and said
            try:
                if job.kind == "train":
                    job.train_config()
                kept.append(job)
            except ConfigError as error:
                log.warning("dropping queued job %s: its config is no longer valid: %s", job.job_id, error)
        return kept

    def save(self) -> None:
        atomic_write_text(self.path, json.dumps([asdict(job) for job in self.jobs], indent=2) + "\n")

    def add(self, job: QueuedJob) -> int:
        """Append `job`; its 1-based position."""
        self.jobs.append(job)
        self.save()
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
