"""The LoRA tools: `python -m lora_core inspect | resize | merge | bake`.

    inspect FILE [--json]                          type, ranks, alphas, targets, base model, training settings
    resize FILE (--rank R | --energy 0.95) -o OUT  lower the rank by SVD of each layer's weight change
    merge A B [...] --weights wA wB [...] -o OUT   one LoRA whose effect is the weighted sum (ranks concatenated)
    bake FILE --base MODEL -o OUT [--scale S]      fuse into the base model, written as a diffusers folder

Every file is written atomically (a temporary name, then renamed) and only .safetensors files are read.
Resize and merge write plain LoRA (`lora_down` / `lora_up` / `alpha`); a LoHa / LoKr layer becomes a LoRA by SVD
of its weight change (merge then needs --rank; both need --base, since such a file does not record the kernels'
shapes). A DoRA's change depends on the base weights: bake it instead.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from lora_core.errors import UserError
from lora_core.files import normal_mode
from lora_core.lora import save_lora
from lora_core.lorafile import Layer, LoraFile, LoraFileError, apply_lora, layer_delta, read

SETTINGS = ("ss_network_module", "ss_network_args", "ss_learning_rate", "ss_text_encoder_lr", "ss_steps",
            "ss_num_epochs", "ss_batch_size_per_device", "ss_resolution", "ss_optimizer", "ss_lr_scheduler",
            "ss_mixed_precision", "ss_seed", "ss_min_snr_gamma", "ss_noise_offset")


# ----------------------------------------------------------------------------------------------------
# inspect


def summary(lora: LoraFile) -> dict:
    meta = lora.metadata
    ranks = sorted({layer.rank for layer in lora.layers.values() if layer.rank})
    whole = sum(1 for layer in lora.layers.values() if not layer.rank)  # LoKr layers with two whole factors
    alphas = sorted({layer.alpha for layer in lora.layers.values()})
    parts = sorted({name.split("_")[1] for name in lora.layers})  # unet, te, te1, te2
    targets = sorted({_target_of(name) for name in lora.layers})
    return {
        "file": str(lora.path), "type": "+".join(sorted(lora.kinds)), "layers": len(lora.layers),
        "ranks": ranks, "whole_factor_layers": whole, "alphas": alphas, "parts": parts, "targets": targets,
        "base_model": meta.get("ss_sd_model_name"), "architecture": meta.get("modelspec.architecture"),
        "trigger_words": meta.get("modelspec.trigger_phrase"),
        "settings": {key.removeprefix("ss_"): meta[key] for key in SETTINGS if key in meta},
    }


def _target_of(name: str) -> str:
    for suffix in ("to_q", "to_k", "to_v", "to_out_0", "q_proj", "k_proj", "v_proj", "out_proj", "proj_in",
                   "proj_out", "ff_net_0_proj", "ff_net_2", "in_layers_2", "out_layers_3", "skip_connection",
                   "conv1", "conv2", "conv_shortcut", "op", "conv"):
        if name.endswith("_" + suffix):
            return suffix
    return name.rsplit("_", 1)[-1]


def inspect_text(info: dict) -> str:
    ranks = ", ".join(map(str, info["ranks"]))
    if info["whole_factor_layers"]:
        ranks += f" ({info['whole_factor_layers']} LoKr layers with whole factors)"
    rows = [("file", info["file"]), ("type", info["type"]), ("layers", str(info["layers"])), ("rank(s)", ranks),
            ("alpha(s)", ", ".join(f"{a:g}" for a in info["alphas"])),
            ("parts", ", ".join(info["parts"])), ("targets", ", ".join(info["targets"])),
            ("base model", info["base_model"] or "-"), ("architecture", info["architecture"] or "-"),
            ("trigger words", info["trigger_words"] or "-")]
    rows += [(key, value) for key, value in info["settings"].items()]
    width = max(len(key) for key, _ in rows)
    return "\n".join(f"{key.ljust(width)}  {value}" for key, value in rows)


# ----------------------------------------------------------------------------------------------------
# resize and merge


def lora_layer(delta: torch.Tensor, down_shape: tuple[int, ...] | None, rank: int | None = None,
               energy: float | None = None) -> tuple[Layer, float]:
    """A LoRA layer for `delta` (out, in x kernel) by SVD at `rank` (or the smallest rank that keeps `energy`
    of its squared Frobenius norm); `down_shape`: (in, kh, kw) for a convolution. Returns it and the share kept."""
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    total = float((s ** 2).sum())
    if energy is not None:
        kept = torch.cumsum(s ** 2, 0) / max(total, 1e-30)
        rank = int(torch.searchsorted(kept, torch.tensor(energy * (1 - 1e-12), dtype=kept.dtype)).item()) + 1
    rank = max(1, min(rank or len(s), len(s)))
    up, down = (u[:, :rank] * s[:rank]).float(), vh[:rank].float()
    if down_shape is not None:  # a convolution: the kernel on the down weight, 1x1 on the up weight
        down, up = down.reshape(rank, *down_shape), up[:, :, None, None]
    share = float((s[:rank] ** 2).sum()) / total if total > 0 else 1.0
    return Layer("lora", {"lora_down.weight": down.contiguous(), "lora_up.weight": up.contiguous(),
                          "alpha": torch.tensor(float(rank))}), share


def layer_shapes(lora: LoraFile, base_model: str | None) -> dict[str, torch.Size]:
    """Each layer's weight shape: a LoRA's tensors say it; a LoHa / LoKr file does not record convolutions'
    kernels, so those need the base model."""
    if all(layer.kind == "lora" for layer in lora.layers.values()):
        return {name: _lora_shape(layer) for name, layer in lora.layers.items()}
    if base_model is None:
        raise UserError(f"{lora.path} is {'+'.join(sorted(lora.kinds))}: its file does not record each layer's "
                        "kernel shape; give --base MODEL (the model it was trained on)", field="base")
    from lora_core import models
    from lora_core.lorafile import module_table

    source = models.resolve(base_model)
    table = module_table(models.load_pipeline(source, models.inspect(source)))
    missing = [name for name in lora.layers if name not in table]
    if missing:
        raise LoraFileError(f"{lora.path}: layer {missing[0]} is not in {base_model}; is it another base model?")
    return {name: table[name].weight.shape for name in lora.layers}


def _lora_shape(layer: Layer) -> torch.Size:
    down, up = layer.tensors["lora_down.weight"], layer.tensors["lora_up.weight"]
    return torch.Size([up.shape[0], *down.shape[1:]])


def _down_shape(shape: torch.Size) -> tuple[int, ...] | None:
    return tuple(shape[1:]) if len(shape) == 4 else None


def _no_dora(lora: LoraFile) -> None:
    if "dora" in lora.kinds:
        raise LoraFileError(f"{lora.path}: a DoRA's weight change depends on the base weights; bake it instead")


def resize(lora: LoraFile, rank: int | None, energy: float | None,
           base_model: str | None = None) -> tuple[dict[str, Layer], dict[str, float]]:
    _no_dora(lora)
    shapes = layer_shapes(lora, base_model)
    layers, kept = {}, {}
    for name, layer in lora.layers.items():
        delta = layer_delta(layer, shapes[name]).flatten(1)
        layers[name], kept[name] = lora_layer(delta, _down_shape(shapes[name]), rank, energy)
    return layers, kept


def merge(loras: list[LoraFile], weights: list[float], rank: int | None,
          base_model: str | None = None) -> dict[str, Layer]:
    """LoRA layers are stacked (exact: rank rA + rB); a LoHa / LoKr layer joins as a LoRA of `rank` by SVD."""
    merged: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for lora, weight in zip(loras, weights, strict=True):
        _no_dora(lora)
        shapes = layer_shapes(lora, base_model)
        for name, layer in lora.layers.items():
            if layer.kind != "lora":
                if rank is None:
                    raise UserError(f"{lora.path} is {layer.kind}: give --rank for the LoRA it is turned into",
                                    field="rank")
                layer = lora_layer(layer_delta(layer, shapes[name]).flatten(1), _down_shape(shapes[name]), rank)[0]
            down, up = layer.tensors["lora_down.weight"], layer.tensors["lora_up.weight"]
            merged.setdefault(name, []).append((down, up * (weight * layer.alpha / down.shape[0])))
    out = {}
    for name, parts in merged.items():
        down = torch.cat([d for d, _ in parts], 0)
        up = torch.cat([u for _, u in parts], 1)
        out[name] = Layer("lora", {"lora_down.weight": down.contiguous(), "lora_up.weight": up.contiguous(),
                                   "alpha": torch.tensor(float(down.shape[0]))})
    return out


def write_layers(path: Path, layers: dict[str, Layer], source: dict[str, str], **extra: str) -> Path:
    """Write LoRA layers with one alpha for all (the largest rank), each up weight rescaled to keep its strength:
    diffusers' loader applies a file's most common alpha to every layer whose own it cannot match, which would
    change the strength of the layers whose rank differs (after --energy, or a merge)."""
    alpha = float(max(layer.rank for layer in layers.values()))
    state = {}
    for name, layer in layers.items():
        down, up = layer.tensors["lora_down.weight"], layer.tensors["lora_up.weight"]
        state[f"{name}.lora_down.weight"] = down
        state[f"{name}.lora_up.weight"] = (up * (layer.alpha / alpha)).contiguous()
        state[f"{name}.alpha"] = torch.tensor(alpha)
    ranks = sorted({layer.rank for layer in layers.values()})
    meta = {key: value for key, value in source.items()
            if key not in ("ss_network_args", "lora_adapter_metadata") and not key.startswith("sshs_")}
    meta.update(ss_network_module="networks.lora", ss_network_dim=str(ranks[0]) if len(ranks) == 1 else "Dynamic",
                ss_network_alpha=str(alpha), **extra)
    return save_lora(path, state, meta)


def own_name(output: Path) -> dict[str, str]:
    """A written file's own alias: A1111 calls a LoRA by `ss_output_name`, and two files sharing one (a merge or
    resize that kept its input's) make `<lora:name:1>` ambiguous for both. As sd-scripts' merge scripts do, the
    title is the output file's name."""
    return {"ss_output_name": output.stem, "modelspec.title": output.stem}


