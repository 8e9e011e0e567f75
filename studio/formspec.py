"""The form a face shows for `TrainConfig`: one widget per field, its range and choices read from the model.

No UI library here: `field_specs()` says *what* each field needs (slider, number, dropdown, checkbox,
text) and the web page turns that into widgets. Converting between form values and config dicts lives
here too, so the page and its tests agree on it.
"""

from __future__ import annotations

import json
import typing
from dataclasses import dataclass
from typing import Any, Literal

from lora_core.config import LENGTH_FIELDS, REQUIRED_FIELDS, ConfigError, TrainConfig, non_null_schema, range_text
from lora_core.configfile import config_to_file_dict

Kind = Literal["slider", "number", "dropdown", "checkbox", "text", "lines", "json"]
SLIDER_MAX_POSITIONS = 2048  # a wider range is a number box: a slider cannot hit 1 of 1,000,000 steps
LENGTH_CHOICES = LENGTH_FIELDS  # which of the two decides the run length (see plan.run_length)
LABEL_WORDS = {"lora": "LoRA", "lr": "LR", "adam": "AdamW", "vae": "VAE"}


@dataclass(frozen=True)
class FieldSpec:
    name: str
    kind: Kind
    label: str
    description: str
    group: str  # basic | advanced | sampling
    default: Any
    integer: bool = False
    minimum: float | None = None  # inclusive bounds, for sliders and number boxes
    maximum: float | None = None
    step: float | None = None
    choices: tuple[str, ...] | None = None
    range_text: str = ""  # the model's range in words, exclusive bounds included
    families: tuple[str, ...] | None = None  # the model families it applies to (the config's hint); None: all

    def applies_to(self, family: str | None) -> bool:
        """Whether the form shows it for a model of `family` (None: no model known yet, so only the fields of
        every family)."""
        return self.families is None or family in self.families


def _label(name: str) -> str:
    words = [LABEL_WORDS.get(word, word) for word in name.split("_")]
    return " ".join([words[0][:1].upper() + words[0][1:], *words[1:]])


def _range_text(schema: dict[str, Any]) -> str:
    return range_text(schema, _number)


def _number(value: float | None) -> str:
    if value is None:
        return "…"
    return str(value) if isinstance(value, int) else f"{value:g}"


def _spec(name: str, schema: dict[str, Any]) -> FieldSpec:
    schema = non_null_schema(schema)
    info = TrainConfig.model_fields[name]
    extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
    default = extra.get("form_default", info.get_default(call_default_factory=True))  # steps/epochs: not None
    families = tuple(extra["families"]) if extra.get("families") else None
    common = dict(name=name, label=_label(name), description=info.description or "", group=str(extra.get("group",
                  "advanced")), default=default, range_text=_range_text(schema), families=families)
    if "enum" in schema:
        return FieldSpec(kind="dropdown", choices=tuple(schema["enum"]), **common)
    kind = schema.get("type")
    if kind == "boolean":
        return FieldSpec(kind="checkbox", **common)
    if extra.get("editor") == "json":  # a list of objects (concepts): edited as JSON, checked at the field
        return FieldSpec(kind="json", **{**common, "default": json_text(common["default"])})
    if kind == "array":
        return FieldSpec(kind="lines", **common)
    if kind not in ("integer", "number"):  # an unset optional one is an empty box (None would make the API
        return FieldSpec(kind="text", **{**common, "default": common["default"] or ""})  # argument required)
    integer = kind == "integer"
    low, high = schema.get("minimum"), schema.get("maximum")
    step = extra.get("step") or schema.get("multipleOf") or (1 if integer else None)
    if low is not None and high is not None and step and (high - low) / step <= SLIDER_MAX_POSITIONS:
        return FieldSpec(kind="slider", integer=integer, minimum=low, maximum=high, step=step, **common)
    # number boxes keep exclusive bounds out of minimum/maximum: the model's message reports them
    return FieldSpec(kind="number", integer=integer, minimum=low, maximum=high, step=step, **common)


def field_specs() -> list[FieldSpec]:
    """Every optional field of the config, in the model's order. The required ones (dataset, model,
    output folder, trigger words) have dedicated widgets on the page."""
    properties = TrainConfig.model_json_schema()["properties"]
    return [_spec(name, properties[name]) for name in TrainConfig.model_fields if name not in REQUIRED_FIELDS]


# ----------------------------------------------------------------------------------------------------
# form values <-> config


def _is_list_field(name: str) -> bool:
    return typing.get_origin(TrainConfig.model_fields[name].annotation) is list


def _is_optional(name: str) -> bool:
    return type(None) in typing.get_args(TrainConfig.model_fields[name].annotation)


def split_list(name: str, text: Any) -> Any:
    """Trigger words are comma-separated on the page; other lists (sample prompts) one per line."""
    if not isinstance(text, str):
        return text
    parts = text.split(",") if name == "trigger_words" else text.splitlines()
    return [part.strip() for part in parts if part.strip()]


def join_list(name: str, items: list[str]) -> str:
    return (", " if name == "trigger_words" else "\n").join(items)


def _is_json_field(name: str) -> bool:
    extra = TrainConfig.model_fields[name].json_schema_extra
    return isinstance(extra, dict) and extra.get("editor") == "json"


