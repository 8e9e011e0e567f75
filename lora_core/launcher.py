"""Run the engine in a child process, on one device or on several through `accelerate launch`, and read it.

The child is the CLI (`train_lora.py`): its stdout is the JSON-lines event stream, which is parsed back into
the event objects of events.py. A `ProcessJob` has the surface of `worker.Job` (`events()`, `snapshot()`,
`last_progress`, `running`, `terminal`, `request_stop()`, `wait()`), so a face can run a job in its own process
(`Worker.submit`) or on N GPUs (`launch(config, N)`) and read both the same way.

Stop is SIGTERM to the child: the CLI, or accelerate's launcher (torch's elastic agent), which passes it to
every training process; they agree on the step to stop after and the main one saves a checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections import deque
from collections.abc import Sequence
from pathlib import Path

from lora_core.config import TrainConfig, config_to_file_dict
from lora_core.events import Error, EventLog, parse_event
from lora_core.worker import Job

log = logging.getLogger("lora_core.launcher")

ROOT = Path(__file__).resolve().parent.parent
TRAIN_SCRIPT = ROOT / "train_lora.py"


def device_count() -> int:
    """CUDA devices this process can see (CUDA_VISIBLE_DEVICES applies); 0 without CUDA."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def launch_command(config_path: str | Path, num_processes: int = 1, *, extra_args: Sequence[str] = (),
                   python: str = sys.executable, script: str | Path = TRAIN_SCRIPT) -> list[str]:
    """The command that trains `config_path` with `num_processes` data-parallel processes on this machine.

    One process runs the CLI directly (accelerate's single-process launcher would not pass SIGTERM on).
    Several run under `accelerate launch --multi_gpu`, on a free port so that two jobs on one box never clash.
    """
    if num_processes < 1:
        raise ValueError(f"num_processes must be at least 1, got {num_processes}")
    train = [str(script), "--config", str(config_path), *extra_args]
    if num_processes == 1:
        return [python, *train]
    return [python, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(num_processes),
            "--num_machines", "1", "--main_process_port", "0", "--mixed_precision", "no", "--dynamo_backend", "no",
            *train]


class ProcessJob(Job):
    """A training job in a child process; its events are those the child prints on stdout."""

    def __init__(self, config: TrainConfig, num_processes: int = 1, *, extra_args: Sequence[str] = (),
                 env: dict[str, str] | None = None):
        super().__init__(config)
        self.num_processes = num_processes
        self._folder = Path(tempfile.mkdtemp(prefix="lora-launch-"))
        config_path = self._folder / "config.json"
        config_path.write_text(json.dumps(config_to_file_dict(config), indent=2), encoding="utf-8")
        self.command = launch_command(config_path, num_processes, extra_args=extra_args)
        self.env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
        if config.device == "cpu" or (num_processes > 1 and device_count() == 0):
            self.env["ACCELERATE_USE_CPU"] = "true"  # several CPU processes: gloo instead of NCCL
        self.process: subprocess.Popen | None = None
        self.returncode: int | None = None
        self._log_tail: deque[str] = deque(maxlen=40)

    def start(self) -> ProcessJob:
        self.process = subprocess.Popen(self.command, cwd=ROOT, env=self.env, stdin=subprocess.DEVNULL,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1)
        self.thread.start()
        return self

    def log_tail(self) -> list[str]:
        """The last lines the child wrote on stderr (its log)."""
        return list(self._log_tail)

    def request_stop(self) -> None:
        """Every process finishes its current step, the main one saves a checkpoint, the job ends `interrupted`."""
        super().request_stop()
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL the child and every process under it (torch's agent starts workers in their own sessions)."""
        if self.process is None:
            return
        try:
            import psutil

            children = psutil.Process(self.process.pid).children(recursive=True)
        except Exception:  # psutil missing or the child already gone
            children = []
        for process in [*children, self.process]:
            with contextlib.suppress(Exception):
                process.kill()

    # --- the reader thread (Job's thread runs this instead of training) ---
    def _run(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        drain = threading.Thread(target=self._drain_stderr, name="lora-launch-log", daemon=True)
        drain.start()
        try:
            for line in self.process.stdout:
                if not line.strip():
                    continue
                try:
                    self._emit(parse_event(line))
                except ValueError as error:
                    log.warning("ignoring a line that is not an event: %s", error)
            self.returncode = self.process.wait()
            drain.join(timeout=5)
            if self.terminal is None:
                self._fail(f"the training process exited with code {self.returncode} without a result")
        except Exception as error:  # the reader must always end the job
            self._fail(f"lost the training process: {type(error).__name__}: {error}")
        finally:
            shutil.rmtree(self._folder, ignore_errors=True)

    def _drain_stderr(self) -> None:
        assert self.process is not None and self.process.stderr is not None
        for line in self.process.stderr:
            line = line.rstrip()
            if line:
                self._log_tail.append(line)
                log.debug("child: %s", line)

    def _fail(self, message: str) -> None:
        """End with an error event, recorded in events.jsonl too (the child could not write it)."""
        last = next((line for line in reversed(self._log_tail) if line.strip()), "")
        progress = self.last_progress
        event = Error(message=f"{message}: {last[-500:]}" if last else message,
                      step=progress.step if progress else None)
        try:
            event_log = EventLog(Path(self.config.output_path) / "events.jsonl")
            event_log(event)
            event_log.close()
        except OSError as error:
            log.warning("could not record the error in events.jsonl: %s", error)
        self._emit(event)

def launch(config: TrainConfig, num_processes: int = 1, *, extra_args: Sequence[str] = (),
           env: dict[str, str] | None = None) -> ProcessJob:
    """Start training `config` on `num_processes` devices of this machine in a child process."""
    return ProcessJob(config, num_processes, extra_args=extra_args, env=env).start()
