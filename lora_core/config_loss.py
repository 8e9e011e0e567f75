"""The loss, noise and timestep options, the optimizers' notes and Lion's defaults, LoRA+, sd-scripts' LoRA
dropouts and block-wise rates and ranks: part of the one configuration model (config.py).

They live apart only to keep config.py readable: `TrainConfig` inherits them, so the CLI, the page, the presets
and `config_schema.json` see them like every other field. Names, defaults and formulas are sd-scripts' (its
`--loss_type`, `--huber_*`, `--debiased_estimation_loss`, `--min_timestep` / `--max_timestep`,
`--multires_noise_*`, `--network_dropout`, and the network arguments `loraplus_lr_ratio`, `rank_dropout`,
`module_dropout`, `down/mid/up_lr_weight`, `block_dims`, `block_alphas`); losses.py, param_groups.py,
network_dropout.py and blocks.py compute them. The DDPM-only ones carry `families` in their form hints; the
flow-matching families refuse them at their field (families/flow.py, families/base.py).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, model_validator

from lora_core.errors import FieldConflict

DDPM_FAMILIES = ["sd1", "sd2", "sdxl"]  # the form hint: the flow families refuse these options
DDPM_ONLY = ("debiased_estimation_loss", "min_timestep", "max_timestep", "multires_noise_iterations",
             "multires_noise_discount")  # loss_type and huber_* apply to the flow families too (but huber_schedule snr)
BLOCK_OPTIONS = ("down_lr_weight", "mid_lr_weight", "up_lr_weight", "block_dims", "block_alphas", "conv_block_dims",
                 "conv_block_alphas")
HUBER_OPTIONS = ("huber_schedule", "huber_c", "huber_scale")
DEFAULT_TIMESTEPS = 1000  # the DDPM schedule's length in every SD model
ADAMW_LR, ADAMW_DECAY = 1e-4, 1e-2  # learning_rate's and adam_weight_decay's defaults (config.py)
# Lion's sign update is larger than AdamW's, so the Lion paper advises a learning rate 3-10x smaller and a weight
# decay as much larger (their product, the decay per step, stays AdamW's): applied while the two are at defaults
LION_DEFAULTS = {"learning_rate": (ADAMW_LR, 3e-5), "adam_weight_decay": (ADAMW_DECAY, 3e-2)}
LION_OPTIMIZERS = ("lion", "lion8bit", "paged_lion8bit")
OPTIMIZER_NOTES = (
    "lion (lion-pytorch; sign updates, one moment: half AdamW's state): learning_rate and adam_weight_decay left "
    "at their defaults read as 3e-5 and 0.03 for it (the Lion paper's 3-10x smaller rate, larger decay); "
    "lion8bit / paged_lion8bit: the same with 8-bit state (bitsandbytes; paged: CUDA only); adamw_schedulefree "
    "(schedulefree): AdamW without a schedule: it averages its iterates, and samples, the validation loss and "
    "the LoRA file use the average; lr_scheduler must stay 'constant' (lr_warmup_steps becomes its own warmup); "
    "came (came-pytorch): Adafactor-like factored state with a confidence-guided step, about AdamW's quality "
    "in less memory.")


def _advanced() -> dict[str, Any]:
    return {"group": "advanced"}


def _ddpm() -> dict[str, Any]:
    return {"group": "advanced", "families": DDPM_FAMILIES}


class LossOptions(BaseModel):
    loss_type: Literal["l2", "l1", "huber", "smooth_l1"] = Field("l2", description=(
        "The per-pixel error: l2 (squared, the usual), l1 (absolute), huber (squared near zero, linear beyond "
        "huber_c: 2c(sqrt(d² + c²) - c)), or smooth_l1 (the same without the factor c). huber and smooth_l1 "
        "follow outliers less than l2 (sd-scripts' --loss_type). Every family (FLUX.1 / SD 3.x: with "
        "huber_schedule exponential or constant, at timestep sigma x 1000, as sd-scripts)."),
        json_schema_extra=_advanced())
    huber_schedule: Literal["snr", "exponential", "constant"] = Field("snr", description=(
        "How huber_c varies with the timestep (huber and smooth_l1 only): snr: (1 - c) / (1 + sigma_t)² + c, "
        "near 1 (l2-like) at low noise, c at high noise, with sigma_t = sqrt((1 - alpha_bar) / alpha_bar); "
        "exponential: scale * exp(ln(c) * t / 1000), from scale at t = 0 down to c * scale; constant: c * scale. "
        "snr needs a DDPM schedule: FLUX.1 and SD 3.x take exponential or constant."),
        json_schema_extra=_advanced())
    huber_c: float = Field(0.1, gt=0, le=1.0, description=(
        "The Huber threshold c (huber and smooth_l1 only; 0.1 as sd-scripts): below it an error counts "
        "squared, above it linearly."), json_schema_extra={**_advanced(), "step": 0.01})
    huber_scale: float = Field(1.0, gt=0, le=100, description=(
        "Multiplies c in the exponential and constant huber_schedule (sd-scripts' --huber_scale; the snr "
        "schedule ignores it, as there)."), json_schema_extra=_advanced())
    debiased_estimation_loss: bool = Field(False, description=(
        "Weight each sample by 1 / sqrt(SNR) (v-prediction: 1 / (SNR + 1)), SNR capped at 1000, which evens out "
        "the timesteps' contributions (Yu et al. 2024, sd-scripts' --debiased_estimation_loss). With "
        "min_snr_gamma also set, both weights apply, as in sd-scripts: set min_snr_gamma 0 for debiasing alone."),
        json_schema_extra=_ddpm())
    min_timestep: int = Field(0, ge=0, le=DEFAULT_TIMESTEPS - 1, description=(
        "Train only on timesteps from this one (0 = least noise); with max_timestep, e.g. 0-500 for detail, "
        "500-1000 for composition. The validation loss's timesteps lie in the same range."),
        json_schema_extra=_ddpm())
    max_timestep: int = Field(DEFAULT_TIMESTEPS, ge=1, le=DEFAULT_TIMESTEPS, description=(
        "Train only on timesteps below this one (1000 = up to pure noise); above min_timestep."),
        json_schema_extra=_ddpm())
    multires_noise_iterations: int = Field(0, ge=0, le=20, description=(
        "Multi-resolution (pyramid) noise: add this many levels of upscaled lower-resolution noise (6-10 as "
        "sd-scripts advises), rescaled to unit variance over the batch; teaches large-scale light and contrast "
        "like noise_offset. 0: off. Applied after noise_offset, as sd-scripts does."), json_schema_extra=_ddpm())
    multires_noise_discount: float = Field(0.3, ge=0, le=1.0, description=(
        "Each pyramid level's noise is scaled by discount^level (sd-scripts' default 0.3; 0.1 is gentler). "
        "Used only with multires_noise_iterations."), json_schema_extra={**_ddpm(), "step": 0.05})
    loraplus_lr_ratio: float = Field(1.0, ge=1.0, le=1000, description=(
        "LoRA+: the up (B) matrices learn this many times faster than the down (A) ones (Hayou et al. 2024; "
        "16 is the paper's suggestion, sd-scripts' loraplus_lr_ratio); the text encoders' too, at "
        "text_encoder_lr. 1: plain LoRA. network_type 'lora' only (without DoRA)."),
        json_schema_extra={"group": "advanced"})

    network_dropout: float = Field(0.0, ge=0, lt=1, description=(
        "sd-scripts' network_dropout: dropout on each LoRA module's down-projected values (its rank space) while "
        "training, about 0.1; never in samples or the file. Unlike lora_dropout (peft's, on the layer's input), "
        "which it replaces: set one of the two. network_type 'lora' without DoRA."),
        json_schema_extra={"group": "advanced"})
    rank_dropout: float = Field(0.0, ge=0, lt=1, description=(
        "sd-scripts' rank_dropout: drop each rank of each sample with this probability while training (the rest "
        "scaled up to match), as if the rank were smaller; about 0.1. network_type 'lora' without DoRA (LoHa and "
        "LoKr take their rank dropout from lora_dropout)."), json_schema_extra={"group": "advanced"})
    module_dropout: float = Field(0.0, ge=0, lt=1, description=(
        "sd-scripts' module_dropout: each LoRA module adds nothing on a training forward with this probability; "
        "about 0.1. network_type 'lora' without DoRA."), json_schema_extra={"group": "advanced"})

    down_lr_weight: str = Field("", max_length=400, description=(
        "Block-wise learning rates (sd-scripts' network argument): a weight for each down block of the UNet, "
        "comma-separated, shallow to deep (SD 1.x/2.x: 12, SDXL: 9; fewer are filled with 1), or a curve: "
        "cosine, sine, linear, reverse_linear, zeros, optionally +base ('sine+0.5'). A block's rate is "
        "learning_rate times its weight; weight 0 leaves the block without a LoRA. Empty: all 1."),
        json_schema_extra=_ddpm())
    mid_lr_weight: str = Field("", max_length=400, description=(
        "Block-wise learning rates: the mid block's weight(s), comma-separated (SD 1.x/2.x: 1, SDXL: 3)."),
        json_schema_extra=_ddpm())
    up_lr_weight: str = Field("", max_length=400, description=(
        "Block-wise learning rates: a weight for each up block, deep to shallow (SD 1.x/2.x: 12, SDXL: 9), or "
        "a curve as down_lr_weight."), json_schema_extra=_ddpm())
    block_dims: str = Field("", max_length=400, description=(
        "Block-wise ranks (sd-scripts' network argument): one rank per UNet block, comma-separated (SD 1.x/2.x: "
        "25, SDXL: 23 values, in sd-scripts' order: see the README); 0 leaves a block without a LoRA. The 3x3 "
        "convolutions of lora_target locon keep lora_rank. Empty: lora_rank everywhere."),
        json_schema_extra=_ddpm())
    block_alphas: str = Field("", max_length=400, description=(
        "Block-wise alphas, one per block like block_dims. Empty: lora_alpha everywhere. The file has each "
        "module's own alpha."), json_schema_extra=_ddpm())
    conv_block_dims: str = Field("", max_length=400, description=(
        "With lora_target locon: one rank per block for the 3x3 convolutions, like block_dims (sd-scripts' "
        "conv_block_dims). Empty: lora_rank."), json_schema_extra=_ddpm())
    conv_block_alphas: str = Field("", max_length=400, description=(
        "With lora_target locon: one alpha per block for the 3x3 convolutions. Empty: lora_alpha."),
        json_schema_extra=_ddpm())

    @model_validator(mode="before")
    @classmethod
    def _lion_defaults(cls, data: Any) -> Any:
        """Lion's own learning rate and weight decay where the two are left at AdamW's defaults."""
        if not isinstance(data, dict) or data.get("optimizer") not in LION_OPTIMIZERS:
            return data
        data = dict(data)
        for name, (adamw_default, lion_default) in LION_DEFAULTS.items():
            if data.get(name, adamw_default) == adamw_default:
                data[name] = lion_default
        return data

    @model_validator(mode="after")
    def _loss_options_agree(self) -> Any:
        if self.min_timestep >= self.max_timestep:
            raise FieldConflict(("min_timestep", "max_timestep"), f"min_timestep {self.min_timestep} must be below "
                                f"max_timestep {self.max_timestep} (timesteps are drawn from min to max - 1)")
        if self.loss_type in ("l2", "l1"):
            fields = type(self).model_fields
            set_ = [name for name in HUBER_OPTIONS if getattr(self, name) != fields[name].default]
            if set_:
                raise FieldConflict((*set_, "loss_type"), f"{', '.join(set_)} shape(s) the huber and smooth_l1 "
                                    f"losses only; with loss_type {self.loss_type!r} put them back to their "
                                    "defaults, or choose loss_type 'huber' or 'smooth_l1'")
        if self.loraplus_lr_ratio != 1 and (getattr(self, "network_type", "lora") != "lora"
                                            or getattr(self, "use_dora", False)):
            raise FieldConflict(("loraplus_lr_ratio", "network_type"), "LoRA+ speeds up a LoRA's up (B) "
                                "matrices; LoHa, LoKr and DoRA have no such pair: set loraplus_lr_ratio to 1 "
                                "or use network_type 'lora' without DoRA")
        dropouts = [name for name in ("network_dropout", "rank_dropout", "module_dropout") if getattr(self, name)]
        if dropouts and (getattr(self, "network_type", "lora") != "lora" or getattr(self, "use_dora", False)):
            raise FieldConflict((*dropouts, "network_type"), f"{', '.join(dropouts)} act(s) on a LoRA's down "
                                "projection; LoHa and LoKr take rank dropout from lora_dropout, and DoRA's "
                                "magnitude would not follow: set them to 0, or use network_type 'lora' without DoRA")
        if self.network_dropout and getattr(self, "lora_dropout", 0):
            raise FieldConflict(("network_dropout", "lora_dropout"), "network_dropout (sd-scripts', on the rank "
                                "space) and lora_dropout (peft's, on the input) are two forms of one idea: set one "
                                "of them to 0")
        blocks = [name for name in BLOCK_OPTIONS if getattr(self, name)]
        if blocks and (getattr(self, "network_type", "lora") != "lora" or getattr(self, "use_dora", False)):
            raise FieldConflict((*blocks, "network_type"), "block-wise ranks and rates are written for plain LoRA "
                                "modules; clear them, or use network_type 'lora' without DoRA")
        convs = [name for name in ("conv_block_dims", "conv_block_alphas") if getattr(self, name)]
        if convs and getattr(self, "lora_target", "locon") != "locon":
            raise FieldConflict((*convs, "lora_target"), "3x3 convolutions get a LoRA only with lora_target "
                                "'locon': choose it, or clear the conv block options")
        if getattr(self, "optimizer", "") == "adamw_schedulefree" and getattr(self, "lr_scheduler", "") != "constant":
            raise FieldConflict(("lr_scheduler", "optimizer"), "adamw_schedulefree replaces the learning-rate "
                                "schedule (it averages its iterates instead): set lr_scheduler to 'constant' "
                                "(lr_warmup_steps still warms it up)")
        return self


def loss_metadata(config: Any) -> dict[str, str]:
    """These options' `ss_*` fields as sd-scripts' train_network.py writes them (`str()` of its values, `None`
    for multires noise left off); the timestep range has no field there."""
    return {"ss_loss_type": config.loss_type, "ss_huber_schedule": config.huber_schedule,
            "ss_huber_c": str(config.huber_c), "ss_huber_scale": str(config.huber_scale),
            "ss_debiased_estimation": str(config.debiased_estimation_loss),
            "ss_multires_noise_iterations": str(config.multires_noise_iterations or None),
            "ss_multires_noise_discount": str(config.multires_noise_discount)}
