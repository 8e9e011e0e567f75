"""The page's side of the checkpoint grid and the strength sweep: what a run offers, and the command line of
the job that draws it (`python -m lora_core grid|sweep RUN ...`, run through the Studio's queue).

Options are checked here before anything is queued (a step the run never saved, too many cells, a scale out
of range), with the engine's limits, so a refused grid costs no job. Torch-free: it reads file names only.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from lora_core.errors import UserError
from studio import runs

CHECKPOINT = re.compile(r"^lora_step_(\d+)\.safetensors$")
FINAL = "lora_final.safetensors"
MAX_DEFAULT_ROWS, MAX_ROWS, MAX_COLUMNS, MAX_CELLS = 8, 16, 16, 64  # as lora_core/grid.py
MIN_SCALE, MAX_SCALE = -2.0, 4.0
DEFAULT_SCALES = "0, 0.25, 0.5, 0.75, 1"


class SheetError(UserError):
    """Grid or sweep options the run cannot draw; `field` names the option."""

    field = "steps"


def saved_choices(folder: Path) -> list[tuple[str, str]]:
    """The run's saved LoRAs as (label, value) by step, the final one last; value is a step or 'final'."""
    checkpoints = folder / "checkpoints"
    steps = sorted(int(match.group(1)) for path in (checkpoints.iterdir() if checkpoints.is_dir() else [])
                   if (match := CHECKPOINT.match(path.name)))
    choices = [(f"step {step}", str(step)) for step in steps]
    return choices + ([("final", "final")] if (folder / FINAL).is_file() else [])


def spread(items: list, count: int) -> list:
    """`items`, or `count` of them evenly spaced (first and last included) when there are more."""
    if len(items) <= count:
        return list(items)
    return [items[round(index * (len(items) - 1) / (count - 1))] for index in range(count)]


def default_steps(folder: Path) -> list[str]:
    """What the grid draws when none are chosen: every saved LoRA, or 8 spread evenly."""
    return spread([value for _, value in saved_choices(folder)], MAX_DEFAULT_ROWS)


def run_prompts(config: dict[str, Any]) -> list[str]:
    """The run's sample prompts, or its trigger words when it has none (as the trainer samples)."""
    prompts = [str(p) for p in config.get("sample_prompts") or [] if str(p).strip()]
    if prompts:
        return prompts
    words = config.get("trigger_words") or []
    return [", ".join(words) if isinstance(words, list) else str(words)]


def _prompts(text: str | list[str] | None, limit: int) -> list[str]:
    prompts = text if isinstance(text, list) else (text or "").splitlines()
    prompts = [prompt.strip() for prompt in prompts if prompt.strip()]
    if len(prompts) > limit:
        raise SheetError(f"prompts: {len(prompts)} prompts, at most {limit}", field="prompts")
    if bad := next((prompt for prompt in prompts if prompt.startswith("-")), None):
        raise SheetError(f"prompts: {bad!r} starts with '-', which the command line takes for an option; "
                         "reword it", field="prompts")
    return prompts


def _check_step(folder: Path, step: str, field: str) -> str:
    values = [value for _, value in saved_choices(folder)]
    if not values:
        raise SheetError(f"{folder.name} holds no LoRA yet; wait for its first checkpoint", field=field)
    step = str(step).strip()
    if step not in values:
        raise SheetError(f"{field}: the run has no LoRA saved at {step!r}; it has {', '.join(values)}", field=field)
    return step


def grid_args(folder: Path, steps: list[str] | None, prompts: str | list[str] | None) -> list[str]:
    """The grid job's options after the run folder: `--steps ... --prompts ...` (none: the run's defaults)."""
    chosen = [_check_step(folder, step, "steps") for step in dict.fromkeys(steps or [])] or default_steps(folder)
    if not chosen:
        raise SheetError(f"{folder.name} holds no LoRA yet; wait for its first checkpoint")
    if len(chosen) > MAX_ROWS:
        raise SheetError(f"steps: {len(chosen)} checkpoints, at most {MAX_ROWS}")
    columns = _prompts(prompts, MAX_COLUMNS)
    if len(chosen) * max(1, len(columns)) > MAX_CELLS:
        raise SheetError(f"{len(chosen)} x {len(columns)} cells is more than {MAX_CELLS}; choose fewer "
                         "checkpoints or prompts")
    return ["--steps", *chosen, *(["--prompts", *columns] if columns else [])]


def parse_scales(text: str | list[float] | None) -> list[float]:
    items = text if isinstance(text, list) else re.split(r"[\s,]+", (text or DEFAULT_SCALES).strip())
    try:
        scales = [float(item) for item in items if str(item).strip()]
    except ValueError:
        raise SheetError(f"scales: {text!r} is not a list of numbers, e.g. {DEFAULT_SCALES}",
                         field="scales") from None
    if not scales or len(scales) > MAX_COLUMNS or any(not MIN_SCALE <= s <= MAX_SCALE for s in scales):
        raise SheetError(f"scales: 1 to {MAX_COLUMNS} numbers from {MIN_SCALE:g} to {MAX_SCALE:g}, e.g. "
                         f"{DEFAULT_SCALES}", field="scales")
    return scales


def sweep_args(folder: Path, step: str | None, prompts: str | list[str] | None,
               scales: str | list[float] | None) -> list[str]:
    """The sweep job's options after the run folder: `[--step S] --scales ... [--prompts ...]`."""
    chosen = _check_step(folder, step, "step") if str(step or "").strip() else None
    values = parse_scales(scales)
    rows = _prompts(prompts, MAX_COLUMNS)
    if len(values) * max(1, len(rows)) > MAX_CELLS:
        raise SheetError(f"{len(rows)} x {len(values)} cells is more than {MAX_CELLS}; choose fewer prompts or "
                         "scales", field="scales")
    return [*(["--step", chosen] if chosen else []), "--scales", *(f"{s:g}" for s in values),
            *(["--prompts", *rows] if rows else [])]


def newest_sheet(folder: Path) -> Path | None:
    """The run's newest grid or sweep PNG, if it has one."""
    sheets = [path for path in folder.glob("*.png") if path.name.startswith(("grid_", "sweep_"))
              and runs.contained_file(folder, path.name)]  # a regular file of the run, never a link out
    return max(sheets, key=lambda path: path.stat().st_mtime) if sheets else None
