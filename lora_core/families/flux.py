"""FLUX.1 (dev and schnell): a rectified-flow transformer (FluxTransformer2DModel) on 2x2-packed 16-channel
latents, conditioned on T5-XXL's sequence (512 tokens for dev, 256 for schnell) and CLIP-L's pooled output, with
a guidance embedding for dev. Trained as diffusers' `train_dreambooth_lora_flux.py` and kohya's sd-scripts do:
`x_t = (1 - sigma) x0 + sigma noise`, target `noise - x0`, the model given `sigma` as its timestep, guidance 1.0.
Files are written in the original (Black Forest Labs) layout's kohya names, q/k/v fused (flow_names.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lora_core.families.base import tokenize
from lora_core.families.flow import FlowFamily

if TYPE_CHECKING:
    import torch

    from lora_core.config import TrainConfig
    from lora_core.families.comfy import ComfySettings
    from lora_core.models import ModelInfo

DOUBLE_ATTENTION = r"attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
DOUBLE_MLP = r"(ff|ff_context)\.net\.(0\.proj|2)"
SINGLE_ATTENTION = r"attn\.(to_q|to_k|to_v)"
# peft reads a string as one regular expression over the whole module path: a suffix list could not tell the
# single blocks' `proj_out` from the model's final `proj_out`, which kohya's FLUX LoRA leaves alone
TARGETS = {
    "attention": rf"(transformer_blocks\.\d+\.{DOUBLE_ATTENTION}"
                 rf"|single_transformer_blocks\.\d+\.{SINGLE_ATTENTION})",
    "attention_mlp": rf"(transformer_blocks\.\d+\.({DOUBLE_ATTENTION}|{DOUBLE_MLP})"
                     rf"|single_transformer_blocks\.\d+\.({SINGLE_ATTENTION}|proj_mlp|proj_out))",
}
SEQUENCE_LENGTHS = {"dev": 512, "schnell": 256}
SAMPLE_GUIDANCE = 3.5  # FLUX.1-dev's distilled guidance when sample_guidance_scale is left at its SD default


class Flux(FlowFamily):
    name = "flux"
    display_name = "FLUX.1"
    detect_priority = 5
    single_file_builtin = "flux-dev-arch"
    targets = TARGETS
    components_examples = {"dev": "black-forest-labs/FLUX.1-dev",
                           "schnell": "black-forest-labs/FLUX.1-schnell"}

    def matches_folder(self, index: dict, denoiser_config: dict) -> bool:
        return index.get("_class_name") == "FluxPipeline" or (
            denoiser_config.get("_class_name") == "FluxTransformer2DModel" and "_class_name" not in index)

    def matches_single_file(self, keys: list[str]) -> bool:
        """The original layout's transformer (BFL's `flux1-dev.safetensors`, or ComfyUI's with its prefix)."""
        return any(key.endswith("double_blocks.0.img_attn.qkv.weight") for key in keys)

    def variant(self, denoiser_config: dict) -> str:
        return "dev" if denoiser_config.get("guidance_embeds") else "schnell"

    def single_file_variant(self, keys: list[str]) -> str:
        return "dev" if any(key.endswith("guidance_in.in_layer.weight") for key in keys) else "schnell"

    def latent_multiple(self, denoiser_config: dict) -> int:
        return 2  # latents are packed 2x2 into tokens

    def single_file_latent_multiple(self) -> int:
        return 2

    def pipeline_class(self) -> type:
        from diffusers import FluxPipeline

        return FluxPipeline

    def single_file_missing(self, keys: list[str], config: TrainConfig | None = None) -> dict[str, str]:
        # only the transformer is read from a file (BFL's holds nothing else; what a ComfyUI checkpoint bundles
        # is not read): the rest always comes from pipeline_components
        return {"text_encoder": "CLIP-L", "text_encoder_2": "T5-XXL", "vae": "VAE"}

    def load_single_file(self, path: str, components: str | None, config: TrainConfig | None):
        from diffusers import FluxPipeline, FluxTransformer2DModel

        from lora_core.families.flow_checkpoint import read_transformer

        transformer = read_transformer(path, FluxTransformer2DModel, components)
        return FluxPipeline.from_pretrained(components, transformer=transformer, use_safetensors=True)

    def description(self, info: ModelInfo) -> str:
        return f"{self.display_name}-{info.variant}" if info.variant else self.display_name

    def block_count(self, denoiser_config: Any) -> int:
        return denoiser_config.num_layers + denoiser_config.num_single_layers

    def file_variant(self, variant: str) -> str:
        return f"flux-{variant or 'dev'}"

    def check_config(self, config: TrainConfig) -> list[tuple[str, str]]:
        return super().check_config(config) + (
            [] if config.use_t5_encoder else [("use_t5_encoder", "FLUX.1 reads its captions through T5 alone (CLIP "
                                               "gives only a pooled vector); it cannot drop it")])

    def run_settings(self, config: TrainConfig, info: ModelInfo) -> dict[str, Any]:
        return {"max_sequence_length": config.max_sequence_length or SEQUENCE_LENGTHS.get(info.variant, 512),
                "guidance": config.flux_guidance if info.variant == "dev" else None}

    # --- the denoiser and its objective ---
    def predict(self, forward, noisy: torch.Tensor, levels: torch.Tensor, inputs: dict[str, Any]) -> torch.Tensor:
        import torch

        b, c, h, w = noisy.shape
        packed = noisy.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w // 4, c * 4)
        image_ids = torch.zeros(h // 2, w // 2, 3, device=noisy.device, dtype=noisy.dtype)
        image_ids[..., 1] += torch.arange(h // 2, device=noisy.device, dtype=noisy.dtype)[:, None]
        image_ids[..., 2] += torch.arange(w // 2, device=noisy.device, dtype=noisy.dtype)[None, :]
        text = inputs["encoder_hidden_states"]
        guidance = inputs.get("guidance")
        output = forward(hidden_states=packed, timestep=levels.to(noisy.dtype),
                         guidance=None if guidance is None else torch.full((b,), guidance, device=noisy.device),
                         pooled_projections=inputs["pooled_projections"], encoder_hidden_states=text,
                         txt_ids=torch.zeros(text.shape[1], 3, device=noisy.device, dtype=noisy.dtype),
                         img_ids=image_ids.reshape(-1, 3), return_dict=False)[0]
        return output.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)

    # --- adapters and export ---
    def trainable_text_encoders(self, pipeline) -> list:
        return [pipeline.text_encoder]  # CLIP-L, as kohya's `lora_te1_`; T5-XXL stays frozen

    # --- conditioning ---
    def encode_captions(self, pipeline, texts: list[str], device: torch.device, dtype: torch.dtype,
                        settings: dict | None = None) -> dict[str, torch.Tensor]:
        length = (settings or {}).get("max_sequence_length", 512)
        embeds, pooled, _ = pipeline.encode_prompt(texts, device=device, max_sequence_length=length)
        return {"encoder_hidden_states": embeds.to(dtype), "pooled_projections": pooled.to(dtype)}

    def encode_with(self, pipeline, encoders: list, texts: list[str], device: torch.device, dtype: torch.dtype,
                    settings: dict | None = None) -> dict[str, torch.Tensor]:
        import torch

        length = (settings or {}).get("max_sequence_length", 512)
        pooled = encoders[0](tokenize(pipeline.tokenizer, texts, device), output_hidden_states=False).pooler_output
        with torch.no_grad():  # T5 is frozen
            embeds = pipeline.text_encoder_2(tokenize(pipeline.tokenizer_2, texts, device, length))[0]
        return {"encoder_hidden_states": embeds.to(dtype), "pooled_projections": pooled.to(dtype)}

    # --- samples ---
    def sample_inputs(self, pipeline, prompt: str, device: torch.device, settings: dict | None = None
                      ) -> dict[str, Any]:
        length = (settings or {}).get("max_sequence_length", 512)
        embeds, pooled, _ = pipeline.encode_prompt(prompt, device=device, max_sequence_length=length)
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled, "max_sequence_length": length}

    def sampling_kwargs(self, config: TrainConfig) -> dict[str, Any]:
        """FLUX.1-dev draws with its distilled guidance (3.5 unless sample_guidance_scale is changed from its SD
        default; schnell has none and ignores it), not classifier-free guidance."""
        from lora_core.config import changed

        return {"guidance_scale": config.sample_guidance_scale if changed(config, "sample_guidance_scale")
                else SAMPLE_GUIDANCE}

    def spatial_latents(self, pipeline, drawn: torch.Tensor, height: int, width: int) -> torch.Tensor:
        return pipeline._unpack_latents(drawn, height, width, pipeline.vae_scale_factor)

    def comfyui_graph(self, settings: ComfySettings) -> dict[str, Any]:
        from lora_core.families.comfy import flux_graph

        return flux_graph(settings)

    # --- memory ---
    def offloadable_blocks(self, denoiser) -> list:
        # the order its forward runs them: the double-stream blocks, then the single-stream ones
        return list(denoiser.transformer_blocks) + list(denoiser.single_transformer_blocks)


