#!/usr/bin/env python3
"""LoRA Studio: a web page over lora_core that trains a Stable Diffusion LoRA in the background.

The page only builds configs, asks the process's `Studio` (studio/jobs.py) to start or stop a job, and
polls what the job reports. Every job is a child process of its own (`python -m lora_core train`), so
closing the tab does not stop training, any page opened later shows the running or finished job, and a
restarted server finds a job that is still training and shows it again.

    python webui.py                 # http://127.0.0.1:7860
    python webui.py --demo          # the form pre-filled with the tiny CPU demo
    python webui.py --host 0.0.0.0 --auth me:secret
    python webui.py --detach-jobs   # on SIGTERM, leave running jobs training (a later server finds them)
"""

from __future__ import annotations

import argparse
import html
import json
import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr

from lora_core.config import ConfigError, TrainConfig
from lora_core.configfile import load_config, parse_config
from lora_core.files import atomic_write_text
from studio import auth
from studio.formspec import (
    LENGTH_CHOICES,
    FieldSpec,
    advanced_tabs,
    config_file_dict,
    config_to_form,
    field_specs,
    form_to_config_dict,
    split_list,
)
from studio.jobs import RUN_NAME, BusyError, RunView, Studio
from studio.runs_page import RunsTab, plot_frame
from studio.uploads import UploadError, UploadLimits, ingest, remove_unused

log = logging.getLogger("webui")

ROOT = Path(__file__).resolve().parent
PRESETS = ROOT / "presets"
DEMO_PRESET = PRESETS / "demo-toy-cpu.json"
SHIPPED_PRESETS = {"demo-toy-cpu", "sd15-character", "sd15-style", "sdxl-character"}
USER_PRESETS = ".presets"  # under the outputs folder, so a read-only install can save presets; no run is named so
OUTPUTS_ENV, AUTH_ENV, DATASETS_ENV = "LORA_STUDIO_OUTPUTS", "LORA_STUDIO_AUTH", "LORA_STUDIO_DATASETS"
DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
UPLOAD_TYPES = [".png", ".jpg", ".jpeg", ".webp", ".bmp", ".txt", ".zip"]
ACTIVE_TICK_S, IDLE_TICK_S = 1.0, 3.0
FINAL_LABEL = "Download LoRA (.safetensors)"
# The form: the page's own widgets, then one per optional config field. Handlers get these as keywords.
PAGE_KEYS = ["dataset_path", "trigger_words", "base_model", "run_name", "length_by"]
SPECS = field_specs()
FORM_KEYS = PAGE_KEYS + [spec.name for spec in SPECS]

CSS = """
.ls-status {padding: 10px 12px; border-radius: 8px; border: 1px solid var(--border-color-primary);}
.ls-bar {height: 14px; border-radius: 7px; background: var(--background-fill-secondary); overflow: hidden;}
.ls-fill {height: 100%; background: var(--color-accent); transition: width .4s;}
.ls-complete .ls-fill {background: #16a34a;} .ls-error .ls-fill, .ls-interrupted .ls-fill {background: #d97706;}
.ls-line {margin-top: 6px; font-variant-numeric: tabular-nums;}
.ls-message {margin-top: 6px; white-space: pre-wrap;} .ls-error .ls-message {color: #b91c1c;}
"""


@dataclass
class PageSettings:
    """What the page starts with and what it accepts, decided at launch."""

    initial: dict[str, Any]  # form values
    upload_limits: UploadLimits
    datasets_root: Path | None = None  # when set, server folders must be inside it (uploads always allowed)


# ----------------------------------------------------------------------------------------------------
# form values and configs


def default_form(config: TrainConfig | None = None, run_name: str = "my-lora") -> dict[str, Any]:
    """Form values for a config (or the model's defaults with the SD 1.5 hub model)."""
    if config is None:
        values = {spec.name: _display_default(spec) for spec in SPECS}
        return {"dataset_path": "", "trigger_words": "", "base_model": DEFAULT_MODEL, "run_name": run_name,
                "length_by": "steps", **values}
    values, length_by = config_to_form(config)
    values["run_name"] = Path(config.output_path).name or run_name
    values["length_by"] = length_by
    return {key: values[key] for key in FORM_KEYS}


def _display_default(spec: FieldSpec) -> Any:
    return "\n".join(spec.default) if isinstance(spec.default, list) else spec.default


def build_config(form: dict[str, Any], studio: Studio, settings: PageSettings) -> TrainConfig:
    """The config the form describes; ConfigError names each bad field with the CLI's message."""
    problems = []
    data = form_to_config_dict(form, form.get("length_by") or "steps")
    try:
        data["output_path"] = str(studio.run_folder(str(form.get("run_name") or "")))
    except ValueError as error:
        problems.append(("run_name", str(error)))
    if reason := _dataset_folder_problem(str(form.get("dataset_path") or ""), studio, settings):
        problems.append(("dataset_path", reason))
    try:
        config = parse_config(data, strict=False)  # the widgets give numbers as floats
    except ConfigError as error:
        problems = error.problems + problems
    if problems:
        raise ConfigError(problems)
    return config


def _dataset_folder_problem(folder: str, studio: Studio, settings: PageSettings) -> str | None:
    if not folder or settings.datasets_root is None:
        return None
    path = Path(folder).expanduser().resolve()
    if path.is_relative_to(settings.datasets_root) or path.is_relative_to(studio.outputs_root):
        return None
    return f"this server only trains on uploads or folders inside {settings.datasets_root}; upload the images instead"


