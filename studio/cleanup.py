"""Cleaning up what the page server leaves behind: uploads no run or job uses, Gradio's cache of files
it served or received, and the temporary folders of exported configs.

Each sweep is bounded (a number of entries looked at, age and size limits) and never touches what is in use:
an upload a run, a running job or a queued job trains on stays, whatever its age.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

UNUSED_UPLOAD_DAYS = 2.0  # an upload no run has used is deleted this long after it was made


def remove_unused(uploads_root: Path, outputs_root: Path, max_age_days: float = UNUSED_UPLOAD_DAYS,
                  now: float | None = None) -> list[Path]:
    """Delete upload folders older than `max_age_days` that no run or job in `outputs_root` uses (`used_paths`:
    any data path of a run's config.json or job_config.json, or of a job waiting in queue.json); the removed
    folders. The page calls it for every new upload."""
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
    job or a queued job in `outputs_root` trains on, resolved."""
    from lora_core.config import TrainConfig, data_path_fields
    from lora_core.safefile import read_json
    from studio.runs import QUEUE_FILE, flat_config

    configs = [read_json(path) for pattern in ("*/config.json", "*/job_config.json")
               for path in outputs_root.glob(pattern)]
    queued = read_json(outputs_root / QUEUE_FILE)
    configs += [item.get("config") for item in queued if isinstance(item, dict)] if isinstance(queued, list) else []
    used = set()
    for config in map(flat_config, configs):
        for name in data_path_fields(TrainConfig):
            value = config.get(name)
            for item in value if isinstance(value, list) else [value]:
                if not isinstance(item, str) or not item:
                    continue
                try:
                    used.add(Path(item).resolve())
                except (OSError, ValueError, RuntimeError):  # a NUL byte, a link loop: names nothing to keep
                    continue
    return used
