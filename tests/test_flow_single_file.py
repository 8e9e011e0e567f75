"""Single-file FLUX.1 and SD 3.x checkpoints: the transformer in the original (BFL / Stability) layout, as
`flux1-dev.safetensors` and `sd3.5_medium.safetensors` ship it, and the parts a file lacks from
`pipeline_components` (a diffusers folder or hub id).

Nothing can be downloaded here: the tiny built-ins' transformers are written in the original layout by
`flow_checkpoint.original_state` (checked below against the layouts listed by hand in flow_loaders.py and against
diffusers' own SD3 converter), and their diffusers folders stand in for the hub repositories.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import FluxTransformer2DModel, SD3Transformer2DModel
from diffusers.loaders.single_file_utils import (
    convert_flux_transformer_checkpoint_to_diffusers,
    convert_sd3_transformer_checkpoint_to_diffusers,
)
from flow_loaders import bfl_params, sai_params
from helpers import tiny_config
from safetensors.torch import load_file, save_file

from lora_core import builtin, components, families, models, plan
from lora_core.builtin_flow import FLOW_BUILTINS
from lora_core.configfile import parse_config
from lora_core.families.flow_checkpoint import FlowNameError, diffusers_state, original_state
from lora_core.training import train

CLASSES = {"tiny-flux": FluxTransformer2DModel, "tiny-flux-schnell": FluxTransformer2DModel,
           "tiny-sd3": SD3Transformer2DModel}
PREFIX = "model.diffusion_model."


def transformer_of(name: str) -> torch.nn.Module:
    return CLASSES[name].from_pretrained(builtin.builtin_folder(name), subfolder="transformer")


def write_single_file(path, name: str, prefix: str = "", vae: bool = False, encoders: bool = False,
                      shift: float = 0.0):
    """The built-in's transformer in the original layout (under `prefix`), with SD 3's VAE in the LDM names and
    its text encoders under `text_encoders.{clip_l,clip_g,t5xxl}.transformer.` when asked; `shift` is added to
    the encoders' weights, so a test can tell them from the components folder's."""
    from test_single_file import ldm_vae
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    folder = builtin.builtin_folder(name)
    state = {prefix + key: tensor.contiguous() for key, tensor in original_state(transformer_of(name)).items()}
    if vae:
        weights = load_file(str(folder / "vae" / "diffusion_pytorch_model.safetensors"))
        state |= ldm_vae(weights, len(FLOW_BUILTINS[name].vae["block_out_channels"]))
    if encoders:
        for part, key, cls in (("text_encoder", "clip_l", CLIPTextModelWithProjection),
                               ("text_encoder_2", "clip_g", CLIPTextModelWithProjection),
                               ("text_encoder_3", "t5xxl", T5EncoderModel)):
            model = cls.from_pretrained(folder, subfolder=part)
            state |= {f"text_encoders.{key}.transformer.{k}": (v + shift).contiguous()
                      for k, v in model.state_dict().items()}
    save_file({key: tensor.contiguous() for key, tensor in state.items()}, str(path))
    return path


def config_for(base_model, output, components_from=None, dataset="unused", **overrides):
    config = tiny_config(dataset, output, **{"resolution": 64, "bucketing": False, "lora_alpha": 3, **overrides})
    config["base_model"] = str(base_model)
    if components_from is not None:
        config["pipeline_components"] = str(components_from)
    return parse_config(config)


def equal_states(a: torch.nn.Module, b: torch.nn.Module, skip: tuple[str, ...] = ()) -> list[str]:
    """The names of the tensors that differ (or are missing on one side)."""
    first, second = a.state_dict(), b.state_dict()
    names = sorted((set(first) | set(second)) - set(skip))
    return [n for n in names if n not in first or n not in second or not torch.equal(first[n], second[n])]


# ----------------------------------------------------------------------------------------------------- layout

@pytest.mark.parametrize("name", sorted(CLASSES))
def test_the_fixture_writes_the_original_layout(name):
    """original_state gives exactly the names and shapes of the original model code (listed by hand), and
    diffusers_state reads them back bit for bit; for SD 3 diffusers' own converter reads them back too."""
    transformer = transformer_of(name)
    tensors = original_state(transformer)
    listed = (bfl_params if CLASSES[name] is FluxTransformer2DModel else sai_params)(transformer.config)
    assert {key: tuple(t.shape) for key, t in tensors.items()} == listed
    with torch.device("meta"):
        skeleton = CLASSES[name].from_config(transformer.config)
    expected = transformer.state_dict()
    for state in [diffusers_state(tensors, skeleton)] + (
            [convert_sd3_transformer_checkpoint_to_diffusers(dict(tensors))] if "sd3" in name else []):
        assert state.keys() == expected.keys()
        assert all(torch.equal(state[key], expected[key]) for key in expected)


