"""`python -m bench`: reference vs this trainer vs the floor, in one process, on one model, dataset and settings.

Every phase runs `--warmup` untimed windows, then `--windows` timed windows of `--steps` steps; each figure is
the median over the timed windows. The device is synchronised only at window edges (the reference syncs every
step by itself, the trainer at its progress events, which the benchmark sets to once per window).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

from bench.dataset import make_dataset
from bench.machine import machine
from bench.measure import (
    MemoryProbe,
    Timing,
    release_memory,
    time_window,
    time_windows,
    windows_from_marks,
)
from bench.turns import Turns

TRIGGER = "benchstyle"



def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:small-sd", help="base model (default builtin:small-sd)")
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank; alpha = rank")
    parser.add_argument("--steps", type=int, default=5, help="steps per timed window (default 5)")
    parser.add_argument("--windows", type=int, default=5, help="timed windows per phase (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed warm-up windows per phase (default 1)")
    parser.add_argument("--phases", default="reference,trainer,floor", help="comma-separated subset, in order")
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    parser.add_argument("--precision", choices=["auto", "no", "bf16", "fp16"], default="auto",
                        help="the trainer's mixed_precision; the reference and the floor use the same")
    parser.add_argument("--compile", nargs="?", const="on", default="off", choices=["off", "on", "auto"],
                        help="the trainer's compile_unet (bare --compile: on, i.e. regional); the floor follows "
                             "it unless --floor-compile says otherwise")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="the trainer's cuda_graphs; the floor follows it (torch.compile mode reduce-overhead)")
    parser.add_argument("--floor-compile", choices=["eager", "regional", "whole"], default=None,
                        help="how the floor's UNet is compiled (default: regional when --compile on, else eager). "
                             "Phases floor_eager, floor_regional and floor_whole run a floor each way in one run")
    parser.add_argument("--floor-compile-mode", default=None,
                        help="the torch.compile mode of the floor's compile (e.g. reduce-overhead for CUDA graphs); "
                             "alone, it compiles the floor regionally")
    parser.add_argument("--floor-sync", action="store_true", help="the floor reads its loss back every step")
    parser.add_argument("--floor-contiguous", action="store_true",
                        help="the floor's UNet without the channels-last layout the trainer gives it on CUDA")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--base-quantization", default=None, help="the trainer's base_quantization (fp8, int8, nf4)")
    parser.add_argument("--offload-blocks", type=int, default=0,
                        help="the trainer's offload_blocks (FLUX.1 / SD 3.x; needs --gradient-checkpointing)")
    parser.add_argument("--optimizer", default=None, help="the trainer's optimizer (e.g. adamw8bit)")
    parser.add_argument("--interleave", action="store_true",
                        help="run the phases window by window in turn instead of one after another, so that a "
                             "machine whose speed drifts slows them alike (memory is then for the whole run)")
    parser.add_argument("--images", type=int, default=0, help="dataset size (default max(8, 2 x batch))")
    parser.add_argument("--image-size", type=int, default=0,
                        help="side of the synthetic JPEGs (default max(512, resolution)); the reference decodes "
                             "and resizes them every step, the trainer once")
    parser.add_argument("--label", default="", help="a name for this run in the JSON")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--work-dir", type=Path, default=None, help="dataset and trainer output (default: temp)")
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------------------------------
# the phases


def trainer_config(args: argparse.Namespace, dataset_dir: Path, output: Path):
    from bench.compat import parse_config

    steps = args.steps * (args.warmup + args.windows)
    data = {"dataset_path": str(dataset_dir), "base_model": args.model, "output_path": str(output),
            "trigger_words": [TRIGGER], "steps": steps, "resolution": max(args.resolution, 256),
            "batch_size": args.batch, "lora_rank": args.rank, "lora_alpha": args.rank, "learning_rate": 1e-4,
            "device": args.device, "mixed_precision": args.precision, "progress_steps": args.steps,
            "checkpoint_steps": 1_000_000, "validation_steps": 1_000_000, "sample_inference_steps": 1,
            "gradient_checkpointing": args.gradient_checkpointing, "compile_unet": args.compile,
            "cuda_graphs": args.cuda_graphs, "seed": 42}
    # the low-memory options only when asked, so that an older engine without them still runs the rest
    data.update({key: value for key, value in (("base_quantization", args.base_quantization),
                                               ("offload_blocks", args.offload_blocks),
                                               ("optimizer", args.optimizer)) if value})
    config = parse_config(data)
    if args.resolution < 256:
        # The config refuses sides under 256 (a guard for users); the engine itself takes any multiple of the
        # model's pixel multiple, and the CPU benchmark is defined at 128 px.
        config = config.model_copy(update={"resolution": args.resolution})
    return config


def reference_loop(config, device: torch.device, records):
    from bench.reference import ReferenceLoop, ReferenceSettings
    from lora_core import hardware, models

    precision = hardware.resolve_precision(config, device)
    source = models.resolve(config.base_model)
    pipeline = models.load_pipeline(source, models.inspect(source))
    settings = ReferenceSettings(resolution=config.resolution, batch_size=config.batch_size, rank=config.lora_rank,
                                 alpha=config.lora_alpha, learning_rate=config.learning_rate,
                                 max_grad_norm=config.max_grad_norm, mixed_precision=precision, seed=config.seed)
    return ReferenceLoop(pipeline, [Path(r.path) for r in records], [r.caption for r in records], settings, device)


def floor_scope(args, phase: str = "floor") -> str:
    """eager, regional or whole: from the phase name (floor_whole, ...), else --floor-compile, else --compile."""
    if phase != "floor":
        return phase.removeprefix("floor_")
    if args.floor_compile:
        return args.floor_compile
    return "regional" if args.compile == "on" or args.cuda_graphs or args.floor_compile_mode else "eager"


def floor_loop(args, config, device: torch.device, phase: str = "floor"):
    from diffusers import UNet2DConditionModel

    from bench.floor import FloorLoop
    from bench.flops import meta_unet
    from lora_core import models

    shapes = meta_unet(config.base_model)
    if shapes is not None:  # random weights, made on the device: the floor's speed does not depend on them
        torch.manual_seed(config.seed)
        with torch.device(device):
            unet = UNet2DConditionModel.from_config(shapes.config)
    else:
        source = models.resolve(config.base_model)
        unet = models.load_pipeline(source, models.inspect(source)).unet
    mode = args.floor_compile_mode or ("reduce-overhead" if args.cuda_graphs else None)
    return FloorLoop(unet, config, device, scope=floor_scope(args, phase), compile_mode=mode,
                     sync_per_step=args.floor_sync, contiguous=args.floor_contiguous)


def run_reference(args, config, device: torch.device, records, probe: MemoryProbe) -> dict:
    loop = reference_loop(config, device, records)
    timing = time_windows(loop.step, device, warmup_windows=args.warmup, windows=args.windows,
                          window_steps=args.steps, batch_size=args.batch, after_warmup=lambda: probe.mark("setup"))
    probe.mark("steps")
    return {"timing": timing}


def run_trainer(args, config, device: torch.device, records, probe: MemoryProbe,
                between_windows: Callable[[bool], None] | None = None) -> dict:
    """`lora_core.training.train`, as the worker behind train_lora.py calls it; timed from its progress events.

    `between_windows(last)` runs at each progress event, outside the timed windows."""
    from lora_core import training
    from lora_core.events import Progress

    marks: list[float] = []  # when each window ended
    started: list[float] = []  # when the started event came (the fit loop begins)
    resumed: list[float] = []  # when the next one started
    cpu_marks: list[float] = []  # the same two, in the process's CPU seconds
    cpu_resumed: list[float] = []
    events: list[dict] = []

    def emit(event) -> None:
        if isinstance(event, Progress):
            marks.append(time.perf_counter())
            cpu_marks.append(time.process_time())
            if len(marks) == args.warmup:  # setup and warm-up end here; the timed windows start
                probe.mark("setup")
            elif event.step == event.total_steps:  # before the final sample images and export
                probe.mark("steps")
            if between_windows is not None:
                between_windows(event.step >= event.total_steps)
            resumed.append(time.perf_counter())
            cpu_resumed.append(time.process_time())
        if event.type != "progress":
            events.append(event.to_dict())
        if event.type == "started":
            started.append(time.perf_counter())

    result = training.train(config, emit, lambda: False)
    terminal = events[-1] if events else {}
    if terminal.get("type") != "complete":
        raise RuntimeError(f"the trainer ended with {terminal}")
    timing = windows_from_marks(marks, args.steps, args.warmup, args.batch, resumed, started[0] if started else None)
    timing.window_cpu_s_per_step = windows_from_marks(cpu_marks, args.steps, args.warmup, args.batch,
                                                      cpu_resumed).window_s_per_step
    del result
    return {"timing": timing, "started": events[0]}


def run_floor(args, config, device: torch.device, records, probe: MemoryProbe, phase: str = "floor") -> dict:
    loop = floor_loop(args, config, device, phase)
    timing = time_windows(loop.step, device, warmup_windows=args.warmup, windows=args.windows,
                          window_steps=args.steps, batch_size=args.batch, after_warmup=lambda: probe.mark("setup"))
    probe.mark("steps")
    return {"timing": timing}


PHASES = {"reference": run_reference, "trainer": run_trainer, "floor": run_floor,
          **{f"floor_{scope}": (lambda *a, scope=scope: run_floor(*a, phase=f"floor_{scope}"))
             for scope in ("eager", "regional", "whole")}}


def run_one_after_another(args, config, device: torch.device, records, phases: list[str], results: dict) -> None:
    """Each phase on its own, with its own peak memory; the JSON is written after every phase, so that a run
    stopped by a time limit keeps what it measured."""
    for name in phases:
        print(f"-- {name} ...", file=sys.stderr, flush=True)
        started = time.perf_counter()
        try:
            with MemoryProbe(device) as probe:
                outcome = PHASES[name](args, config, device, records, probe)
            timing: Timing = outcome.pop("timing")
            results["phases"][name] = {**timing.to_dict(), **outcome, "memory": probe.result,
                                       "step_memory": probe.segment("steps")}
        except Exception as error:  # one failing phase must not lose the others
            results["phases"][name] = _failure(error)
        results["phases"][name]["wall_s"] = round(time.perf_counter() - started, 1)
        release_memory(device)
        if args.json:
            summarise(results)
            write_json(args.json, results)


def run_interleaved(args, config, device: torch.device, records, phases: list[str], results: dict) -> None:
    """All phases in one go, window by window: the trainer trains, and at each of its progress events one window
    of every other phase runs (after their own warm-up at the first event), outside the trainer's timed windows.
    A machine whose speed drifts, such as a shared VM, then slows every phase alike and the ratios hold. Memory
    is measured for the whole run only (`memory_all_phases`), since every phase's model is loaded at once."""
    print(f"-- {', '.join(phases)}, interleaved ...", file=sys.stderr, flush=True)
    started = time.perf_counter()
    seconds: dict[str, list[float]] = {name: [] for name in phases if name != "trainer"}
    cpu_seconds: dict[str, list[float]] = {name: [] for name in seconds}
    first: dict[str, float] = {}
    try:
        steps = {name: (reference_loop(config, device, records) if name == "reference"
                        else floor_loop(args, config, device, name)).step for name in seconds}

        turns = Turns.from_environment()  # python -m bench compare: another process takes turns with this one

        def between_windows(last: bool) -> None:
            if turns is not None:  # the trainer's window is over: hand the turn on, and wait for it to come back
                turns.wait()
            if last:
                return
            for name, step in steps.items():
                if not seconds[name]:
                    warmups = [time_window(step, device, args.steps) for _ in range(args.warmup)]
                    first[name] = warmups[0] * args.steps
                seconds[name].append(time_window(step, device, args.steps, cpu_seconds[name]))

        with MemoryProbe(device) as probe:
            trainer = run_trainer(args, config, device, records, probe, between_windows)
        results["memory_all_phases"] = probe.result
        timings = {name: Timing(times[args.warmup - 1:], args.batch, first.get(name), args.steps,
                                cpu_seconds[name][args.warmup - 1:]) for name, times in seconds.items()}
        timings["trainer"] = trainer.pop("timing")
        results["phases"] = {name: {**timings[name].to_dict(), **(trainer if name == "trainer" else {}),
                                    "interleaved": True} for name in phases}
    except Exception as error:  # every phase took part, so every phase failed
        results["phases"] = {name: _failure(error) for name in phases}
    for phase in results["phases"].values():
        phase["wall_s"] = round(time.perf_counter() - started, 1)


