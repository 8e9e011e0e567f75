"""Every run in an outputs folder, read from the run's own files (never from a server's memory).

A run is a folder directly under the outputs root holding its events (`events.jsonl`) or named by a training job
started for it that has not written any yet (its `job.json`, in the server's own folder: studio/jobfiles.py);
lora_core/runrecord.py names its files and folds its events into its state, the same record the live view reads.
Runs waiting in `.studio/queue.json` are listed as queued. Because nothing here needs the server that started a
run, runs made by `python -m lora_core train` into the same folder show up too.

Torch-free: the page imports this module on every poll.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import threading
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from lora_core import runlock, scores
from lora_core.errors import UserError
from lora_core.heldout_watch import BEST_FILE
from lora_core.runrecord import (
    ACTIVE,
    FAILED,
    QUEUED,
    READ_BYTES,
    R,
    RunFiles,
    RunRecord,
    ended_before,
    process_alive,
    read_json,
    settle,
)
from lora_core.runtail import RecordTail
from studio.jobfiles import JobFiles, job_of, remove_jobs_of, training_jobs

QUEUE_FILE = "queue.json"  # in STUDIO_DIR: the page server's queue (studio/queue.py)
STUDIO_DIR = ".studio"
UPLOADS = "uploads"
NOT_COMPARED = ("output_path",)  # differs between any two runs by construction
DAMAGED = "damaged"  # a folder whose files cannot be read as a run: listed with the reason, costs nothing else
# One Runs call reads events for about READ_SECONDS (all its runs together), then at most SLOW_READ_BYTES a run;
# what is left is read by the next calls, from where this one stopped (each run's reader is kept, `_tail`).
READ_SECONDS, SLOW_READ_BYTES, MAX_TAILS = 2.0, 1024**2, 1000


class RunError(UserError):
    """A run id that names no run, or a run that cannot be changed now."""

    field = "run"


@dataclass
class RunRow:
    """One line of the Runs list."""

    id: str  # the run folder's name under the outputs root
    name: str
    state: str  # one of runrecord.STATES
    base_model: str = ""
    step: int = 0
    total_steps: int = 0
    loss: float | None = None
    started: str = ""  # ISO time of the first start
    duration_s: float | None = None  # first start to the last event
    folder: str = ""
    problem: str = ""  # why the run is damaged, or that its events are still being read

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RunDetail(RunRow):
    """Everything about one run: what the live view shows, for any run."""

    loss_points: list[tuple[int, float]] = field(default_factory=list)  # every recorded step, across resumes
    validation_points: list[tuple[int, float]] = field(default_factory=list)  # the held-out images' loss
    resumed_at: list[int] = field(default_factory=list)  # the step each resume continued from
    samples: list[dict[str, Any]] = field(default_factory=list)  # {step, prompt, path}
    checkpoints: list[dict[str, Any]] = field(default_factory=list)  # {step, path, exists}
    final_path: str | None = None
    saved_so_far: str | None = None  # the newest LoRA file on disk: what a stopped run offers to download
    config: dict[str, Any] = field(default_factory=dict)
    report_path: str | None = None
    message: str = ""  # the error or the reason it stopped
    error_field: str | None = None
    stderr_tail: list[str] = field(default_factory=list)  # the last lines of stderr.log, for a failed run
    overfitting: list[dict[str, Any]] = field(default_factory=list)  # the run's `overfitting` events
    scores: dict[str, Any] | None = None  # scores.json (lora_core/scores.py), once the run was scored
    best_path: str | None = None  # lora_best.safetensors (early stop), when there is one


# ----------------------------------------------------------------------------------------------------
# reading one folder


def flat_config(config: Any) -> dict[str, Any]:
    """A config file's fields at one level (the optional `training_params` nesting merged in)."""
    if not isinstance(config, dict):
        return {}
    flat = {key: value for key, value in config.items() if key != "training_params"}
    nested = config.get("training_params")
    if isinstance(nested, dict):
        flat.update(nested)
    return flat


