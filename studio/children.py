"""The page server's short questions that need torch (the GPU count, the --validate-only estimate, a model's
family), each a child process that answers and ends: `run_python`, a `subprocess.run` forked from the page's job
starter (studio/starter.py: no new import of the engine on each click) where it can be, else spawned."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from studio.starter import PACKAGE_ROOT, Starter

KILLED_WAIT_S = 5.0  # how long `run_python` waits for a child it killed (the starter reaps it within REAP_S)


def run_python(args: Sequence[str], environment: Mapping[str, str], starter: Starter | None = None,
               timeout: float | None = None, *, spawn_while_importing: bool = False) -> subprocess.CompletedProcess:
    """`subprocess.run([python, *args])` from PACKAGE_ROOT, stdin from /dev/null, stdout and stderr captured as
    text, for the server's short questions that need torch: forked from `starter` when there is one that
    takes it (no new import of the engine), else spawned. `spawn_while_importing`: a child that imports far
    less than the engine (the GPU count: torch alone) is spawned while the starter is still importing instead
    of waiting for it (the starter is warmed meanwhile), so that the server's first answers never wait for the
    engine's import. Past `timeout` s the child is killed and subprocess.TimeoutExpired raised, as
    `subprocess.run` does. A child lost with the starter (which ended first) has returncode None."""
    command = [sys.executable, *args]
    with tempfile.TemporaryDirectory(prefix="lora-child-") as folder:
        stdout, stderr = Path(folder) / "stdout", Path(folder) / "stderr"

        def spawn() -> subprocess.Popen:
            with open(stdout, "ab") as out, open(stderr, "ab") as err:
                return subprocess.Popen(command, cwd=PACKAGE_ROOT, env=dict(environment), stdin=subprocess.DEVNULL,
                                        stdout=out, stderr=err)

        if starter is not None and spawn_while_importing and not starter.ready:
            starter.warm(environment)
            starter = None
        job = starter.start(args, environment, stdout, stderr, spawn, lambda pid: None, short=True) \
            if starter else None
        if job is None:
            return subprocess.run(command, cwd=PACKAGE_ROOT, env=dict(environment), stdin=subprocess.DEVNULL,
                                  capture_output=True, text=True, timeout=timeout)

        def read(path: Path) -> str:
            return path.read_text(encoding="utf-8", errors="replace") if path.is_file() else ""

        try:
            code = job.wait(timeout)
        except subprocess.TimeoutExpired:
            job.send_signal(signal.SIGKILL)  # kept until its pid is known, if the starter has not answered yet
            with contextlib.suppress(subprocess.TimeoutExpired):
                job.wait(KILLED_WAIT_S)
            raise subprocess.TimeoutExpired(command, timeout or 0.0, read(stdout), read(stderr)) from None
        return subprocess.CompletedProcess(command, code, read(stdout), read(stderr))
