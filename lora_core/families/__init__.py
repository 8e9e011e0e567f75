"""Model families: each family (SD 1.x, SD 2.x, SDXL, SD 3.x, FLUX.1) is one module here, registered by name.

A family says how to recognise its models (from a diffusers folder's configs or a single file's keys), which
pipeline class loads them, how its denoiser (UNet or transformer) is called and trained (the objective), which
modules get adapters, how captions become conditioning, how its adapters are named in the exported file, and
how samples are drawn. The engine asks the family of the run (`get(plan.info.family)`) and never tests a
family's name itself. See docs/families.md for how to add one.
"""

from __future__ import annotations

from lora_core.families.base import Family
from lora_core.families.flux import Flux
from lora_core.families.sd1 import SD1
from lora_core.families.sd2 import SD2
from lora_core.families.sd3 import SD3
from lora_core.families.sdxl import SDXL

__all__ = ["Family", "detect_folder", "detect_single_file", "get", "names", "register"]

_REGISTRY: dict[str, Family] = {}


def register(family: Family) -> Family:
    _REGISTRY[family.name] = family
    return family


def get(name: str) -> Family:
    if name not in _REGISTRY:
        raise KeyError(f"unknown model family {name!r}; registered: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def names() -> list[str]:
    return list(_REGISTRY)


def _by_priority() -> list[Family]:
    return sorted(_REGISTRY.values(), key=lambda family: family.detect_priority)


def detect_folder(index: dict, denoiser_config: dict) -> Family | None:
    """The family of a diffusers folder, from its model_index.json and its denoiser's config.json (unet/ or
    transformer/); None when no registered family matches (a Qwen-Image or Z-Image folder, say)."""
    return next((family for family in _by_priority() if family.matches_folder(index, denoiser_config)), None)


def detect_single_file(keys: list[str]) -> Family | None:
    """The family of a single-file checkpoint from its tensor names; None when none matches."""
    return next((family for family in _by_priority() if family.matches_single_file(keys)), None)


for _family in (Flux(), SD3(), SDXL(), SD2(), SD1()):
    register(_family)