def run_config(folder: Path, job: JobFiles | None = None) -> dict[str, Any]:
    """A run's settings, flat: the engine's resolved config.json, else the config its `job` was started with."""
    return flat_config(read_json(RunFiles(folder).config)) or (flat_config(read_json(job.job_config)) if job else {})


_tails: OrderedDict[tuple[str, str, Any], tuple[RecordTail, tuple[int, int], threading.Lock]] = OrderedDict()
_tails_lock = threading.Lock()


def _tail(folder: Path, into: RunRecord | None) -> tuple[RecordTail, threading.Lock]:
    """The reader kept for this run folder's events (a new one when the file was replaced or cut shorter),
    so that each call reads only what was appended since the last."""
    key = (str(folder.parent.resolve() / folder.name), type(into).__name__, getattr(into, "job_id", None))
    try:
        info = os.stat(RunFiles(folder).events)
    except (OSError, ValueError):
        return RecordTail(folder, into), threading.Lock()  # no events yet: nothing worth keeping
    with _tails_lock:
        cached = _tails.pop(key, None)
        if cached is None or cached[1] != (info.st_dev, info.st_ino) or info.st_size < cached[0].size:
            cached = (RecordTail(folder, into), (info.st_dev, info.st_ino), threading.Lock())
        _tails[key] = cached
        while len(_tails) > MAX_TAILS:
            _tails.popitem(last=False)
    return cached[0], cached[2]


def _read(folder: Path, running: bool | None, into: RunRecord | None, deadline: float | None,
          job_files: JobFiles | None) -> tuple[RunRecord | None, str]:
    """The settled record of a run folder (None: no run) and a note when its events are not all read yet.
    `job_files`: the run's newest training job started by a page (None: a CLI run)."""
    if not RunFiles(folder).is_run() and job_files is None:
        return None, ""
    tail, lock = _tail(folder, into)
    deadline = time.monotonic() + READ_SECONDS if deadline is None else deadline
    with lock:
        tail.update(READ_BYTES if time.monotonic() < deadline else SLOW_READ_BYTES)
        while tail.behind and time.monotonic() < deadline:
            tail.update()
        record = replace(tail.record)  # the kept record goes on folding; this call's answer must not change
        note = tail.problem or (f"{tail.behind / 1e6:.0f} MB of {tail.size / 1e6:.0f} MB of events not read yet; "
                                "refresh to read on" if tail.behind else "")
    job = job_files.record() if job_files else {}
    writer = runlock.held_by(folder)
    if running or writer is not None:  # a live process holds the run (its lock): running
        alive: bool | None = True
        if writer is not None and ended_before(record, writer.get("since")):
            record.begin_part()  # a resume whose first event is still to come: not the earlier part's end
    else:
        alive = process_alive(job) if running is None else running
    return settle(record, alive, stop_requested=bool(job.get("stop_requested"))), note


def read_record(folder: Path, running: bool | None = None, into: R | None = None) -> R | RunRecord | None:
    """One run's record (folded into `into` when given) with what is known of its job's process added
    (runrecord.settle); None when the folder holds no run. `running`: what the caller knows of the process
    (None: ask the OS about the one job.json names)."""
    return _read(folder, running, into if into is not None else RunRecord(), None, job_of(folder))[0]


def contained_file(folder: Path, path: str | None, written_in: str = "") -> str | None:
    """`path`, as an event names it, if it is a regular file inside the run `folder`, reached without following
    any link; else None. A path under the folder the run was written in (`written_in`, its output_path then)
    is taken relative to it, so a moved outputs folder keeps its files; anything else (/tmp/..., the
    server's working folder, a link pointing out) is not the run's and is never served."""
    if not path or "\0" in str(path):
        return None
    candidate = Path(str(path))
    for base in (written_in, folder):
        if base and candidate.is_absolute() and candidate.is_relative_to(base):
            candidate = candidate.relative_to(base)
    if candidate.is_absolute() or not candidate.parts or ".." in candidate.parts:
        return None
    current = Path(folder)
    for index, part in enumerate(candidate.parts):
        current = current / part
        try:
            mode = os.lstat(current).st_mode
        except (OSError, ValueError):
            return None
        last = index == len(candidate.parts) - 1
        if not (stat.S_ISREG(mode) if last else stat.S_ISDIR(mode)):
            return None  # a link (S_ISLNK is neither), a FIFO, a device, a folder named like a file
    return str(current)