def merged_from(loras: list[LoraFile], weights: list[float]) -> str:
    """sd-scripts' `modelspec.merged_from` lists the inputs' titles; titles repeat (every run of a config has
    the same one), so each input is named by title, file and SHA-256 too, with its weight."""
    parts = []
    for lora, weight in zip(loras, weights, strict=True):
        title = lora.metadata.get("modelspec.title") or lora.path.stem
        digest = hashlib.sha256(lora.path.read_bytes()).hexdigest()
        parts.append(f"{title} ({lora.path.name}, sha256 {digest}) x {weight:g}")
    return ", ".join(parts)


# ----------------------------------------------------------------------------------------------------
# bake


def bake(path: Path, base_model: str, out: Path, scale: float) -> Path:
    """Fuse the file into the base model and write a diffusers folder at `out` (atomically: a staging folder
    beside it, renamed into place)."""
    from lora_core import models

    if out.exists():
        raise UserError(f"{out} already exists; choose a new output folder", field="output")
    if out.suffix.lower() in (".safetensors", ".ckpt"):
        raise UserError(f"{out}: bake writes a diffusers folder (load it with from_pretrained, or convert it with "
                        "diffusers' scripts for A1111); give a folder name", field="output")
    source = models.resolve(base_model)
    pipeline = models.load_pipeline(source, models.inspect(source))
    apply_lora(pipeline, path, scale)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        pipeline.save_pretrained(staging / "model", safe_serialization=True)
        for written in (staging / "model").rglob("*"):
            if written.is_file():
                normal_mode(written)  # safetensors writes 0600: other programs and users load this folder
        os.replace(staging / "model", out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


# ----------------------------------------------------------------------------------------------------
# command line


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="python -m lora_core", description=__doc__.split("\n\n")[0])
    sub = root.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="what a LoRA file holds")
    p.add_argument("file", type=Path)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p = sub.add_parser("resize", help="lower a LoRA's rank by SVD")
    p.add_argument("file", type=Path)
    size = p.add_mutually_exclusive_group(required=True)
    size.add_argument("--rank", type=int, help="the new rank of every layer")
    size.add_argument("--energy", type=float, help="per layer, the smallest rank keeping this share (0-1] of its "
                      "weight change's squared Frobenius norm")
    p.add_argument("--base", help="the base model (needed for a LoHa / LoKr file)")
    p.add_argument("-o", "--output", type=Path, required=True)
    p = sub.add_parser("merge", help="one LoRA whose effect is the weighted sum of several")
    p.add_argument("files", type=Path, nargs="+")
    p.add_argument("--weights", type=float, nargs="+", required=True)
    p.add_argument("--rank", type=int, help="rank for LoHa / LoKr layers, turned into LoRA by SVD")
    p.add_argument("--base", help="the base model (needed for a LoHa / LoKr file)")
    p.add_argument("-o", "--output", type=Path, required=True)
    p = sub.add_parser("bake", help="fuse a LoRA into its base model (a diffusers folder)")
    p.add_argument("file", type=Path)
    p.add_argument("--base", required=True, help="the base model, as base_model in a config")
    p.add_argument("--scale", type=float, default=1.0, help="strength (default 1)")
    p.add_argument("-o", "--output", type=Path, required=True)
    return root


