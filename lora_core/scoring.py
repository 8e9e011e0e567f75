"""Score every saved LoRA of a run: held-out loss, concept strength, likeness and bleed (defined in scores.py),
at strength 1 for every checkpoint, early stop's lora_best.safetensors and the final LoRA, and at the sweep's
strengths for the best ones. The figures, the recommended checkpoint and strength and the warnings go to
RUN/scores.json (written atomically).

Cheap and deterministic by construction: the base model is loaded once (drawing.Renderer, as the grid does);
every LoRA is judged on the same things: SEEDS for each of at most MAX_PROMPTS trigger prompts (the run's
sample prompts that hold a trigger word, else the trigger words) and the same prompts with the trigger words
taken out (the bleed), each drawn in SCORE_STEPS sampler steps at the run's resolution (at most MAX_SIZE px);
the held-out loss is validation.py's, whose noise and noise levels are drawn from each image's content alone.
Without held-out images it is measured on (at most MAX_LOSS_IMAGES of) the training images, and says so.

    python -m lora_core score RUN_FOLDER [--device auto|cpu|cuda]

stdout carries JSON-lines events (`score_progress` per LoRA and strength, then one `score_complete`, `error`
or `interrupted`).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict

from lora_core import buckets, conditioning, dataset, holdout, latents, models, scores
from lora_core.config import TrainConfig
from lora_core.events import Error, Event, Interrupted, Overfitting, RunWarning, ScoreComplete, ScoreProgress
from lora_core.files import atomic_write_text
from lora_core.grid import (
    DEFAULT_SCALES,
    GridError,
    GridStopped,
    SavedLora,
    _Counter,
    _header_steps,
    _renderer_for,
    parse_options,
    read_run,
    saved_loras,
    spread,
)
from lora_core.heldout_watch import BEST_FILE

if TYPE_CHECKING:
    from lora_core.drawing import Renderer

SEEDS = (0, 1)
MAX_PROMPTS = 2
SCORE_STEPS = 8
MAX_SIZE = 512
MAX_TRAINING_PICTURES = 32  # the likeness's nearest training picture is sought among these
MAX_LOSS_IMAGES = 4
BEST_FOR_STRENGTH = 2  # the best LoRAs scored at the sweep's strengths too
STRENGTHS = tuple(scale for scale in DEFAULT_SCALES if 0 < scale < 1)  # 1 is the LoRA's own row
DIGITS = 6  # significant digits kept: the file says what the measurement can tell


class ScoreOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    device: Literal["auto", "cpu", "cuda"] | None = None


def prompt_sets(config: TrainConfig) -> tuple[list[str], list[str]]:
    """(trigger prompts, the same without their trigger words): what concept and bleed are measured on."""
    from lora_core.samples import prompts_of

    words = [word for word in config.trigger_words if word.strip()]
    trigger = [prompt for prompt in prompts_of(config) if any(word in prompt for word in words)] or \
        ([", ".join(words)] if words else list(prompts_of(config)))
    trigger = trigger[:MAX_PROMPTS]
    plain = []
    for prompt in trigger:
        for word in words:
            prompt = re.sub(rf"(?<!\w){re.escape(word)}(?!\w)", " ", prompt)
        plain.append(re.sub(r"\s+", " ", prompt).strip(" ,"))
    return trigger, plain


def _round(value: float) -> float:
    return float(f"{value:.{DIGITS}g}")


def _rms(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """rms(a - b) per row (the first dimension)."""
    return (a - b).pow(2).flatten(1).mean(1).sqrt()


def describe(drawn: torch.Tensor) -> torch.Tensor:
    """φ(z): each latent channel's mean and standard deviation over the picture, (N, 2C). What a picture holds
    (its colours, its contrast), not where: a drawing whose shape lands a few pixels aside, which a few sampler
    steps do for any small change of the model, is near the same point."""
    flat = drawn.float().flatten(2)
    return torch.cat([flat.mean(2), flat.std(2)], dim=1)


class Judge:
    """The fixed things every LoRA of a run is judged on, built once with the base model: its drawings, the
    training pictures' latents and the held-out loss's images."""

    def __init__(self, renderer: Renderer, config: TrainConfig):
        self.renderer, self.config = renderer, config
        self.size = min(config.resolution, MAX_SIZE)
        self.trigger, self.plain = prompt_sets(config)
        self.base_trigger, self.base_plain = self.draw(self.trigger), self.draw(self.plain)
        training, held_out = _pictures(config)
        self.training = self._encode(spread(training.images, MAX_TRAINING_PICTURES))
        self.loss_on = "held-out" if held_out is not None else "training"
        loss_images = held_out or dataset.DatasetReport(folder=training.folder,
                                                         images=spread(training.images, MAX_LOSS_IMAGES))
        self.loss_images = len(loss_images.images)
        self.validation, self.evaluated = _loss_set(renderer, config, loss_images)
        self.base_distance = self._nearest(self.base_trigger)

    @torch.no_grad()
    def draw(self, prompts: list[str]) -> torch.Tensor:
        """φ of the final latents of each prompt at each seed (rows: prompt-major), fp32 on the CPU."""
        return describe(torch.cat([self.renderer.draw_latents(prompt, seed, SCORE_STEPS, self.size).float().cpu()
                                   for prompt in prompts for seed in SEEDS]))

    @torch.no_grad()
    def _encode(self, records: list[dataset.ImageRecord]) -> torch.Tensor:
        vae, bucket = self.renderer.pipeline.vae, buckets.Bucket(self.size, self.size)
        pixels = []
        for record in records:
            cover = dataset.load_covering(record, bucket)
            top, left = (cover.shape[1] - self.size) // 2, (cover.shape[2] - self.size) // 2
            pixels.append(cover[:, top:top + self.size, left:left + self.size])
        shape = latents.latent_shape(vae, bucket)
        return describe(torch.cat([latents.encode(vae, image.unsqueeze(0).to(vae.device),
                                                  torch.zeros(1, *shape, device=vae.device)).cpu()
                                   for image in pixels]))

    def _nearest(self, drawn: torch.Tensor) -> torch.Tensor:
        """Each drawing's rms distance to its nearest training picture."""
        return torch.stack([_rms(self.training, row.unsqueeze(0)).min() for row in drawn])

    def figures(self, with_loss: bool) -> dict[str, float | None]:
        """The loaded LoRA's figures at its current strength."""
        drawn_trigger, drawn_plain = self.draw(self.trigger), self.draw(self.plain)
        likeness = 1 - self._nearest(drawn_trigger) / self.base_distance.clamp_min(1e-8)
        result = {"concept": _rms(drawn_trigger, self.base_trigger).mean().item(),
                  "likeness": likeness.mean().item(), "bleed": _rms(drawn_plain, self.base_plain).mean().item()}
        if with_loss:
            if self.config.train_text_encoder:  # the captions through the LoRA's text encoders
                self.validation.text = _captions(self.renderer, self.config, self.validation)
            result = {"heldout_loss": self.validation.loss(self.evaluated), **result}
        return {name: _round(value) for name, value in result.items()}


