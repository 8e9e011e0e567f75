"""One training job, start to final event: the one function every way of running the engine calls.

`run_job(config, emit, should_stop, resume)` trains on the calling thread (the CLI's main thread) and
guarantees what a reader of the events relies on: the events are appended to `output_path/events.jsonl`
(on the main process of several), TensorBoard gets them when asked, every failure becomes one `error`
event (with the field when the user can fix it, with advice for out-of-memory and a full disk), exactly
one final event ends the run (with `score_at_end`, the scoring's events follow it, the process still running),
the HTML report is written and the device memory is released.
"""

from __future__ import annotations

import gc
import logging
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lora_core import distributed, runlock
from lora_core.config import TrainConfig
from lora_core.errors import UserError
from lora_core.eventlog import EventLog
from lora_core.events import Complete, Error, Event, Interrupted, Progress
from lora_core.runlock import FolderBusy

log = logging.getLogger("lora_core")
AtEnd = Callable[[TrainConfig, Callable[[Event], None], Callable[[], bool]], None]

OOM_ADVICE = ("the GPU ran out of memory; lower batch_size or resolution, set gradient_checkpointing to 'on' "
              "('auto' turns it on only when the estimate says the run would not fit), keep latent_cache on "
              "(memory or disk), use a smaller lora_rank, store the base in less memory (base_quantization 'fp8', "
              "optimizer 'adamw8bit'), or let memory_mode 'auto' choose for this card")


def run_job(config: TrainConfig, emit: Callable[[Event], None], should_stop: Callable[[], bool],
            resume: bool = False, at_end: AtEnd | None = None) -> Event:
    """Train `config` and return the final event (`complete`, `interrupted` or `error`), which `emit` saw last.

    Of several processes only the main one writes events.jsonl, the tracker and the report; the others
    still pass every event to `emit` (the CLI prints only their errors) and end with their own final event.
    `at_end(config, emit, should_stop)`: work after a complete run, before the report (the CLI passes
    scoring.score_at_end when the config asks for score_at_end; scoring imports this module, so it is passed in).
    """
    is_main = distributed.is_main_process()
    lock = None
    try:  # the one writer of the run folder until its final event and report are written (lora_core/runlock.py)
        if is_main:
            lock = runlock.take(config.output_path)
    except FolderBusy as error:  # nothing of this run is written: the holder's events stay its own
        refused = Error(message=str(error), field="output_path")
        emit(refused)
        return refused
    except OSError:  # a folder that cannot be made or written: the run plan's check says why, at output_path
        lock = None
    from lora_core import report, tracking, training

    event_log = EventLog(Path(config.output_path) / "events.jsonl" if is_main else None, emit)
    state = _Outcome(event_log)
    tracker = None
    try:
        tracker = tracking.open_tracker(config) if is_main else None  # TensorBoard, if asked
        sink = state if tracker is None else tracking.tee(state, tracker)
        result = training.train(config, sink, should_stop, resume=resume)
        if not is_main:  # the main process reported the outcome; this one ends quietly
            state(Interrupted(step=result.step, message="stopped with the other processes", checkpoint_path=None)
                  if result.interrupted else Complete(final_path="", total_time=result.total_time, step=result.step))
        del result  # the trained UNet: let release_device() free it
        if is_main and at_end is not None and isinstance(state.terminal, Complete):
            release_device()
            at_end(config, sink, should_stop)
    except Exception as error:  # every failure ends in an error event, never a traceback alone
        field = getattr(error, "field", None)  # a user's input at fault: the message names the fix
        message = str(error) if field else describe_failure(error)
        state(Error(message=message, step=state.step, field=field))
        log.debug("training failed:\n%s", traceback.format_exc())
    finally:
        release_device()
        if state.terminal is None:
            state(Error(message="training ended without a result", step=state.step))
        event_log.close()
        if tracker is not None:
            tracker.close()
        if is_main:  # training_report.html beside the LoRA, from events.jsonl
            report.write_report_safely(config.output_path)
        if lock is not None:  # (a CLI process ends here anyway; a caller in the same process may go on)
            lock.release()
    assert state.terminal is not None
    return state.terminal


class _Outcome:
    """Passes events on (to the event log) and remembers the last step and the final event."""

    def __init__(self, emit: Callable[[Event], None]):
        self.emit, self.step, self.terminal = emit, None, None

    def __call__(self, event: Event) -> None:
        if isinstance(event, Progress):
            self.step = event.step
        if event.terminal:
            if self.terminal is not None:  # one final event per run, whatever fails after the first
                return
            self.terminal = event
        self.emit(event)


def tool_outcome(work: Callable[[], Event], handled: dict[type[Exception], Callable[[Any], Event]]) -> Event:
    """The final event of a tool's work (a grid, a sweep, a scoring, a captioning): the one `work` returns, else
    the event `handled` makes of its error (a stop: `interrupted`), an `error` at the field of a user's mistake,
    or an `error` describing any other failure, never a dead job."""
    try:
        return work()
    except Exception as error:
        for kind, make in handled.items():
            if isinstance(error, kind):
                return make(error)
        if isinstance(error, UserError):
            return Error(message=str(error), field=error.field)
        return Error(message=describe_failure(error))