def field_of(problem_field: str) -> str:
    """The form key a config problem belongs to (`trigger_words.0` -> trigger_words)."""
    top = problem_field.split(".")[0]
    return {"output_path": "run_name", "training_params": "steps"}.get(top, top)


def validation(form: dict[str, Any], studio: Studio, settings: PageSettings) -> list[dict]:
    """One gr.validate per form input, in FORM_KEYS order (the order the inputs are wired in)."""
    messages: dict[str, list[str]] = {}
    try:
        build_config(form, studio, settings)
    except ConfigError as error:
        for field, message in error.problems:
            key = field_of(field)
            if key not in FORM_KEYS:  # a field the form does not show: say which, at the first field
                key, message = FORM_KEYS[0], f"{field}: {message}"
            messages.setdefault(key, []).append(message)
    return [gr.validate(key not in messages, "; ".join(messages.get(key, []))) for key in FORM_KEYS]


def dataset_problem(form: dict[str, Any], studio: Studio, settings: PageSettings) -> tuple[str, str] | None:
    """(field, why) when the form's dataset cannot be trained on: the scan's message, or the hold-out's for
    the validation loss (holding out every image, a missing validation folder); None when it can. A form whose
    config is invalid is left to `validation`."""
    from lora_core import dataset, holdout

    try:
        config = build_config(form, studio, settings)
    except ConfigError:
        return None
    try:
        holdout.split(dataset.scan(config.dataset_path, config.trigger_words, config.trigger_placement), config)
    except dataset.DatasetError as error:
        return "dataset_path", f"{error} (nothing was queued)"
    except holdout.HeldOutError as error:
        return error.field, f"{error} (nothing was queued)"
    return None


def words_to_clear(previous_dataset: str, trigger_words: str, sample_prompts: str) -> str:
    """What an upload clears, in words ("" for nothing): the trigger words and sample prompts in the form
    when it already had a dataset, since they were that dataset's. With no dataset before, the user typed
    them for this upload, and they stay."""
    if not (previous_dataset or "").strip():
        return ""
    parts = []
    if (trigger_words or "").strip():
        parts.append(f"the trigger words {_code(trigger_words.strip())}")
    if prompts := split_list("sample_prompts", sample_prompts or ""):
        parts.append(f"{len(prompts)} sample prompt{'s' if len(prompts) > 1 else ''}")
    return " and ".join(parts)


def preset_names(studio: Studio | None = None) -> list[str]:
    """The shipped presets and the user's own (under the outputs folder)."""
    folders = [PRESETS] + ([studio.outputs_root / USER_PRESETS] if studio is not None else [])
    return sorted({path.stem for folder in folders for path in folder.glob("*.json")})


def preset_path(name: str, studio: Studio) -> Path:
    user = studio.outputs_root / USER_PRESETS / f"{Path(name).name}.json"
    return user if user.is_file() and Path(name).name not in SHIPPED_PRESETS else PRESETS / f"{Path(name).name}.json"


# ----------------------------------------------------------------------------------------------------
# what the page shows


def _code(text: str) -> str:
    """Inline code for a name a client chose (a backtick in it would end the code span)."""
    return "`" + str(text).replace("`", "'") + "`"


def dataset_markdown(scan_report, upload_report=None) -> str:
    lines = [f"**{len(scan_report.images)} images**, {scan_report.captioned} with a caption file, in "
             f"{_code(scan_report.folder)}"]
    sizes = sorted({f"{r.width}×{r.height}" for r in scan_report.images})
    lines.append(f"Sizes: {', '.join(sizes[:8])}{' …' if len(sizes) > 8 else ''}")
    refused = list(upload_report.refused if upload_report else []) + scan_report.refused
    if refused:
        lines.append(f"**Refused ({len(refused)}):**")
        lines += [f"- {_code(item['file'])}: {item['reason']}" for item in refused]
    if upload_report and upload_report.notes:
        lines += [f"- {note}" for note in upload_report.notes]
    if scan_report.ignored:
        lines.append(f"Ignored (not images): {', '.join(_code(name) for name in scan_report.ignored[:20])}")
    return "\n\n".join(lines)


def _duration(seconds: float) -> str:
    if seconds < 0:
        return "…"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


STATE_WORDS = {"idle": "No training yet", "queued": "Queued: waiting for the device",
               "preparing": "Preparing: loading the model and caching the dataset",
               "running": "Training", "stopping": "Stopping after this step (a checkpoint is saved)",
               "finishing": "Finishing: writing the report and releasing the device",
               "complete": "Done", "interrupted": "Stopped", "error": "Failed"}


def status_html(view: RunView, earlier: bool = False) -> str:
    """The run's state, progress and message. `earlier`: a finished run this page has moved on from (it has
    another dataset now): shown as the last run, not as the current state."""
    if earlier and view.finished:
        word = {"complete": "finished", "interrupted": "was stopped", "error": "failed"}[view.state]
        note = (f"Ready to start. The last run, {Path(view.output_path).name}, {word}; "
                "the Runs tab has its details.")
        return (f'<div class="ls-status ls-idle" id="run-status" data-state="idle" data-percent="0" '
                f'data-step="0"><div class="ls-line">{html.escape(note)}</div></div>')
    parts = [STATE_WORDS[view.state]]
    if view.total_steps:
        parts.append(f"step {view.step} / {view.total_steps}")
        parts.append(f"{view.percent:g} %")
    if view.loss is not None:
        parts.append(f"loss {view.loss:.4f}")
    if view.state == "running":
        parts += [f"{view.it_per_s:.2f} it/s", f"ETA {_duration(view.eta_s)}"]
    if view.device:
        parts.append(f"{view.model_family} on {view.device}")
    if view.resumed_at:
        parts.append("resumed at step " + ", ".join(map(str, view.resumed_at)))
    message = view.message
    if view.state == "error" and view.error_field:
        message = f"Problem with {view.error_field}: {message}"
    if view.output_path and view.state != "idle":
        message = (message + "\n" if message else "") + f"Output folder: {view.output_path}"
    return (f'<div class="ls-status ls-{view.state}" id="run-status" data-state="{view.state}" '
            f'data-percent="{view.percent:g}" data-step="{view.step}">'
            f'<div class="ls-bar"><div class="ls-fill" style="width:{min(view.percent, 100):.2f}%"></div></div>'
            f'<div class="ls-line">{html.escape(" · ".join(parts))}</div>'
            f'<div class="ls-message">{html.escape(message)}</div></div>')


