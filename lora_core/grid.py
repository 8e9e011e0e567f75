"""Pick the best LoRA: a checkpoint x prompt grid and a strength sweep, drawn from a run folder's saved files.

Every cell is what a diffusers user gets: the run's base model with a saved `.safetensors` LoRA loaded by
`load_lora_weights` (a LoHa / LoKr file, which diffusers cannot read, is added to the weights by
lorafile.apply_lora instead), drawn the way the trainer draws its samples (DPM-Solver, `sample_inference_steps`,
`sample_guidance_scale`, the run's resolution) with one seed for every cell, so that the cells differ only by
the LoRA (grid rows: checkpoints; sweep columns: its scale, 0 being the base model). The base model is loaded
once, on the run's device; adapters are swapped per row or re-weighted per column.

    python -m lora_core grid RUN_FOLDER [--steps 500 1000 final] [--prompts P ...] [--seed N] [--device D]
    python -m lora_core sweep RUN_FOLDER [--step 1000|final] [--prompts P ...] [--scales 0 0.5 1] [--seed N]

stdout carries JSON-lines events (`grid_progress` per cell, then one `grid_complete`, `error` or
`interrupted`); the PNG is written into RUN_FOLDER (`grid_<time>.png`, `sweep_<time>.png`).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lora_core.config import TrainConfig
from lora_core.configfile import load_config
from lora_core.errors import UserError
from lora_core.events import Event, GridComplete, GridProgress, Interrupted
from lora_core.files import atomic_write
from lora_core.sheet import SheetLayout, compose

if TYPE_CHECKING:
    from lora_core.drawing import Renderer

MAX_DEFAULT_ROWS = 8  # without --steps: every saved LoRA up to this many, else this many spread evenly
MAX_ROWS = MAX_COLUMNS = 16
MAX_CELLS = 64  # 8 x 8 cells of 1024 px is already an 8192 px square PNG
DEFAULT_SCALES = (0.0, 0.25, 0.5, 0.75, 1.0)
CHECKPOINT = re.compile(r"^lora_step_(\d+)\.safetensors$")
Step = int | Literal["final"]


class GridError(UserError):
    """A run folder, checkpoint, prompt or option the grid or sweep cannot use; `field` names it."""

    field = "run"


class GridStopped(Exception):
    """Stopped on request between cells; nothing was written."""

    def __init__(self, done: int, total: int):
        super().__init__(f"stopped on request after {done} of {total} cells; no image was written")
        self.done = done


class GridOptions(BaseModel):
    """What to draw in a checkpoint x prompt grid; None means the run's own choice."""

    model_config = ConfigDict(extra="forbid")
    steps: list[Step] | None = Field(None, min_length=1, max_length=MAX_ROWS, description=(
        f"Checkpoint steps (rows) and/or 'final'; default all, at most {MAX_DEFAULT_ROWS} spread evenly."))
    prompts: list[str] | None = Field(None, min_length=1, max_length=MAX_COLUMNS, description=(
        "Prompts (columns); default the run's sample prompts, or its trigger words."))
    seed: int | None = Field(None, ge=0, le=2**32 - 1, description="One seed for every cell; default the run's.")
    device: Literal["auto", "cpu", "cuda"] | None = Field(None, description="Default the run's device.")


class SweepOptions(BaseModel):
    """What to draw in a strength sweep: one LoRA at several scales (columns), per prompt (rows)."""

    model_config = ConfigDict(extra="forbid")
    step: Step | None = Field(None, description="A checkpoint's step or 'final'; default the newest LoRA.")
    prompts: list[str] | None = Field(None, min_length=1, max_length=MAX_COLUMNS, description=(
        "Prompts (rows); default the run's first sample prompt."))
    scales: list[Annotated[float, Field(ge=-2, le=4)]] = Field(list(DEFAULT_SCALES), min_length=1,
                                                               max_length=MAX_COLUMNS, description=(
        "LoRA scales (columns), each from -2 to 4; 0 is the base model."))
    seed: int | None = Field(None, ge=0, le=2**32 - 1)
    device: Literal["auto", "cpu", "cuda"] | None = None


