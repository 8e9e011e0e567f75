"""SD 3 and 3.5 (Medium, Large, Large Turbo; SD3 Medium): an MMDiT transformer (SD3Transformer2DModel) on
16-channel latents in 2x2 patches, conditioned on three text encoders: CLIP-L and CLIP-G (next-to-last hidden
states, concatenated and zero-padded to T5's width, and both pooled projections) and T5-XXL (its sequence after
theirs). T5 may be dropped for memory (`use_t5_encoder`: the pipeline's zeros then stand in for it). Trained as
diffusers' `train_dreambooth_lora_sd3.py` does: sigmas from the scheduler's grid (shifted by 3) drawn by
`timestep_sampling`, the model given sigma x 1000, output preconditioning on by default. Files are written in
kohya's names in the original (Stability) layout, q/k/v fused (flow_names.py), the names ComfyUI and Forge read.
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

ATTENTION = (r"transformer_blocks\.\d+\.(attn|attn2)\."
             r"(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)")
MLP = r"transformer_blocks\.\d+\.(ff|ff_context)\.net\.(0\.proj|2)"
# the second attention (`attn2`) of SD 3.5 Medium's dual-attention blocks is adapted too, which the default
# targets of diffusers' script miss
TARGETS = {"attention": ATTENTION, "attention_mlp": f"({ATTENTION}|{MLP})"}
SEQUENCE_LENGTH = 256  # T5 tokens, as the pipeline and kohya read them (diffusers' training script: 77)
# the parts an SD 3.x single file may bundle beside its transformer: component -> (name, a tensor that says so),
# in the names diffusers' single-file loader reads (ComfyUI's `..._incl_clips_t5xxl` files; Stability's
# sd3.5_medium.safetensors holds the VAE but no text encoder)
FILE_PARTS = {
    "text_encoder": ("CLIP-L", "text_encoders.clip_l.transformer.text_model.embeddings.position_embedding.weight"),
    "text_encoder_2": ("CLIP-G", "text_encoders.clip_g.transformer.text_model.embeddings.position_embedding.weight"),
    "text_encoder_3": ("T5-XXL", "text_encoders.t5xxl.transformer.shared.weight"),
}
VAE_PREFIXES = ("first_stage_model.", "vae.")
NAMES = {"sd3-medium": "SD 3 Medium", "sd35-medium": "SD 3.5 Medium", "sd35-large": "SD 3.5 Large"}


class SD3(FlowFamily):
    name = "sd3"
    display_name = "SD 3.x"
    detect_priority = 6
    single_file_builtin = "sd35m-arch"
    targets = TARGETS
    precondition_by_default = True  # as diffusers' train_dreambooth_lora_sd3.py
    components_examples = {"sd35-medium": "stabilityai/stable-diffusion-3.5-medium",
                           "sd35-large": "stabilityai/stable-diffusion-3.5-large",
                           "sd3-medium": "stabilityai/stable-diffusion-3-medium-diffusers"}

    def matches_folder(self, index: dict, denoiser_config: dict) -> bool:
        return index.get("_class_name") == "StableDiffusion3Pipeline" or (
            denoiser_config.get("_class_name") == "SD3Transformer2DModel" and "_class_name" not in index)

    def matches_single_file(self, keys: list[str]) -> bool:
        return any(key.endswith("joint_blocks.0.x_block.attn.qkv.weight") for key in keys)

    def variant(self, denoiser_config: dict) -> str:
        """sd-scripts' rule: q/k norms make it 3.5; dual-attention layers make that Medium, else Large."""
        if not denoiser_config.get("qk_norm"):
            return "sd3-medium"
        return "sd35-medium" if denoiser_config.get("dual_attention_layers") else "sd35-large"

    def single_file_variant(self, keys: list[str]) -> str:
        if not any(".ln_q." in key for key in keys):
            return "sd3-medium"
        return "sd35-medium" if any(".attn2." in key for key in keys) else "sd35-large"

    def latent_multiple(self, denoiser_config: dict) -> int:
        return int(denoiser_config.get("patch_size", 2))

    def single_file_latent_multiple(self) -> int:
        return 2

    def pipeline_class(self) -> type:
        from diffusers import StableDiffusion3Pipeline

        return StableDiffusion3Pipeline

    def single_file_missing(self, keys: list[str], config: TrainConfig | None = None) -> dict[str, str]:
        present = set(keys)
        missing = {part: label for part, (label, marker) in FILE_PARTS.items() if marker not in present}
        if config is not None and not config.use_t5_encoder:
            missing.pop("text_encoder_3", None)
        if not any(key.startswith(VAE_PREFIXES) for key in keys):
            missing["vae"] = "VAE"
        return missing

    def load_single_file(self, path: str, components: str | None, config: TrainConfig | None):
        """diffusers reads the transformer and whatever the file bundles; each missing part is loaded from the
        components and handed over (left to diffusers, a file bundling CLIP-L but not CLIP-G would have CLIP-L's
        weights tried on CLIP-G)."""
        from lora_core.families.flow_checkpoint import file_keys, folder_part

        kwargs: dict[str, Any] = self.load_kwargs(config)
        for part in self.single_file_missing(file_keys(path), config):
            kwargs.setdefault(part, folder_part(components, part))
        return self.pipeline_class().from_single_file(path, **({"config": components} if components else {}),
                                                      **kwargs)

    def load_kwargs(self, config: TrainConfig | None = None) -> dict[str, Any]:
        if config is not None and not config.use_t5_encoder:  # never load T5-XXL's 9.5 GB for nothing
            return {"text_encoder_3": None, "tokenizer_3": None}
        return {}

    def trim_pipeline(self, pipeline, config: TrainConfig | None):
        if config is not None and not config.use_t5_encoder:
            pipeline.register_modules(text_encoder_3=None, tokenizer_3=None)
        return pipeline

    def description(self, info: ModelInfo) -> str:
        return NAMES.get(info.variant, self.display_name)

    def run_description(self, info: ModelInfo, config: TrainConfig) -> str:
        return self.description(info) + ("" if config.use_t5_encoder else " without T5 (zeros in its place)")

    def block_count(self, denoiser_config: Any) -> int:
        return denoiser_config.num_layers

    def file_variant(self, variant: str) -> str:
        return variant or "sd35-medium"

    def check_config(self, config: TrainConfig) -> list[tuple[str, str]]:
        problems = super().check_config(config)
        from lora_core.config import changed

        if changed(config, "flux_guidance"):
            problems.append(("flux_guidance", "SD 3 has no guidance embedding (FLUX.1-dev's); leave it at 1.0"))
        return problems

    def run_settings(self, config: TrainConfig, info: ModelInfo) -> dict[str, Any]:
        return {"max_sequence_length": config.max_sequence_length or SEQUENCE_LENGTH}

    # --- the denoiser and its objective ---
    def predict(self, forward, noisy: torch.Tensor, levels: torch.Tensor, inputs: dict[str, Any]) -> torch.Tensor:
        return forward(hidden_states=noisy, timestep=levels.to(noisy.dtype) * 1000,
                       encoder_hidden_states=inputs["encoder_hidden_states"],
                       pooled_projections=inputs["pooled_projections"], return_dict=False)[0]

    # --- adapters and export ---
    def trainable_text_encoders(self, pipeline) -> list:
        return [pipeline.text_encoder, pipeline.text_encoder_2]  # the CLIPs; T5-XXL stays frozen

    def companion_files(self, denoiser, config: TrainConfig, text_encoders: list
                        ) -> dict[str, tuple[dict[str, torch.Tensor], dict[str, str]]]:
        """diffusers' SD 3 loader reads no kohya names and Forge no diffusers names, so no one file serves both:
        `lora_final.diffusers.safetensors` holds the same LoRA as diffusers' `transformer.` / `text_encoder.`
        names with alpha/rank folded into B (diffusers and ComfyUI read it at the trained strength)."""
        from lora_core import lora
        from lora_core.families.flow_names import diffusers_layout

        state = diffusers_layout(lora.adapter_tensors(denoiser, config))
        for name, encoder in zip(("text_encoder", "text_encoder_2"), text_encoders, strict=False):
            for path, (down, up, alpha) in lora.adapter_tensors(encoder, config).items():
                state[f"{name}.{path}.lora_A.weight"] = down.contiguous()
                state[f"{name}.{path}.lora_B.weight"] = (up * (alpha / down.shape[0])).contiguous()
        return {"diffusers": (state, {})}

    # --- conditioning ---
    def encode_captions(self, pipeline, texts: list[str], device: torch.device, dtype: torch.dtype,
                        settings: dict | None = None) -> dict[str, torch.Tensor]:
        length = (settings or {}).get("max_sequence_length", SEQUENCE_LENGTH)
        embeds, _, pooled, _ = pipeline.encode_prompt(texts, None, None, device=device, max_sequence_length=length,
                                                      do_classifier_free_guidance=False)
        return {"encoder_hidden_states": embeds.to(dtype), "pooled_projections": pooled.to(dtype)}

    def encode_with(self, pipeline, encoders: list, texts: list[str], device: torch.device, dtype: torch.dtype,
                    settings: dict | None = None) -> dict[str, torch.Tensor]:
        """What the pipeline's encode_prompt computes, through the trainable (wrapped) CLIPs."""
        import torch
        import torch.nn.functional as F

        length = (settings or {}).get("max_sequence_length", SEQUENCE_LENGTH)
        hidden, pooled = [], []
        for tokenizer, encoder in zip((pipeline.tokenizer, pipeline.tokenizer_2), encoders, strict=True):
            output = encoder(tokenize(tokenizer, texts, device), output_hidden_states=True)
            hidden.append(output.hidden_states[-2])
            pooled.append(output[0])
        with torch.no_grad():  # T5 is frozen (or absent: zeros)
            t5 = pipeline._get_t5_prompt_embeds(texts, max_sequence_length=length, device=device)
        clip = torch.cat(hidden, dim=-1)
        clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return {"encoder_hidden_states": torch.cat([clip, t5.to(clip.dtype)], dim=-2).to(dtype),
                "pooled_projections": torch.cat(pooled, dim=-1).to(dtype)}

    # --- samples ---
    def sample_inputs(self, pipeline, prompt: str, device: torch.device, settings: dict | None = None
                      ) -> dict[str, Any]:
        length = (settings or {}).get("max_sequence_length", SEQUENCE_LENGTH)
        positive, negative, positive_pooled, negative_pooled = pipeline.encode_prompt(
            prompt, None, None, device=device, do_classifier_free_guidance=True, negative_prompt="",
            max_sequence_length=length)
        return {"prompt_embeds": positive, "negative_prompt_embeds": negative,
                "pooled_prompt_embeds": positive_pooled, "negative_pooled_prompt_embeds": negative_pooled,
                "max_sequence_length": length}

    def comfyui_graph(self, settings: ComfySettings) -> dict[str, Any]:
        from lora_core.families.comfy import sd3_graph

        return sd3_graph(settings)

    # --- memory ---
    def offloadable_blocks(self, denoiser) -> list:
        return list(denoiser.transformer_blocks)  # in the order its forward runs them
