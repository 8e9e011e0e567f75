"""The exported kohya-format file reproduces the adapter exactly when diffusers loads it."""

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors import safe_open

from lora_core import builtin
from lora_core.config import parse_config
from lora_core.lora import add_lora, kohya_state_dict, save_lora, tag_frequency

CONFIG = dict(dataset_path="d", output_path="o", base_model="builtin:tiny-sd", trigger_words=["t"])


def unet_output(unet) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 32, 32, generator=generator)
    text = torch.randn(1, 77, unet.config.cross_attention_dim, generator=generator)
    with torch.no_grad():
        return unet(latents, torch.tensor([500]), encoder_hidden_states=text).sample


def load_tiny() -> StableDiffusionPipeline:
    return StableDiffusionPipeline.from_pretrained(builtin.builtin_folder("tiny-sd"), safety_checker=None)


@pytest.mark.e2e
def test_kohya_file_loaded_by_diffusers_equals_the_trained_adapter(tmp_path):
    config = parse_config({**CONFIG, "lora_rank": 4, "lora_alpha": 11})  # alpha != rank on purpose
    trained = load_tiny().unet
    base_output = unet_output(trained)
    torch.manual_seed(1)
    add_lora(trained, config)
    with torch.no_grad():  # as if trained: lora_B starts at zero, give it real values
        for name, param in trained.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    expected = unet_output(trained)

    path = save_lora(tmp_path / "lora.safetensors", kohya_state_dict(trained, config), {"ss_network_dim": "4"})
    with safe_open(str(path), "pt") as handle:
        keys = list(handle.keys())
        assert handle.metadata()["ss_network_dim"] == "4"
        alpha_key = next(key for key in keys if key.endswith(".alpha"))
        assert handle.get_tensor(alpha_key).item() == 11.0
    assert all(key.startswith("lora_unet_") for key in keys)
    assert any(key.endswith("attn2_to_out_0.lora_up.weight") for key in keys)
    assert {key.rsplit(".", 2)[-2] + "." + key.rsplit(".", 1)[-1] for key in keys if "weight" in key} == {
        "lora_down.weight", "lora_up.weight"}

    pipeline = load_tiny()
    pipeline.load_lora_weights(str(path))
    loaded = unet_output(pipeline.unet)
    assert (expected - base_output).abs().max() > 1e-3, "the adapter must change the output for this to mean much"
    torch.testing.assert_close(loaded, expected, rtol=0, atol=1e-5)


def test_non_finite_weights_are_never_saved(tmp_path):
    state = {"lora_unet_x.lora_down.weight": torch.tensor([[float("nan")]])}
    try:
        save_lora(tmp_path / "bad.safetensors", state, {})
    except FloatingPointError as error:
        assert "non-finite" in str(error)
    else:
        raise AssertionError("a NaN LoRA was saved")
    assert list(tmp_path.iterdir()) == []


def test_tag_frequency_counts_comma_separated_tags():
    assert tag_frequency(["a, b", "a, c", "a"]) == {"a": 3, "b": 1, "c": 1}