@dataclass(frozen=True)
class SavedLora:
    step: int | None  # None: a final LoRA whose header does not say (not written by this trainer)
    path: Path
    final: bool

    @property
    def label(self) -> str:
        if self.final:
            return "final" if self.step is None else f"final (step {self.step})"
        return f"step {self.step}"


@dataclass
class GridResult:
    path: Path
    layout: SheetLayout
    cells: list[list[Any]]  # PIL images, rows x columns, as drawn
    row_labels: list[str]
    column_labels: list[str]


def parse_options(model: type[BaseModel], options: BaseModel | dict | None) -> Any:
    if isinstance(options, model):
        return options
    try:
        parsed = model.model_validate(options or {})
    except ValidationError as error:
        first = error.errors()[0]
        field = str(first["loc"][0]) if first["loc"] else "options"
        raise GridError(f"{field}: {first['msg']}", field=field) from None
    return parsed


# ----------------------------------------------------------------------------------------------------
# the run folder


def read_run(folder: str | Path) -> tuple[Path, TrainConfig]:
    folder = Path(folder)
    if not folder.is_dir():
        raise GridError(f"{folder}: no such run folder; give a run's output_path")
    if not (folder / "config.json").is_file():
        raise GridError(f"{folder} has no config.json, so it is not a run's output folder (or its run never "
                        "started); give the output_path of a run")
    return folder, load_config(folder / "config.json")


def saved_loras(folder: Path) -> list[SavedLora]:
    """Every LoRA file the run saved, by step; the final one (its step read from its header) last."""
    found = []
    checkpoints = folder / "checkpoints"
    for path in checkpoints.iterdir() if checkpoints.is_dir() else []:
        if match := CHECKPOINT.match(path.name):
            found.append(SavedLora(int(match.group(1)), path, False))
    found.sort(key=lambda saved: saved.step)
    final = folder / "lora_final.safetensors"
    if final.is_file():
        found.append(SavedLora(_header_steps(final), final, True))
    return found


def _header_steps(path: Path) -> int | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as handle:
            steps = (handle.metadata() or {}).get("ss_steps", "")
            return int(steps) if steps.isdigit() else None
    except Exception as error:  # safetensors has its own error types for a damaged file
        raise GridError(f"{path}: not a readable .safetensors LoRA ({error})", field="steps") from None


def spread(items: list, count: int) -> list:
    """`items` when there are at most `count`, else `count` of them evenly spaced, first and last included."""
    if len(items) <= count:
        return list(items)
    return [items[round(index * (len(items) - 1) / (count - 1))] for index in range(count)]


def pick(saved: list[SavedLora], steps: list[Step] | None, folder: Path, field: str = "steps",
         cap: int = MAX_DEFAULT_ROWS) -> list[SavedLora]:
    """The LoRAs at `steps` (in that order), or without them up to `cap` spread evenly over all."""
    if not saved:
        raise GridError(f"{folder} holds no LoRA yet (checkpoints/lora_step_*.safetensors or "
                        "lora_final.safetensors); wait for the first checkpoint", field=field)
    if steps is None:
        return spread(saved, cap)
    chosen = []
    for step in dict.fromkeys(steps):  # the order given, each once
        match = [s for s in saved if (s.final if step == "final" else s.step == step and not s.final)]
        if not match:
            have = ", ".join(s.label for s in saved)
            raise GridError(f"{field}: the run has no LoRA saved at {step!r}; it has {have}", field=field)
        chosen.append(match[0])
    return chosen


def default_prompts(config: TrainConfig) -> list[str]:
    """The trainer's sample prompts: `sample_prompts`, or the trigger words when there are none."""
    from lora_core.samples import prompts_of

    return list(prompts_of(config))


# ----------------------------------------------------------------------------------------------------
# the grid and the sweep


