"""Built-in flow-matching transformer models (FLUX.1, SD 3.5): real diffusers pipelines built from configs.

Like the SD built-ins (lora_core/builtin.py, which registers these beside its own and dispatches here), nothing
is downloaded: the weights are seeded random, the CLIP tokenizer is builtin.write_tokenizer's (passed in, so
this module does not import builtin) and the T5 tokenizer is a small Unigram vocabulary made here.

- `tiny-flux`, `tiny-flux-schnell`, `tiny-sd3`: for tests; a 32x32 image draws in well under a second on one
  CPU core and each saved folder is a few MB. They keep the real models' wiring: 16 latent channels and each
  family's VAE shift/scale, FLUX's 2x2 latent packing and guidance embedding (dev) or none (schnell), SD3.5
  Medium's dual-attention block 0 (`attn2`) and RMS q/k norm, and the text widths the rules below tie together.
- `flux-dev-arch`, `sd35m-arch`: the real architectures at full size (FLUX.1-dev, SD 3.5 Medium, with CLIP-L,
  CLIP-G and T5-XXL as shipped) for file-format tests and GPU benches; never cached, and cheap under
  `with torch.device("meta"):` (names and shapes only).

The rules a config must keep (checked by tests/test_builtin_flow.py): FLUX `transformer.in_channels ==
4 * vae latent_channels` (2x2 packing), `sum(axes_dims_rope) == attention_head_dim`, `pooled_projection_dim ==
CLIP hidden`, `joint_attention_dim == T5 d_model`; SD3 `caption_projection_dim == heads * head_dim`,
`pooled_projection_dim == sum of the CLIP projection dims`, `joint_attention_dim == T5 d_model >= sum of the
CLIP hidden widths` (the pipeline zero-pads the concatenated CLIP states to the T5 width).
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

FLUX_VAE = {"scaling_factor": 0.3611, "shift_factor": 0.1159}  # FLUX.1's ae: latents (x - shift) * scale
SD3_VAE = {"scaling_factor": 1.5305, "shift_factor": 0.0609}
T5_MAX_LENGTH = 512  # the longest prompt FluxPipeline and StableDiffusion3Pipeline accept (max_sequence_length)


@dataclass(frozen=True)
class Architecture:
    """How a family's built-in is put together: its pipeline, transformer and CLIP classes, and the latent
    pixels per token side the pipeline packs (FLUX 2x2; 0: the transformer's own patch_size, SD3's)."""

    pipeline: type
    transformer: type
    clip: type
    packing: int


ARCHITECTURES = {
    "flux": Architecture(FluxPipeline, FluxTransformer2DModel, CLIPTextModel, packing=2),
    "sd3": Architecture(StableDiffusion3Pipeline, SD3Transformer2DModel, CLIPTextModelWithProjection, packing=0),
}


@dataclass(frozen=True)
class FlowSpec:
    """A flow-matching transformer built-in: the constructor arguments of each part.

    What a ModelInfo needs is here without building anything: `family` ("flux" or "sd3"), `vae_scale_factor`
    (pixels per latent pixel, as the pipelines compute it) and `pixel_multiple` (image sides must be a multiple
    of it: the VAE's factor times the latent patch the transformer takes, 2x2 packing for FLUX, `patch_size`
    for SD3). `cacheable` and `trained` mean what they mean on builtin.BuiltinSpec.
    """

    family: str  # "flux" or "sd3"
    transformer: dict[str, Any]  # FluxTransformer2DModel / SD3Transformer2DModel arguments
    vae: dict[str, Any]  # AutoencoderKL arguments beyond the common ones (see _vae)
    clips: tuple[dict[str, Any], ...]  # CLIPTextConfig arguments: FLUX one (CLIP-L), SD3 two (CLIP-L, CLIP-G)
    t5: dict[str, Any]  # T5Config arguments
    scheduler: dict[str, Any]  # FlowMatchEulerDiscreteScheduler arguments
    cacheable: bool = True
    trained: bool = False  # no flow built-in ships weights; the field lets code ask any built-in's spec

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae["block_out_channels"]) - 1)

    @property
    def latent_patch(self) -> int:
        """Latent pixels per side of one transformer token: FluxPipeline packs 2x2 (its transformer's own
        patch_size is 1); SD3 patchifies by its patch_size."""
        return ARCHITECTURES[self.family].packing or self.transformer["patch_size"]

    @property
    def pixel_multiple(self) -> int:
        return self.vae_scale_factor * self.latent_patch

    @property
    def latent_channels(self) -> int:
        return self.vae["latent_channels"]

    @property
    def guidance_embeds(self) -> bool:
        """FLUX.1-dev's distilled guidance input (trained with guidance 1.0); schnell and SD3 have none."""
        return bool(self.transformer.get("guidance_embeds", False))


