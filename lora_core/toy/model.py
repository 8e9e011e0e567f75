"""The toy model's architecture: an SD 1.x pipeline for 64x64 pictures (8x8x4 latents), with the project's
offline byte-level CLIP tokenizer. The weights are trained by pretrain.py and shipped in weights/."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from lora_core.builtin import write_tokenizer

TEXT_WIDTH = 64
WEIGHTS = Path(__file__).resolve().parent / "weights"


def text_encoder(vocab_size: int) -> CLIPTextModel:
    return CLIPTextModel(CLIPTextConfig(
        hidden_size=TEXT_WIDTH, intermediate_size=TEXT_WIDTH * 4, num_attention_heads=4, num_hidden_layers=3,
        vocab_size=vocab_size, max_position_embeddings=77, bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1, projection_dim=TEXT_WIDTH,
        hidden_act="quick_gelu"))


def unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=TEXT_WIDTH,
        attention_head_dim=4, norm_num_groups=8)


def vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1, norm_num_groups=2, sample_size=64, scaling_factor=1.0)


def scheduler() -> DDPMScheduler:
    return DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         num_train_timesteps=1000, clip_sample=False, steps_offset=1)


def fresh_pipeline(tokenizer_folder: Path, seed: int) -> StableDiffusionPipeline:
    """The untrained toy pipeline, its random weights fixed by `seed`."""
    tokenizer = write_tokenizer(tokenizer_folder)
    torch.manual_seed(seed)
    return StableDiffusionPipeline(
        vae=vae(), text_encoder=text_encoder(len(tokenizer)), tokenizer=tokenizer, unet=unet(),
        scheduler=scheduler(), safety_checker=None, feature_extractor=None, requires_safety_checker=False)