def loss_frame(view: RunView):
    """The live plot's training loss. The held-out loss is the opened run's second curve (Runs tab), the
    report's and TensorBoard's: with a colour per series, gradio's live plot (first drawn empty, then updated
    by the timer) drew no line at all."""
    return plot_frame([(step, loss, "training") for step, loss in view.curve()])


def run_summary(view: RunView) -> dict[str, Any]:
    return {"job_id": view.job_id, "state": view.state, "step": view.step, "total_steps": view.total_steps,
            "percent": view.percent, "loss": view.loss, "output_path": view.output_path,
            "final_path": view.final_path, "checkpoints": [path for _, path in view.checkpoints],
            "samples": [path for path, _, _ in view.samples], "message": view.message,
            "error_field": view.error_field, "stderr_tail": view.stderr_tail, "resumed_at": view.resumed_at,
            "saved_so_far": view.saved_so_far}


# ----------------------------------------------------------------------------------------------------
# the page


def _widget(spec: FieldSpec, value: Any) -> gr.components.Component:
    info = spec.description + (f" Allowed: {spec.range_text}." if spec.range_text else "")
    common = dict(label=spec.label, info=info, elem_id=f"field-{spec.name}", min_width=180)
    if spec.kind == "slider":
        return gr.Slider(minimum=spec.minimum, maximum=spec.maximum, step=spec.step, value=value, **common)
    if spec.kind == "dropdown":
        return gr.Dropdown(choices=list(spec.choices or ()), value=value, **common)
    if spec.kind == "checkbox":
        return gr.Checkbox(value=value, **common)
    if spec.kind == "number":
        # No minimum/maximum here: Gradio would refuse out-of-range values with its own message before
        # the model's check runs; the model's range is in `info` and its message shows at the field.
        step = spec.step or (1 if (value or 0) >= 1 else 0.01)
        return gr.Number(value=value, precision=0 if spec.integer else None, step=step, **common)
    return gr.Textbox(value=value, lines=3 if spec.kind == "lines" else 1, **common)


