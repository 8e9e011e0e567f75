"""The UNet's module names in the original (LDM / Stability) layout, as sd-scripts writes SDXL LoRA keys.

`input_blocks.4.1.transformer_blocks.0.attn1.to_q` is diffusers' `down_blocks.1.attentions.0.transformer_blocks.
0.attn1.to_q`. The names come from the model's own config and are checked against diffusers' own converter
(`convert_ldm_unet_checkpoint`, which turns an original-layout checkpoint into diffusers names): every name
written here is one that the library maps back to the diffusers module it stands for, for any block count.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

# the ResNet block's parameters in the original layout (diffusers' converter applies the reverse renames)
RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
          "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def ldm_module_names(unet_config: Any) -> dict[str, str]:
    """diffusers module path -> original-layout module path, for every module with weights in a UNet of this
    config (a diffusers `UNet2DConditionModel` config)."""
    return dict(_cached(json.dumps(_plain(unet_config), sort_keys=True)))


def _plain(config: Any) -> dict[str, Any]:
    return {key: list(value) if isinstance(value, tuple) else value for key, value in dict(config).items()
            if not key.startswith("_")}


@lru_cache(maxsize=8)
def _cached_keys(config_json: str) -> tuple[tuple[str, str], ...]:
    from diffusers.loaders.single_file_utils import LDM_UNET_KEY, convert_ldm_unet_checkpoint

    config = json.loads(config_json)
    if not isinstance(config.get("layers_per_block"), int):
        raise ValueError("the original layout needs one layers_per_block for every block, got "
                         f"{config.get('layers_per_block')!r}")
    ours = {key: _to_ldm(key, config) for key in _diffusers_keys(config)}
    # the library's converter carries values through unchanged: give it each name as its own value
    theirs = convert_ldm_unet_checkpoint({LDM_UNET_KEY + ldm: ldm for ldm in ours.values()}, config)
    wrong = [key for key, ldm in ours.items() if theirs.get(key) != ldm]
    if wrong or len(theirs) != len(ours):
        raise ValueError(f"original-layout names disagree with diffusers' converter for {len(wrong)} keys, e.g. "
                         f"{wrong[:1]}; this UNet's layout is not one the original code has")
    return tuple(sorted(ours.items()))


@lru_cache(maxsize=8)
def _cached(config_json: str) -> tuple[tuple[str, str], ...]:
    modules = {}
    for key, ldm in _cached_keys(config_json):
        module, _, leaf = key.rpartition(".")
        ldm_module, _, ldm_leaf = ldm.rpartition(".")
        if leaf == ldm_leaf and module:
            modules[module] = ldm_module
    return tuple(sorted(modules.items()))


def _diffusers_keys(config: dict[str, Any]) -> list[str]:
    import torch
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    return list(unet.state_dict())


def _to_ldm(key: str, config: dict[str, Any]) -> str:
    """One diffusers parameter name in the original layout (the inverse of diffusers' converter)."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    fixed = {**DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"], **DIFFUSERS_TO_LDM_MAPPING["unet"]["addition_embed_type"]}
    if key in fixed:
        return fixed[key]
    if key.startswith("class_embedding."):
        return DIFFUSERS_TO_LDM_MAPPING["unet"]["class_embed_type"][key]
    parts = key.split(".")
    per_block = config["layers_per_block"] + 1  # the up blocks' layers; a down block's plus its downsampler
    if parts[0] == "mid_block":  # resnets.0, attentions.0, resnets.1 -> middle_block.0, .1, .2
        row = 1 if parts[1] == "attentions" else 2 * int(parts[2])
        return ".".join([f"middle_block.{row}", *_resnet(parts[1], parts[3:])])
    side, block, kind, index, rest = parts[0], int(parts[1]), parts[2], int(parts[3]), parts[4:]
    if side == "down_blocks":
        if kind == "downsamplers":  # `op` is the convolution itself
            return ".".join([f"input_blocks.{(block + 1) * per_block}.0.op", *rest[1:]])
        return ".".join([f"input_blocks.{1 + block * per_block + index}.{_slot(kind)}", *_resnet(kind, rest)])
    if side == "up_blocks":
        if kind == "upsamplers":  # after the block's last layer, behind its attention if it has one
            slot = 2 if "CrossAttn" in config["up_block_types"][block] else 1
            return ".".join([f"output_blocks.{block * per_block + per_block - 1}.{slot}", *rest])
        return ".".join([f"output_blocks.{block * per_block + index}.{_slot(kind)}", *_resnet(kind, rest)])
    raise ValueError(f"no original-layout name for UNet parameter {key}")


def _slot(kind: str) -> str:
    return {"resnets": "0", "attentions": "1"}[kind]


def _resnet(kind: str, rest: list[str]) -> list[str]:
    if kind == "resnets" and rest and rest[0] in RESNET:
        return [RESNET[rest[0]], *rest[1:]]
    return rest
