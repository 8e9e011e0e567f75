"""The weight-averaging and masked-loss options (EMA of the LoRA, per-image loss masks), part of the one
configuration model.

They live apart only to keep config.py readable: `TrainConfig` inherits them, so the CLI, the page, the presets
and `config_schema.json` see them like every other field. Every family honours them (the mask multiplies the
per-pixel error of the DDPM and of the flow-matching objective alike), so no family refuses them.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, model_validator

from lora_core.errors import FieldConflict


def _ui(group: str = "advanced", **extra: Any) -> dict[str, Any]:
    return {"group": group, **extra}


class EmaOptions(BaseModel):
    ema_decay: float = Field(0.0, ge=0.0, lt=1.0, description=(
        "Keep an exponential moving average (EMA) of the LoRA weights, in fp32, with this decay (0.999 is usual for "
        "thousands of steps, 0.99 for a few hundred); 0 turns it off. Warm-up as diffusers' EMAModel: the k-th "
        "update (k = 0, 1, ...) uses min(ema_decay, (1 + k) / (10 + k)), so early averages are not dominated by "
        "the untrained start. Each checkpoint gets a `lora_step_N.ema.safetensors` beside its LoRA (the same "
        "format), and the run a `lora_final.ema.safetensors`; --resume restores the average exactly."),
        json_schema_extra=_ui(step=0.001))
    ema_update_every: int = Field(1, ge=1, le=10_000, description=(
        "Update the EMA every N optimizer steps (its warm-up counts updates, not steps)."), json_schema_extra=_ui())
    ema_use_for_final: bool = Field(False, description=(
        "With ema_decay: lora_final.safetensors holds the EMA weights and the raw weights go to "
        "lora_final.raw.safetensors (off: lora_final.safetensors is raw, lora_final.ema.safetensors the EMA)."),
        json_schema_extra=_ui())
    ema_samples: bool = Field(False, description=(
        "With ema_decay: draw the sample images with the EMA weights instead of the raw ones."),
        json_schema_extra=_ui("sampling"))

    @model_validator(mode="after")
    def _ema_options_need_a_decay(self) -> Any:
        asked = [name for name in ("ema_use_for_final", "ema_samples") if getattr(self, name)]
        if asked and self.ema_decay == 0:
            raise FieldConflict(("ema_decay", *asked), f"{' and '.join(asked)} need an EMA; set ema_decay (e.g. "
                                "0.999), or turn them off")
        return self


class MaskOptions(BaseModel):
    mask_source: Literal["none", "file", "alpha"] = Field("none", description=(
        "Masked loss: count only the masked part of each image. 'file': a grey-scale `NAME.mask.png` beside "
        "`NAME.png/.jpg/...` (white trains, black does not; the same size as the image; an image without one "
        "trains whole); 'alpha': the image's own alpha channel (an image without one trains whole). The mask is "
        "resized, cropped and flipped exactly as the image, then averaged down to the latent grid. 'none': every "
        "pixel counts. Mask files are never trained on as images."), json_schema_extra=_ui())
    mask_floor: float = Field(0.0, ge=0.0, le=1.0, description=(
        "With mask_source: the loss weight of the unmasked pixels (0: they teach nothing; 1: as without a "
        "mask). A pixel's weight is mask_floor + (1 - mask_floor) x mask; the loss is the mean of the weighted "
        "error over all pixels, as sd-scripts' masked_loss (a small mask also makes the loss smaller)."),
        json_schema_extra=_ui(step=0.05))
