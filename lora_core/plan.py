"""The run plan: everything decided about a run before any weights load.

`make_plan(config, num_processes)` scans the dataset and assigns its buckets, resolves the base model and its
family, checks the resolution, the output folder and the tracker, fixes the run length, the device and the
precision, and decides gradient checkpointing and the base's storage (memory.py: the fields, or memory_mode
auto's pick from the memory estimate). Training starts from the plan
(`training.setup`), and `--validate-only` prints `plan_report(config)`. Both walk the one list CHECKS, in its
order: the plan stops at the first problem (its UserError), the report files every problem under its field and
goes on with the checks that do not build on a failed one.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch

from lora_core import (
    buckets,
    checkpoint,
    components,
    concepts,
    dataset,
    distributed,
    families,
    hardware,
    holdout,
    masks,
    memory,
    models,
    tracking,
)
from lora_core.config import DEFAULT_STEPS, ConfigError, TrainConfig
from lora_core.errors import UserError


class OutputFolderError(UserError, OSError):
    field = "output_path"


MIN_RESOLUTION = 64  # below this a latent is a few pixels across; no model here is made for it


class ResolutionError(UserError):
    field = "resolution"


class DeviceError(UserError, RuntimeError):
    field = "device"


class RunLength(NamedTuple):
    steps: int  # optimizer steps
    decided_by: Literal["steps", "epochs", "default"]


def run_length(config: TrainConfig, batches_per_epoch: int) -> RunLength:
    """The run's optimizer steps, and which setting decided them: `steps` when given, else `epochs` passes
    over the data (`batches_per_epoch` global batches each), else DEFAULT_STEPS."""
    if config.steps is not None:
        return RunLength(config.steps, "steps")
    if config.epochs is not None:
        return RunLength(max(1, config.epochs * math.ceil(batches_per_epoch / config.gradient_accumulation_steps)),
                         "epochs")
    return RunLength(DEFAULT_STEPS, "default")


def unbucketed_batches_per_epoch(config: TrainConfig, num_images: int, num_processes: int,
                                 num_entries: int | None = None) -> int:
    """Global batches in an epoch before buckets are known: the images times `repeats` (or `num_entries`, the
    concepts' entries, concepts.entry_images) in full batches."""
    entries = num_images * config.repeats if num_entries is None else num_entries
    return math.ceil(entries / (config.batch_size * num_processes))


@dataclass
class RunPlan:
    config: TrainConfig
    num_processes: int
    resume: bool
    dataset: dataset.DatasetReport
    assigned: list[buckets.Bucket]  # each image's bucket, in dataset order
    source: models.ModelSource
    info: models.ModelInfo
    batches_per_epoch: int
    length: RunLength
    device: torch.device
    precision: str  # accelerate's mixed-precision mode: no | fp16 | bf16
    gradient_checkpointing: bool
    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))  # for the LoRA's metadata
    clock_start: float = field(default_factory=time.perf_counter)  # the run's total_time counts from here
    skipped_states: list[str] = field(default_factory=list)  # damaged states resume passed over, in words
    held_out: dataset.DatasetReport | None = None  # the validation loss's images (holdout.split); never trained
    base_quantization: str = "none"  # how the frozen base is stored: the field's, or memory_mode auto's choice
    offload_blocks: int = 0  # transformer blocks kept on the CPU during the step (0 where it changes nothing)
    memory_summary: str = ""  # memory_mode auto's choice in words, for the started event and the report
    _sizes: models.ModelSizes | None = field(default=None, repr=False)

    @property
    def family(self) -> families.Family:
        return families.get(self.info.family)

    @functools.cached_property
    def settings(self) -> dict:
        """What the run's options decide for the family's encoders and denoiser call (Family.run_settings); asked
        every step, decided once."""
        return self.family.run_settings(self.config, self.info)

    @property
    def total_steps(self) -> int:
        return self.length.steps

    @property
    def output(self) -> Path:
        return Path(self.config.output_path)

    def sizes(self) -> models.ModelSizes:
        """Parameter counts from the model's configs (built on the meta device once, when first asked)."""
        if self._sizes is None:
            self._sizes = models.model_sizes(self.source, self.info)
        return self._sizes

    def memory_estimate(self) -> hardware.MemoryEstimate:
        return hardware.estimate_memory(self.config, self.sizes(), self.precision, self.gradient_checkpointing,
                                        self.base_quantization, self.offload_blocks)