def read_detail(folder: Path, running: bool | None = None, deadline: float | None = None,
                jobs: dict[str, JobFiles] | None = None) -> RunDetail | None:
    """One run's full view from its folder; None when the folder holds no run. `running`: what the caller
    knows of the run's process (None: ask the OS about the process in job.json). `jobs`: the outputs' training
    jobs by run (jobfiles.training_jobs; None: looked up). Every file it names is inside the folder."""
    job = (training_jobs(folder.parent) if jobs is None else jobs).get(folder.name)
    record, note = _read(folder, running, RunRecord(), deadline, job)
    if record is None:
        return None
    files, config, started = RunFiles(folder), run_config(folder, job), (job.record() if job else {}).get("started_at")
    inside = {item: contained_file(folder, item, record.output_path)
              for item in [record.final_path, *(saved.path for saved in record.checkpoints)] if item}
    saved = next((inside[path] for _, path in reversed(record.checkpoints) if inside.get(path)), None)
    return RunDetail(
        id=folder.name, name=folder.name, state=record.state, base_model=str(config.get("base_model", "")),
        step=record.step, total_steps=record.total_steps or _count(config.get("max_train_steps")),
        loss=record.loss, started=record.started_at or str(started or ""),
        duration_s=record.duration_s, folder=str(folder), problem=note,
        loss_points=record.loss_points, validation_points=record.validation_points, resumed_at=record.resumed_at,
        samples=[{"step": item.step, "prompt": item.prompt, "path": path} for item in record.samples
                 if (path := contained_file(folder, item.path, record.output_path))],
        checkpoints=[{"step": item.step, "path": inside.get(item.path) or "", "exists": bool(inside.get(item.path))}
                     for item in record.checkpoints],
        final_path=inside.get(record.final_path or ""), saved_so_far=inside.get(record.final_path or "") or saved,
        config=config, report_path=contained_file(folder, files.report.name), message=record.message,
        error_field=record.error_field, stderr_tail=job.stderr_tail() if job and record.state == FAILED else [],
        overfitting=record.overfitting, scores=scores.read_scores(folder),
        best_path=contained_file(folder, BEST_FILE))


def _count(value: Any) -> int:
    """A count from a config file, which is data: 0 unless it is a plain whole number."""
    return value if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**53 else 0


# ----------------------------------------------------------------------------------------------------
# the outputs folder


def _queued_rows(root: Path) -> list[RunRow]:
    items = read_json(root / STUDIO_DIR / QUEUE_FILE)
    rows = []
    for item in items if isinstance(items, list) else []:
        if not isinstance(item, dict) or not item.get("output_path") or item.get("kind", "train") != "train":
            continue  # a grid or sweep waiting is no run of its own
        folder = Path(str(item["output_path"]))
        config = flat_config(item.get("config"))
        rows.append(RunRow(id=folder.name, name=folder.name, state=QUEUED, folder=str(folder),
                           base_model=str(config.get("base_model", "")), started=str(item.get("queued_at", "")),
                           total_steps=_count(config.get("max_train_steps"))))
    return rows


def _folders(root: Path, jobs: dict[str, JobFiles]) -> list[Path]:
    """Every real folder directly under `root` that may be a run (never a link to one: a link is not the run)."""
    if not root.is_dir():
        return []
    return [folder for folder in sorted(root.iterdir()) if folder.name != UPLOADS and not folder.name.startswith(".")
            and not folder.is_symlink() and folder.is_dir() and (folder.name in jobs or RunFiles(folder).is_run())]