def _pictures(config: TrainConfig) -> tuple[dataset.DatasetReport, dataset.DatasetReport | None]:
    """(the training images, the held-out ones or None), as the run split them."""
    try:
        report = dataset.scan(config.dataset_path, config.trigger_words, config.trigger_placement)
        held_out = holdout.split(report, config)
    except dataset.DatasetError as error:
        raise GridError(f"the run's training pictures are needed for its scores: {error}",
                        field="dataset_path") from None
    except holdout.HeldOutError as error:
        raise GridError(str(error), field=error.field) from None
    if not report.images:
        raise GridError(f"dataset_path {config.dataset_path} holds no usable image now; the scores compare "
                        "with the training pictures", field="dataset_path")
    return report, held_out if held_out is not None and held_out.images else None


def _captions(renderer: Renderer, config: TrainConfig, validation) -> dict[str, torch.Tensor]:
    encode = conditioning.frozen_encoder(renderer.family, renderer.pipeline, renderer.device, renderer.dtype,
                                         renderer.family.run_settings(config, renderer.info))
    with torch.no_grad():
        return encode([image.caption for image in validation.images])


def _loss_set(renderer: Renderer, config: TrainConfig, report: dataset.DatasetReport):
    """validation.ValidationSet of `report`'s images, and what its `loss` reads of a run, served by the
    renderer's pipeline (whose modules carry the loaded LoRA)."""
    from lora_core.validation import ValidationSet

    family, pipeline = renderer.family, renderer.pipeline
    objective = family.objective(config, renderer.noise_schedule, renderer.info)
    validation = ValidationSet.build(config, family, report, renderer.info.pixel_multiple, pipeline.vae,
                                     renderer.device, renderer.dtype, objective.levels_from_uniform, None)
    validation.text = _captions(renderer, config, validation)
    evaluated = SimpleNamespace(  # the fields of setup.Run that ValidationSet.loss reads
        bare_unet=getattr(pipeline, family.denoiser), text_encoders=models.text_encoders(pipeline),
        device=renderer.device, objective=objective, pipeline=pipeline,
        plan=SimpleNamespace(settings=family.run_settings(config, renderer.info)),
        accelerator=SimpleNamespace(autocast=nullcontext))  # the modules are in their dtype already
    return validation, evaluated


class BestLora(SavedLora):
    """lora_best.safetensors (early stop: the LoRA of the lowest held-out loss the training saw)."""

    @property
    def label(self) -> str:
        return f"best (step {self.step})"


def scored_loras(folder: Path) -> list[SavedLora]:
    """The run's checkpoints by step, lora_best.safetensors at its step when it is no checkpoint's (the
    held-out loss is evaluated more often than checkpoints are saved, so early stop's best may fall between
    them, and it is scored like them), then the final LoRA. A best of step 0 is the untrained LoRA, the base
    model itself, which is no choice of checkpoint."""
    saved = saved_loras(folder)
    best = folder / BEST_FILE
    step = _header_steps(best) if best.is_file() else None
    if not step or step in {lora.step for lora in saved}:
        return saved
    return sorted([*saved, BestLora(step, best, False)], key=lambda lora: (lora.final, lora.step or 0))


