"""Cleaning up what the page server leaves behind: uploads no run or job uses, Gradio's cache of files
it served or received, the temporary folders of exported configs, and the folders of ended jobs in
OUTPUTS/.studio/jobs (`prune_jobs`).

Each sweep is bounded (a number of entries looked at, age and size limits) and never touches what is in use:
an upload a run, a running job or a queued job trains on (or captions, or the doctor checks) stays, whatever its
age.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

UNUSED_UPLOAD_DAYS = 2.0  # an upload no run has used is deleted this long after it was made
# Gradio keeps a copy of every file it receives (refused uploads too) and of every file it serves (each
# checkpoint, every time a run is opened) in its cache folder, and never deletes them; export_config writes
# one file a call. Both are swept: entries older than CACHE_MAX_AGE_S go, then the oldest while the rest is
# over CACHE_MAX_BYTES. A sweep looks at SWEEP_MAX_ENTRIES entries at most and runs every SWEEP_EVERY_S.
CACHE_MAX_AGE_S, CACHE_MAX_BYTES = 24 * 3600.0, 4 * 1024**3
SWEEP_EVERY_S, SWEEP_MAX_ENTRIES, MAX_FILES_COUNTED = 600.0, 10_000, 1000
EXPORTS = ".exports"  # under the outputs folder: export_config's files, one folder a call
DATASET_KINDS = ("caption", "doctor")  # jobs whose target is a dataset folder (studio/pipeline.py)


def remove_unused(uploads_root: Path, outputs_root: Path, max_age_days: float = UNUSED_UPLOAD_DAYS,
                  now: float | None = None) -> list[Path]:
    """Delete upload folders older than `max_age_days` that no run or job in `outputs_root` uses (`used_paths`:
    any data path of a run's config.json or a job's job_config.json, or of a job waiting in queue.json; the
    dataset of a queued or running caption or doctor job); the removed folders. The page calls it for every new
    upload."""
    uploads_root, now = Path(uploads_root), time.time() if now is None else now
    if not uploads_root.is_dir():
        return []
    used = used_paths(Path(outputs_root))
    removed = []
    for folder in uploads_root.iterdir():
        try:
            old = now - folder.lstat().st_mtime > max_age_days * 86400
        except OSError:
            continue
        if old and folder.is_dir() and not folder.is_symlink() and folder.resolve() not in used:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def used_paths(outputs_root: Path) -> set[Path]:
    """Every data path (each field the config model marks, lora_core.config.DATA_PATH) that a run, a running
    job or a queued job in `outputs_root` trains on, and every dataset a queued or running caption or doctor
    job works on, resolved."""
    from lora_core.config import TrainConfig
    from lora_core.config_paths import data_paths
    from lora_core.safefile import read_json
    from studio.runs import QUEUE_FILE, STUDIO_DIR, flat_config

    configs = [read_json(path) for pattern in ("*/config.json", f"{STUDIO_DIR}/jobs/*/job_config.json")
               for path in outputs_root.glob(pattern)]  # a run's, a page job's (studio/jobfiles.py)
    queued = read_json(outputs_root / STUDIO_DIR / QUEUE_FILE)
    configs += [item.get("config") for item in queued if isinstance(item, dict)] if isinstance(queued, list) else []
    items = [item for config in map(flat_config, configs) for _, item in data_paths(TrainConfig, config)]
    return _resolved([*items, *dataset_targets(outputs_root, queued)])


def dataset_targets(outputs_root: Path, queued: Any = None) -> list[str]:
    """The dataset folders that a queued or running caption or doctor job works on (its target; a queued
    one's first argument): kept like a training's data. `queued`: queue.json as read (None: read it)."""
    from lora_core.safefile import read_json
    from studio.jobfiles import JOB_FILE, jobs_folder
    from studio.launcher import JobProcess
    from studio.queue import queue_path

    queued = read_json(queue_path(outputs_root)) if queued is None else queued
    targets = [item["args"][0] for item in (queued if isinstance(queued, list) else []) if isinstance(item, dict)
               and item.get("kind") in DATASET_KINDS and isinstance(item.get("args"), list) and item["args"]]
    for path in jobs_folder(outputs_root).glob(f"*/{JOB_FILE}"):
        record = read_json(path)
        if isinstance(record, dict) and record.get("kind") in DATASET_KINDS and record.get("target"):
            process = JobProcess.attach(path.parent)
            if process is not None and process.alive():  # started, or still starting (studio/launcher.py)
                targets.append(record["target"])
    return [item for item in targets if isinstance(item, str)]


def _resolved(items: list[Any]) -> set[Path]:
    used = set()
    for item in items:
        try:
            used.add(Path(item).resolve())
        except (OSError, ValueError, RuntimeError, TypeError):  # a NUL byte, a link loop: names nothing to keep
            continue
    return used


def gradio_cache() -> Path:
    """Where Gradio keeps the files it receives and serves (GRADIO_TEMP_DIR, else <tmp>/gradio): its own rule,
    gradio.utils.get_upload_folder, without importing gradio."""
    return Path(os.environ.get("GRADIO_TEMP_DIR") or Path(tempfile.gettempdir()) / "gradio").resolve()


def export_folder(outputs_root: Path) -> Path:
    """A fresh folder for one export_config file (swept with the cache)."""
    root = Path(outputs_root) / EXPORTS
    root.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix="config-", dir=root))


def sweep(folder: Path, max_age_s: float = CACHE_MAX_AGE_S, max_bytes: int = CACHE_MAX_BYTES,
          now: float | None = None, max_entries: int = SWEEP_MAX_ENTRIES) -> list[Path]:
    """Delete the entries directly in `folder` (files, or folders with what they hold; a link as a link)
    older than `max_age_s`, then the oldest while the rest is over `max_bytes`; the removed paths. Bounded:
    at most `max_entries` entries are looked at, and MAX_FILES_COUNTED files of each folder counted."""
    now = time.time() if now is None else now
    entries = []
    try:
        with os.scandir(folder) as listing:
            for entry in itertools.islice(listing, max_entries):
                try:
                    info = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                folder_entry = stat.S_ISDIR(info.st_mode)
                size = _folder_bytes(Path(entry.path)) if folder_entry else info.st_size
                entries.append((info.st_mtime, size, Path(entry.path), folder_entry))
    except OSError:
        return []
    entries.sort()  # oldest first
    total, removed = sum(size for _, size, _, _ in entries), []
    for mtime, size, path, folder_entry in entries:
        if now - mtime <= max_age_s and total <= max_bytes:
            break
        try:
            shutil.rmtree(path) if folder_entry else path.unlink()
        except OSError:
            continue
        total -= size
        removed.append(path)
    return removed


def _folder_bytes(folder: Path) -> int:
    total = 0
    for root, _, files in itertools.islice(os.walk(folder), MAX_FILES_COUNTED):
        for name in files[:MAX_FILES_COUNTED]:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                continue
    return total


_last_sweep: dict[str, float] = {}
_sweep_lock = threading.Lock()


def sweep_caches(outputs_root: Path, now: float | None = None, every_s: float = SWEEP_EVERY_S) -> list[Path]:
    """Sweep Gradio's cache and the config exports of this server, at most once every `every_s` seconds
    (the page calls this on uploads, exports and opened runs); the removed paths."""
    now = time.time() if now is None else now
    key = str(Path(outputs_root).resolve())
    with _sweep_lock:
        if now - _last_sweep.get(key, -every_s) < every_s:
            return []
        _last_sweep[key] = now
    return [*sweep(gradio_cache(), now=now), *sweep(Path(outputs_root) / EXPORTS, now=now)]


# The job folders in OUTPUTS/.studio/jobs (studio/jobfiles.py) a server prunes, at its start and then at most
# every JOBS_PRUNE_EVERY_S; never one whose job is alive (its lock held, its process running or starting) or queued:
# - an ended tool job's (grid, sweep, score, caption, doctor): after ENDED_TOOL_DAYS, or beyond the newest
#   ENDED_TOOLS_KEPT of them (its status can be asked until then, also after a restart);
# - a training job's lives as long as its run folder (the Runs list reads its job.json, stderr.log and
#   job_config.json): it goes with the run (delete_run), or at the next prune when the run was deleted otherwise;
# - a job's that never started (no job.json): at once when its run's events record that it failed after it was
#   made (a resume that could not start), else after NEVER_STARTED_DAYS.
ENDED_TOOL_DAYS, ENDED_TOOLS_KEPT, NEVER_STARTED_DAYS, JOBS_PRUNE_EVERY_S = 7.0, 200, 1.0, 3600.0
_last_prune: dict[str, float] = {}


def prune_jobs_hourly(outputs_root: Path, protected: Callable[[], Collection[str]], now: float | None = None,
                      every_s: float = JOBS_PRUNE_EVERY_S) -> threading.Thread | None:
    """`prune_jobs` in a thread of its own, at most once every `every_s` s for an outputs folder (the page's job
    registry calls this on every tick, under its lock: `protected` gives the ids of its running jobs then)."""
    now = time.time() if now is None else now
    key = str(outputs_root)  # (called twice a second: the registry's root is resolved already)
    with _sweep_lock:
        if now - _last_prune.get(key, -every_s) < every_s:
            return None
        _last_prune[key] = now
    thread = threading.Thread(target=prune_jobs, args=(Path(key), set(protected()), now), name="prune-jobs",
                              daemon=True)
    thread.start()
    return thread


def prune_jobs(outputs_root: Path, protected: Collection[str] = (), now: float | None = None) -> list[Path]:
    """Remove the job folders the rule above lets go (`protected`: ids of jobs a server runs); the removed ones."""
    from studio.jobfiles import jobs_folder, remove_job_folder
    from studio.queue import queue_path

    root, now = Path(outputs_root).resolve(), time.time() if now is None else now
    queued = _read_json(queue_path(root))
    keep = {*protected, *(str(item.get("job_id")) for item in queued if isinstance(item, dict))}
    try:
        with os.scandir(jobs_folder(root)) as listing:
            folders = [Path(entry.path) for entry in itertools.islice(listing, SWEEP_MAX_ENTRIES)
                       if entry.is_dir(follow_symlinks=False) and entry.name not in keep]
    except OSError:
        return []
    removed, ended_tools = [], []
    for folder in folders:
        verdict, newest = _verdict(root, folder, keep)
        if verdict == "remove" or (verdict == "never started" and now - newest > NEVER_STARTED_DAYS * 86400):
            removed.append(remove_job_folder(folder))
        elif verdict == "ended tool":
            ended_tools.append((newest, folder))
    ended_tools.sort(reverse=True)  # the newest first
    for index, (newest, folder) in enumerate(ended_tools):
        if index >= ENDED_TOOLS_KEPT or now - newest > ENDED_TOOL_DAYS * 86400:
            removed.append(remove_job_folder(folder))
    return removed


def _verdict(root: Path, folder: Path, keep: Collection[str]) -> tuple[str, float]:
    """What the rule makes of one job folder ("keep", "remove", "ended tool", "never started") and when it was
    last written (its newest file's time)."""
    from lora_core import runlock
    from lora_core.runrecord import FAILED, RunFiles
    from lora_core.runtail import RecordTail
    from studio.jobfiles import JobFiles
    from studio.jobview import read_to_end
    from studio.launcher import JobProcess

    files, newest = JobFiles(folder), _newest_time(folder)
    record, process = files.record(), JobProcess.attach(folder)
    if record.get("job_id") in keep or runlock.holder(folder) is not None or (process and process.alive()):
        return "keep", newest
    if not files.job.exists():  # never started: job.json is written before a job's process starts
        config = _read_json(files.job_config, dict)
        run = Path(str(config.get("output_path", ""))) if isinstance(config, dict) else None
        recorded = run is not None and run.parent == root and RunFiles(run).events.is_file() and \
            RunFiles(run).events.stat().st_mtime >= newest and read_to_end(RecordTail(run), 2.0).state == FAILED
        return ("remove" if recorded else "never started"), newest
    target = Path(str(record.get("target", "")))
    if record.get("kind", "train") == "train" and target.is_absolute() and target.parent == root:
        return ("keep" if target.is_dir() else "remove"), newest
    return "ended tool", newest  # (a damaged job.json too: kept as long)


def _newest_time(folder: Path) -> float:
    times = []
    with contextlib.suppress(OSError), os.scandir(folder) as listing:
        times = [entry.stat(follow_symlinks=False).st_mtime for entry in itertools.islice(listing, 100)]
    with contextlib.suppress(OSError):
        times.append(folder.lstat().st_mtime)
    return max(times, default=0.0)


def _read_json(path: Path, kind: type = list) -> Any:
    """A JSON file of the server's (queue.json, job_config.json) when it holds a `kind`, else an empty one."""
    from lora_core.safefile import read_json

    data = read_json(path)
    return data if isinstance(data, kind) else kind()
