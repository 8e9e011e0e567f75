"""SD 1.x: a UNet conditioned on one CLIP text encoder's last hidden states, trained with the DDPM objective
(epsilon or v-prediction, as the model's scheduler says); kohya names `lora_unet_` / `lora_te_`. SD 2.x (sd2.py)
and SDXL (sdxl.py) differ from it in a few places."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lora_core.families.base import Family, tokenize

if TYPE_CHECKING:
    import torch

    from lora_core.config import TrainConfig
    from lora_core.models import ModelInfo
    from lora_core.objective import Objective

TRANSFORMER_WEIGHT = 4.5  # a transformer layer saves ~4.5x what a ResNet layer of the same width saves


class SD1(Family):
    name = "sd1"
    unet_blocks = "sd"  # block-wise rates and ranks over sd-scripts' 25 blocks (blocks.py)
    display_name = "SD 1.x"
    detect_priority = 100  # the fallback for any UNet pipeline folder
    single_file_builtin = "sd15-arch"
    single_file_levels = 4  # the UNet's down levels, for a single file (whose configs come at load time)
    architecture = "stable-diffusion-v1/lora"  # sd-scripts' model spec
    base_model_version = "sd_v1"
    implementation = "diffusers"  # sd-scripts' SD 1.x/2.x LoRA names diffusers' modules

    def matches_folder(self, index: dict, denoiser_config: dict) -> bool:
        return "unet" in index

    def matches_single_file(self, keys: list[str]) -> bool:
        return any(key.startswith("cond_stage_model.transformer.") for key in keys)

    def latent_multiple(self, denoiser_config: dict) -> int:
        return 2 ** (len(denoiser_config["block_out_channels"]) - 1)

    def single_file_latent_multiple(self) -> int:
        return 2 ** (self.single_file_levels - 1)

    def pipeline_class(self) -> type:
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline

    def load_kwargs(self, config: TrainConfig | None = None) -> dict[str, Any]:
        return {"safety_checker": None, "requires_safety_checker": False}  # never fetch the safety checker

    def description(self, info: ModelInfo) -> str:
        return self.display_name + (" (v-prediction)" if info.prediction_type == "v_prediction" else "")

    def objective(self, config: TrainConfig, scheduler_config: Any, info: ModelInfo) -> Objective:
        from lora_core import objective

        return objective.DDPMObjective(objective.noise_scheduler_for(scheduler_config, config), info.prediction_type,
                                       config.min_snr_gamma, config)

    def predict(self, forward, noisy: torch.Tensor, levels: torch.Tensor, inputs: dict[str, Any]) -> torch.Tensor:
        return forward(noisy, levels, **inputs).sample

    def denoiser_targets(self) -> dict[str, Any]:
        from lora_core.lora import TARGETS

        return TARGETS

    def add_denoiser_adapter(self, denoiser, config: TrainConfig) -> list[torch.nn.Parameter]:
        from lora_core import lora

        return lora.add_lora(denoiser, config, namer=self.unet_namer(denoiser.config))  # names its blocks

    def add_text_encoder_adapter(self, encoder, config: TrainConfig) -> list[torch.nn.Parameter]:
        from lora_core import lora

        return lora.add_text_encoder_lora(encoder, config)

    def unet_namer(self, unet_config):
        """A UNet module path -> its name in the file: diffusers' module path with `_` (sd-scripts' SD 1.x/2.x)."""
        from lora_core import lora

        return lora.diffusers_namer(unet_config)

    def text_encoder_prefixes(self, count: int) -> list[str]:
        from lora_core import lora

        return lora.text_encoder_prefixes(count)

    def lora_file_contents(self, denoiser, config: TrainConfig, text_encoders: list
                           ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        from lora_core import lora

        return lora.lora_file_contents(denoiser, config, text_encoders, self)

    def metadata(self, prediction_type: str, variant: str = "") -> dict[str, str]:
        v = "_v" if prediction_type == "v_prediction" else ""  # sd-scripts' version of a v-model
        return {"modelspec.architecture": self.architecture, "modelspec.implementation": self.implementation,
                "ss_base_model_version": self.base_model_version + v, "ss_v2": "False"}

    def encode_captions(self, pipeline, texts: list[str], device: torch.device, dtype: torch.dtype,
                        settings: dict | None = None) -> dict[str, torch.Tensor]:
        embeds, _ = pipeline.encode_prompt(texts, device, 1, False)
        return {"encoder_hidden_states": embeds.to(dtype)}

    def encode_with(self, pipeline, encoders: list, texts: list[str], device: torch.device,
                    dtype: torch.dtype, settings: dict | None = None) -> dict[str, torch.Tensor]:
        embeds = encoders[0](tokenize(pipeline.tokenizer, texts, device), attention_mask=None)[0]
        return {"encoder_hidden_states": embeds.to(dtype)}

    def denoiser_inputs(self, text: dict[str, torch.Tensor], time_ids: torch.Tensor) -> dict[str, Any]:
        return {"encoder_hidden_states": text["encoder_hidden_states"]}

    def sample_scheduler(self, scheduler_config: Any):
        from diffusers import DPMSolverMultistepScheduler

        return DPMSolverMultistepScheduler.from_config(scheduler_config)

    def sample_inputs(self, pipeline, prompt: str, device: torch.device, settings: dict | None = None
                      ) -> dict[str, Any]:
        positive, negative = pipeline.encode_prompt(prompt, device, 1, True, negative_prompt="")
        return {"prompt_embeds": positive, "negative_prompt_embeds": negative}

    def activation_units(self, denoiser_config: Any) -> float:
        """Sum over the UNet's levels of channels x layers x (1 + 4.5 x transformer layers where there is
        attention), each level weighted by its share of the latent's pixels (1/4 per level down). The weight 4.5
        makes the one constant fit both SD 1.5 (4 levels, 1 transformer layer) and SDXL (3 levels, 0/2/10)."""
        config = denoiser_config
        depth = config.transformer_layers_per_block
        levels = len(config.block_out_channels)
        depths = list(depth) if isinstance(depth, list | tuple) else [depth] * levels
        units = 0.0
        for level, (channels, block) in enumerate(zip(config.block_out_channels, config.down_block_types,
                                                      strict=True)):
            transformers = depths[level] if "CrossAttn" in block else 0
            units += channels * config.layers_per_block * (1 + TRANSFORMER_WEIGHT * transformers) / 4**level
        return units
