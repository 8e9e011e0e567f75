"""The dataset doctor: what in a folder of images and captions will spoil a LoRA, each finding naming the
file(s), what is wrong, why it matters and the fix.

    python -m lora_core doctor DATASET [--config FILE] [--trigger WORDS] [--json] [--no-cache] [--set NAME=VALUE ...]
    python -m lora_core doctor DATASET ... --events [--out FILE]     (as a job: doctor_job.py)

With a config, its resolution, bucketing, trigger words, trigger placement and held-out images are the ones
checked against, and its base model decides the text encoders' limits (CLIP 77 tokens; T5's for families
that have one) and, for a local diffusers folder, the exact tokenizer. Without one, TrainConfig's defaults.
The checks live in doctor_images.py and doctor_captions.py; the one-click fixes in doctor_fixes.py.
Exit status: 0 when nothing is found, 1 with findings, 2 when the folder cannot be checked (as a job, --events:
0 once the findings are written, 1 on an error, 130/143 when stopped).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from lora_core import dataset, doctor_captions, doctor_images, imagehash
from lora_core.config import TrainConfig
from lora_core.doctor_captions import CaptionEntry, EncoderLimit, TokenCounter
from lora_core.doctor_images import Shape

log = logging.getLogger("lora_core")
SEVERITIES = ("error", "warning", "info")
MAX_EVENT_FINDINGS = 100  # in the run's dataset event
CLIP_LIMIT = EncoderLimit("CLIP", 77)
# Families whose captions also reach a T5 encoder, and the length they are trained with (diffusers' and
# kohya's defaults). The current families (sd1, sd2, sdxl) read CLIP only.
T5_TOKENS = {"sd3": 256, "flux": 512, "flux-schnell": 256}
PIPELINE_FAMILIES = {"StableDiffusion3Pipeline": "sd3", "FluxPipeline": "flux"}


class DoctorSettings(BaseModel):
    """The doctor's thresholds. Every one is a judgement call; the defaults flag what nearly always hurts."""

    model_config = ConfigDict(extra="forbid")

    near_duplicate_bits: int = Field(10, ge=0, le=32, description=(
        "Two images are near-duplicates when both their dHash and pHash (64 bits each) differ in at most this "
        "many bits. A resize or JPEG re-encode changes 0-4; unrelated photos differ in about 32."))
    blur_absolute: float = Field(1.6, gt=0, description=(
        "An image is blurry when its detail ratio (gradient energy at 512 px over that at 256 px: sharp images "
        "2-4 or more, blurred ones about 1) is below this..."))
    blur_relative: float = Field(0.5, gt=0, le=1, description=(
        "... and, in a set of at least blur_min_images, below this fraction of the set's median ratio."))
    blur_min_images: int = Field(5, ge=2, description="Compare with the set's median from this many images on.")
    max_upscale: float = Field(2.0, ge=1, description="Flag images training enlarges by more than this factor.")
    max_crop: float = Field(0.3, gt=0, lt=1, description=(
        "Flag images whose bucket (or centre square) crop cuts away more than this fraction."))
    majority: float = Field(0.6, gt=0.5, le=1, description=(
        "A trigger word or a caption is expected when at least this fraction of captions have one."))
    caption_similarity: float = Field(0.9, gt=0, le=1, description=(
        "Captions are near-identical when their word sets overlap this much (Jaccard), trigger words aside."))
    transparent: float = Field(0.01, gt=0, le=1, description=(
        "Flag images with at least this fraction of transparent pixels."))
    cache: bool = Field(True, description="Cache measurements by file content (imagehash.cache_dir()).")


@dataclass
class Finding:
    kind: str  # duplicate, near_duplicate, leakage, blurry, upscaled, cropped, caption_too_long, ...
    files: list[str]  # file names in the dataset folder (held-out ones named as they are in theirs)
    message: str  # what is wrong
    why: str  # why it matters for a LoRA
    fix: str
    severity: str = "warning"  # error | warning | info
    actions: list[str] = field(default_factory=list)  # one-click fixes that apply: exclude, add_trigger, convert

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Target:
    """What the dataset is checked against: the training shape, trigger words, encoders and held-out files."""

    shape: Shape = field(default_factory=Shape)
    trigger_words: list[str] = field(default_factory=list)
    placement: str = "first"
    limits: list[EncoderLimit] = field(default_factory=lambda: [CLIP_LIMIT])
    counter: TokenCounter = field(default_factory=TokenCounter)
    held_out: list[Path] = field(default_factory=list)  # images the validation loss holds out
    validation_images: int | float | None = None  # or: held out of the dataset itself, as training picks them