@pytest.mark.parametrize(("arch", "convert"), [("flux-dev-arch", convert_flux_transformer_checkpoint_to_diffusers),
                                               ("sd35m-arch", convert_sd3_transformer_checkpoint_to_diffusers)])
def test_at_full_size_the_conversion_is_diffusers_own(arch, convert):
    """On the real architectures (meta device: names and shapes), diffusers' converters and diffusers_state
    turn the original layout into the same parameters (diffusers' FLUX converter works only at FLUX.1's width,
    hence the studio's own)."""
    cls = FluxTransformer2DModel if "flux" in arch else SD3Transformer2DModel
    with torch.device("meta"):
        transformer = cls(**FLOW_BUILTINS[arch].transformer)
    tensors = original_state(transformer)
    theirs, ours = convert(dict(tensors)), diffusers_state(tensors, transformer)
    assert {k: tuple(v.shape) for k, v in theirs.items()} == {k: tuple(v.shape) for k, v in ours.items()}


def test_a_transformer_that_is_not_the_configs_is_refused_with_what_differs():
    transformer = transformer_of("tiny-flux")
    tensors = original_state(transformer)
    with torch.device("meta"):
        skeleton = FluxTransformer2DModel.from_config(transformer.config)
    with pytest.raises(FlowNameError, match="not in the file"):
        diffusers_state({k: v for k, v in tensors.items() if not k.startswith("guidance_in.")}, skeleton)
    with pytest.raises(FlowNameError, match="belong to no weight"):
        diffusers_state({**tensors, "double_blocks.9.img_attn.proj.weight": torch.zeros(1)}, skeleton)
    with pytest.raises(FlowNameError, match="rows in the file"):
        diffusers_state({**tensors, "double_blocks.0.img_attn.qkv.weight": torch.zeros(3, 32)}, skeleton)


# ------------------------------------------------------------------------------------------- detect and load

@pytest.mark.parametrize(("name", "prefix", "family", "variant"), [
    ("tiny-flux", PREFIX, "flux", "dev"), ("tiny-flux", "", "flux", "dev"),
    ("tiny-flux-schnell", "", "flux", "schnell"), ("tiny-sd3", "", "sd3", "sd35-medium"),
    ("tiny-sd3", PREFIX, "sd3", "sd35-medium")])
def test_a_single_file_is_detected_and_loads_exactly(tmp_path, name, prefix, family, variant):
    """Family and variant from the keys alone; loaded with the components folder, the transformer (and SD 3's
    VAE from the file) equal the built-in's bit for bit, and the memory estimate counts that model."""
    path = write_single_file(tmp_path / "model.safetensors", name, prefix, vae="sd3" in name)
    info = models.inspect(models.resolve(str(path)))
    assert (info.family, info.variant) == (family, variant)
    config = config_for(path, tmp_path / "out", builtin.builtin_folder(name))
    source, info = components.resolve_base_model(config)
    pipeline = models.load_pipeline(source, info, config)
    reference = models.load_pipeline(models.resolve(str(builtin.builtin_folder(name))), info)
    assert type(pipeline) is type(reference)
    for part in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        assert not equal_states(getattr(pipeline, part), getattr(reference, part)), part
    # the memory estimate counts the components' model, not the family's full-size stand-in
    assert models.model_sizes(source, info) == models.model_sizes(models.resolve(str(builtin.builtin_folder(name))),
                                                                   info)


def test_a_bf16_or_fp8_file_loads_in_fp32_as_a_folder_does(tmp_path):
    """BFL ships flux1-dev.safetensors in bf16 (and fp8 copies circulate): the transformer is loaded in fp32,
    as from a folder, holding the file's values."""
    reference = transformer_of("tiny-flux")
    for dtype in (torch.bfloat16, torch.float8_e4m3fn):
        path = write_single_file(tmp_path / "model.safetensors", "tiny-flux", PREFIX)
        save_file({key: tensor.to(dtype) for key, tensor in load_file(str(path)).items()}, str(path))
        config = config_for(path, tmp_path / "o", builtin.builtin_folder("tiny-flux"))
        loaded = models.load_pipeline(*components.resolve_base_model(config), config).transformer.state_dict()
        for key, tensor in reference.state_dict().items():
            assert loaded[key].dtype == torch.float32 and torch.equal(loaded[key], tensor.to(dtype).float()), key


