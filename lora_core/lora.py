"""The LoRA itself: adapters on the UNet's attention projections, and export in the kohya/A1111 format.

Export writes `lora_unet_<diffusers module path with _>.lora_down.weight / .lora_up.weight / .alpha`,
the names that A1111, ComfyUI and diffusers' `load_lora_weights` all read; a trained text encoder's LoRA goes
under `lora_te_` (SD 1.x/2.x) or `lora_te1_` / `lora_te2_` (SDXL's two encoders). `.alpha` is the true
`lora_alpha` (diffusers' own converter writes the rank there, which changes the LoRA's strength).

A DoRA is written in diffusers' PEFT format instead (`unet.<module>.lora_A.weight / .lora_B.weight /
.lora_magnitude_vector`, the LoraConfig in the `lora_adapter_metadata` header): diffusers' SD loaders drop
kohya's `dora_scale`, and the loaders that read it disagree on its axis (A1111 normalises per input channel,
ComfyUI per output channel by the base weight's norm), so no kohya file would load the same everywhere.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file

from lora_core.config import TrainConfig
from lora_core.files import atomic_write

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
                   "prodigy": "prodigyopt.Prodigy", "adafactor": "transformers.optimization.Adafactor"}
ARCHITECTURES = {"sd1": "stable-diffusion-v1/lora", "sd2": "stable-diffusion-v2-512/lora",
                 "sdxl": "stable-diffusion-xl-v1-base/lora"}


def lora_config(config: TrainConfig, target_modules: list[str]) -> LoraConfig:
    return LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      use_dora=config.use_dora, init_lora_weights="gaussian", target_modules=target_modules)


def add_lora(unet, config: TrainConfig) -> list[torch.nn.Parameter]:
    """Freeze the UNet, add a LoRA adapter, and return its (trainable, fp32) parameters."""
    unet.requires_grad_(False)
    unet.add_adapter(lora_config(config, TARGETS[config.lora_target]))
    return _trainable_in_fp32(unet)


def add_text_encoder_lora(text_encoder, config: TrainConfig) -> list[torch.nn.Parameter]:
    """Add a LoRA adapter to a (frozen) CLIP text encoder's attention projections; return its fp32 parameters."""
    text_encoder.requires_grad_(False)
    # peft directly, as diffusers' `add_adapter` does: transformers' own `add_adapter` wants a newer peft
    inject_adapter_in_model(lora_config(config, TEXT_ENCODER_TARGETS), text_encoder)
    return _trainable_in_fp32(text_encoder)


def _trainable_in_fp32(model) -> list[torch.nn.Parameter]:
    """The adapter's parameters, cast to fp32 (the frozen model may be in bf16/fp16: autocast does the rest)."""
    params = [p for p in model.parameters() if p.requires_grad]
    for param in params:
        param.data = param.data.float()
    return params


def text_encoder_prefixes(family: str, count: int) -> list[str]:
    """kohya's key prefix for each text encoder: `lora_te_` for one, `lora_te1_` / `lora_te2_` for SDXL's two."""
    if family == "sdxl" or count > 1:
        return [f"lora_te{index + 1}_" for index in range(count)]
    return ["lora_te_"] * count


def lora_file_contents(unet, config: TrainConfig, text_encoders: list | None = None,
                       family: str = "sd1") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """What the LoRA file holds: its tensors, and the header entries the format itself needs (the training
    metadata comes on top): kohya names for a LoRA, diffusers' PEFT format for a DoRA."""
    if config.use_dora:
        return diffusers_state_dict(unet, config, text_encoders)
    return kohya_state_dict(unet, config, text_encoders, family), {}


def kohya_state_dict(unet, config: TrainConfig, text_encoders: list | None = None,
                     family: str = "sd1") -> dict[str, torch.Tensor]:
    """The adapters' weights under kohya names, fp32 on the CPU, contiguous: the UNet's, then each trained
    text encoder's (`text_encoders`, in the pipeline's order, with `family` choosing their prefixes)."""
    state = _kohya_names(unet, "lora_unet_", config)
    encoders = text_encoders or []
    for encoder, prefix in zip(encoders, text_encoder_prefixes(family, len(encoders)), strict=True):
        state.update(_kohya_names(encoder, prefix, config, module_prefix="text_model."))
    return state


