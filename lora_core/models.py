"""Base models: where `base_model` points, which family it is, and loading its parts.

Accepted: `builtin:<name>`, a Hugging Face hub id, a local diffusers folder, a single-file `.safetensors`.
Only safetensors weights are ever loaded: a pickle (`.ckpt`, `.pt`, `.bin`) can run code when opened.
The family is read from the model itself, never from its name.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from lora_core import builtin, families
from lora_core.errors import UserError
from lora_core.families.base import CHECKPOINTING_FACTOR
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
    components: str | None = None  # a single file's missing parts: a local diffusers folder (pipeline_components)


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
    # per base_quantization mode: the denoiser's parameters it stores small, and those of the text encoders it
    # stores small while they stay on the device (Family.quantizable_text_encoders)
    unet_quantizable: dict[str, int] = field(default_factory=dict)
    checkpointed_share: float = CHECKPOINTING_FACTOR  # of activation_units kept with checkpointing (the family's)
    text_quantizable: dict[str, int] = field(default_factory=dict)
    # the blocks offload_blocks may offload (Family.offloadable_blocks), in execution order: each one's frozen
    # parameters, and of those the ones each base_quantization mode stores small
    block_params: list[int] = field(default_factory=list)
    block_quantizable: list[dict[str, int]] = field(default_factory=list)
    denoiser_label: str = "UNet"  # what the estimate's text calls the denoiser ("UNet", "transformer")


@dataclass
class ModelInfo:
    family: str  # a registered family's name: sd1 | sd2 | sdxl | sd3 | flux
    prediction_type: str  # epsilon | v_prediction (UNet families) | flow (rectified flow)
    vae_scale_factor: int
    latent_multiple: int  # latent sides must be a multiple of this (a UNet's down levels, a transformer's patch)
    variant: str = ""  # which model of the family, where it matters (FLUX.1: dev or schnell)

    @property
    def pixel_multiple(self) -> int:
        """Image sides must be a multiple of this for the latents to pass every down block (or patch)."""
        return self.vae_scale_factor * self.latent_multiple

    @property
    def description(self) -> str:
        return families.get(self.family).description(self)


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
    return ModelSource("folder", download(base_model, patterns), base_model)


def download(repo_id: str, patterns: list[str]) -> str:
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


def read_json(path: Path, required: tuple[str, ...] = ()) -> dict[str, Any]:
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
        return _builtin_info(builtin.BUILTINS[source.location])
    if source.kind == "single_file":
        return _inspect_single_file(Path(source.location))
    folder = Path(source.location)
    index = read_json(folder / "model_index.json")
    denoiser_name = "transformer" if "transformer" in index else "unet"
    denoiser = read_json(folder / denoiser_name / "config.json")
    family = families.detect_folder(index, denoiser)
    if family is None:
        raise ModelError(unsupported_folder(folder, index, denoiser))
    vae = read_json(folder / "vae" / "config.json")
    scheduler_file = folder / "scheduler" / "scheduler_config.json"
    scheduler = read_json(scheduler_file) if scheduler_file.exists() else {}
    prediction = "flow" if family.flow_matching else scheduler.get("prediction_type", "epsilon")
    try:
        multiple = family.latent_multiple(denoiser)
    except (KeyError, TypeError, ValueError):
        raise ModelError(f"{folder}: the model's {denoiser_name}/config.json is not a {family.display_name} "
                         "config (fields missing); download the model again") from None
    return ModelInfo(family.name, prediction, 2 ** (len(vae.get("block_out_channels", [0] * 4)) - 1), multiple,
                     family.variant(denoiser))


def _builtin_info(spec) -> ModelInfo:
    """A built-in's ModelInfo, as `inspect` reads it from a folder's configs."""
    if isinstance(spec, builtin.FlowSpec):
        return ModelInfo(spec.family, "flow", spec.vae_scale_factor, spec.latent_patch,
                         families.get(spec.family).variant(spec.transformer))
    return ModelInfo(spec.family, "epsilon", 2 ** (len(spec.vae_channels) - 1), 2 ** (len(spec.unet_channels) - 1))


def unsupported_folder(folder: Path, index: dict, denoiser: dict) -> str:
    """What a folder of a family the studio cannot train is, and what it can train."""
    found = index.get("_class_name") or "an unknown pipeline"
    if denoiser.get("_class_name"):
        found += f" with a {denoiser['_class_name']}"
    known = ", ".join(families.get(name).display_name for name in families.names())
    return (f"{folder}: this is {found}, a model family the studio cannot train yet; it trains {known}. Give a "
            "model of one of those families")


def single_file_keys(path: Path) -> list[str]:
    """The tensor names of a single-file checkpoint, from its header alone."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as handle:
            return list(handle.keys())
    except Exception as error:  # safetensors raises its own error types for a damaged header
        raise ModelError(f"{path}: not a readable .safetensors file ({error})") from None


