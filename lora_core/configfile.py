"""Config files in and out: reading a JSON config (strictly, as hostile input), the file form a run writes,
and what is generated from the model (`config_schema.json`, the README's option table).

The rules themselves live in `config.TrainConfig`; this module only turns files and dicts into it and back.
"""

from __future__ import annotations

import difflib
import json
import stat
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from lora_core.config import (
    LENGTH_FIELDS,
    MAX_CONFIG_BYTES,
    MAX_SHOWN_CHARS,
    NESTED_KEY,
    REQUIRED_FIELDS,
    ConfigError,
    FieldConflict,
    TrainConfig,
    allowed_range,
)
from lora_core.safefile import open_regular


def _problems_from(error: ValidationError) -> list[tuple[str, str]]:
    problems = []
    known = list(TrainConfig.model_fields)
    for item in error.errors():
        if isinstance(conflict := item.get("ctx", {}).get("error"), FieldConflict):
            problems.extend((field, str(conflict)) for field in conflict.fields)
            continue
        field = ".".join(str(part) for part in item["loc"]) or "config"
        top = str(item["loc"][0]) if item["loc"] else ""
        if len(item["loc"]) == 2 and item["loc"][1] in ("int", "float"):  # `int | float`: one problem, not two
            if any(known_field == top for known_field, _ in problems):
                continue
            field, item = top, {**item, "msg": "Input should be a number"}
        if item["type"] == "extra_forbidden":
            name, names = (top, known) if len(item["loc"]) == 1 else (str(item["loc"][-1]), _item_fields(top))
            close = difflib.get_close_matches(name, names, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; known fields: {', '.join(names)}"
            problems.append((field, f"unknown field{hint}"))
            continue
        if item["type"] == "missing":
            problems.append((field, "is required"))
            continue
        message = item["msg"]
        allowed = allowed_range(top)
        got = item.get("input")
        got_text = _shown(got) if isinstance(got, str | int | float | bool | None) else type(got).__name__
        problems.append((field, f"{message} (got {got_text}{'; ' + allowed if allowed else ''})"))
    return problems


def _item_fields(name: str) -> list[str]:
    """The fields of the objects a list field holds (`concepts`: path, trigger_words, ...), else none."""
    info = TrainConfig.model_fields.get(name)
    item = next(iter(typing.get_args(info.annotation)), None) if info is not None else None
    return list(item.model_fields) if isinstance(item, type) and issubclass(item, BaseModel) else []


def _shown(value: Any) -> str:
    """A value as JSON for an error message, cut short: a megabyte path is not echoed back whole."""
    text = json.dumps(value) if not isinstance(value, int) or abs(value) < 10**100 else "a huge number"
    return text if len(text) <= MAX_SHOWN_CHARS else f"{text[:MAX_SHOWN_CHARS]}… ({len(text)} characters)"


def flatten(data: Any, source: str | None = None) -> dict[str, Any]:
    """Merge `training_params` into the top level; a field given in both places must agree."""
    if not isinstance(data, dict):
        raise ConfigError([("config", f"must be a JSON object, got {type(data).__name__}")], source)
    flat = {key: value for key, value in data.items() if key != NESTED_KEY}
    nested = data.get(NESTED_KEY, {})
    if not isinstance(nested, dict):
        raise ConfigError([(NESTED_KEY, "must be a JSON object of training options")], source)
    for key, value in nested.items():
        if key in REQUIRED_FIELDS:
            raise ConfigError([(f"{NESTED_KEY}.{key}", "belongs at the top level, not in training_params")], source)
        if key in flat and flat[key] != value:
            raise ConfigError([(key, f"given twice with different values ({_shown(flat[key])} and "
                                     f"{NESTED_KEY}.{key}={_shown(value)}); keep one")], source)
        flat[key] = value
    return flat


def parse_config(data: Any, source: str | None = None, strict: bool = True) -> TrainConfig:
    """Validate a config mapping (flat or nested). Raises ConfigError naming each bad field.

    `strict`: types as JSON has them (no "2" for 2, no true for 1); the page passes False for its widgets."""
    try:
        return TrainConfig.model_validate(flatten(data, source), strict=strict)
    except ValidationError as error:
        raise ConfigError(_problems_from(error), source) from None
    except RecursionError:
        raise ConfigError([("config", "is nested too deeply to check; a config is a flat JSON object of "
                                      "options")], source) from None


def load_config(path: str | Path) -> TrainConfig:
    """Read and validate a JSON config file; every way it can be unusable is a ConfigError naming it."""
    shown = _shown_path(path)

    def problem(message: str) -> ConfigError:
        return ConfigError([("config", message)], shown)

    try:
        path = Path(path)
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):
            raise problem(f"{shown} is not a regular file; give the path of a .json config file")
        if info.st_size > MAX_CONFIG_BYTES:
            raise problem(f"{shown} is {info.st_size} bytes; a config is a few kB of JSON (at most "
                          f"{MAX_CONFIG_BYTES} bytes)")
        with open_regular(path, follow_links=True) as handle:  # checked again on the open file, never blocking
            raw = handle.read(MAX_CONFIG_BYTES + 1)
    except OSError as error:
        raise problem(f"cannot read {shown}: {error.strerror or error}") from None
    except ValueError as error:  # a NUL byte in the path
        raise problem(f"cannot read {shown}: {error}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise problem(f"{shown} is not UTF-8 text (byte 0x{raw[error.start]:02x} at offset {error.start}); "
                      "save it as UTF-8") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise problem(f"{shown} is not valid JSON: {error.msg} at line {error.lineno} column "
                      f"{error.colno}") from None
    except RecursionError:
        raise problem(f"{shown} is nested too deeply to read; a config is a flat JSON object of options") from None
    except ValueError as error:  # e.g. an integer of more digits than Python converts
        raise problem(f"{shown} is not a usable JSON config: {error}") from None
    return parse_config(data, shown)


