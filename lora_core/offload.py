"""Block offloading (`offload_blocks`): the frozen weights of a transformer's first N blocks stay in (pinned) CPU
memory and are copied to the device for each use, one block ahead on a side CUDA stream, as kohya's block
swapping does; the LoRA weights inside those blocks never move.

Why not diffusers' group offloading (`apply_group_offloading`, block_level)? It is built for inference: it moves
every parameter of a group, the adapter's included (the optimizer would then find a LoRA weight on the CPU and
its gradient on the GPU), it offloads every block of every ModuleList and the model's own top-level layers (no
"N blocks"), and its hooks are forward-only, so the backward pass would find the weights gone.

How the weights follow the step, with gradient checkpointing (required: see `BlockOffloader`):
- forward: before block k its weights are made ready (waiting for the copy stream) and block k+1's copy starts;
  after it, block k's weights are dropped. Checkpointing saved nothing inside the block, so the device memory is
  free again. In a forward that will be back-propagated, the last offloaded block stays: the backward needs it
  first.
- backward: when the gradient of block k's output is ready (a tensor hook: the block's backward is next), its
  weights are made ready for the recomputation and block k-1's copy starts; block k+1, whose backward is done, is
  dropped. Block 0 stays loaded after the backward: the next forward starts with it.
So at most two offloaded blocks are on the device at once. An offloaded weight that is not loaded is an empty
placeholder, so a use at the wrong moment fails loudly instead of computing with stale data.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch

IN_FLIGHT = 2  # offloaded blocks on the device at once (the one computing and the next one being copied)


@dataclass
class _Copy:
    tensors: list[torch.Tensor]
    event: Any = None  # torch.cuda.Event on the copy stream (None on the CPU)
    waited: bool = False


@dataclass
class BlockOffloader:
    """Hooks that keep `blocks` (the denoiser's first N, in execution order) off `device` between uses.
    Install it while the model is still on the CPU, after its adapter and any quantisation, and before the move
    to the device: the frozen weights then never reach the device whole."""

    denoiser: torch.nn.Module = field(repr=False)
    blocks: list[torch.nn.Module] = field(repr=False)
    device: torch.device
    stored: list[list[tuple[torch.nn.Module, str, torch.Tensor]]] = field(default_factory=list, repr=False)
    loaded: dict[int, _Copy] = field(default_factory=dict)
    backward: bool = False  # the step's phase: the last block hook seen came from the backward pass
    most_loaded: int = 0  # the largest number of offloaded blocks on the device at once (tests read it)
    stream: Any = None

    def __post_init__(self) -> None:
        if not getattr(self.denoiser, "is_gradient_checkpointing", False):
            # without it autograd keeps every block's weights referenced until the backward: nothing is freed
            raise ValueError("block offloading needs gradient checkpointing on the denoiser")
        self.stored = [self._take(block) for block in self.blocks]
        if self.device.type == "cuda":
            self.stream = torch.cuda.Stream(self.device)
        self.denoiser.register_forward_pre_hook(self._forward_starts)
        for index, block in enumerate(self.blocks):
            block.register_forward_pre_hook(partial(self._before, index))
            block.register_forward_hook(partial(self._after, index))

    def _take(self, block: torch.nn.Module) -> list[tuple[torch.nn.Module, str, torch.Tensor]]:
        """The block's frozen parameters, kept on the CPU (pinned for asynchronous copies), each replaced by an
        empty placeholder. Trained ones (the LoRA's) stay where they are."""
        taken = []
        for module in block.modules():
            for name, param in list(module._parameters.items()):
                if param is None or param.requires_grad:
                    continue
                host = param.detach().to("cpu")
                if self.device.type == "cuda" and _plain(host):
                    host = host.pin_memory()
                taken.append((module, name, host))
                module._parameters[name] = _placeholder(host, param.device)
        return taken

    def _load(self, index: int) -> None:
        """Start copying block `index`'s weights to the device (on the side stream where there is one)."""
        if index in self.loaded or not 0 <= index < len(self.blocks):
            return
        stream = self.stream if self.stream is not None and all(_plain(h) for _, _, h in self.stored[index]) else None
        context = torch.cuda.stream(stream) if stream is not None else nullcontext()
        tensors = []
        with context:
            for module, name, host in self.stored[index]:
                tensor = host.to(self.device, non_blocking=True)
                module._parameters[name] = torch.nn.Parameter(tensor, requires_grad=False)
                tensors.append(tensor)
        copy = _Copy(tensors)
        if stream is not None:
            copy.event = torch.cuda.Event()
            copy.event.record(stream)
        self.loaded[index] = copy
        self.most_loaded = max(self.most_loaded, len(self.loaded))

    def _ensure(self, index: int) -> None:
        """Block `index`'s weights, ready for the compute stream."""
        self._load(index)
        copy = self.loaded[index]
        if copy.event is not None and not copy.waited:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(copy.event)
            for tensor in copy.tensors:  # freed later while the compute stream may still read them
                tensor.record_stream(current)
            copy.waited = True

    def _drop(self, index: int) -> None:
        if self.loaded.pop(index, None) is None:
            return
        for module, name, host in self.stored[index]:
            module._parameters[name] = _placeholder(host, self.device)

    # --- hooks ---
    def _forward_starts(self, module: torch.nn.Module, args: Any) -> None:
        self.backward = False
        self._load(0)  # copied while the embedders run

    def _before(self, index: int, module: torch.nn.Module, args: Any) -> None:
        self._ensure(index)
        if not self.backward:
            self._load(index + 1)

    def _after(self, index: int, module: torch.nn.Module, args: Any, output: Any) -> None:
        if self.backward:
            return  # a recomputation: block k+1's backward hook drops it (an early-stopped one never gets here)
        training = torch.is_grad_enabled()
        if training:
            for tensor in _tensors(output):
                if tensor.requires_grad:
                    tensor.register_hook(partial(self._backward_reaches, index))
        if not (training and index == len(self.blocks) - 1):
            self._drop(index)

    def _backward_reaches(self, index: int, grad: torch.Tensor) -> None:
        self.backward = True
        self._load(index)
        self._drop(index + 1)
        self._load(index - 1)


def _plain(tensor: torch.Tensor) -> bool:
    """A dense tensor (not a torchao / bitsandbytes subclass): pinned and copied on the side stream."""
    return type(tensor) in (torch.Tensor, torch.nn.Parameter)


def _placeholder(host: torch.Tensor, device: torch.device) -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.empty(0, dtype=host.dtype, device=device), requires_grad=False)


def _tensors(output: Any) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, tuple | list):
        return [t for item in output for t in _tensors(item)]
    return []


def offload(denoiser: torch.nn.Module, blocks: list[torch.nn.Module], count: int,
            device: torch.device) -> BlockOffloader | None:
    """Keep the first `count` of `blocks` (the family's, in execution order) off `device` (none for 0)."""
    if count <= 0:
        return None
    return BlockOffloader(denoiser, blocks[:count], device)