@dataclass
class Result:
    folder: str
    findings: list[Finding]
    num_images: int
    seconds: float

    def to_json(self) -> str:
        return json.dumps([finding.to_dict() for finding in self.findings], indent=1, ensure_ascii=False)


def image_files(folder: Path) -> list[Path]:
    """The images dataset.scan would consider, in its order, without those the exclude list names (and without
    the loss masks `*.mask.png`)."""
    excluded = dataset.read_excluded(folder)
    return [path for path in sorted(folder.iterdir())
            if not path.name.startswith(".") and path.suffix.lower() in dataset.IMAGE_SUFFIXES
            and path.name not in excluded and not dataset.is_mask_file(path.name)
            and (path.is_file() or path.is_symlink())]


def _facts(path: Path, folder: Path, cache: imagehash.FactsCache) -> imagehash.ImageFacts:
    """The facts of a file, or why training refuses it: a link out of the folder is never followed."""
    try:
        dataset._inside_folder(path, folder)
    except ValueError as error:
        return imagehash.ImageFacts("", error=str(error))
    return imagehash.image_facts(path, cache)


def _collector(findings: list[Finding]):
    def add(kind: str, files: list[str], message: str, why: str, fix: str, severity: str = "warning",
            actions: list[str] | None = None) -> None:
        findings.append(Finding(kind, list(files), message, why, fix, severity, list(actions or [])))
    return add


class DoctorStopped(Exception):
    """Stopped on request while measuring; nothing is written but the measurements' cache."""

    def __init__(self, done: int, total: int):
        super().__init__(f"stopped on request after {done} of {total} images; no findings were written")
        self.done = done


def examine(folder: str | Path, target: Target | None = None, settings: DoctorSettings | None = None,
            progress: Callable[[int, int], None] | None = None,
            should_stop: Callable[[], bool] | None = None) -> Result:
    """Every finding for the dataset `folder`, most severe first. `progress(done, total)` after each image is
    measured (the checks after that take a fraction of the time); `should_stop()` asked before each image:
    DoctorStopped when it says so."""
    start, folder = time.perf_counter(), Path(folder)
    if not folder.is_dir():
        raise dataset.DatasetError(f"{folder} is not a folder of images")
    target, settings = target or Target(), settings or DoctorSettings()
    cache = imagehash.FactsCache(imagehash.cache_dir() / "doctor-facts.json" if settings.cache else None)
    files = image_files(folder)
    try:
        measured = _measure(files, folder, cache, progress, should_stop)
    finally:  # a stopped doctor keeps what it measured for the next check
        cache.save()
    readable = [(path, facts) for path, facts in measured if not facts.error]
    held_names = {path.resolve() for path in target.held_out}
    if target.validation_images is not None and not target.held_out:
        held_names = _held_out_of([path for path, _ in readable], folder, target.validation_images)
    held = [(path.name, facts) for path, facts in measured if path.resolve() in held_names]
    held += [(f"{path.parent.name}/{path.name}", imagehash.image_facts(path, cache))
             for path in target.held_out if path.parent.resolve() != folder.resolve()]
    cache.save()
    findings: list[Finding] = []
    add = _collector(findings)
    doctor_images.unreadable([(path.name, facts) for path, facts in measured], add)
    train = [(path.name, facts) for path, facts in readable if path.resolve() not in held_names]
    _image_checks(train, [item for item in held if not item[1].error], target, settings, add)
    _caption_checks([path for path, _ in readable], folder, target, settings, add)
    order = {severity: i for i, severity in enumerate(SEVERITIES)}
    findings.sort(key=lambda finding: order.get(finding.severity, len(order)))
    return Result(str(folder), findings, len(files), time.perf_counter() - start)


def _measure(files: list[Path], folder: Path, cache: imagehash.FactsCache,
             progress: Callable[[int, int], None] | None,
             should_stop: Callable[[], bool] | None) -> list[tuple[Path, imagehash.ImageFacts]]:
    # Threads: Pillow's decoders and resizes and numpy release the GIL; two cores nearly halve the time.
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        futures = [pool.submit(_facts, path, folder, cache) for path in files]
        measured = []
        try:
            for path, future in zip(files, futures, strict=True):
                if should_stop is not None and should_stop():
                    raise DoctorStopped(len(measured), len(files))
                measured.append((path, future.result()))
                if progress is not None:
                    progress(len(measured), len(files))
        except BaseException:
            for future in futures:  # those not begun never run; the pool waits for the few running
                future.cancel()
            raise
    return measured


