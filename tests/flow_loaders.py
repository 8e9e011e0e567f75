"""Test helpers for tests/test_flow_names.py: the original (BFL / Stability) parameter layouts of FLUX.1 and
SD3 / SD3.5, listed by hand from the original model code and checked against diffusers' single-file converters,
and a replay of how ComfyUI and Forge map and apply LoRA keys on them.

The replay re-implements the mapping logic of (read, not copied):
- ComfyUI comfy/lora.py `model_lora_keys_unet` / `load_lora` / `calculate_weight` (comfyanonymous/ComfyUI at
  41444b5236c613ee5ff7d09aa620f94b702f30eb, the copy the search index holds) and comfy/utils.py
  `flux_to_diffusers` / `mmdit_to_diffusers` as current ComfyUI has them (FLUX: q/k/v at row offsets 0, h, 2h of
  `img_attn.qkv` / `txt_attn.qkv` / `linear1`, proj_mlp at 3h with 4h rows; SD3: offset = depth * 64 with
  depth = hidden // 64, SD3.5's `attn2.to_q/k/v` on `x_block.attn2.qkv`, `attn2.to_out.0` on `x_block.attn2.proj`,
  and `norm_out` and the last block's `norm1_context` through swap_scale_shift);
- Forge packages_3rdparty/comfyui_lora_collection/lora.py `model_lora_keys_unet` and backend/patcher/lora.py
  `merge_lora_to_weight` (lllyasviel/stable-diffusion-webui-forge at dfdcbab685e57677014f05a3309b48cc87383167):
  the same, except that its SD3 block for diffusers (`transformer.`) keys is commented out.
"""

from __future__ import annotations

import torch

Shapes = dict[str, tuple[int, ...]]


def bfl_params(config) -> Shapes:
    """FLUX.1's parameters in BFL's layout (flux/model.py, flux/modules/layers.py): name -> shape."""
    h = config["num_attention_heads"] * config["attention_head_dim"]
    head, mlp = config["attention_head_dim"], 4 * h
    shapes: Shapes = {}

    def linear(name: str, out: int, into: int) -> None:
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (out, into), (out,)

    linear("img_in", h, config["in_channels"])
    linear("txt_in", h, config["joint_attention_dim"])
    embedders = [("time_in", 256), ("vector_in", config["pooled_projection_dim"])]
    for name, into in embedders + ([("guidance_in", 256)] if config["guidance_embeds"] else []):
        linear(f"{name}.in_layer", h, into)
        linear(f"{name}.out_layer", h, h)
    for i in range(config["num_layers"]):
        for stream in ("img", "txt"):
            block = f"double_blocks.{i}.{stream}"
            linear(f"{block}_mod.lin", 6 * h, h)
            linear(f"{block}_attn.qkv", 3 * h, h)
            linear(f"{block}_attn.proj", h, h)
            shapes[f"{block}_attn.norm.query_norm.scale"] = shapes[f"{block}_attn.norm.key_norm.scale"] = (head,)
            linear(f"{block}_mlp.0", mlp, h)
            linear(f"{block}_mlp.2", h, mlp)
    for i in range(config["num_single_layers"]):
        block = f"single_blocks.{i}"
        linear(f"{block}.linear1", 3 * h + mlp, h)
        linear(f"{block}.linear2", h, h + mlp)
        shapes[f"{block}.norm.query_norm.scale"] = shapes[f"{block}.norm.key_norm.scale"] = (head,)
        linear(f"{block}.modulation.lin", 3 * h, h)
    linear("final_layer.linear", config["patch_size"] ** 2 * (config["out_channels"] or config["in_channels"]), h)
    linear("final_layer.adaLN_modulation.1", 2 * h, h)
    return shapes


