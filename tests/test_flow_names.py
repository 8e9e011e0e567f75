"""The FLUX.1 / SD3 export layout (families/flow_names.py): every key it writes is read by ComfyUI and Forge (their
key mapping replayed in flow_loaders.py on the real architectures, built on the meta device), a loader's
arithmetic gives exactly the peft-trained change of every module, diffusers' loaders read what they can of it
to the same output, and the header rows are sd-scripts'."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from diffusers import FluxTransformer2DModel, SD3Transformer2DModel
from diffusers.loaders.single_file_utils import (
    convert_flux_transformer_checkpoint_to_diffusers,
    convert_sd3_transformer_checkpoint_to_diffusers,
)
from flow_loaders import (
    apply_patches,
    bfl_params,
    comfy_flux_diffusers,
    comfy_mmdit_diffusers,
    diffusers_view,
    key_map,
    load_lora,
    sai_params,
)
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from safetensors.torch import save_file

from lora_core.families.flow_names import (
    FlowNameError,
    diffusers_layout,
    export_original,
    flow_metadata,
    flow_variant,
    import_original,
    original_layout,
    unnamed_modules,
)

# The real architectures (diffusers' configs of the published checkpoints), names and shapes only
REAL = {
    "flux-dev": (FluxTransformer2DModel, {"guidance_embeds": True}),
    "flux-schnell": (FluxTransformer2DModel, {"guidance_embeds": False}),
    "sd3-medium": (SD3Transformer2DModel, {"num_layers": 24, "num_attention_heads": 24,
                                           "caption_projection_dim": 1536, "pos_embed_max_size": 192}),
    "sd35-medium": (SD3Transformer2DModel, {"num_layers": 24, "num_attention_heads": 24,
                                            "caption_projection_dim": 1536, "pos_embed_max_size": 384,
                                            "dual_attention_layers": tuple(range(13)), "qk_norm": "rms_norm"}),
    "sd35-large": (SD3Transformer2DModel, {"num_layers": 38, "num_attention_heads": 38,
                                           "caption_projection_dim": 2432, "pos_embed_max_size": 192,
                                           "qk_norm": "rms_norm"}),
}
# Small ones with real weights; SD3's width is 64 x its depth, as ComfyUI's detection assumes of SD3 models
SMALL_FLUX = {"patch_size": 1, "in_channels": 16, "num_layers": 2, "num_single_layers": 2, "attention_head_dim": 16,
              "num_attention_heads": 2, "joint_attention_dim": 32, "pooled_projection_dim": 16,
              "guidance_embeds": True, "axes_dims_rope": (4, 6, 6)}
SMALL_SD3 = {"sample_size": 8, "patch_size": 2, "in_channels": 4, "num_layers": 2, "attention_head_dim": 64,
             "num_attention_heads": 2, "joint_attention_dim": 32, "caption_projection_dim": 128,
             "pooled_projection_dim": 32, "out_channels": 4, "pos_embed_max_size": 8, "dual_attention_layers": (0,),
             "qk_norm": "rms_norm"}
LAYOUTS = {FluxTransformer2DModel: ("flux", bfl_params, convert_flux_transformer_checkpoint_to_diffusers),
           SD3Transformer2DModel: ("sd3", sai_params, convert_sd3_transformer_checkpoint_to_diffusers)}


def real(variant: str):
    cls, config = REAL[variant]
    with torch.device("meta"):
        return cls(**config)


def small(cls, seed: int = 0):
    torch.manual_seed(seed)
    return cls(**(SMALL_FLUX if cls is FluxTransformer2DModel else SMALL_SD3))


def weight_modules(model) -> dict[str, torch.nn.Module]:
    return {name: module for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear | torch.nn.Conv2d)}


def random_adapters(model, rank: int = 1, keep=lambda name: True) -> dict:
    """Random (down, up, alpha) for every adaptable module, alpha != rank."""
    generator = torch.Generator().manual_seed(1)
    adapters = {}
    for name, module in weight_modules(model).items():
        if keep(name):
            shape = module.weight.shape
            adapters[name] = (torch.randn((rank, *shape[1:]), generator=generator),
                              torch.randn((shape[0], rank, *[1] * (len(shape) - 2)), generator=generator), 3.0)
    return adapters


def peft_adapt(model, keep) -> dict:
    """peft LoRA on the kept modules (rank 4 and alpha 8, some modules rank 2 / alpha 3 or rank 6 / alpha 16),
    random A and B; returns {module: (A, B, alpha)} as the trainer would hand them over."""
    names = [name for name in weight_modules(model) if keep(name)]
    config = LoraConfig(r=4, lora_alpha=8, target_modules="^(" + "|".join(map(re.escape, names)) + ")$",
                        rank_pattern={"to_k": 2, "ff.net.2": 6}, alpha_pattern={"to_k": 3, "ff.net.2": 16})
    inject_adapter_in_model(config, model)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return {name: (module.lora_A["default"].weight.detach(), module.lora_B["default"].weight.detach(),
                   module.scaling["default"] * module.r["default"])
            for name, module in model.named_modules() if isinstance(module, LoraLayer)}


def delta(adapter, shape) -> torch.Tensor:
    down, up, alpha = adapter
    return ((up.double().flatten(1) @ down.double().flatten(1)) * (alpha / down.shape[0])).reshape(shape)


def everything(name: str) -> bool:
    return True


# ----------------------------------------------------------------------------------------------------- names

@pytest.mark.parametrize("variant", sorted(REAL))
def test_original_layouts_are_the_ones_diffusers_converts(variant):
    """The hand-listed original layouts (flow_loaders.py) are exactly what diffusers' single-file converter turns
    into this diffusers model: the loaders' replay below runs on the real key sets."""
    model = real(variant)
    _, params, convert = LAYOUTS[type(model)]
    original = params(model.config)
    converted = convert({key: torch.empty(shape, device="meta") for key, shape in original.items()})
    assert {key: tuple(t.shape) for key, t in converted.items()} == {
        key: tuple(t.shape) for key, t in model.state_dict().items()}


