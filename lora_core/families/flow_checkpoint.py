"""The flow-matching transformers' weights (FLUX.1, SD3 / SD3.5) in the original (BFL / Stability) layout, both
ways, for a transformer of any size: the single files people download (`flux1-dev.safetensors`,
`sd3.5_medium.safetensors`) hold their transformer in that layout.

flow_names.original_layout already maps every diffusers Linear / Conv2d to its original module, with the row
offsets of fused q/k/v (and FLUX's single-block MLP input) and the adaLN (shift, scale) swap; the parameters that
are not in such a module (RMS norms of q and k, SD3's position table) are listed here. diffusers' own converter
(`convert_flux_transformer_checkpoint_to_diffusers`) hard-codes FLUX.1's width (3072) to split the single blocks,
so it cannot read a FLUX transformer of another size: `diffusers_state` splits by the model's own rows instead,
and refuses a file with a missing, unknown or misshapen weight instead of leaving a parameter unloaded.

    tensors = original_state(transformer)            # diffusers model -> {original name: tensor}
    state = diffusers_state(tensors, skeleton)       # the inverse, for a model built on the meta device
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from lora_core.families.flow_names import FlowNameError, flow_family, original_layout, swap_halves

PREFIX = "model.diffusion_model."  # ComfyUI's (and Stability's full checkpoints') prefix of the transformer
# the other parts a bundled checkpoint may hold (VAE, text encoders), never the transformer's
OTHER_PARTS = ("first_stage_model.", "vae.", "text_encoders.", "cond_stage_model.", "conditioner.")
# diffusers parameter (a regular expression over its path) -> original name: the parameters outside the
# Linear / Conv2d modules original_layout knows
EXTRA = {
    "flux": (
        (r"transformer_blocks\.(\d+)\.attn\.norm_q\.weight", r"double_blocks.\1.img_attn.norm.query_norm.scale"),
        (r"transformer_blocks\.(\d+)\.attn\.norm_k\.weight", r"double_blocks.\1.img_attn.norm.key_norm.scale"),
        (r"transformer_blocks\.(\d+)\.attn\.norm_added_q\.weight",
         r"double_blocks.\1.txt_attn.norm.query_norm.scale"),
        (r"transformer_blocks\.(\d+)\.attn\.norm_added_k\.weight", r"double_blocks.\1.txt_attn.norm.key_norm.scale"),
        (r"single_transformer_blocks\.(\d+)\.attn\.norm_q\.weight", r"single_blocks.\1.norm.query_norm.scale"),
        (r"single_transformer_blocks\.(\d+)\.attn\.norm_k\.weight", r"single_blocks.\1.norm.key_norm.scale"),
    ),
    "sd3": (
        (r"pos_embed\.pos_embed", "pos_embed"),
        (r"transformer_blocks\.(\d+)\.attn\.norm_q\.weight", r"joint_blocks.\1.x_block.attn.ln_q.weight"),
        (r"transformer_blocks\.(\d+)\.attn\.norm_k\.weight", r"joint_blocks.\1.x_block.attn.ln_k.weight"),
        (r"transformer_blocks\.(\d+)\.attn\.norm_added_q\.weight", r"joint_blocks.\1.context_block.attn.ln_q.weight"),
        (r"transformer_blocks\.(\d+)\.attn\.norm_added_k\.weight", r"joint_blocks.\1.context_block.attn.ln_k.weight"),
        (r"transformer_blocks\.(\d+)\.attn2\.norm_q\.weight", r"joint_blocks.\1.x_block.attn2.ln_q.weight"),
        (r"transformer_blocks\.(\d+)\.attn2\.norm_k\.weight", r"joint_blocks.\1.x_block.attn2.ln_k.weight"),
    ),
}


def transformer_keys(keys: list[str]) -> dict[str, str]:
    """{original name: the file's key} of a single file's transformer weights: those under ComfyUI's prefix
    when the file has it, else every key that is not another part's (BFL's transformer-only file)."""
    if any(key.startswith(PREFIX) for key in keys):
        return {key[len(PREFIX):]: key for key in keys if key.startswith(PREFIX)}
    return {key: key for key in keys if not key.startswith(OTHER_PARTS)}


def _extra_name(family: str, path: str) -> str | None:
    for pattern, original in EXTRA[family]:
        if re.fullmatch(pattern, path):
            return re.sub(pattern, original, path)
    return None


def _fused_names(transformer: torch.nn.Module) -> dict[str, tuple[str, list[str], list[int], bool]]:
    """{original parameter: (kind, diffusers module paths, their rows, swapped)} for weights and biases."""
    names = {}
    for original in original_layout(transformer).values():
        for kind in ("weight", "bias"):
            names[f"{original.name}.{kind}"] = (kind, list(original.parts), list(original.rows), original.swap)
    return names


def original_state(transformer: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The transformer's parameters under their original names: fused modules' parts stacked row after row,
    the (scale, shift) halves of diffusers' AdaLayerNormContinuous swapped back. What `diffusers_state` and
    diffusers' single-file converters read."""
    family, state = flow_family(transformer), transformer.state_dict()
    tensors, used = {}, set()
    for name, (kind, parts, _, swap) in _fused_names(transformer).items():
        keys = [f"{part}.{kind}" for part in parts]
        if not any(key in state for key in keys):
            continue  # a module without a bias
        tensor = torch.cat([state[key] for key in keys])
        tensors[name] = swap_halves(tensor) if swap else tensor
        used.update(keys)
    for path, tensor in state.items():
        if path not in used and (name := _extra_name(family, path)) is not None:
            tensors[name] = tensor
            used.add(path)
    if unnamed := sorted(set(state) - used):
        raise FlowNameError(f"{len(unnamed)} parameters have no original name (e.g. {unnamed[0]})")
    return tensors


