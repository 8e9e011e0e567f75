"""Every run in an outputs folder, read from the run's own files (never from a server's memory).

A run is a folder directly under the outputs root holding `events.jsonl` (what the engine reported),
`config.json` (the resolved config the engine wrote), and, for a job the page started, `job.json` (its
process) and `stderr.log`. Runs waiting in `queue.json` are listed as queued. Because nothing here needs
the server that started a run, runs made by `python -m lora_core train` into the same folder show up too.

Torch-free: the page imports this module on every poll.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from lora_core.errors import UserError

EVENTS_FILE, CONFIG_FILE, JOB_FILE, STDERR_FILE, QUEUE_FILE = (
    "events.jsonl", "config.json", "job.json", "stderr.log", "queue.json")
REPORT_FILE = "training_report.html"
UPLOADS = "uploads"
STDERR_TAIL_LINES = 20
STATES = ("queued", "running", "complete", "stopped", "failed")
NOT_COMPARED = ("output_path",)  # differs between any two runs by construction


class RunError(UserError):
    """A run id that names no run, or a run that cannot be changed now."""

    field = "run"


@dataclass
class RunRow:
    """One line of the Runs list."""

    id: str  # the run folder's name under the outputs root
    name: str
    state: str  # one of STATES
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
    resumed_at: list[int] = field(default_factory=list)  # first step recorded after each resume
    samples: list[dict[str, Any]] = field(default_factory=list)  # {step, prompt, path}
    checkpoints: list[dict[str, Any]] = field(default_factory=list)  # {step, path, exists}
    final_path: str | None = None
    saved_so_far: str | None = None  # the newest LoRA file on disk: what a stopped run offers to download
    config: dict[str, Any] = field(default_factory=dict)
    report_path: str | None = None
    message: str = ""  # the error or the reason it stopped
    error_field: str | None = None
    stderr_tail: str = ""


# ----------------------------------------------------------------------------------------------------
# reading one folder


def _read_events(path: Path) -> list[dict[str, Any]]:
    events = []
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return []
    for line in lines:
        try:
            data = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a killed process
        if isinstance(data, dict) and isinstance(data.get("type"), str):
            events.append(data)
    return events


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def flat_config(config: Any) -> dict[str, Any]:
    """A config file's fields at one level (the optional `training_params` nesting merged in)."""
    if not isinstance(config, dict):
        return {}
    flat = {key: value for key, value in config.items() if key != "training_params"}
    nested = config.get("training_params")
    if isinstance(nested, dict):
        flat.update(nested)
    return flat


def _process_alive(record: Any) -> bool:
    """Whether the process a job.json names still runs (the start time guards against a reused pid)."""
    if not isinstance(record, dict):
        return False
    try:
        pid, start_time = int(record["pid"]), float(record["start_time"])
    except (KeyError, TypeError, ValueError):
        return False
    import psutil

    try:
        process = psutil.Process(pid)
        return abs(process.create_time() - start_time) < 1.0 and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _seconds_between(first: str, last: str) -> float | None:
    try:
        return max(0.0, (datetime.fromisoformat(last) - datetime.fromisoformat(first)).total_seconds())
    except (TypeError, ValueError):
        return None


def stderr_tail(folder: Path, lines: int = STDERR_TAIL_LINES) -> str:
    try:
        text = (folder / STDERR_FILE).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def read_detail(folder: Path, running: bool | None = None) -> RunDetail | None:
    """One run's full view from its folder; None when the folder holds no run. `running`: what the caller
    knows of the run's process (None: ask the OS about the process in job.json)."""
    events = _read_events(folder / EVENTS_FILE)
    if not events:
        return None
    config = flat_config(_read_json(folder / CONFIG_FILE))
    detail = RunDetail(id=folder.name, name=folder.name, state="running", folder=str(folder), config=config,
                       base_model=str(config.get("base_model", "")))
    _fold(detail, events)
    if detail.state == "running":
        alive = _process_alive(_read_json(folder / JOB_FILE)) if running is None else running
        if not alive:
            detail.state = "stopped"
            detail.message = detail.message or "the run has no final event (its process ended without one)"
    if detail.state == "failed":
        detail.stderr_tail = stderr_tail(folder)
    for item in detail.checkpoints:
        item["exists"] = Path(item["path"]).is_file()
    on_disk = [item["path"] for item in detail.checkpoints if item["exists"]]
    if detail.final_path and Path(detail.final_path).is_file():
        detail.saved_so_far = detail.final_path
    elif on_disk:
        detail.saved_so_far = max(on_disk, key=lambda path: Path(path).stat().st_mtime)
    report = folder / REPORT_FILE
    detail.report_path = str(report) if report.is_file() else None
    return detail


