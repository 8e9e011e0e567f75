"""The Train tab: the form (dataset, model, parameters), Start/Stop/Resume, the live view of the current job
and the queue; and `build_app`, the page of both tabs (the Runs tab is studio/runs_page.py).

The layout and its wiring are here, the handlers in studio/train_actions.py, what they show is drawn by
studio/render.py, and the form's values and checks are studio/train_form.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gradio as gr

from studio.formspec import LENGTH_CHOICES, advanced_tabs
from studio.jobs import Studio
from studio.jobview import RunView
from studio.render import QUEUE_HEADERS, code, loss_frame, queue_label, queue_rows, run_summary, status_html
from studio.runs_page import RunsTab
from studio.train_actions import TrainActions
from studio.train_form import (
    FORM_KEYS,
    PAGE_BUILTINS,
    SPECS,
    PageSettings,
    dataset_folder_problem,
    preset_names,
    widget,
)
from studio.workbench_tab import build_workbench_tab

UPLOAD_TYPES = [".png", ".jpg", ".jpeg", ".webp", ".bmp", ".txt", ".zip"]
ACTIVE_TICK_S, IDLE_TICK_S = 1.0, 3.0
FINAL_LABEL = "Download LoRA (.safetensors)"
# Cancel asks first, in the browser; an answer of no sends no job (the handler says nothing was cancelled)
CONFIRM_CANCEL = "(job) => (job && window.confirm('Cancel this queued job? It leaves the queue.')) ? job : null"


class TrainTab(TrainActions):
    """The Train tab (and, in `build`, the page around it): layout methods build the sections, `_wire` connects
    them to the handlers (TrainActions), `refresh` is the live view the page's timer polls."""

    def __init__(self, studio: Studio, settings: PageSettings):
        super().__init__(studio, settings)
        self.fields: dict[str, gr.components.Component] = {}
        self.finished: RunView | None = None  # the last run this server saw finish, shown after a failure

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
            self.runs_tab = RunsTab(self.studio.outputs_root, studio=self.studio,  # the OS says what runs
                                    settings=self.settings)
            self.runs_tab.build()
            # the caption editor and dataset doctor, on the Train tab's dataset folder; the same folders as
            # training may use (LORA_STUDIO_DATASETS, uploads)
            self.workbench = build_workbench_tab(
                self.studio.outputs_root / ".thumbnails",
                folder_problem=lambda folder: dataset_folder_problem(folder, self.studio, self.settings),
                dataset_path=self.fields["dataset_path"], trigger_words=self.fields["trigger_words"],
                studio=self.studio)
            self.form = {key: self.fields[key] for key in FORM_KEYS}
            self._wire(demo)
            self.runs_tab.wire(demo)
            self.workbench.wire(demo)
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
                                     elem_id="dataset-gallery", elem_classes=["ls-pixels"])

    def _model_section(self) -> None:
        from studio.preview import HUB_MODELS

        with gr.Group():
            gr.Markdown("### 2 · Model")
            self.fields["base_model"] = gr.Dropdown(
                choices=[*PAGE_BUILTINS, *HUB_MODELS], value=self.settings.initial["base_model"],
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
                        self.fields[spec.name] = widget(spec, initial[spec.name])
            with gr.Accordion("Samples", open=False, elem_id="group-sampling"):
                for spec in groups["sampling"]:
                    self.fields[spec.name] = widget(spec, initial[spec.name])
            with gr.Accordion("Advanced", open=False, elem_id="group-advanced"), gr.Tabs():
                for title, specs in advanced_tabs(SPECS).items():
                    slug = title.lower().replace(" ", "-")
                    with gr.Tab(title, elem_id=f"advanced-{slug}"):
                        for row in range(0, len(specs), 2):  # two columns: a tab is as tall as half its fields
                            with gr.Row():
                                for spec in specs[row:row + 2]:
                                    self.fields[spec.name] = widget(spec, initial[spec.name])
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
        self.start_note = gr.Markdown("", elem_id="start-note")  # why Start refused: where the user looks
        with gr.Row():
            self.stop_button = gr.Button("Stop", variant="stop", interactive=False, elem_id="stop")
            self.resume_button = gr.Button("Resume last run", interactive=False, elem_id="resume")
        self.estimate_report = gr.Markdown("", elem_id="estimate")
        self.status = gr.HTML(status_html(self.studio.view()), elem_id="status")
        # the series are named up front: a plot first drawn from an empty frame (before the first step) drew
        # no line for series it had not seen then
        self.plot = gr.LinePlot(x="step", y="loss", title="Loss", height=240, elem_id="loss-plot",
                                x_title="step", y_title="loss (mean since the last point)")
        self.samples = gr.Gallery(label="Samples", columns=3, height=260, object_fit="contain", elem_id="samples",
                                  elem_classes=["ls-pixels"])
        self.checkpoints = gr.File(label="Checkpoints", file_count="multiple", interactive=False,
                                   elem_id="checkpoints")
        self.final = gr.DownloadButton(FINAL_LABEL, visible=False, variant="primary", elem_id="download-final")
        with gr.Accordion("Queue", open=True, elem_id="queue"):
            self.queue_table = gr.Dataframe(headers=QUEUE_HEADERS, value=[], interactive=False,
                                            elem_id="queue-table")
            with gr.Row():
                self.queue_pick = gr.Dropdown(choices=[], label="Queued job", scale=3, elem_id="queue-pick")
                self.move_up_button = gr.Button("Move up", scale=1, elem_id="queue-move-up")
                self.cancel_button = gr.Button("Cancel", scale=1, variant="stop", elem_id="queue-cancel")
            self.queue_note = gr.Markdown("", elem_id="queue-note")
        self.run_state = gr.JSON(visible=False)
        self.job_info = gr.JSON(visible=False)  # what Start answered: job id, running or queued, position
        self.seen = gr.State(None)
        self.nothing_seen = gr.State(None)  # a refresh after an action sends every part again
        self.timer = gr.Timer(IDLE_TICK_S)

    # --- events ---
    def _wire(self, demo: gr.Blocks) -> None:
        fields, form = self.fields, self.form
        self.live = [self.status, self.plot, self.samples, self.checkpoints, self.final, self.start_button,
                     self.stop_button, self.resume_button, self.run_state, self.timer, self.seen,
                     self.queue_table, self.queue_pick]
        dataset_in = [fields["dataset_path"], fields["trigger_words"]]
        words = [fields["trigger_words"], fields["sample_prompts"]]
        self.uploads.upload(self.upload, [self.uploads, fields["trigger_words"], fields["dataset_path"],
                                          fields["sample_prompts"], self.seen],
                            [fields["dataset_path"], self.dataset_report, self.thumbs, *words, self.seen],
                            api_name="upload").then(self.refresh, [self.seen, self.queue_pick], self.live,
                                                    api_name=False, show_progress="hidden")
        fields["dataset_path"].change(self.folder_cleared, fields["dataset_path"], [self.dataset_report, self.thumbs],
                                      api_name=False, show_progress="hidden")
        fields["run_name"].change(self.folder_note_text, fields["run_name"], self.folder_note, api_name="run_folder",
                                  show_progress="hidden")
        gr.on([self.scan_button.click, fields["dataset_path"].submit], self.scan, dataset_in,
              [self.dataset_report, self.thumbs], api_name="scan")
        family_fields = [self.model_family, *(fields[spec.name] for spec in SPECS if spec.families)]
        fields["base_model"].change(self.describe_model, fields["base_model"], family_fields,
                                    api_name="model_family")
        buckets = [fields["min_bucket_resolution"], fields["max_bucket_resolution"]]
        gr.on([fields["bucketing"].input, fields["resolution"].input], self.bucket_range,
              [fields["bucketing"], fields["resolution"], *buckets], buckets, api_name=False, show_progress="hidden")
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
        # the note beside Start stays until the form changes; cleared in the browser, no request per keystroke
        gr.on([field.change for field in form.values()], None, None, self.start_note, js="() => ''",
              api_name=False, show_progress="hidden", queue=False)
        self._wire_jobs(demo)
        # the live view first, beside the polls: not behind the form's restore and the model check
        demo.load(self.refresh, None, self.live, api_name=False, show_progress="hidden", concurrency_id="poll",
                  concurrency_limit=None)
        opened = demo.load(self.restore_form, None, [*form.values(), self.dataset_report, self.thumbs],
                           api_name=False)
        opened.then(self.describe_model, fields["base_model"], family_fields, api_name=False)

    def _wire_jobs(self, demo: gr.Blocks) -> None:
        """Start, Stop, Resume and the queue's buttons, the API of the jobs, and the live view's timer."""
        form, picked = self.form, self.queue_pick
        # Control actions have their own concurrency group and no limit (the Studio's lock orders them),
        # polls another: however many pages poll, Start and Stop are answered (demo.queue has no max_size).
        control = dict(concurrency_id="control", concurrency_limit=None)
        self.start_button.click(self.start_note_text, inputs_kwargs=form, outputs=self.start_note, api_name=False,
                                show_progress="hidden", **control)
        for event in (self.start_button.click(self.start, inputs_kwargs=form, outputs=self.job_info,
                                              validator=self.validate_start, api_name="start", **control),
                      self.stop_button.click(self.stop, outputs=self.job_info, api_name="stop", **control),
                      self.resume_button.click(self.resume, inputs_kwargs=form, outputs=self.job_info,
                                               validator=self.validate, api_name="resume", **control),
                      self.cancel_button.click(self.cancel_picked, picked, [self.job_info, self.queue_note],
                                               js=CONFIRM_CANCEL, api_name=False, **control),
                      self.move_up_button.click(self.move_up, picked, self.job_info, api_name=False, **control)):
            event.then(self.refresh, [self.nothing_seen, picked], self.live, api_name=False,
                       show_progress="hidden").then(self.folder_note_text, self.fields["run_name"], self.folder_note,
                                                    api_name=False, show_progress="hidden")
        gr.api(self.queue_list, api_name="queue", **control)
        gr.api(self.run, api_name="run", concurrency_id="poll", concurrency_limit=None)
        gr.api(self.cancel, api_name="cancel", **control)
        gr.api(self.move_up, api_name="move_up", **control)
        self.timer.tick(self.refresh, [self.seen, picked], self.live, api_name="refresh", show_progress="hidden",
                        concurrency_id="poll", concurrency_limit=None)

    def cancel_picked(self, job_id: str | None) -> dict[gr.components.Component, Any]:
        """Cancel, from the page: the confirmation in the browser answered no with an empty pick."""
        if not job_id:
            return {self.queue_note: "Nothing was cancelled."}
        label = next((queue_label(job) for job in self.studio.queued() if job["job_id"] == job_id), job_id)
        answer = self.cancel(job_id)
        note = f"Cancelled {code(label)}: it left the queue." if answer["cancelled"] else (
            "Not cancelled: that job is no longer in the queue (it may have started).")
        return {self.job_info: answer, self.queue_note: note}

    def refresh(self, seen: dict[str, Any] | None = None,
                picked: str | None = None) -> dict[gr.components.Component, Any]:
        """The live view, by component. Each part is sent only when it changed since this page last saw it, so
        an idle poll costs nothing and sample images and checkpoints are not copied again every second.
        `picked`: the queued job the page's picker holds, kept while it is queued."""
        view, seen = self.studio.view(), dict(seen or {})
        queued = self.studio.queued()
        earlier = bool(view.job_id) and seen.get("moved_on") == view.job_id  # the page has a new dataset
        if view.state == "complete" and view.final_path:
            self.finished = view  # stays reachable when a later job fails
        kept = self.finished if view.state == "failed" and self.finished is not None else None
        saved = kept.final_path if kept is not None else view.saved_so_far
        keys = {"status": (view.job_id, view.n_events, view.state, earlier),
                "samples": (view.job_id, len(view.samples)), "checkpoints": (view.job_id, len(view.checkpoints)),
                "final": (view.job_id, saved), "queue": [job["job_id"] for job in queued]}
        fresh = {part: seen.get(part) != key for part, key in keys.items()}
        seen.update(keys)
        shown: dict[gr.components.Component, Any] = {
            self.timer: gr.Timer(ACTIVE_TICK_S if view.active else IDLE_TICK_S), self.seen: seen}
        if fresh["status"]:
            resumable = not view.active and view.state != "idle"  # the engine says so when nothing can be resumed
            shown |= {self.status: status_html(view, earlier, kept), self.plot: loss_frame(view),
                      self.start_button: gr.Button(interactive=True),
                      self.stop_button: gr.Button(interactive=view.active),
                      self.resume_button: gr.Button(interactive=resumable), self.run_state: run_summary(view)}
        if fresh["samples"]:
            shown[self.samples] = [(sample.path, f"step {sample.step}: {sample.prompt}") for sample in view.samples]
        if fresh["checkpoints"]:
            shown[self.checkpoints] = [saved_lora.path for saved_lora in view.checkpoints] or None
        if fresh["final"]:  # after Stop: the newest checkpoint; after a failure: the last finished run's LoRA
            shown[self.final] = gr.DownloadButton(final_label(view, kept, saved), value=saved, visible=bool(saved))
        if fresh["queue"]:
            choices = [(queue_label(job), job["job_id"]) for job in queued]
            ids = [job["job_id"] for job in queued]
            shown |= {self.queue_table: queue_rows(queued), self.queue_pick: gr.Dropdown(
                choices=choices, value=picked if picked in ids else (ids[0] if ids else None))}
        return shown


def final_label(view: RunView, kept: RunView | None, saved: str) -> str:
    """The download button's words: the finished LoRA, the one saved so far, or the last finished run's."""
    if kept is not None:
        return f"Download the last finished LoRA ({Path(kept.output_path).name})"
    return FINAL_LABEL if saved == view.final_path else f"Download the LoRA saved so far ({Path(saved).name})"


def build_app(studio: Studio, settings: PageSettings) -> gr.Blocks:
    """The page: the Train tab and the Runs tab over one Studio."""
    return TrainTab(studio, settings).build()
