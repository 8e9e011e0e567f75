"""The form's problems in plain words: pydantic's messages ("String should have at least 1 character") rewritten
per error type into a sentence that names the field by its label on the page and says what to do.

The engine's own messages (a family refusing an option, two options that disagree) are already written for
people and pass through unchanged. No Gradio here: the Train tab shows these next to Start and at the fields.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from lora_core.config import FieldConflict, TrainConfig
from studio.formspec import field_specs

PAGE_LABELS = {"dataset_path": "Dataset folder", "trigger_words": "Trigger words", "base_model": "Base model",
               "run_name": "Run name", "output_path": "Run name"}
EMPTY_HINTS = {"dataset_path": "upload images (or a .zip) above, or type the folder that holds them",
               "trigger_words": "type a word or two that will call up what the images show, e.g. zwx",
               "base_model": "pick one from the list"}


def label_of(field: str) -> str:
    """The page's label of a config field (`learning_rate` -> "Learning rate")."""
    top = field.split(".")[0]
    if top in PAGE_LABELS:
        return PAGE_LABELS[top]
    return next((spec.label for spec in field_specs() if spec.name == top), top)


def _number(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def plain_message(item: dict[str, Any]) -> str:
    """One pydantic error (an item of `ValidationError.errors()`) as a sentence naming the field's label."""
    field = str(item["loc"][0]) if item["loc"] else "config"
    label, kind, ctx = label_of(field), item["type"], item.get("ctx") or {}
    got = item.get("input")
    shown = "" if got is None or isinstance(got, dict | list) else f" (you gave {_number(got)})"
    if kind in ("string_too_short", "too_short", "missing") or (kind == "list_type" and not got):
        hint = EMPTY_HINTS.get(field, "fill it in")
        return f"{label} {'are' if label.endswith('words') else 'is'} empty: {hint}."
    bounds = {"greater_than_equal": ("at least", "ge"), "greater_than": ("more than", "gt"),
              "less_than_equal": ("at most", "le"), "less_than": ("less than", "lt")}
    if kind in bounds:
        words, key = bounds[kind]
        return f"{label} must be {words} {_number(ctx.get(key))}{shown}."
    if kind == "multiple_of":
        step = ctx.get("multiple_of")
        if isinstance(got, int | float) and step:
            nearest = max(step, round(got / step) * step)
            return f"{label} must be a multiple of {_number(step)}{shown}; the nearest is {_number(nearest)}."
        return f"{label} must be a multiple of {_number(step)}{shown}."
    if kind in ("int_parsing", "int_from_float", "int_type"):
        return f"{label} must be a whole number{shown}."
    if kind in ("float_parsing", "float_type"):
        return f"{label} must be a number{shown}."
    if kind in ("literal_error", "enum"):
        return f"{label} must be one of {ctx.get('expected', 'the listed choices')}{shown}."
    if kind == "string_too_long":
        return f"{label} is too long: at most {ctx.get('max_length')} characters."
    message = str(item.get("msg", "")).removeprefix("Value error, ")
    return f"{label}: {message}"


def plain_problems(data: dict[str, Any]) -> list[tuple[str, str]] | None:
    """(field, plain words) for each problem pydantic finds in a flat config dict, validated as the page does
    (not strict: widgets give numbers as floats); None when the model accepts it (a problem found elsewhere)."""
    try:
        TrainConfig.model_validate(data, strict=False)
    except ValidationError as error:
        problems = []
        for item in error.errors():
            if len(item["loc"]) == 2 and item["loc"][1] in ("int", "float") and any(
                    field == item["loc"][0] for field, _ in problems):
                continue  # `int | float`: one problem, not one per type
            if isinstance(conflict := (item.get("ctx") or {}).get("error"), FieldConflict):
                problems += [(field, f"{label_of(field)}: {conflict}") for field in conflict.fields]
            elif item["loc"]:
                problems.append((str(item["loc"][0]), plain_message(item)))
        return problems or None
    return None


def refusal(problems: list[tuple[str, str]]) -> str:
    """What the note next to Start says when the form cannot start (Markdown)."""
    if not problems:
        return ""
    lines = [f"- {message}" for message in dict.fromkeys(message for _, message in problems)]
    return "**Not started.** Fix this first:\n\n" + "\n".join(lines)
