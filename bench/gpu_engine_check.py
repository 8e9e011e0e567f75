"""Engine checks that need a GPU, run beside the benchmark by bench/gpu_check.sh (or alone).

1. the CLI demo on CUDA under the automatic precision: every event, exit code 0;
2. stop after step 3 then --resume, against an uninterrupted run: the largest weight difference (bit-identical
   is promised on the CPU only; CUDA kernels may differ run to run);
3. CUDA out of memory: a run far too big for the card ends in an `error` event with the advice, the memory is
   released, and a second job in the same process then trains.

    python -m bench.gpu_engine_check --out DIR [--device cpu]    (cpu: a plumbing check, no OOM part)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lora_core.config import parse_config  # noqa: E402
from lora_core.job import run_job  # noqa: E402
from lora_core.training import train  # noqa: E402


def tiny(output: Path, device: str, **options) -> dict:
    return {"dataset_path": str(ROOT / "demo" / "dataset"), "base_model": "builtin:tiny-sd",
            "output_path": str(output), "trigger_words": ["shapestyle"],
            "training_params": {"steps": 8, "resolution": 256, "batch_size": 2, "learning_rate": 1e-3,
                                "lora_rank": 4, "lora_alpha": 8, "checkpoint_steps": 100, "validation_steps": 100,
                                "sample_inference_steps": 2, "seed": 7, "device": device, **options}}


def check_cli(work: Path, device: str) -> dict:
    config = work / "cli.json"
    config.write_text(json.dumps(tiny(work / "cli", device, validation_steps=4, checkpoint_steps=4)))
    started = time.perf_counter()
    result = subprocess.run([sys.executable, str(ROOT / "train_lora.py"), "--config", str(config)],
                            capture_output=True, text=True, timeout=240, cwd=ROOT)
    events = [json.loads(line) for line in result.stdout.splitlines()]
    return {"exit_code": result.returncode, "types": sorted({e["type"] for e in events}),
            "device": events[0].get("device") if events else None,
            "precision": events[0].get("mixed_precision") if events else None,
            "last": events[-1] if events else None, "wall_s": round(time.perf_counter() - started, 2),
            "stderr_tail": result.stderr[-800:] if result.returncode else ""}


def check_resume(work: Path, device: str, precision: str) -> dict:
    options = {"mixed_precision": precision, "checkpoint_steps": 2}
    whole = train(parse_config(tiny(work / f"whole-{precision}", device, **options)), lambda e: None,
                  lambda: False)
    events: list = []
    config = parse_config(tiny(work / f"split-{precision}", device, **options))
    train(config, events.append, lambda: any(e.type == "progress" and e.step >= 3 for e in events))
    resumed = train(config, lambda e: None, lambda: False, resume=True)
    a, b = load_file(str(whole.final_path)), load_file(str(resumed.final_path))
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    scale = max(a[k].abs().max().item() for k in a)
    return {"precision": precision, "max_abs_diff": diff, "max_abs_weight": scale, "bit_identical": diff == 0.0}


def check_oom(work: Path) -> dict:
    huge = {"dataset_path": str(ROOT / "demo" / "dataset"), "base_model": "builtin:sd15-arch",
            "output_path": str(work / "oom"), "trigger_words": ["x"],
            "training_params": {"steps": 2, "resolution": 2048, "batch_size": 64, "repeats": 11, "device": "cuda",
                                "validation_steps": 100, "checkpoint_steps": 100}}
    config = parse_config(huge)
    terminal = run_job(config, lambda e: None, lambda: False)  # in one process, as a library user runs jobs
    after_oom = torch.cuda.memory_allocated() / 2**30
    second = run_job(parse_config(tiny(work / "after-oom", "cuda")), lambda e: None, lambda: False)
    return {"terminal": terminal.to_dict() if terminal else None, "allocated_gib_after_oom": round(after_oom, 3),
            "second_job": second.type if second else None}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="engine-check-"))  # many files: kept out of --out
    results: dict = {"gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                     "torch": torch.__version__}
    checks = [("cli", lambda: check_cli(work, args.device)),
              ("resume_fp32", lambda: check_resume(work, args.device, "no"))]
    if args.device == "cuda":
        checks += [("resume_bf16", lambda: check_resume(work, args.device, "bf16")), ("oom", lambda: check_oom(work))]
    for name, check in checks:
        started = time.perf_counter()
        try:
            results[name] = check()
        except Exception as error:  # report and go on: one failure must not lose the other checks
            results[name] = {"failed": f"{type(error).__name__}: {error}"}
        results[name]["seconds"] = round(time.perf_counter() - started, 1)
        print(name, json.dumps(results[name])[:600], flush=True)
    (args.out / "gpu_engine.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
