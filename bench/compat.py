"""The few places where the benchmark's harness meets an engine whose layout has since changed.

`python -m bench compare` runs this harness (reference, floor, timing) against an earlier commit's `lora_core`,
so that both commits are measured by the same yardstick. The engine's own code is never patched: only where
the harness looks for a function, and which config fields it sets, follow the engine it finds.
"""

from __future__ import annotations

import importlib
from typing import Any


def parse_config(data: dict[str, Any]):
    """The engine's config parser, given only the fields its TrainConfig knows (an earlier engine refuses the
    later ones, such as cuda_graphs), with compile_unet as the bool an earlier engine took."""
    try:
        from lora_core.configfile import parse_config as parse
    except ImportError:  # before the config file reader moved out of config.py (2026-12-01)
        from lora_core.config import parse_config as parse
    from lora_core.config import TrainConfig

    fields = TrainConfig.model_fields
    known = {key: value for key, value in data.items() if key in fields}
    dropped = {key: value for key, value in data.items() if key not in fields}
    if any(value not in (None, False, "off") for value in dropped.values()):
        raise ValueError(f"this engine has no {sorted(dropped)}: measure it without them")
    compile_field = fields.get("compile_unet")
    if compile_field is not None and compile_field.annotation is bool and isinstance(known["compile_unet"], str):
        if known["compile_unet"] == "auto":
            raise ValueError("this engine's compile_unet is on or off: it has no auto")
        known["compile_unet"] = known["compile_unet"] == "on"
    return parse(known)


def prepare_unet():
    """The function that prepares the UNet for the fit loop: setup.py since the engine reshape, training.py
    before it. The floor must use the one the trainer it is compared with uses."""
    for module in ("lora_core.setup", "lora_core.training"):
        try:
            return importlib.import_module(module).prepare_unet
        except (ImportError, AttributeError):
            continue
    raise ImportError("no prepare_unet in lora_core.setup or lora_core.training")
