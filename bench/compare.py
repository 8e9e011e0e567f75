"""`python -m bench compare --against COMMIT`: this tree's trainer against an earlier commit's, on one machine, in
one run.

The earlier commit is exported (`git archive`) to a temporary folder and this tree's `bench/` is copied over
its own, so both engines are measured by the same harness: the same reference loop, floor and timing code
(`bench/compat.py` finds the few functions that moved). Two processes run `python -m bench --interleave`, one
per tree, and take turns window by window (`bench/turns.py`): one process computes while the other waits, so a
machine whose speed drifts slows both commits alike, as `--interleave` already makes it slow the three phases
of one commit alike. `--runs` repeats the pair, the leading commit alternating.

Each trainer window is paired with the floor and reference windows that ran right before it, in the same
process and the same turn: `trainer/floor` and `trainer/reference` are images/s ratios per pair, whose medians
and ranges over all pairs of all runs are reported (trainer/floor 0.95 = 5 % slower than the floor).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.run import write_json
from bench.turns import ENV

ROOT = Path(__file__).resolve().parent.parent
# The two settings: the CPU target (small-sd 128² batch 4 rank 16 fp32) and the tiny model, where the
# UNet step is so short that whatever the trainer adds around it shows most.
SETTINGS: dict[str, dict[str, str]] = {
    "small-sd-128-b4": {"model": "builtin:small-sd", "resolution": "128", "batch": "4", "rank": "16",
                        "precision": "no", "steps": "4", "windows": "5"},
    "tiny-sd": {"model": "builtin:tiny-sd", "resolution": "64", "batch": "2", "rank": "4", "precision": "no",
                "steps": "10", "windows": "5"},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--against", help="the earlier commit (any name git rev-parse takes)")
    parser.add_argument("--report", type=Path, help="print the figures of an earlier comparison's JSON again")
    parser.add_argument("--setting", choices=sorted(SETTINGS), default="small-sd-128-b4")
    parser.add_argument("--runs", type=int, default=1, help="pairs of runs; the leading commit alternates")
    parser.add_argument("--steps", type=int, help="steps per window (default: the setting's)")
    parser.add_argument("--windows", type=int, help="timed windows per run (default: the setting's)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, help="OMP_NUM_THREADS of both processes (default: torch's own)")
    parser.add_argument("--bench-args", default="", help="more options for both runs of python -m bench, quoted")
    parser.add_argument("--turn-timeout", type=float, default=900.0,
                        help="seconds one process may hold its turn (or set up) before it is stopped")
    parser.add_argument("--json", type=Path, help="write the comparison here")
    parser.add_argument("--work-dir", type=Path, help="exports, runs and logs (default: a temporary folder)")
    return parser.parse_args(argv)


def bench_args(args: argparse.Namespace) -> list[str]:
    """The options of both runs of python -m bench: the setting's, with --steps/--windows/--warmup over them."""
    options = {**SETTINGS[args.setting], "warmup": str(args.warmup), "device": "cpu"}
    options.update({key: str(value) for key, value in (("steps", args.steps), ("windows", args.windows)) if value})
    return [part for key, value in options.items() for part in (f"--{key}", value)] + args.bench_args.split()


# ----------------------------------------------------------------------------------------------------
# the two trees


def git(*argv: str) -> str:
    return subprocess.run(["git", *argv], cwd=ROOT, check=True, capture_output=True, text=True).stdout.strip()


def export(commit: str, folder: Path) -> Path:
    """The commit's files in `folder`, with this tree's bench/ instead of its own (the same yardstick)."""
    folder.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", commit], cwd=ROOT, check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    shutil.rmtree(folder / "bench", ignore_errors=True)
    shutil.copytree(ROOT / "bench", folder / "bench", ignore=shutil.ignore_patterns("__pycache__", "results"))
    return folder


