"""LyCORIS networks: LoHa and LoKr, trained with peft's implementation, written in LyCORIS's key layout.

Per adapted module the file holds (names as for LoRA, e.g. `lora_unet_..._to_q`):
- LoHa: `hada_w1_a`, `hada_w1_b`, `hada_w2_a`, `hada_w2_b`, `alpha`;
  dW = (w1_a @ w1_b) * (w2_a @ w2_b) * alpha / rank, reshaped to the weight's shape.
- LoKr: `lokr_w1` (peft never splits the small factor unless asked), `lokr_w2` or its halves `lokr_w2_a` /
  `lokr_w2_b`, `alpha`; dW = kron(w1, w2) * scale, reshaped to the weight's shape.

LoKr's scale is where the loaders and peft part ways: peft scales by alpha / rank always, while LyCORIS,
ComfyUI and A1111 apply alpha / rank only when a factor is low-rank (the rank read from that factor's shape) and
1 when both factors are whole matrices. A layer whose factors are both whole is therefore written with the scale
multiplied into `lokr_w2` (and alpha = rank), so that the file means in every loader what it meant in training.
"""

from __future__ import annotations

import torch
from peft import LoHaConfig, LoKrConfig

from lora_core.config import TrainConfig

LOHA_KEYS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
LOKR_KEYS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")


def adapter_config(config: TrainConfig, target_modules: list[str]) -> LoHaConfig | LoKrConfig:
    """peft's config for `config.network_type` ('loha' or 'lokr'); lora_dropout is LyCORIS's rank dropout."""
    common = dict(r=config.lora_rank, alpha=config.lora_alpha, rank_dropout=config.lora_dropout,
                  target_modules=target_modules)
    if config.network_type == "loha":
        return LoHaConfig(**common)
    if config.network_type == "lokr":
        return LoKrConfig(**common, decompose_factor=config.lokr_factor)
    raise ValueError(f"not a LyCORIS network type: {config.network_type}")


def lycoris_tensors(params: dict[str, torch.Tensor], config: TrainConfig) -> dict[str, torch.Tensor]:
    """One module's peft parameters (`hada_w1_a`, ... or `lokr_w1`, ...) as the file's tensors and `alpha`."""
    out = {name: tensor.detach().float().cpu().contiguous() for name, tensor in params.items()}
    alpha, rank = float(config.lora_alpha), config.lora_rank
    if config.network_type == "lokr" and "lokr_w1" in out and "lokr_w2" in out:
        out["lokr_w2"] = (out["lokr_w2"] * (alpha / rank)).contiguous()
        alpha = float(rank)
    out["alpha"] = torch.tensor(alpha)
    return out


def loha_delta(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """LyCORIS's LoHa weight change, flattened to (out, in x kernel): (w1a w1b) * (w2a w2b) * alpha / rank."""
    w1 = tensors["hada_w1_a"] @ tensors["hada_w1_b"]
    w2 = tensors["hada_w2_a"] @ tensors["hada_w2_b"]
    rank = tensors["hada_w1_b"].shape[0]
    alpha = float(tensors["alpha"]) if "alpha" in tensors else rank
    return w1 * w2 * (alpha / rank)


def lokr_delta(tensors: dict[str, torch.Tensor], shape: torch.Size | None = None) -> torch.Tensor:
    """LyCORIS's LoKr weight change (in the weight's `shape` if given; the product's first axis is always the
    output channels): kron(w1, w2), times alpha / rank where a factor is
    low-rank (its rank from the factor's shape, as LyCORIS, ComfyUI and A1111 read it), else times 1."""
    rank = None
    if "lokr_w1" in tensors:
        w1 = tensors["lokr_w1"]
    else:
        w1, rank = tensors["lokr_w1_a"] @ tensors["lokr_w1_b"], tensors["lokr_w1_b"].shape[0]
    if "lokr_w2" in tensors:
        w2 = tensors["lokr_w2"]
    else:
        w2, rank = tensors["lokr_w2_a"] @ tensors["lokr_w2_b"], tensors["lokr_w2_b"].shape[0]
    if w2.dim() == 4:
        w1 = w1[:, :, None, None]
    scale = float(tensors["alpha"]) / rank if rank is not None and "alpha" in tensors else 1.0
    delta = torch.kron(w1, w2) * scale
    return delta.reshape(shape) if shape is not None else delta
