"""The files every tool loads whole: SDXL UNet keys in the original layout's names (checked against the layout
of the real SD 1.5 / SDXL configs and the tiny ones), exact reload in diffusers, older diffusers-named SDXL files
still applied by the studio's own `apply_lora`, and the metadata fields the ecosystem reads."""

from __future__ import annotations

import hashlib
import json
import re
from datetime import UTC, datetime
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save, save_file
from test_text_encoder_lora import encode, load, unet_inputs

from lora_core import builtin, families
from lora_core.configfile import parse_config
from lora_core.ldm_names import ldm_module_names
from lora_core.lora import (
    add_lora,
    add_text_encoder_lora,
    kohya_state_dict,
    lora_file_contents,
    save_lora,
    text_encoder_namer,
    training_metadata,
)
from lora_core.lorafile import LoraFileError, apply_lora

BASE = dict(dataset_path="d", output_path="out/my_style", trigger_words=["t"])
FAMILY = {"tiny-sd": "sd1", "sd15-arch": "sd1", "tiny-sdxl": "sdxl", "sdxl-arch": "sdxl"}


def perturb(models: list, seed: int) -> None:
    """As if trained: every adapter parameter moved (LoRA's up weights start at zero)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for model in models:
            for param in model.parameters():
                if param.requires_grad:
                    param.add_(torch.randn_like(param) * 0.05)


def with_adapters(family: str, config) -> tuple:
    pipeline = load(family)
    encoders = [e for e in (pipeline.text_encoder, getattr(pipeline, "text_encoder_2", None)) if e is not None]
    add_lora(pipeline.unet, config)
    for encoder in encoders:
        add_text_encoder_lora(encoder, config)
    perturb([pipeline.unet, *encoders], 3)
    for module in (pipeline.unet, *encoders):
        module.eval()
    return pipeline, encoders


def outputs(pipeline, family: str) -> list[torch.Tensor]:
    with torch.no_grad():
        return [pipeline.unet(**unet_inputs(family)).sample, *encode(pipeline, family)]


def assert_same(got: list[torch.Tensor], wanted: list[torch.Tensor]) -> None:
    for a, b in zip(got, wanted, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


pytestmark = pytest.mark.xdist_group("test_lora_files")  # its tests share trained runs: one xdist worker


@pytest.fixture(scope="module")
def sdxl_locon(tmp_path_factory):
    """A tiny-SDXL LoCon with both text encoders (alpha != rank), written as the trainer writes it."""
    config = parse_config({**BASE, "base_model": "builtin:tiny-sdxl", "lora_rank": 4, "lora_alpha": 6,
                           "lora_target": "locon"})
    pipeline, encoders = with_adapters("sdxl", config)
    folder = tmp_path_factory.mktemp("sdxl")
    state, header = lora_file_contents(pipeline.unet, config, encoders, families.get("sdxl"))
    new = save_lora(folder / "new.safetensors", state, header)
    old = save_lora(folder / "old.safetensors", kohya_state_dict(pipeline.unet, config, encoders), {})
    return new, old, outputs(pipeline, "sdxl"), outputs(load("sdxl"), "sdxl")


def test_sdxl_unet_keys_are_the_original_layouts_and_diffusers_reloads_them_exactly(sdxl_locon):
    path, _, trained, base = sdxl_locon
    keys = list(load_file(str(path)))
    unet_keys = {key.split(".")[0] for key in keys if key.startswith("lora_unet_")}
    assert all(re.match(r"lora_unet_(input_blocks|middle_block|output_blocks)_\d", key) for key in unet_keys)
    for expected in ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",  # down_blocks.1.attentions.0
                     "lora_unet_input_blocks_1_0_in_layers_2", "lora_unet_input_blocks_3_0_op",
                     "lora_unet_middle_block_1_proj_in", "lora_unet_output_blocks_2_2_conv",
                     "lora_unet_output_blocks_0_0_skip_connection"):
        assert expected in unet_keys, expected
    assert {key.split("_text_model_")[0] for key in keys if "_text_model_" in key} == {"lora_te1", "lora_te2"}
    assert (trained[0] - base[0]).abs().max() > 1e-3

    pipeline = load("sdxl")
    pipeline.load_lora_weights(str(path))
    assert_same(outputs(pipeline, "sdxl"), trained)
    # nothing unloaded: every layer of the file became an adapted layer of the pipeline
    loaded = [name for model in (pipeline.unet, pipeline.text_encoder, pipeline.text_encoder_2)
              for name, module in model.named_modules() if hasattr(module, "lora_A") and module.lora_A]
    assert len(loaded) == len({key.split(".")[0] for key in keys})


@pytest.mark.parametrize("which", [0, 1])
def test_apply_lora_reads_new_and_old_sdxl_files_alike(sdxl_locon, which):
    """`apply_lora` (the studio's grid and sweep, bake) adds each weight change itself; files written before the
    original-layout names (diffusers-named SDXL UNet keys) give the same model."""
    path, trained = sdxl_locon[which], sdxl_locon[2]
    if which == 1:
        assert any(key.startswith("lora_unet_down_blocks_") for key in load_file(str(path)))
    pipeline = load("sdxl")
    assert apply_lora(pipeline, path, 1.0) > 0
    assert_same(outputs(pipeline, "sdxl"), trained)
    apply_lora(pipeline, path, -1.0)  # and taken off again
    assert_same(outputs(pipeline, "sdxl"), sdxl_locon[3])


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_apply_lora_reads_dora_files(tmp_path, family):
    """A DoRA (kohya layout with `dora_scale`, alpha != rank, LoCon targets, text encoders): its weight change depends
    on the base weight, which `apply_lora` reads from the pipeline."""
    config = parse_config({**BASE, "base_model": "builtin:tiny-sd", "lora_rank": 4, "lora_alpha": 6,
                           "lora_target": "locon", "use_dora": True})
    trained, encoders = with_adapters(family, config)
    state, header = lora_file_contents(trained.unet, config, encoders, families.get(family))
    path = save_lora(tmp_path / "dora.safetensors", state, header)
    pipeline = load(family)
    apply_lora(pipeline, path, 1.0)
    assert_same(outputs(pipeline, family), outputs(trained, family))


def test_apply_lora_refuses_a_file_for_another_model(sdxl_locon, tmp_path):
    with pytest.raises(LoraFileError, match="another base model"):
        apply_lora(load("sd1"), sdxl_locon[0], 1.0)
    pickle = tmp_path / "lora.pt"
    pickle.write_bytes(b"not read")
    with pytest.raises(LoraFileError, match="pickle"):
        apply_lora(load("sd1"), pickle, 1.0)


# the real architectures' original layout, as sd-scripts' SDXL and SD 1.5 LoRA files name it
ANCHORS = {
    "sdxl-arch": ["input_blocks.4.1.transformer_blocks.0.attn1.to_q", "input_blocks.8.1.transformer_blocks.9.ff.net.2",
                  "middle_block.1.transformer_blocks.9.attn2.to_out.0", "output_blocks.0.1.transformer_blocks.9.attn1"
                  ".to_k", "output_blocks.2.2.conv", "output_blocks.5.2.conv", "input_blocks.3.0.op",
                  "input_blocks.6.0.op", "output_blocks.8.0.skip_connection", "middle_block.2.out_layers.3"],
    "sd15-arch": ["input_blocks.1.1.transformer_blocks.0.attn1.to_q", "input_blocks.11.0.out_layers.3",
                  "input_blocks.9.0.op", "output_blocks.2.1.conv", "output_blocks.5.2.conv", "middle_block.1.proj_in",
                  "output_blocks.11.1.transformer_blocks.0.attn2.to_v"],
}
# sd-scripts' own count of the modules its default LoRA adapts (attention, feed-forward, proj_in/out)
SD_SCRIPTS_UNET_MODULES = {"sdxl-arch": 722, "sd15-arch": 192}


@pytest.mark.parametrize("name", ["tiny-sd", "tiny-sdxl", "sd15-arch", "sdxl-arch"])
def test_every_exported_key_names_a_module_of_the_original_layout(name, tmp_path):
    """No weights: each UNet is built on the meta device from its config, its adapters added for each target
    (attention is a subset of attention_mlp, which is one of locon), and every key the exporter would write is
    looked up in the original layout's module list for that config."""
    family, spec = FAMILY[name], builtin.BUILTINS[name]
    with torch.device("meta"):
        config_of = builtin._unet(spec, pooled_dim=spec.text_hidden[-1]).config
    original = ldm_module_names(config_of)
    layout = {module.replace(".", "_") for module in original.values()}
    assert set(ANCHORS.get(name, [])) <= set(original.values())
    for target in ("attention_mlp", "locon"):
        config = parse_config({**BASE, "base_model": f"builtin:{name}", "lora_target": target, "lora_rank": 2})
        with torch.device("meta"):
            unet = builtin._unet(spec, pooled_dim=spec.text_hidden[-1])
            add_lora(unet, config)
        modules = {n for n, m in unet.named_modules() if hasattr(m, "lora_A") and m.lora_A}
        name_of = families.get(family).unet_namer(unet.config)
        for module in modules:
            key = name_of(module).removeprefix("lora_unet_")
            if family == "sdxl":  # written in the original layout's names
                assert key in layout, key
            else:  # written with diffusers' path, which sd-scripts / A1111 map to the original module
                assert module in original and key == module.replace(".", "_"), module
        if target == "attention_mlp" and name in SD_SCRIPTS_UNET_MODULES:
            assert len(modules) == SD_SCRIPTS_UNET_MODULES[name]


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_text_encoder_keys_keep_clips_names(family):
    """The text encoders keep Hugging Face CLIP's module names (the original layout's too), under lora_te*_."""
    config = parse_config({**BASE, "base_model": "builtin:tiny-sd", "train_text_encoder": True})
    pipeline = load(family)
    encoders = [e for e in (pipeline.text_encoder, getattr(pipeline, "text_encoder_2", None)) if e is not None]
    prefixes = ["lora_te1_", "lora_te2_"] if family == "sdxl" else ["lora_te_"]
    for encoder, prefix in zip(encoders, prefixes, strict=True):
        add_text_encoder_lora(encoder, config)
        modules = [n for n, m in encoder.named_modules() if hasattr(m, "lora_A") and m.lora_A]
        assert len(modules) == 4 * encoder.config.num_hidden_layers
        for module in modules:
            assert re.fullmatch(prefix + r"text_model_encoder_layers_\d+_self_attn_(q|k|v|out)_proj",
                                text_encoder_namer(prefix)(module)), module


# ----------------------------------------------------------------------------------------------------
# metadata


def metadata_for(tmp_path: Path, family: str = "sd1", prediction: str = "epsilon", sha: str | None = None,
                 **options) -> dict[str, str]:
    config = parse_config({**BASE, "base_model": options.pop("base_model", "builtin:tiny-sd"),
                           "output_path": str(tmp_path / "my_style"), **options})
    return training_metadata(config, families.get(family), prediction, steps=10, epochs=1, num_images=6,
                             precision="no",
                             started_at=datetime.now(UTC), tag_frequency={"t": 6},
                             base_sha256=sha)


def test_sshs_hashes_are_recomputed_from_the_written_file(tmp_path):
    state = {"lora_unet_x.lora_down.weight": torch.randn(300, 1024), "lora_unet_x.lora_up.weight": torch.randn(8, 300),
             "lora_unet_x.alpha": torch.tensor(4.0)}  # > 1 MiB, so the legacy window is not empty
    header = {**metadata_for(tmp_path), "modelspec.title": "not an ss_ field"}
    path = save_lora(tmp_path / "lora.safetensors", state, header)
    with safe_open(str(path), "pt") as handle:
        written = handle.metadata()
    tensors = load_file(str(path))
    data = save(tensors, metadata={k: v for k, v in written.items() if k.startswith("ss_")})
    body = data[8 + int.from_bytes(data[:8], "little"):]
    assert written["sshs_model_hash"] == hashlib.sha256(body).hexdigest()
    assert written["sshs_legacy_hash"] == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    assert len(written["sshs_legacy_hash"]) == 8


def test_single_file_base_gets_a1111s_hashes_and_a_folder_does_not(tmp_path):
    base = tmp_path / "model.safetensors"
    save_file({"w": torch.arange(400_000, dtype=torch.float32)}, str(base))
    data = base.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    meta = metadata_for(tmp_path, base_model=str(base), sha=sha)
    assert meta["ss_sd_model_hash"] == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    assert meta["ss_new_sd_model_hash"] == sha and meta["ss_sd_model_name"] == "model.safetensors"
    folder = metadata_for(tmp_path, sha=sha)
    assert "ss_sd_model_hash" not in folder and folder["lora_studio.base_unet_sha256"] == sha
    assert folder["ss_sd_model_name"] == "builtin:tiny-sd"


@pytest.mark.parametrize(("family", "prediction", "architecture", "version", "implementation"), [
    ("sd1", "epsilon", "stable-diffusion-v1/lora", "sd_v1", "diffusers"),
    ("sd2", "epsilon", "stable-diffusion-v2-512/lora", "sd_v2", "diffusers"),
    ("sd2", "v_prediction", "stable-diffusion-v2-768-v/lora", "sd_v2_v", "diffusers"),
    ("sdxl", "epsilon", "stable-diffusion-xl-v1-base/lora", "sdxl_base_v1-0",
     "https://github.com/Stability-AI/generative-models"),
])
def test_model_spec_fields_follow_sd_scripts(tmp_path, family, prediction, architecture, version, implementation):
    meta = metadata_for(tmp_path, family, prediction)
    assert meta["modelspec.architecture"] == architecture and meta["ss_base_model_version"] == version
    assert meta["modelspec.implementation"] == implementation and meta["modelspec.sai_model_spec"] == "1.0.1"
    assert meta["ss_v2"] == str(family == "sd2")
    assert meta["modelspec.prediction_type"] == ("v" if prediction == "v_prediction" else "epsilon")
    assert meta["ss_output_name"] == "my_style" == meta["modelspec.title"]
    datetime.fromisoformat(meta["modelspec.date"])
    assert all(isinstance(value, str) for value in meta.values())


def test_network_args_in_sd_scripts_form(tmp_path):
    assert "ss_network_args" not in metadata_for(tmp_path)  # plain LoRA on attention: sd-scripts writes none
    locon = json.loads(metadata_for(tmp_path, lora_target="locon", lora_rank=4, lora_alpha=2)["ss_network_args"])
    assert locon == {"conv_dim": "4", "conv_alpha": "2.0"}
    meta = metadata_for(tmp_path, network_type="lokr", lokr_factor=8)
    assert json.loads(meta["ss_network_args"]) == {"algo": "lokr", "factor": "8"}
    assert meta["ss_network_module"] == "lycoris.kohya"
    assert json.loads(metadata_for(tmp_path, network_type="loha")["ss_network_args"]) == {"algo": "loha"}


def transformers4_clip_modules(num_layers: int, projection: bool) -> set[str]:
    """The Linear modules of transformers 4's CLIPTextModel / CLIPTextModelWithProjection, written out by hand
    (not read from the installed transformers 5, whose CLIPTextModel dropped the `text_model.` level): what
    A1111, Forge, sd-scripts and diffusers installs on transformers 4 look names up in."""
    names = {f"text_model.encoder.layers.{i}.{part}" for i in range(num_layers)
             for part in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                          "mlp.fc1", "mlp.fc2")}
    return names | ({"text_projection"} if projection else set())