def test_the_real_files_key_sets_are_detected():
    """The published files' transformer names (the real configs, listed by hand): BFL's dev / schnell, and
    SD 3.5 Medium / Large under Stability's prefix."""
    from test_flow_names import REAL, real

    for variant in REAL:
        model = real(variant)
        listed = (bfl_params if "flux" in variant else sai_params)(model.config)
        keys = [("" if "flux" in variant else PREFIX) + key for key in listed]
        family = families.detect_single_file(keys)
        assert family is not None and family.name == ("flux" if "flux" in variant else "sd3")
        assert family.single_file_variant(keys) == variant.removeprefix("flux-")


def test_bundled_text_encoders_are_read_from_the_file(tmp_path):
    """An SD 3.5 file with CLIP-L, CLIP-G and T5-XXL bundled (ComfyUI's `..._incl_clips_t5xxl` names): they come
    from the file, not from the components folder (the file's are shifted by 1 so the two differ). diffusers
    gives CLIP-L an identity text projection (Stability's reference code pools CLIP-L unprojected)."""
    path = write_single_file(tmp_path / "all.safetensors", "tiny-sd3", PREFIX, vae=True, encoders=True, shift=1.0)
    assert families.get("sd3").single_file_missing(models.single_file_keys(path)) == {}
    config = config_for(path, tmp_path / "out", builtin.builtin_folder("tiny-sd3"))
    pipeline = models.load_pipeline(*components.resolve_base_model(config), config)
    reference = models.load_pipeline(models.resolve(str(builtin.builtin_folder("tiny-sd3"))),
                                      models.inspect(models.resolve(str(builtin.builtin_folder("tiny-sd3")))))
    for part in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        ours, theirs = getattr(pipeline, part).state_dict(), getattr(reference, part).state_dict()
        shifted = [k for k in theirs if k != "text_projection.weight" or part != "text_encoder"]
        assert all(torch.equal(ours[k], theirs[k] + 1.0) for k in shifted), part
    projection = pipeline.text_encoder.text_projection.weight
    assert torch.equal(projection, torch.eye(projection.shape[0]))
    assert not equal_states(pipeline.transformer, reference.transformer)


# ----------------------------------------------------------------------------------------- what is missing

def test_a_file_lacking_parts_says_which_and_how_to_supply_them(tmp_path, dataset_dir):
    flux = write_single_file(tmp_path / "flux1-dev.safetensors", "tiny-flux")
    with pytest.raises(components.ComponentsError) as caught:
        components.resolve_base_model(config_for(flux, tmp_path / "o"))
    assert caught.value.field == "pipeline_components"
    assert "lacks the text encoders CLIP-L and T5-XXL and the VAE" in str(caught.value)
    assert "set pipeline_components" in str(caught.value) and "black-forest-labs/FLUX.1-dev" in str(caught.value)
    sd3 = write_single_file(tmp_path / "sd3.5_medium.safetensors", "tiny-sd3", PREFIX, vae=True)
    with pytest.raises(components.ComponentsError, match="lacks the text encoders CLIP-L, CLIP-G and T5-XXL;.*"
                       "stabilityai/stable-diffusion-3.5-medium"):
        components.resolve_base_model(config_for(sd3, tmp_path / "o"))
    bare = write_single_file(tmp_path / "sd3-transformer.safetensors", "tiny-sd3")
    with pytest.raises(components.ComponentsError, match="lacks the text encoders CLIP-L and CLIP-G and the VAE"):
        components.resolve_base_model(config_for(bare, tmp_path / "o", use_t5_encoder=False))
    # --validate-only reports it at the field, and with the components it is ok
    report = plan.plan_report(config_for(flux, tmp_path / "o", dataset=dataset_dir))
    assert not report["ok"] and report["problems"][0]["field"] == "pipeline_components"
    report = plan.plan_report(config_for(flux, tmp_path / "o", builtin.builtin_folder("tiny-flux"), dataset_dir))
    assert report["ok"], report["problems"]
    assert report["model"] == {"source": "single_file", "family": "FLUX.1-dev", "prediction_type": "flow",
                               "pipeline_components": str(builtin.builtin_folder("tiny-flux"))}


