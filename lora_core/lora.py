"""The network itself: adapters on the UNet (and text encoders), and export in the kohya/A1111 format.

Export writes `lora_unet_<module>.lora_down.weight / .lora_up.weight / .alpha`, the names that A1111, ComfyUI,
Forge, sd-scripts and diffusers' `load_lora_weights` all read. `<module>` is the diffusers module path with `_`
for SD 1.x/2.x and, for SDXL, the module's name in the original (Stability) layout (`input_blocks_4_1_...`),
as sd-scripts writes each (ldm_names.py). A trained text encoder's keys go under `lora_te_` (SD 1.x/2.x) or
`lora_te1_` / `lora_te2_` (SDXL's two encoders). `.alpha` is the true `lora_alpha` (diffusers' own converter
writes the rank there, which changes the LoRA's strength). LoHa and LoKr (`network_type`) are written under the
same names in LyCORIS's layout (lycoris.py).

A DoRA is written under the same names with the magnitude as `dora_scale` in LyCORIS's output-axis layout
(dora.py, which also says how each loader reads it).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save, save_file

from lora_core import blocks, dora, lycoris, network_dropout
from lora_core.config import TrainConfig
from lora_core.config_loss import loss_metadata
from lora_core.files import atomic_write

if TYPE_CHECKING:
    from lora_core.families import Family

TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]  # CLIP's self-attention, as diffusers' scripts
# What each `lora_target` adds: the feed-forward and projection layers of the transformer blocks, and
# (LoCon) the 3x3 convolutions of the ResNet blocks and the down/up samplers.
TARGETS = {
    "attention": TARGET_MODULES,
    "attention_mlp": TARGET_MODULES + ["ff.net.0.proj", "ff.net.2", "proj_in", "proj_out"],
    "locon": TARGET_MODULES + ["ff.net.0.proj", "ff.net.2", "proj_in", "proj_out", "conv1", "conv2",
                               "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv"],
}
OPTIMIZER_NAMES = {"adamw": "torch.optim.AdamW", "adamw8bit": "bitsandbytes.optim.AdamW8bit",
                   "paged_adamw8bit": "bitsandbytes.optim.PagedAdamW8bit",
                   "prodigy": "prodigyopt.Prodigy", "adafactor": "transformers.optimization.Adafactor",
                   "lion": "lion_pytorch.Lion", "lion8bit": "bitsandbytes.optim.Lion8bit",
                   "paged_lion8bit": "bitsandbytes.optim.PagedLion8bit",
                   "adamw_schedulefree": "schedulefree.AdamWScheduleFree", "came": "came_pytorch.CAME"}
MODELSPEC_VERSION = "1.0.1"
NETWORK_MODULES = {"lora": "networks.lora", "loha": "lycoris.kohya", "lokr": "lycoris.kohya"}


def lora_config(config: TrainConfig, target_modules: list[str]) -> LoraConfig:
    return LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      use_dora=config.use_dora, init_lora_weights="gaussian", target_modules=target_modules)


def adapter_config(config: TrainConfig, target_modules: list[str]):
    """peft's config for the network type: a LoraConfig, or LyCORIS's LoHa / LoKr."""
    if config.network_type == "lora":
        return lora_config(config, target_modules)
    return lycoris.adapter_config(config, target_modules)


def add_lora(unet, config: TrainConfig, targets: list[str] | str | None = None,
             namer: Callable[[str], str] | None = None) -> list[torch.nn.Parameter]:
    """Freeze the denoiser, add the adapter (`network_type`) on `targets` (the UNet's for `lora_target` unless
    given: a family's list of suffixes or regular expression), and return its (trainable, fp32) parameters.
    `namer` (the family's kohya names) places modules in blocks for block-wise ranks (blocks.py)."""
    unet.requires_grad_(False)
    targets = TARGETS[config.lora_target] if targets is None else targets
    adapter = adapter_config(config, targets)
    if namer is not None and blocks.active(config) and isinstance(targets, list):
        adapter = blocks.with_block_ranks(adapter, unet, targets, namer, config)
    unet.add_adapter(adapter)
    network_dropout.install(unet, config)  # sd-scripts' dropouts, active in training mode only
    return _trainable_in_fp32(unet)


def add_text_encoder_lora(text_encoder, config: TrainConfig) -> list[torch.nn.Parameter]:
    """Add the adapter to a (frozen) CLIP text encoder's attention projections; return its fp32 parameters."""
    text_encoder.requires_grad_(False)
    # peft directly, as diffusers' `add_adapter` does: transformers' own `add_adapter` wants a newer peft
    inject_adapter_in_model(adapter_config(config, TEXT_ENCODER_TARGETS), text_encoder)
    network_dropout.install(text_encoder, config)
    return _trainable_in_fp32(text_encoder)


def _trainable_in_fp32(model) -> list[torch.nn.Parameter]:
    """The adapter's parameters, cast to fp32 (the frozen model may be in bf16/fp16: autocast does the rest)."""
    params = [p for p in model.parameters() if p.requires_grad]
    for param in params:
        param.data = param.data.float()
    return params


def text_encoder_prefixes(count: int) -> list[str]:
    """kohya's key prefix for each of `count` trained text encoders: `lora_te_` for one, `lora_te1_`,
    `lora_te2_`, ... for several (a family may name its own: Family.text_encoder_prefixes)."""
    return ["lora_te_"] * count if count == 1 else [f"lora_te{index + 1}_" for index in range(count)]


def diffusers_namer(unet_config=None) -> Callable[[str], str]:
    """A UNet module path -> `lora_unet_` and diffusers' module path with `_` (sd-scripts' SD 1.x/2.x names)."""
    return lambda module: "lora_unet_" + module.replace(".", "_")


def lora_file_contents(unet, config: TrainConfig, text_encoders: list | None = None,
                       family: Family | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """What the LoRA file holds: its tensors, and the header entries the format itself needs (the training
    metadata comes on top): kohya names, a DoRA's magnitude as `dora_scale` (dora.py)."""
    if config.use_dora:
        return dora.kohya_dora_state_dict(named_models(unet, text_encoders, family), config.lora_alpha), {}
    return kohya_state_dict(unet, config, text_encoders, family), {}


def named_models(unet, text_encoders: list | None, family: Family | None = None
                 ) -> list[tuple[torch.nn.Module, Callable]]:
    """The UNet and each trained text encoder, with the function naming their modules in the file (`family`'s
    names; without one, SD 1.x's)."""
    encoders = text_encoders or []
    prefixes = family.text_encoder_prefixes(len(encoders)) if family else text_encoder_prefixes(len(encoders))
    namer = family.unet_namer(unet.config) if family else diffusers_namer()
    return [(unet, namer),
            *((encoder, text_encoder_namer(prefix)) for encoder, prefix in zip(encoders, prefixes, strict=True))]


def kohya_state_dict(unet, config: TrainConfig, text_encoders: list | None = None,
                     family: Family | None = None) -> dict[str, torch.Tensor]:
    """The adapters' weights under kohya names, fp32 on the CPU, contiguous: the UNet's, then each trained
    text encoder's (`text_encoders`, in the pipeline's order). `family` names the modules (SDXL: the original
    layout's); without one, SD 1.x's names (diffusers' module paths)."""
    state = {}
    for model, name_of in named_models(unet, text_encoders, family):
        state.update(_file_tensors(model, config, name_of))
    return state


def text_encoder_tensors(encoder, config: TrainConfig, prefix: str) -> dict[str, torch.Tensor]:
    """One trained text encoder's LoRA under kohya's names with `prefix` (`lora_te_`, `lora_te1_`, ...)."""
    return _file_tensors(encoder, config, text_encoder_namer(prefix))


def text_encoder_namer(prefix: str) -> Callable[[str], str]:
    """transformers 5's CLIPTextModel dropped the `text_model.` level that kohya's `lora_te_text_model_encoder_`
    names (and CLIPTextModelWithProjection) still have."""
    return lambda module: prefix + (module if module.startswith("text_model.") else "text_model." + module
                                    ).replace(".", "_")


def adapter_tensors(model, config: TrainConfig) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """{module path: (down, up, alpha)} of a model's LoRA (fp32 on the CPU), for layouts that rename or fuse
    modules (the flow-matching families' original layout, flow_names.py)."""
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in get_peft_model_state_dict(model).items():
        module, _, kind = key.partition(".lora_")
        if kind not in ("A.weight", "B.weight"):
            raise ValueError(f"unexpected LoRA tensor {key}")
        grouped.setdefault(module, {})[kind] = tensor.detach().float().cpu()
    return {module: (t["A.weight"], t["B.weight"], float(config.lora_alpha)) for module, t in grouped.items()}


def _file_tensors(model, config: TrainConfig, name_of: Callable[[str], str]) -> dict[str, torch.Tensor]:
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in get_peft_model_state_dict(model).items():
        if config.network_type == "lora":
            module, _, kind = key.partition(".lora_")
            param = {"A.weight": "lora_down.weight", "B.weight": "lora_up.weight"}.get(kind)
        else:
            module, _, param = key.rpartition(".")
        if param is None or (config.network_type != "lora" and param not in lycoris.LOHA_KEYS + lycoris.LOKR_KEYS):
            raise ValueError(f"unexpected {config.network_type} tensor {key}")
        modules.setdefault(module, {})[param] = tensor
    state = {}
    for module, params in modules.items():
        if config.network_type == "lora":
            params = {name: t.detach().float().cpu().contiguous() for name, t in params.items()}
            params["alpha"] = torch.tensor(_alpha_of(model, module, config))
        else:
            params = lycoris.lycoris_tensors(params, config)
        name = name_of(module)
        state.update({f"{name}.{param}": tensor for param, tensor in params.items()})
    return state


def _alpha_of(model, module: str, config: TrainConfig) -> float:
    """A module's own alpha (block-wise alphas differ, blocks.py), else lora_alpha."""
    alphas = getattr(model.get_submodule(module), "lora_alpha", None)
    return float(next(iter(alphas.values()))) if isinstance(alphas, dict) and alphas else float(config.lora_alpha)


def diffusers_state_dict(unet, config: TrainConfig,
                         text_encoders: list | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The format of DoRA files before they were written in the kohya layout (still read by lorafile.py): the
    adapters under the names diffusers' `save_lora_weights` writes (`unet.`, `text_encoder.`,
    `text_encoder_2.`), and the `lora_adapter_metadata` header from which its loader rebuilds each LoraConfig
    (with it, alpha and DoRA; without it diffusers would take alpha = rank)."""
    state, adapter_configs = {}, {}
    models = [("unet", unet, TARGETS[config.lora_target])]
    models += [(name, encoder, TEXT_ENCODER_TARGETS)
               for name, encoder in zip(("text_encoder", "text_encoder_2"), text_encoders or [], strict=False)]
    for prefix, model, targets in models:
        for key, tensor in get_peft_model_state_dict(model).items():
            # transformers' `load_adapter` (the text encoders' path) wants the magnitude as a `.weight`
            if prefix != "unet" and key.endswith(".lora_magnitude_vector"):
                key += ".weight"
            state[f"{prefix}.{key}"] = tensor.detach().float().cpu().contiguous()
        for option, value in lora_config(config, targets).to_dict().items():
            adapter_configs[f"{prefix}.{option}"] = sorted(value) if isinstance(value, set) else value
    return state, {"format": "pt", "lora_adapter_metadata": json.dumps(adapter_configs, sort_keys=True)}


def training_metadata(config: TrainConfig, family: Family, prediction_type: str, *, steps: int, epochs: int,
                      num_images: int, precision: str, started_at: datetime,
                      tag_frequency: dict[str, int], base_sha256: str | None = None, variant: str = "",
                      gradient_checkpointing: bool = False, num_processes: int = 1,
                      buckets: dict[str, int] | None = None, base_quantization: str = "none") -> dict[str, str]:
    """Header metadata in sd-scripts' `ss_*` and the model spec's `modelspec.*` form (all values strings); the
    README lists each field. `base_sha256`: of the base model's single file, or of a folder's UNet weights;
    `buckets`: images per bucket ("WxH" -> count), as the plan assigned them. `base_quantization`: how the frozen
    base was stored while training (written when not 'none'); the LoRA is the same adapter either way and is
    used on the ordinary base."""
    now = datetime.now(UTC)
    v_pred = prediction_type == "v_prediction"
    kind = family.metadata(prediction_type, variant)  # architecture, implementation, base model version
    output_name = Path(config.output_path).name or "lora"
    return {
        "ss_network_module": dora.NETWORK_MODULE if config.use_dora else NETWORK_MODULES[config.network_type],
        "ss_network_dim": str(config.lora_rank),
        "ss_network_alpha": str(config.lora_alpha),
        **({"ss_network_args": json.dumps(args)} if (args := network_args(config)) else {}),
        "ss_output_name": output_name,
        "ss_learning_rate": str(config.learning_rate),
        "ss_unet_lr": str(config.learning_rate),
        "ss_text_encoder_lr": str(config.text_encoder_lr if config.train_text_encoder else 0),
        "ss_num_train_images": str(num_images),
        "ss_num_epochs": str(epochs),
        "ss_steps": str(steps),
        "ss_max_train_steps": str(steps),
        "ss_batch_size_per_device": str(config.batch_size),
        "ss_gradient_accumulation_steps": str(config.gradient_accumulation_steps),
        "ss_resolution": f"({config.resolution}, {config.resolution})",
        "ss_mixed_precision": precision,
        "ss_optimizer": OPTIMIZER_NAMES[config.optimizer],
        "ss_lr_scheduler": config.lr_scheduler,
        "ss_lr_warmup_steps": str(config.lr_warmup_steps),
        "ss_max_grad_norm": str(config.max_grad_norm),
        "ss_seed": str(config.seed),
        **base_model_fields(config.base_model, base_sha256),
        "ss_base_model_version": kind["ss_base_model_version"],
        "ss_v2": kind["ss_v2"],
        "ss_tag_frequency": json.dumps({"dataset": tag_frequency}),
        "ss_training_started_at": str(started_at.timestamp()),
        "ss_training_finished_at": str(now.timestamp()),
        "modelspec.sai_model_spec": MODELSPEC_VERSION,
        "modelspec.architecture": kind["modelspec.architecture"],
        "modelspec.implementation": kind["modelspec.implementation"],
        "modelspec.title": output_name,
        "modelspec.resolution": f"{config.resolution}x{config.resolution}",
        "modelspec.prediction_type": kind.get("modelspec.prediction_type", "v" if v_pred else "epsilon"),
        "modelspec.trigger_phrase": ", ".join(config.trigger_words),
        "modelspec.date": now.replace(microsecond=0).isoformat(),
        "lora_studio.lora_target": config.lora_target,
        **sd_scripts_fields(config, num_images, gradient_checkpointing, num_processes, buckets),
        **(quantized_base_fields(base_quantization) if base_quantization != "none" else {}),
    }


def sd_scripts_fields(config: TrainConfig, num_images: int, gradient_checkpointing: bool, num_processes: int,
                      buckets: dict[str, int] | None) -> dict[str, str]:
    """The rest of what sd-scripts' train_network.py writes and A1111's metadata panel shows, in its formats:
    `str()` of its values (`None` for an option left off, `True` / `False`), JSON for the dataset and buckets.
    `num_images` counts repeats, as sd-scripts' bucket counts do."""
    # sd-scripts' network_dropout (else peft's lora_dropout, its nearest); LoHa / LoKr's is rank dropout, in the args
    dropout = config.network_dropout or (config.lora_dropout if config.network_type == "lora" else 0) or None
    bucket_info = None
    if config.bucketing and buckets:
        repeats = config.repeats
        bucket_info = {"buckets": {str(index): {"resolution": [int(n) for n in name.split("x")],
                                                "count": count * repeats}
                                   for index, (name, count) in enumerate(buckets.items())}}
    folder = Path(config.dataset_path).name or str(config.dataset_path)
    return {
        "ss_min_snr_gamma": str(config.min_snr_gamma or None),
        "ss_noise_offset": str(config.noise_offset or None),
        **loss_metadata(config),
        "ss_network_dropout": str(dropout),
        "ss_zero_terminal_snr": str(config.zero_terminal_snr),
        "ss_flip_aug": str(config.flip_horizontal),
        "ss_shuffle_caption": str(config.shuffle_tags),
        "ss_keep_tokens": str(config.keep_tokens),
        "ss_caption_dropout_rate": str(config.caption_dropout),
        "ss_enable_bucket": str(config.bucketing),
        "ss_min_bucket_reso": str(config.min_bucket_resolution),
        "ss_max_bucket_reso": str(config.max_bucket_resolution),
        "ss_bucket_no_upscale": str(config.bucket_no_upscale),
        "ss_bucket_info": json.dumps(bucket_info),
        "ss_cache_latents": str(config.latent_cache != "off"),
        "ss_gradient_checkpointing": str(gradient_checkpointing),
        "ss_total_batch_size": str(config.batch_size * num_processes * config.gradient_accumulation_steps),
        "ss_dataset_dirs": json.dumps({folder: {"n_repeats": config.repeats,
                                                "img_count": num_images // config.repeats}}),
        # the text encoder's own last layer (SD 1.x/2.x) or penultimate (SDXL, fixed): sd-scripts' default
        "ss_clip_skip": "None",
    }


def quantized_base_fields(base_quantization: str) -> dict[str, str]:
    """How the frozen base was stored while training, and what that means for whoever loads the file."""
    return {"lora_studio.base_quantization": base_quantization,
            "lora_studio.base_quantization_note": f"trained against the base stored in {base_quantization}; the "
                                                  "file is an ordinary LoRA: use it on the ordinary base"}


def network_args(config: TrainConfig) -> dict[str, str]:
    """`ss_network_args` as sd-scripts writes them (strings, as given on its command line): `conv_dim` /
    `conv_alpha` when convolutions are adapted, LyCORIS's `algo` and its options, and for a DoRA the arguments
    with which LyCORIS's `lycoris.kohya` rebuilds it (`dora_wd`, `wd_on_output`)."""
    args = {}
    if config.use_dora:  # LyCORIS's LoCon with weight decomposition on the output axis (sd-scripts' own has none)
        args.update(algo="locon", dora_wd="True", wd_on_output="True")
    if config.network_type != "lora":
        args["algo"] = config.network_type
        if config.network_type == "lokr":
            args["factor"] = str(config.lokr_factor)
        if config.lora_dropout:
            args["rank_dropout"] = str(config.lora_dropout)
    if config.lora_target == "locon":
        args.update(conv_dim=str(config.lora_rank), conv_alpha=str(config.lora_alpha))
    args.update({name: getattr(config, name) for name in blocks.FIELDS if getattr(config, name)})
    for name in ("rank_dropout", "module_dropout", "loraplus_lr_ratio"):  # sd-scripts' network arguments
        if getattr(config, name) != (1 if name == "loraplus_lr_ratio" else 0):
            args[name] = str(getattr(config, name))
    return args


def base_model_fields(base_model: str, base_sha256: str | None) -> dict[str, str]:
    """`ss_sd_model_name` (a local file's or folder's name, as sd-scripts writes it), and for a single-file base
    A1111's two hashes of it: `ss_sd_model_hash` its legacy 8-digit one, `ss_new_sd_model_hash` the SHA-256.
    A diffusers folder, built-in or hub model is no file A1111 could have hashed: its UNet weights' SHA-256
    goes under `lora_studio.base_unet_sha256` instead."""
    path = Path(base_model).expanduser()
    fields = {"ss_sd_model_name": path.name if path.exists() else base_model}
    if path.is_file():
        fields["ss_sd_model_hash"] = file_legacy_hash(path)
        if base_sha256:
            fields["ss_new_sd_model_hash"] = base_sha256
    elif base_sha256:
        fields["lora_studio.base_unet_sha256"] = base_sha256
    return fields


LEGACY_WINDOW = (0x100000, 0x10000)  # A1111's old hash reads the 64 KiB at 1 MiB


def file_legacy_hash(path: Path) -> str:
    """A1111's (and sd-scripts') old 8-hex-digit hash of a file."""
    with open(path, "rb") as handle:
        handle.seek(LEGACY_WINDOW[0])
        return hashlib.sha256(handle.read(LEGACY_WINDOW[1])).hexdigest()[:8]


def sshs_hashes(state: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict[str, str]:
    """sd-scripts' `sshs_model_hash` / `sshs_legacy_hash`, which A1111 and its Additional Networks extension
    read instead of hashing the file: the file as saved with only its `ss_*` metadata; the model hash is the
    SHA-256 of its tensor data (everything after the header), the legacy one A1111's old hash of those bytes."""
    data = save(state, metadata={key: value for key, value in metadata.items() if key.startswith("ss_")})
    header = 8 + int.from_bytes(data[:8], "little")
    model_hash = hashlib.sha256(data[header:]).hexdigest()
    start, size = LEGACY_WINDOW
    return {"sshs_model_hash": model_hash, "sshs_legacy_hash": hashlib.sha256(data[start:start + size]).hexdigest()[:8]}


MAX_TAG_FREQUENCY = 1000  # tags in the header (the most frequent); a header is read whole by every loader
MAX_TAG_CHARS = 100


def tag_frequency(captions: list[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for caption in captions:
        for tag in (part.strip()[:MAX_TAG_CHARS] for part in caption.split(",")):
            if tag:
                counts[tag] = counts.get(tag, 0) + 1
    if len(counts) > MAX_TAG_FREQUENCY:
        counts = dict(sorted(counts.items(), key=lambda item: -item[1])[:MAX_TAG_FREQUENCY])
    return counts


def save_lora(path: Path, state: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    """Write the LoRA atomically with sd-scripts' `sshs_*` hashes, refusing one with non-finite weights."""
    bad = [key for key, tensor in state.items() if not torch.isfinite(tensor).all()]
    if bad:
        raise FloatingPointError(f"refusing to save a LoRA with non-finite weights ({len(bad)} tensors, e.g. "
                                 f"{bad[0]})")
    metadata = {**metadata, **sshs_hashes(state, metadata)}
    return atomic_write(path, lambda tmp: save_file(state, str(tmp), metadata=metadata))