def _kohya_names(model, prefix: str, config: TrainConfig, module_prefix: str = "") -> dict[str, torch.Tensor]:
    """`module_prefix`: what each module path must start with (transformers 5's CLIPTextModel dropped the
    `text_model.` level that kohya's `lora_te_text_model_encoder_...` names, and CLIPTextModelWithProjection,
    still have)."""
    state = {}
    alpha = torch.tensor(float(config.lora_alpha))
    for key, tensor in get_peft_model_state_dict(model).items():
        module, _, kind = key.partition(".lora_")
        if not module.startswith(module_prefix):
            module = module_prefix + module
        name = prefix + module.replace(".", "_")
        if kind == "A.weight":
            state[f"{name}.lora_down.weight"] = tensor.detach().float().cpu().contiguous()
            state[f"{name}.alpha"] = alpha.clone()
        elif kind == "B.weight":
            state[f"{name}.lora_up.weight"] = tensor.detach().float().cpu().contiguous()
        else:
            raise ValueError(f"unexpected LoRA tensor {key}")
    return state


def diffusers_state_dict(unet, config: TrainConfig,
                         text_encoders: list | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The adapters under the names diffusers' `save_lora_weights` writes (`unet.`, `text_encoder.`,
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


def training_metadata(config: TrainConfig, family: str, prediction_type: str, *, steps: int, epochs: int,
                      num_images: int, precision: str, started_at: datetime,
                      tag_frequency: dict[str, int], base_sha256: str | None = None) -> dict[str, str]:
    """Header metadata in sd-scripts' `ss_*` and the `modelspec.*` form (all values strings)."""
    now = datetime.now(UTC)
    return {
        "ss_network_module": "peft.dora" if config.use_dora else "networks.lora",
        "ss_network_dim": str(config.lora_rank),
        "ss_network_alpha": str(config.lora_alpha),
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
        "ss_network_args": json.dumps({"target": config.lora_target, "dora": config.use_dora}),
        "ss_lr_scheduler": config.lr_scheduler,
        "ss_lr_warmup_steps": str(config.lr_warmup_steps),
        "ss_max_grad_norm": str(config.max_grad_norm),
        "ss_seed": str(config.seed),
        "ss_sd_model_name": config.base_model,
        # the full SHA-256 and A1111's short form (its first 10 hex digits) of the base weights
        **({"ss_new_sd_model_hash": base_sha256, "ss_sd_model_hash": base_sha256[:10]} if base_sha256 else {}),
        "ss_base_model_version": {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}[family],
        "ss_v2": str(family == "sd2"),
        "ss_tag_frequency": json.dumps({"dataset": tag_frequency}),
        "ss_training_started_at": str(started_at.timestamp()),
        "ss_training_finished_at": str(now.timestamp()),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": ARCHITECTURES[family],
        "modelspec.implementation": "https://github.com/huggingface/diffusers",
        "modelspec.title": Path(config.output_path).name or "lora",
        "modelspec.resolution": f"{config.resolution}x{config.resolution}",
        "modelspec.prediction_type": "v" if prediction_type == "v_prediction" else "epsilon",
        "modelspec.trigger_phrase": ", ".join(config.trigger_words),
        "modelspec.date": now.date().isoformat(),
    }


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
    """Write the LoRA atomically, refusing one with non-finite weights."""
    bad = [key for key, tensor in state.items() if not torch.isfinite(tensor).all()]
    if bad:
        raise FloatingPointError(f"refusing to save a LoRA with non-finite weights ({len(bad)} tensors, e.g. "
                                 f"{bad[0]})")
    return atomic_write(path, lambda tmp: save_file(state, str(tmp), metadata=metadata))
