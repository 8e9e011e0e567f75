"""A job is a process: start the engine's CLI for one run folder, find it again later, and tell how it ended.

`JobProcess.start(folder, config)` runs `python -m lora_core train --config folder/job_config.json` (through
`accelerate launch` for several devices) in its own session, so the job outlives whoever started it, with
its stderr in `folder/stderr.log` and its pid and start time in `folder/job.json`. Its events are what
`run_job` appends to `folder/events.jsonl`: any reader, this process or a later one, follows that file.
Given the page's `Starter`, a one-process job is forked from it (lora_core/starter.py: no new import of
torch) and its pid reaches job.json when the starter answers. `JobProcess.attach(folder)` finds a job
again from job.json (the start time guards against a reused pid).
A job that dies without a final event (SIGKILL, the out-of-memory killer, a native crash) gets one from
`record_lost`: an `error` with its exit status or signal and the last lines of its stderr.

Stop is SIGTERM to the job's process: the CLI, or accelerate's launcher (torch's elastic agent), which passes
it to every training process; they agree on the step to stop after and the main one saves a checkpoint.
Nothing here imports torch (the page's registry uses it): `device_count` and `validation_report` (the
`--validate-only` report) ask a child process, so their caller never loads torch nor touches a device.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from lora_core.config import TrainConfig
from lora_core.configfile import config_to_file_dict
from lora_core.eventlog import EventLog, read_events
from lora_core.events import Error, ValidationReport, parse_event
from lora_core.files import JOB_FILE, atomic_write_text
from lora_core.runrecord import EVENTS_FILE, JOB_CONFIG_FILE, STDERR_FILE, RunFiles, process_alive
from lora_core.starter import StartedJob, Starter

PACKAGE_ROOT = Path(__file__).resolve().parent.parent  # where `-m lora_core` is importable from
VALIDATE_TIMEOUT_S = 600.0  # a hub model's configs may have to be downloaded first

log = logging.getLogger("lora_core.launcher")


def device_count() -> int:
    """CUDA devices a job started from here sees (CUDA_VISIBLE_DEVICES applies); 0 without CUDA. Counted once,
    by a child process: the caller (the page's server) never loads torch nor the CUDA driver."""
    with _COUNTING:  # one child, however many threads ask at once
        return _count_devices()


_COUNTING = threading.Lock()


@functools.cache
def _count_devices() -> int:
    # niced: counted ahead of the first Start (studio/jobs.py), it must not slow the server answering pages
    code = ("import os; hasattr(os, 'nice') and os.nice(10); import torch; "
            "print(torch.cuda.device_count() if torch.cuda.is_available() else 0)")
    result = subprocess.run([sys.executable, "-c", code], cwd=PACKAGE_ROOT, stdin=subprocess.DEVNULL,
                            capture_output=True, text=True, timeout=VALIDATE_TIMEOUT_S)
    try:
        return int(result.stdout.split()[-1])
    except (IndexError, ValueError):
        log.warning("could not count the GPUs (exit code %s); jobs run on the CPU: %s", result.returncode,
                    result.stderr.strip()[-500:])
        return 0


def launch_command(config_path: str | Path, num_processes: int = 1, *, extra_args: Sequence[str] = (),
                   python: str = sys.executable) -> list[str]:
    """The command that trains `config_path` with `num_processes` data-parallel processes on this machine.

    One process runs the engine's CLI directly (accelerate's single-process launcher would not pass SIGTERM
    on). Several run under `accelerate launch --multi_gpu`, on a free port so that two jobs never clash.
    """
    if num_processes < 1:
        raise ValueError(f"num_processes must be at least 1, got {num_processes}")
    train = ["-m", "lora_core", "train", "--config", str(config_path), *extra_args]
    if num_processes == 1:
        return [python, *train]
    return [python, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(num_processes),
            "--num_machines", "1", "--main_process_port", "0", "--mixed_precision", "no", "--dynamo_backend", "no",
            *train]


def job_environment(config: TrainConfig | None, num_processes: int, devices: Sequence[int] | None = None,
                    base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The child's environment: unbuffered, gloo for several CPU processes, and only its own GPUs visible."""
    env = {**(os.environ if base is None else base), "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PACKAGE_ROOT), env.get("PYTHONPATH", "")]))
    if devices:  # indices into what this process sees, which may itself be a CUDA_VISIBLE_DEVICES subset
        visible = [item for item in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if item.strip()]
        env["CUDA_VISIBLE_DEVICES"] = ",".join(visible[i] if i < len(visible) else str(i) for i in devices)
    elif (config is not None and config.device == "cpu") or num_processes > 1:
        env["ACCELERATE_USE_CPU"] = "true"  # several CPU processes: gloo instead of NCCL
    return env


def validation_report(config: TrainConfig, num_processes: int = 1, env: Mapping[str, str] | None = None,
                      timeout: float = VALIDATE_TIMEOUT_S) -> dict[str, Any]:
    """`train --validate-only`'s report of `config` (ok, problems, warnings, device, devices, memory_estimate,
    total_steps...), made by a child process. The page's server asks this way so that it never imports torch
    nor touches a device: a CUDA context in the long-lived server would hold memory every job then lacks, and
    a process that has used CUDA must never fork again. RuntimeError when the child gives no report."""
    with tempfile.TemporaryDirectory(prefix="lora-validate-") as folder:
        path = Path(folder) / "config.json"
        path.write_text(json.dumps(config_to_file_dict(config)), encoding="utf-8")
        environment = job_environment(config, 1, None, env)
        if num_processes > 1:  # the plan divides the batches over this many processes (distributed.world_size)
            environment["WORLD_SIZE"] = str(num_processes)
        result = subprocess.run(launch_command(path, 1, extra_args=["--validate-only"]), cwd=PACKAGE_ROOT,
                                env=environment, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                timeout=timeout)
    for line in reversed(result.stdout.splitlines()):
        try:
            event = parse_event(line)
        except ValueError:
            continue
        if isinstance(event, ValidationReport):
            return event.to_dict()
    tail = "\n".join(result.stderr.strip().splitlines()[-5:])
    raise RuntimeError(f"the check ended without a report (exit code {result.returncode}): {tail}")


def process_start_time(pid: int) -> float | None:
    """When process `pid` started (seconds since the epoch), or None when there is no such process."""
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


@dataclass
class JobProcess:
    """One job's process, started here or found again from its run folder's job.json."""

    folder: Path
    pid: int
    start_time: float  # with the pid, names the process: a pid reused by another process has another start
    record: dict[str, Any] = field(default_factory=dict)  # job.json as written
    popen: subprocess.Popen | StartedJob | None = None  # set when this process started the job (its exit is known)

    @classmethod
    def start(cls, folder: str | Path, config: TrainConfig, num_processes: int = 1, *, resume: bool = False,
              devices: Sequence[int] | None = None, env: Mapping[str, str] | None = None,
              record: Mapping[str, Any] | None = None, starter: Starter | None = None) -> JobProcess:
        """Write the config and start the job in its own session; `record` goes into job.json too. With a
        `starter`, a one-process job is forked from it (lora_core/starter.py) instead of spawned."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(folder / JOB_CONFIG_FILE, json.dumps(config_to_file_dict(config), indent=2) + "\n")
        command = launch_command(folder / JOB_CONFIG_FILE, num_processes, extra_args=["--resume"] if resume else ())
        environment = job_environment(config, num_processes, devices, env)
        return cls._spawn(folder, command, environment, None, {**(record or {}), "num_processes": num_processes,
                                                               "devices": list(devices or []), "resume": resume},
                          starter)

    @classmethod
    def start_tool(cls, folder: str | Path, argv: Sequence[str], config: TrainConfig | None, *,
                   devices: Sequence[int] | None = None, env: Mapping[str, str] | None = None,
                   record: Mapping[str, Any] | None = None, starter: Starter | None = None) -> JobProcess:
        """Run `python -m lora_core ARGV` (grid, sweep, caption: tools that print JSON-lines events on stdout) as a
        job of `folder`: its stdout becomes `folder/events.jsonl`, so it is followed like a training job.
        `config`: the run's, for its device (None for a job of no run: `caption DATASET ...`, whose own
        `--device` decides)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "lora_core", *argv]
        return cls._spawn(folder, command, job_environment(config, 1, devices, env), folder / EVENTS_FILE,
                          {**(record or {}), "num_processes": 1, "devices": list(devices or []), "resume": False},
                          starter)

    @classmethod
    def _spawn(cls, folder: Path, command: list[str], environment: dict[str, str], stdout_path: Path | None,
               record: dict[str, Any], starter: Starter | None = None) -> JobProcess:
        stderr_path, stdout_path = folder / STDERR_FILE, stdout_path or Path(os.devnull)
        with open(stderr_path, "ab") as log:
            log.write(f"--- {_now()} {' '.join(command)}\n".encode())

        def spawn() -> subprocess.Popen:
            with open(stderr_path, "ab") as log, open(stdout_path, "ab") as stdout:
                return subprocess.Popen(command, cwd=PACKAGE_ROOT, env=environment, stdin=subprocess.DEVNULL,
                                        stdout=stdout, stderr=log, start_new_session=True)

        job = cls(folder, 0, 0.0, {**record, "started_at": _now(), "command": command})
        if starter is not None and command[1:3] == ["-m", "lora_core"]:
            job.save()  # without its pid until the starter answers (a job.json without one is never adopted)
            job.popen = starter.start(command[3:], environment, stdout_path, stderr_path, spawn, job._started)
        if job.popen is None:
            job.popen = spawn()
            job._started(job.popen.pid)
        return job

    def _started(self, pid: int) -> None:
        """The job's process exists: its pid and start time go into job.json (if that cannot be written, the
        job runs on, followed by this process; a later server will not find it)."""
        self.pid, self.start_time = pid, process_start_time(pid) or time.time()
        self.record.update(pid=pid, start_time=self.start_time)
        try:
            self.save()
        except OSError as error:
            log.warning("could not record job %s's pid in %s: %s", pid, self.folder / JOB_FILE, error)

    @classmethod
    def attach(cls, folder: str | Path) -> JobProcess | None:
        """The job recorded in `folder/job.json`, or None when there is none (or it cannot be read)."""
        try:
            data = json.loads((Path(folder) / JOB_FILE).read_text(encoding="utf-8"))
            return cls(Path(folder), int(data["pid"]), float(data["start_time"]), data)
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def save(self) -> None:
        record = dict(self.record)  # a copy: the starter's thread may add the pid meanwhile
        atomic_write_text(self.folder / JOB_FILE, json.dumps(record, indent=2) + "\n")

    def alive(self) -> bool:
        if self.popen is not None and not getattr(self.popen, "lost", False):
            return self.popen.poll() is None
        return bool(process_alive({"pid": self.pid, "start_time": self.start_time}))

    def describe_exit(self) -> str:
        """How the process ended, in words (only known to the process that started it)."""
        code = None if self.popen is None else self.popen.poll()
        if code is None:
            started_by = "the job starter, which ended first" if self.popen else "an earlier server process"
            return (f"the training process (pid {self.pid}) ended without a final event; its exit status is "
                    f"unknown (it was started by {started_by})")
        if code < 0:
            name = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else str(-code)
            hint = " (the kernel's out-of-memory killer sends this too)" if -code == signal.SIGKILL else ""
            return f"the training process was killed by signal {-code} ({name}){hint} before it reported a result"
        return f"the training process exited with code {code} without a result"

    def terminate(self) -> None:
        """Ask the job to stop after its current step (it saves a checkpoint)."""
        self._signal(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL the job and every process under it (torch's agent starts workers in their own sessions)."""
        import psutil

        if not self.alive():
            return
        if not self.pid:  # still starting: the starter's answer brings the signal
            self.popen.send_signal(signal.SIGKILL)
            return
        try:
            processes = [*psutil.Process(self.pid).children(recursive=True), psutil.Process(self.pid)]
        except psutil.Error:
            return
        for process in processes:
            with contextlib.suppress(psutil.Error):
                process.kill()

    def _signal(self, signum: int) -> None:
        if not self.alive():
            return
        if self.popen is not None:
            self.popen.send_signal(signum)  # a starting job's waits for its pid
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signum)


def record_lost(job: JobProcess) -> Error:
    """End a run whose process died without a final event: one `error` in events.jsonl, with how the
    process ended and the last lines of its stderr, so every reader sees the run as failed."""
    files = RunFiles(job.folder)
    steps = [event.step for event in read_events(files.events) if event.type == "progress"] \
        if files.events.is_file() else []
    tail = files.stderr_tail(5)
    message = job.describe_exit() + (". Last lines of stderr.log:\n" + "\n".join(tail) if tail else "")
    event = Error(message=message, step=steps[-1] if steps else None)
    event_log = EventLog(files.events)
    event_log(event)
    event_log.close()
    return event


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
