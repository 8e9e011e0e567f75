"""Caption a dataset folder's images with a vision-language model, through transformers.

    python -m lora_core caption DATASET [--model ID|FOLDER] [--overwrite] [--prefix TEXT] [--max-new-tokens N]
                                        [--batch-size N] [--num-beams N] [--prompt TEXT] [--device auto|cpu|cuda]

The model (lora_core/caption_model.py) is any image-to-text model `AutoModelForImageTextToText` loads, from a hub
id (downloaded once, then cached) or a local folder: Florence-2 by default (`florence-community/Florence-2-large`,
asked `<MORE_DETAILED_CAPTION>`), BLIP, or a chat model through its chat template.

Each caption goes into `<image stem>.txt` beside its image, written atomically (lora_core.files), after the prefix
(the trigger words). Without `--overwrite`, images that have a non-empty caption keep it. Nothing is written
outside the folder: an image or a caption that is a link leading out of it is refused, with the reason, and so
is an image training would refuse (damaged, too large, not a regular file).

stdout carries JSON-lines events: `caption_started`, `caption_progress` per image, then exactly one of
`caption_complete`, `error` or `interrupted` (Stop, SIGTERM or SIGINT between batches: the batch being generated
is dropped, every caption already written is whole).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lora_core import dataset
from lora_core.caption_model import DEFAULT_MODEL, Captioner, CaptionError, pick_device
from lora_core.events import MAX_LISTED, CaptionComplete, CaptionProgress, CaptionStarted, Error, Event, Interrupted
from lora_core.files import DiskFullError, atomic_write_text

# Processors resize to far less (Florence-2: 768 px); a smaller copy keeps a batch of 40 Mpx photos out of memory.
MAX_SIDE = 1536
SHOWN_CAPTION = 500  # characters of a caption a progress event carries


class CaptionStopped(Exception):
    """Stopped on request between batches; the captions written so far are whole."""

    def __init__(self, done: int, total: int):
        super().__init__(f"stopped on request after {done} of {total} images; the captions written are whole, "
                         "the rest are unchanged")
        self.done = done


class CaptionOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    model: str = Field(DEFAULT_MODEL, min_length=1, description="hub id or local folder of the captioning model")
    overwrite: bool = Field(False, description="replace existing captions (default: only images without one)")
    prefix: str = Field("", max_length=500, description="put first in every caption (the trigger words)")
    max_new_tokens: int = Field(160, ge=1, le=1024, description="the longest caption, in the model's tokens")
    batch_size: int = Field(4, ge=1, le=64)
    num_beams: int = Field(3, ge=1, le=8, description="beam search width (1: greedy, fastest)")
    prompt: str | None = Field(None, max_length=2000, description="the task or instruction (default: by model)")
    device: Literal["auto", "cpu", "cuda"] = "auto"


@dataclass
class FolderPlan:
    """What captioning a folder will do, before any model is loaded."""

    folder: Path
    todo: list[Path] = field(default_factory=list)  # images to caption, in the dataset scan's order
    kept: list[str] = field(default_factory=list)  # images whose caption stays (no --overwrite)
    refused: list[dict[str, str]] = field(default_factory=list)  # {"file", "reason"}


def parse_options(options: CaptionOptions | dict | None) -> CaptionOptions:
    if isinstance(options, CaptionOptions):
        return options
    try:
        return CaptionOptions.model_validate(options or {})
    except ValidationError as error:
        first = error.errors()[0]
        name = str(first["loc"][0]) if first["loc"] else "options"
        raise CaptionError(f"{name}: {first['msg']}", field=name) from None


def plan_folder(folder: str | Path, overwrite: bool = False) -> FolderPlan:
    """The images of `folder` to caption; links out of it and captions that are not plain files refused."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CaptionError(f"{folder} is not a folder; give a dataset folder of images")
    plan = FolderPlan(folder.resolve())
    excluded = dataset.read_excluded(folder)
    for path in sorted(folder.iterdir()):
        if (path.name.startswith(".") or path.suffix.lower() not in dataset.IMAGE_SUFFIXES or path.name in excluded
                or path.is_dir()):  # as training's scan: hidden, excluded and folders are not the dataset's
            continue
        problem = _unsafe(path, plan.folder)
        if problem:
            plan.refused.append({"file": path.name, "reason": problem})
        elif not overwrite and _caption_text(path.with_suffix(".txt")):
            plan.kept.append(path.name)
        else:
            plan.todo.append(path)
    return plan