def _entry(saved: SavedLora, folder: Path) -> dict[str, Any]:
    return {"label": saved.label, "step": saved.step, "final": saved.final,
            "file": saved.path.relative_to(folder).as_posix()}


def score_run(run_folder: str | Path, options: ScoreOptions | dict | None = None,
              emit: Callable[[Event], None] | None = None, should_stop: Callable[[], bool] | None = None,
              renderer: Renderer | None = None) -> dict[str, Any]:
    """Score every saved LoRA of a run and write RUN/scores.json; returns what it holds."""
    options = parse_options(ScoreOptions, options)
    folder, config = read_run(run_folder)
    saved = scored_loras(folder)
    if not saved:
        raise GridError(f"{folder} holds no LoRA yet (checkpoints/lora_step_*.safetensors or "
                        "lora_final.safetensors); score it once it has saved one")
    renderer = _renderer_for(config, options.device, renderer)
    counter = _Counter("score", len(saved) + min(BEST_FOR_STRENGTH, len(saved)) * len(STRENGTHS), None,
                       should_stop)
    judge = Judge(renderer, config)

    def done(label: str) -> None:
        counter.cell(None, label, "")
        if emit is not None:
            emit(ScoreProgress(done=counter.done, total=counter.total, label=label))

    data: dict[str, Any] = {"run": folder.name, "base_model": config.base_model, "settings": {
        "trigger_prompts": judge.trigger, "plain_prompts": judge.plain, "seeds": list(SEEDS),
        "sampler_steps": SCORE_STEPS, "size": judge.size, "guidance": config.sample_guidance_scale,
        "loss_on": judge.loss_on, "loss_images": judge.loss_images,
        "overfit_patience": config.overfit_patience}, "loras": [], "strengths": []}
    try:
        for lora in saved:
            renderer.load(lora.path)
            data["loras"].append({**_entry(lora, folder), **judge.figures(with_loss=True)})
            done(lora.label)
        for entry in scores.rank(data["loras"])[:BEST_FOR_STRENGTH]:
            renderer.load(folder / entry["file"])
            for scale in STRENGTHS:
                renderer.set_scale(scale)
                data["strengths"].append({**{k: entry[k] for k in ("label", "step", "final", "file")},
                                          "scale": scale, **judge.figures(with_loss=False)})
                done(f"{entry['label']} at {scale:g}")
    finally:
        renderer.unload()
    data["recommendation"], data["warnings"] = scores.recommend(data), scores.warnings(data)
    atomic_write_text(folder / scores.SCORES_FILE, json.dumps(data, indent=1) + "\n")
    return data


def run_job(run_folder: str | Path, options: ScoreOptions | dict | None, emit: Callable[[Event], None],
            should_stop: Callable[[], bool] | None = None, renderer: Renderer | None = None) -> Event:
    """Score a run, reporting through `emit`, which gets the bleed warning (an `overfitting` event) if any and
    exactly one terminal event (returned)."""
    from lora_core.job import tool_outcome

    started = time.perf_counter()

    def score() -> Event:
        data = score_run(run_folder, options, emit, should_stop, renderer)
        for warning in data["warnings"]:
            if warning["reason"] == "bleed_over_concept":
                emit(Overfitting(step=warning["step"], reason=warning["reason"], message=warning["message"]))
        return ScoreComplete(path=str(Path(run_folder) / scores.SCORES_FILE),
                             recommendation=data["recommendation"]["text"],
                             total_time=round(time.perf_counter() - started, 3))

    event = tool_outcome(score, {GridStopped: lambda stopped: Interrupted(
        step=stopped.done, message=f"stopped on request after {stopped.done} scorings; scores.json was not written",
        checkpoint_path=None)})
    emit(event)
    return event


def score_at_end(config: TrainConfig, emit: Callable[[Event], None], should_stop: Callable[[], bool]) -> None:
    """score_at_end (job.run_job's `at_end`): the finished run's scores into scores.json, its progress and
    warnings among the run's events after `complete`; a scoring that fails is a warning, never the outcome."""
    final = run_job(config.output_path, {}, lambda event: None if event.terminal else emit(event), should_stop)
    if isinstance(final, Error):
        emit(RunWarning(message=f"the run's scores could not be computed: {final.message}", field=final.field))


def main(argv: list[str]) -> int:
    """`python -m lora_core score RUN [--device D]`: events on stdout; 0 when scores.json was written."""
    import argparse

    from lora_core.job import tool_command

    parser = argparse.ArgumentParser(prog="python -m lora_core score", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="the run's output folder")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], help="default: the run's device")
    args = parser.parse_args(argv)
    options = {"device": args.device} if args.device else {}
    return tool_command(lambda emit, should_stop: run_job(args.run, options, emit, should_stop), ScoreComplete,
                        reads=args.run,  # held shared: training never rewrites what is scored
                        said=lambda event: event.recommendation)
