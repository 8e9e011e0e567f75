"""Block-wise learning rates and ranks (blocks.py) as sd-scripts' networks/lora.py defines them: its block
numbering and weight curves written afresh here, each module's rank and alpha in peft and in the file, a file
diffusers loads at the trained strength, and the optimizer's rate per block."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import StableDiffusionPipeline
from pydantic import ValidationError
from safetensors.torch import load_file

from lora_core import blocks, builtin, families, param_groups
from lora_core.config import TrainConfig
from lora_core.lora import add_lora, kohya_state_dict, network_args, save_lora

BASE = dict(dataset_path="d", base_model="builtin:tiny-sd", output_path="o", trigger_words=["x"])
DIMS = ",".join(str(i % 4) for i in range(25))  # 0, 1, 2, 3, 0, ...: blocks 0, 4, 8, ... get no LoRA
ALPHAS = ",".join(str(i + 1) for i in range(25))


def reference_sd_block(side: str, i: int, kind: str, j: int) -> int:
    """sd-scripts: down blocks 1 + 3i + j (samplers j = 2), the mid block 12, up blocks 13 + 3i + j."""
    j = 2 if kind in ("upsamplers", "downsamplers") else j
    return 1 + 3 * i + j if side == "down" else 13 + 3 * i + j


@pytest.mark.parametrize("side,i,kind,j", [("down", 0, "attentions", 1), ("down", 2, "downsamplers", 0),
                                           ("down", 3, "resnets", 1), ("up", 0, "resnets", 2),
                                           ("up", 1, "upsamplers", 0), ("up", 3, "attentions", 2)])
def test_sd_block_numbers_are_sd_scripts(side, i, kind, j):
    name = f"lora_unet_{side}_blocks_{i}_{kind}_{j}_transformer_blocks_0_attn1_to_q"
    assert blocks.block_index(name) == reference_sd_block(side, i, kind, j)


def test_the_mid_block_and_sdxls_original_layout_are_numbered_as_sd_scripts():
    assert blocks.block_index("lora_unet_mid_block_attentions_0_proj_in") == 12
    assert blocks.block_index("lora_unet_conv_in") == -1
    for name, index in (("input_blocks_4_1_proj_in", 5), ("middle_block_1_transformer_blocks_0_attn1_to_k", 11),
                        ("output_blocks_8_0_in_layers_2", 21), ("time_embed_0", 0), ("out_2", 22)):
        assert blocks.block_index("lora_unet_" + name) == index


def test_weight_curves_and_short_lists_follow_sd_scripts():
    config = TrainConfig(**BASE, down_lr_weight="sine+0.5", mid_lr_weight="0", up_lr_weight="1,0.5")
    weights = blocks.lr_weights(config, sdxl=False)
    assert weights[:12] == pytest.approx([math.sin(math.pi * (i / 11) / 2) + 0.5 for i in range(12)])
    assert weights[12] == 0 and weights[13:] == [1.0, 0.5] + [1.0] * 10  # filled with 1
    sdxl = blocks.lr_weights(TrainConfig(**BASE, up_lr_weight="cosine"), sdxl=True)
    assert len(sdxl) == 23 and sdxl[0] == sdxl[-1] == 1.0  # SDXL's embedding and out blocks
    assert sdxl[13:22] == pytest.approx([math.sin(math.pi * (i / 8) / 2) for i in reversed(range(9))])


def adapted_unet(**options):
    """tiny-sd's UNet with a LoRA of `options`, its up matrices nudged so the LoRA changes the output."""
    config = TrainConfig(**BASE, **{"lora_target": "attention_mlp", **options})
    unet = tiny_pipeline().unet
    torch.manual_seed(3)
    namer = families.get("sd1").unet_namer(unet.config)
    add_lora(unet, config, namer=namer)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_B" in name:
                param.add_(torch.randn_like(param) * 0.05)
    return config, unet, namer


@pytest.fixture(scope="module")
def block_unet():
    return adapted_unet(block_dims=DIMS, block_alphas=ALPHAS)


def tiny_pipeline():
    return StableDiffusionPipeline.from_pretrained(builtin.builtin_folder("tiny-sd"), safety_checker=None)


def test_each_module_has_its_blocks_rank_and_alpha_in_peft_and_in_the_file(block_unet):
    config, unet, namer = block_unet
    dims, alphas = [int(d) for d in DIMS.split(",")], [float(a) for a in ALPHAS.split(",")]
    state = kohya_state_dict(unet, config)
    adapted = {name: module for name, module in unet.named_modules() if hasattr(module, "lora_A")}
    assert adapted and {blocks.block_index(namer(n)) for n in adapted}.isdisjoint({0, 4, 8, 12, 16, 20, 24})
    for name, module in adapted.items():
        index = blocks.block_index(namer(name))
        assert module.r["default"] == dims[index] and module.lora_alpha["default"] == alphas[index]
        kohya = namer(name)
        assert state[f"{kohya}.lora_down.weight"].shape[0] == dims[index]
        assert state[f"{kohya}.alpha"].item() == alphas[index]
    assert any(module.r["default"] != config.lora_rank for module in adapted.values())


def test_the_files_update_of_each_module_is_peft_s(block_unet):
    config, unet, namer = block_unet
    state = kohya_state_dict(unet, config)
    for name, module in unet.named_modules():
        if hasattr(module, "lora_A"):
            kohya = namer(name)
            # a 1x1 convolution's matrices are 4-d: flattened to (out, rank) and (rank, in)
            down, up = state[f"{kohya}.lora_down.weight"].flatten(1), state[f"{kohya}.lora_up.weight"].flatten(1)
            from_file = up @ down * (state[f"{kohya}.alpha"] / down.shape[0])  # how every kohya loader reads it
            a, b = module.lora_A["default"].weight.flatten(1), module.lora_B["default"].weight.flatten(1)
            peft = b @ a * module.scaling["default"]
            torch.testing.assert_close(from_file, peft.detach())


