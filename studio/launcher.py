"""A job is a process: start the engine's CLI for one run folder, find it again later, and tell how it ended.

`JobProcess.start(folder, command)` runs a job's command (training: `python -m lora_core train --config
folder/job_config.json`, through `accelerate launch` for several devices) in its own session, so the job
outlives whoever started it, with its stderr in `folder/stderr.log` and its pid and start time in
`folder/job.json`. `folder` is the job's own folder, OUTPUTS/.studio/jobs/<id> (studio/jobfiles.py), never a
run folder. Its events are what the job appends itself (a training's to its run folder's events.jsonl, a
tool's to `folder/events.jsonl`): any reader, this process or a later one, follows that file.
Given the page's `Starter`, a one-process job is forked from it (studio/starter.py: no new import of
torch) and its pid reaches job.json when the starter answers. `JobProcess.attach(folder)` finds a job
again from job.json (the start time guards against a reused pid).
A job that dies without a final event (SIGKILL, the out-of-memory killer, a native crash) gets one from
`record_lost`: an `error` with its exit status or signal and the last lines of its stderr.

Stop is SIGTERM to the job's process: the CLI, or accelerate's launcher (torch's elastic agent), which passes
it to every training process; they agree on the step to stop after and the main one saves a checkpoint.
Nothing here imports torch (the page's registry uses it): `device_count` and `validation_report` (the
`--validate-only` report) ask a child process, so their caller never loads torch nor touches a device; given
the page's `Starter`, that child is forked from it too (`children.run_python`), else spawned.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from lora_core import runlock
from lora_core.config import TrainConfig
from lora_core.configfile import config_to_file_dict
from lora_core.eventlog import EventLog, read_events
from lora_core.events import Error, ValidationReport, parse_event
from lora_core.files import atomic_write_text
from lora_core.runlock import JOB_FOLDER_VARIABLE, TOKEN_VARIABLE
from lora_core.runrecord import RunFiles, process_alive, read_json
from studio.children import run_python
from studio.jobfiles import JOB_CONFIG_FILE, JOB_FILE, STDERR_FILE, JobFiles
from studio.starter import StartedJob, Starter

PACKAGE_ROOT = Path(__file__).resolve().parent.parent  # where `-m lora_core` is importable from
VALIDATE_TIMEOUT_S = 600.0  # a hub model's configs may have to be downloaded first
STARTING_GRACE_S = 120.0  # a job forked but not yet holding its lock (importing the engine) counts as alive

log = logging.getLogger("studio.launcher")


def device_count(starter: Starter | None = None) -> int:
    """CUDA devices a job started from here sees (CUDA_VISIBLE_DEVICES applies); 0 without CUDA. Counted once,
    by a child process (forked from `starter` when given): the caller (the page's server) never loads torch
    nor the CUDA driver."""
    with _COUNTING:  # one child, however many threads ask at once
        if not _counted:
            _counted.append(_count_devices(starter))
        return _counted[0]


_COUNTING = threading.Lock()
_counted: list[int] = []  # the count, once known: the same for every server in this process


def _count_devices(starter: Starter | None) -> int:
    # niced: counted ahead of the first Start (studio/jobs.py), it must not slow the server answering pages
    code = ("import os; hasattr(os, 'nice') and os.nice(10); import torch; "
            "print(torch.cuda.device_count() if torch.cuda.is_available() else 0)")
    environment = job_environment(None, 1, None, starter.base if starter else None)
    # torch alone: spawned in about a second while the starter still imports the whole engine, which the
    # first Start (it needs the count) would otherwise wait for
    result = run_python(["-c", code], environment, starter, VALIDATE_TIMEOUT_S, spawn_while_importing=True)
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
                      timeout: float = VALIDATE_TIMEOUT_S, starter: Starter | None = None) -> dict[str, Any]:
    """`train --validate-only`'s report of `config` (ok, problems, warnings, device, devices, memory_estimate,
    total_steps...), made by a child process (forked from `starter` when given; its environment from `env`,
    else the starter's, else this process's). The page's server asks this way so that it never imports torch
    nor touches a device: a CUDA context in the long-lived server would hold memory every job then lacks, and
    a process that has used CUDA must never fork again. RuntimeError when the child gives no report."""
    with tempfile.TemporaryDirectory(prefix="lora-validate-") as folder:
        path = Path(folder) / "config.json"
        path.write_text(json.dumps(config_to_file_dict(config)), encoding="utf-8")
        environment = job_environment(config, 1, None, starter.base if env is None and starter else env)
        if num_processes > 1:  # the plan divides the batches over this many processes (distributed.world_size)
            environment["WORLD_SIZE"] = str(num_processes)
        result = run_python(launch_command(path, 1, extra_args=["--validate-only"])[1:], environment, starter,
                            timeout)
    for line in reversed(result.stdout.splitlines()):
        try:
            event = parse_event(line)
        except ValueError:
            continue
        if isinstance(event, ValidationReport):
            return event.to_dict()
    tail = "\n".join(result.stderr.strip().splitlines()[-5:])
    raise RuntimeError(f"the check ended without a report (exit code {result.returncode}): {tail}")


def train_command(folder: str | Path, config: TrainConfig, num_processes: int = 1, resume: bool = False) -> list[str]:
    """Write `config` as the job's config file in its job folder `folder` and return the command that trains it."""
    path = Path(folder) / JOB_CONFIG_FILE
    Path(folder).mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(config_to_file_dict(config), indent=2) + "\n")
    return launch_command(path, num_processes, extra_args=["--resume"] if resume else ())


