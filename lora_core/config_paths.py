"""Which config fields are paths on the server a page user picks data from: the one marker every such field
carries, and the paths a config names in them (the datasets-root check, studio/train_form.py; the uploads
cleanup, studio/cleanup.py). Torch-free, and imported by the config modules themselves."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

# Marks a field (in its json_schema_extra, e.g. `_ui("basic", **DATA_PATH)`) whose value is a path on the server
# that a page user picks to read data from: a server holds every such field to its datasets root
# (LORA_STUDIO_DATASETS, studio/train_form.py), by this marker alone. Mark every new path field of this kind.
# A list of objects (`concepts`) is marked {DATA_PATH_KEY: "path"}: each item's folder is under that key.
DATA_PATH_KEY = "data_path"
DATA_PATH: dict[str, Any] = {DATA_PATH_KEY: True}


def data_path_fields(model: type[BaseModel]) -> list[str]:
    """The fields of `model` marked DATA_PATH (a str, a list of str, or a list of objects with a path)."""
    return [name for name, info in model.model_fields.items()
            if isinstance(info.json_schema_extra, dict) and info.json_schema_extra.get(DATA_PATH_KEY)]


def data_paths(model: type[BaseModel], data: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, path) for every data path a config dict names in `model`'s marked fields: the field itself, or
    `field.N.key` for the items of a list of objects (`concepts`) whose marker names their path's key."""
    found = []
    for name in data_path_fields(model):
        mark, value = model.model_fields[name].json_schema_extra[DATA_PATH_KEY], data.get(name)
        items = value if isinstance(value, list | tuple) else [value]
        for index, item in enumerate(items):
            if isinstance(mark, str) and isinstance(item, dict):
                where, item = f"{name}.{index}.{mark}", item.get(mark)
            else:
                where = name
            if isinstance(item, str) and item:
                found.append((where, item))
    return found
