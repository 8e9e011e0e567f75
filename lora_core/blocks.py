"""Block-wise learning rates and ranks for the UNet's LoRA, as sd-scripts' networks/lora.py defines them.

A module's block comes from its kohya name (`get_block_index`): SD 1.x/2.x (diffusers' names) have 25 blocks:
0 (unused), the down blocks' resnets/attentions/downsamplers 1-11 (3 i + j + 1), the mid block 12, the up blocks'
13-24 (13 + 3 i + j; an upsampler counts as j = 2); SDXL (the original layout's names) 23: 0 time/label
embedding, input_blocks_N 1 + N, middle_block_N 10 + N, output_blocks_N 13 + N, 22 out.

- `down_lr_weight`, `mid_lr_weight`, `up_lr_weight`: each block's learning rate is learning_rate times its
  weight (SD: 12 / 1 / 12 weights, SDXL: 9 / 3 / 9, whose embedding and out blocks keep 1). A list shorter than
  its part is filled with 1, and down/up also take sd-scripts' presets `cosine`, `sine`, `linear`,
  `reverse_linear`, `zeros`, each optionally `+<base>` added. A block whose weight is 0 (or below) gets no LoRA.
- `block_dims`, `block_alphas`: each block's rank and alpha (25 or 23 values) for the linear and 1x1 layers;
  `conv_block_dims`, `conv_block_alphas` the same for the 3x3 convolutions of `lora_target` locon, which
  otherwise keep lora_rank / lora_alpha (sd-scripts' conv_dim). A block of rank 0 (or of learning-rate weight 0)
  gets no LoRA. The file then has each module's own rank and `alpha`.
"""

from __future__ import annotations

import math
import re

from lora_core.errors import UserError

SD_PARTS, SDXL_PARTS = (12, 1, 12), (9, 3, 9)  # down, mid, up weights; SDXL adds its embedding and out blocks
SD_BLOCKS, SDXL_BLOCKS = 25, 23
UP_DOWN = re.compile(r"(up|down)_blocks_(\d+)_(resnets|upsamplers|downsamplers|attentions)_(\d+)_")
PRESETS = ("cosine", "sine", "linear", "reverse_linear", "zeros")
LR_FIELDS = ("down_lr_weight", "mid_lr_weight", "up_lr_weight")
DIM_FIELDS = ("block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas")
FIELDS = LR_FIELDS + DIM_FIELDS


def active(config) -> bool:
    return any(getattr(config, name, "") for name in FIELDS)


class BlockError(UserError):
    def __init__(self, field: str, message: str):
        super().__init__(f"{field} {message}", field=field)


def is_sdxl_name(kohya_name: str) -> bool:
    return any(part in kohya_name for part in ("input_blocks_", "middle_block_", "output_blocks_"))


def block_index(kohya_name: str) -> int:
    """sd-scripts' `get_block_index` of a `lora_unet_...` name; -1 outside every block."""
    name = kohya_name.removeprefix("lora_unet_")
    if is_sdxl_name(kohya_name) or name.startswith(("time_embed_", "label_emb_", "out_")):
        for prefix, first in (("input_blocks_", 1), ("middle_block_", 10), ("output_blocks_", 13)):
            if name.startswith(prefix):
                return first + int(name[len(prefix):].split("_")[0])
        return 0 if name.startswith(("time_embed_", "label_emb_")) else 22 if name.startswith("out_") else -1
    if match := UP_DOWN.search(name):
        side, i, kind, j = match.groups()
        index = 3 * int(i) + (2 if kind in ("upsamplers", "downsamplers") else int(j))
        return 1 + index if side == "down" else SD_PARTS[0] + 1 + index
    return SD_PARTS[0] if "mid_block_" in name else -1


def preset(name: str, length: int) -> list[float]:
    """sd-scripts' named weight curves over `length` blocks, `name` optionally `<curve>+<base>`."""
    curve, _, base = name.partition("+")
    offset = float(base) if base else 0.0
    steps = range(length)
    if curve == "cosine":
        return [math.sin(math.pi * (i / (length - 1)) / 2) + offset for i in reversed(steps)]
    if curve == "sine":
        return [math.sin(math.pi * (i / (length - 1)) / 2) + offset for i in steps]
    if curve == "linear":
        return [i / (length - 1) + offset for i in steps]
    if curve == "reverse_linear":
        return [i / (length - 1) + offset for i in reversed(steps)]
    return [offset] * length  # zeros


def numbers(field: str, text: str) -> list[float]:
    try:
        return [float(part) if part.strip() else 0.0 for part in text.split(",")]  # sd-scripts: empty is 0
    except ValueError:
        raise BlockError(field, f"{text!r} is not a comma-separated list of numbers (e.g. '1,1,0.5')") from None


