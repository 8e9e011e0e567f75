"""SDXL: two text encoders (the next-to-last hidden states of both, concatenated, plus the second one's
pooled embedding) and the size/crop time ids as added conditioning; kohya names `lora_te1_` / `lora_te2_`, and
the UNet's modules under their names in the original (Stability) layout, as sd-scripts writes them."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lora_core.families.base import tokenize, tokenizers
from lora_core.families.sd1 import SD1

if TYPE_CHECKING:
    import torch

    from lora_core.config import TrainConfig
    from lora_core.models import ModelInfo


class SDXL(SD1):
    name = "sdxl"
    unet_blocks = "sdxl"  # 23 blocks, named in the original layout
    display_name = "SDXL"
    detect_priority = 10
    single_file_builtin = "sdxl-arch"
    single_file_levels = 3
    vae_fp16_overflows = True
    architecture = "stable-diffusion-xl-v1-base/lora"
    base_model_version = "sdxl_base_v1-0"
    implementation = "https://github.com/Stability-AI/generative-models"  # its LoRA names the original code

    def matches_folder(self, index: dict, denoiser_config: dict) -> bool:
        return "unet" in index and (denoiser_config.get("addition_embed_type") == "text_time"
                                    or "XL" in index.get("_class_name", ""))

    def matches_single_file(self, keys: list[str]) -> bool:
        return any(key.startswith("conditioner.embedders.1.") for key in keys)

    def pipeline_class(self) -> type:
        from diffusers import StableDiffusionXLPipeline

        return StableDiffusionXLPipeline

    def load_kwargs(self, config: TrainConfig | None = None) -> dict[str, Any]:
        return {}  # SDXL pipelines have no safety checker

    def description(self, info: ModelInfo) -> str:
        return self.display_name

    def unet_namer(self, unet_config):
        from lora_core.ldm_names import ldm_module_names

        names = ldm_module_names(unet_config)
        return lambda module: "lora_unet_" + names[module].replace(".", "_")

    def text_encoder_prefixes(self, count: int) -> list[str]:
        return [f"lora_te{index + 1}_" for index in range(count)]

    def metadata(self, prediction_type: str, variant: str = "") -> dict[str, str]:
        return {"modelspec.architecture": self.architecture, "modelspec.implementation": self.implementation,
                "ss_base_model_version": self.base_model_version, "ss_v2": "False"}

    def encode_captions(self, pipeline, texts: list[str], device: torch.device, dtype: torch.dtype,
                        settings: dict | None = None) -> dict[str, torch.Tensor]:
        embeds, _, pooled, _ = pipeline.encode_prompt(texts, device=device, do_classifier_free_guidance=False)
        return {"encoder_hidden_states": embeds.to(dtype), "text_embeds": pooled.to(dtype)}

    def encode_with(self, pipeline, encoders: list, texts: list[str], device: torch.device,
                    dtype: torch.dtype, settings: dict | None = None) -> dict[str, torch.Tensor]:
        import torch

        hidden, pooled = [], None
        for tokenizer, encoder in zip(tokenizers(pipeline), encoders, strict=True):
            output = encoder(tokenize(tokenizer, texts, device), output_hidden_states=True)
            if pooled is None and output[0].ndim == 2:  # the projection model's first output is pooled
                pooled = output[0]
            hidden.append(output.hidden_states[-2])
        return {"encoder_hidden_states": torch.cat(hidden, dim=-1).to(dtype), "text_embeds": pooled.to(dtype)}

    def denoiser_inputs(self, text: dict[str, torch.Tensor], time_ids: torch.Tensor) -> dict[str, Any]:
        return {"encoder_hidden_states": text["encoder_hidden_states"],
                "added_cond_kwargs": {"text_embeds": text["text_embeds"],
                                      "time_ids": time_ids.to(text["text_embeds"].dtype)}}

    def sample_inputs(self, pipeline, prompt: str, device: torch.device, settings: dict | None = None
                      ) -> dict[str, Any]:
        positive, negative, positive_pooled, negative_pooled = pipeline.encode_prompt(
            prompt, device=device, do_classifier_free_guidance=True)
        return {"prompt_embeds": positive, "negative_prompt_embeds": negative,
                "pooled_prompt_embeds": positive_pooled, "negative_pooled_prompt_embeds": negative_pooled}
