"""Base models: where `base_model` points, which family it is, and loading its parts.

Accepted: `builtin:<name>`, a Hugging Face hub id, a local diffusers folder, a single-file `.safetensors`.
Only safetensors weights are ever loaded: a pickle (`.ckpt`, `.pt`, `.bin`) can run code when opened.
The family is read from the model itself, never from its name.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from lora_core import builtin, families
from lora_core.errors import UserError
from lora_core.notices import quiet_library_notices

PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin", ".pkl"}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
HUB_PATTERNS = ["model_index.json", "*/*.json", "*/*.txt", "*/diffusion_pytorch_model.safetensors",
                "*/diffusion_pytorch_model-*.safetensors", "*/model.safetensors", "*/model-*.safetensors"]
CONFIG_PATTERNS = ["model_index.json", "*/*.json"]


class ModelError(UserError):
    """A base model that cannot be used; the message says why and what to do."""

    field = "base_model"


@dataclass
class ModelSource:
    kind: str  # builtin | folder | single_file | hub
    location: str  # folder or file path after resolution, or the hub id
    name: str  # what the user wrote


@dataclass
class ModelSizes:
    """Parameter counts, read from configs on the meta device (no weights are loaded)."""

    unet_params: int
    vae_params: int
    text_params: int
    # per lora_target: the UNet LoRA's parameters per unit of rank (in + out features of each adapted linear,
    # in x kernel area + out of each conv), and the output channels (DoRA's magnitudes)
    lora_params_per_rank: dict[str, int]
    lora_outputs: dict[str, int]
    text_lora_params_per_rank: int  # the same for the text encoders' attention projections
    text_lora_outputs: int
    activation_units: float  # what the UNet's saved activations scale with (see activation_units())


@dataclass
class ModelInfo:
    family: str  # sd1 | sd2 | sdxl
    prediction_type: str  # epsilon | v_prediction
    vae_scale_factor: int
    unet_down_levels: int

    @property
    def pixel_multiple(self) -> int:
        """Image sides must be a multiple of this for the latents to pass every down block."""
        return self.vae_scale_factor * 2 ** (self.unet_down_levels - 1)

    @property
    def description(self) -> str:
        suffix = " (v-prediction)" if self.prediction_type == "v_prediction" else ""
        return families.get(self.family).display_name + suffix


def resolve(base_model: str, configs_only: bool = False) -> ModelSource:
    """Turn `base_model` into a local folder or file; a hub model is downloaded (only its configs when
    `configs_only`, which is how --validate-only checks that the hub is reachable)."""
    if base_model.startswith(builtin.PREFIX):
        name = base_model[len(builtin.PREFIX):]
        if name not in builtin.BUILTINS:
            raise ModelError(f"unknown built-in model '{base_model}'; choose one of {', '.join(builtin.names())}")
        spec = builtin.BUILTINS[name]
        location = str(builtin.builtin_folder(name)) if spec.cacheable else name
        return ModelSource("builtin", location, base_model)
    path = Path(base_model).expanduser()
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise ModelError(f"{base_model}: pickle checkpoints ({path.suffix}) can run arbitrary code when loaded and "
                         "are refused; convert it to .safetensors or use a diffusers folder")
    if path.is_file():
        if path.suffix.lower() != ".safetensors":
            raise ModelError(f"{base_model}: a single-file model must be a .safetensors checkpoint")
        return ModelSource("single_file", str(path), base_model)
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ModelError(f"{base_model}: folder has no model_index.json; give a diffusers pipeline folder "
                             "(with unet/, vae/, text_encoder/, tokenizer/, scheduler/)")
        return ModelSource("folder", str(path), base_model)
    # a dot is fine in a hub id (stabilityai/stable-diffusion-xl-base-1.0); a missing .safetensors file is not one
    if path.suffix.lower() == ".safetensors" or base_model.startswith((".", "/", "~")) or not HUB_ID.match(
            base_model):
        raise ModelError(f"{base_model}: no such file or folder, and not a Hugging Face hub id (owner/name)")
    patterns = CONFIG_PATTERNS if configs_only else HUB_PATTERNS
    return ModelSource("folder", _download(base_model, patterns), base_model)


def _download(repo_id: str, patterns: list[str]) -> str:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return snapshot_download(repo_id, allow_patterns=patterns)
    except GatedRepoError:
        raise ModelError(f"{repo_id}: this hub model is gated; accept its licence on huggingface.co and log in "
                         "with `hf auth login`, or download it and pass the local folder") from None
    except RepositoryNotFoundError:
        raise ModelError(f"{repo_id}: no such model on the Hugging Face hub (or it is private)") from None
    except (LocalEntryNotFoundError, OSError) as error:
        raise ModelError(f"{repo_id}: cannot reach the Hugging Face hub and the model is not in the local cache "
                         f"({type(error).__name__}); connect to the internet, or download the model elsewhere "
                         "and pass its local folder") from None


def _read_json(path: Path, required: tuple[str, ...] = ()) -> dict[str, Any]:
    """A config file of a model folder, or a ModelError (field base_model) saying what is missing or broken."""
    top = path.name == "model_index.json"
    where, folder = (path.name, path.parent) if top else (f"{path.parent.name}/{path.name}", path.parent.parent)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(f"{folder}: the model folder has no {where}; it is not a complete diffusers pipeline "
                         "folder (unet/, vae/, text_encoder/, tokenizer/, scheduler/, each with its config): "
                         "download the whole model again") from None
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise ModelError(f"{path}: the model's {where} is not readable JSON ({error}); download the model "
                         "again") from None
    missing = [key for key in required if key not in data] if isinstance(data, dict) else list(required)
    if not isinstance(data, dict) or missing:
        raise ModelError(f"{path}: the model's {where} is not a diffusers config (missing "
                         f"{', '.join(missing) or 'its fields'}); download the model again")
    return data


def inspect(source: ModelSource) -> ModelInfo:
    """Read the family from the model's own configs (or weights, for a single file)."""
    if source.kind == "builtin" and source.location in builtin.BUILTINS:
        spec = builtin.BUILTINS[source.location]
        return ModelInfo(spec.family, "epsilon", 2 ** (len(spec.vae_channels) - 1), len(spec.unet_channels))
    if source.kind == "single_file":
        return _inspect_single_file(Path(source.location))
    folder = Path(source.location)
    index = _read_json(folder / "model_index.json")
    unet = _read_json(folder / "unet" / "config.json", ("block_out_channels",))
    vae = _read_json(folder / "vae" / "config.json")
    scheduler_file = folder / "scheduler" / "scheduler_config.json"
    scheduler = _read_json(scheduler_file) if scheduler_file.exists() else {}
    family = families.detect_folder(index, unet).name
    return ModelInfo(family, scheduler.get("prediction_type", "epsilon"),
                     2 ** (len(vae.get("block_out_channels", [0] * 4)) - 1), len(unet["block_out_channels"]))