def tool_command(argv: Sequence[str]) -> list[str]:
    """`python -m lora_core ARGV` for a tool job (grid, sweep, caption): one process."""
    return [sys.executable, "-m", "lora_core", *argv]


def process_start_time(pid: int) -> float | None:
    """When process `pid` started (seconds since the epoch), or None when there is no such process."""
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


@dataclass
class JobProcess:
    """One job's process, started here or found again from its job folder's job.json."""

    folder: Path
    pid: int
    start_time: float  # with the pid, names the process: a pid reused by another process has another start
    record: dict[str, Any] = field(default_factory=dict)  # job.json as written
    popen: subprocess.Popen | StartedJob | None = None  # set when this process started the job (its exit is known)

    @classmethod
    def start(cls, folder: str | Path, command: Sequence[str], config: TrainConfig | None = None, *,
              num_processes: int = 1, devices: Sequence[int] | None = None, env: Mapping[str, str] | None = None,
              record: Mapping[str, Any] | None = None, starter: Starter | None = None,
              before_start: Callable[[], object] = lambda: None) -> JobProcess:
        """Start `command` (`train_command` or `tool_command`) as the job of `folder`, in its own session: the
        one way every job's process starts. The job writes its own events (training into its run folder, a
        tool into `folder`, named by LORA_JOB_FOLDER) and holds `folder`'s lock (lora_core/runlock.py);
        `record` goes into job.json with a fresh token the process carries (LORA_JOB_TOKEN), which later
        proves that a pid is this job's (`owned`). `config`: the run's, for its device (None: the job's own
        options decide). With a `starter`, a one-process job is forked from it (studio/starter.py).
        `before_start` runs once job.json is written, before the process starts (the page takes the job off
        its queue there); if it raises, nothing starts."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        token = secrets.token_hex(16)
        environment = {**job_environment(config, num_processes, devices, env), TOKEN_VARIABLE: token,
                       JOB_FOLDER_VARIABLE: str(folder.resolve())}
        return cls._spawn(folder, list(command), environment, {
            **(record or {}), "token": token, "num_processes": num_processes, "devices": list(devices or []),
            "resume": "--resume" in command}, starter, before_start)

    @classmethod
    def _spawn(cls, folder: Path, command: list[str], environment: dict[str, str], record: dict[str, Any],
               starter: Starter | None, before_start: Callable[[], object]) -> JobProcess:
        # stdout carries the events the job also writes itself: nobody needs this copy of them
        stderr_path, stdout_path = folder / STDERR_FILE, Path(os.devnull)
        with open(stderr_path, "ab") as log:
            log.write(f"--- {_now()} {' '.join(command)}\n".encode())

        def spawn() -> subprocess.Popen:
            with open(stderr_path, "ab") as log, open(stdout_path, "ab") as stdout:
                return subprocess.Popen(command, cwd=PACKAGE_ROOT, env=environment, stdin=subprocess.DEVNULL,
                                        stdout=stdout, stderr=log, start_new_session=True)

        job = cls(folder, 0, 0.0, {**record, "started_at": _now(), "command": command})
        job.save()  # before the process exists (its pid comes later): a server restarted meanwhile finds it
        try:
            before_start()
        except BaseException:
            (folder / JOB_FILE).unlink(missing_ok=True)
            raise
        if starter is not None and command[1:3] == ["-m", "lora_core"]:
            job.popen = starter.start(command[1:], environment, stdout_path, stderr_path, spawn, job._started)
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
        """The job recorded in `folder/job.json`, or None when there is none or it is damaged. A job.json
        without a pid (the server or its starter died before the pid was written) takes the pid from the
        lock the job holds, when that holder carries the job's token."""
        data = read_json(Path(folder) / JOB_FILE)
        if not isinstance(data, dict) or not isinstance(data.get("token", ""), str):
            return None
        try:
            pid, start_time = int(data.get("pid", 0)), float(data.get("start_time", 0.0))
        except (TypeError, ValueError, OverflowError):
            return None
        if pid < 0 or not math.isfinite(start_time):
            return None
        job = cls(Path(folder), pid, start_time, data)
        if not pid:
            job.find_pid()
        return job

    @property
    def events_folder(self) -> Path:
        """Where the job's events are: a training's run folder (job.json's `target`), a tool's job folder."""
        target = self.record.get("target")
        if self.record.get("kind", "train") == "train" and isinstance(target, str) and target:
            return Path(target)
        return self.folder

    def _holder(self) -> dict[str, Any] | None:
        """Who holds the job's lock: its job folder's (the command wrapper's), else its run's (run_job's; a job
        an older server started holds only that one)."""
        return runlock.held_by(self.folder) or runlock.held_by(self.events_folder)

    def find_pid(self) -> bool:
        """Take the pid from the job's lock when its holder carries this job's token; True when found."""
        who = self._holder()
        token = self.record.get("token")
        if not token or not who or who.get("token") != token or not isinstance(who.get("pid"), int):
            return False
        self.pid, self.start_time = who["pid"], float(who.get("start_time") or 0.0)
        self.record.update(pid=self.pid, start_time=self.start_time)
        return True

    def owned(self) -> bool:
        """Whether `pid` is provably this job's process, the only one this server ever signals: the pid and its
        start time match, and the process carries the token job.json holds (in its environment when it was
        spawned; a forked one holds the job folder's lock with the token written in it)."""
        import psutil

        token = self.record.get("token")
        if not token or not isinstance(token, str) or self.pid <= 0:
            return False
        try:
            process = psutil.Process(self.pid)
            if abs(process.create_time() - self.start_time) >= 1.0:
                return False
            with contextlib.suppress(psutil.Error):
                if process.environ().get(TOKEN_VARIABLE) == token:
                    return True
            who = self._holder()
            locks = {str(runlock.lock_path(folder.resolve())) for folder in (self.folder, self.events_folder)}
            return bool(who and who.get("token") == token and who.get("pid") == self.pid
                        and any(item.path in locks for item in process.open_files()))
        except psutil.Error:
            return False

    def save(self) -> None:
        record = dict(self.record)  # a copy: the starter's thread may add the pid meanwhile
        atomic_write_text(self.folder / JOB_FILE, json.dumps(record, indent=2) + "\n")

    def alive(self) -> bool:
        if self._started_here():
            return self.popen.poll() is None
        if not self.pid and not self.find_pid():  # forked, but its pid never reached job.json
            return self._holder() is not None or self._may_still_start()
        return bool(process_alive({"pid": self.pid, "start_time": self.start_time}))

    def _started_here(self) -> bool:
        """Whether this process started the job and still knows its process (a Popen, or the starter's
        answer): then it signals it directly; otherwise only after `owned` proves the pid."""
        return self.popen is not None and not getattr(self.popen, "lost", False)

    def _may_still_start(self) -> bool:
        """A job.json without a pid whose job has not taken its lock yet: still importing, or never forked.
        Given STARTING_GRACE_S from its start before it counts as lost."""
        started = self.started()
        return started is not None and time.time() - started < STARTING_GRACE_S

    def started(self) -> float | None:
        """When the job was started (seconds since the epoch): job.json's started_at, written just before its
        process starts (a process's own start time is known to about a second only), else that."""
        try:
            return datetime.fromisoformat(str(self.record.get("started_at"))).timestamp()
        except (TypeError, ValueError, OverflowError):
            return self.start_time or None

    def describe_exit(self) -> str:
        """How the process ended, in words (only known to the process that started it)."""
        code, what = None if self.popen is None else self.popen.poll(), PROCESS_OF.get(
            str(self.record.get("kind", "train")), "the job's process")
        if code is None:
            started_by = "the job starter, which ended first" if self.popen else "an earlier server process"
            return (f"{what} (pid {self.pid}) ended without a final event; its exit status is "
                    f"unknown (it was started by {started_by})")
        if code < 0:
            name = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else str(-code)
            hint = " (the kernel's out-of-memory killer sends this too)" if -code == signal.SIGKILL else ""
            return f"{what} was killed by signal {-code} ({name}){hint} before it reported a result"
        return f"{what} exited with code {code} without a result"

    def terminate(self) -> None:
        """Ask the job to stop after its current step (it saves a checkpoint)."""
        self._signal(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL the job and every process under it (torch's agent starts workers in their own sessions)."""
        import psutil

        if not self.alive():
            return
        if not self.pid:
            if self._started_here():  # still starting: the starter's answer brings the signal
                self.popen.send_signal(signal.SIGKILL)
                return
            if not self.find_pid():
                return
        if not self._started_here() and not self.owned():
            log.warning("not killing pid %s: it is not provably job %s's process", self.pid, self.folder)
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
        if self._started_here():
            self.popen.send_signal(signum)  # a starting job's waits for its pid
            return
        if not self.pid and not self.find_pid():
            return
        if not self.owned():  # a forged or stale job.json must never make the server signal another process
            log.warning("not signalling pid %s: it is not provably job %s's process", self.pid, self.folder)
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signum)


# What a lost job's message calls its process, by job.json's kind (a record without one is an older training's)
PROCESS_OF = {"train": "the training process", "grid": "the grid's process", "sweep": "the sweep's process",
              "score": "the scoring job's process", "caption": "the captioning job's process",
              "doctor": "the dataset doctor's process"}


def record_lost(job: JobProcess) -> Error:
    """End a job whose process died without a final event: one `error` in its events.jsonl (a training's in
    its RUN folder's), with how the process ended and the last lines of its stderr, so every reader (the live
    view, the Runs list, the report) sees it as failed."""
    files = RunFiles(job.events_folder)
    steps = [event.step for event in read_events(files.events) if event.type == "progress"] \
        if files.events.is_file() else []
    tail = JobFiles(job.folder).stderr_tail(5)
    message = job.describe_exit() + (". Last lines of stderr.log:\n" + "\n".join(tail) if tail else "")
    event = Error(message=message, step=steps[-1] if steps else None)
    event_log = EventLog(files.events)
    event_log(event)
    event_log.close()
    return event


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")
