"""Which stored score tracks the toy checker when a run overfits? (CPU, toy model; issue 30's first proof.)

For each setup (learning rate, steps, pictures, seed) it trains the demo preset on the first N demo pictures
(2 held out), saving a checkpoint every EVERY steps, scores the run (lora_core.scoring.score_run) and asks the
toy checker (lora_core/toy/checker.py, which knows the truth) for each saved LoRA: the share of concept scenes
with the trigger word drawn right (magenta, the shape, the background) and the share of vocabulary prompts left
right (no bleed). One JSON line per LoRA on stdout, a table at the end.

    OMP_NUM_THREADS=1 python -m bench.overfit --setup 3e-3:160:6:42 --setup 1e-2:240:4:0 --every 20 > runs.jsonl
    python -m bench.overfit --table runs.jsonl      # the markdown table of bench/RESULTS.md
    python -m bench.overfit --recheck RUN/out ...   # judged again at 3 seeds: the recommendation followed

"warnings" are those of today's rule (lora_core.scores.warnings, overfit_patience 3) on the logged figures;
"checker" below is the share right of all 18 concept scenes and `--vocabulary` prompts together (one seed each,
20 sampler steps); rho(figure) the rank correlation, within a run, of a figure with it (the held-out loss and the
bleed negated: higher is better for every column).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "demo" / "dataset"
PRESET = ROOT / "presets" / "demo-toy-cpu.json"


def checker_shares(pipeline, lora_file: Path, steps: int, vocabulary: int) -> tuple[float, float]:
    """(concept scenes right, vocabulary prompts right) with the LoRA loaded, one seed each."""
    from lora_core.toy import checker, score, world

    pipeline.unload_lora_weights()
    pipeline.load_lora_weights(str(lora_file))
    concept = [(scene, scene.caption(world.TRIGGER)) for scene in world.concept_scenes()]
    plain = [(scene, scene.caption()) for scene, _ in score.vocabulary_set(vocabulary)]
    result = []
    for scenes in (concept, plain):
        images = score.draw(pipeline, [caption for _, caption in scenes], [7] * len(scenes), steps=steps)
        result.append(sum(checker.judge(image).matches(scene) for (scene, _), image in zip(scenes, images, strict=True))
                      / len(scenes))
    return result[0], result[1]


def run_setup(spec: str, every: int, checker_steps: int, vocabulary: int, keep: Path | None) -> list[dict]:
    from diffusers import StableDiffusionPipeline

    from lora_core import builtin
    from lora_core.configfile import parse_config
    from lora_core.job import run_job
    from lora_core.scoring import score_run

    lr, steps, pictures, seed = spec.split(":")
    root = Path(tempfile.mkdtemp(prefix="overfit-", dir=keep))
    data = root / "data"
    data.mkdir()
    for index in range(1, int(pictures) + 1):
        for suffix in (".png", ".txt"):
            shutil.copy(DEMO / f"zwx_{index:02d}{suffix}", data)
    raw = json.loads(PRESET.read_text(encoding="utf-8"))
    raw["dataset_path"], raw["output_path"] = str(data), str(root / "out")
    raw["training_params"].update(steps=int(steps), learning_rate=float(lr), seed=int(seed), checkpoint_steps=every,
                                  validation_images=2, validation_steps=int(steps), validation_loss_steps=every)
    config = parse_config(raw)
    final = run_job(config, lambda event: None, lambda: False)
    assert final.type == "complete", final
    scored = score_run(root / "out")
    pipeline = StableDiffusionPipeline.from_pretrained(builtin.builtin_folder("toy-sd"), safety_checker=None,
                                                       requires_safety_checker=False)
    rows = []
    for entry in scored["loras"]:
        concept_right, plain_right = checker_shares(pipeline, root / "out" / entry["file"], checker_steps,
                                                    vocabulary)
        strengths = {f"{row['scale']:g}": [row["concept"], row["likeness"], row["bleed"]]
                     for row in scored["strengths"] if row["label"] == entry["label"]}
        row = {"setup": spec, **{k: entry[k] for k in ("label", "step", "heldout_loss", "concept", "likeness",
                                                        "bleed")},
               "strengths": strengths, "checker_concept": concept_right, "checker_plain": plain_right,
               "recommended": entry["label"] == scored["recommendation"]["label"]}
        print(json.dumps(row), flush=True)
        rows.append(row)
    print(json.dumps({"setup": spec, "recommendation": scored["recommendation"]["text"],
                      "warnings": [w["reason"] for w in scored["warnings"]]}), flush=True)
    if keep is None:
        shutil.rmtree(root)
    return rows


def recheck(folder: Path, pipeline) -> dict:
    """A scored run's recommendation judged with 3 seeds of all 18 concept scenes and 60 vocabulary prompts: the
    recommended LoRA at its strength and at 1, the final LoRA at 1 and at the recommended strength."""
    from lora_core.toy import checker, score, world

    concept = [(scene, scene.caption(world.TRIGGER), seed) for scene in world.concept_scenes() for seed in (7, 8, 9)]
    plain = [(scene, scene.caption(), seed) for scene, seed in score.vocabulary_set(60)]
    data = json.loads((folder / "scores.json").read_text())
    recommended, final = data["recommendation"], data["loras"][-1]
    result = {"run": str(folder)}
    for name, entry, scale in (("followed", recommended, recommended["scale"]), ("recommended_at_1", recommended, 1.0),
                               ("final", final, 1.0), ("final_at_its_strength", final, recommended["scale"])):
        pipeline.unload_lora_weights()
        pipeline.load_lora_weights(str(folder / entry["file"]), adapter_name="judged")
        pipeline.set_adapters(["judged"], [scale])
        shares = []
        for items in (concept, plain):
            images = score.draw(pipeline, [caption for _, caption, _ in items], [seed for *_, seed in items])
            shares.append(sum(checker.judge(image).matches(scene)
                              for (scene, _, _), image in zip(items, images, strict=True)) / len(items))
        result[name] = {"file": entry["file"], "scale": scale, "concept": round(shares[0], 3),
                        "vocabulary": round(shares[1], 3), "all": round((54 * shares[0] + 60 * shares[1]) / 114, 3)}
    return result


def _rank(values: list[float]) -> list[float]:
    order = sorted(range(len(values)), key=values.__getitem__)
    ranks = [0.0] * len(values)
    for place, index in enumerate(order):
        ranks[index] = float(place)
    return ranks


def _rho(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation (ties in order of appearance)."""
    ra, rb = _rank(a), _rank(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb, strict=True))
    var = (sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb)) ** 0.5
    return cov / var if var else 0.0