def _inspect_single_file(path: Path) -> ModelInfo:
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as handle:
            keys = list(handle.keys())
    except Exception as error:  # safetensors raises its own error types for a damaged header
        raise ModelError(f"{path}: not a readable .safetensors file ({error})") from None
    family = families.detect_single_file(keys)
    if family is None:
        known = ", ".join(families.get(name).display_name for name in families.names())
        raise ModelError(f"{path}: not a Stable Diffusion checkpoint (no {known} text-encoder weights found); "
                         "is it a LoRA or a VAE?")
    # epsilon until loaded: the weights do not say (SD 2.1-768 is v-prediction, 2.1-base is not), the scheduler
    # config diffusers reads with them does (see with_loaded_prediction_type)
    return ModelInfo(family.name, "epsilon", 8, family.single_file_down_levels)


def with_loaded_prediction_type(info: ModelInfo, pipeline) -> ModelInfo:
    """The prediction type of the loaded pipeline's scheduler (what a single file gets from its family's
    configs)."""
    return replace(info, prediction_type=pipeline.scheduler.config.get("prediction_type", "epsilon"))


def load_pipeline(source: ModelSource, info: ModelInfo):
    """Load the whole diffusers pipeline on the CPU in fp32; the trainer moves and casts parts."""
    quiet_library_notices()
    family = families.get(info.family)
    if source.kind == "builtin" and source.location in builtin.BUILTINS:
        import tempfile

        with tempfile.TemporaryDirectory() as folder:
            return builtin.build_pipeline(source.location, Path(folder) / "tokenizer")
    kwargs: dict[str, Any] = {"use_safetensors": True, **family.load_kwargs()}
    pipeline_class = family.pipeline_class()
    if source.kind == "single_file":
        try:
            return pipeline_class.from_single_file(source.location, **kwargs)
        except Exception as error:
            raise ModelError(f"{source.name}: diffusers could not load this single-file checkpoint ({error}); "
                             "it needs the model's config from the hub the first time, or use a diffusers "
                             "folder") from None
    try:
        return pipeline_class.from_pretrained(source.location, **kwargs)
    except OSError as error:
        raise ModelError(f"{source.name}: could not load the pipeline ({error}); only .safetensors weights are "
                         "loaded, so a model shipped as .bin pickles must be converted first") from None


def text_encoders(pipeline) -> list:
    return [m for m in (getattr(pipeline, "text_encoder", None), getattr(pipeline, "text_encoder_2", None)) if m]