# ----------------------------------------------------------------------------------------------------
# the checks, each raising a UserError that names its field


def check_output_folder(output_path: str, keep: bool = True) -> str | None:
    """None when the folder can be created and written, else the reason. Folders this made are removed
    again when it is refused, or when `keep` is False (--validate-only writes nothing)."""
    folder = Path(output_path)
    created = [parent for parent in (folder, *folder.parents) if not parent.exists()]
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
        reason = None
        if shutil.disk_usage(folder).free < 256 * 1024**2:
            reason = f"less than 256 MB free on the disk of {folder}; free space or choose another output_path"
    except OSError as error:
        reason = f"cannot write to {folder}: {error.strerror or error}; choose a writable output_path"
    if reason is not None or not keep:
        for made in created:  # deepest first
            with contextlib.suppress(OSError):
                made.rmdir()
    return reason


def output_folder(config: TrainConfig, keep: bool = True) -> None:
    if (problem := check_output_folder(config.output_path, keep)) is not None:
        raise OutputFolderError(problem)


def tracker(config: TrainConfig) -> None:
    if (reason := tracking.unavailable_reason(config)) is not None:
        raise tracking.TrackerUnavailable(reason)


def scan_dataset(config: TrainConfig) -> tuple[dataset.DatasetReport, dataset.DatasetReport | None]:
    """The training images, and the held-out ones for the validation loss (None when none are asked for)."""
    report = dataset.scan(config.dataset_path, config.trigger_words, config.trigger_placement)
    held_out = holdout.split(report, config)  # from dataset_path only
    report = concepts.add_concepts(report, config)
    masks.check_dataset(config, report)  # every concept's images
    return report, held_out


def base_model(config: TrainConfig, configs_only: bool = False) -> tuple[models.ModelSource, models.ModelInfo]:
    return components.resolve_base_model(config, configs_only)


def check_resolution(config: TrainConfig, info: models.ModelInfo) -> None:
    """The lower bound and the step come from the model: multiples of its pixel step, from 64 (or the step)."""
    multiple = info.pixel_multiple
    smallest = max(MIN_RESOLUTION, multiple)
    sizes = f"this {info.description} model takes multiples of {multiple} from {smallest}"
    if config.resolution < smallest:
        raise ResolutionError(f"resolution {config.resolution} is below {smallest}, the smallest size {sizes}; "
                              f"use {smallest} or more")
    if config.resolution % multiple:
        below = config.resolution // multiple * multiple
        raise ResolutionError(f"resolution {config.resolution} is not a multiple of {multiple}, which this "
                              f"{info.description} model needs; use {below if below >= smallest else ''}"
                              f"{' or ' if below >= smallest else ''}{below + multiple} ({sizes})")


def check_family_options(config: TrainConfig, info: models.ModelInfo) -> None:
    """The options the model's family cannot honour (min-SNR on a rectified-flow model, ...), each at its field."""
    problems = families.get(info.family).check_config(config)
    if problems:
        raise ConfigError(problems)


def device_and_precision(config: TrainConfig) -> tuple[torch.device, str]:
    try:
        device = hardware.pick_device(config)
        return device, hardware.resolve_precision(config, device)
    except RuntimeError as error:
        raise DeviceError(str(error)) from None


def process_device(device: torch.device) -> torch.device:
    """The device this process trains on: under a launcher, CUDA device LOCAL_RANK (as accelerate picks it)."""
    if device.type != "cuda":
        return device
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0") or 0))


def memory_choice(config: TrainConfig, device: torch.device, precision: str,
                  sizes: Callable[[], models.ModelSizes], processes: int = 1) -> memory.MemoryChoice:
    """Checkpointing and the base's storage, from the fields or (memory_mode auto) the device's free memory."""
    device = process_device(device)
    return memory.choose(config, precision, device, hardware.free_device_memory_gib(device), sizes, processes)


# ----------------------------------------------------------------------------------------------------
# the plan, and its report


@dataclass
class _Facts:
    """What the checks found so far: each check reads the facts of the checks it builds on and adds its own."""

    config: TrainConfig
    processes: int
    keep: bool = True  # the output folder stays; --validate-only writes nothing
    configs_only: bool = False
    resume: bool = False
    skipped_states: list[str] = field(default_factory=list)
    scanned: dataset.DatasetReport | None = None
    held_out: dataset.DatasetReport | None = None
    source: models.ModelSource | None = None
    info: models.ModelInfo | None = None
    assigned: list[buckets.Bucket] | None = None
    device: torch.device | None = None
    precision: str = "no"


