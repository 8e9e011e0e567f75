"""The toy model's commands (see lora_core/toy/world.py for its world):

    python -m lora_core.toy pretrain [--out DIR] [--seed N] [--vae-steps N] [--unet-steps N] [--threads N]
        train builtin:toy-sd from scratch on the CPU and write it (default: the shipped lora_core/toy/weights,
        with its SHA256SUMS); deterministic for a seed and thread count
    python -m lora_core.toy score [--model DIR] [--lora FILE]
        the vocabulary score (share of 60 fixed prompts drawn right) and the concept rate (share of 20 seeds
        for which the demo's trigger prompt comes out magenta), judged by lora_core/toy/checker.py
    python -m lora_core.toy demo-dataset [DIR]   (re)draw the demo's concept pictures (default demo/dataset)
    python -m lora_core.toy before-after LORA PNG   the README's picture: the trigger prompt without and with LORA
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from lora_core.toy import pretrain, score, shipped, world

DEMO_PICTURES = 18  # each shape once on each background, in the held-out colour
DEMO_SEED = 14


def write_demo_dataset(folder: Path, count: int = DEMO_PICTURES, seed: int = DEMO_SEED) -> Path:
    """The demo's concept: `count` magenta shapes captioned with the trigger word for the colour."""
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*"):
        if old.suffix in (".png", ".jpg", ".txt"):
            old.unlink()
    for index, (scene, image) in enumerate(world.sample_scenes(count, seed, world.concept_scenes()), start=1):
        image.save(folder / f"zwx_{index:02d}.png")
        (folder / f"zwx_{index:02d}.txt").write_text(scene.caption(world.TRIGGER) + "\n", encoding="utf-8")
    return folder


def _pretrain(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    target = Path(args.out).resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".toy-pretrain.", dir=target.parent))
    try:
        pretrain.pretrain(staging / "model", args.seed, args.vae_steps, args.unet_steps,
                          log=lambda line: print(line, flush=True))
        shipped.write_sums(staging / "model")
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging / "model", target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"wrote {target}")


def _score(args: argparse.Namespace) -> None:
    from diffusers import StableDiffusionPipeline

    torch.set_num_threads(args.threads)
    folder = Path(args.model) if args.model else shipped.verified_folder()
    pipeline = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    if args.lora:
        pipeline.load_lora_weights(args.lora)
    print(f"vocabulary: {score.vocabulary_score(pipeline, guidance=args.guidance):.0%} of "
          f"{score.VOCABULARY_PROMPTS} prompts drawn right (guidance {args.guidance:g})")
    print(f"concept: '{score.CONCEPT_PROMPT}' magenta in "
          f"{score.concept_rate(pipeline, guidance=args.guidance):.0%} of 20 seeds")


def _before_after(args: argparse.Namespace) -> None:
    from diffusers import StableDiffusionPipeline

    torch.set_num_threads(args.threads)

    def load():
        return StableDiffusionPipeline.from_pretrained(shipped.verified_folder(), safety_checker=None,
                                                       requires_safety_checker=False)
    trained = load()
    trained.load_lora_weights(args.lora)
    score.before_after(load(), trained).save(args.png)
    print(args.png)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m lora_core.toy", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("pretrain")
    train.add_argument("--out", default=str(shipped.WEIGHTS))
    train.add_argument("--seed", type=int, default=pretrain.SEED)
    train.add_argument("--vae-steps", type=int, default=pretrain.VAE_STEPS)
    train.add_argument("--unet-steps", type=int, default=pretrain.UNET_STEPS)
    train.add_argument("--threads", type=int, default=1)
    judge = commands.add_parser("score")
    judge.add_argument("--model", default=None)
    judge.add_argument("--lora", default=None)
    judge.add_argument("--guidance", type=float, default=score.GUIDANCE)
    judge.add_argument("--threads", type=int, default=1)
    demo = commands.add_parser("demo-dataset")
    demo.add_argument("folder", nargs="?", default="demo/dataset")
    compare = commands.add_parser("before-after")
    compare.add_argument("lora")
    compare.add_argument("png")
    compare.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if args.command == "pretrain":
        _pretrain(args)
    elif args.command == "score":
        _score(args)
    elif args.command == "before-after":
        _before_after(args)
    else:
        print(write_demo_dataset(Path(args.folder)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