def _failure(error: Exception) -> dict:
    traceback.print_exc()
    return {"error": f"{type(error).__name__}: {error}".splitlines()[0][:500]}


# ----------------------------------------------------------------------------------------------------
# the machine and the report


def summarise(results: dict) -> None:
    """Ratios, FLOP rates and the estimate, added to `results` in place."""
    phases = results["phases"]
    rate = {name: phase["images_per_s"] for name, phase in phases.items() if "images_per_s" in phase}
    results["ratios"] = {
        "trainer_over_reference": round(rate["trainer"] / rate["reference"], 3) if {"trainer", "reference"} <= set(
            rate) else None,
        "floor_over_trainer": round(rate["floor"] / rate["trainer"], 3) if {"floor", "trainer"} <= set(rate) else None,
    }
    flops = results.get("tflop_per_image")
    peak = results["machine"].get("bf16_peak_tflops")
    for phase in phases.values():
        if flops and "images_per_s" in phase:
            phase["tflops"] = round(flops["total"] * phase["images_per_s"], 4)
            if peak:
                phase["percent_of_bf16_peak"] = round(100 * phase["tflops"] / peak, 2)


def print_report(results: dict, out=sys.stdout) -> None:
    settings, phases = results["settings"], results["phases"]
    where = results["machine"].get("gpu") or results["machine"].get("cpu")
    compiled = f" compile_unet {settings['compile']}" if settings["compile"] != "off" else ""
    print(f"\n== {settings['model']} {settings['resolution']}px batch {settings['batch']} rank {settings['rank']} "
          f"precision {settings['precision']}{compiled} on {where} "
          f"(torch {results['machine']['torch']}, load {results['machine']['load_average']})", file=out)
    gpu = results["device"] == "cuda"
    memory_head = "peak alloc / reserved GiB" if gpu else "peak RSS GiB"
    print(f"{'phase':<15} {'s/step':>9} {'images/s':>9} {'spread':>7} {'TFLOP/s':>8} {'1st win +s':>10}  {memory_head}",
          file=out)
    for name, phase in phases.items():
        if "error" in phase:
            print(f"{name:<15} FAILED: {phase['error']}", file=out)
            continue
        memory = phase.get("step_memory")
        mem = ("- (interleaved)" if memory is None else
               f"{memory.get('allocated_gib')} / {memory.get('reserved_gib')}" if gpu else f"{memory.get('rss_gib')}")
        extra = phase.get("first_window_extra_s")
        print(f"{name:<15} {phase['s_per_step']:>9.4f} {phase['images_per_s']:>9.2f} {phase['spread']:>7.1%} "
              f"{phase.get('tflops', 0):>8.2f} {'' if extra is None else f'{extra:.1f}':>10}  {mem}", file=out)
    ratios = results["ratios"]
    print(f"trainer/reference images/s: {ratios['trainer_over_reference']}   "
          f"floor/trainer images/s: {ratios['floor_over_trainer']}", file=out)
    if "memory_all_phases" in results:
        peak = results["memory_all_phases"].get("peak", {})
        print(f"interleaved: peak memory of all phases together {peak}", file=out)
    estimate = results.get("memory_estimate")
    if estimate and "step_memory" in phases.get("trainer", {}):
        measured = phases.get("trainer", {}).get("step_memory", {})
        peak = measured.get("allocated_gib") if gpu else measured.get("rss_gib")
        print(f"memory estimate (--validate-only): {estimate['total_gib']} GiB; trainer step peak "
              f"{'allocated' if gpu else 'RSS'}: {peak} GiB", file=out)


