"""A fork server for the page's jobs: one process imports the engine once, then forks each job from it.

A new Python process spends 5 to 6 s of CPU importing torch, diffusers, transformers and peft before a job
does anything (measured on a 2-core machine), longer than a short job trains. So the page server starts its
one-process jobs through a starter: `python -m studio.starter`, spawned clean by the server (none of the
server's threads, no CUDA), imports the engine, then forks one process per request read on its stdin. The
forked process becomes `python -m lora_core ARGV`: a session of its own, stdin from /dev/null, stdout and
stderr to the job's files, the job's environment and working directory. The starter answers the new pid on
its stdout and, when that process ends, its exit status (as `Popen.returncode` gives it).

Forking after torch is imported is what torch's DataLoader does on Linux; it is unsafe only once the parent
has used CUDA. The starter refuses every request while a CUDA driver library is mapped into it, and the
server then spawns the job as a new process. Libraries read environment variables when they are imported,
so a job whose environment differs from the starter's in more than `PER_JOB` is spawned too. When the
server goes (its end of the pipe closes) the starter exits; the jobs run on.

`Starter` is the server's end; it never imports torch. `StartedJob` stands for one job in the server: the
subset of `subprocess.Popen` that `launcher.JobProcess` uses, for a process whose pid arrives later.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

PACKAGE_ROOT = Path(__file__).resolve().parent.parent  # where `-m lora_core` is importable from
# read when CUDA or accelerate starts, or by the job alone (its token and folder, lora_core/runlock.py)
PER_JOB = frozenset({"CUDA_VISIBLE_DEVICES", "ACCELERATE_USE_CPU", "LORA_JOB_TOKEN", "LORA_JOB_FOLDER"})
PRELOAD = ("lora_core.cli", "lora_core.job", "lora_core.training", "lora_core.grid")
REAP_S = 0.2  # how often the starter looks for ended jobs

log = logging.getLogger("studio.starter")


# --- the starter process ---
def serve(requests: int, replies) -> dict[str, Any] | None:
    """The starter's loop, reading requests from the file descriptor `requests` and answering on `replies`.
    Returns in a forked child with the request it is to run; in the starter, returns None once `requests`
    closes (the server has gone)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C in the server's terminal is the server's to handle
    for variable in ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY"):  # as the CLI and the tools set them
        os.environ.setdefault(variable, "error")  # before their imports, which read them
    for module in PRELOAD:
        __import__(module)
    children: set[int] = set()
    pending = b""

    def reply(message: dict[str, Any]) -> None:
        replies.write(json.dumps(message) + "\n")
        replies.flush()

    reply({"ready": True})
    while True:
        for pid in list(children):
            with contextlib.suppress(ChildProcessError):
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    children.discard(pid)
                    reply({"exited": pid, "status": os.waitstatus_to_exitcode(status)})
        if b"\n" not in pending:
            if not select.select([requests], [], [], REAP_S)[0]:
                continue
            chunk = os.read(requests, 1 << 16)
            if not chunk:
                return None
            pending += chunk
            continue
        line, pending = pending.split(b"\n", 1)
        request = json.loads(line)
        if cuda_driver_loaded():
            reply({"id": request["id"], "refused": "this process has used CUDA; a forked job could not"})
            continue
        pid = os.fork()
        if pid == 0:
            return request
        children.add(pid)
        reply({"id": request["id"], "pid": pid})


def cuda_driver_loaded() -> bool:
    """True when a CUDA driver library is mapped into this process (CUDA was used: fork is unsafe)."""
    try:
        return "libcuda.so" in Path("/proc/self/maps").read_text()
    except OSError:
        return True  # cannot tell: never fork