def _clip(hidden: int, layers: int, heads: int, act: str, intermediate: int | None = None,
          vocab_size: int | None = None) -> dict[str, Any]:
    config = dict(hidden_size=hidden, intermediate_size=intermediate or 4 * hidden, num_hidden_layers=layers,
                  num_attention_heads=heads, projection_dim=hidden, hidden_act=act, max_position_embeddings=77,
                  # eos 2 is CLIP's legacy pooling at the highest token id: EOS for write_tokenizer's vocabulary
                  # and for CLIP's own, so the same config pools right with either
                  bos_token_id=0, eos_token_id=2, pad_token_id=1)
    return config if vocab_size is None else {**config, "vocab_size": vocab_size}


def _t5(d_model: int, d_ff: int, layers: int, heads: int, d_kv: int, buckets: int,
        vocab_size: int | None = None) -> dict[str, Any]:
    # T5 v1.1 (what FLUX and SD3 use) has a gated-GELU feed-forward
    config = dict(d_model=d_model, d_ff=d_ff, num_layers=layers, num_heads=heads, d_kv=d_kv,
                  relative_attention_num_buckets=buckets, feed_forward_proj="gated-gelu")
    return config if vocab_size is None else {**config, "vocab_size": vocab_size}


# the 4-level VAE of the tiny SD built-ins (x8 like the real ones), with 16 latent channels
TINY_VAE = dict(block_out_channels=(8, 16, 32, 32), layers_per_block=1, latent_channels=16, norm_num_groups=8,
                sample_size=32)
FULL_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=16,
                norm_num_groups=32, sample_size=1024)
CLIP_L = _clip(768, 12, 12, "quick_gelu", vocab_size=49408)
CLIP_G = _clip(1280, 32, 20, "gelu", vocab_size=49408)
T5_XXL = _t5(4096, 10240, 24, 64, 64, 32, vocab_size=32128)
FLUX_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                      max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
SCHNELL_SCHEDULER = {**FLUX_SCHEDULER, "shift": 1.0, "use_dynamic_shifting": False}
SD3_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0)

TINY_FLUX = dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=2, attention_head_dim=16,
                 num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
                 axes_dims_rope=(4, 6, 6))
# pos_embed_max_size 32 caps images at 32 tokens a side (512 px); its table is saved, so it stays small (SD3.5's
# 384 would be 18 MB here)
TINY_SD3 = dict(sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=16,
                num_attention_heads=2, joint_attention_dim=48, caption_projection_dim=32, pooled_projection_dim=40,
                pos_embed_max_size=32, dual_attention_layers=(0,), qk_norm="rms_norm")