def _shown_path(path: Any) -> str:
    text = str(path).replace("\x00", "\\0")
    return text if len(text) <= MAX_SHOWN_CHARS else f"{text[:MAX_SHOWN_CHARS]}… ({len(text)} characters)"


def config_to_file_dict(config: TrainConfig) -> dict[str, Any]:
    """The nested file form: required fields at the top, the rest under training_params."""
    values = config.model_dump(mode="json")
    for name in LENGTH_FIELDS:  # not given: left out, so the file means the same run
        if values[name] is None:
            del values[name]
    top = {key: values.pop(key) for key in REQUIRED_FIELDS}
    return {**top, NESTED_KEY: values}


def json_schema() -> dict[str, Any]:
    """JSON Schema of the config *file*: the model's schema plus the optional `training_params` nesting."""
    schema = TrainConfig.model_json_schema()
    optional = {key: value for key, value in schema["properties"].items() if key not in REQUIRED_FIELDS}
    schema["properties"][NESTED_KEY] = {
        "type": "object",
        "description": "The optional fields may be given here instead of at the top level.",
        "properties": optional,
        "additionalProperties": False,
    }
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return schema


def write_schema(path: str | Path) -> None:
    from lora_core.files import atomic_write_text

    atomic_write_text(Path(path), json.dumps(json_schema(), indent=2) + "\n")


def options_table() -> str:
    """The README's option table, generated from the model so that it cannot drift."""
    properties = TrainConfig.model_json_schema()["properties"]
    rows = ["| option | default | allowed | what it does |", "| --- | --- | --- | --- |"]
    for name, info in TrainConfig.model_fields.items():
        schema = properties[name]
        default = "required" if info.is_required() else json.dumps(info.get_default(call_default_factory=True))
        allowed = allowed_range(name).removeprefix("allowed range ").removeprefix("choose one of ")
        if not allowed:
            allowed = schema.get("allowed") or {"boolean": "true / false", "array": "list of strings"}.get(
                schema.get("type"), "text")
        rows.append(f"| `{name}` | {default} | {allowed} | {info.description} |")
    return "\n".join(rows)
