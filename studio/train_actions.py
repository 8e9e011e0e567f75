"""The Train tab's handlers, each also a named API endpoint: the dataset and model, presets, config files and
the estimate, and the jobs (start, resume, stop, run, queue, cancel, move up). The tab's layout, its wiring
and its live view are studio/train_tab.py.

They read and change only the `Studio` (studio/jobs.py, which owns the jobs) and files under the outputs
folder; the form's values and checks are studio/train_form.py, what they show is drawn by studio/render.py.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gradio as gr

from lora_core.config import ConfigError, TrainConfig
from lora_core.configfile import load_config
from lora_core.files import atomic_write_text
from studio.cleanup import export_folder, sweep_caches
from studio.form_words import refusal
from studio.formspec import config_file_dict, split_list
from studio.jobs import RUN_NAME, BusyError, Studio
from studio.launcher import validation_report  # --validate-only in a child process: no torch here
from studio.render import code, dataset_markdown, estimate_markdown, run_summary
from studio.train_form import (
    FORM_KEYS,
    SHIPPED_PRESETS,
    SPECS,
    USER_PRESETS,
    PageSettings,
    build_config,
    dataset_folder_problem,
    dataset_problem,
    default_form,
    field_of,
    preset_names,
    preset_path,
    validation,
    words_to_clear,
)
from studio.uploads import UploadError, ingest, remove_unused

if TYPE_CHECKING:
    from studio.runs_page import RunsTab

log = logging.getLogger("studio.train_actions")
SAME_START_S = 10.0  # an identical Start within this long (a double click) answers the job it already queued


class TrainActions:
    """The Train tab's handlers over one `Studio`."""

    runs_tab: RunsTab  # set by the page: clone reads a run's config through it
    # the components the handlers answer by (set by the page's layout, studio/train_tab.py)
    fields: dict[str, gr.components.Component]
    dataset_report: gr.Markdown
    thumbs: gr.Gallery
    model_family: gr.Markdown
    seen: gr.State

    def __init__(self, studio: Studio, settings: PageSettings):
        self.studio, self.settings = studio, settings
        self.model_problems: dict[str, str | None] = {}  # base model -> why it cannot be used, as last checked
        self.last_config: TrainConfig | None = None  # what the user last started: a new page opens with it
        self._last_start: tuple[str, float, dict[str, Any]] | None = None  # (page and config, when, answer)
        self._start_lock, self._checks_lock = threading.Lock(), threading.Lock()
        self._checked: tuple[str, float, list[tuple[str, str]]] | None = None  # (form, when, problems)

    # --- dataset and model ---
    def upload(self, files: list[str] | None, trigger_words: str, previous_dataset: str = "",
               sample_prompts: str = "", seen: dict[str, Any] | None = None):
        """Take an upload as the dataset: its folder, report and thumbnails (and trigger words, sample prompts
        and what the live view has seen), by component.

        Trigger words and sample prompts that came with the previous dataset (the demo's, a preset's, the
        last run's) are cleared, and the report says so: they describe other pictures."""
        if not files:
            return {self.dataset_report: gr.skip()}  # a dict of none is one value to Gradio, not no update
        folder = self.studio.new_upload_folder()
        remove_unused(folder.parent, self.studio.outputs_root)  # uploads no run used, after UNUSED_UPLOAD_DAYS
        sweep_caches(self.studio.outputs_root)  # Gradio's copy of every upload, refused ones too
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
        seen = {**(seen or {}), "moved_on": view.job_id if view.ended else None}  # see status_html
        return {self.fields["dataset_path"]: report.folder, self.dataset_report: markdown, self.thumbs: gallery,
                self.fields["trigger_words"]: trigger_words, self.fields["sample_prompts"]: sample_prompts,
                self.seen: seen}

    def folder_cleared(self, folder: str) -> dict[gr.components.Component, Any]:
        """An emptied dataset folder empties the report and thumbnails (they were the old folder's)."""
        if (folder or "").strip():
            return {self.dataset_report: gr.skip()}
        return {self.dataset_report: "", self.thumbs: []}

    def folder_note_text(self, run_name: str) -> str:
        """Which folder Start will use: a run name whose folder already holds a run gets a suffix, said."""
        try:
            folder = self.studio.next_folder(run_name or "")
        except ValueError as error:
            return f"**Run name:** {error}"
        taken = folder.name != Path(self.studio.run_folder(run_name)).name
        wanted = self.studio.run_folder(run_name).name
        note = f" ({code(wanted)} already holds a run)" if taken else ""
        return f"Writes to {code(folder)}{note}"

    def scan(self, folder: str, trigger_words: str, upload_report=None):
        from lora_core import dataset
        from studio import preview

        if problem := dataset_folder_problem(folder, self.studio, self.settings):
            raise gr.Error(problem)
        try:
            report = dataset.scan(folder, split_list("trigger_words", trigger_words) or ["<trigger>"], decode=False)
        except dataset.DatasetError as error:
            return f"**Cannot use this dataset:** {error}", []
        gallery = preview.thumbnails(report, self.studio.outputs_root / ".thumbnails")
        return dataset_markdown(report, upload_report), gallery

    def clone(self, run_id: str) -> dict[gr.components.Component, Any]:
        """A run's settings into the form (its dataset too), under a new run name."""
        from lora_core.errors import UserError

        try:
            config = self.runs_tab.run_config(run_id)
        except UserError as error:
            raise gr.Error(f"Not cloned: {error}") from None
        values = default_form(config)
        values["run_name"] = self.studio.next_folder(Path(config.output_path).name).name
        gr.Info(f"The settings of {run_id} are in the Train form, as run {values['run_name']}.")
        return self.form_values(values)

    def restore_form(self) -> dict[gr.components.Component, Any]:
        """A page opened later starts from what the user last started on this server (not from the job the
        queue ran last, which may be another page's or one that failed), else the current job's settings."""
        config = self.last_config
        if config is None and self.studio.view().state != "failed":
            config = self.studio.current_config()
        if config is None:
            return {self.dataset_report: gr.skip()}
        values = default_form(config)
        report, gallery = self.scan(values["dataset_path"], values["trigger_words"])
        return {**self.form_values(values), self.dataset_report: report, self.thumbs: gallery}

    def form_values(self, values: dict[str, Any]) -> dict[gr.components.Component, Any]:
        """Form values by key as the form's components' values."""
        return {self.fields[key]: values[key] for key in FORM_KEYS}

    def initial_dataset(self) -> tuple[str, list]:
        """The report and thumbnails for a form that starts with a dataset (--demo), made once at start."""
        initial = self.settings.initial
        return self.scan(initial["dataset_path"], initial["trigger_words"]) if initial["dataset_path"] else ("", [])

    def describe_model(self, base_model: str | None) -> dict:
        """The model's family in words, and the form's family-specific fields (the flow-matching options of
        SD 3 / FLUX) shown only for a model of their families, as the config model's hints say."""
        from studio import preview

        words, problem, family = preview.describe_model(base_model or "", self.studio.starter)
        if not (problem or "").startswith(preview.UNCHECKED):
            self.model_problems[(base_model or "").strip()] = problem
        if problem is None:
            text = f"Detected: **{words}**"
        elif expected := preview.HUB_MODELS.get((base_model or "").strip()):
            text = f"Expected: **{expected}** (not verified: {problem})"
            family = preview.HUB_FAMILIES.get((base_model or "").strip())
        else:
            text = f"**Cannot use this model:** {problem}"
        return {self.model_family: text, **{self.fields[spec.name]: gr.update(visible=spec.applies_to(family))
                                            for spec in SPECS if spec.families}}

    @staticmethod
    def bucket_range(bucketing: bool, resolution: float | None, low: float | None, high: float | None):
        """Bucketing needs the resolution inside [min, max] bucket resolution: ticking it (or changing the
        resolution under it) widens that range to take the resolution in, rather than leaving an error that only
        a field under Advanced fixes."""
        if not bucketing or not resolution or low is None or high is None:
            return gr.skip(), gr.skip()
        return min(low, resolution), max(high, resolution)

    @staticmethod
    def length_fields(length_by: str):
        return gr.Number(interactive=length_by == "steps"), gr.Number(interactive=length_by == "epochs")

    # --- presets, config files, estimate ---
    def validate(self, **values) -> list[dict]:
        return validation(values, self.studio, self.settings)

    def start_problems(self, values: dict[str, Any]) -> list[tuple[str, str]]:
        """(form key, plain words) for everything that stops this form from starting: the form's checks, the
        dataset's scan and hold-out, and a base model the page already found it cannot use."""
        if problems := self._form_problems(values):
            return problems
        if problem := self.model_problem(values.get("base_model") or ""):
            return [("base_model", f"Base model: {problem}. Pick a built-in model or a model folder on the "
                                   "server (nothing was queued).")]
        return []

    def _form_problems(self, values: dict[str, Any]) -> list[tuple[str, str]]:
        """The form's and the dataset's problems. One click asks twice at once (the note beside Start, and
        Start's own check): the second gets the first's answer rather than scanning the dataset again."""
        key = json.dumps(values, sort_keys=True, default=str)
        with self._checks_lock:
            if self._checked is not None and self._checked[0] == key and time.monotonic() - self._checked[1] < 2:
                return self._checked[2]
            try:
                build_config(values, self.studio, self.settings)
                problems = [problem] if (problem := dataset_problem(values, self.studio, self.settings)) else []
            except ConfigError as error:
                problems = [(field_of(field), message) for field, message in error.problems]
            self._checked = (key, time.monotonic(), problems)
            return problems

    def validate_start(self, **values) -> list[dict]:
        """The checks of `start_problems` at their fields: nothing is queued or written when one fails."""
        messages: dict[str, list[str]] = {}
        for field, message in self.start_problems(values):
            messages.setdefault(field if field in FORM_KEYS else FORM_KEYS[0], []).append(message)
        return [gr.validate(key not in messages, " ".join(messages.get(key, []))) for key in FORM_KEYS]

    def start_note_text(self, **values) -> str:
        """What the note beside Start says: why Start refuses this form, in plain words ("" when it starts).
        It stays until the form changes (the page clears it then), where the user is looking."""
        return refusal(self.start_problems(values))

    def model_problem(self, base_model: str) -> str | None:
        """Why the base model cannot be used, as the page's model picker already said (None when it has not
        checked it: the job itself then says what is wrong, at its field)."""
        return self.model_problems.get(base_model.strip())

    def validate_named(self, name: str, **values) -> list[dict]:
        return [gr.validate(True, ""), *self.validate(**values)]

    def load_preset(self, name: str | None, dataset_path: str) -> dict[gr.components.Component, Any]:
        if not name:
            return {self.fields["dataset_path"]: gr.skip()}
        try:
            values = default_form(load_config(preset_path(name, self.studio)))
        except ConfigError as error:
            raise gr.Error(f"Preset {name} is not valid: {error}") from None
        if dataset_path:  # keep the user's own dataset; a preset only brings its own to an empty form
            values["dataset_path"] = dataset_path
        return self.form_values(values)

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
        sweep_caches(self.studio.outputs_root)  # Gradio's copies and older exports, not just kept forever
        path = export_folder(self.studio.outputs_root) / f"{Path(config.output_path).name}.json"
        path.write_text(json.dumps(config_file_dict(config), indent=2) + "\n", encoding="utf-8")
        return gr.File(value=str(path), visible=True)

    def estimate(self, **values) -> str:
        config = build_config(values, self.studio, self.settings)
        try:
            return estimate_markdown(validation_report(config, self.studio.num_processes(),
                                                      starter=self.studio.starter))
        except Exception as error:  # an estimate must never take the page down; say what failed
            log.exception("estimate failed")
            return f"**The estimate failed:** {type(error).__name__}: {error}"

    # --- training ---
    def start(self, request: gr.Request | None = None, **values) -> dict[str, Any]:
        """Queue the form's run: {job_id, state: running | queued, position, output_path}. The same form
        started again from the same page within SAME_START_S (a double click) answers the job already queued;
        another page's identical Start is a job of its own."""
        config = build_config(values, self.studio, self.settings)
        key = f"{getattr(request, 'session_hash', None)}|{config.model_dump_json()}"
        with self._start_lock:  # two clicks are two requests, answered at once on two threads
            last = self._last_start
            if last is not None and last[0] == key and time.monotonic() - last[1] < SAME_START_S:
                gr.Info("Already started: this is the job the first click queued.")
                return last[2]
            submitted = self._launch(config, resume=False)
            self._last_start = (key, time.monotonic(), submitted)
            return submitted

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
        self.last_config = config
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