@pytest.mark.parametrize("variant", sorted(REAL))
def test_comfyui_and_forge_read_every_key_of_every_module(variant):
    """A LoRA on every adaptable module of the real architecture: every key it writes maps onto a weight of that
    shape in ComfyUI's and in Forge's key map (`lora key not loaded` never fires), and every module is covered."""
    model = real(variant)
    family, params, _ = LAYOUTS[type(model)]
    assert unnamed_modules(model) == []
    shapes = params(model.config)
    tensors = export_original(model, random_adapters(model))
    table = comfy_flux_diffusers(model.config) if family == "flux" else comfy_mmdit_diffusers(shapes)
    for forge in (False, True):
        patches, unread = load_lora(tensors, key_map(family, shapes, table, forge=forge))
        assert unread == set()
        assert len(patches) == len(original_layout(model)) == len(tensors) // 3
        for (key, offset, _), up, down, _ in patches:
            assert offset is None and (up.shape[0], *down.shape[1:]) == shapes[key]


def test_a_module_without_an_original_name_is_refused():
    model = real("flux-dev")
    adapters = random_adapters(model, keep=lambda name: name == "proj_out")
    with pytest.raises(FlowNameError, match="no name in the original"):
        export_original(model, {**adapters, "transformer_blocks.0.attn.to_nothing": adapters["proj_out"]})
    with pytest.raises(FlowNameError, match="name no module"):
        import_original({"lora_unet_double_blocks_99_img_attn_qkv.lora_down.weight": torch.zeros(1, 3072),
                         "lora_unet_double_blocks_99_img_attn_qkv.lora_up.weight": torch.zeros(9216, 1)}, model)


# ----------------------------------------------------------------------------------------------- arithmetic

