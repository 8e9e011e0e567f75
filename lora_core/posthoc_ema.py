"""`python -m lora_core ema RUN`: a LoRA averaged after the fact from a run's saved checkpoints (post-hoc EMA).

The same two rules as musubi-tuner's lora_post_hoc_ema.py. The files, in step order, are the checkpoints'
`checkpoints/lora_step_N.safetensors` and the run's raw final LoRA (`lora_final.safetensors`, or
`lora_final.raw.safetensors` when ema_use_for_final put the EMA there). The average starts as the first file's
weights; file i (i = 1, 2, ... in order) is then merged with `avg = beta_i * avg + (1 - beta_i) * file_i`, where
- `--beta B [--beta2 B2]`: beta_i = B, or goes linearly from B (first merge) to B2 (last merge);
- `--sigma-rel S`: the power-function EMA of Karras et al. 2023 ("Analyzing and improving the training dynamics
  of diffusion models", Algorithm 2): gamma is the largest real root of g^3 + 7 g^2 + (16 - S^-2) g + 12 - S^-2,
  and beta_i = (1 - 1/i) ** (gamma + 1), counting merges from i = 1 as musubi-tuner does, so beta_1 = 0: the
  first checkpoint is replaced by the second and only sets the start.
Every floating-point tensor is averaged in fp32 and saved in its own dtype; the `.alpha` scalars must agree
across the files and are kept. The output has the last file's names and metadata, plus
`lora_studio.post_hoc_ema` (the rule, its parameters, the steps and each file's resulting weight) and fresh
`sshs_*` hashes. Averaging the up and down factors of a LoRA apart is what musubi-tuner, sd-scripts and the
studio's own EMA do; it is not the average of the products.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lora_core.errors import UserError
from lora_core.lora import save_lora

CHECKPOINT = re.compile(r"^lora_step_(\d+)\.safetensors$")
DEFAULT_OUT = "lora_post_hoc_ema.safetensors"


class PostHocError(UserError):
    field = "run"


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The power-function exponent of a relative standard deviation (Karras et al. 2023, Algorithm 2)."""
    t = sigma_rel ** -2
    roots = np.roots([1, 7, 16 - t, 12 - t])
    return float(roots[np.isreal(roots) & (roots.real >= 0)].real.max())


def betas(merges: int, beta: float | None = None, beta2: float | None = None,
          sigma_rel: float | None = None) -> list[float]:
    """beta_i of each merge i = 1..merges (the files after the first)."""
    if sigma_rel is not None:
        gamma = sigma_rel_to_gamma(sigma_rel)
        return [(1 - 1 / i) ** (gamma + 1) for i in range(1, merges + 1)]
    assert beta is not None
    end = beta if beta2 is None else beta2
    return [beta + (end - beta) * (i / (merges - 1)) if merges > 1 else beta for i in range(merges)]


def file_weights(merge_betas: list[float]) -> list[float]:
    """What each file ends up weighing in the average (they sum to 1): the first (prod of all betas), then
    file i: (1 - beta_i) times the betas of every later merge."""
    weights, tail = [], 1.0
    for beta in reversed(merge_betas):
        weights.append((1 - beta) * tail)
        tail *= beta
    return [tail, *reversed(weights)]


def _file_step(path: Path) -> int:
    with safe_open(str(path), "pt") as handle:
        steps = (handle.metadata() or {}).get("ss_steps", "")
    return int(steps) if steps.isdigit() else 1 << 62  # a final file without its step: last


def run_files(run: Path) -> list[tuple[int, Path]]:
    """(step, file) of the run's raw LoRA files in step order: its checkpoints, then its final LoRA."""
    if not run.is_dir():
        raise PostHocError(f"{run} is not a folder; give a run's output_path")
    checkpoints = run / "checkpoints"
    found = sorted((int(m.group(1)), path) for path in (checkpoints.iterdir() if checkpoints.is_dir() else [])
                   if (m := CHECKPOINT.match(path.name)))
    final = run / "lora_final.raw.safetensors"
    final = final if final.is_file() else run / "lora_final.safetensors"
    if final.is_file():
        step = _file_step(final)
        if not found or step > found[-1][0]:
            found.append((step, final))
    if len(found) < 2:
        raise PostHocError(f"{run} holds {len(found)} raw LoRA file(s) (checkpoints/lora_step_N.safetensors, "
                           "lora_final.safetensors); a post-hoc average needs at least 2: train with a smaller "
                           "checkpoint_steps")
    return found