def test_a_file_with_a_missing_weight_is_refused_not_loaded_with_a_hole(tmp_path):
    """diffusers leaves a weight a file lacks unallocated (meta); the load fails with the file named instead."""
    path = write_single_file(tmp_path / "damaged.safetensors", "tiny-sd3", PREFIX, vae=True)
    state = load_file(str(path))
    del state["first_stage_model.decoder.conv_out.bias"]
    save_file(state, str(path))
    config = config_for(path, tmp_path / "o", builtin.builtin_folder("tiny-sd3"))
    with pytest.raises(models.ModelError, match="damaged.safetensors: could not load .* is the file complete"):
        models.load_pipeline(*components.resolve_base_model(config), config)


def test_components_of_another_model_or_for_a_whole_model_are_refused(tmp_path):
    dev = write_single_file(tmp_path / "dev.safetensors", "tiny-flux")
    with pytest.raises(components.ComponentsError, match="is FLUX.1-schnell, but .* is a FLUX.1-dev file"):
        components.resolve_base_model(config_for(dev, tmp_path / "o", builtin.builtin_folder("tiny-flux-schnell")))
    with pytest.raises(components.ComponentsError, match="is SD 3.5 Medium"):
        components.resolve_base_model(config_for(dev, tmp_path / "o", builtin.builtin_folder("tiny-sd3")))
    with pytest.raises(components.ComponentsError, match="only a single-file base_model"):
        components.resolve_base_model(config_for(builtin.builtin_folder("tiny-flux"), tmp_path / "o",
                                                 builtin.builtin_folder("tiny-flux")))
    for wrong in (tmp_path, "./nowhere", "not a hub id"):
        with pytest.raises(components.ComponentsError):
            components.resolve_base_model(config_for(dev, tmp_path / "o", wrong))


def test_from_a_hub_id_only_the_missing_parts_are_downloaded(tmp_path, monkeypatch):
    """The hub's copy of the parts the file holds (FLUX.1-dev's 23 GB transformer) is never fetched; for
    --validate-only only the configs are."""
    asked = []

    def download(repo_id: str, patterns: list[str]) -> str:
        asked.append((repo_id, patterns))
        return str(builtin.builtin_folder("tiny-flux"))

    monkeypatch.setattr(models, "download", download)
    dev = write_single_file(tmp_path / "dev.safetensors", "tiny-flux")
    source, _ = components.resolve_base_model(config_for(dev, tmp_path / "o", "black-forest-labs/FLUX.1-dev"))
    assert source.components == str(builtin.builtin_folder("tiny-flux"))
    repo, patterns = asked[-1]
    assert repo == "black-forest-labs/FLUX.1-dev"
    weights = {p for p in patterns if p.endswith(".safetensors")}
    assert weights == {"text_encoder/*.safetensors", "text_encoder_2/*.safetensors", "vae/*.safetensors"}
    components.resolve_base_model(config_for(dev, tmp_path / "o", "black-forest-labs/FLUX.1-dev"), configs_only=True)
    assert not any(p.endswith(".safetensors") for p in asked[-1][1])


# ----------------------------------------------------------------------------------------------- training

@pytest.mark.e2e
@pytest.mark.parametrize("name", ["tiny-flux", "tiny-sd3"])
def test_a_single_file_trains_exactly_as_its_diffusers_folder(tmp_path, dataset_dir, name):
    """Two steps from the single file + components give the same LoRA, bit for bit, as from the folder."""
    path = write_single_file(tmp_path / "model.safetensors", name, PREFIX, vae="sd3" in name)
    folder = builtin.builtin_folder(name)
    loras = []
    for base, extra in ((path, folder), (folder, None)):
        events = []
        config = config_for(base, tmp_path / f"out-{len(loras)}", extra, dataset_dir, steps=2, validation_steps=100)
        train(config, events.append, lambda: False)
        assert events[-1].type == "complete"
        loras.append(load_file(events[-1].final_path))
    assert loras[0].keys() == loras[1].keys() and loras[0]
    assert all(torch.equal(loras[0][key], loras[1][key]) for key in loras[0])
