"""DoRA files in the kohya / LyCORIS layout, and their weight change.

Per adapted module (names as for a plain LoRA, e.g. `lora_unet_..._to_q`, `lora_te1_text_model_...`):
`lora_down.weight`, `lora_up.weight`, `alpha` and `dora_scale`, the magnitude in LyCORIS's `wd_on_output`
layout: shape (out, 1) for a linear layer, (out, 1, 1, 1) for a convolution, one entry per output channel.
Its meaning is LyCORIS's (`lycoris/modules/locon.py`, `apply_weight_decompose` with `wd_on_out`), which is
peft's DoRA (what this trainer trains):

    W' = dora_scale * (W + dW) / ||W + dW||     with dW = up @ down * alpha / rank,
                                                 the norm per output channel (over inputs x kernel)

so `dora_scale` is peft's `lora_magnitude_vector`, reshaped. The loaders differ (README, "DoRA"): LyCORIS and
the studio apply exactly this; ComfyUI and Forge recognise the output axis from the shape but divide by the
base weight's norm ||W|| instead of the adapted one; A1111 always normalises per input channel; diffusers' SD
and SDXL loaders drop `dora_scale` (`to_diffusers` below gives them an exact file instead).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from peft.utils import get_peft_model_state_dict

PEFT_PARAMS = {"A.weight": "lora_down.weight", "B.weight": "lora_up.weight", "magnitude_vector": "dora_scale"}
# the header LyCORIS's kohya module needs to rebuild the network (sd-scripts' own networks.lora has no DoRA)
NETWORK_MODULE = "lycoris.kohya"


def kohya_dora_state_dict(named_models: list[tuple[torch.nn.Module, Callable[[str], str]]],
                          alpha: float) -> dict[str, torch.Tensor]:
    """Every model's DoRA adapters (peft) as kohya tensors, under the names `name_of` gives each module."""
    state: dict[str, torch.Tensor] = {}
    for model, name_of in named_models:
        modules: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in get_peft_model_state_dict(model).items():
            module, _, kind = key.partition(".lora_")
            if kind not in PEFT_PARAMS:
                raise ValueError(f"unexpected DoRA tensor {key}")
            modules.setdefault(module, {})[PEFT_PARAMS[kind]] = tensor.detach().float().cpu()
        for module, params in modules.items():
            name = name_of(module)
            down = params["lora_down.weight"]
            params["dora_scale"] = output_axis(params["dora_scale"], down.dim())
            params["alpha"] = torch.tensor(float(alpha))
            state.update({f"{name}.{param}": tensor.contiguous() for param, tensor in params.items()})
    return state


def output_axis(magnitude: torch.Tensor, dims: int) -> torch.Tensor:
    """peft's magnitude ((out,) for a linear layer, (1, out, 1, 1) for a convolution) as `dora_scale`:
    (out, 1[, 1, 1]). A 1-D `dora_scale` would broadcast along the wrong axis in ComfyUI (its issue #12938)."""
    return magnitude.reshape(-1, *[1] * (dims - 1))


def dora_weight(base: torch.Tensor, delta: torch.Tensor, dora_scale: torch.Tensor) -> torch.Tensor:
    """The adapted weight, flattened to (out, in x kernel). `dora_scale` on the output axis (this trainer's
    and LyCORIS's default) normalises each output channel; on the input axis ((1, in, ...), LyCORIS's layout
    before `wd_on_output`) each input channel."""
    adapted = base.flatten(1).float() + delta
    out = adapted.shape[0]
    if dora_scale.shape[0] == out and (out > 1 or dora_scale.numel() == 1):
        return adapted * (dora_scale.reshape(out, 1) / adapted.norm(dim=1, keepdim=True))
    by_input = adapted.reshape(out, dora_scale.shape[1], -1)  # (out, in, kernel)
    norm = by_input.norm(dim=(0, 2), keepdim=True)
    return (by_input * (dora_scale.reshape(1, -1, 1) / norm)).reshape(out, -1)


def to_diffusers(tensors: dict[str, torch.Tensor], paths: dict[str, tuple[str, str]]) -> dict[str, torch.Tensor]:
    """A kohya DoRA state dict in the PEFT form that diffusers' `load_lora_weights` loads exactly (it drops
    `dora_scale` from kohya files): `<component>.<module path>.lora_A.weight / .lora_B.weight /
    .lora_magnitude_vector` in peft's shapes, alpha / rank folded into lora_B (a state dict passed in memory has
    no adapter config, so diffusers takes alpha = rank). `paths`: kohya layer name -> (pipeline component,
    module path), as lorafile.module_paths gives them."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        name, _, param = key.partition(".")
        groups.setdefault(name, {})[param] = tensor.float()
    out: dict[str, torch.Tensor] = {}
    for name, params in groups.items():
        component, module = paths[name]
        down, up = params["lora_down.weight"], params["lora_up.weight"]
        scale = float(params["alpha"]) / down.shape[0] if "alpha" in params else 1.0
        prefix = f"{component}.{module}"
        out[f"{prefix}.lora_A.weight"] = down.contiguous()
        out[f"{prefix}.lora_B.weight"] = (up * scale).contiguous()
        if "dora_scale" in params:
            magnitude = params["dora_scale"].flatten()
            if down.dim() == 4:  # peft keeps a convolution's magnitude as (1, out, 1, 1)
                magnitude = magnitude.reshape(1, -1, 1, 1)
            # transformers' `load_adapter` (the text encoders' path) wants the magnitude as a `.weight`
            suffix = "" if component == "unet" else ".weight"
            out[f"{prefix}.lora_magnitude_vector{suffix}"] = magnitude.contiguous()
    return out
