"""`setup(plan) -> Run`: everything the fit loop holds, built from the plan in small named steps.

The order matters where the global RNG is drawn (the LoRA inits, after `set_seed`) and where memory is
freed: the accelerator, the models (frozen), the UNet's adapter, the one-off encoding pass (sample prompts,
fixed captions, cached latents), the text encoders' adapters, the data loader, the optimizer, the
accelerator's wrappers, the per-step conditioning, the noise, and last the saved state of a resumed run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DataLoaderConfiguration, DistributedDataParallelKwargs, set_seed

from lora_core import (
    batches,
    checkpoint,
    concepts,
    conditioning,
    distributed,
    ema,
    families,
    hardware,
    latents,
    masks,
    models,
    objective,
    offload,
    optim,
    param_groups,
    preservation,
    quantize,
    samples,
    validation,
)
from lora_core.compile import compile_for_run
from lora_core.config import TrainConfig
from lora_core.configfile import config_to_file_dict
from lora_core.families import Family
from lora_core.families.base import TEXT_ENCODER_ATTRIBUTES
from lora_core.files import atomic_write_text
from lora_core.lora import tag_frequency
from lora_core.plan import RunPlan


@dataclass(kw_only=True)  # built with keywords: 22 values in a row would hide which is which
class Run:
    """What the fit loop works with. `unet` (the denoiser: a UNet or a transformer, as the family says) and
    `wrapped_encoders` are as the accelerator wrapped them; `bare_unet` and `text_encoders` are the plain modules
    (for samples, export and callers). `objective` draws the noise levels and computes the loss (objective.py)."""

    plan: RunPlan
    info: models.ModelInfo  # the plan's, with the loaded scheduler's prediction type
    accelerator: Accelerator
    pipeline: Any
    unet: torch.nn.Module
    forward: Any  # the denoiser the step calls: lora_core.compile.CompiledUNet (as compile_unet decides)
    text_encoders: list[torch.nn.Module]  # the trained ones (train_text_encoder), in the pipeline's order
    wrapped_encoders: list[torch.nn.Module]
    params: list[torch.nn.Parameter]  # the denoiser's LoRA
    text_params: list[torch.nn.Parameter]  # the text encoders' LoRA
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any
    loader: Any
    sampler: Any  # buckets.BucketBatchSampler: the data order
    layout: batches.Layout
    latents: latents.LatentSource
    conditioning: conditioning.ConditioningSource
    objective: objective.Objective
    noise: distributed.SampleNoise
    stop_vote: distributed.StopVote
    sample_inputs: list[tuple[str, dict[str, Any]]]
    metadata: dict[str, Any]  # the LoRA file's training metadata that does not change during the run
    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0  # micro-batches already consumed in `epoch`
    nonfinite_in_a_row: int = 0
    stop_checkpoint: Path | None = None  # the LoRA saved when stopped on request
    lora_params: dict[str, torch.nn.Parameter] = field(default_factory=dict)  # by name, for the saved state
    held_out: validation.ValidationSet | None = None  # the validation loss's images, on the main process only
    ema: ema.LoraEMA | None = None  # the LoRA weights' moving average (ema_decay), fp32
    preservation: preservation.Preservation | None = None  # preservation_prompt's class prompts and loss

    @property
    def config(self) -> TrainConfig:
        return self.plan.config

    @property
    def family(self) -> Family:
        return self.plan.family

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def bare_unet(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.unet)


def setup(plan: RunPlan) -> Run:
    config, family = plan.config, plan.family
    accelerator = make_accelerator(plan)
    device, dtype = accelerator.device, hardware.weight_dtype(plan.precision)
    set_seed(config.seed)
    if accelerator.is_main_process:
        write_resolved_config(plan)
    pipeline, info = load_frozen_models(plan)
    denoiser = getattr(pipeline, family.denoiser)
    run_objective = family.objective(config, pipeline.scheduler.config, info)
    # A quantised base is for a small card: the text encoders' one-off pass (T5-XXL is 9.5 GB in bf16) runs
    # before the denoiser reaches the device, so the two never share it. Otherwise the order is as it was.
    encoded_first = encode_text_once(plan, pipeline, device, dtype) if plan.base_quantization != "none" else None
    params = prepare_unet(denoiser, config, device, dtype, plan.gradient_checkpointing, family,
                          plan.base_quantization, plan.offload_blocks)
    layout = batches.Layout(config, plan.dataset, plan.assigned)
    sample_inputs, cached, held_out_text = encoded_first or encode_text_once(plan, pipeline, device, dtype)
    vae_dtype = torch.float32 if family.vae_fp16_overflows and dtype == torch.float16 else dtype
    latent_source = latents.make_latent_source(config, layout, pipeline.vae, device, dtype, vae_dtype)
    held_out = held_out_set(plan, pipeline, device, dtype, held_out_text, run_objective) \
        if accelerator.is_main_process else None
    if device.type == "cuda":
        torch.cuda.empty_cache()  # hand back the one-off encoding pass's blocks (the VAE in fp32) to other programs
    trained_encoders, text_params = add_text_encoder_adapters(plan, pipeline)
    sampler = batches.sampler(config, layout, accelerator.num_processes)
    loader = torch.utils.data.DataLoader(batches.Keys(len(layout.entry_buckets)), batch_sampler=sampler,
                                         collate_fn=batches.Collate(config, layout, latent_source,
                                                                    masks.make_source(config, layout)),
                                         pin_memory=device.type == "cuda",  # pinned + non_blocking: no sync
                                         generator=torch.Generator())  # else each epoch draws on the global RNG
    namer = family.unet_namer(denoiser.config) if family.unet_blocks else None  # block-wise rates' block names
    optimizer, lr_scheduler = make_optimizer(plan, params, text_params, device, [denoiser, *trained_encoders],
                                             namer)
    unet, *wrapped, optimizer, loader = accelerator.prepare(denoiser, *trained_encoders, optimizer, loader)
    # offloaded blocks swap their weights at every call, which a compiled block would recompile for
    compiled = (config.model_copy(update={"compile_unet": "off", "cuda_graphs": False}) if plan.offload_blocks
                else config)
    # the batch shapes come from the epoch's entries (each concept's repeats already in them)
    compiled = compiled.model_copy(update={"repeats": 1})
    entries = [plan.assigned[image] for image in layout.entry_images]
    run = Run(plan=plan, info=info, accelerator=accelerator, pipeline=pipeline, unet=unet,
              forward=compile_for_run(unet, compiled, plan.total_steps, entries, accelerator),
              text_encoders=trained_encoders, wrapped_encoders=wrapped, params=params, text_params=text_params,
              optimizer=optimizer, lr_scheduler=lr_scheduler, loader=loader, sampler=sampler, layout=layout,
              latents=latent_source,
              conditioning=cached or per_step_conditioning(plan, pipeline, wrapped, device, dtype),
              objective=run_objective, noise=make_noise(config, accelerator, run_objective),
              stop_vote=distributed.StopVote(accelerator.num_processes), sample_inputs=sample_inputs,
              metadata=lora_metadata(plan, info, accelerator.is_main_process), held_out=held_out)
    run.lora_params = named_lora_params(run)
    run.ema = ema.make(config, run.lora_params)  # from the initial weights; a resumed run's is restored below
    run.preservation = preservation.Preservation.build(plan, pipeline, device, dtype)
    if plan.resume:
        restore(run)
    return run


def make_accelerator(plan: RunPlan) -> Accelerator:
    config = plan.config
    AcceleratorState._reset_state()  # accelerate keeps one precision per process; a later job may want another
    # SDXL's first text encoder feeds its next-to-last layer only: its last layer's LoRA gets no gradient
    ddp = [DistributedDataParallelKwargs(find_unused_parameters=True)] if config.train_text_encoder else []
    accelerator = Accelerator(mixed_precision=plan.precision, cpu=plan.device.type == "cpu",
                              gradient_accumulation_steps=config.gradient_accumulation_steps,
                              dataloader_config=DataLoaderConfiguration(non_blocking=True), kwargs_handlers=ddp)
    if accelerator.num_processes != plan.num_processes:
        raise RuntimeError(f"the plan is for {plan.num_processes} processes but accelerate runs "
                           f"{accelerator.num_processes}")
    if accelerator.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return accelerator


def write_resolved_config(plan: RunPlan) -> None:
    """config.json in the output folder, with the run length the plan resolved."""
    resolved = plan.config.model_copy(update={"steps": plan.total_steps})
    atomic_write_text(plan.output / "config.json", json.dumps(config_to_file_dict(resolved), indent=2) + "\n")


def load_frozen_models(plan: RunPlan) -> tuple[Any, models.ModelInfo]:
    """The pipeline with every module frozen in eval mode, and the model info with the prediction type of the
    loaded scheduler (a single file's comes with its configs)."""
    pipeline = models.load_pipeline(plan.source, plan.info, plan.config)
    for module in (getattr(pipeline, plan.family.denoiser), pipeline.vae, *models.text_encoders(pipeline)):
        module.requires_grad_(False)
        module.eval()
    return pipeline, models.with_loaded_prediction_type(plan.info, pipeline)


def prepare_unet(unet, config: TrainConfig, device: torch.device, dtype: torch.dtype, checkpointing: bool,
                 family: Family | None = None, quantization: str = "none",
                 offloaded: int = 0) -> list[torch.nn.Parameter]:
    """The denoiser as the fit loop wants it: frozen weights in `dtype` (or stored in `quantization`,
    quantize.py) on the device, but for the first `offloaded` blocks', kept on the CPU between uses (offload.py),
    an fp32 LoRA (returned; the family adds it, SD's by default), channels-last convolutions on CUDA,
    checkpointing if so decided, in train mode. The benchmark's floor uses it too."""
    family = family or families.get("sd1")

    def add_adapter() -> list[torch.nn.Parameter]:
        return family.add_denoiser_adapter(unet, config)

    if checkpointing:  # before offloading, which needs it
        unet.enable_gradient_checkpointing()
    if quantization == "none" and not offloaded:
        unet.to(device, dtype=dtype)
        params = add_adapter()
    else:  # the weights are prepared on the CPU where they loaded: what is offloaded never reaches the device
        params = quantize.with_adapter(unet, quantization, device, dtype, add_adapter, lambda: offload.offload(
            unet, family.offloadable_blocks(unet), offloaded, device))
    if device.type == "cuda":  # NHWC for cuDNN's tensor-core convolutions; on the CPU it measured 4 % slower
        unet.to(memory_format=torch.channels_last)
    unet.train()
    return params


@torch.no_grad()
def encode_text_once(plan: RunPlan, pipeline, device: torch.device, dtype: torch.dtype
                     ) -> tuple[list[tuple[str, dict[str, Any]]], conditioning.CachedConditioning | None,
                                dict[str, torch.Tensor] | None]:
    """With the text encoders on the device: the sample prompts, the held-out captions (unless a text encoder
    trains), and (when captions are fixed and the encoders frozen) every caption, after which the encoders go
    back to the CPU. Otherwise they stay for per-step encoding, and the conditioning source is built after the
    accelerator wraps them. The held-out captions are encoded on their own, so the training captions' rows
    are the same with validation on or off."""
    config, family = plan.config, plan.family
    encoders = models.text_encoders(pipeline)
    stays = concepts.per_step_captions(config)  # encoded every step: the encoders stay on the device
    quantized = family.quantizable_text_encoders(pipeline) if stays and plan.base_quantization != "none" else []
    for encoder in encoders:
        if any(encoder is big for big in quantized):  # stored small on the CPU first, as the denoiser is
            quantize.quantize(encoder.to(dtype=dtype), plan.base_quantization, dtype)
            encoder.to(device)
        else:
            encoder.to(device, dtype=dtype)
    inputs = samples.prompt_inputs(family, pipeline, samples.prompts_of(config), device, settings=plan.settings,
                                         encode=not config.train_text_encoder)
    held_out = None
    if plan.held_out is not None and not config.train_text_encoder:
        held_out = conditioning.frozen_encoder(family, pipeline, device, dtype, plan.settings)(
            [record.caption for record in plan.held_out.images])
    if stays:
        return inputs, None, held_out
    cached = conditioning.cache_captions(family, conditioning.frozen_encoder(family, pipeline, device, dtype,
                                                                             plan.settings),
                                         [record.caption for record in plan.dataset.images],
                                         concepts.any_dropout(config))
    for encoder in encoders:
        encoder.to("cpu")
    return inputs, cached, held_out


def held_out_set(plan: RunPlan, pipeline, device: torch.device, dtype: torch.dtype,
                 text: dict[str, torch.Tensor] | None, run_objective: objective.Objective
                 ) -> validation.ValidationSet | None:
    if plan.held_out is None:
        return None
    return validation.ValidationSet.build(plan.config, plan.family, plan.held_out, plan.info.pixel_multiple,
                                          pipeline.vae, device, dtype, run_objective.levels_from_uniform, text)


def add_text_encoder_adapters(plan: RunPlan, pipeline) -> tuple[list[torch.nn.Module], list[torch.nn.Parameter]]:
    """With train_text_encoder: a LoRA on each text encoder (kept on the device, in the weights' dtype)."""
    if not plan.config.train_text_encoder:
        return [], []
    encoders = plan.family.trainable_text_encoders(pipeline)
    params = [p for encoder in encoders for p in plan.family.add_text_encoder_adapter(encoder, plan.config)]
    for encoder in encoders:
        encoder.train()
    return encoders, params


def per_step_conditioning(plan: RunPlan, pipeline, wrapped: list, device: torch.device,
                          dtype: torch.dtype) -> conditioning.EncodedConditioning:
    """Captions encoded every step: through the wrapped encoders when they train (so that their gradients are
    averaged across processes), else by the frozen pipeline."""
    family = plan.family
    if wrapped:
        encode = conditioning.trained_encoder(family, pipeline, wrapped, device, dtype, plan.settings)
    else:
        encode = conditioning.frozen_encoder(family, pipeline, device, dtype, plan.settings)
    return conditioning.EncodedConditioning(family, encode, trains=plan.config.train_text_encoder)


def make_optimizer(plan: RunPlan, params: list, text_params: list, device: torch.device,
                   modules: list[torch.nn.Module], namer=None) -> tuple[Any, Any]:
    """The optimizer over the LoRA's parameter groups (param_groups.py: LoRA+ and block-wise rates split them)
    and its schedule."""
    config = plan.config
    groups = param_groups.optimizer_groups(config, params, text_params, modules, namer)
    optimizer = optim.make_optimizer(config, groups, device)
    return optimizer, optim.make_lr_scheduler(config, optimizer, plan.total_steps)


def make_noise(config: TrainConfig, accelerator: Accelerator, run_objective: objective.Objective
               ) -> distributed.SampleNoise:
    return distributed.SampleNoise(config.seed, config.batch_size, accelerator.num_processes,
                                   accelerator.process_index, draw_levels=run_objective.draw_levels)


def lora_metadata(plan: RunPlan, info: models.ModelInfo, main: bool) -> dict[str, Any]:
    captions = [record.caption for record in plan.dataset.images]
    return dict(family=plan.family, prediction_type=info.prediction_type,
                num_images=len(captions) * plan.config.repeats,  # as sd-scripts counts them
                precision=plan.precision, started_at=plan.started_at, tag_frequency=tag_frequency(captions),
                base_sha256=models.weights_sha256(plan.source) if main else None, variant=info.variant,
                gradient_checkpointing=plan.gradient_checkpointing, num_processes=plan.num_processes,
                buckets=dict(plan.dataset.buckets), base_quantization=plan.base_quantization)


def named_lora_params(run: Run) -> dict[str, torch.nn.Parameter]:
    """The trained parameters by name (the denoiser's, then `text_encoder.` / `text_encoder_2.` ones)."""
    named = {name: p for name, p in run.bare_unet.named_parameters() if p.requires_grad}
    prefixes = [name + "." for name in TEXT_ENCODER_ATTRIBUTES]  # as many as any family trains
    for prefix, encoder in zip(prefixes[:len(run.text_encoders)], run.text_encoders, strict=True):
        named.update({prefix + name: p for name, p in encoder.named_parameters() if p.requires_grad})
    return named


def restore(run: Run) -> None:
    """Continue a stopped run: its LoRA, optimizer, schedule, RNG, position in the data and noise stream."""
    folder = checkpoint.latest_state(run.plan.output)
    state = checkpoint.load_state(folder, run.config, run.lora_params, run.optimizer)
    if run.ema is not None:
        run.ema.load(folder)
    run.lr_scheduler.load_state_dict(state.scheduler)
    run.step, run.epoch, run.batches_in_epoch = state.step, state.epoch, state.batches_in_epoch
    run.noise.draws = state.noise_draws