@pytest.mark.parametrize(("family", "dora"), [("sd1", False), ("sdxl", False), ("sdxl", True)])
def test_text_encoder_keys_name_transformers_4_modules(family, dora):
    """Every exported `lora_te*` key names a module of the text encoder as transformers 4 lays it out."""
    config = parse_config({**BASE, "base_model": "builtin:tiny-sd", "train_text_encoder": True,
                           "use_dora": dora, "lora_rank": 2})
    pipeline, encoders = with_adapters(family, config)
    state, _ = lora_file_contents(pipeline.unet, config, encoders, families.get(family))
    prefixes = ["lora_te1_", "lora_te2_"] if family == "sdxl" else ["lora_te_"]
    expected = set()
    for encoder, prefix in zip(encoders, prefixes, strict=True):
        projection = type(encoder).__name__ == "CLIPTextModelWithProjection"
        expected |= {prefix + name.replace(".", "_")
                     for name in transformers4_clip_modules(encoder.config.num_hidden_layers, projection)}
    te_layers = {key.split(".")[0] for key in state if key.startswith("lora_te")}
    assert te_layers and te_layers <= expected, sorted(te_layers - expected)[:3]
    assert len(te_layers) == 4 * sum(e.config.num_hidden_layers for e in encoders)


def test_sd_scripts_training_fields_in_its_formats(tmp_path):
    """The fields sd-scripts' train_network.py writes (and A1111's metadata panel shows), formatted as it
    formats them: `str()` of the value (`None` for an option left off, `True` / `False`), JSON for dataset
    folders and buckets."""
    config = parse_config({**BASE, "base_model": "builtin:tiny-sd", "output_path": str(tmp_path / "style"),
                           "dataset_path": str(tmp_path / "my_pictures"), "min_snr_gamma": 5, "noise_offset": 0.05,
                           "zero_terminal_snr": True, "flip_horizontal": True, "shuffle_tags": True,
                           "keep_tokens": 1, "caption_dropout": 0.1, "repeats": 3, "batch_size": 2,
                           "gradient_accumulation_steps": 4, "lora_dropout": 0.1, "min_bucket_resolution": 320,
                           "max_bucket_resolution": 1024, "bucket_no_upscale": True, "latent_cache": "disk"})
    meta = training_metadata(config, families.get("sd1"), "epsilon", steps=10, epochs=1, num_images=18, precision="no",
                             started_at=datetime.now(UTC), tag_frequency={}, gradient_checkpointing=True,
                             num_processes=2, buckets={"512x384": 4, "512x512": 2})
    assert {key: meta[key] for key in (
        "ss_min_snr_gamma", "ss_noise_offset", "ss_network_dropout", "ss_zero_terminal_snr", "ss_flip_aug",
        "ss_shuffle_caption", "ss_keep_tokens", "ss_caption_dropout_rate", "ss_enable_bucket", "ss_min_bucket_reso",
        "ss_max_bucket_reso", "ss_bucket_no_upscale", "ss_cache_latents", "ss_gradient_checkpointing",
        "ss_total_batch_size", "ss_clip_skip")} == {
        "ss_min_snr_gamma": "5.0", "ss_noise_offset": "0.05", "ss_network_dropout": "0.1",
        "ss_zero_terminal_snr": "True", "ss_flip_aug": "True", "ss_shuffle_caption": "True", "ss_keep_tokens": "1",
        "ss_caption_dropout_rate": "0.1", "ss_enable_bucket": "True", "ss_min_bucket_reso": "320",
        "ss_max_bucket_reso": "1024", "ss_bucket_no_upscale": "True", "ss_cache_latents": "True",
        "ss_gradient_checkpointing": "True", "ss_total_batch_size": "16", "ss_clip_skip": "None"}
    assert json.loads(meta["ss_dataset_dirs"]) == {"my_pictures": {"n_repeats": 3, "img_count": 6}}
    assert json.loads(meta["ss_bucket_info"]) == {"buckets": {"0": {"resolution": [512, 384], "count": 12},
                                                              "1": {"resolution": [512, 512], "count": 6}}}
    off = metadata_for(tmp_path, min_snr_gamma=0, bucketing=False, latent_cache="off")
    assert off["ss_min_snr_gamma"] == off["ss_noise_offset"] == off["ss_network_dropout"] == "None"
    assert off["ss_enable_bucket"] == "False" and off["ss_bucket_info"] == "null" and off["ss_cache_latents"] == "False"
    assert off["ss_gradient_checkpointing"] == "False" and off["ss_total_batch_size"] == "1"