def _unsafe(image: Path, folder: Path) -> str | None:
    """Why the caption of `image` must not be written, or None."""
    try:
        dataset._inside_folder(image, folder)
    except ValueError as error:  # "a symbolic link loop", "symbolic link that points outside ..."
        return f"the image is a {str(error).removeprefix('a ')}"
    caption = image.with_suffix(".txt")
    if caption.is_symlink():  # replacing a user's link, or writing through it, is never what they meant
        return "its caption file is a symbolic link; replace it with a plain .txt file"
    if os.path.lexists(caption) and not caption.is_file():
        return "its caption path is not a regular file"
    return None


def _caption_text(path: Path) -> str:
    if not path.is_file():
        return ""
    try:
        with dataset.open_regular(path) as handle:
            return handle.read(dataset.MAX_CAPTION_FILE_BYTES).decode("utf-8-sig", errors="replace").strip()
    except ValueError:
        return ""


def with_prefix(prefix: str, caption: str) -> str:
    """The prefix first (once), then the model's caption, whitespace collapsed and cut as training would."""
    caption, prefix = " ".join(caption.split()), " ".join(prefix.split())
    if prefix and caption.lower().startswith(prefix.lower()):
        caption = caption[len(prefix):].lstrip(" ,")
    text = f"{prefix}, {caption}" if prefix and caption else prefix or caption
    return dataset.limit_caption(text)[0]


class _BatchDropped(Exception):
    """Stop came during a batch's generation: none of its captions is written."""


@dataclass
class CaptionResult:
    written: list[str]
    kept: list[str]
    refused: list[dict[str, str]]
    device: str


def caption_folder(folder: str | Path, options: CaptionOptions | dict | None = None,
                   emit: Callable[[Event], None] | None = None, should_stop: Callable[[], bool] | None = None,
                   captioner: Captioner | None = None) -> CaptionResult:
    """Caption the images of `folder` as `options` say; `captioner`: a loaded model to reuse."""
    options = parse_options(options)
    emit = emit or (lambda event: None)
    plan = plan_folder(folder, options.overwrite)
    if not (plan.todo or plan.kept or plan.refused):
        raise CaptionError(f"no image in {folder} (supported: {', '.join(sorted(dataset.IMAGE_SUFFIXES))})")
    device = str(pick_device(options.device)) if captioner is None else str(captioner.device)
    emit(CaptionStarted(folder=str(plan.folder), model=options.model, device=device, total=len(plan.todo),
                        kept=len(plan.kept), num_refused=len(plan.refused)))
    result = CaptionResult([], plan.kept, list(plan.refused), device)
    if not plan.todo:
        return result
    if captioner is None:
        captioner = Captioner(options.model, options.device, options.prompt)
    done, total = 0, len(plan.todo)
    for start in range(0, total, options.batch_size):
        if should_stop is not None and should_stop():
            raise CaptionStopped(done, total)
        batch = plan.todo[start:start + options.batch_size]
        try:
            for path, status, text in _caption_batch(captioner, batch, options, should_stop, result):
                done += 1
                emit(CaptionProgress(done=done, total=total, file=path.name, status=status,
                                     caption=text[:SHOWN_CAPTION]))
        except _BatchDropped:
            raise CaptionStopped(done, total) from None
    return result


