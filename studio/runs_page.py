"""The page's Runs tab: every run in the outputs folder, one run opened, Delete and Compare.

Built from studio/runs.py (each run's own files), so it shows CLI runs and runs of earlier servers too.
Its named API endpoints: `runs`, `open_run` (by run id; the jobs API's `run` takes a job id), `delete_run`, `compare`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import gradio as gr

from lora_core.errors import UserError
from studio import runs

SMOOTHING = 0.9  # exponential moving average of the loss, as the report draws it


def _frame(curves: dict[str, list[tuple[int, float]]], smoothed: bool = True,
           validation: list[tuple[int, float]] = ()):
    """Rows of (step, loss, line): each run's curve (raw and smoothed), and the held-out images' loss."""
    import pandas as pd

    rows: list[dict[str, Any]] = [{"step": step, "loss": loss, "line": "validation (held-out)"}
                                  for step, loss in validation]
    for name, points in curves.items():
        average = points[0][1] if points else 0.0
        for step, loss in points:
            rows.append({"step": step, "loss": loss, "line": f"{name} raw" if smoothed else name})
            if smoothed:
                average = SMOOTHING * average + (1 - SMOOTHING) * loss
                rows.append({"step": step, "loss": average, "line": f"{name} smoothed"})
    return pd.DataFrame(rows, columns=["step", "loss", "line"])


def _detail_markdown(detail: runs.RunDetail) -> str:
    lines = [f"### {detail.id}: {detail.state}",
             f"- base model: `{detail.base_model}`", f"- steps: {detail.step} / {detail.total_steps}",
             f"- last loss: {'' if detail.loss is None else f'{detail.loss:.4g}'}",
             f"- started: {detail.started[:19].replace('T', ' ')} (duration "
             f"{runs.format_duration(detail.duration_s)})"]
    if detail.resumed_at:
        lines.append(f"- resumed at step(s): {', '.join(map(str, detail.resumed_at))}")
    if detail.message:
        where = f" (field `{detail.error_field}`)" if detail.error_field else ""
        lines.append(f"- {'error' if detail.state == 'failed' else 'note'}{where}: {detail.message}")
    if detail.stderr_tail:
        lines.append(f"\nLast lines of stderr.log:\n```\n{detail.stderr_tail}\n```")
    return "\n".join(lines)


class RunsTab:
    """The Runs tab. `running`: ids of the runs this server is training now (None: ask the OS)."""

    def __init__(self, outputs_root: Path, running: Callable[[], set[str]] | None = None):
        self.root = Path(outputs_root)
        self._running = running

    def running(self) -> set[str] | None:
        return None if self._running is None else self._running()

    # --- handlers (each is also a named API endpoint) ---
    def list(self) -> tuple[Any, list[dict[str, Any]], Any]:
        rows = runs.list_runs(self.root, self.running())
        choices = [row.id for row in rows if row.state != "queued"]
        return (runs.table_rows(rows), [row.to_dict() for row in rows],
                gr.update(choices=choices))

    def open(self, run_id: str) -> tuple[Any, ...]:
        try:
            live = self.running()
            detail = runs.run_detail(self.root, run_id, None if live is None else run_id in live)
        except UserError as error:
            raise gr.Error(str(error)) from None
        files = [item["path"] for item in detail.checkpoints if item["exists"]]
        if detail.final_path and Path(detail.final_path).is_file():
            files.append(detail.final_path)
        samples = [(item["path"], f"step {item['step']}: {item['prompt']}") for item in detail.samples
                   if Path(item["path"]).is_file()]
        data = dict(detail.__dict__)
        curves = _frame({detail.id: detail.loss_points}, validation=detail.validation_points)
        return _detail_markdown(detail), curves, samples, files or None, detail.report_path, data

    def delete(self, run_id: str, confirm: bool) -> tuple[str, Any, list[dict[str, Any]], Any]:
        if not confirm:
            raise gr.Error(f"tick 'yes, delete {run_id or 'this run'}' first: deleting a run cannot be undone")
        try:
            live = self.running()
            folder = runs.delete_run(self.root, run_id, None if live is None else run_id in live)
        except UserError as error:
            raise gr.Error(str(error)) from None
        return (f"deleted {folder.name}", *self.list())

    def compare(self, run_ids: list[str]) -> tuple[Any, list[list[Any]], dict[str, Any]]:
        try:
            result = runs.compare_runs(self.root, list(run_ids or []))
        except UserError as error:
            raise gr.Error(str(error)) from None
        table = [[key, *(str(values[run_id]) for run_id in result["runs"])]
                 for key, values in result["differing"].items()]
        return _frame(result["curves"], smoothed=False), table, result

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
            self.samples = gr.Gallery(label="Samples by step", columns=4, height=240, elem_id="run-samples")
            self.files = gr.File(label="Checkpoints and final LoRA", file_count="multiple", interactive=False,
                                 elem_id="run-files")
            self.report = gr.File(label="HTML report", interactive=False, elem_id="run-report")
            self.detail = gr.JSON(label="Run details", visible=False)
            with gr.Row():
                self.confirm = gr.Checkbox(label="yes, delete this run's folder", value=False,
                                           elem_id="runs-confirm")
                self.delete_button = gr.Button("Delete run", variant="stop", elem_id="runs-delete")
            self.deleted = gr.Markdown()
            gr.Markdown("#### Compare")
            with gr.Row():
                self.compare_pick = gr.Dropdown(label="Runs to compare", choices=[], multiselect=True, scale=3,
                                                allow_custom_value=True, elem_id="compare-pick")
                self.compare_button = gr.Button("Compare", scale=1, elem_id="compare")
            self.compare_plot = gr.LinePlot(x="step", y="loss", color="line", title="Loss by step",
                                            height=260, elem_id="compare-plot")
            self.compare_table = gr.Dataframe(headers=["field", "values"], interactive=False,
                                              elem_id="compare-table")
            self.compare_data = gr.JSON(visible=False)

    def wire(self, demo: gr.Blocks) -> None:
        listed = [self.table, self.data, self.pick]
        self.refresh_button.click(self.list, None, listed, api_name="runs")
        demo.load(self.list, None, listed, api_name=False)
        self.open_button.click(self.open, self.pick, [self.summary, self.plot, self.samples, self.files,
                                                      self.report, self.detail], api_name="open_run")
        self.delete_button.click(self.delete, [self.pick, self.confirm], [self.deleted, *listed],
                                 api_name="delete_run")
        self.data.change(lambda data: gr.update(choices=[row["id"] for row in data or []
                                                         if row["state"] != "queued"]),
                         self.data, self.compare_pick, api_name=False)
        self.compare_button.click(self.compare, self.compare_pick, [self.compare_plot, self.compare_table,
                                                                    self.compare_data], api_name="compare")
