"""`python -m bench.collect RUNS_DIR OUT_DIR`: merge the per-configuration JSON files of bench/gpu_check.sh into
OUT_DIR/gpu_results.json and a readable OUT_DIR/gpu_summary.txt that checks the issue's targets."""

from __future__ import annotations

import json
import sys
from pathlib import Path

# (run name, phase, what, limit, unit): the GPU targets of the speed issues, for eager, regional compile and graphs.
TARGETS = [
    *[(f"sd15_b1{kind}", "trainer", what, limit, unit) for kind in ("", "_regional", "_graphs")
      for what, limit, unit in (("s_per_step", 0.09, "s/step <="), ("allocated_gib", 2.9, "GiB peak allocated <="))],
    *[(f"sd15_b16{kind}", "trainer", "percent_of_bf16_peak", 35.0, "% of bf16 peak >=") for kind in ("", "_regional")],
    *[(f"sdxl_b1{kind}", "trainer", what, limit, unit) for kind in ("", "_regional", "_graphs")
      for what, limit, unit in (("s_per_step", 0.30, "s/step <="), ("allocated_gib", 13.0, "GiB peak allocated <="))],
]


def load_runs(runs_dir: Path) -> dict[str, dict]:
    runs = {}
    for status in sorted(runs_dir.glob("*.status"), key=lambda path: path.stat().st_mtime):  # in run order
        name = status.stem
        result_file = runs_dir / f"{name}.json"
        code = status.read_text().strip()
        if result_file.exists():  # written after each phase: a run that timed out keeps its finished phases
            runs[name] = json.loads(result_file.read_text())
            runs[name]["exit_code"] = code
        else:
            runs[name] = {"error": f"no results (exit code {code}; 124 means it ran out of its time)"}
    return runs


def value(phase: dict, key: str):
    if key == "allocated_gib":
        return phase.get("step_memory", {}).get("allocated_gib")
    return phase.get(key)


def _number(value) -> str:
    return "" if value is None else f"{value:.1f}"


def summary_lines(runs: dict[str, dict], environment: dict) -> list[str]:
    lines = [f"GPU check: {environment.get('gpu', '?')}, driver {environment.get('driver', '?')}, "
             f"torch {environment.get('torch', '?')} (CUDA {environment.get('cuda', '?')})", ""]
    header = (f"{'run':<22} {'phase':<10} {'s/step':>8} {'img/s':>8} {'TFLOP/s':>8} {'%peak':>6} "
              f"{'alloc GiB':>9} {'resv GiB':>9} {'estimate':>9} {'est/alloc':>9} {'1st win +s':>10}")
    lines.append(header)
    for name, run in runs.items():
        if "error" in run and "phases" not in run:
            lines.append(f"{name:<22} FAILED: {run['error']}")
            continue
        if run.get("exit_code") not in (None, "0"):
            lines.append(f"{name:<22} (exit code {run['exit_code']}: the phases listed are those that finished)")
        estimate = (run.get("memory_estimate") or {}).get("total_gib")
        for phase_name, phase in run["phases"].items():
            if "error" in phase:
                lines.append(f"{name:<22} {phase_name:<10} FAILED: {phase['error'][:150]}")
                continue
            memory = phase.get("step_memory", {})
            allocated = memory.get("allocated_gib")
            shown_estimate = estimate if phase_name == "trainer" else None
            ratio = f"{shown_estimate / allocated:.2f}" if shown_estimate and allocated else ""
            lines.append(f"{name:<22} {phase_name:<10} {phase['s_per_step']:>8.4f} {phase['images_per_s']:>8.2f} "
                         f"{phase.get('tflops', 0):>8.1f} {phase.get('percent_of_bf16_peak', 0):>6.1f} "
                         f"{allocated!s:>9} {memory.get('reserved_gib')!s:>9} {shown_estimate or '':>9} {ratio:>9} "
                         f"{_number(phase.get('first_window_extra_s')):>10}")
        started = run["phases"].get("trainer", {}).get("started", {})
        if started.get("compile_reason"):
            lines.append(f"{'':<22} trainer compile_unet {started.get('compile_unet')}, cuda_graphs "
                         f"{started.get('cuda_graphs')}: {started['compile_reason']}")
        ratios = run.get("ratios", {})
        lines.append(f"{'':<22} trainer/reference {ratios.get('trainer_over_reference')}, "
                     f"floor/trainer {ratios.get('floor_over_trainer')}")
    lines += ["", "targets:"]
    for run_name, phase_name, key, limit, text in TARGETS:
        phase = runs.get(run_name, {}).get("phases", {}).get(phase_name, {})
        got = value(phase, key)
        if got is None:
            verdict = "not measured"
        else:
            ok = got >= limit if ">=" in text else got <= limit
            verdict = f"{got} -> {'met' if ok else 'MISSED'}"
        lines.append(f"  {run_name} {phase_name}: {text} {limit}: {verdict}")
    for run_name in ("sd15_b1", "sd15_b16", "sdxl_b1"):
        run = runs.get(run_name, {})
        estimate = (run.get("memory_estimate") or {}).get("total_gib")
        allocated = value(run.get("phases", {}).get("trainer", {}), "allocated_gib")
        if estimate and allocated:
            off = 100 * (estimate - allocated) / allocated
            lines.append(f"  {run_name}: --validate-only estimate {estimate} GiB vs peak allocated {allocated} GiB: "
                         f"{off:+.1f} % ({'within' if abs(off) <= 15 else 'OUTSIDE'} +-15 %)")
    return lines


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    runs_dir, out_dir = Path(argv[0]), Path(argv[1])
    runs = load_runs(runs_dir)
    environment = next((run["machine"] for run in runs.values() if "machine" in run), {})
    (out_dir / "gpu_results.json").write_text(json.dumps({"environment": environment, "runs": runs}, indent=2) + "\n")
    text = "\n".join(summary_lines(runs, environment)) + "\n"
    (out_dir / "gpu_summary.txt").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
