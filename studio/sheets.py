"""The page's side of the checkpoint grid and the strength sweep: what a run offers, and the command line of
the job that draws it (`python -m lora_core grid|sweep RUN ...`, run through the Studio's queue).

Options are checked here before anything is queued (a step the run never saved, too many cells, a scale out
of range) by the engine's own option models (lora_core/grid.py GridOptions, SweepOptions: the one source of
their limits), so a refused grid costs no job. Torch-free: it reads file names only (lora_core.grid imports
torch only inside the functions that draw).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from lora_core import grid
from lora_core.errors import UserError
from studio import runs

CHECKPOINT = re.compile(r"^lora_step_(\d+)\.safetensors$")
FINAL = "lora_final.safetensors"
DEFAULT_SCALES = ", ".join(f"{scale:g}" for scale in grid.DEFAULT_SCALES)
ITEMS = {"steps": "checkpoints", "prompts": "prompts"}  # what a list option holds, for its message


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
    return spread([value for _, value in saved_choices(folder)], grid.MAX_DEFAULT_ROWS)


def run_prompts(config: dict[str, Any]) -> list[str]:
    """The run's sample prompts, or its trigger words when it has none (as the trainer samples)."""
    prompts = [str(p) for p in config.get("sample_prompts") or [] if str(p).strip()]
    if prompts:
        return prompts
    words = config.get("trigger_words") or []
    return [", ".join(words) if isinstance(words, list) else str(words)]


def checked(model: type[BaseModel], **values: Any) -> BaseModel:
    """`values` as the grid's option model takes them (its ranges and list lengths, as the CLI checks them);
    a refusal in the page's words, under its field."""
    try:
        return model.model_validate(values)
    except ValidationError as error:
        first = error.errors()[0]
        field = str(first["loc"][0]) if first["loc"] else "steps"
        if field == "scales":
            limits = model.model_json_schema()["properties"]["scales"]
            message = (f"scales: 1 to {limits['maxItems']} numbers from {limits['items']['minimum']:g} to "
                       f"{limits['items']['maximum']:g}, e.g. {DEFAULT_SCALES}")
        elif first["type"] == "too_long" and field in ITEMS:
            message = f"{field}: {first['ctx']['actual_length']} {ITEMS[field]}, at most {first['ctx']['max_length']}"
        else:
            message = f"{field}: {first['msg']}"
        raise SheetError(message, field=field) from None


def _prompts(text: str | list[str] | None) -> list[str]:
    prompts = text if isinstance(text, list) else (text or "").splitlines()
    prompts = [prompt.strip() for prompt in prompts if prompt.strip()]
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
    columns = _prompts(prompts)
    checked(grid.GridOptions, steps=chosen, prompts=columns or None)
    if len(chosen) * max(1, len(columns)) > grid.MAX_CELLS:
        raise SheetError(f"{len(chosen)} x {len(columns)} cells is more than {grid.MAX_CELLS}; choose fewer "
                         "checkpoints or prompts")
    return ["--steps", *chosen, *(["--prompts", *columns] if columns else [])]


def parse_scales(text: str | list[float] | None) -> list[float]:
    items = text if isinstance(text, list) else re.split(r"[\s,]+", (text or DEFAULT_SCALES).strip())
    try:
        scales = [float(item) for item in items if str(item).strip()]
    except ValueError:
        raise SheetError(f"scales: {text!r} is not a list of numbers, e.g. {DEFAULT_SCALES}",
                         field="scales") from None
    checked(grid.SweepOptions, scales=scales)
    return scales


def sweep_args(folder: Path, step: str | None, prompts: str | list[str] | None,
               scales: str | list[float] | None) -> list[str]:
    """The sweep job's options after the run folder: `[--step S] --scales ... [--prompts ...]`."""
    chosen = _check_step(folder, step, "step") if str(step or "").strip() else None
    values = parse_scales(scales)
    rows = _prompts(prompts)
    checked(grid.SweepOptions, step=chosen, prompts=rows or None, scales=values)
    if len(values) * max(1, len(rows)) > grid.MAX_CELLS:
        raise SheetError(f"{len(rows)} x {len(values)} cells is more than {grid.MAX_CELLS}; choose fewer prompts or "
                         "scales", field="scales")
    return [*(["--step", chosen] if chosen else []), "--scales", *(f"{s:g}" for s in values),
            *(["--prompts", *rows] if rows else [])]


def newest_sheet(folder: Path) -> Path | None:
    """The run's newest grid or sweep PNG, if it has one."""
    sheets = [path for path in folder.glob("*.png") if path.name.startswith(("grid_", "sweep_"))
              and runs.contained_file(folder, path.name)]  # a regular file of the run, never a link out
    return max(sheets, key=lambda path: path.stat().st_mtime) if sheets else None