def _readable_name(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # a name that is not UTF-8 on disk (surrogate escapes): no page can send it back
        return False
    return True


def run_folders(root: Path) -> list[Path]:
    """The run folders directly under `root` (uploads, hidden folders, links and names that are not UTF-8 are
    none)."""
    return [folder for folder in _folders(Path(root), training_jobs(root)) if _readable_name(folder.name)]


def _damaged(folder: Path, reason: str) -> RunRow:
    shown = os.fsencode(folder.name).decode("utf-8", errors="backslashreplace")
    return RunRow(id=shown, name=shown, state=DAMAGED, folder=str(folder).encode("utf-8", "backslashreplace")
                  .decode("utf-8"), problem=reason)


def list_runs(root: str | Path, running: set[str] | None = None) -> list[RunRow]:
    """Every run under `root`, newest first. `running`: ids the caller knows are running (None: ask the OS).
    A folder whose files cannot be read as a run is one `damaged` row with the reason; it costs no other row."""
    root = Path(root)
    rows: list[RunRow] = []
    deadline, jobs = time.monotonic() + READ_SECONDS, training_jobs(root)
    for folder in _folders(root, jobs):
        if not _readable_name(folder.name):
            rows.append(_damaged(folder, "the folder's name is not UTF-8; rename it to open the run"))
            continue
        try:
            detail = read_detail(folder, None if running is None else folder.name in running, deadline, jobs)
        except Exception as error:  # noqa: BLE001  (a run's files are data: whatever is wrong costs that run only)
            rows.append(_damaged(folder, f"its files cannot be read ({type(error).__name__}: {str(error)[:200]})"))
            continue
        if detail is not None:
            rows.append(RunRow(**{name: getattr(detail, name) for name in RunRow.__dataclass_fields__}))
    queued = [row for row in _queued_rows(root) if row.id not in {known.id for known in rows}]
    rows.sort(key=lambda row: str(row.started), reverse=True)
    return queued[::-1] + rows  # waiting jobs first, the last to start at the top


def resolve_run(root: str | Path, run_id: str) -> Path:
    """The folder of run `run_id`: a real folder directly under `root` (never a link, never anything outside)."""
    root = Path(root).resolve()
    name = str(run_id or "").strip()
    if (not name or name in (".", "..", UPLOADS) or any(char in name for char in "/\\") or not name.isprintable()
            or len(name.encode("utf-8", errors="surrogateescape")) > 255):
        raise RunError(f"{name[:80]!r} is not a run id; pick one from the Runs list (runs returns them)")
    folder = root / name
    if folder.is_symlink() or not folder.is_dir() or not (RunFiles(folder).is_run() or job_of(folder)):
        raise RunError(f"no run {name!r} in {root}; pick one from the Runs list")
    return folder


def run_detail(root: str | Path, run_id: str, running: bool | None = None) -> RunDetail:
    detail = read_detail(resolve_run(root, run_id), running)
    if detail is None:
        raise RunError(f"{run_id!r} holds no run")
    return detail


def delete_run(root: str | Path, run_id: str, running: bool | None = None) -> Path:
    """Delete one run's folder (only a folder directly under `root`, never while it trains)."""
    detail = run_detail(root, run_id, running)
    if detail.state in ACTIVE:
        raise RunError(f"run {run_id!r} is still running; stop it first, then delete it")
    folder = Path(detail.folder)
    if folder.is_symlink() or folder.parent != Path(root).resolve() or not folder.is_dir():
        raise RunError(f"run {run_id!r} is not a folder inside the outputs folder {root}; it was not deleted")
    try:  # held while deleting: a job that starts now for this folder is refused, not half-deleted
        lock = runlock.take(folder, wait_s=0.2)
    except runlock.FolderBusy as error:
        raise RunError(f"run {run_id!r} is held by a job ({error}); stop it first, then delete it") from None
    try:
        shutil.rmtree(folder)  # removes links inside the folder, never what they point to
    finally:
        lock.release()
    remove_jobs_of(folder)  # the server's records of its jobs: else a Runs list would show it again
    return folder


def compare_runs(root: str | Path, run_ids: list[str]) -> dict[str, Any]:
    """Two or more runs, or checkpoints (`RUN@STEP`), side by side: loss curves by step, the config fields whose
    values differ, each one's sample pictures at the prompts they share (the trainer draws prompt i with seed
    `seed + i`, so runs of one seed compare at the same seeds) and its scores (the recommended LoRA's for a
    run, that step's for a checkpoint)."""
    ids = list(dict.fromkeys(str(run_id).strip() for run_id in run_ids if str(run_id).strip()))
    if len(ids) < 2:
        raise RunError("pick two or more runs (or checkpoints, RUN@STEP) to compare")
    picked = {item: _pick(root, item) for item in ids}
    details = {item: detail for item, (detail, _) in picked.items()}
    names = sorted({key for detail in details.values() for key in detail.config} - set(NOT_COMPARED))
    differing = {}
    for key in names:
        values = [detail.config.get(key) for detail in details.values()]
        if any(json.dumps(value, sort_keys=True) != json.dumps(values[0], sort_keys=True) for value in values):
            differing[key] = dict(zip(ids, values, strict=True))
    return {"runs": ids, "curves": {item: detail.loss_points for item, detail in details.items()},
            "resumed_at": {item: detail.resumed_at for item, detail in details.items()}, "differing": differing,
            "pictures": _side_by_side(picked), "scores": {item: _scores_of(detail, step)
                                                          for item, (detail, step) in picked.items()}}


def _pick(root: str | Path, item: str) -> tuple[RunDetail, int | None]:
    """`RUN` or `RUN@STEP`: the run's detail and the step asked for (None: its newest)."""
    run_id, _, step = item.partition("@")
    if step and not step.isdigit():
        raise RunError(f"{item!r}: a checkpoint is RUN@STEP with a whole step number, e.g. {run_id}@500")
    return run_detail(root, run_id), int(step) if step else None


def _side_by_side(picked: dict[str, tuple[RunDetail, int | None]]) -> list[dict[str, Any]]:
    """[{prompt, cells: {item: {path, step, seed}}}]: per prompt every one's newest sample at or before its step."""
    rows: dict[str, dict[str, Any]] = {}
    for item, (detail, step) in picked.items():
        prompts = list(dict.fromkeys(sample["prompt"] for sample in detail.samples))
        for sample in detail.samples:
            if step is not None and sample["step"] > step:
                continue
            seed = detail.config.get("seed")
            rows.setdefault(sample["prompt"], {})[item] = {
                "path": sample["path"], "step": sample["step"],
                "seed": seed + prompts.index(sample["prompt"]) if isinstance(seed, int) else None}
    return [{"prompt": prompt, "cells": cells} for prompt, cells in rows.items() if len(cells) == len(picked)]


def _scores_of(detail: RunDetail, step: int | None) -> dict[str, Any]:
    """The figures of a run's recommended LoRA (or of its LoRA at `step`); {} when it has not been scored."""
    data = detail.scores or {}
    recommended = data.get("recommendation") or {}
    wanted = step if step is not None else recommended.get("step")
    lora = next((entry for entry in reversed(data.get("loras") or []) if entry.get("step") == wanted), None)
    if lora is None:
        return {}
    return {"LoRA": lora.get("label"), **{name: lora.get(name) for name in scores.FIGURES},
            "recommended": recommended.get("text", "") if step is None else ""}


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def table_rows(rows: list[RunRow]) -> list[list[Any]]:
    """The Runs list as a page table shows it."""
    return [[row.id, f"{row.state}: {row.problem}" if row.problem else row.state, row.base_model,
             f"{row.step} / {row.total_steps}",
             "" if row.loss is None else f"{row.loss:.4g}", row.started[:19].replace("T", " "),
             format_duration(row.duration_s)] for row in rows]


TABLE_HEADERS = ["run", "state", "base model", "steps", "loss", "started", "duration"]
