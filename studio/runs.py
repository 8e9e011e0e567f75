"""Every run in an outputs folder, read from the run's own files (never from a server's memory).

A run is a folder directly under the outputs root holding its events (`events.jsonl`) or a job started for
it that has not written any yet (`job.json`); lora_core/runrecord.py names its files and folds its events into
its state, the same record the page's live view reads. Runs waiting in `queue.json` are listed as queued.
Because nothing here needs the server that started a run, runs made by `python -m lora_core train` into the
same folder show up too.

Torch-free: the page imports this module on every poll.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lora_core import scores
from lora_core.errors import UserError
from lora_core.events import read_events
from lora_core.heldout_watch import BEST_FILE
from lora_core.runrecord import (
    ACTIVE,
    FAILED,
    QUEUED,
    R,
    RunFiles,
    RunRecord,
    process_alive,
    read_json,
    settle,
)

QUEUE_FILE = "queue.json"
UPLOADS = "uploads"
NOT_COMPARED = ("output_path",)  # differs between any two runs by construction


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


def run_config(folder: Path) -> dict[str, Any]:
    """A run's settings, flat: the engine's resolved config.json, else the config its job was started with."""
    files = RunFiles(folder)
    return flat_config(read_json(files.config)) or flat_config(read_json(files.job_config))


def read_record(folder: Path, running: bool | None = None, into: R | None = None) -> R | RunRecord | None:
    """One run's record (folded into `into` when given) with what is known of its job's process added
    (runrecord.settle); None when the folder holds no run. `running`: what the caller knows of the process
    (None: ask the OS about the one job.json names)."""
    files = RunFiles(folder)
    if not files.is_run():
        return None
    record = (into if into is not None else RunRecord()).add_all(
        read_events(files.events) if files.events.is_file() else [])
    job = files.job_record()
    alive = process_alive(job) if running is None else running
    return settle(record, alive, stop_requested=bool(job.get("stop_requested")))


def read_detail(folder: Path, running: bool | None = None) -> RunDetail | None:
    """One run's full view from its folder; None when the folder holds no run. `running`: what the caller
    knows of the run's process (None: ask the OS about the process in job.json)."""
    record = read_record(folder, running)
    if record is None:
        return None
    files, config = RunFiles(folder), run_config(folder)
    return RunDetail(
        id=folder.name, name=folder.name, state=record.state, base_model=str(config.get("base_model", "")),
        step=record.step, total_steps=record.total_steps or int(config.get("max_train_steps") or 0),
        loss=record.loss, started=record.started_at or str(files.job_record().get("started_at", "")),
        duration_s=record.duration_s, folder=str(folder),
        loss_points=record.loss_points, validation_points=record.validation_points, resumed_at=record.resumed_at,
        samples=[{"step": item.step, "prompt": item.prompt, "path": item.path} for item in record.samples],
        checkpoints=[{"step": item.step, "path": item.path, "exists": Path(item.path).is_file()}
                     for item in record.checkpoints],
        final_path=record.final_path, saved_so_far=record.saved_so_far, config=config,
        report_path=str(files.report) if files.report.is_file() else None, message=record.message,
        error_field=record.error_field, stderr_tail=files.stderr_tail() if record.state == FAILED else [],
        overfitting=record.overfitting, scores=scores.read_scores(folder),
        best_path=str(folder / BEST_FILE) if (folder / BEST_FILE).is_file() else None)


# ----------------------------------------------------------------------------------------------------
# the outputs folder


def _queued_rows(root: Path) -> list[RunRow]:
    items = read_json(root / QUEUE_FILE)
    rows = []
    for item in items if isinstance(items, list) else []:
        if not isinstance(item, dict) or not item.get("output_path") or item.get("kind", "train") != "train":
            continue  # a grid or sweep waiting is no run of its own
        folder = Path(str(item["output_path"]))
        config = flat_config(item.get("config"))
        rows.append(RunRow(id=folder.name, name=folder.name, state=QUEUED, folder=str(folder),
                           base_model=str(config.get("base_model", "")), started=str(item.get("queued_at", "")),
                           total_steps=int(config.get("max_train_steps") or 0)))
    return rows


def run_folders(root: Path) -> list[Path]:
    """The run folders directly under `root` (uploads and hidden folders are none)."""
    return [folder for folder in sorted(Path(root).iterdir()) if folder.is_dir() and folder.name != UPLOADS
            and not folder.name.startswith(".") and RunFiles(folder).is_run()] if Path(root).is_dir() else []


def list_runs(root: str | Path, running: set[str] | None = None) -> list[RunRow]:
    """Every run under `root`, newest first. `running`: ids the caller knows are running (None: ask the OS)."""
    root = Path(root)
    rows: list[RunRow] = []
    for folder in run_folders(root):
        detail = read_detail(folder, None if running is None else folder.name in running)
        if detail is not None:
            rows.append(RunRow(**{name: getattr(detail, name) for name in RunRow.__dataclass_fields__}))
    queued = [row for row in _queued_rows(root) if row.id not in {known.id for known in rows}]
    rows.sort(key=lambda row: row.started, reverse=True)
    return queued[::-1] + rows  # waiting jobs first, the last to start at the top


def resolve_run(root: str | Path, run_id: str) -> Path:
    """The folder of run `run_id`: a folder directly under `root`, never anything outside it."""
    root = Path(root).resolve()
    name = str(run_id or "").strip()
    if not name or name in (".", "..") or "/" in name or "\\" in name or name == UPLOADS:
        raise RunError(f"{run_id!r} is not a run id; pick one from the Runs list (runs returns them)")
    folder = (root / name).resolve()
    if folder.parent != root or not RunFiles(folder).is_run():
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
    if folder.is_symlink() or not folder.resolve().is_relative_to(Path(root).resolve()):
        raise RunError(f"run {run_id!r} is not inside the outputs folder {root}; it was not deleted")
    shutil.rmtree(folder)
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
    return [[row.id, row.state, row.base_model, f"{row.step} / {row.total_steps}",
             "" if row.loss is None else f"{row.loss:.4g}", row.started[:19].replace("T", " "),
             format_duration(row.duration_s)] for row in rows]


TABLE_HEADERS = ["run", "state", "base model", "steps", "loss", "started", "duration"]
