"""FLUX.1 (dev and schnell): a rectified-flow transformer (FluxTransformer2DModel) on 2x2-packed 16-channel
latents, conditioned on T5-XXL's sequence (512 tokens for dev, 256 for schnell) and CLIP-L's pooled output, with
a guidance embedding for dev. Trained as diffusers' `train_dreambooth_lora_flux.py` and kohya's sd-scripts do:
`x_t = (1 - sigma) x0 + sigma noise`, target `noise - x0`, the model given `sigma` as its timestep, guidance 1.0.
Files are written in the original (Black Forest Labs) layout's kohya names, q/k/v fused (flow_names.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lora_core.families.base import ACTIVATION_BYTES_PER_UNIT, Family, tokenize

if TYPE_CHECKING:
    import torch

    from lora_core.config import TrainConfig
    from lora_core.models import ModelInfo
    from lora_core.objective import Objective

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
# Saved activations per image token per block and hidden unit, in 2-byte units (q, k, v, attention output,
# the MLP's 4x expansion, norms and modulations): an estimate until bench/gpu_check.sh measures it
BLOCK_ACTIVATIONS_PER_HIDDEN = 30


class Flux(Family):
    name = "flux"
    display_name = "FLUX.1"
    detect_priority = 5
    single_file_builtin = "flux-dev-arch"
    denoiser = "transformer"
    flow_matching = True
    sampler_label = "flow-matching Euler"
    diffusers_reads_lora = False  # its file's original-layout names (diffusers: FLUX.1's own sizes only)
    offloads_blocks = True
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

    def check_config(self, config: TrainConfig) -> list[tuple[str, str]]:
        return flow_family_problems(self, config, TARGETS) + (
            [] if config.use_t5_encoder else [("use_t5_encoder", "FLUX.1 reads its captions through T5 alone (CLIP "
                                               "gives only a pooled vector); it cannot drop it")])

    def run_settings(self, config: TrainConfig, info: ModelInfo) -> dict[str, Any]:
        return {"max_sequence_length": config.max_sequence_length or SEQUENCE_LENGTHS.get(info.variant, 512),
                "guidance": config.flux_guidance if info.variant == "dev" else None}

    # --- the denoiser and its objective ---
    def objective(self, config: TrainConfig, scheduler_config: Any, info: ModelInfo) -> Objective:
        from diffusers import FlowMatchEulerDiscreteScheduler

        from lora_core.objective import FlowObjective

        scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
        grid = scheduler.sigmas[:len(scheduler.timesteps)]  # the training grid: sigma of each training timestep
        return FlowObjective(config, grid, precondition=config.precondition_outputs == "on",
                             tokens_per_latent_pixel=0.25)

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
    def denoiser_targets(self) -> dict[str, Any]:
        return TARGETS

    def add_denoiser_adapter(self, denoiser, config: TrainConfig) -> list[torch.nn.Parameter]:
        from lora_core import lora

        return lora.add_lora(denoiser, config, TARGETS[config.lora_target])

    def add_text_encoder_adapter(self, encoder, config: TrainConfig) -> list[torch.nn.Parameter]:
        from lora_core import lora

        return lora.add_text_encoder_lora(encoder, config)

    def trainable_text_encoders(self, pipeline) -> list:
        return [pipeline.text_encoder]  # CLIP-L, as kohya's `lora_te1_`; T5-XXL stays frozen

    def lora_file_contents(self, denoiser, config: TrainConfig, text_encoders: list
                           ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """kohya's names in the original layout, q/k/v (and the single blocks' MLP input) fused into one
        projection (flow_names.py); CLIP-L's LoRA under `lora_te1_`, as sd-scripts writes FLUX's."""
        from lora_core import lora
        from lora_core.families.flow_names import export_original

        state = export_original(denoiser, lora.adapter_tensors(denoiser, config))
        for encoder in text_encoders:
            state.update(lora.text_encoder_tensors(encoder, config, "lora_te1_"))
        return state, {}

    def metadata(self, prediction_type: str, variant: str = "") -> dict[str, str]:
        from lora_core.families.flow_names import flow_metadata

        return {**flow_metadata(f"flux-{variant or 'dev'}"), "ss_v2": "False",
                "modelspec.prediction_type": "flow"}

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

    def denoiser_inputs(self, text: dict[str, torch.Tensor], time_ids: torch.Tensor) -> dict[str, Any]:
        return {"encoder_hidden_states": text["encoder_hidden_states"],
                "pooled_projections": text["pooled_projections"]}

    # --- samples ---
    def sample_scheduler(self, scheduler_config: Any):
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)

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

    # --- memory ---
    def activation_units(self, denoiser_config: Any) -> float:
        """Per latent pixel (a quarter of a 2x2-packed token): every block saves about 30 x hidden 2-byte values
        per token, in ACTIVATION_BYTES_PER_UNIT's units (base.py)."""
        c = denoiser_config
        blocks = c.num_layers + c.num_single_layers
        hidden = c.num_attention_heads * c.attention_head_dim
        return blocks * hidden * BLOCK_ACTIVATIONS_PER_HIDDEN * 2 / 4 / ACTIVATION_BYTES_PER_UNIT

    def offloadable_blocks(self, denoiser) -> list:
        # the order its forward runs them: the double-stream blocks, then the single-stream ones
        return list(denoiser.transformer_blocks) + list(denoiser.single_transformer_blocks)

    def checkpointed_activation_share(self, denoiser_config: Any) -> float:
        c = denoiser_config
        return block_checkpointing_share(c.num_layers + c.num_single_layers)


def block_checkpointing_share(blocks: int) -> float:
    """diffusers checkpoints a transformer at every block: each keeps its input (one hidden-wide value per token
    of the BLOCK_ACTIVATIONS_PER_HIDDEN it would save), and one block at a time is recomputed whole in the
    backward. From the structure, not yet measured on a GPU (bench/gpu_check.sh)."""
    return 1 / BLOCK_ACTIVATIONS_PER_HIDDEN + 1 / blocks


def flow_family_problems(family: Family, config: TrainConfig, targets: dict) -> list[tuple[str, str]]:
    """The options a flow-matching family cannot honour (the UNet families' own, and what its export lacks)."""
    problems = []
    name = family.display_name
    from lora_core.config import changed

    if config.lora_target not in targets:
        problems.append(("lora_target", f"{name} has no convolutions to adapt; choose one of {', '.join(targets)}"))
    if changed(config, "min_snr_gamma") and config.min_snr_gamma:
        problems.append(("min_snr_gamma", f"min-SNR weighting is for the DDPM objective; {name} trains by "
                         "rectified flow: use loss_weighting instead, or set it to 0"))
    for option, why in (("zero_terminal_snr", "a DDPM schedule's"), ("noise_offset", "the UNet families'")):
        if getattr(config, option):
            problems.append((option, f"{option} is {why} option; {name} trains by rectified flow: turn it off"))
    if config.network_type != "lora" or config.use_dora:
        field = "use_dora" if config.use_dora else "network_type"
        problems.append((field, f"{name} LoRAs are written as plain LoRA (kohya's layout, fused q/k/v); LoHa, "
                         "LoKr and DoRA files for it are not written yet: use network_type 'lora' without DoRA"))
    return problems
