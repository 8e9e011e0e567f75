"""Drawing with saved LoRA files: the run's base model loaded once, LoRAs loaded into it as a diffusers user
would, images drawn the way the trainer draws its samples. Used by the grid and the sweep (grid.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from lora_core import components, families, hardware, lorafile, models, samples
from lora_core.config import TrainConfig
from lora_core.errors import UserError

ADAPTER = "grid"
LYCORIS_KEYS = (".hada_w1_a", ".lokr_w1", ".lokr_w1_a")  # LoHa / LoKr layers: diffusers cannot load these


class Renderer:
    """The base model of `config` on its device, with the trainer's sampler; one LoRA loaded at a time."""

    def __init__(self, config: TrainConfig, device: str | None = None):
        self.config, self.requested_device = config, device
        if device is not None:
            config = config.model_copy(update={"device": device})
        self.device = hardware.pick_device(config)
        # on a GPU the run's precision (an SDXL UNet in fp32 may not fit); on the CPU fp32, which is fastest there
        self.dtype = hardware.weight_dtype(hardware.resolve_precision(config, self.device)) \
            if self.device.type == "cuda" else torch.float32
        source, info = components.resolve_base_model(config)
        self.family, self.info = families.get(info.family), info
        pipeline = models.load_pipeline(source, info, config)
        for module in (getattr(pipeline, self.family.denoiser), *models.text_encoders(pipeline)):
            # a dtype only when it changes: diffusers warns about every cast, even a no-op one
            module.to(self.device, **({} if self.dtype == torch.float32 else {"dtype": self.dtype}))
            module.eval()
        pipeline.vae.to(self.device)  # loaded in fp32 and decoded in fp32, as the trainer's samples are
        self.noise_schedule = pipeline.scheduler.config  # the training objective's, for the held-out loss (scoring.py)
        pipeline.scheduler = self.family.sample_scheduler(pipeline.scheduler.config)  # as the trainer samples
        pipeline.set_progress_bar_config(disable=True)
        self.pipeline = pipeline
        self.loaded: Path | None = None
        self.applied: AppliedLora | None = None  # a LoHa / LoKr file, added to the weights

    def serves(self, config: TrainConfig, device: str | None) -> bool:
        """Whether this renderer draws as a new one for `config` on `device` would: the same base model, device,
        precision and sampling settings (the LoRA is loaded per use)."""
        fields = ("base_model", "device", "mixed_precision", "resolution", "sample_inference_steps",
                  "sample_guidance_scale")
        return device == self.requested_device and all(getattr(config, f) == getattr(self.config, f)
                                                       for f in fields)

    @property
    def sampling(self) -> str:
        """How the cells are drawn, for the sheet's title."""
        c = self.config
        guidance = self.family.sampling_kwargs(c)["guidance_scale"]
        return f"{c.sample_inference_steps} {self.family.sampler_label} steps, guidance {guidance:g}, {c.resolution} px"

    def load(self, path: Path, field: str = "steps") -> None:
        """Load one LoRA file (replacing the one loaded before) at scale 1; `field`: what a bad file is blamed on.

        LoRA and DoRA files go through diffusers' `load_lora_weights`, as a diffusers user would load them (a
        kohya DoRA file converted first: diffusers' own loader drops its `dora_scale`, quietly under
        _quiet_diffusers). LoHa / LoKr files, which it cannot read, and the flow-matching families' files (in the
        original layout's names, which diffusers reads only for FLUX.1's own sizes and never for SD 3) are applied
        to the weights themselves (lorafile.apply_lora, as ComfyUI and Forge do), the touched weights kept to be
        put back exactly."""
        self.unload()
        keys = _keys(path)
        if any(key.endswith(LYCORIS_KEYS) for key in keys) or not self.family.diffusers_reads_lora:
            self.applied = AppliedLora(self.pipeline, path, field)
            self.applied.set_scale(1.0)
            self.loaded = path
            return
        try:
            source = lorafile.diffusers_state_dict(path, self.pipeline) if any(
                key.endswith(".dora_scale") for key in keys) else str(path)
            with _quiet_diffusers():  # "no LoRA keys for CLIPTextModel", once per row, for every UNet-only LoRA
                self.pipeline.load_lora_weights(source, adapter_name=ADAPTER)
        except Exception as error:  # diffusers raises ValueError/KeyError/... for a file it cannot map
            self.pipeline.unload_lora_weights()  # whatever it injected before failing
            raise UserError(f"{path}: diffusers' load_lora_weights could not load this LoRA "
                            f"({type(error).__name__}: {error})", field=field) from None
        if not any(ADAPTER in names for names in self.pipeline.get_list_adapters().values()):
            self.pipeline.unload_lora_weights()
            raise UserError(f"{path}: diffusers loaded no layer of this LoRA into {self.config.base_model}; is it "
                            "a LoRA for another base model?", field=field)
        self.loaded = path

    def set_scale(self, scale: float) -> None:
        """The loaded LoRA's strength on every part it adapts; 0 draws with the base model alone."""
        if self.applied is not None:
            self.applied.set_scale(scale)
        elif scale == 0:
            self.pipeline.disable_lora()
        else:
            self.pipeline.enable_lora()
            self.pipeline.set_adapters([ADAPTER], [scale])

    def unload(self) -> None:
        if self.applied is not None:
            self.applied.restore()
            self.applied = None
        elif self.loaded is not None:
            self.pipeline.unload_lora_weights()  # back to the base model's own layers
        self.loaded = None

    @torch.no_grad()
    def draw(self, prompt: str, seed: int, should_stop: Callable[[], bool] | None = None):
        """One image (PIL), from the same initial noise for the same seed; samples.DrawingStopped when
        `should_stop` says so between two denoising steps."""
        return samples.draw(self.config, self.family, self.pipeline, self.pipeline.vae, {"prompt": prompt}, seed,
                            self.device, self.dtype, should_stop)  # as the trainer's samples

    @torch.no_grad()
    def draw_latents(self, prompt: str, seed: int, steps: int | None = None, size: int | None = None) -> torch.Tensor:
        """The scaled latents (1, C, h, w) of one drawing: `steps` sampler steps (default the run's) at `size` px
        (default its resolution); what the scores compare (scoring.py)."""
        return samples.draw_latents(self.config, self.family, self.pipeline, {"prompt": prompt}, seed, self.device,
                                    self.dtype, steps=steps, size=size)


class AppliedLora:
    """A LoRA file added to the pipeline's weights (any kind lorafile reads); the weights it touches are kept,
    so that another scale, or none, starts again from the exact base weights rather than from a subtraction."""

    def __init__(self, pipeline, path: Path, field: str):
        from lora_core import lorafile

        self.pipeline, self.path, self.field = pipeline, path, field
        try:
            changes = lorafile.weight_changes(pipeline, lorafile.read(path))
        except UserError as error:  # e.g. layers this model does not have: a file for another base model
            raise UserError(str(error), field=field) from None
        self.kept = {id(weight): (weight, weight.detach().clone()) for weight, _ in changes}

    @torch.no_grad()
    def set_scale(self, scale: float) -> None:
        from lora_core import lorafile

        self.restore()
        if scale != 0:
            try:
                lorafile.apply_lora(self.pipeline, self.path, scale)
            except UserError as error:  # e.g. layers this model does not have: a file for another base model
                self.restore()
                raise UserError(str(error), field=self.field) from None

    @torch.no_grad()
    def restore(self) -> None:
        for weight, original in self.kept.values():
            weight.copy_(original)


@contextmanager
def _quiet_diffusers() -> Iterator[None]:
    from diffusers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)


def _keys(path: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        return list(handle.keys())