def json_text(value: Any) -> str:
    """A JSON field's text in the form: one object a line, or empty for an empty list."""
    if not value:
        return ""
    return "[\n" + ",\n".join(json.dumps(item, ensure_ascii=False) for item in value) + "\n]"


def parse_json_field(name: str, text: Any) -> Any:
    """A JSON field's value from its text (empty: an empty list); ConfigError at the field when it is not JSON."""
    if not isinstance(text, str):
        return text
    if not text.strip():
        return []
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ConfigError([(name, f"is not valid JSON ({error.msg} at line {error.lineno}, column {error.colno}); "
                            'give a list of objects such as [{"path": "/data/cat", "trigger_words": ["zwx"]}]')]
                          ) from None


def form_to_config_dict(form: dict[str, Any], length_by: str = "steps") -> dict[str, Any]:
    """A flat config dict from form values: list fields split (JSON ones parsed), and only one of steps/epochs
    given, so the run length means the same as in a config file that gives only that one."""
    data = {}
    for name, value in form.items():
        if name not in TrainConfig.model_fields:
            continue
        if _is_json_field(name):
            data[name] = parse_json_field(name, value)
            continue
        if isinstance(value, str) and not value.strip() and _is_optional(name):
            value = None  # an empty text box of an optional field (validation_images) means "not set"
        data[name] = split_list(name, value) if _is_list_field(name) else value
    data.pop("epochs" if length_by == "steps" else "steps", None)
    return data


def config_to_form(config: TrainConfig) -> tuple[dict[str, Any], str]:
    """Form values for every field (lists joined; an unset length shows its form default) and which of
    steps/epochs decides the length."""
    specs = {spec.name: spec for spec in field_specs()}
    values = {name: json_text(value) if _is_json_field(name) else join_list(name, value) if _is_list_field(name)
              else value for name, value in config.model_dump().items()}
    for name in LENGTH_FIELDS:
        if values[name] is None:
            values[name] = specs[name].default
    for name, spec in specs.items():
        if values[name] is None and spec.kind == "text":
            values[name] = ""
    length_by = "epochs" if config.steps is None and config.epochs is not None else "steps"
    return values, length_by


def config_file_dict(config: TrainConfig) -> dict[str, Any]:
    """The config file form, which `train_lora.py --config` accepts unchanged (a length not given is left
    out, so the file means the same run)."""
    return config_to_file_dict(config)


# ----------------------------------------------------------------------------------------------------
# the Advanced section, grouped

ADVANCED_TABS: dict[str, tuple[str, ...]] = {
    "Optimizer": ("optimizer", "lr_scheduler", "lr_scheduler_num_cycles", "lr_warmup_steps", "adam_weight_decay",
                  "max_grad_norm", "gradient_accumulation_steps", "min_snr_gamma", "noise_offset",
                  "zero_terminal_snr", "seed"),
    "LoRA": ("network_type", "lokr_factor", "lora_target", "lora_dropout", "use_dora", "train_text_encoder",
             "text_encoder_lr"),
    "Loss and noise": ("loss_type", "huber_schedule", "huber_c", "huber_scale", "debiased_estimation_loss",
                       "min_timestep", "max_timestep", "multires_noise_iterations", "multires_noise_discount"),
    "LoRA+, dropouts and blocks": ("loraplus_lr_ratio", "network_dropout", "rank_dropout", "module_dropout",
                                   "down_lr_weight", "mid_lr_weight", "up_lr_weight", "block_dims", "block_alphas",
                                   "conv_block_dims", "conv_block_alphas"),
    "Data": ("min_bucket_resolution", "max_bucket_resolution", "bucket_no_upscale", "crop", "flip_horizontal",
             "latent_cache"),
    "Captions": ("trigger_placement", "shuffle_tags", "keep_tokens", "caption_dropout"),
    "EMA and loss masks": ("ema_decay", "ema_update_every", "ema_use_for_final", "mask_source", "mask_floor"),
    "Precision and memory": ("device", "mixed_precision", "gradient_checkpointing", "compile_unet", "cuda_graphs",
                             "base_quantization", "memory_mode", "offload_blocks"),
    "Flow matching": ("timestep_sampling", "logit_mean", "logit_std", "mode_scale", "sigmoid_scale",
                      "discrete_flow_shift", "loss_weighting", "precondition_outputs", "flux_guidance",
                      "max_sequence_length", "use_t5_encoder"),
    "Concepts and preservation": ("concepts", "regularization_path", "regularization_repeats", "prior_loss_weight",
                                  "preservation_prompt", "preservation_weight"),
    "Checkpoints and logs": ("keep_checkpoints", "max_nonfinite_steps", "progress_steps", "log_with"),
}
OTHER_TAB = "Other"  # a field added to the config later shows here until it is given a tab


def advanced_tabs(specs: list[FieldSpec]) -> dict[str, list[FieldSpec]]:
    """The advanced fields by tab, in the tabs' order; every advanced field is in exactly one tab."""
    tab_of = {name: tab for tab, names in ADVANCED_TABS.items() for name in names}
    tabs: dict[str, list[FieldSpec]] = {tab: [] for tab in [*ADVANCED_TABS, OTHER_TAB]}
    for spec in specs:
        if spec.group == "advanced":
            tabs[tab_of.get(spec.name, OTHER_TAB)].append(spec)
    return {tab: items for tab, items in tabs.items() if items}