def trees(against: str, work: Path) -> dict[str, dict]:
    """current: this working tree as it is (uncommitted changes included, and said); against: the export."""
    sha = git("rev-parse", "--verify", f"{against}^{{commit}}")
    dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    return {"current": {"commit": git("rev-parse", "HEAD"), "dirty": dirty, "path": ROOT,
                        "subject": git("log", "-1", "--format=%s", "HEAD")[:120]},
            "against": {"commit": sha, "dirty": False, "path": export(sha, work / f"tree-{sha[:10]}"),
                        "subject": git("log", "-1", "--format=%s", sha)[:120]}}


# ----------------------------------------------------------------------------------------------------
# the processes and their turns


class Child:
    """One process (`python -m bench --interleave`) and its two pipes (bench/turns.py)."""

    def __init__(self, name: str, tree: Path, command: list[str], log: Path, threads: int | None = None):
        to_child, self.to_me = os.pipe()
        self.from_me, from_child = os.pipe()
        env = {**os.environ, ENV: f"{to_child},{from_child}"}
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
        env.pop("PYTHONPATH", None)  # the tree's own lora_core, found in its working directory, and no other
        self.name, self.log = name, log
        with log.open("w") as out:
            self.process = subprocess.Popen(command, cwd=tree, env=env, stdout=out, stderr=subprocess.STDOUT,
                                            pass_fds=(to_child, from_child))
        os.close(to_child)
        os.close(from_child)
        self.buffer = b""

    def send(self, line: str) -> None:
        os.write(self.to_me, f"{line}\n".encode())

    def receive(self, timeout: float) -> str:
        """The next line (wait); "" if the process closed its pipe (it is done, or died) or took too long."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.from_me], [], [], left)[0]:
                self.process.kill()  # it holds the machine: the other commit's windows cannot run fairly
                return ""
            chunk = os.read(self.from_me, 64)
            if not chunk:
                return ""
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line.decode().strip()

    def close(self) -> None:
        for fd in (self.to_me, self.from_me):
            with contextlib.suppress(OSError):  # already closed
                os.close(fd)


def lockstep(children: list[Child], timeout: float) -> list[str]:
    """Every child sets up (together: untimed), then they take turns in the order given until all have ended.
    Returns the turns' order, e.g. [current, against, current, ...]."""
    ready = [child for child in children if child.receive(timeout) == "wait"]
    order: list[str] = []
    while ready:
        for child in list(ready):
            child.send("go")
            order.append(child.name)
            if child.receive(timeout) != "wait":  # the process is done (or gone)
                ready.remove(child)
    return order


def run_pair(index: int, argv: list[str], tree_info: dict[str, dict], work: Path, args) -> dict:
    names = ["current", "against"] if index % 2 == 0 else ["against", "current"]
    folder = work / f"run-{index + 1}"
    folder.mkdir(parents=True)
    children = [Child(name, tree_info[name]["path"],
                      [sys.executable, "-m", "bench", *argv, "--interleave", "--json", str(folder / f"{name}.json"),
                       "--work-dir", str(folder / name), "--label", name],
                      folder / f"{name}.log", args.threads) for name in names]
    try:
        order = lockstep(children, args.turn_timeout)
        codes = {child.name: child.process.wait(timeout=args.turn_timeout) for child in children}
    finally:
        for child in children:
            if child.process.poll() is None:
                child.process.kill()
            child.close()
    result: dict = {"leader": names[0], "turns": len(order), "exit_codes": codes}
    for child in children:
        path = folder / f"{child.name}.json"
        result[child.name] = json.loads(path.read_text()) if path.is_file() else None
        if codes[child.name] != 0:
            tail = child.log.read_text(errors="replace")[-2000:]
            print(f"-- {child.name} exited {codes[child.name]}; the end of {child.log}:\n{tail}", file=sys.stderr)
    return result


# ----------------------------------------------------------------------------------------------------
# the figures


def spread_of(values: list[float]) -> dict:
    """Median, range and spread ((max - min) / median, as the benchmark reports it) of per-window figures."""
    median = statistics.median(values)
    return {"median": round(median, 4), "min": round(min(values), 4), "max": round(max(values), 4),
            "spread": round((max(values) - min(values)) / median, 3), "n": len(values)}


CLOCKS = {"wall": "window_s_per_step", "cpu": "window_cpu_s_per_step"}  # the harness's per-window lists
PHASES = ("trainer", "floor", "reference")


