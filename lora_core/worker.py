"""The background worker: the one thread that touches the device.

Callers submit a config and get a `Job`; they read its events (a queue for streaming, a history for a
page that reattaches) and may ask it to stop. One job trains at a time; a second submit is refused.
"""

from __future__ import annotations

import gc
import logging
import queue
import threading
import traceback
from collections.abc import Iterator
from pathlib import Path

from lora_core.config import ConfigError, TrainConfig
from lora_core.dataset import DatasetError
from lora_core.events import Error, Event, EventLog, Progress
from lora_core.models import ModelError

log = logging.getLogger("lora_core")

OOM_ADVICE = ("the GPU ran out of memory; lower batch_size or resolution, turn on gradient_checkpointing, "
              "keep cache_latents on, or use a smaller lora_rank")


class BusyError(RuntimeError):
    pass


class Job:
    def __init__(self, config: TrainConfig):
        self.config = config
        self.history: list[Event] = []
        self.terminal: Event | None = None
        self._queue: queue.Queue[Event] = queue.Queue()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, name="lora-train", daemon=True)

    # --- read by callers ---
    @property
    def running(self) -> bool:
        return self.thread.is_alive()

    @property
    def last_progress(self) -> Progress | None:
        with self._lock:
            return next((e for e in reversed(self.history) if isinstance(e, Progress)), None)

    def events(self, timeout: float | None = None) -> Iterator[Event]:
        """Yield events as they come, ending after the terminal one (or when `timeout` passes idle)."""
        while True:
            try:
                event = self._queue.get(timeout=timeout)
            except queue.Empty:
                return
            yield event
            if event.terminal:
                return

    def snapshot(self) -> list[Event]:
        with self._lock:
            return list(self.history)

    def request_stop(self) -> None:
        """Finish the current step, save a checkpoint, then end with an `interrupted` event."""
        self._stop.set()

    @property
    def stop_requested(self) -> bool:
        return self._stop.is_set()

    def wait(self, timeout: float | None = None) -> Event | None:
        self.thread.join(timeout)
        return self.terminal

    # --- the worker thread ---
    def _emit(self, event: Event) -> None:
        with self._lock:
            self.history.append(event)
            if event.terminal:
                self.terminal = event
        self._queue.put(event)

    def _run(self) -> None:
        from lora_core import training

        event_log = EventLog(Path(self.config.output_path) / "events.jsonl", self._emit)
        step = None
        try:
            result = training.train(self.config, event_log, self._stop.is_set)
            step = result.step
        except ConfigError as error:
            event_log(Error(message=str(error), field=error.field))
        except (DatasetError, ModelError) as error:
            event_log(Error(message=str(error), field=error.field))
        except Exception as error:  # every failure ends in an error event, never a dead thread
            event_log(Error(message=describe_failure(error), step=self._current_step()))
            log.debug("training failed:\n%s", traceback.format_exc())
        finally:
            release_device()
            if self.terminal is None:  # e.g. a non-main process of a multi-process run
                event_log(Error(message="training ended without a result", step=step))
            event_log.close()

    def _current_step(self) -> int | None:
        progress = self.last_progress
        return progress.step if progress else None


def describe_failure(error: Exception) -> str:
    import torch

    if isinstance(error, torch.cuda.OutOfMemoryError):
        return f"{OOM_ADVICE} ({str(error).splitlines()[0]})"
    if isinstance(error, OSError) and error.errno == 28:
        return f"the disk is full ({error.filename}); free space or set output_path to another disk"
    if isinstance(error, PermissionError):
        return f"cannot write {error.filename}: permission denied; choose a writable output_path"
    return f"{type(error).__name__}: {error}"


def release_device() -> None:
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # releasing memory must never mask the real outcome
        pass


class Worker:
    """Owns the device: at most one job trains at a time."""

    def __init__(self):
        self._lock = threading.Lock()
        self.current: Job | None = None

    def submit(self, config: TrainConfig) -> Job:
        with self._lock:
            if self.current is not None and self.current.running:
                raise BusyError("a training job is already running on this device; stop it or wait for it "
                                "to finish before starting another")
            job = Job(config)
            self.current = job
            job.thread.start()
            return job