def lr_weights(config, sdxl: bool) -> list[float] | None:
    """Each block's learning-rate weight (sd-scripts' `get_block_lr_weight`), None when none is given."""
    if not any(getattr(config, name) for name in LR_FIELDS):
        return None
    parts = []
    for name, length in zip(LR_FIELDS, SDXL_PARTS if sdxl else SD_PARTS, strict=True):
        text = getattr(config, name)
        curve = name != "mid_lr_weight" and text.partition("+")[0] in PRESETS
        if text and not curve and name != "mid_lr_weight" and "," not in text:  # sd-scripts reads it as a curve
            raise BlockError(name, f"{text!r} is one number: give a weight for each block, comma-separated (up to "
                                   f"{length}), or a curve ({', '.join(PRESETS)})")
        weights = preset(text, length) if curve else numbers(name, text) if text else [1.0] * length
        if len(weights) > length:
            raise BlockError(name, f"has {len(weights)} values; this model has {length} {name.split('_')[0]} "
                                   f"blocks")
        parts += [w if w > 0 else 0.0 for w in weights + [1.0] * (length - len(weights))]
    return [1.0, *parts, 1.0] if sdxl else parts


def dims_and_alphas(config, sdxl: bool, conv: bool = False) -> tuple[list[int], list[float]] | None:
    """Each block's rank and alpha (`conv`: the 3x3 convolutions', from conv_block_dims / conv_block_alphas),
    with the blocks of learning-rate weight 0 at rank 0; None when no block option is given (every module then
    has lora_rank and lora_alpha)."""
    weights = lr_weights(config, sdxl)
    dims_field, alphas_field = ("conv_block_dims", "conv_block_alphas") if conv else ("block_dims", "block_alphas")
    if not active(config):
        return None
    count = SDXL_BLOCKS if sdxl else SD_BLOCKS
    given_dims, given_alphas = getattr(config, dims_field), getattr(config, alphas_field)
    dims = numbers(dims_field, given_dims) if given_dims else [config.lora_rank] * count
    alphas = numbers(alphas_field, given_alphas) if given_alphas else [config.lora_alpha] * count
    for name, values in ((dims_field, dims), (alphas_field, alphas)):
        if len(values) != count:
            raise BlockError(name, f"has {len(values)} values; this model's UNet has {count} blocks "
                                   f"({'SDXL' if sdxl else 'SD 1.x/2.x'}), one value each")
    if any(d != int(d) or d < 0 for d in dims):
        raise BlockError(dims_field, "ranks are whole numbers, 0 or more")
    dims = [0 if weights is not None and weights[i] == 0 else int(d) for i, d in enumerate(dims)]
    return dims, alphas


def targeted(unet, targets: list[str]) -> list[tuple[str, object]]:
    """(path, module) of each module peft adapts for a list of suffixes (its rule: the name or a `.`-suffix)."""
    return [(name, module) for name, module in unet.named_modules()
            if any(name == target or name.endswith("." + target) for target in targets)]


def with_block_ranks(adapter, unet, targets: list[str], namer, config):
    """`adapter` (a peft LoraConfig) with each block's rank and alpha: the modules of rank-0 blocks left out,
    the others' ranks and alphas as peft's rank_pattern / alpha_pattern (one exact-path pattern per value)."""
    modules = targeted(unet, targets)
    sdxl = any(is_sdxl_name(namer(path)) for path, _ in modules)
    chosen, conv_chosen = dims_and_alphas(config, sdxl), dims_and_alphas(config, sdxl, conv=True)
    if chosen is None or conv_chosen is None:
        return adapter
    kept, ranks, alpha_of = [], {}, {}
    for path, module in modules:
        index = block_index(namer(path))
        is_conv = getattr(module, "kernel_size", (1, 1)) not in ((1, 1), 1)  # 3x3: sd-scripts' conv_block_dims
        dims, alphas = conv_chosen if is_conv else chosen
        rank, alpha = (dims[index], alphas[index]) if index >= 0 else (config.lora_rank, config.lora_alpha)
        if rank:
            kept.append(path)
            ranks.setdefault(rank, []).append(path)
            alpha_of.setdefault(alpha, []).append(path)
    if not kept:
        raise BlockError("block_dims", "leaves no block with a LoRA (every rank or learning-rate weight is 0)")
    adapter.target_modules = set(kept)
    adapter.rank_pattern = {_exactly(paths): rank for rank, paths in ranks.items()}
    adapter.alpha_pattern = {_exactly(paths): alpha for alpha, paths in alpha_of.items()}
    return adapter


def _exactly(paths: list[str]) -> str:
    return "(?:" + "|".join(re.escape(path) for path in paths) + ")"


ADAPTER_PARTS = ("lora_", "lokr_", "hada_")  # peft's LoRA / DoRA, LoKr and LoHa parameters' first own part


def adapted_module(parameter: str) -> str:
    """The adapted module's path of an adapter parameter's name (`a.b.lora_A.default.weight` -> `a.b`)."""
    parts = parameter.split(".")
    own = next((i for i, part in enumerate(parts) if part.startswith(ADAPTER_PARTS)), len(parts))
    return ".".join(parts[:own])


def param_block_weights(named_params: list[tuple[str, object]], namer, config) -> dict[int, float]:
    """{id(param): its block's learning-rate weight} for a UNet's LoRA parameters (1 outside every block)."""
    paths = {name: adapted_module(name) for name, _ in named_params}
    sdxl = any(is_sdxl_name(namer(path)) for path in paths.values())
    weights = lr_weights(config, sdxl)
    if weights is None:
        return {}
    result = {}
    for name, param in named_params:
        index = block_index(namer(paths[name]))
        result[id(param)] = weights[index] if index >= 0 else 1.0
    return result
