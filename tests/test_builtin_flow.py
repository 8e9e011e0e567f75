"""The flow-matching transformer built-ins (lora_core/builtin_flow.py): the tiny FLUX.1 / SD 3.5 pipelines save
as diffusers folders that diffusers reloads offline and draws from, their tokenizers reload and pad, two builds
are bit-identical, their configs keep the rules the real models' wiring needs, and the full-size architectures
have the real models' module names and shapes (built on the meta device, no memory)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline
from transformers import CLIPTokenizer, T5TokenizerFast

from lora_core import builtin
from lora_core.builtin_flow import FLOW_BUILTINS, FlowSpec

TINY = ["tiny-flux", "tiny-flux-schnell", "tiny-sd3"]
PIPELINE = {"flux": FluxPipeline, "sd3": StableDiffusion3Pipeline}
T5_FOLDER = {"flux": "tokenizer_2", "sd3": "tokenizer_3"}


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def weights(pipeline) -> dict[str, torch.Tensor]:
    """Every tensor of every model in the pipeline, named by component (buffers too: SD3's position table)."""
    return {f"{name}.{key}": tensor for name, component in pipeline.components.items()
            if isinstance(component, torch.nn.Module) for key, tensor in component.state_dict().items()}


@pytest.mark.parametrize("name", TINY)
def test_a_tiny_pipeline_reloads_from_its_folder_and_draws_at_its_smallest_size(name):
    spec = FLOW_BUILTINS[name]
    folder = builtin.builtin_folder(name)
    assert folder_bytes(folder) < 10_000_000
    pipeline = PIPELINE[spec.family].from_pretrained(folder)
    assert type(pipeline) is PIPELINE[spec.family] and pipeline.vae_scale_factor == spec.vae_scale_factor
    assert pipeline.transformer.config.get("guidance_embeds", False) == (name == "tiny-flux")
    # the smallest side is one token: pixel_multiple is what the pipelines really require
    side = spec.pixel_multiple
    images = pipeline("a red cube", height=side, width=2 * side, num_inference_steps=2, output_type="np",
                      max_sequence_length=32, generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, side, 2 * side, 3) and bool(torch.isfinite(torch.from_numpy(images)).all())


def encode(pipeline, family: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(sequence, pooled) embeddings of one prompt, T5 at 32 tokens."""
    if family == "flux":
        embeds, pooled, _ = pipeline.encode_prompt("a red cube", "a red cube", max_sequence_length=32)
    else:
        embeds, _, pooled, _ = pipeline.encode_prompt("a red cube", "a red cube", "a red cube",
                                                      do_classifier_free_guidance=False, max_sequence_length=32)
    return embeds, pooled


@pytest.mark.parametrize("name", TINY)
def test_the_tokenizers_reload_offline_and_pad_to_their_lengths(name):
    spec = FLOW_BUILTINS[name]
    folder = builtin.builtin_folder(name)
    clip = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    assert len(clip("a red cube", padding="max_length").input_ids) == 77
    t5 = T5TokenizerFast.from_pretrained(folder / T5_FOLDER[spec.family])
    ids = t5("A red cube, 42 é", padding="max_length", max_length=32).input_ids
    assert len(ids) == 32 and t5.model_max_length == 512
    assert t5.unk_token_id in ids and ids.count(t5.eos_token_id) == 1 and ids[-1] == t5.pad_token_id == 0
    # the pipeline itself encodes at the length it is given: T5's tokens after CLIP's 77 for SD3
    embeds, pooled = encode(PIPELINE[spec.family].from_pretrained(folder), spec.family)
    tokens = 77 + 32 if spec.family == "sd3" else 32
    assert embeds.shape == (1, tokens, spec.transformer["joint_attention_dim"])
    assert pooled.shape == (1, spec.transformer["pooled_projection_dim"])


@pytest.mark.parametrize("name", ["tiny-flux", "tiny-sd3"])
def test_two_builds_are_bit_identical_and_equal_to_the_saved_folder(name, tmp_path):
    spec = FLOW_BUILTINS[name]
    first = weights(builtin.build_pipeline(name, tmp_path / "a"))
    second = weights(builtin.build_pipeline(name, tmp_path / "b"))
    saved = weights(PIPELINE[spec.family].from_pretrained(builtin.builtin_folder(name)))
    assert first.keys() == second.keys() == saved.keys()
    for key, tensor in first.items():
        assert torch.equal(tensor, second[key]) and torch.equal(tensor, saved[key]), key


def test_export_writes_a_folder_diffusers_reloads(tmp_path):
    target = builtin.export("builtin:tiny-sd3", tmp_path / "sd3")
    pipeline = StableDiffusion3Pipeline.from_pretrained(target)
    assert list(pipeline.transformer.config.dual_attention_layers) == [0]
    assert "builtin:tiny-flux" in builtin.names() and "builtin:sd35m-arch" in builtin.names()


@pytest.mark.parametrize("name", sorted(FLOW_BUILTINS))
def test_every_flow_spec_keeps_the_wiring_rules_of_its_family(name):
    spec, transformer = FLOW_BUILTINS[name], FLOW_BUILTINS[name].transformer
    assert spec.vae_scale_factor == 8 and spec.pixel_multiple == 16 and spec.latent_channels == 16
    assert spec.cacheable == name.startswith("tiny-")
    t5_width, clip_widths = spec.t5["d_model"], [clip["hidden_size"] for clip in spec.clips]
    assert transformer["joint_attention_dim"] == t5_width
    if spec.family == "flux":
        assert transformer["in_channels"] == 4 * spec.latent_channels  # 2x2 packing
        assert sum(transformer["axes_dims_rope"]) == transformer["attention_head_dim"]
        assert [transformer["pooled_projection_dim"]] == clip_widths  # CLIP-L's pooled output, unprojected
        assert spec.scheduler["use_dynamic_shifting"] == spec.guidance_embeds  # dev shifts by size, schnell not
    else:
        assert spec.family == "sd3" and transformer["in_channels"] == spec.latent_channels and len(clip_widths) == 2
        heads = transformer["num_attention_heads"] * transformer["attention_head_dim"]
        assert transformer["caption_projection_dim"] == heads
        assert transformer["pooled_projection_dim"] == sum(clip["projection_dim"] for clip in spec.clips)
        assert t5_width >= sum(clip_widths)  # the pipeline zero-pads the CLIP states up to T5's width
        assert 0 in transformer["dual_attention_layers"] and transformer["qk_norm"] == "rms_norm"
        assert spec.scheduler == {"num_train_timesteps": 1000, "shift": 3.0}


def meta_pipeline(name: str, tmp_path: Path):
    with torch.device("meta"):
        pipeline = builtin.build_pipeline(name, tmp_path / "tokenizer")
    assert all(tensor.is_meta for tensor in weights(pipeline).values())
    return pipeline


def shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {key: tuple(tensor.shape) for key, tensor in module.state_dict().items()}


def ending(names: dict[str, tuple[int, ...]], suffix: str) -> str:
    """The one name that ends with `suffix` (transformers 5's CLIPTextModel drops `text_model.` from its state
    dict's names, CLIPTextModelWithProjection keeps it)."""
    (name,) = [name for name in names if name == suffix or name.endswith("." + suffix)]
    return name


def test_flux_dev_arch_has_the_real_modules_and_shapes_on_the_meta_device(tmp_path):
    pipeline = meta_pipeline("flux-dev-arch", tmp_path)
    transformer = shapes(pipeline.transformer)
    assert transformer["transformer_blocks.0.attn.to_q.weight"] == (3072, 3072)
    assert transformer["transformer_blocks.18.ff_context.net.2.weight"] == (3072, 12288)
    assert "transformer_blocks.19.attn.to_q.weight" not in transformer
    assert transformer["single_transformer_blocks.0.proj_mlp.weight"] == (12288, 3072)
    assert transformer["single_transformer_blocks.37.proj_out.weight"] == (3072, 3072 + 12288)
    assert transformer["x_embedder.weight"] == (3072, 64) and transformer["context_embedder.weight"] == (3072, 4096)
    assert transformer["time_text_embed.guidance_embedder.linear_1.weight"] == (3072, 256)
    assert transformer["time_text_embed.text_embedder.linear_1.weight"] == (3072, 768)
    assert 11.8e9 < sum(p.numel() for p in pipeline.transformer.parameters()) < 12.0e9  # FLUX.1's 12B
    clip, t5 = shapes(pipeline.text_encoder), shapes(pipeline.text_encoder_2)
    assert clip[ending(clip, "encoder.layers.11.self_attn.q_proj.weight")] == (768, 768)
    assert t5["shared.weight"] == (32128, 4096)
    assert t5["encoder.block.23.layer.1.DenseReluDense.wi_1.weight"] == (10240, 4096)
    assert shapes(pipeline.vae)["encoder.conv_out.weight"] == (32, 512, 3, 3)  # mean and log-variance of 16


def test_sd35m_arch_has_the_real_modules_and_shapes_on_the_meta_device(tmp_path):
    pipeline = meta_pipeline("sd35m-arch", tmp_path)
    transformer = shapes(pipeline.transformer)
    assert transformer["transformer_blocks.0.attn2.to_q.weight"] == (1536, 1536)
    assert "transformer_blocks.12.attn2.to_q.weight" in transformer
    assert "transformer_blocks.13.attn2.to_q.weight" not in transformer
    assert transformer["transformer_blocks.23.attn.add_q_proj.weight"] == (1536, 1536)
    assert "transformer_blocks.24.attn.to_q.weight" not in transformer
    assert transformer["transformer_blocks.0.attn.norm_q.weight"] == (64,)  # RMS q/k norm per head
    assert transformer["pos_embed.pos_embed"] == (1, 384 * 384, 1536)
    assert transformer["pos_embed.proj.weight"] == (1536, 16, 2, 2)
    assert transformer["context_embedder.weight"] == (1536, 4096)
    assert transformer["time_text_embed.text_embedder.linear_1.weight"] == (1536, 2048)
    clip_l, clip_g = shapes(pipeline.text_encoder), shapes(pipeline.text_encoder_2)
    assert clip_l["text_projection.weight"] == (768, 768) and clip_g["text_projection.weight"] == (1280, 1280)
    assert clip_g[ending(clip_g, "encoder.layers.31.mlp.fc1.weight")] == (5120, 1280)
    assert shapes(pipeline.text_encoder_3)["encoder.block.0.layer.0.SelfAttention.q.weight"] == (4096, 4096)
    assert isinstance(builtin.BUILTINS["sd35m-arch"], FlowSpec) and not builtin.BUILTINS["sd35m-arch"].cacheable