def become_job(request: Mapping[str, Any]) -> int | str | None:
    """In the forked child: turn into `python -m lora_core ARGV` as `request` describes it, and run it."""
    os.setsid()
    stdin = os.open(os.devnull, os.O_RDONLY)
    stdout = os.open(request["stdout"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    stderr = os.open(request["stderr"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    for source, target in ((stdin, 0), (stdout, 1), (stderr, 2)):
        os.dup2(source, target)
        os.close(source)
    sys.stdin = open(0, closefd=False)  # noqa: SIM115  (the process's own streams, for its whole life)
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115  (PYTHONUNBUFFERED's line buffering)
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGCHLD):
        signal.signal(signum, signal.SIG_DFL)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    from lora_core.__main__ import main

    sys.argv = [str(Path(__file__).with_name("__main__.py")), *request["argv"]]
    return main(list(request["argv"]))


# --- the server's end ---
class StartedJob:
    """One job asked of the starter: `pid` (None until the starter answers), `poll()` (its exit status, None
    while it runs or is starting) and `send_signal()` (kept until the pid is known). When the starter cannot
    fork it, the job is spawned as a process of its own instead (`spawn`)."""

    def __init__(self, spawn: Callable[[], subprocess.Popen], on_pid: Callable[[int], None]):
        self.pid: int | None = None
        self.lost = False  # the starter ended first: the exit status will not be known
        self._spawn, self._on_pid = spawn, on_pid
        self._status: int | None = None
        self._popen: subprocess.Popen | None = None
        self._signals: list[int] = []
        self._lock = threading.Lock()

    def poll(self) -> int | None:
        return self._popen.poll() if self._popen is not None else self._status

    def send_signal(self, signum: int) -> None:
        with self._lock:
            if self.pid is None:
                self._signals.append(signum)
                return
            if self.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signum)

    def _started(self, pid: int) -> None:
        with self._lock:
            self.pid = pid
            pending, self._signals = self._signals, []
        try:
            self._on_pid(pid)
        finally:  # a Stop or Kill asked while the job was starting reaches it whatever on_pid did
            for signum in pending:
                self.send_signal(signum)

    def _spawned_instead(self) -> None:
        try:
            popen = self._spawn()
        except OSError:
            self._status = 1  # nothing ran: the job's view says the process ended without a result
            return
        self._popen = popen
        self._started(popen.pid)

    def _ended(self, status: int) -> None:
        self._status = status


class Starter:
    """The server's starter process, started with the first job asked of it. `start` hands it a job and
    returns at once (a `StartedJob`), or returns None when this job must be spawned as a process of its own
    (several processes, another environment, or no fork on this system)."""

    def __init__(self, cwd: str | Path = PACKAGE_ROOT):
        self.cwd = str(cwd)
        self.environment: dict[str, str] | None = None  # the first job's, less PER_JOB: the starter's own
        self._process: subprocess.Popen | None = None
        self._jobs: dict[int, StartedJob] = {}  # request id, then pid -> job
        self._requests = 0
        self._ready = False  # the starter has imported the engine and reads requests (it may fork from now on)
        self._lock = threading.Lock()
        self._closed = False

    @staticmethod
    def available() -> bool:
        return sys.platform.startswith("linux") and hasattr(os, "fork")

    def accepts(self, environment: Mapping[str, str]) -> bool:
        return (self.available() and not self._closed
                and self.environment in (None, shared_environment(environment)))

    def start(self, argv: Sequence[str], environment: Mapping[str, str], stdout: Path, stderr: Path,
              spawn: Callable[[], subprocess.Popen], on_pid: Callable[[int], None]) -> StartedJob | None:
        """Ask for `python -m lora_core ARGV`; `spawn` starts it as a process of its own if the starter
        refuses or ends before answering, `on_pid` is told the pid either way (from another thread)."""
        if not self.accepts(environment):
            return None
        job = StartedJob(spawn, on_pid)
        request = {"argv": list(argv), "env": dict(environment), "cwd": self.cwd, "stdout": str(stdout),
                   "stderr": str(stderr)}
        with self._lock:
            try:
                process = self._running(environment)
                self._requests += 1
                self._jobs[-self._requests] = job  # negative keys: waiting for a pid
                process.stdin.write(json.dumps({"id": self._requests, **request}) + "\n")
                process.stdin.flush()
            except OSError:  # the starter could not start, or has just ended: spawn this job and later ones
                self._jobs.pop(-self._requests, None)
                self._closed = True
                return None
        return job

    def close(self) -> None:
        """End the starter (the jobs it started run on)."""
        with self._lock:
            self._closed = True
            process, self._process = self._process, None
        if process is not None:
            with contextlib.suppress(OSError):
                process.stdin.close()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def _running(self, environment: Mapping[str, str]) -> subprocess.Popen:
        if self._process is None:
            self.environment = shared_environment(environment)
            self._process = subprocess.Popen([sys.executable, "-m", "studio.starter"], cwd=self.cwd,
                                             env=self.environment, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                             text=True, bufsize=1)
            threading.Thread(target=self._read, args=(self._process,), name="job-starter", daemon=True).start()
        return self._process

    def _read(self, process: subprocess.Popen) -> None:
        for line in process.stdout:
            try:
                message = json.loads(line)
            except ValueError:
                continue
            with self._lock:
                if "exited" in message:
                    job = self._jobs.pop(message["exited"], None)
                elif "id" in message:
                    job = self._jobs.pop(-message["id"], None)
                    if job is not None and "pid" in message:
                        self._jobs[message["pid"]] = job
                else:
                    self._ready = self._ready or bool(message.get("ready"))
                    continue
            if job is None:
                continue
            try:
                if "exited" in message:
                    job._ended(message["status"])
                elif "pid" in message:
                    job._started(message["pid"])
                else:  # refused (CUDA was used here): this job and every later one is spawned
                    self._closed = True
                    job._spawned_instead()
            except Exception:  # one job's failure is that job's: this thread follows every job
                log.exception("the job starter's answer %s could not be handled", message)
        with self._lock:  # the starter has ended: jobs not yet forked are spawned, the others are on their own
            self._closed = True
            left, self._jobs = self._jobs, {}
        for key, job in left.items():
            # Once the starter was ready it may have forked a job it never answered for: spawning that one
            # would start it twice. It is left lost (pid unknown): its process is found by the lock it takes
            # (launcher.JobProcess.find_pid). Before ready it read no request, so it forked none.
            job.lost = key > 0 or self._ready
            if key < 0 and not self._ready:
                try:
                    job._spawned_instead()
                except Exception:
                    log.exception("a job the starter had not forked could not be spawned")
        process.wait()


def shared_environment(environment: Mapping[str, str]) -> dict[str, str]:
    """What the starter and a job forked from it must agree on: everything but `PER_JOB`."""
    return {key: value for key, value in environment.items() if key not in PER_JOB}


if __name__ == "__main__":
    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # whatever an import prints (Python or a native library) goes to stderr, not to the server
    job_request = serve(sys.stdin.fileno(), answers)
    if job_request is not None:
        answers.close()  # the job holds nothing of the starter's pipes to the server
        sys.exit(become_job(job_request))
