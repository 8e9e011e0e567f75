"""Several processes, one run: who speaks, agreeing when to stop, and noise that does not depend on the split.

Under `accelerate launch` or `torchrun` every process runs the same engine on its shard of each batch
(accelerate's DDP averages the gradients). Three things make that behave like one process:

- only the main process (global rank 0) writes files and events: `is_main_process()` reads the launcher's
  environment, so it can be asked before any process group exists (the CLI decides who prints);
- `StopVote`: a stop (signal, page button) or a fault seen by one process stops every process after the same
  step. Each step the processes all-reduce a one-element flag (MAX) over gloo, on the CPU, so a CUDA run pays
  one small message and no device synchronisation;
- `SampleNoise`: the noise and timesteps of sample k of optimizer step s are the same whether the global batch
  is split over N processes or run by one, so N processes with batch b train like one process with batch N*b.

torch is imported only where it is used, so the CLI can ask for the rank cheaply.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

RANK_VARIABLES = ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK")
WORLD_SIZE_VARIABLES = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def _first_int(names: tuple[str, ...], default: int) -> int:
    for name in names:
        value = os.environ.get(name, "").strip()
        if value.isdigit():
            return int(value)
    return default


def process_rank() -> int:
    """This process's global rank as the launcher (torchrun, accelerate, mpirun) set it; 0 when run alone."""
    return _first_int(RANK_VARIABLES, 0)


def world_size() -> int:
    """How many processes train together (1 when run alone)."""
    return max(1, _first_int(WORLD_SIZE_VARIABLES, 1))


def is_main_process() -> bool:
    return process_rank() == 0


PEER_FAILURE_SIGNS = ("Connection closed by peer", "Connection reset by peer", "remote worker", "ProcessGroupNCCL")


def is_peer_failure(error: BaseException) -> bool:
    """True for the error a collective raises in this process when another process of the run died or left."""
    if world_size() == 1:
        return False
    import torch.distributed as dist

    return isinstance(error, dist.DistNetworkError | dist.DistBackendError) or any(
        sign in str(error) for sign in PEER_FAILURE_SIGNS)


class StopVote:
    """`vote(local)` is True on every process when it is True on any one of them.

    All processes must call it at the same points (once per optimizer step), like any collective. It uses the
    default process group when that is gloo (CPU runs) and a gloo group made for it otherwise (NCCL runs), so
    the flag travels between CPUs and never waits for the GPU's queue.
    """

    def __init__(self, num_processes: int):
        import torch.distributed as dist

        self.active = num_processes > 1 and dist.is_available() and dist.is_initialized()
        self.group = None
        if self.active and dist.get_backend() != "gloo":
            self.group = dist.new_group(backend="gloo")  # every rank creates it, in the same order

    def __call__(self, local: bool) -> bool:
        if not self.active:
            return bool(local)
        import torch
        import torch.distributed as dist

        flag = torch.tensor([1 if local else 0], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return bool(flag.item())


SIDE_STREAM = 0x5EED  # side_generator's seeds differ from the main stream's


class SampleNoise:
    """Noise and timesteps for one process's slice of the global batch, independent of how it is split.

    Each draw re-seeds a private generator from (seed, draw number) and draws for the whole global batch
    (`batch_size * num_processes` samples); process i keeps rows [i*batch_size, i*batch_size + n). accelerate
    gives process i the i-th block of `batch_size` indices of each global batch, so sample for sample the
    draws match those of one process with the global batch. The global RNG is left alone, and the state is
    one counter (`state_dict`), so a resumed run can continue the same stream.
    """

    def __init__(self, seed: int, batch_size: int, num_processes: int = 1, process_index: int = 0,
                 num_timesteps: int = 1000, draw_levels: Callable | None = None):
        """`draw_levels(count, generator, device)` draws the noise levels (the objective's); by default integer
        DDPM timesteps below `num_timesteps`."""
        self.seed, self.batch_size = seed, batch_size
        self.num_processes, self.process_index = num_processes, process_index
        self.num_timesteps = num_timesteps
        self.draw_levels = draw_levels or self._timesteps
        self.draws = 0
        self._generators: dict[str, torch.Generator] = {}

    def _generator(self, device: torch.device) -> torch.Generator:
        import torch

        key = str(device)
        if key not in self._generators:
            self._generators[key] = torch.Generator(device)
        generator = self._generators[key]
        generator.manual_seed((self.seed << 32) + (self.draws & 0xFFFFFFFF))
        return generator

    def _timesteps(self, count: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
        import torch

        return torch.randint(0, self.num_timesteps, (count,), generator=generator, device=device)

    def __call__(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(noise like `latents`, noise levels one per row (integer timesteps, or the objective's sigmas),
        per-channel offset noise) for the next micro-batch. The offsets (shape rows x channels x 1 x 1) are for
        the noise-offset option."""
        import torch

        rows = latents.shape[0]
        total = self.batch_size * self.num_processes
        start = self.process_index * self.batch_size
        if start + rows > total:
            raise ValueError(f"a batch of {rows} rows is larger than batch_size {self.batch_size}")
        generator = self._generator(latents.device)
        noise = torch.randn((total, *latents.shape[1:]), generator=generator, device=latents.device,
                            dtype=latents.dtype)
        timesteps = self.draw_levels(total, generator, latents.device)
        offsets = torch.randn((total, latents.shape[1], 1, 1), generator=generator, device=latents.device,
                              dtype=latents.dtype)
        self.draws += 1
        return noise[start:start + rows], timesteps[start:start + rows], offsets[start:start + rows]

    def side_generator(self, device: torch.device) -> torch.Generator:
        """A generator for further draws of the last micro-batch (multires noise), seeded by (seed, draw) on a
        stream of its own: the main stream is the same with those draws or without, and a resumed run repeats
        them."""
        import torch

        generator = torch.Generator(device)
        generator.manual_seed(((self.seed ^ SIDE_STREAM) << 32) + ((self.draws - 1) & 0xFFFFFFFF))
        return generator

    def state_dict(self) -> dict[str, Any]:
        return {"draws": self.draws}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.draws = int(state["draws"])