class StudioPage:
    """The Gradio page: layout methods build the sections, handler methods answer the events.

    Handlers read and change only the `Studio` (which owns the job) and files under the outputs folder.
    """

    def __init__(self, studio: Studio, settings: PageSettings):
        self.studio, self.settings = studio, settings
        self.fields: dict[str, gr.components.Component] = {}

    # --- layout ---
    def build(self) -> gr.Blocks:
        with gr.Blocks(title="LoRA Studio", analytics_enabled=False) as demo:
            gr.Markdown("# LoRA Studio\nTrain a Stable Diffusion LoRA: add images, pick a model, start, and "
                        "download the `.safetensors`. Training runs on the server; you can close this tab.")
            with gr.Tab("Train", elem_id="tab-train"), gr.Row(equal_height=False):
                with gr.Column(scale=3):
                    self._dataset_section()
                    self._model_section()
                    self._parameters_section()
                with gr.Column(scale=2):
                    self._train_section()
            self.runs_tab = RunsTab(self.studio.outputs_root, studio=self.studio)  # the OS says what runs
            self.runs_tab.build()
            self.form = {key: self.fields[key] for key in FORM_KEYS}
            self._wire(demo)
            self.runs_tab.wire(demo)
            self.runs_tab.clone_button.click(self.clone, self.runs_tab.pick, list(self.form.values()),
                                             api_name="clone").then(
                self.folder_note_text, self.fields["run_name"], self.folder_note, api_name=False)
        return demo

    def _dataset_section(self) -> None:
        initial = self.settings.initial
        with gr.Group():
            gr.Markdown("### 1 · Dataset")
            self.uploads = gr.File(label="Upload images with .txt captions, or one .zip", file_count="multiple",
                                   file_types=UPLOAD_TYPES, height=150, elem_id="upload")
            with gr.Row():
                self.fields["dataset_path"] = gr.Textbox(
                    value=initial["dataset_path"], label="Dataset folder on the server", scale=4,
                    info="Filled in by an upload; or type a folder of images and .txt captions.",
                    elem_id="field-dataset_path")
                self.scan_button = gr.Button("Scan folder", scale=1)
            self.fields["trigger_words"] = gr.Textbox(
                value=initial["trigger_words"], label="Trigger words", elem_id="field-trigger_words",
                info="Comma-separated; put in front of every caption (or the caption where none).")
            report, thumbnails = self.initial_dataset()
            self.dataset_report = gr.Markdown(report, elem_id="dataset-report")
            self.thumbs = gr.Gallery(thumbnails, label="Dataset", columns=6, height=170, object_fit="cover",
                                     elem_id="dataset-gallery")

    def _model_section(self) -> None:
        from studio.preview import HUB_MODELS

        with gr.Group():
            gr.Markdown("### 2 · Model")
            self.fields["base_model"] = gr.Dropdown(
                choices=[*_builtin_names(), *HUB_MODELS], value=self.settings.initial["base_model"],
                allow_custom_value=True, label="Base model", elem_id="field-base_model",
                info="A built-in model, a Hugging Face hub id, a local diffusers folder or a .safetensors file.")
            self.model_family = gr.Markdown("", elem_id="model-family")

    def _parameters_section(self) -> None:
        initial = self.settings.initial
        groups = {group: [s for s in SPECS if s.group == group] for group in ("basic", "sampling", "advanced")}
        with gr.Group():
            gr.Markdown("### 3 · Parameters")
            with gr.Row():
                self.preset = gr.Dropdown(choices=preset_names(self.studio), value=None, label="Preset", scale=3,
                                          elem_id="preset")
                with gr.Column(scale=3):
                    self.fields["run_name"] = gr.Textbox(value=initial["run_name"], label="Run name",
                                                         info="The output folder's name.", elem_id="field-run_name")
                    self.folder_note = gr.Markdown(self.folder_note_text(initial["run_name"]),
                                                   elem_id="run-folder")
            self.fields["length_by"] = gr.Radio(list(LENGTH_CHOICES), value=initial["length_by"],
                                                label="Run length set by", elem_id="field-length_by")
            for row in range(0, len(groups["basic"]), 3):
                with gr.Row():
                    for spec in groups["basic"][row:row + 3]:
                        self.fields[spec.name] = _widget(spec, initial[spec.name])
            with gr.Accordion("Samples", open=False, elem_id="group-sampling"):
                for spec in groups["sampling"]:
                    self.fields[spec.name] = _widget(spec, initial[spec.name])
            with gr.Accordion("Advanced", open=False, elem_id="group-advanced"), gr.Tabs():
                for title, specs in advanced_tabs(SPECS).items():
                    slug = title.lower().replace(" ", "-")
                    with gr.Tab(title, elem_id=f"advanced-{slug}"):
                        for row in range(0, len(specs), 2):  # two columns: a tab is as tall as half its fields
                            with gr.Row():
                                for spec in specs[row:row + 2]:
                                    self.fields[spec.name] = _widget(spec, initial[spec.name])
            with gr.Row():
                self.preset_name = gr.Textbox(label="Save as preset named", scale=3, elem_id="preset-name")
                self.save_preset_button = gr.Button("Save preset", scale=1)
                self.export_button = gr.Button("Make config file", scale=1)
            self.config_file = gr.File(label="Config file for train_lora.py --config", visible=False,
                                       interactive=False, elem_id="config-file")

    def _train_section(self) -> None:
        gr.Markdown("### 4 · Train")
        with gr.Row():
            self.start_button = gr.Button("Start training", variant="primary", elem_id="start")
            self.estimate_button = gr.Button("Check device and memory", elem_id="estimate-button")
        with gr.Row():
            self.stop_button = gr.Button("Stop", variant="stop", interactive=False, elem_id="stop")
            self.resume_button = gr.Button("Resume last run", interactive=False, elem_id="resume")
        self.estimate_report = gr.Markdown("", elem_id="estimate")
        self.status = gr.HTML(status_html(self.studio.view()), elem_id="status")
        # the series are named up front: a plot first drawn from an empty frame (before the first step) drew
        # no line for series it had not seen then
        self.plot = gr.LinePlot(x="step", y="loss", title="Loss", height=240, elem_id="loss-plot",
                                x_title="step", y_title="loss (mean since the last point)")
        self.samples = gr.Gallery(label="Samples", columns=3, height=260, object_fit="contain", elem_id="samples")
        self.checkpoints = gr.File(label="Checkpoints", file_count="multiple", interactive=False,
                                   elem_id="checkpoints")
        self.final = gr.DownloadButton(FINAL_LABEL, visible=False, variant="primary", elem_id="download-final")
        with gr.Accordion("Queue", open=True, elem_id="queue"):
            self.queue_table = gr.Dataframe(headers=["#", "job", "run folder", "queued at"], value=[],
                                            interactive=False, elem_id="queue-table")
            with gr.Row():
                self.queue_pick = gr.Dropdown(choices=[], label="Queued job", scale=3, elem_id="queue-pick")
                self.move_up_button = gr.Button("Move up", scale=1, elem_id="queue-move-up")
                self.cancel_button = gr.Button("Cancel", scale=1, variant="stop", elem_id="queue-cancel")
        self.run_state = gr.JSON(visible=False)
        self.job_info = gr.JSON(visible=False)  # what Start answered: job id, running or queued, position
        self.seen = gr.State(None)
        self.timer = gr.Timer(IDLE_TICK_S)

    # --- events ---
    def _wire(self, demo: gr.Blocks) -> None:
        fields, form = self.fields, self.form
        live = [self.status, self.plot, self.samples, self.checkpoints, self.final, self.start_button,
                self.stop_button, self.resume_button, self.run_state, self.timer, self.seen, self.queue_table,
                self.queue_pick]
        dataset_in = [fields["dataset_path"], fields["trigger_words"]]
        words = [fields["trigger_words"], fields["sample_prompts"]]
        self.uploads.upload(self.upload, [self.uploads, fields["trigger_words"], fields["dataset_path"],
                                          fields["sample_prompts"], self.seen],
                            [fields["dataset_path"], self.dataset_report, self.thumbs, *words, self.seen],
                            api_name="upload").then(self.refresh, self.seen, live, api_name=False,
                                                    show_progress="hidden")
        fields["run_name"].change(self.folder_note_text, fields["run_name"], self.folder_note, api_name="run_folder",
                                  show_progress="hidden")
        gr.on([self.scan_button.click, fields["dataset_path"].submit], self.scan, dataset_in,
              [self.dataset_report, self.thumbs], api_name="scan")
        fields["base_model"].change(self.describe_model, fields["base_model"], self.model_family,
                                    api_name="model_family")
        fields["length_by"].change(self.length_fields, fields["length_by"], [fields["steps"], fields["epochs"]],
                                   api_name=False)
        self.preset.input(self.load_preset, [self.preset, fields["dataset_path"]], list(form.values()),
                          api_name="load_preset")
        self.save_preset_button.click(self.save_preset, [self.preset_name], self.preset, inputs_kwargs=form,
                                      validator=self.validate_named, api_name="save_preset")
        self.export_button.click(self.export_config, inputs_kwargs=form, outputs=self.config_file,
                                 validator=self.validate, api_name="export_config")
        self.estimate_button.click(self.estimate, inputs_kwargs=form, outputs=self.estimate_report,
                                   validator=self.validate, api_name="estimate")
        # Control actions have their own concurrency group and no limit (the Studio's lock orders them),
        # polls another: however many pages poll, Start and Stop are answered (demo.queue has no max_size).
        control = dict(concurrency_id="control", concurrency_limit=None)
        for event in (self.start_button.click(self.start, inputs_kwargs=form, outputs=self.job_info,
                                              validator=self.validate_start, api_name="start", **control),
                      self.stop_button.click(self.stop, outputs=self.job_info, api_name="stop", **control),
                      self.resume_button.click(self.resume, inputs_kwargs=form, outputs=self.job_info,
                                               validator=self.validate, api_name="resume", **control),
                      self.cancel_button.click(self.cancel, self.queue_pick, self.job_info, api_name=False,
                                               **control),
                      self.move_up_button.click(self.move_up, self.queue_pick, self.job_info, api_name=False,
                                                **control)):
            event.then(self.refresh, None, live, api_name=False, show_progress="hidden").then(
                self.folder_note_text, fields["run_name"], self.folder_note, api_name=False, show_progress="hidden")
        gr.api(self.queue_list, api_name="queue", **control)
        gr.api(self.run, api_name="run", concurrency_id="poll", concurrency_limit=None)
        gr.api(self.cancel, api_name="cancel", **control)
        gr.api(self.move_up, api_name="move_up", **control)
        self.timer.tick(self.refresh, self.seen, live, api_name="refresh", show_progress="hidden",
                        concurrency_id="poll", concurrency_limit=None)
        demo.load(self.refresh, None, live, api_name=False, show_progress="hidden")
        opened = demo.load(self.restore_form, None, [*form.values(), self.dataset_report, self.thumbs],
                           api_name=False)
        opened.then(self.describe_model, fields["base_model"], self.model_family, api_name=False)

    # --- dataset and model ---
    def upload(self, files: list[str] | None, trigger_words: str, previous_dataset: str = "",
               sample_prompts: str = "", seen: dict[str, Any] | None = None):
        """Take an upload as the dataset: (folder, report, thumbnails, trigger words, sample prompts, seen).

        Trigger words and sample prompts that came with the previous dataset (the demo's, a preset's, the
        last run's) are cleared, and the report says so: they describe other pictures."""
        if not files:
            return (gr.skip(),) * 6
        folder = self.studio.new_upload_folder()
        remove_unused(folder.parent, self.studio.outputs_root)  # uploads no run used, after UNUSED_UPLOAD_DAYS
        try:
            report = ingest(files, folder, self.settings.upload_limits)
        except UploadError as error:
            raise gr.Error(f"Upload refused: {error}") from None
        cleared = words_to_clear(previous_dataset, trigger_words, sample_prompts)
        if cleared:
            trigger_words, sample_prompts = "", ""
        markdown, gallery = self.scan(report.folder, trigger_words, report)
        if cleared:
            markdown += f"\n\n**Cleared {cleared} of the previous dataset:** enter this dataset's own."
        view = self.studio.view()
        seen = {**(seen or {}), "moved_on": view.job_id if view.finished else None}  # see status_html
        return report.folder, markdown, gallery, trigger_words, sample_prompts, seen

    def folder_note_text(self, run_name: str) -> str:
        """Which folder Start will use: a run name whose folder already holds a run gets a suffix, said."""
        try:
            folder = self.studio.next_folder(run_name or "")
        except ValueError as error:
            return f"**Run name:** {error}"
        taken = folder.name != Path(self.studio.run_folder(run_name)).name
        wanted = self.studio.run_folder(run_name).name
        note = f" ({_code(wanted)} already holds a run)" if taken else ""
        return f"Writes to {_code(folder)}{note}"

    def scan(self, folder: str, trigger_words: str, upload_report=None):
        from lora_core import dataset
        from studio import preview

        if problem := _dataset_folder_problem(folder, self.studio, self.settings):
            raise gr.Error(problem)
        try:
            report = dataset.scan(folder, split_list("trigger_words", trigger_words) or ["<trigger>"])
        except dataset.DatasetError as error:
            return f"**Cannot use this dataset:** {error}", []
        gallery = preview.thumbnails(report, self.studio.outputs_root / ".thumbnails")
        return dataset_markdown(report, upload_report), gallery

    def clone(self, run_id: str) -> list[Any]:
        """A run's settings into the form (its dataset too), under a new run name: the form's fields in
        order (as `export_config` lists them)."""
        from lora_core.errors import UserError

        try:
            config = self.runs_tab.run_config(run_id)
        except UserError as error:
            raise gr.Error(f"Not cloned: {error}") from None
        values = default_form(config)
        values["run_name"] = self.studio.next_folder(Path(config.output_path).name).name
        gr.Info(f"The settings of {run_id} are in the Train form, as run {values['run_name']}.")
        return [values[key] for key in FORM_KEYS]

    def restore_form(self) -> list[Any]:
        """A page opened while (or after) this server trained shows that job's settings and dataset."""
        config = self.studio.current_config()
        if config is None:
            return [gr.skip()] * (len(FORM_KEYS) + 2)
        values = default_form(config)
        return [*(values[key] for key in FORM_KEYS), *self.scan(values["dataset_path"], values["trigger_words"])]

    def initial_dataset(self) -> tuple[str, list]:
        """The report and thumbnails for a form that starts with a dataset (--demo), made once at start."""
        initial = self.settings.initial
        return self.scan(initial["dataset_path"], initial["trigger_words"]) if initial["dataset_path"] else ("", [])

    def describe_model(self, base_model: str | None) -> str:
        from studio import preview

        family, problem = preview.describe_model(base_model or "")
        if problem is None:
            return f"Detected: **{family}**"
        if expected := preview.HUB_MODELS.get((base_model or "").strip()):
            return f"Expected: **{expected}** (not verified: {problem})"
        return f"**Cannot use this model:** {problem}"

    @staticmethod
    def length_fields(length_by: str):
        return gr.Number(interactive=length_by == "steps"), gr.Number(interactive=length_by == "epochs")

    # --- presets, config files, estimate ---
    def validate(self, **values) -> list[dict]:
        return validation(values, self.studio, self.settings)

    def validate_start(self, **values) -> list[dict]:
        """The form's checks, and the dataset's: a dataset the scan calls unusable is refused before anything
        is queued or written (the message shows at the dataset field)."""
        checks = self.validate(**values)
        if checks[FORM_KEYS.index("dataset_path")].get("is_valid", True) and (
                problem := dataset_problem(values, self.studio, self.settings)):
            field, message = problem
            checks[FORM_KEYS.index(field if field in FORM_KEYS else "dataset_path")] = gr.validate(False, message)
        return checks

    def validate_named(self, name: str, **values) -> list[dict]:
        return [gr.validate(True, ""), *self.validate(**values)]

    def load_preset(self, name: str | None, dataset_path: str) -> list[Any]:
        if not name:
            return [gr.skip()] * len(FORM_KEYS)
        try:
            values = default_form(load_config(preset_path(name, self.studio)))
        except ConfigError as error:
            raise gr.Error(f"Preset {name} is not valid: {error}") from None
        if dataset_path:  # keep the user's own dataset; a preset only brings its own to an empty form
            values["dataset_path"] = dataset_path
        return [values[key] for key in FORM_KEYS]

    def save_preset(self, name: str, **values):
        stem = RUN_NAME.sub("-", (name or "").strip()).strip("-.")[:64]
        if not stem:
            raise gr.Error("Give the preset a name (letters, digits, '-', '_').")
        if stem in SHIPPED_PRESETS:
            raise gr.Error(f"'{stem}' is a preset that ships with the studio; choose another name.")
        config = build_config(values, self.studio, self.settings)
        text = json.dumps(config_file_dict(config), indent=2) + "\n"
        saved = atomic_write_text(self.studio.outputs_root / USER_PRESETS / f"{stem}.json", text)
        gr.Info(f"Saved {saved}")
        return gr.Dropdown(choices=preset_names(self.studio), value=stem)

    def export_config(self, **values):
        config = build_config(values, self.studio, self.settings)
        path = Path(tempfile.mkdtemp(prefix="lora-config-")) / f"{Path(config.output_path).name}.json"
        path.write_text(json.dumps(config_file_dict(config), indent=2) + "\n", encoding="utf-8")
        return gr.File(value=str(path), visible=True)

    def estimate(self, **values) -> str:
        from lora_core.preflight import preflight

        config = build_config(values, self.studio, self.settings)
        try:
            return estimate_markdown(preflight(config, num_processes=self.studio.num_processes()))
        except Exception as error:  # an estimate must never take the page down; say what failed
            log.exception("estimate failed")
            return f"**The estimate failed:** {type(error).__name__}: {error}"

    # --- training ---
    def start(self, **values) -> dict[str, Any]:
        """Queue the form's run: {job_id, state: running | queued, position, output_path}."""
        return self._launch(build_config(values, self.studio, self.settings), resume=False)

    def resume(self, **values) -> dict[str, Any]:
        """Continue the run shown from its newest complete checkpoint, with the form's settings (e.g. more
        steps); the engine refuses settings that cannot continue it (another model, another rank)."""
        folder = self.studio.last_output()
        if folder is None:
            raise gr.Error("There is no earlier run to resume.")
        config = build_config(values, self.studio, self.settings).model_copy(update={"output_path": str(folder)})
        return self._launch(config, resume=True)

    def _launch(self, config: TrainConfig, resume: bool) -> dict[str, Any]:
        try:
            submitted = self.studio.submit(config, resume=resume)
        except (BusyError, ValueError) as error:
            raise gr.Error(f"Not started: {error}") from None
        if submitted.state == "queued":
            gr.Info(f"Queued at position {submitted.position}: it starts when the device is free "
                    f"({submitted.output_path}).")
        return submitted.to_dict()

    def stop(self) -> dict[str, Any]:
        """Stop the running job shown (it saves a checkpoint): {stopped, job_id}."""
        view = self.studio.view()
        stopped = view.active and self.studio.stop(view.job_id)
        if not stopped:
            gr.Info("No training is running.")
        return {"stopped": bool(stopped), "job_id": view.job_id if stopped else None}

    def run(self, job_id: str) -> dict[str, Any]:
        """One job's run by id (queued, running or finished), as the hidden run summary gives it."""
        return run_summary(self.studio.view(job_id))

    def queue_list(self) -> list[dict[str, Any]]:
        """The queue in order: job_id, position, output_path, resume, processes, queued_at."""
        return self.studio.queued()

    def cancel(self, job_id: str) -> dict[str, Any]:
        """Take a queued job out of the queue: {cancelled, job_id}."""
        cancelled = bool(job_id) and self.studio.cancel(job_id)
        if not cancelled:
            gr.Info("That job is not in the queue (it may have started).")
        return {"cancelled": bool(cancelled), "job_id": job_id}

    def move_up(self, job_id: str) -> dict[str, Any]:
        """Move a queued job one place up: {job_id, position} (position None: not queued)."""
        return {"job_id": job_id, "position": self.studio.move_up(job_id) if job_id else None}

    def refresh(self, seen: dict[str, Any] | None = None) -> list[Any]:
        """The live view. Each part is sent only when it changed since this page last saw it, so an idle
        poll costs nothing and sample images and checkpoints are not copied again every second."""
        view, seen = self.studio.view(), dict(seen or {})
        queued = self.studio.queued()
        earlier = bool(view.job_id) and seen.get("moved_on") == view.job_id  # the page has a new dataset
        saved = view.saved_so_far
        keys = {"status": (view.job_id, view.n_events, view.state, earlier),
                "samples": (view.job_id, len(view.samples)), "checkpoints": (view.job_id, len(view.checkpoints)),
                "final": (view.job_id, saved), "queue": [job["job_id"] for job in queued]}
        fresh = {part: seen.get(part) != key for part, key in keys.items()}
        seen.update(keys)
        skip = gr.skip()
        status_parts = [status_html(view, earlier), loss_frame(view)] if fresh["status"] else [skip, skip]
        resumable = not view.active and view.state != "idle"  # the engine says so when nothing can be resumed
        buttons = ([gr.Button(interactive=True), gr.Button(interactive=view.active),
                    gr.Button(interactive=resumable), run_summary(view)] if fresh["status"] else [skip] * 4)
        samples = [(path, f"step {step}: {prompt}") for path, prompt, step in view.samples]
        checkpoints = [path for _, path in view.checkpoints] or None
        label = FINAL_LABEL if saved == view.final_path else f"Download the LoRA saved so far ({Path(saved).name})"
        final = gr.DownloadButton(label, value=saved, visible=bool(saved))  # after Stop: the newest checkpoint
        return [*status_parts, samples if fresh["samples"] else skip,
                checkpoints if fresh["checkpoints"] else skip, final if fresh["final"] else skip,
                *buttons, gr.Timer(ACTIVE_TICK_S if view.active else IDLE_TICK_S), seen,
                *(queue_parts(queued) if fresh["queue"] else [skip, skip])]