def diffusers_state(tensors: Mapping[str, torch.Tensor], skeleton: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The original-layout `tensors` (prefix removed) as `skeleton`'s state dict: `skeleton` is the diffusers
    transformer the file should fill (built from its config, typically on the meta device). Every parameter must
    be found with its shape, and every tensor used: a file of another model is refused with what differs."""
    family, expected = flow_family(skeleton), skeleton.state_dict()
    state, used = {}, set()
    for name, (kind, parts, rows, swap) in _fused_names(skeleton).items():
        if name not in tensors or f"{parts[0]}.{kind}" not in expected:
            continue  # missing ones are reported below, with the rest
        tensor = swap_halves(tensors[name]) if swap else tensors[name]
        if tensor.shape[0] != sum(rows):
            raise FlowNameError(f"{name}: {tensor.shape[0]} rows in the file, {sum(rows)} in the model's config")
        state.update({f"{part}.{kind}": piece for part, piece in zip(parts, tensor.split(rows), strict=True)})
        used.add(name)
    for path in expected:
        if path not in state and (name := _extra_name(family, path)) is not None and name in tensors:
            state[path] = tensors[name]
            used.add(name)
    _check_complete(state, expected, sorted(set(tensors) - used))
    return state


def _check_complete(state: dict[str, torch.Tensor], expected: Mapping[str, torch.Tensor],
                    unused: list[str]) -> None:
    missing = sorted(set(expected) - set(state))
    shapes = [f"{path} {tuple(state[path].shape)} (the config's {tuple(expected[path].shape)})"
              for path in sorted(state) if path in expected and state[path].shape != expected[path].shape]
    problems = [f"{len(missing)} of the model's weights are not in the file (e.g. {missing[0]})"] if missing else []
    if unused:
        problems.append(f"{len(unused)} of the file's tensors belong to no weight of the model (e.g. {unused[0]})")
    problems += [f"{len(shapes)} weights have another shape (e.g. {shapes[0]})"] if shapes else []
    if problems:
        raise FlowNameError("the file's transformer is not the one its config describes: " + "; ".join(problems))


def file_keys(path: str) -> list[str]:
    """A single file's tensor names, from its header (no tensor is read)."""
    from safetensors import safe_open

    with safe_open(path, "pt") as handle:
        return list(handle.keys())


def read_transformer(path: str, cls: type, components: str) -> torch.nn.Module:
    """The file's original-layout transformer as a diffusers `cls`, its config from `components`/transformer.
    Converted here (for any size), then loaded by diffusers' `from_single_file`, which takes names it already
    knows as they are (no second conversion) into a model built without allocating its random weights."""
    from safetensors import safe_open

    config = cls.load_config(components, subfolder="transformer")
    with torch.device("meta"):
        skeleton = cls.from_config(config)
    with safe_open(path, "pt") as handle:
        names = transformer_keys(list(handle.keys()))
        tensors = {name: handle.get_tensor(key) for name, key in names.items()}
    return cls.from_single_file(diffusers_state(tensors, skeleton), config=components, subfolder="transformer")


def folder_part(components: str, part: str) -> torch.nn.Module:
    """One model of a diffusers folder (`text_encoder_2`, `vae`), of the class its model_index.json names."""
    import importlib
    import json
    from pathlib import Path

    library, class_name = json.loads((Path(components) / "model_index.json").read_text(encoding="utf-8"))[part]
    model_class = getattr(importlib.import_module(library), class_name)
    return model_class.from_pretrained(components, subfolder=part, use_safetensors=True)