@pytest.mark.e2e
def test_diffusers_loads_a_file_of_block_ranks_at_the_trained_strength(tmp_path):
    # block ranks only: diffusers' SD loader maps per-module alphas to its old attention-processor names and
    # then misses them (diffusers 0.42), so block_alphas files are checked by their math above instead
    config, unet, _ = adapted_unet(block_dims=DIMS)
    generator = torch.Generator().manual_seed(0)
    latents, text = torch.randn(1, 4, 32, 32, generator=generator), torch.randn(1, 77, 32, generator=generator)
    with torch.no_grad():
        expected = unet(latents, torch.tensor([300]), encoder_hidden_states=text).sample
    path = save_lora(tmp_path / "lora.safetensors", kohya_state_dict(unet, config), {})
    pipeline = tiny_pipeline()
    pipeline.load_lora_weights(str(path))
    with torch.no_grad():
        got = pipeline.unet(latents, torch.tensor([300]), encoder_hidden_states=text).sample
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-5)
    assert {t.shape[0] for k, t in load_file(str(path)).items() if k.endswith("lora_down.weight")} == {1, 2, 3}


def test_each_parameter_learns_at_its_blocks_rate(block_unet):
    _, unet, namer = block_unet
    config = TrainConfig(**BASE, learning_rate=1e-4, down_lr_weight=",".join(["0.5"] * 12), mid_lr_weight="2",
                         loraplus_lr_ratio=4)
    params = [p for p in unet.parameters() if p.requires_grad]
    groups = param_groups.optimizer_groups(config, params, [], [unet], namer)
    rate = {id(p): group["lr"] for group in groups for p in group["params"]}
    assert len(rate) == len(params)
    for name, param in unet.named_parameters():
        if param.requires_grad:
            index = blocks.block_index(namer(name.split(".lora_")[0]))
            weight = 0.5 if 1 <= index <= 11 else 2.0 if index == 12 else 1.0
            assert rate[id(param)] == pytest.approx(1e-4 * weight * (4 if ".lora_B." in name else 1))


def test_block_options_are_checked_per_family_and_written_as_network_args():
    problems = dict(families.get("sdxl").check_config(TrainConfig(**BASE, block_dims=DIMS)))
    assert "23 blocks" in problems["block_dims"]  # SDXL has 23, this list 25
    assert not families.get("sd1").check_config(TrainConfig(**BASE, block_dims=DIMS))
    flux = dict(families.get("flux").check_config(TrainConfig(**BASE, up_lr_weight="1,1", min_snr_gamma=0)))
    assert "UNet's blocks" in flux["up_lr_weight"]
    bad = dict(families.get("sd1").check_config(TrainConfig(**BASE, down_lr_weight="1,x")))
    assert "comma-separated" in bad["down_lr_weight"]
    one = dict(families.get("sd1").check_config(TrainConfig(**BASE, up_lr_weight="0.5")))
    assert "one number" in one["up_lr_weight"]  # sd-scripts would read it as a curve's name
    with pytest.raises(ValidationError, match="block-wise"):
        TrainConfig(**BASE, block_dims=DIMS, network_type="lokr")
    assert network_args(TrainConfig(**BASE, block_dims=DIMS, up_lr_weight="sine"))["block_dims"] == DIMS


def test_sdxl_modules_take_the_rank_of_their_original_layout_block():
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(builtin.builtin_folder("tiny-sdxl"), subfolder="unet")
    dims = [i % 3 for i in range(23)]
    config = TrainConfig(**BASE, block_dims=",".join(map(str, dims)))
    namer = families.get("sdxl").unet_namer(unet.config)
    add_lora(unet, config, namer=namer)
    adapted = {namer(name): module.r["default"] for name, module in unet.named_modules() if hasattr(module, "r")}
    assert adapted and all(blocks.is_sdxl_name(name) for name in adapted)
    assert all(rank == dims[blocks.block_index(name)] for name, rank in adapted.items())
    assert {blocks.block_index(name) for name in adapted}.isdisjoint({0, 3, 6, 9, 12, 15, 18, 21})


def test_locon_convolutions_take_the_conv_block_ranks():
    conv_dims = [(i + 1) % 3 for i in range(25)]
    config, unet, namer = adapted_unet(lora_target="locon", block_dims=DIMS,
                                       conv_block_dims=",".join(map(str, conv_dims)))
    convs = {namer(name): module.r["default"] for name, module in unet.named_modules()
             if hasattr(module, "r") and getattr(module.base_layer, "kernel_size", (1, 1)) == (3, 3)}
    assert convs and all(rank == conv_dims[blocks.block_index(name)] for name, rank in convs.items())
    with pytest.raises(ValidationError, match="locon"):
        TrainConfig(**BASE, conv_block_dims=DIMS)


def test_every_adapter_kind_s_parameter_names_its_adapted_module():
    from lora_core.blocks import adapted_module

    module = "down_blocks.0.resnets.0.conv1"
    for parameter in ("lora_A.default.weight", "lora_magnitude_vector.default.weight", "lokr_w1.default",
                      "hada_w1_a.default"):
        assert adapted_module(f"{module}.{parameter}") == module