def queue_parts(queued: list[dict[str, Any]]) -> list[Any]:
    """The queue table and the picker of queued jobs."""
    rows = [[job["position"], job["job_id"], Path(job["output_path"]).name + (" (resume)" if job["resume"] else ""),
             job["queued_at"]] for job in queued]
    choices = [(f"{job['position']}. {Path(job['output_path']).name}", job["job_id"]) for job in queued]
    return [rows, gr.Dropdown(choices=choices, value=choices[0][1] if choices else None)]


def build_app(studio: Studio, settings: PageSettings) -> gr.Blocks:
    return StudioPage(studio, settings).build()


def _builtin_names() -> list[str]:
    from lora_core import builtin

    return [name for name in builtin.names() if name.startswith(("builtin:toy", "builtin:tiny"))]


def quantized(estimate: dict[str, Any]) -> str:
    storage, blocks = estimate.get("base_quantization", "none"), estimate.get("offload_blocks", 0)
    return ("" if storage == "none" else f", base stored in {storage}") + (
        f", {blocks} block{'s' if blocks != 1 else ''} offloaded to the CPU" if blocks else "")


def estimate_markdown(report: dict[str, Any]) -> str:
    lines = []
    device = report.get("device")
    if device:
        memory = f", {device['free_memory_gib']} GiB free of {device['total_memory_gib']} GiB" \
            if device.get("total_memory_gib") else ""
        lines.append(f"**Device:** {device['name']} ({device['kind']}{memory}), precision "
                     f"{device['mixed_precision']}")
    devices = report.get("devices")
    if devices:
        lines.append(f"**Devices:** {devices['processes']} training process(es), {devices['available']} device(s) "
                     f"visible, global batch {devices['global_batch_size']}")
    estimate = report.get("memory_estimate")
    if estimate:
        lines.append(f"**Memory estimate:** about {estimate['total_gib']} GiB (weights "
                     f"{estimate['frozen_weights_gib']}, LoRA + optimizer {estimate['lora_and_optimizer_gib']}, "
                     f"activations {estimate['activations_gib']}"
                     f"{', gradient checkpointing on' if estimate.get('gradient_checkpointing') else ''}"
                     f"{quantized(estimate)}); {estimate['covers']}")
    if report.get("memory_mode"):  # memory_mode auto: what it chose for this card
        lines.append(f"**Memory mode auto:** {report['memory_mode']['summary']}")
    if "total_steps" in report:
        lines.append(f"**Steps:** {report['total_steps']} on {report['dataset']['num_images']} images")
    if "model" in report:
        lines.append(f"**Model:** {report['model']['family']}")
    lines += [f"**Will not fit:** {warning}" for warning in report.get("warnings", [])]
    lines += [f"**Problem, {item['field']}:** {item['message']}" for item in report.get("problems", [])]
    if report.get("ok") and not report.get("warnings"):
        lines.append("**Ready to train.**")
    return "\n\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# serving


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="LoRA Studio web page", epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                        help="address to bind (default 127.0.0.1; 0.0.0.0 serves the network: use --auth)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")))
    parser.add_argument("--share", action="store_true", help="also open a public gradio.live link")
    parser.add_argument("--auth", default=os.environ.get(AUTH_ENV),
                        help=f"require a login, user:password (several: comma-separated); or set {AUTH_ENV}")
    parser.add_argument("--demo", action="store_true",
                        help="pre-fill the CPU demo (presets/demo-toy-cpu.json: teaches builtin:toy-sd a new colour)")
    parser.add_argument("--outputs", default=os.environ.get(OUTPUTS_ENV, "outputs"),
                        help=f"folder for runs and uploads (default ./outputs, or {OUTPUTS_ENV})")
    parser.add_argument("--gpus", default=os.environ.get("LORA_STUDIO_GPUS", "1"),
                        help="GPUs per job: a number, or 'all'; more than one trains through accelerate launch")
    parser.add_argument("--detach-jobs", action="store_true",
                        help="on SIGTERM/Ctrl-C leave running jobs training instead of stopping them with a "
                             "checkpoint; a server started later shows them again")
    parser.add_argument("--max-upload-mb", type=int, default=200, help="largest single uploaded file (MB)")
    parser.add_argument("--max-upload-files", type=int, default=2000, help="most images + captions per upload")
    return parser.parse_args(argv)