def sai_params(config) -> Shapes:
    """SD3 / SD3.5's parameters in Stability's MMDiT(-X) layout (sd3.5 mmditx.py): name -> shape."""
    h, head, p = config["caption_projection_dim"], config["attention_head_dim"], config["patch_size"]
    depth = config["num_layers"]
    shapes: Shapes = {"pos_embed": (1, config["pos_embed_max_size"] ** 2, h),
                      "x_embedder.proj.weight": (h, config["in_channels"], p, p), "x_embedder.proj.bias": (h,)}

    def linear(name: str, out: int, into: int) -> None:
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (out, into), (out,)

    linear("t_embedder.mlp.0", h, 256)
    linear("t_embedder.mlp.2", h, h)
    linear("y_embedder.mlp.0", h, config["pooled_projection_dim"])
    linear("y_embedder.mlp.2", h, h)
    linear("context_embedder", h, config["joint_attention_dim"])
    for i in range(depth):
        dual = i in (config["dual_attention_layers"] or ())
        for side in ("x_block", "context_block"):
            block, pre_only = f"joint_blocks.{i}.{side}", side == "context_block" and i == depth - 1
            attentions = ("attn", "attn2") if dual and side == "x_block" else ("attn",)
            for attn in attentions:
                linear(f"{block}.{attn}.qkv", 3 * h, h)
                if config["qk_norm"]:
                    shapes[f"{block}.{attn}.ln_q.weight"] = shapes[f"{block}.{attn}.ln_k.weight"] = (head,)
                if not pre_only:
                    linear(f"{block}.{attn}.proj", h, h)
            if not pre_only:
                linear(f"{block}.mlp.fc1", 4 * h, h)
                linear(f"{block}.mlp.fc2", h, 4 * h)
            linear(f"{block}.adaLN_modulation.1", (2 if pre_only else 9 if len(attentions) == 2 else 6) * h, h)
    linear("final_layer.linear", p * p * config["out_channels"], h)
    linear("final_layer.adaLN_modulation.1", 2 * h, h)
    return shapes


def comfy_flux_diffusers(config) -> dict[str, tuple]:
    """comfy/utils.py `flux_to_diffusers`, weights only: diffusers module -> (original weight, offset, swap)."""
    h = config["num_attention_heads"] * config["attention_head_dim"]
    table: dict[str, tuple] = {}
    for i in range(config["num_layers"]):
        fro, to = f"transformer_blocks.{i}", f"double_blocks.{i}"
        for n, (img, txt) in enumerate((("to_q", "add_q_proj"), ("to_k", "add_k_proj"), ("to_v", "add_v_proj"))):
            table[f"{fro}.attn.{img}"] = (f"{to}.img_attn.qkv.weight", (0, n * h, h), False)
            table[f"{fro}.attn.{txt}"] = (f"{to}.txt_attn.qkv.weight", (0, n * h, h), False)
        plain = {"attn.to_out.0": "img_attn.proj", "norm1.linear": "img_mod.lin", "norm1_context.linear":
                 "txt_mod.lin", "attn.to_add_out": "txt_attn.proj", "ff.net.0.proj": "img_mlp.0", "ff.net.2":
                 "img_mlp.2", "ff_context.net.0.proj": "txt_mlp.0", "ff_context.net.2": "txt_mlp.2"}
        table.update({f"{fro}.{k}": (f"{to}.{v}.weight", None, False) for k, v in plain.items()})
    for i in range(config["num_single_layers"]):
        fro, to = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
        for n, name in enumerate(("attn.to_q", "attn.to_k", "attn.to_v")):
            table[f"{fro}.{name}"] = (f"{to}.linear1.weight", (0, n * h, h), False)
        table[f"{fro}.proj_mlp"] = (f"{to}.linear1.weight", (0, 3 * h, 4 * h), False)
        table[f"{fro}.norm.linear"] = (f"{to}.modulation.lin.weight", None, False)
        table[f"{fro}.proj_out"] = (f"{to}.linear2.weight", None, False)
    basic = {"proj_out": "final_layer.linear", "x_embedder": "img_in", "context_embedder": "txt_in",
             "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
             "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
             "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
             "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
             "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
             "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer"}
    table.update({k: (f"{v}.weight", None, False) for k, v in basic.items()})
    table["norm_out.linear"] = ("final_layer.adaLN_modulation.1.weight", None, True)
    return table


