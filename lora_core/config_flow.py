"""The flow-matching families' options (SD 3.x, FLUX.1), part of the one configuration model (config.py).

They live apart only to keep config.py readable: `TrainConfig` inherits them, so the CLI, the page, the presets
and `config_schema.json` see them like every other field. Each carries `families` in its form hints: the page
shows it only for those families, and the plan refuses a value set for another family at its field.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator

FLOW_FAMILIES = ["sd3", "flux"]
MAX_PATH_CHARS = 4096  # PATH_MAX on Linux (config.py's path fields take the same)


def path_text_problem(value: str) -> str | None:
    """Why `value` cannot be a path (a NUL or another control character), or None; every path field asks."""
    if "\x00" in value:
        return "contains a NUL character, which no path can hold"
    if any(ord(char) < 32 for char in value):
        return "contains a control character (a newline or tab?); give the path on one line"
    return None


def _flow(families: list[str] | None = None) -> dict[str, Any]:
    return {"group": "advanced", "families": families or FLOW_FAMILIES}


class FlowMatchingOptions(BaseModel):
    pipeline_components: str | None = Field(None, min_length=1, max_length=MAX_PATH_CHARS, description=(
        "For a single-file base_model that holds only part of a model: the diffusers folder or Hugging Face hub "
        "id the missing parts come from (text encoders, VAE, tokenizers, scheduler, and the configs), e.g. "
        "black-forest-labs/FLUX.1-dev for the transformer-only flux1-dev.safetensors, or "
        "stabilityai/stable-diffusion-3.5-medium for an sd3.5_medium.safetensors without its text encoders. What "
        "the file holds is taken from the file; from a hub id only the missing parts are downloaded. Empty: the "
        "file must hold every part (an SD 1.x / SDXL checkpoint then takes its configs from its family's hub "
        "repository)."), json_schema_extra={"group": "basic"})
    timestep_sampling: Literal["logit_normal", "uniform", "mode", "sigmoid", "shift", "flux_shift"] = Field(
        "logit_normal", description=(
            "SD 3 / FLUX: how noise levels (sigmas) are drawn. logit_normal (sigmoid of N(logit_mean, logit_std)), "
            "uniform and mode (mode_scale) pick from the scheduler's grid as diffusers' scripts do (SD 3's grid is "
            "shifted by 3; FLUX's is not); sigmoid draws sigmoid(N(0,1) x sigmoid_scale), shift shifts that by "
            "discrete_flow_shift, flux_shift by the resolution-dependent shift FLUX uses to draw (kohya's)."),
        json_schema_extra=_flow())
    logit_mean: float = Field(0.0, ge=-5, le=5, description="logit_normal's mean (0 centres on sigma 0.5).",
                              json_schema_extra=_flow())
    logit_std: float = Field(1.0, gt=0, le=10, description="logit_normal's standard deviation.",
                             json_schema_extra=_flow())
    mode_scale: float = Field(1.29, ge=0, le=2, description="mode sampling's scale (SD 3's paper: 1.29).",
                              json_schema_extra=_flow())
    sigmoid_scale: float = Field(1.0, gt=0, le=10, description="sigmoid / shift / flux_shift: the normal's scale.",
                                 json_schema_extra=_flow())
    discrete_flow_shift: float = Field(3.0, gt=0, le=100, description=(
        "shift sampling: sigma' = s sigma / (1 + (s - 1) sigma); above 1 trains more at high noise."),
        json_schema_extra=_flow())
    loss_weighting: Literal["none", "sigma_sqrt", "cosmap"] = Field("none", description=(
        "SD 3 / FLUX: weight each sample's error by its sigma (diffusers' compute_loss_weighting_for_sd3)."),
        json_schema_extra=_flow())
    precondition_outputs: Literal["auto", "on", "off"] = Field("auto", description=(
        "Compare x_t - sigma x prediction with the clean latents instead of the prediction with noise - latents "
        "(diffusers' SD 3 script does by default). auto: on for SD 3, off for FLUX."), json_schema_extra=_flow())
    flux_guidance: float = Field(1.0, ge=0, le=30, description=(
        "FLUX.1-dev: the guidance value fed to its guidance embedding while training. 1.0, as kohya's docs and "
        "diffusers' README examples train: higher values (the diffusers script's 3.5 default) teach the LoRA at a "
        "guidance it is not drawn with and weaken it. Samples still draw at sample_guidance_scale. schnell has "
        "no guidance embedding."), json_schema_extra=_flow(["flux"]))
    max_sequence_length: int = Field(0, ge=0, le=512, description=(
        "SD 3 / FLUX: tokens the T5 encoder reads; 0: the family's default (FLUX.1-dev 512, schnell 256, SD 3 "
        "256). Longer captions are cut."), json_schema_extra=_flow())
    use_t5_encoder: bool = Field(True, description=(
        "SD 3: off drops the T5-XXL encoder (about 9.5 GB in fp16): captions then condition through the two "
        "CLIP encoders alone, as SD 3's pipeline does without it (zeros in T5's place). FLUX needs T5."),
        json_schema_extra=_flow(["sd3"]))

    @field_validator("pipeline_components")
    @classmethod
    def _components_path_has_no_control_characters(cls, value: str | None) -> str | None:
        if value is not None and (problem := path_text_problem(value)):
            raise ValueError(problem)
        return value