def _states(facts: _Facts) -> None:
    output = Path(facts.config.output_path)
    checkpoint.clean_leftovers(output)  # what killed writes left behind
    if facts.resume:
        checkpoint.latest_state(output, facts.skipped_states)  # fail before any model loads
    else:
        checkpoint.refuse_other_runs_states(output)


def _scan(facts: _Facts) -> None:
    facts.scanned, facts.held_out = scan_dataset(facts.config)


def _model(facts: _Facts) -> None:
    facts.source, facts.info = base_model(facts.config, facts.configs_only)


def _buckets(facts: _Facts) -> None:
    facts.assigned = concepts.assign_buckets(facts.scanned, facts.config, facts.info.pixel_multiple)


def _device(facts: _Facts) -> None:
    facts.device, facts.precision = device_and_precision(facts.config)


class Check(NamedTuple):
    name: str
    field: str  # where the report files a problem whose error names no field
    run: Callable[[_Facts], None]
    after: tuple[str, ...] = ()  # the checks it builds on: the report skips it when one of them did not pass
    training_only: bool = False  # what only training does (the folder's leftovers and states), not the report


CHECKS = (  # cheap ones first: training fails before the dataset is scanned or the model read
    Check("output", "output_path", lambda facts: output_folder(facts.config, facts.keep)),
    Check("states", "output_path", _states, ("output",), training_only=True),
    Check("tracker", "log_with", lambda facts: tracker(facts.config)),
    Check("dataset", "dataset_path", _scan),
    Check("model", "base_model", _model),
    Check("resolution", "base_model", lambda facts: check_resolution(facts.config, facts.info), ("model",)),
    Check("concept_resolutions", "concepts", lambda facts: concepts.check_resolutions(
        facts.config, lambda changed: check_resolution(changed, facts.info)), ("model",)),
    Check("family_options", "base_model", lambda facts: check_family_options(facts.config, facts.info), ("model",)),
    Check("buckets", "base_model", _buckets, ("dataset", "model", "resolution", "concept_resolutions",
                                                "family_options")),
    Check("device", "device", _device),
    Check("memory_device", "base_quantization",
          lambda facts: memory.check_device(facts.config, facts.device.type, facts.processes), ("device",)),
)


def make_plan(config: TrainConfig, num_processes: int = 1, *, resume: bool = False,
              configs_only: bool = False) -> RunPlan:
    """The plan training runs (the first problem raises its UserError). `configs_only`: read only the model's
    configs (a hub model is not downloaded), as --validate-only does."""
    clock_start, started_at = time.perf_counter(), datetime.now(UTC)
    facts = _Facts(config, num_processes, configs_only=configs_only, resume=resume)
    for check in CHECKS:
        check.run(facts)
    per_epoch = buckets.batches_per_epoch(concepts.entry_buckets(facts.scanned, config, facts.assigned),
                                          config.batch_size * num_processes)
    plan = RunPlan(config, num_processes, resume, facts.scanned, facts.assigned, facts.source, facts.info,
                   per_epoch, run_length(config, per_epoch), facts.device, facts.precision,
                   gradient_checkpointing=False, started_at=started_at, clock_start=clock_start,
                   skipped_states=facts.skipped_states, held_out=facts.held_out)
    choice = memory_choice(config, facts.device, facts.precision, plan.sizes, num_processes)
    plan.gradient_checkpointing, plan.base_quantization = choice.gradient_checkpointing, choice.base_quantization
    plan.offload_blocks, plan.memory_summary = choice.offload_blocks, choice.summary
    return plan


class _Check:
    """`with _Check(report, field):` a UserError raised inside becomes a problem in the report, under the
    error's field (or `default_field`), and the report is no longer ok."""

    def __init__(self, report: dict[str, Any], default_field: str):
        self.report, self.default_field, self.failed = report, default_field, False

    def __enter__(self) -> _Check:
        return self

    def __exit__(self, kind, error, traceback) -> bool:
        if not isinstance(error, UserError):
            return False
        self.failed = True
        self.report["ok"] = False
        self.report["problems"].append({"field": getattr(error, "field", None) or self.default_field,
                                        "message": str(error)})
        return True


