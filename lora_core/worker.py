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

from lora_core import distributed
from lora_core.config import TrainConfig
from lora_core.events import Complete, Error, Event, EventLog, Interrupted, Progress

log = logging.getLogger("lora_core")

OOM_ADVICE = ("the GPU ran out of memory; lower batch_size or resolution, set gradient_checkpointing to 'on' "
              "('auto' turns it on only when the estimate says the run would not fit), keep latent_cache on "
              "(memory or disk), or use a smaller lora_rank")


class BusyError(RuntimeError):
    pass


class Job:
    def __init__(self, config: TrainConfig, resume: bool = False):
        self.config = config
        self.resume = resume
        self.is_main = distributed.is_main_process()  # of several processes, only the main one records
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
        from lora_core import report, tracking, training

        events_path = Path(self.config.output_path) / "events.jsonl" if self.is_main else None
        event_log = EventLog(events_path, self._emit)
        step = tracker = None
        try:
            tracker = tracking.open_tracker(self.config) if self.is_main else None  # TensorBoard, if asked
            emit = event_log if tracker is None else tracking.tee(event_log, tracker)
            result = training.train(self.config, emit, self._stop.is_set, resume=self.resume)
            step = result.step
            if not self.is_main:  # the main process reported the outcome; end this one's job quietly
                self._emit(Interrupted(step=step, message="stopped with the other processes", checkpoint_path=None)
                           if result.interrupted else Complete(final_path="", total_time=result.total_time,
                                                               step=step))
            del result  # the trained UNet: let release_device() free it
        except Exception as error:  # every failure ends in an error event, never a dead thread
            field = getattr(error, "field", None)  # a user's input at fault: the message names the fix
            message = str(error) if field else describe_failure(error)
            event_log(Error(message=message, step=self._current_step(), field=field))
            log.debug("training failed:\n%s", traceback.format_exc())
        finally:
            release_device()
            if self.terminal is None:
                event_log(Error(message="training ended without a result", step=step))
            event_log.close()
            if tracker is not None:
                tracker.close()
            if self.is_main:  # training_report.html beside the LoRA, from events.jsonl
                report.write_report_safely(self.config.output_path)

    def _current_step(self) -> int | None:
        progress = self.last_progress
        return progress.step if progress else None


def describe_failure(error: Exception) -> str:
    import torch

    if distributed.is_peer_failure(error):
        return ("another training process failed or was stopped, so this one stopped too; its own error is "
                f"in the log on stderr ({str(error).splitlines()[0][:300]})")
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

    def submit(self, config: TrainConfig, resume: bool = False) -> Job:
        with self._lock:
            if self.current is not None and self.current.running:
                raise BusyError("a training job is already running on this device; stop it or wait for it "
                                "to finish before starting another")
            job = Job(config, resume)
            self.current = job
            job.thread.start()
            return job
