"""Where a single-file base model's missing parts come from: `pipeline_components`, a diffusers folder or a
Hugging Face hub id (FLUX.1's transformer-only `flux1-dev.safetensors` takes its text encoders, VAE, tokenizers
and scheduler from black-forest-labs/FLUX.1-dev; an SD 3.5 file without its text encoders takes them from
stabilityai/stable-diffusion-3.5-medium). The family says what a file lacks (`Family.single_file_missing`);
from a hub id only the configs and the missing parts' weights are downloaded (only the configs for
--validate-only), never the weights the file already holds.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from lora_core import families, models

if TYPE_CHECKING:
    from lora_core.config import TrainConfig

FIELD = "pipeline_components"
TOKENIZER_PATTERNS = ["*/*.txt", "*/*.model"]  # CLIP merges, T5 sentencepiece (the rest of a tokenizer is JSON)


class ComponentsError(models.ModelError):
    """`pipeline_components` cannot supply what the single file lacks."""

    field = FIELD


def resolve_base_model(config: TrainConfig, configs_only: bool = False
                       ) -> tuple[models.ModelSource, models.ModelInfo]:
    """`base_model` resolved and inspected, with `pipeline_components` resolved beside a single file; a file
    that lacks parts with nothing to take them from is refused here, before anything loads."""
    source = models.resolve(config.base_model, configs_only=configs_only)
    info = models.inspect(source)
    family = families.get(info.family)
    if config.pipeline_components is None:
        if source.kind == "single_file" and (missing := _missing(source, family, config)):
            raise ComponentsError(models.missing_parts_message(source.name, family, missing, info.variant))
        return source, info
    if source.kind != "single_file":
        raise ComponentsError(f"only a single-file base_model takes parts from pipeline_components; "
                              f"{config.base_model} is a whole model already: clear pipeline_components")
    folder = _folder(config.pipeline_components, _missing(source, family, config), configs_only)
    _check_same_model(folder, info, config)
    return replace(source, components=folder), info


def _missing(source: models.ModelSource, family: families.Family, config: TrainConfig) -> dict[str, str]:
    return family.single_file_missing(models.single_file_keys(Path(source.location)), config)


def _folder(value: str, missing: dict[str, str], configs_only: bool) -> str:
    """A local diffusers folder holding the configs (and, unless configs_only, the missing parts' weights)."""
    path = Path(value).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ComponentsError(f"{value}: folder has no model_index.json; give the model's diffusers folder "
                                  "(with model_index.json, vae/, text_encoder/, tokenizer/, scheduler/, ...)")
        return str(path)
    if value.startswith((".", "/", "~")) or not models.HUB_ID.match(value):
        raise ComponentsError(f"{value}: no such folder, and not a Hugging Face hub id (owner/name)")
    weights = [] if configs_only else [f"{part}/*.safetensors" for part in missing]
    try:
        return models.download(value, models.CONFIG_PATTERNS + TOKENIZER_PATTERNS + weights)
    except models.ModelError as error:
        raise ComponentsError(str(error)) from None


def _check_same_model(folder: str, info: models.ModelInfo, config: TrainConfig) -> None:
    """The components must be the file's own family and variant: another model's encoders or transformer
    config would load wrongly or fail deep inside diffusers."""
    try:
        index = models.read_json(Path(folder) / "model_index.json")
        denoiser_name = "transformer" if "transformer" in index else "unet"
        denoiser = models.read_json(Path(folder) / denoiser_name / "config.json")
    except models.ModelError as error:
        raise ComponentsError(str(error)) from None
    family, theirs = families.detect_folder(index, denoiser), families.get(info.family)
    if family is None or family is not theirs or family.variant(denoiser) != info.variant:
        found = "a model of no family the studio trains" if family is None else \
            models.ModelInfo(family.name, "", 8, 1, family.variant(denoiser)).description
        raise ComponentsError(f"{config.pipeline_components} is {found}, but {config.base_model} is a "
                              f"{info.description} file; give the parts of the file's own model")