def commit_figures(runs: list[dict], key: str) -> dict:
    """One commit's figures over all its runs, by one clock. Ratios are per window pair: the trainer's window
    against the floor's and the reference's that ran just before it, in the same turn (images/s ratios)."""
    seconds: dict[str, list[float]] = {phase: [] for phase in PHASES}
    over_floor: list[float] = []
    over_reference: list[float] = []
    per_run: list[dict] = []
    for run in runs:
        windows = {phase: run["phases"][phase][key] for phase in PHASES}
        for phase, values in windows.items():
            seconds[phase] += values
        over_floor += [f / t for t, f in zip(windows["trainer"], windows["floor"], strict=True)]
        over_reference += [r / t for t, r in zip(windows["trainer"], windows["reference"], strict=True)]
        medians = {phase: statistics.median(values) for phase, values in windows.items()}
        per_run.append({"trainer_over_floor": round(medians["floor"] / medians["trainer"], 3),
                        "trainer_over_reference": round(medians["reference"] / medians["trainer"], 3),
                        "load_average": run["machine"]["load_average"],
                        "load_average_end": run["machine"].get("load_average_end")})
    return {"s_per_step": {phase: spread_of(values) for phase, values in seconds.items()},
            "trainer_over_floor": {**spread_of(over_floor), "values": [round(v, 4) for v in over_floor]},
            "trainer_over_reference": {**spread_of(over_reference), "values": [round(v, 4) for v in over_reference]},
            "per_run": per_run}


def interval_percent(new: list[float], old: list[float], draws: int = 2000) -> list[float]:
    """A 90 % bootstrap interval of median(new) / median(old) - 1, in per cent: the window pairs of each commit
    resampled with replacement (a fixed seed, so the same data gives the same interval). An interval that
    holds 0 is a change the noise could have made."""
    rng = random.Random(0)
    changes = sorted(statistics.median(rng.choices(new, k=len(new))) / statistics.median(rng.choices(old, k=len(old)))
                     - 1 for _ in range(draws))
    return [round(100 * changes[int(0.05 * draws)], 1), round(100 * changes[int(0.95 * draws) - 1], 1)]


def change_percent(current: dict, against: dict) -> dict:
    """How much current's medians differ from the earlier commit's, in per cent, with the ratios' intervals."""
    def change(new: float, old: float) -> float:
        return round(100 * (new / old - 1), 1)

    result = {key: change(current[key]["median"], against[key]["median"])
              for key in ("trainer_over_floor", "trainer_over_reference")}
    result.update({f"{key}_interval": interval_percent(current[key]["values"], against[key]["values"])
                   for key in ("trainer_over_floor", "trainer_over_reference")})
    result.update({f"{phase}_s_per_step": change(current["s_per_step"][phase]["median"],
                                                 against["s_per_step"][phase]["median"]) for phase in PHASES})
    return result


def summarise(results: dict) -> None:
    """Figures per commit and clock (wall, and the process's CPU time), and the change of current against the
    earlier commit, added in place."""
    summary: dict = {}
    for name in ("current", "against"):
        runs = [run[name] for run in results["runs"]
                if run.get(name) and all("error" not in run[name]["phases"].get(p, {"error": 1}) for p in PHASES)]
        if runs:
            summary[name] = {clock: commit_figures(runs, key) for clock, key in CLOCKS.items()
                             if all(run["phases"][p].get(key) for run in runs for p in PHASES)}
    if {"current", "against"} <= set(summary):
        summary["change_percent"] = {clock: change_percent(summary["current"][clock], summary["against"][clock])
                                     for clock in summary["current"] if clock in summary["against"]}
    results["summary"] = summary