def model_sizes(source: ModelSource, info: ModelInfo) -> ModelSizes:
    """Count parameters by building the model on the meta device from its configs."""
    import tempfile

    import torch

    from lora_core.lora import TARGETS, TEXT_ENCODER_TARGETS

    with torch.device("meta"), tempfile.TemporaryDirectory() as scratch:
        if source.kind == "folder" or (source.kind == "builtin" and source.location not in builtin.BUILTINS):
            pipeline = _meta_pipeline(Path(source.location))
        else:
            # a built-in built in memory, or a single file: the real architecture of its family
            name = source.location if source.kind == "builtin" else families.get(info.family).single_file_builtin
            pipeline = builtin.build_pipeline(name, Path(scratch) / "tokenizer")
    unet, encoders = pipeline.unet, text_encoders(pipeline)
    unet_layers = {target: _adapted(unet, names) for target, names in TARGETS.items()}
    text_layers = [layer for encoder in encoders for layer in _adapted(encoder, TEXT_ENCODER_TARGETS)]
    return ModelSizes(
        unet_params=sum(p.numel() for p in unet.parameters()),
        vae_params=sum(p.numel() for p in pipeline.vae.parameters()),
        text_params=sum(p.numel() for encoder in encoders for p in encoder.parameters()),
        lora_params_per_rank={target: sum(i + o for i, o in layers) for target, layers in unet_layers.items()},
        lora_outputs={target: sum(o for _, o in layers) for target, layers in unet_layers.items()},
        text_lora_params_per_rank=sum(i + o for i, o in text_layers),
        text_lora_outputs=sum(o for _, o in text_layers),
        activation_units=activation_units(unet.config),
    )


def _adapted(model, targets: list[str]) -> list[tuple[int, int]]:
    """(inputs, outputs) of each layer a LoRA on `targets` adapts (peft's suffix match); a conv's inputs count
    its kernel area, as its LoRA down weight does."""
    import torch

    layers = []
    for name, module in model.named_modules():
        if not any(name == t or name.endswith("." + t) for t in targets):
            continue
        if isinstance(module, torch.nn.Linear):
            layers.append((module.in_features, module.out_features))
        elif isinstance(module, torch.nn.Conv2d):
            kernel = module.kernel_size[0] * module.kernel_size[1]
            layers.append((module.in_channels * kernel, module.out_channels))
    return layers


TRANSFORMER_WEIGHT = 4.5  # a transformer layer saves ~4.5x what a ResNet layer of the same width saves


def activation_units(config) -> float:
    """Sum over the UNet's levels of channels x layers x (1 + 4.5 x transformer layers where there is attention),
    each level weighted by its share of the latent's pixels (1/4 per level down). The activation memory is this
    times the latent pixels (hardware.ACTIVATION_BYTES_PER_UNIT); the weight 4.5 makes the one constant fit both
    SD 1.5 (4 levels, 1 transformer layer) and SDXL (3 levels, 0/2/10 transformer layers)."""
    depth = config.transformer_layers_per_block
    levels = len(config.block_out_channels)
    depths = list(depth) if isinstance(depth, list | tuple) else [depth] * levels
    units = 0.0
    for level, (channels, block) in enumerate(zip(config.block_out_channels, config.down_block_types, strict=True)):
        transformers = depths[level] if "CrossAttn" in block else 0
        units += channels * config.layers_per_block * (1 + TRANSFORMER_WEIGHT * transformers) / 4**level
    return units


def _meta_pipeline(folder: Path):
    """Just enough of a pipeline to count parameters: UNet, VAE and text encoders from their configs."""
    from types import SimpleNamespace

    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import AutoConfig, AutoModel

    def text(sub: str):
        if not (folder / sub / "config.json").exists():
            return None
        return AutoModel.from_config(AutoConfig.from_pretrained(folder / sub))

    return SimpleNamespace(unet=UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet")),
                           vae=AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae")),
                           text_encoder=text("text_encoder"), text_encoder_2=text("text_encoder_2"))


def weights_sha256(source: ModelSource) -> str | None:
    """SHA-256 of the base model's weights, for the LoRA's metadata: of the file for a single-file checkpoint,
    of the UNet's weight file(s) for a diffusers folder; None for a built-in model built in memory."""
    import hashlib

    if source.kind == "single_file":
        files = [Path(source.location)]
    elif source.kind in ("folder", "builtin") and Path(source.location).is_dir():
        files = sorted((Path(source.location) / "unet").glob("diffusion_pytorch_model*.safetensors"))
    else:
        return None
    if not files:
        return None
    digest = hashlib.sha256()
    for path in files:
        with open(path, "rb") as handle:
            while chunk := handle.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()