@pytest.mark.parametrize("cls", [FluxTransformer2DModel, pytest.param(SD3Transformer2DModel, marks=pytest.mark.e2e)])
def test_comfyui_applies_exactly_the_trained_change(cls):  # SD3's: 3-6 s on a shared two-core machine
    """peft LoRA (alpha != rank, mixed ranks) on the small model, with holes in fused modules (add_k_proj and
    FLUX's proj_mlp untrained): ComfyUI's arithmetic on the exported file, read back per diffusers module by its
    own table, is each trained module's B @ A * alpha / r, and zero for the untrained parts."""
    model = small(cls)
    family, params, _ = LAYOUTS[cls]
    adapters = peft_adapt(model, lambda name: not name.endswith(("add_k_proj", "proj_mlp")))
    tensors = export_original(model, adapters)  # the peft-wrapped model itself: its names are the same
    shapes = params(model.config)
    table = comfy_flux_diffusers(model.config) if family == "flux" else comfy_mmdit_diffusers(shapes)
    patches, unread = load_lora(tensors, key_map(family, shapes, table))
    assert unread == set()
    view = diffusers_view(apply_patches(patches, shapes), table)
    modules = {name: module.weight for name, module in weight_modules(model).items() if ".lora_" not in name}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            modules[name] = module.base_layer.weight
    fused_untrained = [name for name in view if name not in adapters]
    assert set(adapters) <= set(view) and any("add_k_proj" in name for name in fused_untrained)
    for name, change in view.items():
        expected = delta(adapters[name], modules[name].shape) if name in adapters else torch.zeros_like(change)
        torch.testing.assert_close(change, expected, rtol=1e-5, atol=1e-7, msg=name)
    deltas = import_original(tensors, model)  # the inverse reads it the same way
    for name, adapter in adapters.items():
        torch.testing.assert_close(deltas[name].double(), delta(adapter, modules[name].shape), rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------------------------- diffusers

def test_diffusers_reads_flux_names_at_full_size(tmp_path):
    """diffusers' kohya-FLUX reader (it hard-codes FLUX.1's 19 / 38 blocks and width 3072) on the real FLUX.1-dev
    layout (its first and last blocks): every block module comes back with the trained change (checked on
    random vectors: B (A x) against up (down x) * alpha / r), the fused qkv and linear1 included."""
    from diffusers import FluxPipeline

    model = real("flux-dev")
    ends = re.compile(r"(transformer_blocks\.(0|18)|single_transformer_blocks\.(0|37))\.")  # first and last blocks
    adapters = random_adapters(model, rank=2, keep=lambda name: bool(ends.match(name)))
    path = tmp_path / "flux.safetensors"
    save_file(export_original(model, adapters), str(path))
    state = FluxPipeline.lora_state_dict(str(path))
    read = {key.removeprefix("transformer.").rpartition(".lora_")[0] for key in state}
    assert read == set(adapters)
    probe = torch.Generator().manual_seed(3)
    for name, (down, up, alpha) in adapters.items():
        x = torch.randn(down.shape[1], 3, generator=probe, dtype=torch.float64)
        a, b = state[f"transformer.{name}.lora_A.weight"].double(), state[f"transformer.{name}.lora_B.weight"].double()
        expected = up.double() @ (down.double() @ x) * (alpha / down.shape[0])
        # float32 factors: rounding relative to the largest entry, not to each (some are near zero)
        torch.testing.assert_close(b @ (a @ x), expected, rtol=0, atol=1e-6 * expected.abs().max().item(), msg=name)


def flux_inputs():
    generator = torch.Generator().manual_seed(4)
    return {"hidden_states": torch.randn(1, 4, 16, generator=generator),
            "encoder_hidden_states": torch.randn(1, 3, 32, generator=generator),
            "pooled_projections": torch.randn(1, 16, generator=generator), "timestep": torch.tensor([0.5]),
            "img_ids": torch.zeros(4, 3), "txt_ids": torch.zeros(3, 3), "guidance": torch.tensor([1.0])}


def sd3_inputs():
    generator = torch.Generator().manual_seed(4)
    return {"hidden_states": torch.randn(1, 4, 8, 8, generator=generator),
            "encoder_hidden_states": torch.randn(1, 3, 32, generator=generator),
            "pooled_projections": torch.randn(1, 32, generator=generator), "timestep": torch.tensor([500.0])}


def adapted_layers(model) -> set[str]:
    return {name for name, module in model.named_modules() if isinstance(module, LoraLayer)}


@torch.no_grad()
def test_flux_pipeline_loads_the_file_to_the_trained_output(tmp_path):
    """FluxPipeline.load_lora_weights of the exported file on the small model gives the peft-trained
    transformer's output. Left out: single blocks' q/k/v/proj_mlp, whose fused linear1 diffusers splits at
    FLUX.1's width 3072 only (the full-size test above covers it), and the modules outside the blocks, which its
    reader hands over without the `transformer.` prefix, so they are dropped without a word (shown here)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    base = small(FluxTransformer2DModel)
    trained = copy.deepcopy(base)
    keep = lambda name: name.startswith("transformer_blocks.") or name.endswith(("proj_out", "norm.linear"))  # noqa: E731
    adapters = peft_adapt(trained, keep)
    path = tmp_path / "flux.safetensors"
    save_file(export_original(trained, adapters), str(path))
    pipeline = FluxPipeline(FlowMatchEulerDiscreteScheduler(), None, None, None, None, None, base)
    pipeline.load_lora_weights(str(path))
    assert adapted_layers(base) == {name for name in adapters if name != "proj_out"}  # the top proj_out: dropped
    peft_only_blocks = copy.deepcopy(trained)
    peft_only_blocks.get_submodule("proj_out").scaling["default"] = 0.0  # as diffusers loaded it
    torch.testing.assert_close(base(**flux_inputs()).sample, peft_only_blocks(**flux_inputs()).sample,
                               rtol=1e-5, atol=1e-6)


def sd3_pipeline(transformer):
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    return StableDiffusion3Pipeline(transformer, FlowMatchEulerDiscreteScheduler(), *[None] * 7)


@torch.no_grad()
def test_sd3_pipeline_reads_no_kohya_names_but_the_diffusers_layout(tmp_path):
    """StableDiffusion3Pipeline reads no `lora_unet_` names (nothing is adapted, and no error), but the
    `diffusers_layout` file gives the trained output; ComfyUI reads that one at the same strength, Forge not at
    all."""
    base = small(SD3Transformer2DModel)
    trained = copy.deepcopy(base)
    adapters = peft_adapt(trained, everything)
    kohya, plain = tmp_path / "kohya.safetensors", tmp_path / "diffusers.safetensors"
    save_file(export_original(trained, adapters), str(kohya))
    save_file(diffusers_layout(adapters), str(plain))
    untouched = copy.deepcopy(base)
    sd3_pipeline(untouched).load_lora_weights(str(kohya))  # only a warning: "No LoRA keys associated ..."
    assert adapted_layers(untouched) == set()
    sd3_pipeline(base).load_lora_weights(str(plain))
    assert adapted_layers(base) == set(adapters)
    torch.testing.assert_close(base(**sd3_inputs()).sample, trained(**sd3_inputs()).sample, rtol=1e-5, atol=1e-6)

    tensors = diffusers_layout(adapters)
    shapes = sai_params(base.config)
    table = comfy_mmdit_diffusers(shapes)
    patches, unread = load_lora(tensors, key_map("sd3", shapes, table))
    assert unread == set()
    view = diffusers_view(apply_patches(patches, shapes), table)
    for name, adapter in adapters.items():
        torch.testing.assert_close(view[name], delta(adapter, view[name].shape), rtol=1e-5, atol=1e-7, msg=name)
    assert load_lora(tensors, key_map("sd3", shapes, table, forge=True))[1] == set(tensors)


# ----------------------------------------------------------------------------------------------- metadata

@pytest.mark.parametrize("variant, architecture, version", [
    ("flux-dev", "flux-1-dev/lora", "flux1"), ("flux-schnell", "flux-1-schnell/lora", "flux1"),
    ("sd3-medium", "stable-diffusion-3-medium/lora", "medium"),
    ("sd35-medium", "stable-diffusion-3-5-medium/lora", "5-medium"),
    ("sd35-large", "stable-diffusion-3-5-large/lora", "5-large")])
def test_header_rows_are_sd_scripts(variant, architecture, version):
    assert flow_variant(real(variant)) == variant
    rows = flow_metadata(variant)
    assert rows["modelspec.architecture"] == architecture and rows["ss_base_model_version"] == version
    assert rows["modelspec.implementation"] == (
        "https://github.com/black-forest-labs/flux" if variant.startswith("flux") else "diffusers")
    with pytest.raises(FlowNameError):
        flow_metadata("sd4")
