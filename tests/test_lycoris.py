"""LoHa and LoKr: trained with peft's implementation, written in LyCORIS's layout, rebuilt from the file by
LyCORIS's published formulas (with ComfyUI's / A1111's scale rule), applied by `apply_lora`, resumed exactly."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_config
from safetensors.torch import load_file
from test_text_encoder_lora import OPTIONS, encode, load, run, unet_inputs

from lora_core.lorafile import apply_lora

LOHA = {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"}


def published_delta(tensors: dict[str, torch.Tensor], shape: torch.Size) -> torch.Tensor:
    """The formulas as LyCORIS publishes them and ComfyUI applies them (comfy/weight_adapter/loha.py, lokr.py):
    LoHa (w1a w1b) * (w2a w2b) * alpha / rank; LoKr kron(w1, w2), scaled by alpha / rank only where a factor is
    low-rank (the rank read from that factor)."""
    if "hada_w1_a" in tensors:
        w1 = tensors["hada_w1_a"] @ tensors["hada_w1_b"]
        w2 = tensors["hada_w2_a"] @ tensors["hada_w2_b"]
        return (w1 * w2 * (tensors["alpha"] / tensors["hada_w1_b"].shape[0])).reshape(shape)
    dim = None
    w1 = tensors.get("lokr_w1")
    if w1 is None:
        w1, dim = tensors["lokr_w1_a"] @ tensors["lokr_w1_b"], tensors["lokr_w1_b"].shape[0]
    w2 = tensors.get("lokr_w2")
    if w2 is None:
        w2, dim = tensors["lokr_w2_a"] @ tensors["lokr_w2_b"], tensors["lokr_w2_b"].shape[0]
    if w2.dim() == 4:
        w1 = w1.unsqueeze(2).unsqueeze(2)
    scale = tensors["alpha"] / dim if dim is not None else 1.0
    return (torch.kron(w1, w2) * scale).reshape(shape)


def trained_deltas(models: list, names: list) -> dict[str, tuple[torch.Tensor, torch.Size]]:
    """Each adapted layer's effective weight change in the trained model (peft's own, no dropout), by the
    name the file gives it."""
    out = {}
    for model, name_of in zip(models, names, strict=True):
        for module_name, module in model.named_modules():
            if hasattr(module, "get_delta_weight") and getattr(module, "r", None):
                with torch.no_grad():
                    out[name_of(module_name)] = (module.get_delta_weight("default"), module.base_layer.weight.shape)
    return out


@pytest.mark.e2e
@pytest.mark.parametrize(("network", "family"), [("loha", "sd1"), ("lokr", "sd1"), ("lokr", "sdxl")])
def test_lycoris_file_rebuilds_the_trained_weight_change_and_applies_exactly(dataset_dir, tmp_path, network,
                                                                              family):
    from lora_core import families
    from lora_core.lora import text_encoder_namer

    config = tiny_config(dataset_dir, tmp_path / "out", steps=2, network_type=network, lora_target="locon",
                         lora_alpha=6, **OPTIONS)
    config["base_model"] = "builtin:tiny-sdxl" if family == "sdxl" else "builtin:tiny-sd"
    result, events = run(config)
    assert events[-1].type == "complete"
    state = load_file(str(result.final_path))
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        name, _, param = key.partition(".")
        layers.setdefault(name, {})[param] = tensor
    if network == "loha":
        assert all(set(params) == LOHA for params in layers.values())
    else:  # at rank 4 the tiny layers' second factor is whole in some layers, split in others: both scale rules
        assert {("lokr_w2" in p, "lokr_w2_a" in p) for p in layers.values()} == {(True, False), (False, True)}
        assert all("lokr_w1" in p and "alpha" in p for p in layers.values())

    prefixes = families.get(family).text_encoder_prefixes(len(result.text_encoders))
    models = [result.unet, *result.text_encoders]
    namers = [families.get(family).unet_namer(result.unet.config), *(text_encoder_namer(p) for p in prefixes)]
    trained = trained_deltas(models, namers)
    assert trained.keys() == layers.keys()
    for name, (delta, shape) in trained.items():
        torch.testing.assert_close(published_delta(layers[name], shape), delta, rtol=0, atol=1e-5, msg=name)
    assert max(delta.abs().max().item() for delta, _ in trained.values()) > 1e-4  # it really learned

    for model in models:
        model.eval()
    wanted_text = encode(_with_encoders(load(family), result.text_encoders), family)
    inputs = unet_inputs(family)
    pipeline = load(family)
    apply_lora(pipeline, result.final_path, 1.0)
    with torch.no_grad():
        torch.testing.assert_close(pipeline.unet(**inputs).sample, result.unet(**inputs).sample, rtol=0, atol=1e-5)
    for got, wanted in zip(encode(pipeline, family), wanted_text, strict=True):
        torch.testing.assert_close(got, wanted, rtol=0, atol=1e-5)


def _with_encoders(pipeline, encoders: list):
    for index, encoder in enumerate(encoders):
        setattr(pipeline, "text_encoder_2" if index else "text_encoder", encoder)
    return pipeline


@pytest.mark.e2e
@pytest.mark.parametrize("network", ["loha", "lokr"])
def test_lycoris_resumes_bit_identically(dataset_dir, tmp_path, network):
    options = dict(steps=3, checkpoint_steps=1, validation_steps=1000, network_type=network, lora_dropout=0.1)
    whole, _ = run(tiny_config(dataset_dir, tmp_path / "whole", **options))
    first, _ = run(tiny_config(dataset_dir, tmp_path / "out", **options), stop_at=1)
    assert first.interrupted
    second, events = run(tiny_config(dataset_dir, tmp_path / "out", **options), resume=True)
    assert events[0].resumed_from_step == 1
    expected, resumed = load_file(str(whole.final_path)), load_file(str(second.final_path))
    assert expected.keys() == resumed.keys() and all(k.endswith(("alpha",) + tuple(LOHA) + ("lokr_w1", "lokr_w2",
                                                                  "lokr_w2_a", "lokr_w2_b")) for k in expected)
    different = [key for key in expected if not torch.equal(expected[key], resumed[key])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[0]}"