def _inspect_single_file(path: Path) -> ModelInfo:
    keys = single_file_keys(path)
    family = families.detect_single_file(keys)
    if family is None:
        known = ", ".join(families.get(name).display_name for name in families.names())
        raise ModelError(f"{path}: not a checkpoint of a family the studio trains ({known}): none of their "
                         "weights were found; is it a LoRA or a VAE?")
    # epsilon until loaded: the weights do not say (SD 2.1-768 is v-prediction, 2.1-base is not), the scheduler
    # config diffusers reads with them does (see with_loaded_prediction_type)
    return ModelInfo(family.name, "flow" if family.flow_matching else "epsilon", 8,
                     family.single_file_latent_multiple(), family.single_file_variant(keys))


def with_loaded_prediction_type(info: ModelInfo, pipeline) -> ModelInfo:
    """The prediction type of the loaded pipeline's scheduler (what a single file gets from its family's
    configs)."""
    if families.get(info.family).flow_matching:
        return info
    return replace(info, prediction_type=pipeline.scheduler.config.get("prediction_type", "epsilon"))


def load_pipeline(source: ModelSource, info: ModelInfo, config: Any = None):
    """Load the whole diffusers pipeline on the CPU in fp32; the trainer moves and casts parts. `config` (a
    TrainConfig) lets the family leave out what the run does not use (SD 3 without T5)."""
    family = families.get(info.family)
    return family.trim_pipeline(_load_pipeline(source, info, config), config)


def _load_pipeline(source: ModelSource, info: ModelInfo, config: Any):
    quiet_library_notices()
    family = families.get(info.family)
    if source.kind == "builtin" and source.location in builtin.BUILTINS:
        import tempfile

        with tempfile.TemporaryDirectory() as folder:
            return builtin.build_pipeline(source.location, Path(folder) / "tokenizer")
    kwargs: dict[str, Any] = {"use_safetensors": True, **family.load_kwargs(config)}
    pipeline_class = family.pipeline_class()
    if source.kind == "single_file":
        return _load_single_file(source, info, config, kwargs)
    try:
        return pipeline_class.from_pretrained(source.location, **kwargs)
    except OSError as error:
        raise ModelError(f"{source.name}: could not load the pipeline ({error}); only .safetensors weights are "
                         "loaded, so a model shipped as .bin pickles must be converted first") from None


def _load_single_file(source: ModelSource, info: ModelInfo, config: Any, kwargs: dict[str, Any]):
    """A single file through its family (FLUX, SD 3: the parts it lacks from source.components) or diffusers."""
    family = families.get(info.family)
    if source.components is None and (
            missing := family.single_file_missing(single_file_keys(Path(source.location)), config)):
        raise ModelError(missing_parts_message(source.name, family, missing, info.variant))
    try:
        pipeline = family.load_single_file(source.location, source.components, config)
        if pipeline is None:
            extra = {"config": source.components} if source.components else {}
            pipeline = family.pipeline_class().from_single_file(source.location, **kwargs, **extra)
    except Exception as error:
        if source.components:
            raise ModelError(f"{source.name}: could not load this single-file checkpoint with the parts of "
                             f"{source.components} ({error}); is the file complete, and pipeline_components the "
                             "same model (its configs describe the file's weights)?") from None
        raise ModelError(f"{source.name}: diffusers could not load this single-file checkpoint ({error}); "
                         "it needs the model's config from the hub the first time (or set pipeline_components "
                         "to the model's diffusers folder), or use a diffusers folder") from None
    if unloaded := [name for name, part in pipeline.components.items() if _has_meta_tensors(part)]:
        # diffusers leaves a weight the file lacks unallocated (on the meta device) instead of failing
        raise ModelError(f"{source.name}: the file lacks weights of its {', '.join(unloaded)}; it is damaged or "
                         "not the model its configs describe")
    return pipeline


def _has_meta_tensors(part: Any) -> bool:
    import torch

    return isinstance(part, torch.nn.Module) and any(
        tensor.is_meta for tensor in (*part.parameters(), *part.buffers()))


def missing_parts_message(name: str, family, missing: dict[str, str], variant: str) -> str:
    """What a single file lacks ("the text encoders CLIP-L and T5-XXL and the VAE") and how to supply it."""
    encoders = [label for part, label in missing.items() if part.startswith("text_encoder")]
    pieces = [f"the text encoder{'s' if len(encoders) > 1 else ''} {_and(encoders)}"] if encoders else []
    pieces += [f"the {label}" for part, label in missing.items() if not part.startswith("text_encoder")]
    example = family.components_examples.get(variant) or next(iter(family.components_examples.values()), "")
    return (f"{name}: this {family.display_name} single file lacks {_and(pieces)}; set pipeline_components to "
            f"the model's diffusers folder or Hugging Face hub id{f' (e.g. {example})' if example else ''}, and "
            "what the file lacks is taken from there")


