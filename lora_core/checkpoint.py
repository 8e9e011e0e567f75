"""Training state for resume: saved as a folder that appears under its final name only when complete.

`checkpoints/state_step_<N>/` holds the LoRA parameters, the optimizer state (safetensors + JSON, never a
pickle), and `trainer_state.json` (step, epoch, position in the epoch, LR scheduler, noise counter, RNG,
the resolved config). It is written under a temporary name, each file fsynced, the marker `COMPLETE`
written last, then renamed into place. Older states are pruned only after the new one is complete.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from lora_core.config import TrainConfig
from lora_core.errors import UserError
from lora_core.files import _fsync_dir

MARKER = "COMPLETE"
STATE_DIR = re.compile(r"^state_step_(\d+)$")
# Changing these makes the saved state meaningless for this run; everything else may change on resume.
MUST_MATCH = ("base_model", "network_type", "lokr_factor", "lora_rank", "lora_alpha", "lora_dropout", "lora_target",
              "use_dora", "optimizer",
              "resolution", "batch_size", "gradient_accumulation_steps", "seed", "dataset_path", "bucketing",
              "min_bucket_resolution", "max_bucket_resolution", "bucket_no_upscale", "repeats", "train_text_encoder")
KILL_HOOK = "LORA_STUDIO_TEST_KILL_IN_SAVE"  # tests: SIGKILL halfway through saving the state of this step


class ResumeError(UserError):
    field = "resume"


@dataclass
class TrainerState:
    step: int
    epoch: int
    batches_in_epoch: int  # micro-batches already consumed in `epoch`
    noise_draws: int
    scheduler: dict[str, Any]
    config: dict[str, Any]


def state_folders(output: Path) -> list[tuple[int, Path]]:
    """Complete state folders, oldest first."""
    folder = output / "checkpoints"
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = STATE_DIR.match(path.name)
        if match and (path / MARKER).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def save_state(output: Path, step: int, state: TrainerState, params: dict[str, torch.Tensor], optimizer,
               keep: int) -> Path:
    """Write the state folder atomically, then prune all but the newest `keep` complete ones."""
    checkpoints = output / "checkpoints"
    checkpoints.mkdir(parents=True, exist_ok=True)
    final = checkpoints / f"state_step_{step}"
    staging = checkpoints / f".state_step_{step}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    tensors, groups = _flatten_optimizer(optimizer.state_dict())
    save_file({name: t.detach().cpu().contiguous() for name, t in params.items()}, str(staging / "lora.safetensors"))
    if os.environ.get(KILL_HOOK) == str(step):
        os.kill(os.getpid(), signal.SIGKILL)
    save_file(tensors, str(staging / "optimizer.safetensors"))
    rng = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng.update({f"torch_cuda_{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    save_file(rng, str(staging / "rng.safetensors"))
    body = {**state.__dict__, "optimizer_param_groups": groups}
    (staging / "trainer_state.json").write_text(json.dumps(body, indent=1), encoding="utf-8")
    for path in staging.iterdir():
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())
    (staging / MARKER).write_text(str(step), encoding="utf-8")
    _fsync_dir(staging)
    if final.exists():  # a state of the same step from an earlier, interrupted attempt
        shutil.rmtree(final)
    os.replace(staging, final)
    _fsync_dir(checkpoints)
    for _, old in state_folders(output)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for leftover in checkpoints.glob(".state_step_*.partial-*"):  # from processes killed mid-save
        shutil.rmtree(leftover, ignore_errors=True)
    return final


def latest_state(output: Path) -> Path:
    folders = state_folders(output)
    if not folders:
        raise ResumeError(f"nothing to resume: no complete training state in {output / 'checkpoints'}; "
                          "run without --resume to start a new run")
    return folders[-1][1]


def load_state(folder: Path, config: TrainConfig, params: dict[str, torch.Tensor], optimizer) -> TrainerState:
    """Check the saved run is compatible, then restore parameters, optimizer and RNG in place."""
    body = json.loads((folder / "trainer_state.json").read_text(encoding="utf-8"))
    saved = body["config"]
    current = config.model_dump(mode="json")
    # a state saved before a field existed holds that field's default
    saved = {name: saved.get(name, TrainConfig.model_fields[name].default) for name in MUST_MATCH}
    changed = [f"{name} was {saved[name]!r}, now {current[name]!r}" for name in MUST_MATCH
               if saved[name] != current[name]]
    if changed:
        raise ResumeError(f"cannot resume from {folder}: " + "; ".join(changed) + ". Put them back, or start a "
                          "new run in another output_path")
    weights = load_file(str(folder / "lora.safetensors"))
    if set(weights) != set(params):
        raise ResumeError(f"cannot resume from {folder}: its LoRA layers differ from this model's")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(weights[name])
    groups = body.pop("optimizer_param_groups")
    optimizer.load_state_dict(_unflatten_optimizer(load_file(str(folder / "optimizer.safetensors")), groups))
    rng = load_file(str(folder / "rng.safetensors"))
    torch.set_rng_state(rng["torch_cpu"])
    cuda_states = [rng[key] for key in sorted(rng) if key.startswith("torch_cuda_")]
    if cuda_states and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_states)
    return TrainerState(**body)


def _flatten_optimizer(state_dict: dict) -> tuple[dict[str, torch.Tensor], list[dict]]:
    tensors = {}
    for index, values in state_dict["state"].items():
        for name, value in values.items():
            tensor = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"{index}.{name}"] = tensor.detach().cpu().contiguous()
    return tensors, state_dict["param_groups"]


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], groups: list[dict]) -> dict:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = tensor
    for group in groups:
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])
    return {"state": state, "param_groups": groups}