def describe_failure(error: Exception) -> str:
    """A failure that is not the user's input, in words: what happened and, where known, what to do."""
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


Work = Callable[[Callable[[Event], None], Callable[[], bool]], object]  # (emit, should_stop): the job's work


def run_command(work: Work, result: Callable[[Event], int | None], *, reads: str | Path | None = None,
                log_events: bool = True, show: Callable[[Event], None] | None = None, debug: bool = False) -> int:
    """Every job's command after its arguments (`python -m lora_core train` and every tool): `work` run by
    `stream_job` (`reads`, `log_events`, `show` as there), logging on stderr, and the exit status: `result(final
    event)` for the job's result (None: not a result), the signal's status (130 SIGINT, 143 SIGTERM) when
    stopped, 1 for an error (logged on stderr)."""
    import os
    import sys

    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not debug:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    event, stopped = stream_job(work, reads=reads, log_events=log_events, show=show)
    status = None if event.type in ("error", "interrupted") else result(event)
    if status is not None:
        return status
    return (stopped or 143) if isinstance(event, Interrupted) else 1


def tool_command(work: Work, done: type[Event], reads: str | Path | None = None,
                 said: Callable[[Event], str] | None = None) -> int:
    """A tool's `main` after its arguments (`run_command`): 0 for a `done` event, whose `said` text goes to
    stderr."""
    import sys

    def result(event: Event) -> int | None:
        if not isinstance(event, done):
            return None
        if said is not None:
            print(said(event), file=sys.stderr)
        return 0

    return run_command(work, result, reads=reads)


def stream_job(work: Work, *, reads: str | Path | None = None, log_events: bool = True,
               show: Callable[[Event], None] | None = None) -> tuple[Event, int]:
    """The one command wrapper of every job (training and every tool): `work(emit, should_stop)` run with its
    events as JSON lines on stdout and nothing else (what a library prints goes to stderr), SIGINT / SIGTERM
    asking it to stop (installed first: a stop while loading still ends with one final event), and exactly one
    final event. Of several processes (accelerate, torchrun) only the main one writes stdout (and `show`s each
    event, training's progress bar); the others' errors reach stderr. Started by the page (LORA_JOB_FOLDER set,
    studio/launcher.py), the main process holds its job folder's lock, which proves the job alive to the page,
    and with `log_events` appends its events to that folder's events.jsonl (training's run_job writes its run
    folder's itself). `reads`: a run folder the work only reads (a grid's): held shared, so that training
    never rewrites it meanwhile. Returns the final event and the exit status a stop means (130 for SIGINT,
    143 for SIGTERM; 0 if none)."""
    import os
    import signal
    import sys

    stop: list[int] = []
    handlers = {number: signal.signal(number, lambda signum, frame: _stopping(stop, signum))
                for number in (signal.SIGINT, signal.SIGTERM)}
    stdout = sys.stdout
    speaks = distributed.is_main_process()
    job_folder = os.environ.get(runlock.JOB_FOLDER_VARIABLE) if speaks else None
    locks: list[runlock.FolderLock] = []
    with os.fdopen(os.dup(1), "w", buffering=1) as events_out:
        sys.stdout = sys.stderr  # whatever a library prints must not corrupt the JSON stream
        say = _speaker(events_out, speaks, show)
        event_log = None
        try:
            if job_folder:  # the job's own folder first: its lock is what proves the job alive to the page
                locks.append(runlock.take(job_folder))
            event_log = EventLog(Path(job_folder) / "events.jsonl" if job_folder and log_events else None, say)
            outcome = _Outcome(event_log)
            try:
                if reads is not None:
                    locks.append(runlock.take(reads, shared=True))
                work(outcome, lambda: bool(stop))
            except FolderBusy as error:
                outcome(Error(message=str(error), field="run"))
            except Exception as error:  # a failure the work did not turn into its final event: never a dead job
                outcome(Error(message=describe_failure(error)))
                log.debug("the job failed:\n%s", traceback.format_exc())
            if outcome.terminal is None:  # the work must end with one; a reader relies on exactly one
                outcome(Error(message="the job ended without a result"))
            event = outcome.terminal
        except FolderBusy as error:  # another process writes this job folder: nothing of ours is written
            event = Error(message=str(error))
            say(event)
        finally:
            if event_log is not None:
                event_log.close()
            for lock in locks:  # given back with the final event written (a caller in this process may go on)
                lock.release()
            sys.stdout = stdout
            for number, handler in handlers.items():
                signal.signal(number, handler)
    return event, (130 if stop[0] == signal.SIGINT else 143) if stop else 0


def _stopping(stop: list[int], signum: int) -> None:
    if not stop:
        log.warning("signal %s: stopping after the current step (training saves a checkpoint)", signum)
    stop.append(signum)


def _speaker(out, speaks: bool, show: Callable[[Event], None] | None) -> Callable[[Event], None]:
    """What each event of a command becomes: a JSON line on stdout (the main process), an error also logged."""
    import sys

    def say(event: Event) -> None:
        if speaks:
            out.write(event.to_json() + "\n")
            if show is not None:
                show(event)
        elif event.type == "error":  # the other processes' errors still reach the log
            sys.stderr.write(event.to_json() + "\n")
        if event.type == "error":
            log.error("%s%s", f"{event.field}: " if event.field else "", event.message)

    return say
