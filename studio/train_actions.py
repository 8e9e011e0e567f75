"""The Train tab's handlers, each also a named API endpoint: the dataset and model, presets, config files and
the estimate, and the jobs (start, resume, stop, run, queue, cancel, move up). The tab's layout, its wiring
and its live view are studio/train_tab.py.

They read and change only the `Studio` (studio/jobs.py, which owns the jobs) and files under the outputs
folder; the form's values and checks are studio/train_form.py, what they show is drawn by studio/render.py.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gradio as gr

from lora_core.config import ConfigError, TrainConfig
from lora_core.configfile import load_config
from lora_core.files import atomic_write_text
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
    preset_names,
    preset_path,
    validation,
    words_to_clear,
)
from studio.uploads import UploadError, ingest, remove_unused

if TYPE_CHECKING:
    from studio.runs_page import RunsTab

log = logging.getLogger("studio.train_actions")


class TrainActions:
    """The Train tab's handlers over one `Studio`."""

    runs_tab: RunsTab  # set by the page: clone reads a run's config through it

    def __init__(self, studio: Studio, settings: PageSettings):
        self.studio, self.settings = studio, settings

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
        seen = {**(seen or {}), "moved_on": view.job_id if view.ended else None}  # see status_html
        return report.folder, markdown, gallery, trigger_words, sample_prompts, seen

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

    def describe_model(self, base_model: str | None) -> dict:
        """The model's family in words, and the form's family-specific fields (the flow-matching options of
        SD 3 / FLUX) shown only for a model of their families, as the config model's hints say."""
        from studio import preview

        words, problem, family = preview.describe_model(base_model or "")
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
        config = build_config(values, self.studio, self.settings)
        try:
            return estimate_markdown(validation_report(config, self.studio.num_processes()))
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

