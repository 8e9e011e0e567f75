"""The Train tab's form: its keys, its values for a config, the config it describes, its checks, presets and
widgets. What each config field's widget is comes from studio/formspec.py (the model's ranges and choices).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gradio as gr

from lora_core.config import ConfigError, TrainConfig
from lora_core.config_paths import data_paths
from lora_core.configfile import parse_config
from studio.form_words import plain_problems
from studio.formspec import FieldSpec, config_to_form, field_specs, form_to_config_dict, split_list
from studio.render import code
from studio.uploads import UploadLimits

if TYPE_CHECKING:
    from studio.jobs import Studio

ROOT = Path(__file__).resolve().parent.parent
PRESETS = ROOT / "presets"
DEMO_PRESET = PRESETS / "demo-toy-cpu.json"
SHIPPED_PRESETS = {"demo-toy-cpu", "sd15-character", "sd15-style", "sdxl-character"}
USER_PRESETS = ".presets"  # under the outputs folder, so a read-only install can save presets; no run is named so
DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
# The built-in models the page offers (those a CPU trains in minutes). lora_core.builtin, which lists them all,
# imports torch, which the page's server never loads; a test checks these are its toy and tiny ones.
PAGE_BUILTINS = ("builtin:toy-sd", "builtin:tiny-sd", "builtin:tiny-sdxl", "builtin:tiny-flux",
                 "builtin:tiny-flux-schnell", "builtin:tiny-sd3")
# The form: the page's own widgets, then one per optional config field. Handlers get these as keywords.
PAGE_KEYS = ["dataset_path", "trigger_words", "base_model", "run_name", "length_by"]
SPECS = field_specs()
FORM_KEYS = PAGE_KEYS + [spec.name for spec in SPECS]


@dataclass
class PageSettings:
    """What the page starts with and what it accepts, decided at launch."""

    initial: dict[str, Any]  # form values
    upload_limits: UploadLimits
    datasets_root: Path | None = None  # when set, server folders must be inside it (uploads always allowed)


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
    try:
        data = form_to_config_dict(form, form.get("length_by") or "steps")
    except ConfigError as error:  # a JSON field that does not parse: said at it, the rest still checked
        problems += error.problems
        data = form_to_config_dict({**form, **{field: "" for field, _ in error.problems}},
                                   form.get("length_by") or "steps")
    try:
        data["output_path"] = str(studio.run_folder(str(form.get("run_name") or "")))
    except ValueError as error:
        problems.append(("run_name", str(error)))
    problems += data_path_problems(data, studio, settings)
    try:
        config = parse_config(data, strict=False)  # the widgets give numbers as floats
    except ConfigError as error:  # in the page's words where pydantic's are the problem
        problems = (plain_problems(data) or error.problems) + problems
    if problems:
        raise ConfigError(problems)
    return config


def dataset_folder_problem(folder: str, studio: Studio, settings: PageSettings) -> str | None:
    """Why a typed server folder may not be trained on (outside LORA_STUDIO_DATASETS), or None."""
    if not folder or settings.datasets_root is None:
        return None
    try:
        path = Path(folder).expanduser().resolve()
    except (OSError, ValueError, RuntimeError):  # a NUL byte, a link loop: the config's own check names it
        return None
    if path.is_relative_to(settings.datasets_root) or path.is_relative_to(studio.outputs_root):
        return None
    return f"this server only trains on uploads or folders inside {settings.datasets_root}; upload the images instead"


def data_path_problems(data: dict[str, Any], studio: Studio, settings: PageSettings) -> list[tuple[str, str]]:
    """(field, why) for every server path in a config dict outside what this server trains on: one check for
    every field the config model marks as a data path (lora_core.config.DATA_PATH), so a field added later is
    held to the datasets root as soon as it is marked."""
    return [(where, reason) for where, path in data_paths(TrainConfig, data)
            if (reason := dataset_folder_problem(path, studio, settings))]


def refuse_data_paths(config: TrainConfig, studio: Studio, settings: PageSettings | None) -> TrainConfig:
    """`config` as it is, or a ConfigError naming each data path outside what this server trains on: for a
    config read from a run's files (Resume, Rerun), which are data, held to the rule Start's form is."""
    problems = data_path_problems(config.model_dump(mode="json"), studio, settings) if settings else []
    if problems:
        raise ConfigError(problems)
    return config


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
    from lora_core import concepts

    try:
        report = dataset.scan(config.dataset_path, config.trigger_words, config.trigger_placement, decode=False)
        holdout.split(report, config)
        concepts.add_concepts(report, config)  # each concept's and the regularisation folder
    except dataset.DatasetError as error:
        return "dataset_path", f"{error} (nothing was queued)"
    except (holdout.HeldOutError, concepts.ConceptError) as error:
        return field_of(error.field), f"{error} (nothing was queued)"
    return None


def words_to_clear(previous_dataset: str, trigger_words: str, sample_prompts: str) -> str:
    """What an upload clears, in words ("" for nothing): the trigger words and sample prompts in the form
    when it already had a dataset, since they were that dataset's. With no dataset before, the user typed
    them for this upload, and they stay."""
    if not (previous_dataset or "").strip():
        return ""
    parts = []
    if (trigger_words or "").strip():
        parts.append(f"the trigger words {code(trigger_words.strip())}")
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


def widget(spec: FieldSpec, value: Any) -> gr.components.Component:
    """The widget of one config field, with the model's range and choices."""
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
    if spec.kind == "json":  # a list of objects, one a line; a problem shows at the field (`validation`)
        return gr.Textbox(value=value, lines=4, max_lines=16, placeholder=JSON_PLACEHOLDER, **common)
    return gr.Textbox(value=value, lines=3 if spec.kind == "lines" else 1, **common)


JSON_PLACEHOLDER = '[\n{"path": "/data/second", "trigger_words": ["qlc"], "repeats": 2}\n]'

