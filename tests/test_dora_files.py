"""DoRA files in the kohya layout, replayed with each loader's own arithmetic.

A DoRA (peft, alpha != rank, with the text encoder(s)) is written as the trainer writes it; each loader's way of
turning `lora_down` / `lora_up` / `alpha` / `dora_scale` into a weight is re-implemented below from its source
(file and commit named in each helper), applied to a fresh base pipeline, and the UNet's and text encoders'
outputs compared with the trained model's. Key names: a DoRA file names exactly the layers a plain LoRA file of
the same config names, which test_lora_files checks against every loader's mapping.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from test_lora_files import BASE, assert_same, outputs, with_adapters
from test_text_encoder_lora import load

from lora_core import families
from lora_core.configfile import parse_config
from lora_core.lora import diffusers_state_dict as old_peft_format
from lora_core.lora import kohya_state_dict, lora_file_contents, save_lora, training_metadata
from lora_core.lorafile import apply_lora, diffusers_state_dict, module_table, read

pytestmark = pytest.mark.xdist_group("test_lora_files")


def _parts(weight: torch.Tensor, t: dict[str, torch.Tensor]) -> tuple[torch.Tensor, float, torch.Tensor]:
    up, down = t["lora_up.weight"], t["lora_down.weight"]
    product = torch.mm(up.flatten(1), down.flatten(1)).reshape(weight.shape)
    return product, float(t["alpha"]) / down.shape[0], t["dora_scale"]


def comfyui(weight: torch.Tensor, t: dict[str, torch.Tensor], strength: float = 1.0) -> torch.Tensor:
    """ComfyUI comfy/weight_adapter/lora.py (6fd406f) LoRAAdapter.calculate_weight -> comfy/weight_adapter/
    base.py (9c0cf36) weight_decompose. Forge backend/patcher/lora.py (dfdcbab) merge_lora_to_weight ->
    weight_decompose is the same arithmetic, line for line."""
    lora_diff, alpha, dora_scale = _parts(weight, t)
    weight_calc = weight + lora_diff * alpha
    if dora_scale.shape[0] == weight_calc.shape[0]:  # wd_on_output_axis: the norm of the *base* weight
        norm = weight.reshape(weight.shape[0], -1).norm(dim=1, keepdim=True)
        norm = norm.reshape(weight.shape[0], *[1] * (weight.dim() - 1))
    else:
        norm = (weight_calc.transpose(0, 1).reshape(weight_calc.shape[1], -1).norm(dim=1, keepdim=True)
                .reshape(weight_calc.shape[1], *[1] * (weight_calc.dim() - 1)).transpose(0, 1))
    norm = norm + torch.finfo(weight.dtype).eps
    weight_calc = weight_calc * (dora_scale / norm)
    return weight + strength * (weight_calc - weight) if strength != 1.0 else weight_calc


def a1111(weight: torch.Tensor, t: dict[str, torch.Tensor], multiplier: float = 1.0) -> torch.Tensor:
    """A1111 (v1.9+) extensions-builtin/Lora: network_lora.py calc_updown (up @ down in the weight's shape), then
    network.py finalize_updown: x alpha / dim, apply_weight_decompose, x multiplier (as vendored in Forge
    dfdcbab packages_3rdparty/webui_lora_collection/network.py). Its norm is always per *input* channel."""
    updown, scale, dora_scale = _parts(weight, t)
    merged = updown * scale + weight
    norm = (merged.transpose(0, 1).reshape(merged.shape[1], -1).norm(dim=1, keepdim=True)
            .reshape(merged.shape[1], *[1] * (weight.dim() - 1)).transpose(0, 1))
    updown = merged * (dora_scale / norm) - weight
    return weight + updown * multiplier


def lycoris(weight: torch.Tensor, t: dict[str, torch.Tensor], multiplier: float = 1.0) -> torch.Tensor:
    """LyCORIS lycoris/modules/locon.py (f49d30d): make_module_from_state_dict (wd_on_out=True, the default
    since 3.2.0), get_merged_weight -> apply_weight_decompose: the norm of the adapted weight per output channel."""
    diff, scale, dora_scale = _parts(weight, t)
    adapted = weight + diff * scale
    norm = adapted.reshape(adapted.shape[0], -1).norm(dim=1).reshape(adapted.shape[0], *[1] * (weight.dim() - 1))
    factor = dora_scale / (norm + torch.finfo(weight.dtype).eps)
    if multiplier != 1:
        factor = multiplier * (factor - 1) + 1
    return adapted * factor


def patched(family: str, path, loader) -> object:
    """A fresh base pipeline with every layer of the file patched by `loader`'s arithmetic."""
    pipeline = load(family)
    table = module_table(pipeline)
    with torch.no_grad():
        for name, layer in read(path).layers.items():
            weight = table[name].weight
            weight.copy_(loader(weight.detach().float(), layer.tensors).to(weight.dtype))
    return pipeline


@pytest.fixture(scope="module", params=[("sd1", "attention"), ("sd1", "locon"), ("sdxl", "attention"),
                                        ("sdxl", "locon")], ids=lambda p: "-".join(p))
def dora_file(request, tmp_path_factory):
    family, target = request.param
    config = parse_config({**BASE, "base_model": "builtin:tiny-sd", "lora_rank": 4, "lora_alpha": 6,
                           "lora_target": target, "use_dora": True, "train_text_encoder": True})
    trained, encoders = with_adapters(family, config)
    state, header = lora_file_contents(trained.unet, config, encoders, families.get(family))
    path = save_lora(tmp_path_factory.mktemp("dora") / "dora.safetensors", state, header)
    plain_config = parse_config({**BASE, "base_model": "builtin:tiny-sd", "lora_target": target})
    plain_pipeline, plain_encoders = with_adapters(family, plain_config)
    plain = kohya_state_dict(plain_pipeline.unet, plain_config, plain_encoders, families.get(family))
    return family, config, path, outputs(trained, family), outputs(load(family), family), plain


@pytest.mark.e2e
def test_the_file_is_kohyas_layout_with_dora_scale_on_the_output_axis(dora_file):
    family, config, path, trained, base, plain = dora_file
    tensors = load_file(str(path))
    layers = {key.split(".")[0] for key in tensors}
    assert layers == {key.split(".")[0] for key in plain}  # the plain LoRA's names, which every loader maps
    assert {key.split(".", 1)[1] for key in tensors} == {"lora_down.weight", "lora_up.weight", "alpha", "dora_scale"}
    for layer in layers:
        down, up, scale = (tensors[f"{layer}.{p}"] for p in ("lora_down.weight", "lora_up.weight", "dora_scale"))
        assert scale.shape == (up.shape[0], *[1] * (down.dim() - 1)), layer  # (out, 1) / (out, 1, 1, 1)
        assert float(tensors[f"{layer}.alpha"]) == 6.0
    prefixes = {"sd1": {"lora_unet", "lora_te"}, "sdxl": {"lora_unet", "lora_te1", "lora_te2"}}[family]
    assert {layer.split("_text_model_")[0] if "_text_model_" in layer else "lora_unet" for layer in layers} == prefixes
    assert (trained[0] - base[0]).abs().max() > 1e-2


@pytest.mark.e2e
def test_lycoris_and_the_studio_reproduce_the_trained_dora(dora_file):
    family, _, path, trained, _, _ = dora_file
    assert_same(outputs(patched(family, path, lycoris), family), trained)
    pipeline = load(family)
    apply_lora(pipeline, path, 1.0)
    assert_same(outputs(pipeline, family), trained)


@pytest.mark.e2e
def test_comfyui_forge_and_a1111_do_not_reproduce_it(dora_file):
    """Recorded, not wished: ComfyUI and Forge divide by the base weight's norm (ComfyUI PR #15458, open,
    would fix it), A1111 normalises per input channel. Neither can be matched by any output-axis dora_scale
    that also holds for LyCORIS (README, DoRA). If a loader's arithmetic changes, this test says so."""
    family, _, path, trained, base, _ = dora_file
    for loader in (comfyui, a1111):
        got = outputs(patched(family, path, loader), family)
        error = max(float((a - b).abs().max()) for a, b in zip(got, trained, strict=True))
        effect = max(float((a - b).abs().max()) for a, b in zip(base, trained, strict=True))
        assert error > 1e-3, loader.__name__
        assert error < 2 * effect, loader.__name__  # the same kind of change, not noise


def test_comfyuis_arithmetic_equals_the_trained_dora_where_the_norm_is_unchanged():
    """The replays themselves: on a layer whose change keeps every output channel's norm (a rotation within
    each row), ComfyUI's base-weight norm equals the adapted one and its formula, like LyCORIS's, agrees with
    peft's; so the differences above come from the norms, not from the helpers."""
    torch.manual_seed(0)
    weight = torch.randn(6, 6)
    rotation = torch.linalg.qr(torch.randn(6, 6))[0]
    delta = weight @ rotation - weight  # rows keep their norms
    u, s, vh = torch.linalg.svd(delta)
    tensors = {"lora_up.weight": u * s, "lora_down.weight": vh, "alpha": torch.tensor(6.0),
               "dora_scale": torch.rand(6, 1) + 0.5}
    adapted = weight + delta
    wanted = tensors["dora_scale"] * adapted / adapted.norm(dim=1, keepdim=True)
    torch.testing.assert_close(comfyui(weight, tensors), wanted, rtol=0, atol=1e-5)
    torch.testing.assert_close(lycoris(weight, tensors), wanted, rtol=0, atol=1e-5)


@pytest.mark.e2e
def test_diffusers_drops_dora_scale_but_loads_the_converted_file_exactly(dora_file):
    """diffusers' SD / SDXL `lora_state_dict` filters `dora_scale` out of kohya files (with a warning), so
    `load_lora_weights(path)` gives a plain LoRA; `lorafile.diffusers_state_dict` gives it the same file in PEFT
    form, which loads, and fuses, to the trained model."""
    family, _, path, trained, _, _ = dora_file
    pipeline = load(family)
    pipeline.load_lora_weights(str(path))
    assert not [name for name, _ in pipeline.unet.named_parameters() if "lora_magnitude_vector" in name]
    assert max(float((a - b).abs().max()) for a, b in zip(outputs(pipeline, family), trained, strict=True)) > 1e-3
    pipeline = load(family)
    pipeline.load_lora_weights(diffusers_state_dict(path, pipeline))
    assert_same(outputs(pipeline, family), trained)
    pipeline.fuse_lora()
    pipeline.unload_lora_weights()
    assert_same(outputs(pipeline, family), trained)


@pytest.mark.e2e
def test_the_header_names_lycoris_dora(dora_file, tmp_path):
    family, config, path, _, _, _ = dora_file

    meta = training_metadata(config, families.get(family), "epsilon", steps=1, epochs=1, num_images=1, precision="no",
                             started_at=datetime.now(UTC), tag_frequency={})
    assert meta["ss_network_module"] == "lycoris.kohya"
    args = json.loads(meta["ss_network_args"])
    assert args["algo"] == "locon" and args["dora_wd"] == "True" and args["wd_on_output"] == "True"
    with safe_open(str(path), "pt") as handle:
        assert "lora_adapter_metadata" not in (handle.metadata() or {})


@pytest.mark.e2e
@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_older_peft_format_dora_files_still_apply(tmp_path, family):
    config = parse_config({**BASE, "base_model": "builtin:tiny-sd", "lora_rank": 4, "lora_alpha": 6,
                           "lora_target": "locon", "use_dora": True})
    trained, encoders = with_adapters(family, config)
    state, header = old_peft_format(trained.unet, config, encoders)
    path = save_lora(tmp_path / "old.safetensors", state, header)
    assert read(path).kinds == {"dora"}
    pipeline = load(family)
    apply_lora(pipeline, path, 1.0)
    assert_same(outputs(pipeline, family), outputs(trained, family))


# one module of each kind the targets adapt, at the real SD 1.5 / SDXL sizes (non-square feed-forward and
# cross-attention layers, 1x1 and 3x3 convolutions, SD 1.5's convolutional proj_in, SDXL's linear one)
REAL_KINDS = ("attn1.to_q", "attn2.to_k", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "conv1",
              "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv")


def real_layers(name: str) -> dict[str, torch.nn.Module]:
    """The first module of each kind in the real architecture (built on the meta device, so no weights), as a
    real layer of the same shape with random weights."""
    from lora_core import builtin

    spec = builtin.BUILTINS[name]
    with torch.device("meta"):
        unet = builtin._unet(spec, pooled_dim=spec.text_hidden[-1])
    found: dict[str, torch.nn.Module] = {}
    for module_name, module in unet.named_modules():
        kind = next((k for k in REAL_KINDS if module_name.endswith(k) and k not in found), None)
        if kind is None:
            continue
        if isinstance(module, torch.nn.Conv2d):
            found[kind] = torch.nn.Conv2d(module.in_channels, module.out_channels, module.kernel_size,
                                          module.stride, module.padding)
        else:
            found[kind] = torch.nn.Linear(module.in_features, module.out_features)
    assert set(found) == set(REAL_KINDS)
    return found


@pytest.mark.e2e
@pytest.mark.parametrize("name", ["sd15-arch", "sdxl-arch"])
def test_real_architecture_layers_through_each_loader(name):
    """Per layer at the real sizes: peft's DoRA forward is the truth; the kohya file's tensors through LyCORIS's
    and the studio's arithmetic give the same layer, ComfyUI's and A1111's do not."""
    from peft import LoraConfig, inject_adapter_in_model

    from lora_core.dora import kohya_dora_state_dict
    from lora_core.lorafile import Layer, layer_delta

    torch.manual_seed(0)
    for kind, layer in real_layers(name).items():
        holder = torch.nn.Module()
        holder.layer = layer
        base = layer.weight.detach().clone()
        inject_adapter_in_model(LoraConfig(r=4, lora_alpha=6, use_dora=True, init_lora_weights="gaussian",
                                           target_modules=["layer"]), holder)
        with torch.no_grad():
            for param in holder.parameters():
                if param.requires_grad:
                    param.add_(torch.randn_like(param) * 0.05)
        holder.eval()
        tensors = {key.split(".", 1)[1]: value
                   for key, value in kohya_dora_state_dict([(holder, lambda m: "x")], 6.0).items()}
        conv = isinstance(layer, torch.nn.Conv2d)
        x = torch.randn(1, layer.in_channels, 8, 8) if conv else torch.randn(3, layer.in_features)

        def forward(weight: torch.Tensor, layer=layer, x=x, conv=conv) -> torch.Tensor:
            if conv:
                return torch.nn.functional.conv2d(x, weight, layer.bias, layer.stride,
                                                  layer.padding)
            return torch.nn.functional.linear(x, weight, layer.bias)

        with torch.no_grad():
            wanted = holder.layer(x)
            studio = base + layer_delta(Layer("dora", tensors), base.shape, base)
            for loader, exact in ((lycoris, True), (comfyui, False), (a1111, False)):
                got = forward(loader(base, tensors))
                close = torch.allclose(got, wanted, rtol=1e-4, atol=1e-5)
                assert close == exact, f"{kind}: {loader.__name__}"
            torch.testing.assert_close(forward(studio), wanted, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shape", [(5, 7), (5, 3, 3, 3)])
def test_input_axis_dora_scale_of_older_lycoris_files_reads_as_a1111_applies_it(shape):
    """LyCORIS before `wd_on_output` wrote `dora_scale` as (1, in[, 1, 1]) and normalised per input channel,
    which is A1111's formula: the studio reads such a file the same way."""
    from lora_core.lorafile import Layer, layer_delta

    torch.manual_seed(1)
    weight = torch.randn(shape)
    tensors = {"lora_down.weight": torch.randn(2, *shape[1:]), "lora_up.weight": torch.randn(shape[0], 2,
               *[1] * (len(shape) - 2)), "alpha": torch.tensor(3.0),
               "dora_scale": torch.rand(1, shape[1], *[1] * (len(shape) - 2)) + 0.5}
    studio = weight + layer_delta(Layer("dora", tensors), weight.shape, weight)
    torch.testing.assert_close(studio, a1111(weight, tensors), rtol=1e-5, atol=1e-6)


@pytest.mark.e2e
def test_the_grid_draws_a_dora_file_as_trained(dora_file):
    """The grid's renderer loads LoRA files through diffusers, whose own loader would drop `dora_scale` (under
    the renderer's quieted logging, silently): it must draw with the DoRA as trained."""
    from lora_core.drawing import Renderer

    family, config, path, trained, _, _ = dora_file
    base_model = "builtin:tiny-sdxl" if family == "sdxl" else "builtin:tiny-sd"
    renderer = Renderer(config.model_copy(update={"base_model": base_model}), "cpu")
    renderer.load(path)
    assert_same(outputs(renderer.pipeline, family), trained)
    renderer.unload()
    assert_same(outputs(renderer.pipeline, family), outputs(load(family), family))
