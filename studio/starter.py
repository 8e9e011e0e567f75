"""A fork server for the page's processes: one process imports the engine once, then forks each one from it.

A new Python process spends 5 to 6 s of CPU importing torch, diffusers, transformers and peft before a job
does anything (measured on a 2-core machine), longer than a short job trains. So the page server starts its
one-process jobs through a starter: `python -m studio.starter`, spawned clean by the server (none of the
server's threads, no CUDA), imports the engine, then forks one process per request read on its stdin. The
forked process becomes `python ARGS` (`-m lora_core ...` for a job, `-c CODE` for one of the server's short
questions that need torch): a session of its own, stdin from /dev/null, stdout and stderr to the files the
request names, the request's environment and working directory. The starter answers the new pid on its stdout
and, when that process ends, its exit status (as `Popen.returncode` gives it).

The server's short questions (the GPU count, `--validate-only`'s report, a model's family) go the same way
through `run_python` (studio/children.py), a `subprocess.run` forked from the starter, rather than import the
engine on each click.

Forking after torch is imported is what torch's DataLoader does on Linux; it is unsafe only once the parent
has used CUDA. The starter refuses every request while a CUDA driver library is mapped into it, and the
server then spawns the process instead. A forked process may use CUDA: it is a process of its own. Libraries
read environment variables when they are imported, so a process whose environment differs from the
starter's in more than `PER_JOB` is spawned too. When the server goes (its end of the pipe closes) the
starter exits; the jobs run on.

`Starter` is the server's end; it never imports torch. `StartedJob` stands for one process in the server: the
subset of `subprocess.Popen` that `launcher.JobProcess` uses, for a process whose pid arrives later.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import json
import logging
import math
import os
import runpy
import select
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

PACKAGE_ROOT = Path(__file__).resolve().parent.parent  # where `-m lora_core` is importable from
# read when CUDA or accelerate starts (WORLD_SIZE: --validate-only's plan for several processes), or by the
# job alone (its token and folder, lora_core/runlock.py)
PER_JOB = frozenset({"CUDA_VISIBLE_DEVICES", "ACCELERATE_USE_CPU", "WORLD_SIZE", "LORA_JOB_TOKEN",
                     "LORA_JOB_FOLDER"})
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
    # What Python's gc docs advise before fork without exec: the engine's objects, frozen, are never scanned by
    # a child's collections, whose reference updates would copy every page they touch. A child that printed
    # one line took 5.4 s to end without this and 1.0 s with it (2-core VM at a load of 7).
    gc.freeze()
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
    """In the forked child: turn into `python ARGS` (`-m MODULE ...` or `-c CODE ...`) as `request` describes
    it, and run it; what `sys.exit` takes (a module's own `sys.exit` raises SystemExit through here)."""
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
    flag, target, *rest = request["argv"]
    if flag == "-c":  # what `python -c CODE ARGS` does
        sys.argv = ["-c", *rest]
        exec(compile(target, "<string>", "exec"), {"__name__": "__main__"})  # noqa: S102  (the server's own code)
        return None
    sys.argv = [target, *rest]  # what `python -m MODULE ARGS` does (runpy puts the module's file first)
    runpy.run_module(target, run_name="__main__", alter_sys=True)
    return None


def run_short(request: Mapping[str, Any]) -> NoReturn:
    """In the forked child: `become_job` for one of the server's short children (`run_python`), ended as
    multiprocessing ends what it forks: exit handlers run and output is flushed, but not the interpreter's
    teardown, which touches every object inherited from the starter (0.6 s of a 0.8 s child at load 7)."""
    status = 1
    try:
        status = exit_status(become_job(request))
    except SystemExit as stop:
        status = exit_status(stop.code)
    except BaseException:  # as Python itself reports an uncaught exception: on stderr, exit status 1
        traceback.print_exc()
    finally:
        atexit._run_exitfuncs()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(status)


def exit_status(code: object) -> int:
    """The exit status `sys.exit(code)` gives (a message is printed on stderr, status 1)."""
    if code is None or isinstance(code, int):
        return code or 0
    print(code, file=sys.stderr)
    return 1


# --- the server's end ---
class StartedJob:
    """One job asked of the starter: `pid` (None until the starter answers), `poll()` (its exit status, None
    while it runs or is starting), `wait()` and `send_signal()` (kept until the pid is known). When the
    starter cannot fork it, the job is spawned as a process of its own instead (`spawn`)."""

    def __init__(self, spawn: Callable[[], subprocess.Popen], on_pid: Callable[[int], None]):
        self.pid: int | None = None
        self.lost = False  # the starter ended first: the exit status will not be known
        self._spawn, self._on_pid = spawn, on_pid
        self._status: int | None = None
        self._popen: subprocess.Popen | None = None
        self._signals: list[int] = []
        self._lock = threading.Lock()
        self._settled = threading.Event()  # ended, spawned instead, or lost: the starter will say no more

    def poll(self) -> int | None:
        return self._popen.poll() if self._popen is not None else self._status

    def wait(self, timeout: float | None = None) -> int | None:
        """Its exit status once it has ended, as `Popen.wait` (subprocess.TimeoutExpired after `timeout` s);
        None for a job `lost` with the starter (once its process, when its pid is known, has gone)."""
        deadline = math.inf if timeout is None else time.monotonic() + timeout
        if not self._settled.wait(timeout):
            raise subprocess.TimeoutExpired(f"process {self.pid or '(starting)'}", timeout or 0.0)
        if self._popen is not None:
            return self._popen.wait(None if timeout is None else max(0.0, deadline - time.monotonic()))
        while self.lost and self.pid and _running(self.pid):  # no longer anyone's child: nobody tells its end
            if time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"process {self.pid}", timeout or 0.0)
            time.sleep(REAP_S)
        return self._status

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
            self._settled.set()
            return
        self._popen = popen
        self._settled.set()
        self._started(popen.pid)

    def _ended(self, status: int) -> None:
        self._status = status
        self._settled.set()

    def _lose(self) -> None:
        self.lost = True
        self._settled.set()


