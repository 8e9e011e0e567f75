"""SD 1.x: one CLIP text encoder (its last layer's hidden states condition the UNet), kohya names
`lora_unet_` / `lora_te_`. SD 2.x (sd2.py) differs only in how it is recognised."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lora_core.families.base import Family, tokenize

if TYPE_CHECKING:
    import torch

    from lora_core.config import TrainConfig


class SD1(Family):
    name = "sd1"
    display_name = "SD 1.x"
    detect_priority = 100  # the fallback for any diffusers folder
    single_file_builtin = "sd15-arch"
    single_file_down_levels = 4

    def matches_folder(self, index: dict, unet: dict) -> bool:
        return True

    def matches_single_file(self, keys: list[str]) -> bool:
        return any(key.startswith("cond_stage_model.transformer.") for key in keys)

    def pipeline_class(self) -> type:
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline

    def load_kwargs(self) -> dict[str, Any]:
        return {"safety_checker": None, "requires_safety_checker": False}  # never fetch the safety checker

    def add_unet_adapter(self, unet, config: TrainConfig) -> list[torch.nn.Parameter]:
        from lora_core import lora

        return lora.add_lora(unet, config)

    def add_text_encoder_adapter(self, encoder, config: TrainConfig) -> list[torch.nn.Parameter]:
        from lora_core import lora

        return lora.add_text_encoder_lora(encoder, config)

    def lora_file_contents(self, unet, config: TrainConfig, text_encoders: list
                           ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        from lora_core import lora

        # kohya names; lora.text_encoder_prefixes(self.name, count) names the text encoders' keys
        return lora.lora_file_contents(unet, config, text_encoders, self.name)

    def encode_captions(self, pipeline, texts: list[str], device: torch.device, dtype: torch.dtype
                        ) -> dict[str, torch.Tensor]:
        embeds, _ = pipeline.encode_prompt(texts, device, 1, False)
        return {"encoder_hidden_states": embeds.to(dtype)}

    def encode_with(self, tokenizers: list, encoders: list, texts: list[str], device: torch.device,
                    dtype: torch.dtype) -> dict[str, torch.Tensor]:
        embeds = encoders[0](tokenize(tokenizers[0], texts, device), attention_mask=None)[0]
        return {"encoder_hidden_states": embeds.to(dtype)}

    def unet_inputs(self, text: dict[str, torch.Tensor], time_ids: torch.Tensor) -> dict[str, Any]:
        return {"encoder_hidden_states": text["encoder_hidden_states"]}

    def sample_inputs(self, pipeline, prompt: str, device: torch.device) -> dict[str, Any]:
        positive, negative = pipeline.encode_prompt(prompt, device, 1, True, negative_prompt="")
        return {"prompt_embeds": positive, "negative_prompt_embeds": negative}
