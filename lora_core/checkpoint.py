"""Training state for resume: saved as a folder that appears under its final name only when complete.

`checkpoints/state_step_<N>/` holds the LoRA parameters, the optimizer state (safetensors + JSON, never a
pickle), and `trainer_state.json` (step, epoch, position in the epoch, LR scheduler, noise counter, RNG,
the resolved config). It is written under a temporary name, each file fsynced, the marker `COMPLETE`
written last, then renamed into place; a state of the same step is first renamed away (never emptied in
place), so a folder with its marker is whole whenever the process is killed. Older states are pruned only
after the new one is complete. Resume takes the newest state that is whole and readable, and says which it
skipped; it continues only a state made with the same training settings (all but MAY_CHANGE). A fresh
run refuses a folder that holds training states already.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lora_core.config import TrainConfig
from lora_core.errors import UserError
from lora_core.files import DiskFullError, _fsync_dir, named_disk_full, normal_mode, remove_stale_temporaries

log = logging.getLogger("lora_core")

MARKER = "COMPLETE"
STATE_DIR = re.compile(r"^state_step_(\d+)$")
STATE_FILES = ("lora.safetensors", "optimizer.safetensors", "rng.safetensors", "trainer_state.json", MARKER)
# What a resumed run may change: its length, how often it reports and saves, and where and how fast it runs.
# Every other field (the model, the LoRA, the data, the optimisation) must be as the state was made, or the
# run would continue a different one; a field added later is covered without being listed here.
MAY_CHANGE = frozenset({"steps", "epochs", "checkpoint_steps", "validation_steps", "validation_loss_steps",
                        "keep_checkpoints",
                        "max_nonfinite_steps", "progress_steps", "log_with", "sample_prompts",
                        "sample_inference_steps", "sample_guidance_scale", "device", "mixed_precision",
                        "gradient_checkpointing", "compile_unet", "latent_cache", "output_path",
                        "ema_samples", "ema_use_for_final"})
MUST_MATCH = tuple(name for name in TrainConfig.model_fields if name not in MAY_CHANGE)
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
               keep: int, extra: dict[str, dict[str, torch.Tensor]] | None = None) -> Path:
    """Write the state folder atomically, then prune all but the newest `keep` complete ones. On a full disk,
    the partial folder is removed and the DiskFullError names the newest complete state that remains. `extra`:
    more safetensors files of the state by name (the EMA's `ema.safetensors`), written before the marker."""
    checkpoints = output / "checkpoints"
    checkpoints.mkdir(parents=True, exist_ok=True)
    final = checkpoints / f"state_step_{step}"
    staging = checkpoints / f".state_step_{step}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        _write_state(staging, step, state, params, optimizer, extra or {})
    except DiskFullError as error:
        shutil.rmtree(staging, ignore_errors=True)
        raise DiskFullError(final / error.path.name, error.needed, error.written, note=last_good_note(output)) from None
    if final.exists():  # a state of the same step from an earlier attempt
        _set_aside(final)
    os.replace(staging, final)
    _fsync_dir(checkpoints)
    for _, old_state in state_folders(output)[:-keep]:
        _set_aside(old_state)
    clean_leftovers(output)
    return final


def _set_aside(folder: Path) -> None:
    """Rename a state folder out of the way in one step; it is deleted later. Never deleting a state in
    place means no kill can leave its marker without its files."""
    trash = folder.with_name(f".{folder.name}.old-{os.getpid()}")
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(folder, trash)
    _fsync_dir(folder.parent)


def _write_state(staging: Path, step: int, state: TrainerState, params: dict[str, torch.Tensor],
                 optimizer, extra: dict[str, dict[str, torch.Tensor]]) -> None:
    staging.mkdir()
    for name, tensors in extra.items():
        with named_disk_full(staging / name, _nbytes(tensors)):
            save_file(tensors, str(staging / name))
    tensors, groups = _flatten_optimizer(optimizer.state_dict())
    weights = {name: t.detach().cpu().contiguous() for name, t in params.items()}
    with named_disk_full(staging / "lora.safetensors", _nbytes(weights)):
        save_file(weights, str(staging / "lora.safetensors"))
    if os.environ.get(KILL_HOOK) == str(step):
        os.kill(os.getpid(), signal.SIGKILL)
    with named_disk_full(staging / "optimizer.safetensors", _nbytes(tensors)):
        save_file(tensors, str(staging / "optimizer.safetensors"))
    rng = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng.update({f"torch_cuda_{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    body = json.dumps({**state.__dict__, "optimizer_param_groups": groups}, indent=1).encode("utf-8")
    with named_disk_full(staging / "trainer_state.json", len(body) + _nbytes(rng)):
        save_file(rng, str(staging / "rng.safetensors"))
        (staging / "trainer_state.json").write_bytes(body)
        for path in staging.iterdir():
            normal_mode(path)  # safetensors writes 0600; a state is data another process or user may load
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
        (staging / MARKER).write_text(str(step), encoding="utf-8")
    _fsync_dir(staging)


def _nbytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values()) + 1024 * (1 + len(tensors) // 10)


def clean_leftovers(output: Path) -> list[Path]:
    """Remove what killed writes left: partial and replaced state folders, and `.*.tmp` files anywhere in
    the output folder. The next run (and every save) calls it; the removed paths. Everything in a run folder
    is the run's: the page server keeps its files of the job (job.json, which it writes while the job runs)
    in a folder of its own (studio/jobfiles.py), so nothing here is spared."""
    removed = remove_stale_temporaries(output, recursive=True)
    checkpoints = output / "checkpoints"
    if checkpoints.is_dir():
        for pattern in (".state_step_*.partial-*", ".state_step_*.old-*"):
            for leftover in checkpoints.glob(pattern):
                shutil.rmtree(leftover, ignore_errors=True)
                removed.append(leftover)
    return removed


def last_good_note(output: Path) -> str:
    """Which saved state a user can resume from, for an error that ends the run."""
    folders = state_folders(output)
    if not folders:
        return "No training state was saved yet"
    step, folder = folders[-1]
    lora = output / "checkpoints" / f"lora_step_{step}.safetensors"
    return (f"The last good checkpoint is step {step} ({folder}" + (f", LoRA {lora}" if lora.is_file() else "")
            + "); --resume continues from it")


@contextmanager
def naming_last_good(output: Path) -> Iterator[None]:
    """A DiskFullError raised inside (saving a checkpoint or the final LoRA) also names the last good state."""
    try:
        yield
    except DiskFullError as error:
        if error.note:
            raise
        raise DiskFullError(error.path, error.needed, error.written, note=last_good_note(output)) from None


def damage(folder: Path) -> str | None:
    """Why a state folder with its marker cannot be resumed from (a file missing, cut short or unreadable)."""
    missing = [name for name in STATE_FILES if not (folder / name).is_file()]
    if missing:
        return "missing " + ", ".join(missing)
    try:
        body = json.loads((folder / "trainer_state.json").read_text(encoding="utf-8"))
        if not isinstance(body, dict) or not {"step", "config", "optimizer_param_groups"} <= set(body):
            return "trainer_state.json lacks its fields"
        for name in STATE_FILES[:3]:
            with safe_open(str(folder / name), framework="pt") as handle:
                handle.keys()
    except Exception as error:  # any unreadable file makes the state unusable, whatever the library raises
        return f"unreadable ({type(error).__name__}: {str(error)[:200]})"
    return None


def refuse_other_runs_states(output: Path) -> None:
    """A fresh run must not share a folder with training states (its pruning and a later --resume would
    mix the two runs): refuse, naming the newest state."""
    folders = state_folders(output)
    if folders:
        step, folder = folders[-1]
        raise ResumeError(f"{output} already holds training states of a run (newest: step {step}, {folder}). "
                          "Use --resume (Resume on the page) to continue that run, or choose another "
                          "output_path (or delete its checkpoints folder) to start a new one", field="output_path")


def latest_state(output: Path, skipped: list[str] | None = None) -> Path:
    """The newest complete state that is whole and readable; each damaged one passed over is logged (and
    added to `skipped`, for the caller to report)."""
    folders = state_folders(output)
    for _, folder in reversed(folders):
        reason = damage(folder)
        if reason is None:
            return folder
        note = f"skipped the damaged training state {folder} ({reason}); resuming from an older one"
        log.warning(note)
        if skipped is not None and note not in skipped:
            skipped.append(note)
    if folders:
        raise ResumeError(f"nothing to resume: every training state in {output / 'checkpoints'} is damaged "
                          f"(newest: {folders[-1][1]}: {damage(folders[-1][1])}); start a new run in another "
                          "output_path")
    raise ResumeError(f"nothing to resume: no complete training state in {output / 'checkpoints'}; "
                      "run without --resume to start a new run")


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


NESTED = "/"  # `index.name/part`: a state entry that is itself a dict (bitsandbytes' 8-bit quantisation state)


def _flatten_optimizer(state_dict: dict) -> tuple[dict[str, torch.Tensor], list[dict]]:
    tensors = {}
    for index, values in state_dict["state"].items():
        for name, value in values.items():
            parts = value.items() if isinstance(value, dict) else [(None, value)]
            for part, item in parts:
                tensor = item if torch.is_tensor(item) else torch.tensor(item)
                key = f"{index}.{name}" if part is None else f"{index}.{name}{NESTED}{part}"
                tensors[key] = tensor.detach().cpu().contiguous()
    return tensors, state_dict["param_groups"]


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], groups: list[dict]) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for key, tensor in tensors.items():
        index, name = key.split(".", 1)
        entry = state.setdefault(int(index), {})
        if NESTED in name:
            name, part = name.split(NESTED, 1)
            entry.setdefault(name, {})[part] = tensor
        else:
            entry[name] = tensor
    for group in groups:
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])
    return {"state": state, "param_groups": groups}
