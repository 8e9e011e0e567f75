"""The exported LoRA layout of the flow-matching transformers (FLUX.1, SD3 / SD3.5) in the original (BFL /
Stability) module names, as sd-scripts writes them and ComfyUI, Forge and sd-scripts read them.

Training adapts the diffusers modules (`transformer_blocks.0.attn.to_q`, ...); the original layout fuses some of
them into one projection (`double_blocks.0.img_attn.qkv` holds to_q, to_k and to_v row after row; FLUX's
`single_blocks.0.linear1` holds to_q, to_k, to_v and proj_mlp). A fused module's LoRA is the parts' downs
stacked along the rank and their ups block-diagonal, each part's own alpha/rank folded into its up block and
`.alpha` set to the new rank: every loader computes up @ down * alpha / rank, which is then exactly the sum of the
parts' trained changes, each at its own rows (a part that was not trained has zero rows). An unfused module
keeps its own alpha, except the final layer's (diffusers' kohya-FLUX reader drops those alphas, so they are
folded too). diffusers' AdaLayerNormContinuous (`norm_out`, SD3's last `norm1_context`) orders its modulation
(scale, shift), the original (shift, scale): those ups are written with their two halves swapped.

    tensors = export_original(transformer, {"transformer_blocks.0.attn.to_q": (down, up, alpha), ...})
    deltas = import_original(tensors, transformer)      # {diffusers module path: dW}, the inverse
    metadata = flow_metadata(flow_variant(transformer))  # modelspec / ss_ rows as sd-scripts writes them

Loaders (checked in tests/test_flow_names.py): ComfyUI and Forge read these names for both families. diffusers'
FLUX loader reads the blocks' modules (its converter hard-codes FLUX.1's 19/38 blocks and 3072 width) but drops
those outside the blocks (img_in, txt_in, time/vector/guidance_in, final_layer) without a word, and sd-scripts
builds only block modules when it reads a file: a FLUX LoRA every loader reads whole adapts the blocks only.
diffusers' SD3 loader reads no kohya names at all, and Forge reads no diffusers names for SD3: no one SD3 file
serves all three. `diffusers_layout` gives the file diffusers (and ComfyUI) read for SD3, for a second file if wanted;
never put both layouts in one file (a loader reading both would apply the LoRA twice).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch

PREFIX = "lora_unet_"
Adapter = tuple[torch.Tensor, torch.Tensor, float]  # down (r x in...), up (out x r...), alpha

# diffusers module (in a block) -> original module, with the part's slot when several are fused into it
FLUX_DOUBLE = {
    "attn.to_q": ("img_attn.qkv", 0), "attn.to_k": ("img_attn.qkv", 1), "attn.to_v": ("img_attn.qkv", 2),
    "attn.add_q_proj": ("txt_attn.qkv", 0), "attn.add_k_proj": ("txt_attn.qkv", 1),
    "attn.add_v_proj": ("txt_attn.qkv", 2),
    "attn.to_out.0": ("img_attn.proj", None), "attn.to_add_out": ("txt_attn.proj", None),
    "ff.net.0.proj": ("img_mlp.0", None), "ff.net.2": ("img_mlp.2", None),
    "ff_context.net.0.proj": ("txt_mlp.0", None), "ff_context.net.2": ("txt_mlp.2", None),
    "norm1.linear": ("img_mod.lin", None), "norm1_context.linear": ("txt_mod.lin", None),
}
FLUX_SINGLE = {
    "attn.to_q": ("linear1", 0), "attn.to_k": ("linear1", 1), "attn.to_v": ("linear1", 2),
    "proj_mlp": ("linear1", 3), "proj_out": ("linear2", None), "norm.linear": ("modulation.lin", None),
}
FLUX_TOP = {
    "x_embedder": "img_in", "context_embedder": "txt_in",
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "norm_out.linear": "final_layer.adaLN_modulation.1", "proj_out": "final_layer.linear",
}
SD3_JOINT = {
    "attn.to_q": ("x_block.attn.qkv", 0), "attn.to_k": ("x_block.attn.qkv", 1),
    "attn.to_v": ("x_block.attn.qkv", 2),
    "attn.add_q_proj": ("context_block.attn.qkv", 0), "attn.add_k_proj": ("context_block.attn.qkv", 1),
    "attn.add_v_proj": ("context_block.attn.qkv", 2),
    "attn2.to_q": ("x_block.attn2.qkv", 0), "attn2.to_k": ("x_block.attn2.qkv", 1),
    "attn2.to_v": ("x_block.attn2.qkv", 2),  # SD3.5 Medium's second (image-only) attention
    "attn.to_out.0": ("x_block.attn.proj", None), "attn.to_add_out": ("context_block.attn.proj", None),
    "attn2.to_out.0": ("x_block.attn2.proj", None),
    "ff.net.0.proj": ("x_block.mlp.fc1", None), "ff.net.2": ("x_block.mlp.fc2", None),
    "ff_context.net.0.proj": ("context_block.mlp.fc1", None), "ff_context.net.2": ("context_block.mlp.fc2", None),
    "norm1.linear": ("x_block.adaLN_modulation.1", None),
    "norm1_context.linear": ("context_block.adaLN_modulation.1", None),
}
SD3_TOP = {
    "pos_embed.proj": "x_embedder.proj", "context_embedder": "context_embedder",
    "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
    "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
    "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
    "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
    "norm_out.linear": "final_layer.adaLN_modulation.1", "proj_out": "final_layer.linear",
}
# (diffusers block list, original block list, its table) per family
BLOCKS = {
    "flux": (("transformer_blocks", "double_blocks", FLUX_DOUBLE),
             ("single_transformer_blocks", "single_blocks", FLUX_SINGLE)),
    "sd3": (("transformer_blocks", "joint_blocks", SD3_JOINT),),
}
TOPS = {"flux": FLUX_TOP, "sd3": SD3_TOP}
TRANSFORMERS = {"FluxTransformer2DModel": "flux", "SD3Transformer2DModel": "sd3"}
FOLDED = ("final_layer.",)  # diffusers' kohya-FLUX reader ignores these modules' `.alpha` (takes scale 1)
ADAPTER_PARTS = re.compile(r"^(lora_|hada_|lokr_|oft_)")  # peft's own submodules inside an adapted layer


class FlowNameError(ValueError):
    """A module or key with no place in the original layout: refused, never dropped silently."""


@dataclass(frozen=True)
class Original:
    """One module of the original layout and the diffusers modules it holds, top to bottom."""

    name: str                # `double_blocks.0.img_attn.qkv`
    parts: tuple[str, ...]   # diffusers module paths, in row order
    rows: tuple[int, ...]    # output rows of each part
    swap: bool = False       # (shift, scale) here where diffusers has (scale, shift)

    @property
    def key(self) -> str:
        return PREFIX + self.name.replace(".", "_")

    @property
    def folded(self) -> bool:
        return len(self.parts) > 1 or self.name.startswith(FOLDED)


def flow_family(transformer: torch.nn.Module) -> str:
    """`flux` or `sd3` for a diffusers FluxTransformer2DModel / SD3Transformer2DModel."""
    family = TRANSFORMERS.get(type(transformer).__name__)
    if family is None:
        raise FlowNameError(f"no original layout known for {type(transformer).__name__}; expected one of "
                            f"{sorted(TRANSFORMERS)}")
    return family


def original_layout(transformer: torch.nn.Module) -> dict[str, Original]:
    """Every module of the original layout that holds adaptable (Linear / Conv2d) weights of `transformer`, by
    original name. Works on a model on the meta device and on one that already carries peft adapters."""
    family = flow_family(transformer)
    slots: dict[str, dict[int, tuple[str, int]]] = {}
    swapped: set[str] = set()
    for path, module in _weight_modules(transformer):
        name, slot = _original_name(family, path)
        if name is None:
            continue
        # the layer's declared width, not its weight's shape: an offloaded weight is an empty placeholder between
        # uses, and a 4-bit one is packed
        rows = module.out_features if isinstance(module, torch.nn.Linear) else module.out_channels
        slots.setdefault(name, {})[slot or 0] = (path, rows)
        parent = transformer.get_submodule(path.rpartition(".")[0]) if "." in path else None
        if type(parent).__name__ == "AdaLayerNormContinuous":  # its chunk(2) is (scale, shift)
            swapped.add(name)
    layout = {}
    for name, by_slot in slots.items():
        if sorted(by_slot) != list(range(len(by_slot))):
            raise FlowNameError(f"{name}: the model has only parts {sorted(by_slot)} of this fused module")
        parts, rows = zip(*(by_slot[slot] for slot in sorted(by_slot)), strict=True)
        layout[name] = Original(name, parts, rows, name in swapped)
    return layout


def unnamed_modules(transformer: torch.nn.Module) -> list[str]:
    """The adaptable modules of `transformer` that have no original-layout name (none in FLUX.1 or SD3 / SD3.5
    today: a later diffusers module would show up here, and export refuses it)."""
    family = flow_family(transformer)
    return [path for path, _ in _weight_modules(transformer) if _original_name(family, path)[0] is None]


def _weight_modules(model: torch.nn.Module):
    for path, module in model.named_modules():
        parts = path.split(".")
        if isinstance(module, torch.nn.Linear | torch.nn.Conv2d) and not any(ADAPTER_PARTS.match(p) for p in parts):
            yield path.removesuffix(".base_layer"), module


def _original_name(family: str, path: str) -> tuple[str | None, int | None]:
    if path in TOPS[family]:
        return TOPS[family][path], None
    for blocks, original_blocks, table in BLOCKS[family]:
        match = re.fullmatch(rf"{blocks}\.(\d+)\.(.+)", path)
        if match and match.group(2) in table:
            inner, slot = table[match.group(2)]
            return f"{original_blocks}.{match.group(1)}.{inner}", slot
    return None, None


def export_original(transformer: torch.nn.Module, adapters: Mapping[str, Adapter]) -> dict[str, torch.Tensor]:
    """{diffusers module path: (down, up, alpha)} -> the tensors of a kohya-style file in the original layout
    (`lora_unet_<original name>.lora_down.weight / .lora_up.weight / .alpha`), fp32 and contiguous.

    A module with no original-layout name is an error, not a dropped layer."""
    layout = original_layout(transformer)
    owner = {part: original for original in layout.values() for part in original.parts}
    unknown = sorted(set(adapters) - set(owner))
    if unknown:
        raise FlowNameError(f"{len(unknown)} trained modules have no name in the original "
                            f"{flow_family(transformer)} layout (e.g. {unknown[0]}); leave them out of the "
                            "LoRA targets")
    tensors: dict[str, torch.Tensor] = {}
    for original in layout.values():
        if not any(part in adapters for part in original.parts):
            continue
        down, up, alpha = _fused(original, adapters) if original.folded else _plain(original, adapters)
        if original.swap:
            up = swap_halves(up)
        tensors[f"{original.key}.lora_down.weight"] = down.contiguous()
        tensors[f"{original.key}.lora_up.weight"] = up.contiguous()
        tensors[f"{original.key}.alpha"] = torch.tensor(float(alpha))
    return tensors


def _plain(original: Original, adapters: Mapping[str, Adapter]) -> Adapter:
    down, up, alpha = adapters[original.parts[0]]
    _check_rows(original.parts[0], up, original.rows[0])
    return down.detach().float().cpu(), up.detach().float().cpu(), float(alpha)


def _fused(original: Original, adapters: Mapping[str, Adapter]) -> Adapter:
    """Downs stacked along the rank, ups block-diagonal with each part's alpha/rank folded in, alpha = rank."""
    present = [part for part in original.parts if part in adapters]
    rank = sum(adapters[part][0].shape[0] for part in present)
    first_up = adapters[present[0]][1]
    up = torch.zeros((sum(original.rows), rank, *first_up.shape[2:]), dtype=torch.float32)
    downs, row, column = [], 0, 0
    for part, rows in zip(original.parts, original.rows, strict=True):
        if part in adapters:
            down, part_up, alpha = adapters[part]
            _check_rows(part, part_up, rows)
            part_rank = down.shape[0]
            up[row:row + rows, column:column + part_rank] = part_up.detach().float().cpu() * (alpha / part_rank)
            downs.append(down.detach().float().cpu())
            column += part_rank
        row += rows
    return torch.cat(downs), up, float(rank)