def _caption_batch(captioner: Captioner, batch: list[Path], options: CaptionOptions,
                   should_stop: Callable[[], bool] | None, result: CaptionResult):
    """Caption one batch and write its files; yields (image, status, caption or reason) for each image."""
    images, readable = [], []
    for path in batch:
        try:
            image = dataset.open_image(path)
        except ValueError as error:
            result.refused.append({"file": path.name, "reason": str(error)})
            yield path, "refused", str(error)
            continue
        image.thumbnail((MAX_SIDE, MAX_SIDE))
        images.append(image)
        readable.append(path)
    if not images:
        return
    captions = captioner.caption(images, options.max_new_tokens, options.num_beams, should_stop)
    if not captions:  # Stop during generation: nothing of this batch is written
        raise _BatchDropped
    for path, caption in zip(readable, captions, strict=True):
        if not caption:
            reason = "the model gave an empty caption; nothing was written"
            result.refused.append({"file": path.name, "reason": reason})
            yield path, "refused", reason
            continue
        if not options.overwrite and (own := _caption_text(path.with_suffix(".txt"))):
            # written while the model worked (the caption editor, another program): a person's words win
            result.kept.append(path.name)
            yield path, "kept", own
            continue
        text = with_prefix(options.prefix, caption)
        atomic_write_text(path.with_suffix(".txt"), text)
        result.written.append(path.name)
        yield path, "written", text


def run_job(folder: str | Path, options: CaptionOptions | dict | None, emit: Callable[[Event], None],
            should_stop: Callable[[], bool] | None = None, captioner: Captioner | None = None) -> Event:
    """Caption a folder, reporting through `emit`, which gets exactly one terminal event (returned)."""
    from lora_core.job import tool_outcome

    started = time.perf_counter()

    def caption() -> Event:
        result = caption_folder(folder, options, emit, should_stop, captioner)
        return CaptionComplete(folder=str(Path(folder).resolve()), written=len(result.written),
                               kept=len(result.kept), refused=result.refused[:MAX_LISTED],
                               num_refused=len(result.refused), device=result.device,
                               total_time=round(time.perf_counter() - started, 3))

    event = tool_outcome(caption, {
        CaptionStopped: lambda stopped: Interrupted(step=stopped.done, message=str(stopped), checkpoint_path=None),
        DiskFullError: lambda error: Error(
            message=f"the disk is full: writing {error.path.name} in {error.path.parent} failed; free space on that "
                    "disk and caption again (the captions written are kept)", field="dataset_path")})
    emit(event)
    return event


def parse_args(argv: list[str]) -> tuple[str, dict[str, Any]]:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m lora_core caption", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", help="the dataset folder (its images; captions are written beside them)")
    parser.add_argument("--model", help=f"hub id or local folder (default {DEFAULT_MODEL})")
    parser.add_argument("--overwrite", action="store_true", help="replace existing captions too")
    parser.add_argument("--prefix", help="put first in every caption: the trigger words")
    parser.add_argument("--max-new-tokens", type=int, help="the longest caption in tokens (default 160)")
    parser.add_argument("--batch-size", type=int, help="images a batch (default 4)")
    parser.add_argument("--num-beams", type=int, help="beam search width (default 3; 1 is fastest)")
    parser.add_argument("--prompt", help="the task or instruction (default: the model's own, see above)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], help="default auto: the GPU when there is one")
    args = parser.parse_args(argv)
    # (`is`, not `in`: 0 == False, and --batch-size 0 must reach the validation that refuses it)
    options = {key: value for key, value in vars(args).items()
               if key != "dataset" and value is not None and value is not False}
    return args.dataset, options


def command_line(folder: str | Path, options: CaptionOptions | dict | None = None) -> list[str]:
    """`caption DATASET --option ...` for `options` (those that differ from the defaults): what a job runs,
    e.g. studio.launcher.JobProcess.start(job_folder, tool_command(command_line(folder, options)))."""
    options = parse_options(options)
    argv = ["caption", str(folder)]
    for name, value in options.model_dump(exclude_defaults=True).items():
        flag = "--" + name.replace("_", "-")
        argv.append(flag if value is True else f"{flag}={value}")  # `=`: a prefix may start with "-"
    return argv


def main(argv: list[str]) -> int:
    """`python -m lora_core caption DATASET ...`: events on stdout; 0 when every image was captioned or kept,
    1 on an error or when some images were refused, 130/143 when stopped by SIGINT/SIGTERM."""
    from lora_core.job import run_command

    folder, options = parse_args(argv)
    return run_command(lambda emit, should_stop: run_job(folder, options, emit, should_stop),
                       lambda event: int(bool(event.num_refused)) if isinstance(event, CaptionComplete) else None)