def average(paths: list[Path], merge_betas: list[float]) -> dict[str, torch.Tensor]:
    """The files merged in order with `merge_betas` (one per file after the first)."""
    first = load_file(str(paths[0]))
    state = {key: t.float() if t.is_floating_point() and not key.endswith(".alpha") else t
             for key, t in first.items()}
    for path, beta in zip(paths[1:], merge_betas, strict=True):
        tensors = load_file(str(path))
        if set(tensors) != set(state):
            raise PostHocError(f"{path} holds other tensors than {paths[0]}: the files are not of one run")
        for key, value in tensors.items():
            if key.endswith(".alpha") or not value.is_floating_point():
                if not torch.equal(value, first[key]):
                    raise PostHocError(f"{key} differs between {paths[0].name} and {path.name}; only LoRAs of one "
                                       "run (one rank and alpha) can be averaged")
                continue
            state[key] = state[key] * beta + value.float() * (1 - beta)
    return {key: t.to(first[key].dtype) for key, t in state.items()}


def post_hoc_ema(run: Path, out: Path, beta: float | None = None, beta2: float | None = None,
                 sigma_rel: float | None = None) -> Path:
    files = run_files(run)
    merge_betas = betas(len(files) - 1, beta, beta2, sigma_rel)
    with safe_open(str(files[-1][1]), "pt") as handle:
        header = dict(handle.metadata() or {})
    rule = ({"rule": "power", "sigma_rel": sigma_rel, "gamma": sigma_rel_to_gamma(sigma_rel)}
            if sigma_rel is not None else {"rule": "exponential", "beta": beta, "beta2": beta2 or beta})
    weights = file_weights(merge_betas)
    header["lora_studio.post_hoc_ema"] = json.dumps({**rule, "steps": [step for step, _ in files],
                                                     "files": [path.name for _, path in files],
                                                     "weights": [round(w, 6) for w in weights]})
    header["lora_studio.weights"] = "post_hoc_ema"
    # the last file's hashes and EMA settings (an EMA run's raw file) do not describe the average
    header = {key: value for key, value in header.items() if not key.startswith("sshs_") and key != "lora_studio.ema"}
    return save_lora(out, average([path for _, path in files], merge_betas), header)


def _unit(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not between 0 and 1")
    return value


def main(argv: list[str]) -> int | str | None:
    parser = argparse.ArgumentParser(prog="python -m lora_core ema", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="the run's folder (its output_path)")
    rule = parser.add_mutually_exclusive_group()
    rule.add_argument("--beta", type=_unit, help="constant decay per merge (default 0.95)")
    rule.add_argument("--sigma-rel", type=float, help="power-function EMA width, in (0, 0.28): 0.05-0.2 usual")
    parser.add_argument("--beta2", type=_unit, help="with --beta: the last merge's decay (linear in between)")
    parser.add_argument("--out", help=f"the LoRA to write (default RUN/{DEFAULT_OUT})")
    args = parser.parse_args(argv)
    if args.sigma_rel is not None and not 0 < args.sigma_rel < 12 ** -0.5:
        parser.error("--sigma-rel must lie between 0 and 1/sqrt(12) (0.2887)")
    if args.beta2 is not None and args.sigma_rel is not None:
        parser.error("--beta2 goes with --beta, not --sigma-rel")
    run = Path(args.run)
    beta = 0.95 if args.beta is None and args.sigma_rel is None else args.beta
    try:
        print(post_hoc_ema(run, Path(args.out) if args.out else run / DEFAULT_OUT, beta, args.beta2, args.sigma_rel))
    except UserError as error:
        return f"error: {error}"
    return None