def _check_rows(part: str, up: torch.Tensor, rows: int) -> None:
    if up.shape[0] != rows:
        raise FlowNameError(f"{part}: the LoRA's up has {up.shape[0]} rows, the model's module {rows}")


def swap_halves(tensor: torch.Tensor) -> torch.Tensor:
    """(shift, scale) <-> (scale, shift) along the rows (its own inverse)."""
    first, second = tensor.chunk(2, dim=0)
    return torch.cat([second, first])


def import_original(tensors: Mapping[str, torch.Tensor], transformer: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The inverse of `export_original`: {diffusers module path: dW, shaped as the module's weight} for every
    `lora_unet_` LoRA in `tensors` (other prefixes, e.g. text encoders, are the caller's). Scale alpha/rank when
    `.alpha` is present, else 1.0, as ComfyUI and Forge do. Every part of a fused module gets its rows (zero for
    a part that was not trained); a name with no module in this transformer is an error."""
    layout = {original.key: original for original in original_layout(transformer).values()}
    names = sorted({key.partition(".")[0] for key in tensors if key.startswith(PREFIX)})
    unknown = [name for name in names if name not in layout]
    if unknown:
        raise FlowNameError(f"{len(unknown)} LoRA layers name no module of this {flow_family(transformer)} "
                            f"transformer (e.g. {unknown[0]}); is the file for another model?")
    deltas = {}
    for name in names:
        original = layout[name]
        down, up = tensors[f"{name}.lora_down.weight"].float(), tensors[f"{name}.lora_up.weight"].float()
        scale = float(tensors[f"{name}.alpha"]) / down.shape[0] if f"{name}.alpha" in tensors else 1.0
        delta = (up.flatten(1) @ down.flatten(1)) * scale
        if original.swap:
            delta = swap_halves(delta)
        for part, piece in zip(original.parts, delta.split(list(original.rows)), strict=True):
            deltas[part] = piece.reshape(transformer.get_submodule(_weight_path(transformer, part)).weight.shape)
    return deltas


def _weight_path(transformer: torch.nn.Module, part: str) -> str:
    module = transformer.get_submodule(part)
    return f"{part}.base_layer" if hasattr(module, "base_layer") else part


def diffusers_layout(adapters: Mapping[str, Adapter]) -> dict[str, torch.Tensor]:
    """`transformer.<module>.lora_A.weight / .lora_B.weight` with alpha/rank folded into B and no `.alpha`:
    the layout diffusers' SD3 loader reads (it reads no kohya names) and ComfyUI reads at the same strength (it
    takes 1.0 without an alpha key, diffusers rank = alpha without one). Forge and sd-scripts do not read it."""
    tensors = {}
    for path, (down, up, alpha) in adapters.items():
        tensors[f"transformer.{path}.lora_A.weight"] = down.detach().float().cpu().contiguous()
        tensors[f"transformer.{path}.lora_B.weight"] = (up.detach().float().cpu() * (alpha / down.shape[0])
                                                        ).contiguous()
    return tensors


# sd-scripts (library/sai_model_spec.py, library/sd3_utils.py, flux_train_network.py at 48d368f): the
# architecture is "stable-diffusion-3-" + its model type ("medium", "5-medium", "5-large"), and that model type
# is also its ss_base_model_version for SD3; FLUX's version is "flux1" for dev and schnell alike.
VARIANTS = {
    "flux-dev": ("flux-1-dev/lora", "flux1", "https://github.com/black-forest-labs/flux"),
    "flux-schnell": ("flux-1-schnell/lora", "flux1", "https://github.com/black-forest-labs/flux"),
    # sd-scripts writes "diffusers" for an SD3 LoRA although its names are Stability's (its rule gives the
    # Stability URL to SDXL LoRAs only); kept as it writes it, so tools comparing headers see the same value
    "sd3-medium": ("stable-diffusion-3-medium/lora", "medium", "diffusers"),
    "sd35-medium": ("stable-diffusion-3-5-medium/lora", "5-medium", "diffusers"),
    "sd35-large": ("stable-diffusion-3-5-large/lora", "5-large", "diffusers"),
}


def flow_variant(transformer: torch.nn.Module) -> str:
    """The variant from the transformer's config, by sd-scripts' rules: FLUX with a guidance embedding is dev,
    without schnell; SD3 with q/k norms is 3.5 (Medium when it has dual-attention layers, else Large)."""
    config = transformer.config
    if flow_family(transformer) == "flux":
        return "flux-dev" if config.get("guidance_embeds") else "flux-schnell"
    if not config.get("qk_norm"):
        return "sd3-medium"
    return "sd35-medium" if config.get("dual_attention_layers") else "sd35-large"


def flow_metadata(variant: str) -> dict[str, str]:
    """The header rows that name the base model, as sd-scripts writes them for this variant."""
    if variant not in VARIANTS:
        raise FlowNameError(f"unknown flow-matching variant {variant!r}; one of {sorted(VARIANTS)}")
    architecture, version, implementation = VARIANTS[variant]
    return {"modelspec.architecture": architecture, "ss_base_model_version": version,
            "modelspec.implementation": implementation}