def parse_auth(text: str | None) -> list[tuple[str, str]] | None:
    if not text:
        return None
    pairs = []
    for item in text.split(","):
        user, sep, password = item.strip().partition(":")
        if not sep or not user or not password:
            raise SystemExit(f"--auth / {AUTH_ENV}: expected user:password, got {item.strip()!r}")
        pairs.append((user, password))
    return pairs


def launch_settings(args: argparse.Namespace, studio: Studio) -> dict[str, Any]:
    """Everything `Blocks.launch` gets: safe defaults, and only the outputs folder served."""
    return dict(server_name=args.host, server_port=args.port, share=args.share, auth=parse_auth(args.auth),
                auth_message="LoRA Studio: log in to train.", max_file_size=f"{args.max_upload_mb}mb",
                allowed_paths=[str(studio.outputs_root)], enable_monitoring=False, ssr_mode=False,
                show_error=False, css=CSS, app_kwargs={"middleware": [auth.middleware()]})


def exposure_warning(args: argparse.Namespace) -> str | None:
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.auth:
        return (f"serving on {args.host} without a login: anyone who can reach port {args.port} can train on "
                f"this machine and download the results; add --auth user:password (or set {AUTH_ENV})")
    if args.share and not args.auth:
        return f"a public share link without a login; add --auth user:password (or set {AUTH_ENV})"
    return None