def _image_checks(train, held, target: Target, settings: DoctorSettings, add) -> None:
    exact = doctor_images.exact_duplicates(train, add)
    doctor_images.near_duplicates(train, settings.near_duplicate_bits, exact, add)
    if held:
        doctor_images.leakage(train, held, settings.near_duplicate_bits, add)
    doctor_images.blurry(train, settings.blur_absolute, settings.blur_relative, settings.blur_min_images, add)
    doctor_images.sizes(train, target.shape, settings.max_upscale, settings.max_crop, add)
    doctor_images.transparency(train, settings.transparent, add)
    doctor_images.conversions(train, add)


def caption_entries(paths: list[Path], folder: Path, target: Target) -> list[CaptionEntry]:
    """Each image's caption as written and as the encoder gets it (trigger words placed as configured)."""
    entries, ignored = [], []
    for path in paths:
        raw, has_file = dataset._read_caption(path, folder, ignored)
        trained = dataset.build_caption(target.trigger_words, raw, target.placement) if target.trigger_words else raw
        entries.append(CaptionEntry(path.name, raw, has_file, trained))
    return entries


def _caption_checks(paths: list[Path], folder: Path, target: Target, settings: DoctorSettings, add) -> None:
    entries = caption_entries(paths, folder, target)
    doctor_captions.too_long(entries, target.limits, target.counter, add)
    doctor_captions.trigger_missing(entries, target.trigger_words, target.placement, settings.majority, add)
    doctor_captions.empty_captions(entries, settings.majority, add)
    triggers = target.trigger_words or doctor_captions.inferred_triggers(entries, settings.majority)
    doctor_captions.similar_captions(entries, triggers, settings.caption_similarity, add)


def target_from_config(config: TrainConfig, family: str | None = None, multiple: int | None = None,
                       t5_tokens: int | None = None) -> Target:
    """The target a config describes. `family`, `multiple` and `t5_tokens` come from the model when the caller
    has inspected it (the run plan has); otherwise a local folder's model_index.json, else SD's. T5's limit
    applies to families that read captions through T5, unless the config drops T5 (`use_t5_encoder`)."""
    model_folder = Path(config.base_model) if os.path.isdir(config.base_model) else None
    family = family or _folder_family(model_folder)
    limits = [CLIP_LIMIT]
    if family in T5_TOKENS and getattr(config, "use_t5_encoder", True):
        tokens = t5_tokens or getattr(config, "max_sequence_length", 0) or T5_TOKENS[family]
        limits.append(EncoderLimit("T5", tokens))
    shape = Shape(config.resolution, config.bucketing, config.min_bucket_resolution, config.max_bucket_resolution,
                  config.bucket_no_upscale, multiple or _default_multiple(config))
    return Target(shape, list(config.trigger_words), config.trigger_placement, limits,
                  TokenCounter.from_model(config.base_model), _held_out_paths(config), config.validation_images)


def _run_t5_tokens(plan) -> int | None:
    """The T5 length the run's family trains with (families that have `run_settings`), if it says one."""
    from lora_core import families

    try:
        family = families.get(plan.info.family)
        settings = family.run_settings(plan.config, plan.info) if hasattr(family, "run_settings") else None
    except (KeyError, AttributeError, TypeError):  # a family this engine does not know: T5_TOKENS' length
        return None
    return (settings or {}).get("max_sequence_length")


def _folder_family(model_folder: Path | None) -> str | None:
    try:
        index = json.loads((model_folder / "model_index.json").read_text(encoding="utf-8")) if model_folder else {}
    except (OSError, ValueError):
        return None
    return PIPELINE_FAMILIES.get(index.get("_class_name", "")) if isinstance(index, dict) else None


def _default_multiple(config: TrainConfig) -> int:
    """SD's pixel step (64), or the largest power of two up to 64 that divides the resolution (a built-in toy
    model with a smaller step is trained at sizes that are not multiples of 64)."""
    step = 64
    while config.resolution % step:
        step //= 2
    return step


def _held_out_paths(config: TrainConfig) -> list[Path]:
    """The images of validation_dataset_path (validation_images are picked in `examine`, of the readable ones)."""
    if config.validation_dataset_path is None:
        return []
    folder = Path(config.validation_dataset_path)
    return image_files(folder) if folder.is_dir() else []


def _held_out_of(paths: list[Path], folder: Path, validation_images: int | float) -> set[Path]:
    """The images of `paths` that training holds out for validation_images, by holdout.split's own rule (it
    picks among the images the scan accepts; the readable ones stand in for them)."""
    from types import SimpleNamespace

    from lora_core import holdout

    records = [dataset.ImageRecord(str(path), "", 0, 0, False) for path in paths]
    rule = SimpleNamespace(validation_dataset_path=None, validation_images=validation_images)
    try:
        held = holdout.split(dataset.DatasetReport(folder=str(folder), images=records), rule)
    except holdout.HeldOutError:  # all of them: training refuses the config, with its own message
        return set()
    return {Path(record.path).resolve() for record in held.images} if held else set()