def print_report(results: dict, out=sys.stdout) -> None:
    trees_, summary = results["trees"], results["summary"]
    print(f"\n== python -m bench compare: {results['setting']} ({' '.join(results['bench_args'])}), "
          f"{len(results['runs'])} run(s) of both commits taking turns, on {results['machine']['cpu']} "
          f"({results['machine']['cpu_count']} cores), load {results['load_average']} at the start, "
          f"{results.get('load_average_end')} at the end", file=out)
    print(f"{'commit':<22} {'clock':<5} {'trainer s/step':>15} {'floor s/step':>15} {'reference s/step':>16} "
          f"{'trainer/floor':>20} {'trainer/reference':>20}", file=out)
    for name in ("current", "against"):
        tree = trees_[name]
        label = f"{name} {tree['commit'][:8]}{'+dirty' if tree['dirty'] else ''}"
        if name not in summary:
            print(f"{label:<22} FAILED (see the logs in {results['work_dir']})", file=out)
            continue
        for clock, figures in summary[name].items():
            times = [f"{figures['s_per_step'][p]['median']:.4f} ±{figures['s_per_step'][p]['spread']:.0%}"
                     for p in PHASES]
            ratios = [f"{figures[k]['median']:.3f} [{figures[k]['min']:.2f}-{figures[k]['max']:.2f}]"
                      for k in ("trainer_over_floor", "trainer_over_reference")]
            print(f"{label:<22} {clock:<5} {times[0]:>15} {times[1]:>15} {times[2]:>16} {ratios[0]:>20} "
                  f"{ratios[1]:>20}", file=out)
    earlier = trees_["against"]["commit"][:8]
    for clock, change in summary.get("change_percent", {}).items():
        floor, reference = change["trainer_over_floor_interval"], change["trainer_over_reference_interval"]
        print(f"current against {earlier} ({clock}): trainer/floor {change['trainer_over_floor']:+.1f} % "
              f"(90 % interval {floor[0]:+.1f} to {floor[1]:+.1f}), trainer/reference "
              f"{change['trainer_over_reference']:+.1f} % ({reference[0]:+.1f} to {reference[1]:+.1f}); s/step trainer "
              f"{change['trainer_s_per_step']:+.1f} %, floor {change['floor_s_per_step']:+.1f} %, reference "
              f"{change['reference_s_per_step']:+.1f} %", file=out)
    print("(s/step: median ±spread over all timed windows; ratios: images/s, median [range] over window pairs, "
          "trainer/floor 0.95 = 5 % slower than the floor; cpu: the process's CPU time, which a loaded machine "
          "inflates less than the wall clock, and which counts every thread's time)", file=out)


def main(argv: list[str] | None = None) -> int:
    from bench.machine import _cpu_name

    args = parse_args(argv)
    if args.report:  # the summary is made again from the runs' windows, so a newer summary applies to old data
        results = json.loads(args.report.read_text())
        summarise(results)
        print_report(results)
        return 0
    if not args.against:
        print("--against COMMIT is needed (or --report FILE)", file=sys.stderr)
        return 2
    if args.runs < 1 or args.warmup < 1:
        print("--runs and --warmup must be at least 1", file=sys.stderr)
        return 2
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="lora-bench-compare-"))
    argv_ = bench_args(args)
    results: dict = {"setting": args.setting, "bench_args": argv_, "work_dir": str(work),
                     "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                     "load_average": [round(x, 2) for x in os.getloadavg()],
                     "machine": {"cpu": _cpu_name(), "cpu_count": os.cpu_count(), "threads": args.threads},
                     "runs": []}
    results["trees"] = trees(args.against, work)
    for index in range(args.runs):
        print(f"-- run {index + 1} of {args.runs} (load {os.getloadavg()[0]:.2f})", file=sys.stderr, flush=True)
        results["runs"].append(run_pair(index, argv_, results["trees"], work, args))
        results["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
        summarise(results)
        if args.json:  # after every run, so that a run stopped by a time limit keeps what it measured
            write_json(args.json, results)
    print_report(results)
    ok = {"current", "against"} <= set(results["summary"])
    engines = [(run[name] or {}).get("engine") for run in results["runs"] for name in ("current", "against")]
    expected = [str(Path(results["trees"][name]["path"]) / "lora_core") for _ in results["runs"]
                for name in ("current", "against")]
    if engines != expected:  # a run that imported the wrong tree's engine would compare nothing
        print(f"engines measured {engines}, expected {expected}", file=sys.stderr)
        ok = False
    return 0 if ok else 1