def _fold(detail: RunDetail, events: list[dict[str, Any]]) -> None:
    """Fold the events into `detail`. A resume appends to the same events.jsonl: the loss history before it
    is kept (a step recorded twice keeps its newest value) and the first step after it is marked."""
    points: dict[int, float] = {}
    held_out: dict[int, float] = {}
    starts, awaiting_resume = 0, False
    checkpoints: dict[str, dict[str, Any]] = {}
    for event in events:
        kind = event["type"]
        try:
            if kind == "started":
                starts += 1
                awaiting_resume = starts > 1
                detail.started = detail.started or str(event.get("timestamp", ""))
                detail.total_steps = int(event.get("total_steps", detail.total_steps))
                detail.state, detail.message, detail.final_path, detail.error_field = "running", "", None, None
            elif kind == "progress":
                detail.step, detail.total_steps = int(event["step"]), int(event["total_steps"])
                loss = event.get("loss")
                if isinstance(loss, int | float) and math.isfinite(loss):
                    points[detail.step] = float(loss)
                    detail.loss = float(loss)
                if awaiting_resume:
                    detail.resumed_at.append(detail.step)
                    awaiting_resume = False
            elif kind == "validation":
                held_out[int(event["step"])] = float(event["loss"])
            elif kind == "sample":
                detail.samples.append({"step": int(event["step"]), "prompt": str(event.get("prompt", "")),
                                       "path": str(event["image_path"])})
            elif kind == "checkpoint":
                checkpoints[str(event["path"])] = {"step": int(event["step"]), "path": str(event["path"])}
            elif kind == "complete":
                detail.state, detail.final_path = "complete", str(event["final_path"])
                detail.step = int(event.get("step", detail.step))
            elif kind == "interrupted":
                detail.state, detail.message = "stopped", str(event.get("message", ""))
                detail.step = int(event.get("step", detail.step))
                if event.get("checkpoint_path"):
                    path = str(event["checkpoint_path"])
                    checkpoints[path] = {"step": detail.step, "path": path}
            elif kind == "error":
                detail.state, detail.message = "failed", str(event.get("message", ""))
                detail.error_field = event.get("field")
        except (KeyError, TypeError, ValueError):
            continue  # an event without its fields (another version wrote it) adds nothing
    if events and detail.started:
        detail.duration_s = _seconds_between(detail.started, str(events[-1].get("timestamp", "")))
    detail.loss_points = sorted(points.items())
    detail.validation_points = sorted(held_out.items())
    detail.checkpoints = sorted(checkpoints.values(), key=lambda item: item["step"])


# ----------------------------------------------------------------------------------------------------
# the outputs folder


def _queued_rows(root: Path) -> list[RunRow]:
    items = _read_json(root / QUEUE_FILE)
    rows = []
    for item in items if isinstance(items, list) else []:
        if not isinstance(item, dict) or not item.get("output_path") or item.get("kind", "train") != "train":
            continue  # a grid or sweep waiting is no run of its own
        folder = Path(str(item["output_path"]))
        config = flat_config(item.get("config"))
        rows.append(RunRow(id=folder.name, name=folder.name, state="queued", folder=str(folder),
                           base_model=str(config.get("base_model", "")), started=str(item.get("queued_at", "")),
                           total_steps=int(config.get("max_train_steps") or 0)))
    return rows


def run_folders(root: Path) -> list[Path]:
    return [folder for folder in sorted(Path(root).iterdir()) if folder.is_dir() and folder.name != UPLOADS
            and (folder / EVENTS_FILE).is_file()] if Path(root).is_dir() else []


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
    if folder.parent != root or not (folder / EVENTS_FILE).is_file():
        raise RunError(f"no run {name!r} in {root}; pick one from the Runs list")
    return folder


def run_detail(root: str | Path, run_id: str, running: bool | None = None) -> RunDetail:
    detail = read_detail(resolve_run(root, run_id), running)
    if detail is None:
        raise RunError(f"run {run_id!r} has no events yet; open it again once it has started")
    return detail


def delete_run(root: str | Path, run_id: str, running: bool | None = None) -> Path:
    """Delete one run's folder (only a folder directly under `root`, never while it trains)."""
    detail = run_detail(root, run_id, running)
    if detail.state == "running":
        raise RunError(f"run {run_id!r} is still running; stop it first, then delete it")
    folder = Path(detail.folder)
    if folder.is_symlink() or not folder.resolve().is_relative_to(Path(root).resolve()):
        raise RunError(f"run {run_id!r} is not inside the outputs folder {root}; it was not deleted")
    shutil.rmtree(folder)
    return folder


def compare_runs(root: str | Path, run_ids: list[str]) -> dict[str, Any]:
    """Loss curves of two or more runs (by step) and the config fields whose values differ between them."""
    ids = list(dict.fromkeys(str(run_id) for run_id in run_ids if str(run_id).strip()))
    if len(ids) < 2:
        raise RunError("pick two or more runs to compare")
    details = [run_detail(root, run_id) for run_id in ids]
    names = sorted({key for detail in details for key in detail.config} - set(NOT_COMPARED))
    differing = {}
    for key in names:
        values = [detail.config.get(key) for detail in details]
        if any(json.dumps(value, sort_keys=True) != json.dumps(values[0], sort_keys=True) for value in values):
            differing[key] = dict(zip(ids, values, strict=True))
    return {"runs": ids, "curves": {detail.id: detail.loss_points for detail in details},
            "resumed_at": {detail.id: detail.resumed_at for detail in details}, "differing": differing}


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