def render_grid(run_folder: str | Path, options: GridOptions | dict | None = None,
                emit: Callable[[Event], None] | None = None, should_stop: Callable[[], bool] | None = None,
                renderer: Renderer | None = None) -> GridResult:
    """Rows = checkpoints, columns = prompts, one seed; the PNG is written into the run folder."""
    options = parse_options(GridOptions, options)
    folder, config = read_run(run_folder)
    prompts = options.prompts or default_prompts(config)
    rows = pick(saved_loras(folder), options.steps, folder, cap=max(1, min(MAX_DEFAULT_ROWS,
                                                                          MAX_CELLS // len(prompts))))
    _check_cells(len(rows), len(prompts), "steps")
    seed = config.seed if options.seed is None else options.seed
    renderer = _renderer_for(config, options.device, renderer)
    counter = _Counter("grid", len(rows) * len(prompts), emit, should_stop)
    cells = []
    try:
        for saved in rows:
            renderer.load(saved.path)
            cells.append([counter.cell(counter.draw(renderer, prompt, seed), saved.label, _shown(prompt))
                          for prompt in prompts])
    finally:
        renderer.unload()
    title = f"{folder.name}: {config.base_model}, seed {seed}, {renderer.sampling}"
    details = {"kind": "grid", "steps": [s.label for s in rows], "prompts": prompts, "seed": seed}
    return _save(folder, "grid", cells, [s.label for s in rows], [_shown(p) for p in prompts], title, details)


def render_sweep(run_folder: str | Path, options: SweepOptions | dict | None = None,
                 emit: Callable[[Event], None] | None = None, should_stop: Callable[[], bool] | None = None,
                 renderer: Renderer | None = None) -> GridResult:
    """Columns = LoRA scales (0 = the base model), rows = prompts, one LoRA, one seed."""
    options = parse_options(SweepOptions, options)
    folder, config = read_run(run_folder)
    saved = saved_loras(folder)
    lora = pick(saved, None if options.step is None else [options.step], folder, "step")[-1]
    prompts = options.prompts or default_prompts(config)[:1]
    _check_cells(len(prompts), len(options.scales), "scales")
    seed = config.seed if options.seed is None else options.seed
    renderer = _renderer_for(config, options.device, renderer)
    counter = _Counter("sweep", len(prompts) * len(options.scales), emit, should_stop)
    labels = [f"scale {scale:g}" + (" (base model)" if scale == 0 else "") for scale in options.scales]
    columns = []
    try:
        renderer.load(lora.path, field="step")
        for scale, label in zip(options.scales, labels, strict=True):
            renderer.set_scale(scale)
            columns.append([counter.cell(counter.draw(renderer, prompt, seed), _shown(prompt), label)
                            for prompt in prompts])
    finally:
        renderer.unload()
    cells = [list(row) for row in zip(*columns, strict=True)]
    title = f"{folder.name}: {lora.label}, {config.base_model}, seed {seed}, {renderer.sampling}"
    details = {"kind": "sweep", "step": lora.label, "prompts": prompts, "scales": options.scales, "seed": seed}
    return _save(folder, "sweep", cells, [_shown(p) for p in prompts], labels, title, details)


def _renderer_for(config: TrainConfig, device: str | None, renderer: Renderer | None) -> Renderer:
    """`renderer` when it holds this run's base model (a caller drawing several grids keeps one), else a new one."""
    from lora_core.drawing import Renderer

    if renderer is not None and renderer.serves(config, device):
        return renderer
    return Renderer(config, device)


def _check_cells(rows: int, columns: int, field: str) -> None:
    if rows * columns > MAX_CELLS:
        raise GridError(f"{rows} x {columns} = {rows * columns} cells is more than {MAX_CELLS}; choose fewer "
                        "checkpoints, prompts or scales", field=field)


def _shown(prompt: str) -> str:
    return prompt if prompt.strip() else "(empty prompt)"


class _Counter:
    """Counts drawn cells, reports each, and stops between cells when asked."""

    def __init__(self, kind: str, total: int, emit: Callable[[Event], None] | None,
                 should_stop: Callable[[], bool] | None):
        self.kind, self.total, self.done = kind, total, 0
        self.emit, self.should_stop = emit, should_stop

    def draw(self, renderer: Renderer, prompt: str, seed: int):
        """One cell's image; a stop asked between its denoising steps ends the job there (GridStopped)."""
        from lora_core.samples import DrawingStopped

        try:
            return renderer.draw(prompt, seed, self.should_stop)
        except DrawingStopped:
            raise GridStopped(self.done, self.total) from None

    def cell(self, image, row: str, column: str):
        self.done += 1
        if self.emit is not None:
            self.emit(GridProgress(kind=self.kind, done=self.done, total=self.total, row=row, column=column))
        if self.should_stop is not None and self.should_stop() and self.done < self.total:
            raise GridStopped(self.done, self.total)
        return image


def _save(folder: Path, kind: str, cells: list[list[Any]], row_labels: list[str], column_labels: list[str],
          title: str, details: dict[str, Any]) -> GridResult:
    from PIL.PngImagePlugin import PngInfo

    sheet, layout = compose(cells, row_labels, column_labels, title)
    boxes = [[list(layout.box(row, column)) for column in range(layout.columns)] for row in range(layout.rows)]
    info = PngInfo()
    # what was drawn, for the page's list of grids; each cell's box as (left, top, right, bottom)
    info.add_text("lora_studio", json.dumps({**details, "boxes": boxes}))
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    path, count = folder / f"{kind}_{stamp}.png", 1
    while path.exists():  # two in one second
        count += 1
        path = folder / f"{kind}_{stamp}-{count}.png"
    atomic_write(path, lambda tmp: sheet.save(tmp, format="PNG", pnginfo=info))
    return GridResult(path, layout, cells, row_labels, column_labels)


# ----------------------------------------------------------------------------------------------------
# a job, and the command line


def run_job(kind: str, run_folder: str | Path, options: BaseModel | dict | None, emit: Callable[[Event], None],
            should_stop: Callable[[], bool] | None = None, renderer: Renderer | None = None) -> Event:
    """Draw a grid or a sweep, reporting through `emit`, which gets exactly one terminal event (returned).
    `renderer`: a loaded base model to reuse when it is the run's (a worker drawing several keeps one)."""
    from lora_core.job import tool_outcome  # here: the page imports this module's option models without torch

    started = time.perf_counter()
    render = {"grid": render_grid, "sweep": render_sweep}[kind]

    def draw() -> Event:
        result = render(run_folder, options, emit, should_stop, renderer)
        width, height = result.layout.size
        return GridComplete(kind=kind, path=str(result.path), width=width, height=height,
                            total_time=round(time.perf_counter() - started, 3))

    event = tool_outcome(draw, {GridStopped: lambda stopped: Interrupted(step=stopped.done, message=str(stopped),
                                                                          checkpoint_path=None)})
    emit(event)
    return event


def _step(text: str) -> Step:
    if text == "final":
        return "final"
    if text.isdigit():
        return int(text)
    raise ValueError(text)


def parse_args(argv: list[str]):
    import argparse

    parser = argparse.ArgumentParser(prog="python -m lora_core", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="kind", required=True)
    grid = commands.add_parser("grid", help="checkpoints (rows) x prompts (columns)")
    grid.add_argument("run", help="the run's output folder")
    grid.add_argument("--steps", nargs="+", type=_step, help=f"checkpoint steps and/or 'final' (default: all, "
                      f"at most {MAX_DEFAULT_ROWS} spread evenly)")
    sweep = commands.add_parser("sweep", help="one LoRA at several scales (columns), 0 = the base model")
    sweep.add_argument("run", help="the run's output folder")
    sweep.add_argument("--step", type=_step, help="a checkpoint's step or 'final' (default: the newest LoRA)")
    sweep.add_argument("--scales", nargs="+", type=float, default=list(DEFAULT_SCALES))
    for command in (grid, sweep):
        command.add_argument("--prompts", nargs="+", help="default: the run's sample prompts (sweep: the first)")
        command.add_argument("--seed", type=int, help="one seed for every cell (default: the run's seed)")
        command.add_argument("--device", choices=["auto", "cpu", "cuda"], help="default: the run's device")
    args = parser.parse_args(argv)
    options = {key: value for key, value in vars(args).items() if key not in ("kind", "run") and value is not None}
    return args.kind, args.run, options


def main(argv: list[str]) -> int:
    """`python -m lora_core grid|sweep ...`: events on stdout; 0 when the image was written."""
    from lora_core.job import tool_command

    kind, run, options = parse_args(argv)
    return tool_command(lambda emit, should_stop: run_job(kind, run, options, emit, should_stop), GridComplete,
                        reads=run, said=lambda event: event.path)
