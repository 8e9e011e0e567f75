"""Built-in models: real diffusers pipelines that need no download.

`toy-sd` is the one that has learned something: a 64x64 SD 1.x pretrained by the project on a world of
coloured shapes (lora_core/toy), its weights committed and checked by SHA-256; the first-run demo teaches it
a colour it has never seen. The others have random weights, built from configs with a fixed seed: `tiny-*`
are for tests and CI (fast); `small-*` keep the layout of SD 1.5 / SDXL at 1/8 of the channel widths (for CPU
benchmarks); `sd15-arch` / `sdxl-arch` are the real architectures at full size (for GPU speed and memory).
The flow-matching transformer built-ins (`tiny-flux`, `tiny-flux-schnell`, `tiny-sd3`, `flux-dev-arch`,
`sd35m-arch`) are registered here too, as builtin_flow.FlowSpec entries that builtin_flow builds.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from lora_core import builtin_flow
from lora_core.builtin_flow import FlowSpec

PREFIX = "builtin:"
SEED = 20240601


@dataclass(frozen=True)
class BuiltinSpec:
    family: str  # "sd1" or "sdxl"
    unet_channels: tuple[int, ...]
    unet_layers: int
    cross_attention_dim: int
    head_dim: int | tuple[int, ...]
    vae_channels: tuple[int, ...]
    text_hidden: tuple[int, ...]  # one per text encoder
    text_layers: int
    text_heads: int
    transformer_layers: tuple[int, ...] = (1,)
    cacheable: bool = True  # saved to the cache folder; the full-size ones are rebuilt in memory
    trained: bool = False  # shipped weights (lora_core/toy/weights) rather than seeded random ones

    @property
    def xl(self) -> bool:
        """SDXL's layout: two text encoders, the second's pooled output and the size/crop ids as added
        conditioning."""
        return len(self.text_hidden) == 2


# a FlowSpec has `family`, `cacheable` and `trained` too, but no UNet: code that reads a spec's UNet or VAE
# channels must check `isinstance(spec, BuiltinSpec)` first
BUILTINS: dict[str, BuiltinSpec | FlowSpec] = {
    "toy-sd": BuiltinSpec("sd1", (32, 64), 1, 64, 4, (16, 32, 32, 32), (64,), 3, 4, trained=True),
    "tiny-sd": BuiltinSpec("sd1", (32, 64), 2, 32, 8, (8, 16, 32, 32), (32,), 5, 4),
    "tiny-sdxl": BuiltinSpec("sdxl", (32, 64), 2, 64, 8, (8, 16, 32, 32), (32, 32), 5, 4, (1, 2)),
    "small-sd": BuiltinSpec("sd1", (40, 80, 160, 160), 2, 96, 8, (16, 32, 64, 64), (96,), 12, 4),
    "small-sdxl": BuiltinSpec("sdxl", (40, 80, 160), 2, 256, 8, (16, 32, 64, 64), (96, 160), 8, 4, (1, 2, 10)),
    "sd15-arch": BuiltinSpec("sd1", (320, 640, 1280, 1280), 2, 768, 8, (128, 256, 512, 512), (768,), 12, 12,
                             cacheable=False),
    "sdxl-arch": BuiltinSpec("sdxl", (320, 640, 1280), 2, 2048, (5, 10, 20), (128, 256, 512, 512), (768, 1280),
                             12, 12, (1, 2, 10), cacheable=False),
    **builtin_flow.FLOW_BUILTINS,
}


def names() -> list[str]:
    return [PREFIX + name for name in BUILTINS]


def cache_root() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lora-studio"
    return Path(os.environ.get("LORA_STUDIO_CACHE", default)) / "builtin"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-to-printable-character table, which CLIP's byte-level BPE uses."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars), strict=True))


def write_tokenizer(folder: Path) -> CLIPTokenizer:
    """An offline CLIP tokenizer: the 256 byte characters, the same with </w>, then BOS and EOS last.

    The CLIP text model pools at the highest token id, so EOS must have it.
    """
    folder.mkdir(parents=True, exist_ok=True)
    chars = list(_bytes_to_unicode().values())
    vocab = {token: index for index, token in enumerate(chars + [c + "</w>" for c in chars])}
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)
    tokenizer.save_pretrained(folder)
    return tokenizer


def _text_config(spec: BuiltinSpec, hidden: int, vocab_size: int, projection: int) -> CLIPTextConfig:
    # SDXL's second encoder (1280 wide) has 64-wide heads like the first; transformers refuses a width that
    # the head count does not divide
    heads = spec.text_heads if hidden % spec.text_heads == 0 else hidden // 64
    return CLIPTextConfig(
        hidden_size=hidden, intermediate_size=hidden * 4, num_attention_heads=heads,
        num_hidden_layers=spec.text_layers, vocab_size=vocab_size, max_position_embeddings=77,
        bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1,
        projection_dim=projection, hidden_act="gelu" if spec.xl else "quick_gelu",
    )


def _unet(spec: BuiltinSpec, pooled_dim: int) -> UNet2DConditionModel:
    levels = len(spec.unet_channels)
    if spec.xl:
        down = ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (levels - 1)
        extra = dict(addition_embed_type="text_time", addition_time_embed_dim=8 if spec.cacheable else 256,
                     projection_class_embeddings_input_dim=(8 if spec.cacheable else 256) * 6 + pooled_dim,
                     transformer_layers_per_block=spec.transformer_layers, use_linear_projection=True)
    else:
        down = ("CrossAttnDownBlock2D",) * (levels - 1) + ("DownBlock2D",) if levels > 2 else (
            "DownBlock2D", "CrossAttnDownBlock2D")
        extra = {}
    up = tuple("CrossAttnUpBlock2D" if name.startswith("CrossAttn") else "UpBlock2D" for name in reversed(down))
    heads = spec.head_dim
    if spec.xl and isinstance(heads, int):
        heads = tuple(max(1, channels // 64) if channels >= 64 else 2 for channels in spec.unet_channels)
    groups = 32 if min(spec.unet_channels) % 32 == 0 else 8
    return UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, block_out_channels=spec.unet_channels,
        layers_per_block=spec.unet_layers, down_block_types=down, up_block_types=up,
        cross_attention_dim=spec.cross_attention_dim, attention_head_dim=heads, norm_num_groups=groups, **extra,
    )


def _vae(spec: BuiltinSpec) -> AutoencoderKL:
    levels = len(spec.vae_channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=spec.vae_channels,
        down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
        layers_per_block=1 if spec.cacheable else 2, norm_num_groups=min(32, spec.vae_channels[0]),
        scaling_factor=0.13025 if spec.xl else 0.18215, sample_size=512,
    )


def _scheduler() -> DDPMScheduler:
    return DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         num_train_timesteps=1000, clip_sample=False, steps_offset=1)


def build_pipeline(name: str, tokenizer_folder: Path):
    """The named builtin as a diffusers pipeline in memory: seeded random weights, or the shipped ones."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    spec = BUILTINS[name]
    if spec.trained:
        return StableDiffusionPipeline.from_pretrained(builtin_folder(name), safety_checker=None,
                                                       requires_safety_checker=False)
    tokenizer = write_tokenizer(tokenizer_folder)
    if isinstance(spec, FlowSpec):
        return builtin_flow.build_pipeline(spec, tokenizer, SEED)
    vocab_size = len(tokenizer)
    torch.manual_seed(SEED)
    if spec.xl:
        text_encoder = CLIPTextModel(_text_config(spec, spec.text_hidden[0], vocab_size, spec.text_hidden[0]))
        text_encoder_2 = CLIPTextModelWithProjection(
            _text_config(spec, spec.text_hidden[1], vocab_size, spec.text_hidden[1]))
        unet = _unet(spec, pooled_dim=spec.text_hidden[1])
        return StableDiffusionXLPipeline(
            vae=_vae(spec), text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
            tokenizer_2=tokenizer, unet=unet, scheduler=_scheduler(), force_zeros_for_empty_prompt=True)
    text_encoder = CLIPTextModel(_text_config(spec, spec.text_hidden[0], vocab_size, spec.text_hidden[0]))
    return StableDiffusionPipeline(
        vae=_vae(spec), text_encoder=text_encoder, tokenizer=tokenizer, unet=_unet(spec, 0),
        scheduler=_scheduler(), safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def builtin_folder(name: str) -> Path:
    """The builtin saved as a diffusers folder in the cache, created on first use (atomically)."""
    if name not in BUILTINS:
        raise KeyError(name)
    if BUILTINS[name].trained:
        from lora_core.toy import shipped

        return shipped.verified_folder()
    folder = cache_root() / name
    if (folder / "model_index.json").exists():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=folder.parent))
    try:
        pipeline = build_pipeline(name, staging / "_tokenizer")
        pipeline.save_pretrained(staging / "model", safe_serialization=True)
        try:
            os.replace(staging / "model", folder)
        except OSError:  # another process finished first; theirs is as good as ours
            if not (folder / "model_index.json").exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def export(name: str, target: Path) -> Path:
    """Write the named builtin as a diffusers folder at `target` (which must not exist yet), to open it in
    other tools."""
    name = name.removeprefix(PREFIX)
    if name not in BUILTINS:
        raise KeyError(name)
    if target.exists():
        raise FileExistsError(f"{target} already exists; name a new folder")
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        if BUILTINS[name].trained or BUILTINS[name].cacheable:
            shutil.copytree(builtin_folder(name), staging / "model", ignore=shutil.ignore_patterns("SHA256SUMS"))
        else:
            build_pipeline(name, staging / "_tokenizer").save_pretrained(staging / "model", safe_serialization=True)
        os.replace(staging / "model", target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target

