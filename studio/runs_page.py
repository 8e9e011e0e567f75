"""The page's Runs tab: every run in the outputs folder, one run opened, Delete and Compare, and for the opened
run a checkpoint x prompt grid and a strength sweep, drawn as jobs through the Studio's queue.

Built from studio/runs.py (each run's own files), so it shows CLI runs and runs of earlier servers too.
Its named API endpoints: `runs`, `open_run` (by run id; the jobs API's `run` takes a job id), `delete_run`,
`compare` (runs or checkpoints `RUN@STEP`), `grid`, `sweep` and `score` (each answers the queued job: follow it
with `run`).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gradio as gr

from lora_core import comfyui, manifest
from lora_core.errors import UserError
from lora_core.runrecord import RunFiles
from studio import runs, scores_view, sheets
from studio.cleanup import sweep_caches
from studio.jobfiles import job_of
from studio.render import plot_frame
from studio.train_form import PageSettings, refuse_data_paths

if TYPE_CHECKING:
    from studio.jobs import Studio

FOLLOW_TICK_S = 0.5
TOOL_JOB = re.compile(r"-(grid|sweep)-")  # a grid's or sweep's job id (Studio.submit_tool names them so)

SMOOTHING = 0.9  # exponential moving average of the loss, as the report draws it


def _frame(curves: dict[str, list[tuple[int, float]]], smoothed: bool = True,
           validation: list[tuple[int, float]] = ()):
    """Rows of (step, loss, line): each run's curve (raw and smoothed), and the held-out images' loss."""

    rows: list[dict[str, Any]] = [{"step": step, "loss": loss, "line": "validation (held-out)"}
                                  for step, loss in validation]
    for name, points in curves.items():
        average = points[0][1] if points else 0.0
        for step, loss in points:
            rows.append({"step": step, "loss": loss, "line": f"{name} raw" if smoothed else name})
            if smoothed:
                average = SMOOTHING * average + (1 - SMOOTHING) * loss
                rows.append({"step": step, "loss": average, "line": f"{name} smoothed"})
    return plot_frame([(row["step"], row["loss"], row["line"]) for row in rows])


def _detail_markdown(detail: runs.RunDetail) -> str:
    lines = [f"### {detail.id}: {detail.state}",
             f"- base model: `{detail.base_model}`", f"- steps: {detail.step} / {detail.total_steps}",
             f"- last loss: {'' if detail.loss is None else f'{detail.loss:.4g}'}",
             f"- started: {detail.started[:19].replace('T', ' ')} (duration "
             f"{runs.format_duration(detail.duration_s)})"]
    if detail.problem:  # events still being read (a huge file), or a file that could not be read
        lines.append(f"- note: {detail.problem}")
    if detail.resumed_at:
        lines.append(f"- resumed at step(s): {', '.join(map(str, detail.resumed_at))}")
    if detail.message:
        where = f" (field `{detail.error_field}`)" if detail.error_field else ""
        lines.append(f"- {'error' if detail.state == 'failed' else 'note'}{where}: {detail.message}")
    if detail.stderr_tail:
        tail = "\n".join(detail.stderr_tail)
        lines.append(f"\nLast lines of stderr.log:\n```\n{tail}\n```")
    return "\n".join(lines)


class RunsTab:
    """The Runs tab. `running`: ids of the runs this server is training now (None: ask the OS). `studio`:
    the server's job registry, which draws grids and sweeps (None: the tab only reads runs)."""

    def __init__(self, outputs_root: Path, running: Callable[[], set[str]] | None = None,
                 studio: Studio | None = None, settings: PageSettings | None = None):
        self.root = Path(outputs_root)
        self._running = running
        self.studio = studio
        self.settings = settings  # its datasets root holds for a run's stored config too (Resume, Rerun)
        self.scores = scores_view.ScoresSection(self.root, studio)

    def running(self) -> set[str] | None:
        return None if self._running is None else self._running()

    # --- handlers (each is also a named API endpoint) ---
    def list(self) -> tuple[Any, list[dict[str, Any]], Any]:
        rows = runs.list_runs(self.root, self.running())
        choices = [row.id for row in rows if row.state != "queued"]
        return (runs.table_rows(rows), [row.to_dict() for row in rows],
                gr.update(choices=choices))

    def open(self, run_id: str) -> dict[gr.components.Component, Any]:
        return {getattr(self, name): value for name, value in self.opened(run_id).items()}

    def opened(self, run_id: str) -> dict[str, Any]:
        """What opening a run shows, by the name of the component that shows it."""
        try:
            live = self.running()
            detail = runs.run_detail(self.root, run_id, None if live is None else run_id in live)
        except UserError as error:
            raise gr.Error(str(error)) from None
        sweep_caches(self.root)  # Gradio copies each file it offers into its cache, each time a run is opened
        files = [item["path"] for item in detail.checkpoints if item["exists"]]
        if detail.final_path and Path(detail.final_path).is_file():
            files.append(detail.final_path)
        # the hand-over: the LoRA in a ComfyUI workflow, and what the run was made of
        files.extend(str(path) for path in (Path(detail.folder) / comfyui.WORKFLOW_FILE,
                                            Path(detail.folder) / manifest.MANIFEST_FILE) if path.is_file())
        if detail.best_path:  # early stop's best LoRA
            files.append(detail.best_path)
        samples = [(item["path"], f"step {item['step']}: {item['prompt']}") for item in detail.samples
                   if Path(item["path"]).is_file()]
        data = dict(detail.__dict__)
        curves = _frame({detail.id: detail.loss_points}, validation=detail.validation_points)
        return {"summary": _detail_markdown(detail), "plot": curves, "samples": samples, "files": files or None,
                "report": detail.report_path, "detail": data}

    def run_config(self, run_id: str):
        """The config a run was started with (job_config.json, as the page started it; else the engine's
        resolved config.json, which a CLI run has), with its own folder as output_path."""
        from lora_core.configfile import load_config

        files = RunFiles(runs.resolve_run(self.root, run_id))
        job = job_of(files.folder)  # its newest page job's files (studio/jobfiles.py); none for a CLI run
        for path in ([job.job_config] if job else []) + [files.config]:
            if path.is_file():
                return load_config(path).model_copy(update={"output_path": str(files.folder)})
        raise runs.RunError(f"run {run_id!r} has no config file (job_config.json or config.json) to use")

    def resume(self, run_id: str) -> dict[str, Any]:
        """Resume a stopped run from its newest complete checkpoint, through the queue, with its own
        settings: {job_id, state, position, output_path}."""
        from studio.jobs import BusyError

        if self.studio is None:
            raise gr.Error("this page cannot start jobs (no job registry)")
        try:
            live = self.running()
            detail = runs.run_detail(self.root, run_id, None if live is None else run_id in live)
            if detail.state != "stopped":
                raise runs.RunError(f"run {run_id!r} is {detail.state}; only a stopped run can be resumed")
            config = refuse_data_paths(self.run_config(run_id), self.studio, self.settings)
            submitted = self.studio.submit(config, resume=True)
        except (UserError, BusyError, ValueError) as error:
            raise gr.Error(f"Not resumed: {error}") from None
        return submitted.to_dict()

    def rerun(self, run_id: str) -> dict[str, Any]:
        """Train a run again into a new folder with the config its manifest recorded, through the queue as Start
        does; refused, naming them, when its dataset files or packages are no longer what they were."""
        from lora_core.rerun import RerunRefused, page_config
        from studio.jobs import BusyError

        if self.studio is None:
            raise gr.Error("this page cannot start jobs (no job registry)")
        try:
            config = page_config(runs.resolve_run(self.root, run_id))
            submitted = self.studio.submit(refuse_data_paths(config, self.studio, self.settings))
        except (UserError, BusyError, ValueError, RerunRefused) as error:
            raise gr.Error(f"Not rerun: {error}") from None
        return submitted.to_dict()

    def delete(self, run_id: str, confirm: bool) -> dict[gr.components.Component, Any]:
        if not confirm:
            raise gr.Error(f"tick 'yes, delete {run_id or 'this run'}' first: deleting a run cannot be undone")
        try:
            live = self.running()
            folder = runs.delete_run(self.root, run_id, None if live is None else run_id in live)
        except UserError as error:
            raise gr.Error(str(error)) from None
        table, data, pick = self.list()
        return {self.deleted: f"deleted {folder.name}", self.table: table, self.data: data, self.pick: pick}

    def compare(self, run_ids: list[str]) -> tuple[Any, list[list[Any]], dict[str, Any]]:
        try:
            result = runs.compare_runs(self.root, list(run_ids or []))
        except UserError as error:
            raise gr.Error(str(error)) from None
        table = [[key, *(str(values[run_id]) for run_id in result["runs"])]
                 for key, values in result["differing"].items()]
        shown = gr.Dataframe(value=table, headers=["field", *result["runs"]])  # a column per run, named
        return _frame(result["curves"], smoothed=False), shown, result

    def side_by_side(self, result: dict[str, Any] | None) -> tuple[Any, Any]:
        pictures, table = scores_view.side_by_side(result)
        items = (result or {}).get("runs", [])
        return (gr.update(value=pictures, columns=max(1, len(items))),
                gr.Dataframe(value=table, headers=["figure", *items]))

    def sheet_form(self, run_id: str) -> dict[gr.components.Component, Any]:
        """The grid and sweep choices for the opened run: its saved LoRAs (the grid's default: all, capped),
        its sample prompts, the newest LoRA for the sweep, and its newest grid or sweep, if any."""
        try:
            folder = runs.resolve_run(self.root, run_id)
        except UserError:
            return {self.grid_prompts: gr.skip()}  # a dict of none is one value to Gradio, not no update
        choices = sheets.saved_choices(folder)
        prompts = "\n".join(sheets.run_prompts(runs.run_config(folder)))
        newest = sheets.newest_sheet(folder)
        def shown() -> dict[str, Any]:  # one update per component: Gradio consumes the dict it is given
            return gr.update(value=str(newest) if newest else None, visible=bool(newest))

        return {self.grid_steps: gr.update(choices=choices, value=sheets.default_steps(folder)),
                self.grid_prompts: prompts,
                self.sweep_step: gr.update(choices=choices, value=choices[-1][1] if choices else None),
                self.sheet_image: shown(), self.sheet_file: shown()}

    def drawing(self) -> dict[str, Any] | None:
        """The grid or sweep this server draws now, or the first one queued: a page opened (or reloaded) while
        it draws follows it as the page that asked for it does."""
        if self.studio is None:
            return None
        running = [job_id for job_id in self.studio.running() if TOOL_JOB.search(job_id)]
        waiting = [job["job_id"] for job in self.studio.queued() if job.get("kind") in ("grid", "sweep")]
        return {"job_id": (running + waiting)[0]} if running or waiting else None

    def grid(self, run_id: str, steps: list[str] | None, prompts: str | None) -> dict[str, Any]:
        """Queue a checkpoint x prompt grid of a run: {job_id, state, position, output_path}."""
        return self._submit("grid", run_id, lambda folder: sheets.grid_args(folder, steps, prompts))

    def sweep(self, run_id: str, step: str | None, prompts: str | None, scales: str | None) -> dict[str, Any]:
        """Queue a strength sweep of one of a run's LoRAs (default the newest): {job_id, state, ...}."""
        return self._submit("sweep", run_id, lambda folder: sheets.sweep_args(folder, step, prompts, scales))

    def _submit(self, kind: str, run_id: str, make_args: Callable[[Path], list[str]]) -> dict[str, Any]:
        from studio.jobs import BusyError

        if self.studio is None:
            raise gr.Error("this page cannot draw grids (no job registry)")
        try:
            folder = runs.resolve_run(self.root, run_id)
            submitted = self.studio.submit_tool(kind, folder, make_args(folder))
        except (UserError, BusyError, ValueError) as error:
            raise gr.Error(f"No {kind} queued: {error}") from None
        return submitted.to_dict()

    def follow(self, submitted: dict[str, Any] | None) -> Iterator[tuple[Any, ...]]:
        """The grid or sweep job's progress while it waits and draws, then its PNG (shown and downloadable)."""
        if not submitted or self.studio is None:
            return
        kind = "sweep" if "-sweep-" in submitted["job_id"] else "grid"  # see TOOL_JOB
        while True:
            view = self.studio.view(submitted["job_id"])
            if not (view.active or view.state == "queued"):
                break
            yield scores_view.job_status(view, kind), gr.skip(), gr.skip()
            time.sleep(FOLLOW_TICK_S)
        if view.state == "complete" and view.final_path:
            yield (scores_view.job_status(view, kind), gr.update(value=view.final_path, visible=True),
                   gr.update(value=view.final_path, visible=True))
        else:
            yield scores_view.job_status(view, kind), gr.skip(), gr.skip()

    # --- layout ---
    def build(self) -> None:
        with gr.Tab("Runs", elem_id="tab-runs"):
            self.refresh_button = gr.Button("Refresh list", elem_id="runs-refresh")
            self.table = gr.Dataframe(headers=runs.TABLE_HEADERS, interactive=False, elem_id="runs-table",
                                      wrap=True)
            self.data = gr.JSON(visible=False)
            with gr.Row():
                self.pick = gr.Dropdown(label="Run", choices=[], elem_id="runs-pick", scale=3,
                                        allow_custom_value=True)  # runs.resolve_run checks the id
                self.open_button = gr.Button("Open", scale=1, elem_id="runs-open")
            self.summary = gr.Markdown(elem_id="run-summary")
            self.plot = gr.LinePlot(x="step", y="loss", color="line", title="Loss", height=260,
                                    elem_id="run-loss")
            self.samples = gr.Gallery(label="Samples by step", columns=4, height=240, elem_id="run-samples",
                                      elem_classes=["ls-pixels"])
            self.files = gr.File(label="Checkpoints, final LoRA, ComfyUI workflow, manifest", file_count="multiple",
                                 interactive=False, elem_id="run-files")
            self.report = gr.File(label="HTML report", interactive=False, elem_id="run-report")
            self.detail = gr.JSON(label="Run details", visible=False)
            self.scores.build()
            with gr.Row():
                self.confirm = gr.Checkbox(label="yes, delete this run's folder", value=False,
                                           elem_id="runs-confirm")
                self.delete_button = gr.Button("Delete run", variant="stop", elem_id="runs-delete")
            with gr.Row():
                self.clone_button = gr.Button("Clone into the Train form", elem_id="runs-clone")
                self.resume_button = gr.Button("Resume this run", elem_id="runs-resume")
                self.rerun_button = gr.Button("Rerun into a new folder", elem_id="runs-rerun")
            self.resumed = gr.JSON(visible=False)
            self.deleted = gr.Markdown()
            self._sheet_section()
            gr.Markdown("#### Compare")
            with gr.Row():
                self.compare_pick = gr.Dropdown(label="Runs (or checkpoints, RUN@STEP) to compare", choices=[],
                                                multiselect=True, scale=3,
                                                allow_custom_value=True, elem_id="compare-pick")
                self.compare_button = gr.Button("Compare", scale=1, elem_id="compare")
            self.compare_plot = gr.LinePlot(x="step", y="loss", color="line", title="Loss by step",
                                            height=260, elem_id="compare-plot")
            self.compare_table = gr.Dataframe(headers=["field", "values"], interactive=False,
                                              elem_id="compare-table")
            self.compare_data = gr.JSON(visible=False)
            self.compare_pictures = gr.Gallery(label="Side by side: samples at the same prompts (and seeds)",
                                               columns=2, height=320, elem_id="compare-pictures")
            self.compare_scores = gr.Dataframe(headers=["figure", "values"], interactive=False,
                                               elem_id="compare-scores")

    def _sheet_section(self) -> None:
        with gr.Group(elem_id="pick-best"):
            gr.Markdown("#### Pick the best LoRA\nEach cell is the base model with a saved LoRA loaded as "
                        "diffusers loads it, every cell with the same seed. The PNG is kept in the run folder.")
            with gr.Row():
                self.grid_steps = gr.Dropdown(label="Checkpoints (rows)", choices=[], multiselect=True, scale=3,
                                              allow_custom_value=True, elem_id="grid-steps")  # sheets checks
                self.grid_prompts = gr.Textbox(label="Prompts (columns), one per line", lines=2, scale=3,
                                               elem_id="grid-prompts")
                self.grid_button = gr.Button("Make grid", scale=1, elem_id="grid-make")
            with gr.Row():
                self.sweep_step = gr.Dropdown(label="Sweep of", choices=[], scale=2, elem_id="sweep-step",
                                          allow_custom_value=True)
                self.sweep_scales = gr.Textbox(sheets.DEFAULT_SCALES, label="LoRA scales (0 = the base model)",
                                               scale=2, elem_id="sweep-scales")
                self.sweep_button = gr.Button("Make sweep", scale=1, elem_id="sweep-make")
            self.sheet_job = gr.JSON(visible=False)
            self.sheet_state = gr.HTML(elem_id="sheet-progress")
            self.sheet_image = gr.Image(label="Grid or sweep", type="filepath", interactive=False,
                                        elem_id="sheet-image", visible=False)  # shown once there is one
            self.sheet_file = gr.File(label="Download the PNG", interactive=False, elem_id="sheet-file",
                                      visible=False)

    def wire(self, demo: gr.Blocks) -> None:
        listed = [self.table, self.data, self.pick]
        self.refresh_button.click(self.list, None, listed, api_name="runs")
        demo.load(self.list, None, listed, api_name=False)
        opened = self.open_button.click(self.open, self.pick, [self.summary, self.plot, self.samples, self.files,
                                                               self.report, self.detail], api_name="open_run")
        opened.then(self.scores.opened, self.pick, self.scores.wire(demo, self.pick), api_name=False)  # and Score
        opened.then(self.sheet_form, self.pick, [self.grid_steps, self.grid_prompts, self.sweep_step,
                                                 self.sheet_image, self.sheet_file], api_name=False)
        control = dict(concurrency_id="control", concurrency_limit=None)  # as Start: never behind the polls
        shown = [self.sheet_state, self.sheet_image, self.sheet_file]
        for event in (self.grid_button.click(self.grid, [self.pick, self.grid_steps, self.grid_prompts],
                                             self.sheet_job, api_name="grid", **control),
                      self.sweep_button.click(self.sweep, [self.pick, self.sweep_step, self.grid_prompts,
                                                           self.sweep_scales], self.sheet_job, api_name="sweep",
                                              **control)):
            event.then(self.follow, self.sheet_job, shown, api_name=False, concurrency_id="follow",
                       concurrency_limit=None, show_progress="hidden")
        demo.load(self.drawing, None, self.sheet_job, api_name=False, concurrency_id="poll",
                  concurrency_limit=None).then(  # a reloaded page sees it draw
            self.follow, self.sheet_job, shown, api_name=False, concurrency_id="follow", concurrency_limit=None,
            show_progress="hidden")
        self.resume_button.click(self.resume, self.pick, self.resumed, api_name="resume_run",
                                 concurrency_id="control", concurrency_limit=None).then(
            self.list, None, listed, api_name=False)
        self.rerun_button.click(self.rerun, self.pick, self.resumed, api_name="rerun_run",
                                concurrency_id="control", concurrency_limit=None).then(
            self.list, None, listed, api_name=False)
        self.delete_button.click(self.delete, [self.pick, self.confirm], [self.deleted, *listed],
                                 api_name="delete_run")
        self.data.change(lambda data: gr.update(choices=[row["id"] for row in data or []
                                                         if row["state"] != "queued"]),
                         self.data, self.compare_pick, api_name=False)
        self.compare_button.click(self.compare, self.compare_pick, [self.compare_plot, self.compare_table,
                                                                    self.compare_data], api_name="compare").then(
            self.side_by_side, self.compare_data, [self.compare_pictures, self.compare_scores], api_name=False)
