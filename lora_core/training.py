"""The training loop, in litgpt's shape: plan -> setup -> fit -> export.

`train(config, emit, should_stop)` runs one job on the calling thread and reports through `emit` (events.py):
`plan.make_plan` decides everything that needs no weights, `setup(plan)` (setup.py) builds the `Run`,
`fit(run, emit, should_stop)` loops over the batches calling `training_step` and then each periodic action
(`maybe_report`, `maybe_checkpoint`, `maybe_sample`, `maybe_validate`), and `finish` exports the LoRA. A new
periodic action is one more `maybe_...` call in `fit`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lora_core import (
    bleed,
    checkpoint,
    concepts,
    dataset,
    distributed,
    doctor,
    ema,
    handover,
    masks,
    objective,
    samples,
)
from lora_core.batches import Batch
from lora_core.config import TrainConfig
from lora_core.events import (
    Checkpoint,
    Complete,
    Event,
    Interrupted,
    Progress,
    RunWarning,
    Sample,
    Started,
    ValidationLoss,
    dataset_event,
)
from lora_core.heldout_watch import BEST_FILE, HeldOutWatch
from lora_core.lora import save_lora, training_metadata
from lora_core.losses import pyramid_noise
from lora_core.optim import averaged_weights
from lora_core.plan import make_plan
from lora_core.setup import Run, prepare_unet, setup

__all__ = ["NonFiniteLossError", "Run", "TrainResult", "export_lora", "fit", "prepare_unet", "save_checkpoint",
           "setup", "train", "train_run", "training_step"]


@dataclass
class TrainResult:
    final_path: Path | None
    step: int
    total_time: float
    interrupted: bool
    unet: torch.nn.Module  # the trained UNet with its adapter, for callers who keep working in memory
    text_encoders: list[torch.nn.Module] = field(default_factory=list)  # with train_text_encoder: theirs too


class NonFiniteLossError(FloatingPointError):
    pass


def train(config: TrainConfig, emit: Callable[[Event], None], should_stop: Callable[[], bool],
          resume: bool = False) -> TrainResult:
    """Train one LoRA. With `resume`, continue from the newest complete state in output_path."""
    return train_run(setup(make_plan(config, distributed.world_size(), resume=resume)), emit, should_stop)


def train_run(run: Run, emit: Callable[[Event], None], should_stop: Callable[[], bool]) -> TrainResult:
    """A set-up run to its end: started, fit, then the final LoRA (or the checkpoint of a stop)."""
    emit_started(run, emit)
    if run.main:  # the reproducibility manifest, before the first step
        handover.run_started(run, emit)
    stopped = fit(run, emit, should_stop)
    path = run.stop_checkpoint if stopped else finish(run, emit)
    return TrainResult(path, run.step, time.perf_counter() - run.plan.clock_start, stopped, run.bare_unet,
                       run.text_encoders)


def emit_started(run: Run, emit: Callable[[Event], None]) -> None:
    if run.main:
        plan = run.plan
        emit(Started(total_steps=plan.total_steps, num_images=len(plan.dataset.images), device=str(run.device),
                     mixed_precision=plan.precision,
                     model_family=run.family.run_description(run.info, run.config), output_path=str(plan.output),
                     num_processes=run.accelerator.num_processes, resumed_from_step=run.step if plan.resume else None,
                     gradient_checkpointing=plan.gradient_checkpointing, compile_unet=run.forward.scope,
                     cuda_graphs=run.forward.cuda_graphs, compile_reason=run.forward.reason,
                     base_quantization=plan.base_quantization, offload_blocks=plan.offload_blocks,
                     memory_choice=plan.memory_summary))
        # images used, held out, captioned, refused, ignored, and what the dataset doctor finds in them
        emit(dataset_event(plan.dataset, plan.held_out, findings=doctor.plan_findings(plan),
                           concepts=concepts.counts(plan.dataset, plan.config)))
        dataset.warn_about(plan.dataset)
        for note in plan.skipped_states:
            emit(RunWarning(message=note, field="resume"))


# ----------------------------------------------------------------------------------------------------
# fit


def training_step(run: Run, batch: Batch) -> torch.Tensor:
    """One micro-batch of the family's objective, forward and backward; returns the loss."""
    latents = run.latents.latents(batch, run.device)
    inputs = {**run.conditioning(batch), **run.plan.settings}  # the family's call settings (FLUX's guidance)
    noise, levels, offsets = run.noise(latents)  # the same per sample however batches split
    noise = objective.offset_noise(noise, offsets, run.config.noise_offset)
    if run.config.multires_noise_iterations:  # after the offset, as sd-scripts (the flow families refuse it)
        noise = pyramid_noise(noise, run.noise.side_generator(latents.device),
                                     run.config.multires_noise_iterations, run.config.multires_noise_discount)

    def predict(noisy: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
        with run.accelerator.autocast():
            return run.family.predict(run.forward, noisy, levels, inputs)

    if run.preservation is not None:  # the class prompts' preservation loss, on the same noisy latents
        predict = run.preservation.wrap(run, batch, predict)
    pixel_weights = masks.loss_weights(batch, latents, run.config)  # None without mask_source
    sample_weights = concepts.sample_weights(run.layout.image_weights, batch.images, latents.device)
    loss = run.objective.loss(predict, latents, noise, levels, pixel_weights, sample_weights)  # as the held-out loss
    if run.preservation is not None:
        loss = loss + run.preservation.take_loss()
    run.accelerator.backward(loss)
    return loss


ACCUMULATING, SKIPPED, APPLIED = "accumulating", "skipped", "applied"


def micro_step(run: Run, batch: Batch) -> tuple[torch.Tensor, str]:
    """`training_step`, then the optimizer step at the end of an accumulation window; says which happened."""
    with run.accelerator.accumulate(run.unet, *run.wrapped_encoders):
        loss = training_step(run, batch)
        if not run.accelerator.sync_gradients:
            return loss, ACCUMULATING
        skipped = optimizer_step(run, loss)
        run.optimizer.zero_grad(set_to_none=True)
    return loss, SKIPPED if skipped else APPLIED


def fit(run: Run, emit: Callable[[Event], None], should_stop: Callable[[], bool]) -> bool:
    """Train up to the plan's total steps. True when stopped on request: a checkpoint is then saved, and its
    LoRA file is `run.stop_checkpoint`."""
    window, clock = LossWindow(run.device), StepClock(run.plan.total_steps)
    watch = HeldOutWatch(run.config)  # the overfitting warning and the early stop
    if run.step == 0:
        maybe_validate(run, emit, watch)  # the untrained model's held-out loss: where the curve starts
    while run.step < run.plan.total_steps:
        for batch in epoch_batches(run):
            loss, outcome = micro_step(run, batch)
            if outcome == ACCUMULATING:
                window.add(loss)
                continue
            if outcome == SKIPPED:  # a non-finite loss or gradient: nothing was applied, the step does not count
                window.reset()
                count_nonfinite(run)
                continue
            run.nonfinite_in_a_row = 0
            window.add(loss)
            run.lr_scheduler.step()
            run.step += 1
            if run.ema is not None:
                run.ema.update(run.lora_params, run.step)
            clock.tick(run.step)
            maybe_report(run, emit, window, clock)
            if run.stop_vote(should_stop()):  # all processes stop after the same step
                stop(run, emit)
                return True
            maybe_checkpoint(run, emit)
            if maybe_sample(run, emit, should_stop):  # a stop asked while drawing: no further step starts
                stop(run, emit)
                return True
            maybe_validate(run, emit, watch)
            if run.config.early_stop_patience and run.stop_vote(watch.stopping):  # every process ends here
                return False
            if run.step >= run.plan.total_steps:
                break
        else:  # the epoch ran out (not a break at the last step)
            run.epoch, run.batches_in_epoch = run.epoch + 1, 0
    return False


def epoch_batches(run: Run):
    """The current epoch's batches from where the run stands in it (a resumed run skips those it trained)."""
    run.loader.set_epoch(run.epoch)
    run.sampler.set_epoch(run.epoch)  # under several processes accelerate's wrapper does not pass it on
    for index, batch in enumerate(run.loader):
        if index < run.batches_in_epoch:
            continue
        run.batches_in_epoch += 1
        yield batch


def optimizer_step(run: Run, loss: torch.Tensor) -> bool:
    """Clip, then step unless the loss or gradients are not finite; True when the step was skipped.

    The gradient norm is taken after the processes' gradients are averaged, so every process decides the
    same. This reads one number back from the device per optimizer step. Under fp16 the grad scaler skips
    overflowing steps itself (and lowers its scale); only a non-finite loss counts as a fault there.
    """
    accelerator = run.accelerator
    norm = accelerator.clip_grad_norm_(run.params + run.text_params, run.config.max_grad_norm or math.inf)
    if run.plan.precision == "fp16":
        run.optimizer.step()
        # Each process sees only its own loss: agree (max over processes), or their step counts would part.
        bad = accelerator.reduce(torch.isfinite(loss.detach()).logical_not().float(), reduction="sum")
        return bool(bad.item() > 0)
    if not bool(torch.isfinite(norm).item()):
        return True
    run.optimizer.step()
    return False


def count_nonfinite(run: Run) -> None:
    run.nonfinite_in_a_row += 1
    if run.nonfinite_in_a_row >= run.config.max_nonfinite_steps:
        raise NonFiniteLossError(
            f"the loss or gradients were NaN/inf for {run.nonfinite_in_a_row} steps in a row after step "
            f"{run.step}; each was skipped and nothing broken was saved. Likely causes: fp16 overflow "
            "(use mixed_precision 'bf16' or 'no'), a learning_rate too high, or a VAE run in fp16")


# ----------------------------------------------------------------------------------------------------
# periodic actions, after each optimizer step


def maybe_report(run: Run, emit: Callable[[Event], None], window: LossWindow, clock: StepClock) -> None:
    total = run.plan.total_steps
    if run.step % run.config.progress_steps and run.step != total:
        return
    mean = window.take_mean(run.accelerator)  # every process joins the reduce; the main one reports
    if run.main:
        emit(Progress(step=run.step, total_steps=total, loss=mean.item(), percent=round(100 * run.step / total, 2),
                      lr=run.lr_scheduler.get_last_lr()[0], it_per_s=clock.rate, eta_s=clock.eta(run.step),
                      epoch=run.epoch))


def maybe_checkpoint(run: Run, emit: Callable[[Event], None]) -> None:
    if run.main and run.step < run.plan.total_steps and run.step % run.config.checkpoint_steps == 0:
        emit(Checkpoint(step=run.step, path=str(save_checkpoint(run))))


def maybe_sample(run: Run, emit: Callable[[Event], None], should_stop: Callable[[], bool] = lambda: False) -> bool:
    """Draw the step's samples (the main process), checking for a stop between denoising steps. True on every
    process when a stop came while drawing (before the last step): the run stops now, after this step."""
    if run.step % run.config.validation_steps and run.step != run.plan.total_steps:
        return False  # every process decides this alike, so all of them vote below or none does
    stopped = run.main and _draw_samples(run, emit, should_stop if run.step < run.plan.total_steps else None)
    return run.stop_vote(stopped)


def _draw_samples(run: Run, emit: Callable[[Event], None], should_stop: Callable[[], bool] | None) -> bool:
    stopped_while_drawing = False
    try:  # a sample that cannot be saved is not worth the run: the checkpoints decide that
        with averaged_weights(run.config, run.optimizer), ema.for_samples(run):  # schedule-free's average, EMA's
            drawn = samples.make_samples(run.config, run.family, run.pipeline, run.bare_unet, run.sample_inputs,
                                         run.pipeline.vae, run.device, run.plan.output, run.step, should_stop)
    except samples.DrawingStopped as stopped:
        drawn, stopped_while_drawing = stopped.drawn, True
    except OSError as error:
        drawn = []
        emit(RunWarning(message=f"the sample images of step {run.step} could not be saved: {error}", step=run.step,
                        field="output_path"))
    for image_path, prompt in drawn:
        emit(Sample(step=run.step, image_path=str(image_path), prompt=prompt))
    for module in (run.unet, *run.text_encoders):
        module.train()
    return stopped_while_drawing


def maybe_validate(run: Run, emit: Callable[[Event], None], watch: HeldOutWatch | None = None) -> None:
    """The held-out images' loss before the first step, every validation_loss_steps (0: every validation_steps)
    and at the end; `watch` warns of overfitting and keeps the best LoRA for early stop."""
    every = run.config.validation_loss_steps or run.config.validation_steps
    if run.held_out is None or (run.step % every and run.step != run.plan.total_steps):
        return
    with averaged_weights(run.config, run.optimizer):
        loss = run.held_out.loss(run)
    ema_loss = ema.held_out_loss(run)
    for module in (run.unet, *run.text_encoders):
        module.train()
    if math.isfinite(loss):
        emit(ValidationLoss(step=run.step, loss=loss, ema_loss=ema_loss))
        if watch is not None:
            best_path = run.plan.output / BEST_FILE
            lowest, events = watch.add(run.step, loss, str(best_path))
            if lowest and run.config.early_stop_patience:
                export_lora(run, best_path)
            for event in events:
                emit(event)
    else:
        emit(RunWarning(message=f"the validation loss of step {run.step} is not finite ({loss}); training goes on",
                        step=run.step))


def stop(run: Run, emit: Callable[[Event], None]) -> None:
    if run.main:
        run.stop_checkpoint = save_checkpoint(run)
        emit(Interrupted(step=run.step, message="stopped on request after finishing the current step; the LoRA so "
                         "far is saved", checkpoint_path=str(run.stop_checkpoint)))
    run.accelerator.wait_for_everyone()  # the others exit once the main process has saved


# ----------------------------------------------------------------------------------------------------
# saving


def export_lora(run: Run, path: Path, epochs: int | None = None, companions: bool = False,
                extra: dict[str, str] | None = None) -> Path:
    """Write the LoRA file users load (the family names its tensors), with the training metadata (and `extra`
    fields: which weights an EMA run's file holds); with `companions`, also the family's other layouts beside it
    (`<name>.<layout>.safetensors`: SD 3's for diffusers, which reads none of the names ComfyUI and Forge read)."""
    with averaged_weights(run.config, run.optimizer):  # a schedule-free optimizer's average is the LoRA
        state, format_header = run.family.lora_file_contents(run.bare_unet, run.config, run.text_encoders)
        companion = run.family.companion_files(run.bare_unet, run.config, run.text_encoders) if companions else {}
        # copies: on the CPU a file's fp32 tensors may be the weights themselves, which the block's end resets
        state = {key: tensor.clone() for key, tensor in state.items()}
        companion = {layout: ({key: t.clone() for key, t in other.items()}, other_header)
                     for layout, (other, other_header) in companion.items()}
    header = training_metadata(run.config, steps=run.step, epochs=run.epoch if epochs is None else epochs,
                               **run.metadata)
    header |= masks.metadata(run.config) | concepts.metadata(run.plan.dataset, run.config) | (extra or {})
    for layout, (other, other_header) in companion.items():
        save_lora(path.with_name(f"{path.stem}.{layout}.safetensors"), other, header | other_header)
    return save_lora(path, state, header | format_header)


def save_checkpoint(run: Run, lora_file: bool = True) -> Path | None:
    """The LoRA file users load (unless not `lora_file`), then the full state that --resume continues from."""
    output = run.plan.output
    with checkpoint.naming_last_good(output):  # a full disk ends the run, naming what can be resumed
        path = export_lora(run, output / "checkpoints" / f"lora_step_{run.step}.safetensors",
                           extra=ema.metadata(run.config, run.ema, "raw")) if lora_file else None
        if path is not None and run.ema is not None:
            ema.export_checkpoint(run, path, export_lora)
        state = checkpoint.TrainerState(run.step, run.epoch, run.batches_in_epoch, run.noise.draws,
                                        run.lr_scheduler.state_dict(), run.config.model_dump(mode="json"))
        checkpoint.save_state(output, run.step, state, run.lora_params, run.optimizer, run.config.keep_checkpoints,
                              extra={ema.STATE_FILE: run.ema.state_tensors()} if run.ema is not None else None)
    return path


def finish(run: Run, emit: Callable[[Event], None]) -> Path | None:
    """The end of a complete run: the last state (so --resume with more steps goes on), then the final LoRA."""
    run.accelerator.wait_for_everyone()
    if not run.main:
        return None
    bleed.maybe_measure(run, emit)  # several concepts: does one's trigger draw another? (the report shows it)
    save_checkpoint(run, lora_file=False)
    with checkpoint.naming_last_good(run.plan.output):
        final_path = (ema.export_final(run, run.plan.output, export_lora, max(run.epoch, 1)) if run.ema is not None
                      else export_lora(run, run.plan.output / "lora_final.safetensors", epochs=max(run.epoch, 1),
                                       companions=True))
    handover.run_finished(run, final_path, emit)  # the manifest completed, the ComfyUI workflow
    emit(Complete(final_path=str(final_path), total_time=round(time.perf_counter() - run.plan.clock_start, 3),
                  step=run.step))
    return final_path


# ----------------------------------------------------------------------------------------------------
# meters


class LossWindow:
    """The losses since the last progress report, summed on the device (read back only when reported)."""

    def __init__(self, device: torch.device):
        self.total, self.count = torch.zeros((), device=device), 0

    def add(self, loss: torch.Tensor) -> None:
        self.total += loss.detach()
        self.count += 1

    def reset(self) -> None:
        self.total.zero_()
        self.count = 0

    def take_mean(self, accelerator) -> torch.Tensor:
        mean = accelerator.reduce(self.total / self.count, reduction="mean")
        self.reset()
        return mean


class StepClock:
    """it/s and ETA, measured from the end of the first step so that warm-up does not distort them."""

    def __init__(self, total_steps: int):
        self.total = total_steps
        self.first: tuple[int, float] | None = None
        self.rate = 0.0

    def tick(self, step: int) -> None:
        now = time.perf_counter()
        if self.first is None:
            self.first = (step, now)
        elif now > self.first[1]:
            self.rate = round((step - self.first[0]) / (now - self.first[1]), 4)

    def eta(self, step: int) -> float:
        return round((self.total - step) / self.rate, 1) if self.rate > 0 else -1.0
