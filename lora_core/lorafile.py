"""Reading the files this trainer writes (LoRA, LoHa, LoKr, DoRA in the kohya layout or, from before it,
diffusers' PEFT format; SDXL keys in the original layout's names or, from before that, in diffusers' names): each
layer's weight change, and applying it to a diffusers pipeline.

diffusers' `load_lora_weights` reads LoRA files, not LoHa / LoKr, and drops a kohya DoRA's `dora_scale`
(`diffusers_state_dict` converts a DoRA file for it); `apply_lora` reads them all, by adding each layer's weight
change (times a strength) to the base weight, as ComfyUI and A1111 do.

    apply_lora(pipeline, "lora.safetensors", scale=0.8)   # in place; apply_lora(..., -0.8) takes it off again
    weight_deltas("lora.safetensors")                     # {layer name: dW as (out, in x kernel)}
    pipeline.load_lora_weights(diffusers_state_dict("dora.safetensors", pipeline))
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lora_core import dora, lycoris
from lora_core.errors import UserError
from lora_core.families.base import TEXT_ENCODER_ATTRIBUTES
from lora_core.ldm_names import ldm_module_names
from lora_core.lora import text_encoder_namer, text_encoder_prefixes

PEFT_PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te_", "text_encoder_2": "lora_te2_"}


class LoraFileError(UserError):
    field = "file"


@dataclass
class Layer:
    kind: str  # lora | loha | lokr | dora
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # as in the file, `alpha` included

    @property
    def rank(self) -> int:
        if self.kind in ("lora", "dora"):
            return self.tensors["lora_down.weight"].shape[0]
        if self.kind == "loha":
            return self.tensors["hada_w1_b"].shape[0]
        low = [t for name, t in self.tensors.items() if name in ("lokr_w1_b", "lokr_w2_b")]
        return low[0].shape[0] if low else 0  # 0: both factors are whole matrices

    @property
    def alpha(self) -> float:
        return float(self.tensors["alpha"]) if "alpha" in self.tensors else float(self.rank)


@dataclass
class LoraFile:
    path: Path
    layers: dict[str, Layer]  # by kohya name (`lora_unet_...`, `lora_te1_...`)
    metadata: dict[str, str]

    @property
    def kinds(self) -> set[str]:
        return {layer.kind for layer in self.layers.values()}


def read(path: str | Path) -> LoraFile:
    """Read a LoRA / LyCORIS file; anything but a readable .safetensors (a pickle can run code) is refused."""
    from safetensors import safe_open

    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise LoraFileError(f"{path}: only .safetensors LoRA files are read (a pickle such as .pt or .ckpt can run "
                            "code when opened); convert it first")
    try:
        with safe_open(str(path), "pt") as handle:
            metadata = handle.metadata() or {}
            keys = list(handle.keys())
            tensors = {key: handle.get_tensor(key).float() for key in keys}
    except Exception as error:  # safetensors raises its own error type for a damaged header
        raise LoraFileError(f"{path}: not a readable .safetensors file ({error})") from None
    if "lora_adapter_metadata" in metadata:
        layers = _peft_layers(tensors, json.loads(metadata["lora_adapter_metadata"]))
    else:
        layers = _kohya_layers(tensors, path)
    if not layers:
        raise LoraFileError(f"{path}: holds no LoRA, LoHa or LoKr layers")
    return LoraFile(path, layers, metadata)


def _kohya_layers(tensors: dict[str, torch.Tensor], path: Path) -> dict[str, Layer]:
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        name, _, param = key.partition(".")
        grouped.setdefault(name, {})[param] = tensor
    layers = {}
    for name, params in grouped.items():
        if "lora_down.weight" in params and "lora_up.weight" in params:
            kind = "dora" if "dora_scale" in params else "lora"
        elif all(key in params for key in lycoris.LOHA_KEYS):
            kind = "loha"
        elif any(key.startswith("lokr_w1") for key in params) and any(key.startswith("lokr_w2") for key in params):
            kind = "lokr"
        else:
            raise LoraFileError(f"{path}: layer {name} has tensors {sorted(params)}, which are neither LoRA, LoHa nor "
                                "LoKr (Tucker variants are not read)")
        layers[name] = Layer(kind, params)
    return layers


def _peft_layers(tensors: dict[str, torch.Tensor], adapter: dict) -> dict[str, Layer]:
    """diffusers' PEFT format (this trainer's DoRA files before they were written in the kohya layout), under
    the kohya names of the same modules, the magnitude as a kohya `dora_scale`."""
    sdxl = any(key.startswith("text_encoder_2.") for key in tensors)
    layers: dict[str, Layer] = {}
    for key, tensor in tensors.items():
        component, _, rest = key.partition(".")
        module, _, kind = rest.partition(".lora_")
        if component == "unet":
            name = "lora_unet_" + module.replace(".", "_")
        else:
            prefix = "lora_te1_" if component == "text_encoder" and sdxl else PEFT_PREFIXES[component]
            name = text_encoder_namer(prefix)(module)
        layer = layers.setdefault(name, Layer("lora"))
        param = {"A.weight": "lora_down.weight", "B.weight": "lora_up.weight"}.get(kind, "dora_scale")
        layer.tensors[param] = tensor
        if param == "dora_scale":
            layer.kind = "dora"
        layer.tensors["alpha"] = torch.tensor(float(adapter[f"{component}.lora_alpha"]))
    for layer in layers.values():
        if layer.kind == "dora":
            layer.tensors["dora_scale"] = dora.output_axis(layer.tensors["dora_scale"],
                                                           layer.tensors["lora_down.weight"].dim())
    return layers


def layer_delta(layer: Layer, shape: torch.Size | None = None, base: torch.Tensor | None = None) -> torch.Tensor:
    """One layer's weight change by the published formulas, in `shape` (else as (out, in x kernel)). A DoRA's
    depends on the base weight (`base`)."""
    t = layer.tensors
    if layer.kind in ("lora", "dora"):
        down, up = t["lora_down.weight"], t["lora_up.weight"]
        delta = (up.flatten(1) @ down.flatten(1)) * (layer.alpha / down.shape[0])
    elif layer.kind == "loha":
        delta = lycoris.loha_delta(t)
    else:
        delta = lycoris.lokr_delta(t)
    if layer.kind == "dora":
        if base is None:
            raise LoraFileError("a DoRA layer's weight change depends on the base weight: give the base model")
        delta = dora.dora_weight(base, delta, t["dora_scale"]) - base.flatten(1).float()
    return delta.reshape(shape) if shape is not None else delta.reshape(delta.shape[0], -1)


def weight_deltas(path: str | Path) -> dict[str, torch.Tensor]:
    """{layer name: dW as an (out, in x kernel) matrix} for every layer of a LoRA / LoHa / LoKr file."""
    lora = read(path)
    return {name: layer_delta(layer) for name, layer in lora.layers.items()}


def module_paths(pipeline) -> dict[str, tuple[str, str]]:
    """Every name a file may give each adaptable layer of `pipeline` -> (pipeline component, module path): a
    UNet's in diffusers' and in the original layout's names (older SDXL files used the first), the text
    encoders' under `lora_te*_`. (A transformer's names are the original layout's, fused: `weight_changes` reads
    those through flow_names.)"""
    paths: dict[str, tuple[str, str]] = {}
    unet = getattr(pipeline, "unet", None)
    try:
        original = ldm_module_names(unet.config) if unet is not None else {}
    except ValueError:
        original = {}
    for name, module in unet.named_modules() if unet is not None else ():
        if isinstance(module, torch.nn.Linear | torch.nn.Conv2d):
            paths["lora_unet_" + name.replace(".", "_")] = ("unet", name)
            if name in original:
                paths["lora_unet_" + original[name].replace(".", "_")] = ("unet", name)
    components = [c for c in TEXT_ENCODER_ATTRIBUTES if getattr(pipeline, c, None) is not None]
    for component, prefix in zip(components, text_encoder_prefixes(len(components)), strict=True):
        name_of = text_encoder_namer(prefix)
        for name, module in getattr(pipeline, component).named_modules():
            if isinstance(module, torch.nn.Linear):
                paths[name_of(name)] = (component, name)
    return paths


def module_table(pipeline) -> dict[str, torch.nn.Module]:
    """module_paths' names -> the modules themselves."""
    return {name: getattr(pipeline, component).get_submodule(path)
            for name, (component, path) in module_paths(pipeline).items()}


