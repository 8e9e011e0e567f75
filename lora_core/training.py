"""The training loop, top to bottom: setup -> cache -> fit -> export.

`train(config, emit, should_stop)` runs one job on the calling thread and reports through `emit`
(events.py). It is called by the worker (worker.py), never by the faces directly.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DataLoaderConfiguration, DistributedDataParallelKwargs, set_seed
from diffusers import DPMSolverMultistepScheduler

from lora_core import buckets, checkpoint, dataset, distributed, hardware, models, objective, optim
from lora_core.cache import Cache, build_cache, trained_text_encoder
from lora_core.compile import compile_for_run
from lora_core.config import TrainConfig, config_to_file_dict
from lora_core.events import Checkpoint, Complete, Event, Interrupted, Progress, Sample, Started
from lora_core.files import atomic_write, atomic_write_text
from lora_core.lora import (
    add_lora,
    add_text_encoder_lora,
    lora_file_contents,
    save_lora,
    tag_frequency,
    training_metadata,
)
from lora_core.preflight import OutputFolderError, check_output_folder


@dataclass
class TrainResult:
    final_path: Path | None
    step: int
    total_time: float
    interrupted: bool
    unet: torch.nn.Module  # the trained UNet with its adapter, for callers who keep working in memory
    text_encoders: list[torch.nn.Module] = field(default_factory=list)  # with train_text_encoder: theirs too


def total_steps_for(config: TrainConfig, num_images: int, num_processes: int = 1,
                    batches_per_epoch: int | None = None) -> int:
    """`steps` when the config gives it (or gives neither), otherwise `epochs` passes over the data.

    `batches_per_epoch`: global batches in an epoch as the buckets make them (each bucket's last one may be
    short); without it, the images times `repeats` in full batches."""
    if "steps" in config.given_fields or "epochs" not in config.given_fields:
        return config.steps
    if batches_per_epoch is None:
        batches_per_epoch = math.ceil(num_images * config.repeats / (config.batch_size * num_processes))
    return max(1, config.epochs * math.ceil(batches_per_epoch / config.gradient_accumulation_steps))


def check_resolution(config: TrainConfig, info: models.ModelInfo) -> None:
    multiple = info.pixel_multiple
    if config.resolution % multiple:
        raise ValueError(f"resolution {config.resolution} is not a multiple of {multiple}, which this "
                         f"{info.description} model needs; use {config.resolution // multiple * multiple} or "
                         f"{(config.resolution // multiple + 1) * multiple}")


# ----------------------------------------------------------------------------------------------------
# setup


class NonFiniteLossError(FloatingPointError):
    pass


def train(config: TrainConfig, emit: Callable[[Event], None], should_stop: Callable[[], bool],
          resume: bool = False) -> TrainResult:
    """Train one LoRA. With `resume`, continue from the newest complete state in output_path."""
    started_at, t0 = datetime.now(UTC), time.perf_counter()
    if (problem := check_output_folder(config.output_path)) is not None:
        raise OutputFolderError(problem)
    if resume:
        checkpoint.latest_state(Path(config.output_path))  # fail before any model loads
    report = dataset.scan(config.dataset_path, config.trigger_words, config.trigger_placement)
    source = models.resolve(config.base_model)
    info = models.inspect(source)
    check_resolution(config, info)
    assigned = dataset.assign_buckets(report, config, info.pixel_multiple)
    device = hardware.pick_device(config)
    precision = hardware.resolve_precision(config, device)
    AcceleratorState._reset_state()  # accelerate keeps one precision per process; a later job may want another
    # SDXL's first text encoder feeds its next-to-last layer only: its last layer's LoRA gets no gradient
    ddp = [DistributedDataParallelKwargs(find_unused_parameters=True)] if config.train_text_encoder else []
    accelerator = Accelerator(mixed_precision=precision, cpu=device.type == "cpu",
                              gradient_accumulation_steps=config.gradient_accumulation_steps,
                              dataloader_config=DataLoaderConfiguration(non_blocking=True), kwargs_handlers=ddp)
    main = accelerator.is_main_process
    stop_vote = distributed.StopVote(accelerator.num_processes)  # all processes stop after the same step
    set_seed(config.seed)
    if accelerator.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    output = Path(config.output_path)
    per_epoch = buckets.batches_per_epoch(assigned * config.repeats, config.batch_size * accelerator.num_processes)
    total_steps = total_steps_for(config, len(report.images), accelerator.num_processes, per_epoch)
    if main:
        resolved = config.model_copy(update={"steps": total_steps})
        atomic_write_text(output / "config.json", json.dumps(config_to_file_dict(resolved), indent=2) + "\n")

    pipeline = models.load_pipeline(source, info)
    info = models.with_loaded_prediction_type(info, pipeline)  # a single file's comes with its configs
    dtype = hardware.weight_dtype(precision)
    unet, vae = pipeline.unet, pipeline.vae
    for module in (unet, vae, *models.text_encoders(pipeline)):
        module.requires_grad_(False)
        module.eval()
    checkpointing = hardware.use_gradient_checkpointing(config, precision, hardware.free_device_memory_gib(
        accelerator.device), lambda: models.model_sizes(source, info))
    params = prepare_unet(unet, config, accelerator.device, dtype, checkpointing)

    cache = build_cache(config, pipeline, report, assigned, info, accelerator.device, dtype)
    if accelerator.device.type == "cuda":
        torch.cuda.empty_cache()  # hand back the one-off caching pass's blocks (the VAE in fp32) to other programs
    # the text encoders' LoRA (after the cache: it keeps them on the device, in `dtype`, when they train)
    trained_encoders = models.text_encoders(pipeline) if config.train_text_encoder else []
    text_params = [p for encoder in trained_encoders for p in add_text_encoder_lora(encoder, config)]
    for encoder in trained_encoders:
        encoder.train()
    batches = cache.batches(accelerator.num_processes)  # same-bucket batches, a function of (seed, epoch)
    loader = torch.utils.data.DataLoader(cache.keys(), batch_sampler=batches, collate_fn=cache.collate,
                                         pin_memory=device.type == "cuda",  # pinned + non_blocking: no sync
                                         generator=torch.Generator())  # else each epoch draws on the global RNG
    groups = [{"params": params, "lr": config.learning_rate}]
    if text_params:
        groups.append({"params": text_params, "lr": config.text_encoder_lr})
    optimizer = optim.make_optimizer(config, groups, accelerator.device)
    lr_scheduler = optim.make_lr_scheduler(config, optimizer, total_steps)
    unet, *wrapped_encoders, optimizer, loader = accelerator.prepare(unet, *trained_encoders, optimizer, loader)
    if wrapped_encoders:  # captions go through the wrapped encoders, so their gradients are averaged
        cache.encode_text = trained_text_encoder(pipeline, info.family, wrapped_encoders, accelerator.device, dtype)
    forward = compile_for_run(unet, config, total_steps, assigned, accelerator)  # samples, export: plain modules
    noise_scheduler = objective.noise_scheduler_for(pipeline.scheduler.config, config)
    num_timesteps = noise_scheduler.config.num_train_timesteps
    sample_noise = distributed.SampleNoise(config.seed, config.batch_size, accelerator.num_processes,
                                           accelerator.process_index, num_timesteps)
    lora_params = {name: p for name, p in accelerator.unwrap_model(unet).named_parameters() if p.requires_grad}
    for prefix, encoder in zip(("text_encoder.", "text_encoder_2."), trained_encoders, strict=False):
        lora_params.update({prefix + name: p for name, p in encoder.named_parameters() if p.requires_grad})
    step, epoch, batches_in_epoch = 0, 0, 0
    if resume:
        state = checkpoint.load_state(checkpoint.latest_state(output), config, lora_params, optimizer)
        lr_scheduler.load_state_dict(state.scheduler)
        step, epoch, batches_in_epoch = state.step, state.epoch, state.batches_in_epoch
        sample_noise.draws = state.noise_draws

    if main:
        emit(Started(total_steps=total_steps, num_images=len(report.images), device=str(accelerator.device),
                     mixed_precision=precision, model_family=info.description, output_path=str(output),
                     num_processes=accelerator.num_processes, resumed_from_step=step if resume else None,
                     gradient_checkpointing=checkpointing, compile_unet=forward.scope,
                     cuda_graphs=forward.cuda_graphs, compile_reason=forward.reason))
    metadata = dict(family=info.family, prediction_type=info.prediction_type,
                    num_images=len(report.images) * config.repeats,  # as sd-scripts counts them
                    precision=precision, started_at=started_at,
                    tag_frequency=tag_frequency([r.caption for r in report.images]),
                    base_sha256=models.weights_sha256(source) if main else None)

    def export(path: Path, step: int, epoch: int) -> Path:
        state, format_header = lora_file_contents(accelerator.unwrap_model(unet), config, trained_encoders,
                                                  info.family)
        header = training_metadata(config, steps=step, epochs=epoch, **metadata) | format_header
        return save_lora(path, state, header)

    def save_checkpoint(step: int, epoch: int, batches_in_epoch: int, lora_file: bool = True) -> Path | None:
        """The LoRA file users load, then the full state that --resume continues from."""
        path = export(output / "checkpoints" / f"lora_step_{step}.safetensors", step, epoch) if lora_file else None
        state = checkpoint.TrainerState(step, epoch, batches_in_epoch, sample_noise.draws,
                                        lr_scheduler.state_dict(), config.model_dump(mode="json"))
        checkpoint.save_state(output, step, state, lora_params, optimizer, config.keep_checkpoints)
        return path

    # ------------------------------------------------------------------------------------------------
    # fit

    window_loss, window_count, nonfinite_in_a_row = torch.zeros((), device=accelerator.device), 0, 0
    clock = StepClock(total_steps)
    while step < total_steps:
        loader.set_epoch(epoch)
        batches.set_epoch(epoch)  # under several processes accelerate's wrapper does not pass it on
        for batch_index, batch in enumerate(loader):
            if batch_index < batches_in_epoch:  # resuming mid-epoch: these were trained before the stop
                continue
            batches_in_epoch += 1
            with accelerator.accumulate(unet, *wrapped_encoders):
                latents, conditioning = cache.batch(batch, vae, accelerator.device)
                noise, timesteps, offsets = sample_noise(latents)  # the same per sample however batches split
                noise = objective.offset_noise(noise, offsets, config.noise_offset)
                noisy = noise_scheduler.add_noise(latents, noise, timesteps)
                target = objective.target_for(noise_scheduler, latents, noise, timesteps, info.prediction_type)
                with accelerator.autocast():
                    prediction = forward(noisy, timesteps, **conditioning).sample
                loss = objective.diffusion_loss(prediction, target, noise_scheduler, timesteps,
                                                info.prediction_type, config.min_snr_gamma)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    skipped = optimizer_step(accelerator, optimizer, params + text_params, config, precision, loss)
                    optimizer.zero_grad(set_to_none=True)
            if not accelerator.sync_gradients:
                window_loss += loss.detach()
                window_count += 1
                continue
            if skipped:  # a non-finite loss or gradient: nothing was applied, and the step does not count
                nonfinite_in_a_row += 1
                window_loss.zero_()
                window_count = 0
                if nonfinite_in_a_row >= config.max_nonfinite_steps:
                    raise NonFiniteLossError(
                        f"the loss or gradients were NaN/inf for {nonfinite_in_a_row} steps in a row after step "
                        f"{step}; each was skipped and nothing broken was saved. Likely causes: fp16 overflow "
                        "(use mixed_precision 'bf16' or 'no'), a learning_rate too high, or a VAE run in fp16")
                continue
            nonfinite_in_a_row = 0
            window_loss += loss.detach()
            window_count += 1
            lr_scheduler.step()
            step += 1
            clock.tick(step)
            report_now = step % config.progress_steps == 0 or step == total_steps
            if report_now:  # every process joins the reduce; the main one reports the mean over all
                window_mean = accelerator.reduce(window_loss / window_count, reduction="mean")
                window_loss.zero_()
                window_count = 0
            if main and report_now:
                emit(Progress(step=step, total_steps=total_steps, loss=window_mean.item(), percent=round(100 * step /
                              total_steps, 2), lr=lr_scheduler.get_last_lr()[0], it_per_s=clock.rate,
                              eta_s=clock.eta(step), epoch=epoch))
            stopping = stop_vote(should_stop())
            if main and step < total_steps and step % config.checkpoint_steps == 0 and not stopping:
                path = save_checkpoint(step, epoch, batches_in_epoch)
                emit(Checkpoint(step=step, path=str(path)))
            if main and (step % config.validation_steps == 0 or step == total_steps) and not stopping:
                for image_path, prompt in make_samples(config, pipeline, accelerator.unwrap_model(unet), cache,
                                                       vae, accelerator.device, output, step):
                    emit(Sample(step=step, image_path=str(image_path), prompt=prompt))
                for module in (unet, *trained_encoders):
                    module.train()
            if stopping:
                path = None
                if main:
                    path = save_checkpoint(step, epoch, batches_in_epoch)
                    emit(Interrupted(step=step, message="stopped on request after finishing the current step; "
                                     "the LoRA so far is saved", checkpoint_path=str(path)))
                accelerator.wait_for_everyone()  # the others exit once the main process has saved
                return TrainResult(path, step, time.perf_counter() - t0, True, accelerator.unwrap_model(unet),
                                   trained_encoders)
            if step >= total_steps:
                break
        else:  # the epoch ran out (not a break at the last step)
            epoch, batches_in_epoch = epoch + 1, 0

    # ------------------------------------------------------------------------------------------------
    # export

    final_path = None
    accelerator.wait_for_everyone()
    if main:
        save_checkpoint(step, epoch, batches_in_epoch, lora_file=False)  # so --resume with more steps goes on
        final_path = export(output / "lora_final.safetensors", step, max(epoch, 1))
        emit(Complete(final_path=str(final_path), total_time=round(time.perf_counter() - t0, 3), step=step))
    return TrainResult(final_path, step, time.perf_counter() - t0, False, accelerator.unwrap_model(unet),
                       trained_encoders)


# ----------------------------------------------------------------------------------------------------
# helpers


def optimizer_step(accelerator: Accelerator, optimizer, params, config: TrainConfig, precision: str,
                   loss: torch.Tensor) -> bool:
    """Clip, then step unless the loss or gradients are not finite; True when the step was skipped.

    The gradient norm is taken after the processes' gradients are averaged, so every process decides the
    same. This reads one number back from the device per optimizer step. Under fp16 the grad scaler skips
    overflowing steps itself (and lowers its scale); only a non-finite loss counts as a fault there.
    """
    norm = accelerator.clip_grad_norm_(params, config.max_grad_norm or math.inf)
    if precision == "fp16":
        optimizer.step()
        # Each process sees only its own loss: agree (max over processes), or their step counts would part.
        bad = accelerator.reduce(torch.isfinite(loss.detach()).logical_not().float(), reduction="sum")
        return bool(bad.item() > 0)
    if not bool(torch.isfinite(norm).item()):
        return True
    optimizer.step()
    return False


def prepare_unet(unet, config: TrainConfig, device: torch.device, dtype: torch.dtype,
                 checkpointing: bool) -> list[torch.nn.Parameter]:
    """The UNet as the fit loop wants it: frozen weights in `dtype` on the device, an fp32 LoRA (returned),
    channels-last convolutions on CUDA, checkpointing if so decided, in train mode. The benchmark's floor uses
    it too."""
    unet.to(device, dtype=dtype)
    params = add_lora(unet, config)
    if checkpointing:
        unet.enable_gradient_checkpointing()
    if device.type == "cuda":  # NHWC for cuDNN's tensor-core convolutions; on the CPU it measured 4 % slower
        unet.to(memory_format=torch.channels_last)
    unet.train()
    return params


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


@torch.no_grad()
def make_samples(config: TrainConfig, pipeline, unet, cache: Cache, vae, device: torch.device, output: Path,
                 step: int) -> list[tuple[Path, str]]:
    """Render each sample prompt with the current LoRA, with a fixed seed so that steps compare."""
    vae_device, vae_dtype = vae.device, vae.dtype
    vae.to(device, dtype=torch.float32)
    for module in (unet, *models.text_encoders(pipeline)):  # the trained LoRA without its dropout
        module.eval()
    sampler = DPMSolverMultistepScheduler.from_config(pipeline.scheduler.config)
    pipe = type(pipeline)(**{**pipeline.components, "unet": unet, "vae": vae, "scheduler": sampler})
    pipe.set_progress_bar_config(disable=True)
    results = []
    for index, (prompt, kwargs) in enumerate(cache.sample_conditioning):
        generator = torch.Generator(device).manual_seed(config.seed + index)
        with torch.autocast(device.type, dtype=unet.dtype, enabled=device.type == "cuda"):
            latents = pipe(**kwargs, num_inference_steps=config.sample_inference_steps,
                           guidance_scale=config.sample_guidance_scale, height=config.resolution,
                           width=config.resolution, generator=generator, output_type="latent").images
        image = _decode(vae, latents)
        path = output / "samples" / (f"step_{step}.png" if index == 0 else f"step_{step}_{index}.png")
        atomic_write(path, lambda tmp, image=image: image.save(tmp, format="PNG"))
        results.append((path, prompt))
    vae.to(vae_device, dtype=vae_dtype)
    return results


def _decode(vae, latents: torch.Tensor):
    from PIL import Image

    shift = getattr(vae.config, "shift_factor", None) or 0.0
    latents = latents.to(vae.device, torch.float32) / vae.config.scaling_factor + shift
    pixels = vae.decode(latents).sample[0]
    array = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array)