def write_json(path: Path, results: dict) -> None:
    """`results` as JSON at `path`, written under a temporary name first (a killed run leaves no half file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".partial")
    temporary.write_text(json.dumps(results, indent=2, default=str) + "\n")
    temporary.replace(path)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    import diffusers.utils.logging
    import transformers.utils.logging

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    from lora_core import dataset, hardware, plan

    if args.warmup < 1:
        print("--warmup must be at least 1 (the trainer's first window has no start mark)", file=sys.stderr)
        return 2
    phases = [name.strip() for name in args.phases.split(",") if name.strip()]
    unknown = set(phases) - set(PHASES)
    if unknown:
        print(f"unknown phases {sorted(unknown)}; choose from {list(PHASES)}", file=sys.stderr)
        return 2
    if args.interleave and "trainer" not in phases:
        print("--interleave times the other phases between the trainer's windows: include the trainer phase",
              file=sys.stderr)
        return 2
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="lora-bench-"))
    images = args.images or max(8, 2 * args.batch)
    dataset_dir = make_dataset(work / "dataset", images, args.image_size or max(512, args.resolution))
    config = trainer_config(args, dataset_dir, work / "trainer-output")
    device = hardware.pick_device(config)
    if device.type == "cuda":  # the trainer turns these on; the other phases get the same
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    records = dataset.scan(dataset_dir, [TRIGGER]).images

    from bench.flops import step_tflop_per_image

    results: dict = {
        "label": args.label, "device": device.type, "machine": machine(device),
        "engine": str(Path(sys.modules["lora_core"].__file__).parent),  # which tree's lora_core was measured
        "settings": {"model": args.model, "resolution": args.resolution, "batch": args.batch, "rank": args.rank,
                     "precision": hardware.resolve_precision(config, device), "compile": args.compile,
                     "cuda_graphs": args.cuda_graphs, "floor_compile": floor_scope(args),
                     "floor_compile_mode": args.floor_compile_mode, "floor_sync": args.floor_sync,
                     "floor_contiguous": args.floor_contiguous,
                     "gradient_checkpointing": args.gradient_checkpointing, "interleave": args.interleave,
                     "images": images, "image_size": args.image_size or max(512, args.resolution),
                     "steps_per_window": args.steps, "windows": args.windows, "warmup_windows": args.warmup},
        "tflop_per_image": step_tflop_per_image(args.model, args.resolution, args.rank),
        "memory_estimate": (plan.plan_report(config).get("memory_estimate")),
        "phases": {},
    }
    if args.interleave:
        run_interleaved(args, config, device, records, phases, results)
    else:
        run_one_after_another(args, config, device, records, phases, results)
    results["machine"]["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    summarise(results)
    print_report(results)
    if args.json:
        write_json(args.json, results)
    return 0 if all("error" not in phase for phase in results["phases"].values()) else 1