def plan_findings(plan, settings: DoctorSettings | None = None) -> list[dict[str, Any]]:
    """The findings of a run plan's dataset, for the run's `dataset` event (at most MAX_EVENT_FINDINGS):
    `emit(dataset_event(plan.dataset, plan.held_out, findings=doctor.plan_findings(plan)))`. Advice only: a
    doctor that fails is logged and gives no findings, never a failed run. About 5 s of CPU per 1,000 images
    the first time, a second or two once their measurements are cached."""
    try:
        target = target_from_config(plan.config, plan.info.family, plan.info.pixel_multiple, _run_t5_tokens(plan))
        target.held_out = [Path(record.path) for record in plan.held_out.images] if plan.held_out else []
        result = examine(plan.config.dataset_path, target, settings)
    except Exception as error:  # advice must never stop a run
        log.warning("dataset doctor: not run (%s: %s)", type(error).__name__, error)
        return []
    return [finding.to_dict() for finding in result.findings[:MAX_EVENT_FINDINGS]]


def format_text(result: Result) -> str:
    lines = [f"{result.folder}: {result.num_images} images, {len(result.findings)} finding(s) "
             f"({result.seconds:.1f} s)"]
    for finding in result.findings:
        names = ", ".join(finding.files[:8]) + (f" and {len(finding.files) - 8} more" if len(finding.files) > 8 else "")
        lines += [f"\n[{finding.severity}] {finding.kind}: {names}", f"  {finding.message}",
                  f"  why: {finding.why}", f"  fix: {finding.fix}"]
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    """The command's options (doctor_job.py adds those of running it as a job)."""
    parser = argparse.ArgumentParser(prog="python -m lora_core doctor", description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset", help="the folder of images and .txt captions")
    parser.add_argument("--config", help="a training config file (JSON/YAML/TOML) whose settings to check against")
    parser.add_argument("--trigger", help=(
        "the trigger words, comma-separated, placed first in each caption (as the config's trigger_words; "
        "default: a first tag most captions share)"))
    parser.add_argument("--json", action="store_true", help="print the findings as a JSON list")
    parser.add_argument("--no-cache", action="store_true", help="measure every image again")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help=(
        "change a threshold (repeatable): " + ", ".join(DoctorSettings.model_fields)))
    return parser


def settings_of(args: argparse.Namespace) -> DoctorSettings:
    """The thresholds `--set` and `--no-cache` ask for; a UserError naming `--set` when one is wrong."""
    from pydantic import ValidationError

    from lora_core.errors import UserError

    try:
        values = dict(item.split("=", 1) for item in args.set if "=" in item)
        return DoctorSettings.model_validate({"cache": not args.no_cache, **values})
    except ValidationError as error:
        first = error.errors()[0]
        name = ".".join(map(str, first["loc"])) or "settings"
        raise UserError(f"--set {name}: {first['msg']} (got {str(first.get('input'))[:80]!r})", field="set") from None


def checks_of(args: argparse.Namespace) -> list[tuple[str, Target | None]]:
    """Each folder to examine with what it is checked against: DATASET, then a config's further concepts'."""
    trigger = [word.strip() for word in (args.trigger or "").split(",") if word.strip()]
    if not args.config:
        return [(args.dataset, Target(trigger_words=trigger) if trigger else None)]
    from lora_core import concepts
    from lora_core.configfile import load_config

    config = load_config(args.config)  # its held-out images are taken from DATASET
    if trigger:
        config = config.model_copy(update={"trigger_words": trigger})
    target = target_from_config(config.model_copy(update={"dataset_path": args.dataset}))
    others = concepts.doctor_configs(config)  # every further concept's folder, and the class images'
    return [(args.dataset, target), *((str(folder), target_from_config(other)) for folder, other in others)]


def main(argv: list[str]) -> int:
    """The findings as text (or `--json`) on stdout; the exit status 0, 1 with findings, 2 when not checked."""
    return report(parser().parse_args(argv))


def report(args: argparse.Namespace) -> int:
    from lora_core.errors import UserError

    try:
        settings = settings_of(args)
        results = [examine(folder, target, settings) for folder, target in checks_of(args)]
    except (UserError, OSError) as error:
        print(f"doctor: {error}", file=sys.stderr)
        return 2
    print(_json(results) if args.json else "\n\n".join(format_text(result) for result in results))
    return 1 if any(result.findings for result in results) else 0


def _json(results: list[Result]) -> str:
    """One folder: its findings as a list (as always); several (a config's concepts): {folder: findings}."""
    if len(results) == 1:
        return results[0].to_json()
    return json.dumps({result.folder: [finding.to_dict() for finding in result.findings] for result in results},
                      indent=1, ensure_ascii=False)
