"""`python -m bench.profile_steps OUT.prof [python -m bench options]`: cProfile of the trainer's steps.

The profiler runs from the trainer's first progress event to its last, so model loading, caching, the final
sample image and the export are left out, and prints the calls that matter to the step per step: the UNet's
forward and backward, the optimizer step, the loss, the data path and the loop's periodic actions. Run it in
each tree to compare (for an earlier commit: in the folder `python -m bench compare` exported, which holds
this tree's bench/). The profiler slows Python calls, so compare trees with each other, not with the
benchmark's figures.
"""

from __future__ import annotations

import cProfile
import pstats
import sys
import tempfile
import time
from pathlib import Path

from bench.dataset import make_dataset
from bench.run import parse_args, trainer_config

# (file name, function) of the calls reported; what a step is made of, in the engines before and after the
# reshape (the reshaped loop's own functions are in training.py; earlier, the loop was train() itself)
CALLS = [("unet_2d_condition.py", "forward"), ("accelerator.py", "backward"), ("training.py", "optimizer_step"),
         ("clip_grad.py", "clip_grad_norm_"), ("optimizer.py", "wrapper"), ("objective.py", "diffusion_loss"),
         ("dataloader.py", "__next__"), ("distributed.py", "__call__"), ("latents.py", "latents"),
         ("cache.py", "batch"), ("conditioning.py", "__call__"), ("training.py", "maybe_report"),
         ("training.py", "maybe_checkpoint"), ("training.py", "maybe_sample"), ("training.py", "maybe_validate"),
         ("accelerator.py", "is_main_process"), ("inspect.py", "signature")]


def profile(argv: list[str]) -> tuple[cProfile.Profile, int, float]:
    """Train as `python -m bench` would; returns the profile, the steps profiled and their wall seconds."""
    from lora_core import training
    from lora_core.events import Progress

    args = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="lora-profile-"))
    dataset = make_dataset(work / "dataset", args.images or max(8, 2 * args.batch),
                           args.image_size or max(512, args.resolution))
    config = trainer_config(args, dataset, work / "output")
    profiler, marks = cProfile.Profile(), []

    def emit(event) -> None:
        if isinstance(event, Progress):
            marks.append((event.step, time.perf_counter()))
            if len(marks) == 1:
                profiler.enable()
            elif event.step == event.total_steps:
                profiler.disable()

    training.train(config, emit, lambda: False)
    (first, started), (last, ended) = marks[0], marks[-1]
    return profiler, last - first, ended - started


def main(argv: list[str]) -> int:
    if not argv or argv[0].startswith("-"):
        print(__doc__, file=sys.stderr)
        return 2
    out, options = Path(argv[0]), argv[1:]
    profiler, steps, seconds = profile(options)
    profiler.dump_stats(out)
    print(f"{sys.modules['lora_core'].__file__}: {steps} steps profiled, {seconds / steps * 1000:.1f} ms/step "
          f"(wall, with the profiler); per step:")
    totals: dict[tuple[str, str], list[float]] = {}
    for (path, _, name), (_, calls, _, cumulative, _) in pstats.Stats(profiler).stats.items():
        key = (Path(path).name, name)
        if key in CALLS:
            total = totals.setdefault(key, [0.0, 0.0])
            total[0] += calls
            total[1] += cumulative
    for key in CALLS:
        if key in totals:
            calls, cumulative = totals[key]
            print(f"{1000 * cumulative / steps:9.2f} ms  {calls / steps:5.1f} calls  {key[0]}:{key[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