def diffusers_state_dict(path: str | Path, pipeline) -> dict[str, torch.Tensor]:
    """A DoRA file as a state dict that `pipeline.load_lora_weights(...)` loads exactly (diffusers' SD and SDXL
    loaders drop a kohya file's `dora_scale`): `pipeline.load_lora_weights(diffusers_state_dict(path, pipeline))`.
    """
    from safetensors.torch import load_file

    lora = read(path)  # refuses what is not a readable .safetensors
    if "lora_adapter_metadata" in lora.metadata:
        raise LoraFileError(f"{lora.path} is already in diffusers' format: give it to load_lora_weights itself")
    paths = module_paths(pipeline)
    missing = [name for name in lora.layers if name not in paths]
    if missing:
        raise LoraFileError(f"{lora.path}: layer {missing[0]} names no layer of this model")
    return dora.to_diffusers(load_file(str(lora.path)), paths)


def weight_changes(pipeline, lora: LoraFile) -> list[tuple[torch.nn.Parameter, torch.Tensor]]:
    """(weight, its change at strength 1) for every layer of `lora` in `pipeline`. A layer that names no module of
    this pipeline is an error (a file for another base model), never silently dropped."""
    layers = dict(lora.layers)
    changes = []
    transformer = getattr(pipeline, "transformer", None)
    if transformer is not None:  # a flow-matching transformer: the original layout's fused names
        from lora_core.families import flow_names

        tensors = {f"{name}.{param}": tensor for name, layer in layers.items() if name.startswith("lora_unet_")
                   for param, tensor in layer.tensors.items()}
        try:
            deltas = flow_names.import_original(tensors, transformer)
        except flow_names.FlowNameError as error:
            raise LoraFileError(f"{lora.path}: {error}") from None
        changes += [(transformer.get_submodule(flow_names._weight_path(transformer, part)).weight, delta)
                    for part, delta in deltas.items()]
        layers = {name: layer for name, layer in layers.items() if not name.startswith("lora_unet_")}
    table = module_table(pipeline)
    missing = [name for name in layers if name not in table]
    if missing:
        raise LoraFileError(f"{lora.path}: {len(missing)} of its {len(lora.layers)} layers name no layer of this "
                            f"model (e.g. {missing[0]}); is it for another base model?")
    for name, layer in layers.items():
        weight = table[name].weight
        changes.append((weight, layer_delta(layer, weight.shape, weight.detach() if layer.kind == "dora" else None)))
    return changes


@torch.no_grad()
def apply_lora(pipeline, path: str | Path, scale: float = 1.0) -> int:
    """Add each layer's weight change, times `scale`, to `pipeline`'s weights in place; return the layer count.

    Any file this trainer writes: LoRA, LoHa, LoKr or DoRA, SDXL keys in either naming, FLUX / SD 3 in the
    original layout's fused names. A layer that names no module of this pipeline is an error (a file for another
    base model), never silently dropped. Applying the same file at -scale takes it off again (within float
    rounding)."""
    lora = read(path)
    for weight, delta in weight_changes(pipeline, lora):
        weight.add_(delta.to(weight.dtype), alpha=scale)
    return len(lora.layers)