def plan_report(config: TrainConfig, num_processes: int | None = None) -> dict[str, Any]:
    """The JSON-ready `--validate-only` report of the plan: `ok` is False when training would fail, with each
    problem under its field. `num_processes`: the devices the run will use; by default the launcher's count."""
    processes = num_processes or distributed.world_size()
    report: dict[str, Any] = {"ok": True, "problems": [], "warnings": []}
    facts = _Facts(config, processes, keep=False, configs_only=True)
    passed, failed = set(), set()
    for check in CHECKS:
        if check.training_only or not passed.issuperset(check.after):
            continue
        with _Check(report, check.field) as checking:
            check.run(facts)
        (failed if checking.failed else passed).add(check.name)
    _found_report(report, config, facts)
    if "device" not in passed:
        return report
    _device_report(report, config, facts.device, facts.precision, processes)
    if "model" in passed and not failed & {"resolution", "family_options", "buckets"}:
        with _Check(report, "offload_blocks"):
            _memory_report(report, config, facts.source, facts.info, facts.device, facts.precision)
    return report


def _found_report(report: dict[str, Any], config: TrainConfig, facts: _Facts) -> None:
    """The dataset, the run length and the model, as far as their checks found them."""
    if (scanned := facts.scanned) is not None:
        report["dataset"] = {"num_images": len(scanned.images), "num_captioned": scanned.captioned,
                             "refused": scanned.refused, "ignored": scanned.ignored,
                             "num_validation_images": len(facts.held_out.images) if facts.held_out else 0}
        report["dataset"]["concepts"] = concepts.counts(scanned, config)
        if facts.assigned is None:  # before the buckets are known: full batches of the entries
            per_epoch = unbucketed_batches_per_epoch(config, len(scanned.images), facts.processes,
                                                     len(concepts.entry_images(scanned, config)))
        else:  # the bucket table, and the length as the buckets make it
            report["dataset"]["buckets"] = scanned.buckets
            per_epoch = buckets.batches_per_epoch(concepts.entry_buckets(scanned, config, facts.assigned),
                                                  config.batch_size * facts.processes)
        report["total_steps"] = run_length(config, per_epoch).steps
    if (source := facts.source) is not None and facts.info is not None:
        report["model"] = {"source": source.kind, "family": facts.info.description,
                           "prediction_type": facts.info.prediction_type}
        if source.components:  # where a single file's missing parts come from (a hub id: its local copy)
            report["model"]["pipeline_components"] = source.components


def _device_report(report: dict[str, Any], config: TrainConfig, device: torch.device, precision: str,
                   processes: int) -> None:
    info_device = hardware.describe(device)
    report["device"] = {**info_device.to_dict(), "mixed_precision": precision}
    report["devices"] = {"available": info_device.count, "processes": processes,
                         "global_batch_size": config.batch_size * config.gradient_accumulation_steps * processes}
    if device.type == "cuda" and processes > info_device.count:
        report["warnings"].append(f"{processes} processes but {info_device.count} CUDA devices are visible; "
                                  "use one process per GPU")


def _memory_report(report: dict[str, Any], config: TrainConfig, source: models.ModelSource,
                   info: models.ModelInfo, device: torch.device, precision: str) -> None:
    sizes = models.model_sizes(source, info)
    choice = memory_choice(config, device, precision, lambda: sizes, report["devices"]["processes"])
    on, estimate = choice.gradient_checkpointing, choice.estimate
    report["memory_estimate"] = estimate.to_dict()
    if choice.summary:  # memory_mode auto: what it chose ("your GPU with 11.5 GiB free: fp8 base + ...")
        report["memory_mode"] = {"summary": choice.summary, "base_quantization": choice.base_quantization,
                                 "gradient_checkpointing": on, "offload_blocks": choice.offload_blocks,
                                 "fits": choice.fits}
    free = report["device"]["free_memory_gib"]
    if free is not None and estimate.total_gib > free:
        report["warnings"].append(f"the run needs about {estimate.total_gib} GiB but {free} GiB is free on "
                                  f"{report['device']['name']}; lower batch_size or resolution"
                                  + ("" if on else ", or set gradient_checkpointing to 'on'")
                                  + ("" if choice.base_quantization != "none" else ", or base_quantization 'fp8' "
                                     "(or memory_mode 'auto' to choose)"))