def run(args: argparse.Namespace) -> str:
    if args.command == "inspect":
        info = summary(read(args.file))
        return json.dumps(info, indent=2) if args.json else inspect_text(info)
    if args.command == "resize":
        if args.rank is not None and args.rank < 1:
            raise UserError("--rank must be at least 1", field="rank")
        if args.energy is not None and not 0 < args.energy <= 1:
            raise UserError("--energy must lie in (0, 1]", field="energy")
        lora = read(args.file)
        layers, kept = resize(lora, args.rank, args.energy, args.base)
        write_layers(args.output, layers, lora.metadata, **own_name(args.output))
        lines = [f"{name}  rank {layers[name].rank}  kept {100 * share:.2f} %" for name, share in kept.items()]
        return "\n".join([*lines, f"wrote {args.output}"])
    if args.command == "merge":
        if len(args.weights) != len(args.files):
            raise UserError(f"--weights gives {len(args.weights)} numbers for {len(args.files)} files; give one "
                            "per file", field="weights")
        loras = [read(path) for path in args.files]
        layers = merge(loras, args.weights, args.rank, args.base)
        write_layers(args.output, layers, loras[0].metadata, **own_name(args.output),
                     **{"modelspec.merged_from": merged_from(loras, args.weights)})
        return f"wrote {args.output} ({len(layers)} layers)"
    return f"wrote {bake(args.file, args.base, args.output, args.scale)}"


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        print(run(args))
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0
