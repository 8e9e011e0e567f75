"""Typed events: the only thing callers of the engine see.

Each event serialises to one JSON object with `type` and an ISO-8601 `timestamp`.
`complete`, `error` and `interrupted` are terminal: exactly one of them ends every run; a grid or sweep
(grid.py) ends with `grid_complete`, `error` or `interrupted`; captioning a dataset (captioner.py) ends with
`caption_complete`, `error` or `interrupted`; scoring a run (scoring.py) with `score_complete`, `error` or
`interrupted`; the dataset doctor as a job (doctor_job.py) with `doctor_complete`, `error` or `interrupted`.
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

log = logging.getLogger("lora_core")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


@dataclass(kw_only=True)
class Event:
    type: ClassVar[str] = "event"
    terminal: ClassVar[bool] = False
    timestamp: str = field(default_factory=_now)

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type, **asdict(self)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), allow_nan=False, default=str)


@dataclass(kw_only=True)
class Started(Event):
    type: ClassVar[str] = "started"
    total_steps: int
    num_images: int
    device: str
    mixed_precision: str
    model_family: str
    output_path: str
    num_processes: int = 1  # data-parallel processes (devices) training together
    resumed_from_step: int | None = None  # set when the run continues from a saved training state
    gradient_checkpointing: bool = False  # as decided for this run (the config may say 'auto')
    compile_unet: str = "off"  # as decided: off, regional (the repeated blocks) or whole
    cuda_graphs: bool = False  # the compiled blocks captured as CUDA graphs
    compile_reason: str = ""  # why: the setting, or auto's estimate; a cuda_graphs fallback says why
    base_quantization: str = "none"  # how the frozen base is stored (the field's, or memory_mode auto's choice)
    offload_blocks: int = 0  # transformer blocks kept on the CPU during the step (as decided; 0 on the CPU)
    memory_choice: str = ""  # memory_mode auto's choice in words ("your GPU with 11.5 GiB free: fp8 base + ...")


@dataclass(kw_only=True)
class Progress(Event):
    type: ClassVar[str] = "progress"
    step: int
    total_steps: int
    loss: float | None
    percent: float
    lr: float
    it_per_s: float
    eta_s: float
    epoch: int


@dataclass(kw_only=True)
class Checkpoint(Event):
    type: ClassVar[str] = "checkpoint"
    step: int
    path: str


@dataclass(kw_only=True)
class Sample(Event):
    type: ClassVar[str] = "sample"
    step: int
    image_path: str
    prompt: str


@dataclass(kw_only=True)
class Complete(Event):
    type: ClassVar[str] = "complete"
    terminal: ClassVar[bool] = True
    final_path: str
    total_time: float
    step: int


@dataclass(kw_only=True)
class Error(Event):
    type: ClassVar[str] = "error"
    terminal: ClassVar[bool] = True
    message: str
    step: int | None = None
    field: str | None = None


@dataclass(kw_only=True)
class Interrupted(Event):
    type: ClassVar[str] = "interrupted"
    terminal: ClassVar[bool] = True
    step: int
    message: str
    checkpoint_path: str | None


@dataclass(kw_only=True)
class Dataset(Event):
    """What the scan made of the dataset folder, before training starts: the refused files with reasons."""

    type: ClassVar[str] = "dataset"
    num_images: int
    num_captioned: int
    refused: list[dict[str, str]]  # {"file", "reason"}, at most MAX_LISTED of them
    num_refused: int
    ignored: list[str]  # files that are neither images nor captions, at most MAX_LISTED
    num_ignored: int
    warnings: list[str]  # e.g. a caption cut to the length a text encoder can use
    num_validation_images: int = 0  # held out for the validation loss; never trained (not in num_images)
    validation_files: list[str] = field(default_factory=list)  # their file names, at most MAX_LISTED
    # The dataset doctor's findings (doctor.Finding.to_dict: kind, files, message, why, fix, severity, actions),
    # most severe first, at most MAX_LISTED; empty when the doctor was not run.
    findings: list[dict[str, Any]] = field(default_factory=list)
    # Per concept (concepts.counts): name, folder, trigger_words, regularization, num_images, repeats,
    # entries_per_epoch, resolution; dataset_path's first, the regularisation folder's last.
    concepts: list[dict[str, Any]] = field(default_factory=list)


@dataclass(kw_only=True)
class ConceptBleed(Event):
    """At the end of a run with several concepts (lora_core/bleed.py): how far each concept's trigger words draw
    another concept. Each row: concept, from_concept, trigger_words (from_concept's), loss_own, loss_bare,
    loss_with_other, bleed (0 or below: none, 1: as much as the concept's own trigger words; None: not
    measurable); loss_bare is the reference caption's (a made-up word in place of the trigger words)."""

    type: ClassVar[str] = "concept_bleed"
    step: int
    rows: list[dict[str, Any]]


@dataclass(kw_only=True)
class ValidationLoss(Event):
    """The denoising loss on the held-out images (validation.py): fixed noise and timesteps, the same every
    time, so values compare across steps and runs."""

    type: ClassVar[str] = "validation"
    step: int
    loss: float
    ema_loss: float | None = None  # with ema_decay: the same loss with the EMA weights (ema.py)


@dataclass(kw_only=True)
class RunWarning(Event):
    """Something went wrong that the run survives (a sample image that could not be saved)."""

    type: ClassVar[str] = "warning"
    message: str
    step: int | None = None
    field: str | None = None


MAX_LISTED = 100


def dataset_event(report, held_out=None, findings: list[dict[str, Any]] | None = None,
                  concepts: list[dict[str, Any]] | None = None) -> Dataset:
    """The `dataset` event of a dataset.DatasetReport and the held-out one, if any (long lists cut to
    MAX_LISTED; the counts are whole). A separate validation folder's refused files are warnings. `findings`:
    the dataset doctor's (doctor.plan_findings)."""
    warnings = list(report.warnings)
    held = held_out.images if held_out is not None else []
    if held_out is not None and held_out.folder != report.folder:
        warnings += [f"validation_dataset_path: {item['file']} refused ({item['reason']})"
                     for item in held_out.refused] + [f"validation_dataset_path: {w}" for w in held_out.warnings]
    return Dataset(num_images=len(report.images), num_captioned=report.captioned, refused=report.refused[:MAX_LISTED],
                   num_refused=len(report.refused), ignored=report.ignored[:MAX_LISTED],
                   num_ignored=len(report.ignored), warnings=warnings[:MAX_LISTED], num_validation_images=len(held),
                   validation_files=[Path(record.path).name for record in held[:MAX_LISTED]],
                   findings=list(findings or [])[:MAX_LISTED], concepts=list(concepts or []))


@dataclass(kw_only=True)
class ValidationReport(Event):
    """`--validate-only`'s one line: `ok`, each problem as {field, message}, warnings, and what was checked
    (`details`: dataset, model, device, devices, memory_estimate, total_steps), written at the top level."""

    type: ClassVar[str] = "validation_report"
    terminal: ClassVar[bool] = True  # the only line of a validate-only run
    ok: bool
    problems: list[dict[str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        return {**data.pop("details"), **data}

    @classmethod
    def from_report(cls, report: dict[str, Any]) -> ValidationReport:
        """From preflight's report dict (`ok`, `problems`, `warnings` and the rest)."""
        rest = {key: value for key, value in report.items() if key not in ("ok", "problems", "warnings", "type",
                                                                          "timestamp")}
        return cls(ok=bool(report.get("ok")), problems=list(report.get("problems", [])),
                   warnings=list(report.get("warnings", [])), details=rest,
                   **({"timestamp": report["timestamp"]} if "timestamp" in report else {}))


@dataclass(kw_only=True)
class GridProgress(Event):
    """One cell of a checkpoint x prompt grid or a strength sweep is drawn (grid.py)."""

    type: ClassVar[str] = "grid_progress"
    kind: str  # grid | sweep
    done: int
    total: int
    row: str
    column: str


@dataclass(kw_only=True)
class GridComplete(Event):
    type: ClassVar[str] = "grid_complete"
    terminal: ClassVar[bool] = True
    kind: str
    path: str
    width: int
    height: int
    total_time: float


@dataclass(kw_only=True)
class CaptionStarted(Event):
    """Captioning a dataset folder begins (captioner.py): what will be captioned, before the model loads."""

    type: ClassVar[str] = "caption_started"
    folder: str
    model: str  # hub id or local folder
    device: str
    total: int  # images to caption
    kept: int  # images whose existing caption stays (no overwrite)
    num_refused: int  # images refused before loading the model (links out of the folder)


@dataclass(kw_only=True)
class CaptionProgress(Event):
    """One image of a captioning job is done: its caption written, or the image refused with the reason."""

    type: ClassVar[str] = "caption_progress"
    done: int
    total: int
    file: str  # the image's file name
    status: str  # written | refused | kept (a caption appeared while the model worked, and stays)
    caption: str  # what was written or kept (at most 500 characters), or why the image was refused


@dataclass(kw_only=True)
class CaptionComplete(Event):
    type: ClassVar[str] = "caption_complete"
    terminal: ClassVar[bool] = True
    folder: str
    written: int
    kept: int
    refused: list[dict[str, str]]  # {"file", "reason"}, at most MAX_LISTED
    num_refused: int
    device: str
    total_time: float


@dataclass(kw_only=True)
class Overfitting(Event):
    """The LoRA is past its best: `reason` heldout_rising, bleed_over_concept or early_stop (README's table)."""

    type: ClassVar[str] = "overfitting"
    step: int | None
    reason: str
    message: str
    best_step: int | None = None  # the step of the lowest held-out loss
    best_path: str | None = None


@dataclass(kw_only=True)
class ScoreProgress(Event):
    """One LoRA (at one strength) of a run is scored (scoring.py)."""

    type: ClassVar[str] = "score_progress"
    done: int
    total: int
    label: str  # "step 60", "final (step 120)", "step 60 at 0.5"


@dataclass(kw_only=True)
class ScoreComplete(Event):
    type: ClassVar[str] = "score_complete"
    terminal: ClassVar[bool] = True
    path: str  # scores.json
    recommendation: str  # the recommended checkpoint and strength with the reason, in words
    total_time: float


@dataclass(kw_only=True)
class DoctorProgress(Event):
    """The dataset doctor as a job (doctor_job.py) has measured `done` of a folder's `total` images."""

    type: ClassVar[str] = "doctor_progress"
    done: int
    total: int
    folder: str


@dataclass(kw_only=True)
class DoctorComplete(Event):
    """The doctor's findings are written: `path` holds them whole (what `doctor --json` prints), most severe
    first; the event carries their counts only, so that a large dataset's findings never make one event line
    longer than a reader takes (runrecord.MAX_LINE_BYTES) nor slow every poll of the job."""

    type: ClassVar[str] = "doctor_complete"
    terminal: ClassVar[bool] = True
    path: str  # findings.json in the job folder (or --out)
    folders: list[str]  # the dataset folder, then a config's further concept folders
    num_images: int
    num_findings: int
    severities: dict[str, int]  # findings per severity: error, warning, info
    total_time: float


EVENT_TYPES: dict[str, type[Event]] = {cls.type: cls for cls in (Started, Dataset, Progress, Checkpoint,
                                                                  Sample, ValidationLoss, RunWarning, Complete, Error,
                                                                  Interrupted, ValidationReport, GridProgress,
                                                                  GridComplete, CaptionStarted, CaptionProgress,
                                                                  CaptionComplete, ConceptBleed, Overfitting,
                                                                  ScoreProgress, ScoreComplete, DoctorProgress,
                                                                  DoctorComplete)}


def event_from_dict(data: dict[str, Any]) -> Event:
    """The inverse of `Event.to_dict`: the typed event of one JSON object (keys it does not know are dropped)."""
    cls = EVENT_TYPES.get(data.get("type")) if isinstance(data, dict) else None
    if cls is None:
        raise ValueError(f"not an event: {data!r:.200}")
    if cls is ValidationReport:
        return ValidationReport.from_report(data)
    allowed = _field_types(cls)
    values = {key: value for key, value in data.items() if key in allowed}
    wrong = _mistyped(allowed, values)
    if wrong:
        raise ValueError(f"a {cls.type} event whose {wrong} is not of its type: {data!r:.200}")
    try:
        return cls(**values)
    except TypeError as error:
        raise ValueError(f"a {cls.type} event without its fields ({error}): {data!r:.200}") from None


_TYPES: dict[str, tuple[type, ...]] = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,),
                                       "list": (list,), "dict": (dict,), "None": (type(None),)}


@functools.cache
def _field_types(cls: type) -> dict[str, tuple[type, ...]]:
    """Each field of an event class and the types its value may have (from its annotation)."""
    return {item.name: tuple(kind for name in str(item.type).split("|")
                             for kind in _TYPES.get(name.split("[")[0].strip(), (object,))) for item in fields(cls)}


def _mistyped(allowed: dict[str, tuple[type, ...]], values: dict[str, Any]) -> str | None:
    """The first field of `values` whose value is not of the type its event class declares (a file is data:
    an `Infinity` or a text step must not reach the code that folds steps), else None."""
    for name, value in values.items():
        kinds = allowed[name]
        if not isinstance(value, kinds) or (value is True or value is False) and bool not in kinds:
            return name
        if type(value) is int and abs(value) > 2**53:
            return name
    return None


def parse_event(line: str) -> Event:
    """One JSON line of the CLI's stdout or of events.jsonl as a typed event; ValueError if it is not one."""
    try:
        data = json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(f"not JSON ({error.msg}): {line[:200]!r}") from None
    return event_from_dict(data)