def _and(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def text_encoders(pipeline) -> list:
    return families.base.text_encoders(pipeline)


def model_sizes(source: ModelSource, info: ModelInfo) -> ModelSizes:
    """Count parameters by building the model on the meta device from its configs."""
    import tempfile

    import torch

    from lora_core.lora import TEXT_ENCODER_TARGETS
    from lora_core.quantize import MODES, quantizable

    family = families.get(info.family)
    with torch.device("meta"), tempfile.TemporaryDirectory() as scratch:
        if source.kind == "folder" or (source.kind == "builtin" and source.location not in builtin.BUILTINS):
            pipeline = _meta_pipeline(Path(source.location), family)
        elif source.kind == "single_file" and source.components:
            # the components' configs describe the file's model (an SD 3.5 Large file is counted as Large)
            pipeline = _meta_pipeline(Path(source.components), family)
        else:
            # a built-in built in memory, or a single file: the real architecture of its family
            name = source.location if source.kind == "builtin" else family.single_file_builtin
            pipeline = builtin.build_pipeline(name, Path(scratch) / "tokenizer")
    denoiser, encoders = getattr(pipeline, family.denoiser), text_encoders(pipeline)
    layers = {target: _adapted(denoiser, names) for target, names in family.denoiser_targets().items()}
    trainable = family.trainable_text_encoders(pipeline)
    big = family.quantizable_text_encoders(pipeline)
    text_layers = [layer for encoder in trainable for layer in _adapted(encoder, TEXT_ENCODER_TARGETS)]
    paths = {id(module): name for name, module in denoiser.named_modules()}
    blocks = [paths[id(block)] for block in family.offloadable_blocks(denoiser)]
    return ModelSizes(
        unet_params=sum(p.numel() for p in denoiser.parameters()),
        vae_params=sum(p.numel() for p in pipeline.vae.parameters()),
        text_params=sum(p.numel() for encoder in encoders for p in encoder.parameters()),
        lora_params_per_rank={target: sum(i + o for i, o in found) for target, found in layers.items()},
        lora_outputs={target: sum(o for _, o in found) for target, found in layers.items()},
        text_lora_params_per_rank=sum(i + o for i, o in text_layers),
        text_lora_outputs=sum(o for _, o in text_layers),
        activation_units=family.activation_units(denoiser.config),
        checkpointed_share=family.checkpointed_activation_share(denoiser.config),
        unet_quantizable={mode: quantizable(denoiser, mode) for mode in MODES},
        text_quantizable={mode: sum(quantizable(encoder, mode) for encoder in big) for mode in MODES},
        block_params=[sum(p.numel() for p in denoiser.get_submodule(block).parameters()) for block in blocks],
        block_quantizable=[{mode: quantizable(denoiser, mode, block) for mode in MODES} for block in blocks],
        denoiser_label="UNet" if family.denoiser == "unet" else family.denoiser,
    )


def _adapted(model, targets: list[str] | str) -> list[tuple[int, int]]:
    """(inputs, outputs) of each layer a LoRA on `targets` adapts (peft's match: a suffix of a list, or a string
    as one regular expression over the whole path); a conv's inputs count its kernel area, as its LoRA down
    weight does."""
    import torch

    layers = []
    for name, module in model.named_modules():
        if isinstance(targets, str):
            if not re.fullmatch(targets, name):
                continue
        elif not any(name == t or name.endswith("." + t) for t in targets):
            continue
        if isinstance(module, torch.nn.Linear):
            layers.append((module.in_features, module.out_features))
        elif isinstance(module, torch.nn.Conv2d):
            kernel = module.kernel_size[0] * module.kernel_size[1]
            layers.append((module.in_channels * kernel, module.out_channels))
    return layers


def _meta_pipeline(folder: Path, family):
    """Just enough of a pipeline to count parameters: the denoiser, VAE and text encoders from their configs."""
    from types import SimpleNamespace

    import diffusers
    from transformers import AutoConfig, AutoModel

    def text(sub: str):
        if not (folder / sub / "config.json").exists():
            return None
        return AutoModel.from_config(AutoConfig.from_pretrained(folder / sub))

    index = read_json(folder / "model_index.json")
    denoiser_class = getattr(diffusers, index[family.denoiser][1])  # e.g. ["diffusers", "FluxTransformer2DModel"]
    parts = {name: text(name) for name in families.base.TEXT_ENCODER_ATTRIBUTES}
    return SimpleNamespace(**{family.denoiser: denoiser_class.from_config(denoiser_class.load_config(
        folder / family.denoiser))}, vae=diffusers.AutoencoderKL.from_config(
        diffusers.AutoencoderKL.load_config(folder / "vae")), **parts)


def weights_sha256(source: ModelSource) -> str | None:
    """SHA-256 of the base model's weights, for the LoRA's metadata: of the file for a single-file checkpoint,
    of the UNet's weight file(s) for a diffusers folder; None for a built-in model built in memory."""
    import hashlib

    if source.kind == "single_file":
        files = [Path(source.location)]
    elif source.kind in ("folder", "builtin") and Path(source.location).is_dir():
        folder = Path(source.location)
        files = sorted(file for denoiser in ("unet", "transformer")
                       for file in (folder / denoiser).glob("diffusion_pytorch_model*.safetensors"))
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