FLOW_BUILTINS: dict[str, FlowSpec] = {
    "tiny-flux": FlowSpec("flux", TINY_FLUX, {**TINY_VAE, **FLUX_VAE}, (_clip(32, 2, 4, "quick_gelu"),),
                          _t5(32, 37, 2, 4, 8, 8), FLUX_SCHEDULER),
    "tiny-flux-schnell": FlowSpec("flux", {**TINY_FLUX, "guidance_embeds": False}, {**TINY_VAE, **FLUX_VAE},
                                  (_clip(32, 2, 4, "quick_gelu"),), _t5(32, 37, 2, 4, 8, 8), SCHNELL_SCHEDULER),
    # CLIP-L 16 + CLIP-G 24 wide: their concatenation (40) is zero-padded to T5's 48, as 2048 is to 4096
    "tiny-sd3": FlowSpec("sd3", TINY_SD3, {**TINY_VAE, **SD3_VAE},
                         (_clip(16, 2, 2, "quick_gelu"), _clip(24, 2, 3, "gelu")), _t5(48, 37, 2, 4, 8, 8),
                         SD3_SCHEDULER),
    "flux-dev-arch": FlowSpec(
        "flux", dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                     num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                     guidance_embeds=True, axes_dims_rope=(16, 56, 56)),
        {**FULL_VAE, **FLUX_VAE}, (CLIP_L,), T5_XXL, FLUX_SCHEDULER, cacheable=False),
    "sd35m-arch": FlowSpec(
        "sd3", dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                    attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                    caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=384,
                    dual_attention_layers=tuple(range(13)), qk_norm="rms_norm"),
        {**FULL_VAE, **SD3_VAE}, (CLIP_L, CLIP_G), T5_XXL, SD3_SCHEDULER, cacheable=False),
}


def t5_tokenizer(max_length: int = T5_MAX_LENGTH) -> T5TokenizerFast:
    """An offline T5 tokenizer: a Unigram model over printable ASCII and `▁`-prefixed letters, with T5's
    special ids (pad 0, </s> 1, <unk> 2). T5's sentinel <extra_id_*> tokens are left out (no use without a
    decoder). It saves as tokenizer.json and reloads with T5TokenizerFast.from_pretrained."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [("▁" + letter, -2.5) for letter in string.ascii_letters]  # word starts score above lone letters
    pieces += [(char, -3.0) for char in string.printable[:94]]  # digits, letters, punctuation; no whitespace
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=max_length)


def _vae(spec: FlowSpec) -> AutoencoderKL:
    levels = len(spec.vae["block_out_channels"])
    # FLUX's and SD3's VAEs have no quant convs (diffusers' configs for both say so)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * levels,
                         up_block_types=("UpDecoderBlock2D",) * levels, use_quant_conv=False,
                         use_post_quant_conv=False, **spec.vae)


def _text_encoders(spec: FlowSpec, clip_vocab: int, t5_vocab: int) -> tuple[list[torch.nn.Module], T5EncoderModel]:
    # FLUX takes CLIP-L's pooled output (CLIPTextModel); SD3 both CLIPs' projections (WithProjection)
    model = ARCHITECTURES[spec.family].clip
    clips = [model(CLIPTextConfig(**{"vocab_size": clip_vocab, **config})) for config in spec.clips]
    t5 = T5EncoderModel(T5Config(**{"vocab_size": t5_vocab, **spec.t5}))
    return clips, t5


def build_pipeline(spec: FlowSpec, clip_tokenizer: CLIPTokenizer,
                   seed: int) -> FluxPipeline | StableDiffusion3Pipeline:
    """The spec's pipeline in memory, every weight drawn after `torch.manual_seed(seed)` in a fixed order (so
    two builds are bit-identical), in eval mode as from_pretrained would give it."""
    tokenizer_3 = t5_tokenizer()
    torch.manual_seed(seed)
    clips, t5 = _text_encoders(spec, len(clip_tokenizer), len(tokenizer_3))
    vae = _vae(spec)
    scheduler = FlowMatchEulerDiscreteScheduler(**spec.scheduler)
    if ARCHITECTURES[spec.family].pipeline is FluxPipeline:
        pipeline = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=clips[0], tokenizer=clip_tokenizer,
                                text_encoder_2=t5, tokenizer_2=tokenizer_3,
                                transformer=ARCHITECTURES[spec.family].transformer(**spec.transformer))
    else:
        pipeline = StableDiffusion3Pipeline(
            transformer=ARCHITECTURES[spec.family].transformer(**spec.transformer), scheduler=scheduler, vae=vae,
            text_encoder=clips[0], tokenizer=clip_tokenizer, text_encoder_2=clips[1], tokenizer_2=clip_tokenizer,
            text_encoder_3=t5, tokenizer_3=tokenizer_3)
    for component in pipeline.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    return pipeline