def comfy_mmdit_diffusers(shapes: Shapes) -> dict[str, tuple]:
    """comfy/utils.py `mmdit_to_diffusers` with the config ComfyUI detects (depth = hidden // 64, blocks
    counted), weights only: diffusers module -> (original weight, offset, swap)."""
    depth = shapes["x_embedder.proj.weight"][0] // 64
    blocks = len({key.split(".")[1] for key in shapes if key.startswith("joint_blocks.")})
    offset, table = depth * 64, {}
    for i in range(blocks):
        fro, to = f"transformer_blocks.{i}", f"joint_blocks.{i}"
        for n, (x, c) in enumerate((("to_q", "add_q_proj"), ("to_k", "add_k_proj"), ("to_v", "add_v_proj"))):
            table[f"{fro}.attn.{x}"] = (f"{to}.x_block.attn.qkv.weight", (0, n * offset, offset), False)
            table[f"{fro}.attn.{c}"] = (f"{to}.context_block.attn.qkv.weight", (0, n * offset, offset), False)
            table[f"{fro}.attn2.{x}"] = (f"{to}.x_block.attn2.qkv.weight", (0, n * offset, offset), False)
        plain = {"norm1_context.linear": "context_block.adaLN_modulation.1", "attn.to_add_out":
                 "context_block.attn.proj", "ff_context.net.0.proj": "context_block.mlp.fc1", "ff_context.net.2":
                 "context_block.mlp.fc2", "norm1.linear": "x_block.adaLN_modulation.1", "attn.to_out.0":
                 "x_block.attn.proj", "attn2.to_out.0": "x_block.attn2.proj", "ff.net.0.proj": "x_block.mlp.fc1",
                 "ff.net.2": "x_block.mlp.fc2"}
        table.update({f"{fro}.{k}": (f"{to}.{v}.weight", None, False) for k, v in plain.items()})
    basic = {"context_embedder": "context_embedder", "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
             "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2", "pos_embed.proj": "x_embedder.proj",
             "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
             "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2", "proj_out": "final_layer.linear"}
    table.update({k: (f"{v}.weight", None, False) for k, v in basic.items()})
    table["norm_out.linear"] = ("final_layer.adaLN_modulation.1.weight", None, True)
    table[f"transformer_blocks.{depth - 1}.norm1_context.linear"] = (
        f"joint_blocks.{depth - 1}.context_block.adaLN_modulation.1.weight", None, True)
    return table


def key_map(family: str, shapes: Shapes, diffusers: dict[str, tuple], forge: bool = False) -> dict[str, tuple]:
    """`model_lora_keys_unet`: LoRA name -> (model weight, offset, swap), model weights under `diffusion_model.`."""
    found: dict[str, tuple] = {}
    for key in shapes:
        if key.endswith(".weight"):
            name = key[:-len(".weight")]
            found["lora_unet_" + name.replace(".", "_")] = (key, None, False)
            if not forge:
                found["lora_prior_unet_" + name.replace(".", "_")] = (key, None, False)
            found["diffusion_model." + name] = (key, None, False)
    prefixes = {"flux": ("transformer.", "lycoris_", "lora_transformer_"),
                "sd3": () if forge else ("transformer.", "base_model.model.", "lora_transformer_", "lycoris_")}
    for module, target in diffusers.items():
        for prefix in prefixes[family]:
            found[prefix + (module if prefix.endswith(".") else module.replace(".", "_"))] = target
    return found


def load_lora(tensors: dict[str, torch.Tensor], keys: dict[str, tuple]) -> tuple[list[tuple], set[str]]:
    """`load_lora` for plain LoRA (`.lora_up/.lora_down`, diffusers' `.lora_B/.lora_A`, `.alpha`): the patches
    (target, up, down, alpha or None) and the file's keys it did not load (ComfyUI logs each one)."""
    patches, loaded = [], set()
    for name, target in keys.items():
        for up_key, down_key in ((".lora_up.weight", ".lora_down.weight"), (".lora_B.weight", ".lora_A.weight")):
            if name + up_key in tensors:
                alpha = tensors.get(name + ".alpha")
                patches.append((target, tensors[name + up_key], tensors[name + down_key],
                                None if alpha is None else float(alpha)))
                loaded |= {name + up_key, name + down_key} | ({name + ".alpha"} if alpha is not None else set())
    return patches, set(tensors) - loaded


def apply_patches(patches: list[tuple], shapes: Shapes) -> dict[str, torch.Tensor]:
    """`calculate_weight` at strength 1 on zero weights: the change each model weight gets."""
    deltas: dict[str, torch.Tensor] = {}
    for (key, offset, swap), up, down, alpha in patches:
        weight = deltas.setdefault(key, torch.zeros(shapes[key], dtype=torch.float64))
        if offset is not None:
            weight = weight.narrow(*offset)
        scale = alpha / down.shape[0] if alpha is not None else 1.0
        diff = (up.double().flatten(1) @ down.double().flatten(1)).reshape(weight.shape) * scale
        weight += torch.cat(diff.chunk(2)[::-1]) if swap else diff
    return deltas


def diffusers_view(deltas: dict[str, torch.Tensor], table: dict[str, tuple]) -> dict[str, torch.Tensor]:
    """Each diffusers module's share of the original weights' changes, by the loader's own table."""
    view = {}
    for module, (key, offset, swap) in table.items():
        if key in deltas:
            piece = deltas[key] if offset is None else deltas[key].narrow(*offset)
            view[module] = torch.cat(piece.chunk(2)[::-1]) if swap else piece
    return view