def _running(pid: int) -> bool:
    """Whether process `pid` still runs (a zombie has ended; init reaps an orphan)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


class Starter:
    """The server's starter process, started with the first job asked of it. `start` hands it a job and
    returns at once (a `StartedJob`), or returns None when this job must be spawned as a process of its own
    (several processes, another environment, or no fork on this system)."""

    def __init__(self, cwd: str | Path = PACKAGE_ROOT, *, base: Mapping[str, str] | None = None):
        self.cwd = str(cwd)
        # the server's environment as it started, which its jobs' and short children's are made from
        self.base = dict(os.environ if base is None else base)
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

    def start(self, args: Sequence[str], environment: Mapping[str, str], stdout: Path, stderr: Path,
              spawn: Callable[[], subprocess.Popen], on_pid: Callable[[int], None], *,
              short: bool = False) -> StartedJob | None:
        """Ask for `python ARGS` (`-m MODULE ...` or `-c CODE ...`); `spawn` starts it as a process of its own
        if the starter refuses or ends before answering, `on_pid` is told the pid either way (from another
        thread). `short`: one of the server's short children, which skips Python's teardown (`run_short`)."""
        if not self.accepts(environment) or len(args) < 2 or args[0] not in ("-m", "-c"):
            return None
        job = StartedJob(spawn, on_pid)
        request = {"argv": list(args), "env": dict(environment), "cwd": self.cwd, "stdout": str(stdout),
                   "stderr": str(stderr), "short": short}
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

    @property
    def ready(self) -> bool:
        """Whether the starter has imported the engine and takes requests: a fork from it answers at once."""
        return self._ready and not self._closed

    def warm(self, environment: Mapping[str, str]) -> None:
        """Start the starter (it imports the engine in the background) without asking it for anything yet."""
        if self.accepts(environment):
            with self._lock, contextlib.suppress(OSError):
                self._running(environment)

    def close(self) -> None:
        """End the starter (the jobs it started run on)."""
        with self._lock:
            self._closed = True
            process, self._process = self._process, None
        if process is not None:
            with contextlib.suppress(OSError):
                process.stdin.close()
            try:  # still importing, it has forked nothing (what it was asked is spawned instead): no wait
                process.wait(timeout=5 if self._ready else 0)
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
            if key > 0 or self._ready:
                job._lose()
            else:
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
        if job_request.get("short"):
            run_short(job_request)
        sys.exit(become_job(job_request))