def table(files: list[Path]) -> str:
    """The markdown table of logged runs: the recommendation and the final LoRA on the checker, and which
    figure follows the checker."""
    from lora_core import scores

    runs: dict[str, list[dict]] = {}
    for file in files:
        for line in file.read_text().splitlines():
            row = json.loads(line) if line.startswith("{") else None
            if row and "label" in row:
                right = 18 * row["checker_concept"] + 24 * row["checker_plain"]
                runs.setdefault(row["setup"], []).append({**row, "checker": right / 42})
    figures = {"-loss": lambda r: -r["heldout_loss"], "concept": lambda r: r["concept"],
               "likeness": lambda r: r["likeness"], "-bleed": lambda r: -r["bleed"]}
    lines = ["| lr:steps:pictures:seed | warnings | recommended (checker) | final (checker) | best (checker) | "
             "rank of recommended | " + " | ".join(f"rho({name})" for name in figures) + " |",
             "| --- " * (6 + len(figures)) + "|"]
    for setup, rows in runs.items():
        loras = [{**row, "final": row["label"].startswith("final")} for row in rows]
        warned = [warning["reason"] for warning in scores.warnings({"loras": loras})]  # by today's rule
        chosen = next(row for row in rows if row["recommended"])
        best = max(rows, key=lambda row: row["checker"])
        place = 1 + sum(row["checker"] > chosen["checker"] for row in rows)
        checker = [row["checker"] for row in rows]
        rhos = " | ".join(f"{_rho([get(row) for row in rows], checker):+.2f}" for get in figures.values())
        lines.append(f"| {setup} | {', '.join(warned) or '-'} | {chosen['step']} "
                     f"({chosen['checker']:.2f}) | {rows[-1]['step']} ({rows[-1]['checker']:.2f}) | {best['step']} "
                     f"({best['checker']:.2f}) | {place} of {len(rows)} | {rhos} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setup", action="append", default=[], help="LR:STEPS:PICTURES:SEED")
    parser.add_argument("--table", type=Path, nargs="+", help="print the markdown table of these logs instead")
    parser.add_argument("--every", type=int, default=20, help="checkpoint and validation interval")
    parser.add_argument("--checker-steps", type=int, default=20)
    parser.add_argument("--vocabulary", type=int, default=24, help="vocabulary prompts the checker judges")
    parser.add_argument("--keep", type=Path, help="keep the runs under this folder")
    parser.add_argument("--recheck", type=Path, nargs="+", help="judge these scored runs again at 3 seeds")
    args = parser.parse_args()
    if args.table:
        print(table(args.table))
    if args.recheck:
        from diffusers import StableDiffusionPipeline

        from lora_core import builtin

        pipeline = StableDiffusionPipeline.from_pretrained(builtin.builtin_folder("toy-sd"), safety_checker=None,
                                                           requires_safety_checker=False)
        for folder in args.recheck:
            print(json.dumps(recheck(folder, pipeline)), flush=True)
    for spec in args.setup:
        rows = run_setup(spec, args.every, args.checker_steps, args.vocabulary, args.keep)
        print(f"# {spec}")
        print("label            loss     concept  likeness bleed    chk_concept chk_plain")
        for row in rows:
            print(f"{row['label']:<16} {row['heldout_loss']:<8.4g} {row['concept']:<8.4g} {row['likeness']:<8.4g} "
                  f"{row['bleed']:<8.4g} {row['checker_concept']:<11.3f} {row['checker_plain']:.3f}"
                  f"{'  <- recommended' if row['recommended'] else ''}")


if __name__ == "__main__":
    main()