def make_app(args: argparse.Namespace) -> tuple[gr.Blocks, Studio, dict[str, Any]]:
    studio = Studio(args.outputs, processes=args.gpus if args.gpus == "all" else int(args.gpus))
    config = load_config(DEMO_PRESET) if args.demo else None
    initial = default_form(config)
    if args.demo:
        initial["dataset_path"] = str(ROOT / "demo" / "dataset")
    datasets_root = os.environ.get(DATASETS_ENV)
    settings = PageSettings(initial, UploadLimits(max_files=args.max_upload_files,
                                                  max_file_bytes=args.max_upload_mb * 1024**2),
                            Path(datasets_root).resolve() if datasets_root else None)
    demo = build_app(studio, settings)
    demo.queue(default_concurrency_limit=2, max_size=None)  # a bounded queue let polls crowd out Stop
    return demo, studio, launch_settings(args, studio)


def main(argv: list[str] | None = None, launch: Callable[..., Any] | None = None) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)
    args = parse_args(argv)
    if warning := exposure_warning(args):
        log.warning(warning)
    demo, studio, settings = make_app(args)
    log.info("runs and uploads go to %s", studio.outputs_root)
    install_signal_handlers(studio, detach_jobs=args.detach_jobs)
    (launch or demo.launch)(**settings)


def install_signal_handlers(studio: Studio, detach_jobs: bool = False) -> None:
    """SIGTERM (docker stop, a Space restart) or Ctrl-C: let running jobs save a checkpoint (or, with
    `detach_jobs`, leave them training), then exit at once: docker stop waits only 10 s."""
    import signal

    def stop(signum, _frame) -> None:
        if detach_jobs:
            log.warning("signal %s: exiting; running jobs go on training (%s)", signum,
                        ", ".join(studio.running()) or "none")
        else:
            log.warning("signal %s: stopping running jobs after their current step, then exiting", signum)
        studio.shutdown(timeout=8.0, stop_jobs=not detach_jobs)
        logging.shutdown()
        os._exit(128 + signum)  # not sys.exit: closing the HTTP server and its threads takes seconds

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, stop)


if __name__ == "__main__":
    main()
