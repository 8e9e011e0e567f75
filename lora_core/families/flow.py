"""What the flow-matching transformer families (FLUX.1, flux.py; SD 3.x, sd3.py) share: a transformer denoiser
trained by rectified flow on the scheduler's grid, LoRA targets as one regular expression per `lora_target`,
files in the original layout's kohya names with q/k/v fused (flow_names.py), the CLIPs' LoRA under
`lora_te1_` / `lora_te2_`, flow-matching Euler samples, and the memory figures of a stack of blocks. A family
says its targets, its block count, its file variant and whether it preconditions by default."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lora_core.families.base import ACTIVATION_BYTES_PER_UNIT, Family, block_problems

if TYPE_CHECKING:
    import torch

    from lora_core.config import TrainConfig
    from lora_core.models import ModelInfo
    from lora_core.objective import Objective

# Saved activations per image token per block and hidden unit, in 2-byte units (q, k, v, attention output,
# the MLP's 4x expansion, norms and modulations): an estimate until bench/gpu_check.sh measures it
BLOCK_ACTIVATIONS_PER_HIDDEN = 30
TOKENS_PER_LATENT_PIXEL = 0.25  # FLUX packs 2x2 latent pixels into a token, SD 3 patchifies 2x2


class FlowFamily(Family):
    denoiser = "transformer"
    flow_matching = True
    sampler_label = "flow-matching Euler"
    diffusers_reads_lora = False  # its file's original-layout names (diffusers: FLUX.1's own sizes only)
    offloads_blocks = True
    targets: dict[str, str]  # lora_target -> one regular expression over the module path (peft's string form)
    precondition_by_default = False  # precondition_outputs 'auto'

    def block_count(self, denoiser_config: Any) -> int:
        raise NotImplementedError

    def file_variant(self, variant: str) -> str:
        """The variant as flow_names' metadata table names it (`flux-dev`, `sd35-medium`)."""
        raise NotImplementedError

    def check_config(self, config: TrainConfig) -> list[tuple[str, str]]:
        return flow_family_problems(self, config, self.targets)

    # --- the denoiser and its objective ---
    def objective(self, config: TrainConfig, scheduler_config: Any, info: ModelInfo) -> Objective:
        from diffusers import FlowMatchEulerDiscreteScheduler

        from lora_core.objective import FlowObjective

        scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
        grid = scheduler.sigmas[:len(scheduler.timesteps)]  # the training grid: sigma of each training timestep
        precondition = config.precondition_outputs == "on" or (config.precondition_outputs == "auto"
                                                               and self.precondition_by_default)
        return FlowObjective(config, grid, precondition, TOKENS_PER_LATENT_PIXEL)

    # --- adapters and export ---
    def denoiser_targets(self) -> dict[str, Any]:
        return self.targets

    def add_denoiser_adapter(self, denoiser, config: TrainConfig) -> list[torch.nn.Parameter]:
        from lora_core import lora

        return lora.add_lora(denoiser, config, self.targets[config.lora_target])

    def add_text_encoder_adapter(self, encoder, config: TrainConfig) -> list[torch.nn.Parameter]:
        from lora_core import lora

        return lora.add_text_encoder_lora(encoder, config)

    def lora_file_contents(self, denoiser, config: TrainConfig, text_encoders: list
                           ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """kohya's names in the original layout, q/k/v (and FLUX's single blocks' MLP input) fused into one
        projection (flow_names.py), the names ComfyUI, Forge and sd-scripts read; the trained CLIPs' LoRA under
        `lora_te1_` (CLIP-L) and `lora_te2_` (SD 3's CLIP-G), as sd-scripts writes them."""
        from lora_core import lora
        from lora_core.families.flow_names import export_original

        state = export_original(denoiser, lora.adapter_tensors(denoiser, config))
        for index, encoder in enumerate(text_encoders):
            state.update(lora.text_encoder_tensors(encoder, config, f"lora_te{index + 1}_"))
        return state, {}

    def metadata(self, prediction_type: str, variant: str = "") -> dict[str, str]:
        from lora_core.families.flow_names import flow_metadata

        return {**flow_metadata(self.file_variant(variant)), "ss_v2": "False", "modelspec.prediction_type": "flow"}

    # --- conditioning and samples ---
    def denoiser_inputs(self, text: dict[str, torch.Tensor], time_ids: torch.Tensor) -> dict[str, Any]:
        return {"encoder_hidden_states": text["encoder_hidden_states"],
                "pooled_projections": text["pooled_projections"]}

    def sample_scheduler(self, scheduler_config: Any):
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)

    # --- memory ---
    def activation_units(self, denoiser_config: Any) -> float:
        """Per latent pixel (a quarter of a token): every block saves about BLOCK_ACTIVATIONS_PER_HIDDEN x hidden
        2-byte values per token, in ACTIVATION_BYTES_PER_UNIT's units (base.py)."""
        c = denoiser_config
        hidden = c.num_attention_heads * c.attention_head_dim
        return (self.block_count(c) * hidden * BLOCK_ACTIVATIONS_PER_HIDDEN * 2 * TOKENS_PER_LATENT_PIXEL
                / ACTIVATION_BYTES_PER_UNIT)

    def checkpointed_activation_share(self, denoiser_config: Any) -> float:
        return block_checkpointing_share(self.block_count(denoiser_config))


def block_checkpointing_share(blocks: int) -> float:
    """diffusers checkpoints a transformer at every block: each keeps its input (one hidden-wide value per token
    of the BLOCK_ACTIVATIONS_PER_HIDDEN it would save), and one block at a time is recomputed whole in the
    backward. From the structure, not yet measured on a GPU (bench/gpu_check.sh)."""
    return 1 / BLOCK_ACTIVATIONS_PER_HIDDEN + 1 / blocks


def flow_family_problems(family: Family, config: TrainConfig, targets: dict) -> list[tuple[str, str]]:
    """The options a flow-matching family cannot honour (the UNet families' own, and what its export lacks)."""
    from lora_core.config import changed
    from lora_core.config_loss import DDPM_ONLY

    problems = block_problems(family, config)
    name = family.display_name
    if config.lora_target not in targets:
        problems.append(("lora_target", f"{name} has no convolutions to adapt; choose one of {', '.join(targets)}"))
    if changed(config, "min_snr_gamma") and config.min_snr_gamma:
        problems.append(("min_snr_gamma", f"min-SNR weighting is for the DDPM objective; {name} trains by "
                         "rectified flow: use loss_weighting instead, or set it to 0"))
    for option, why in (("zero_terminal_snr", "a DDPM schedule's"), ("noise_offset", "the UNet families'")):
        if getattr(config, option):
            problems.append((option, f"{option} is {why} option; {name} trains by rectified flow: turn it off"))
    problems += [(option, f"{option} is an option of the DDPM objective (SD 1.x/2.x/SDXL); {name} trains by "
                  "rectified flow (its noise levels: timestep_sampling, its weighting: loss_weighting): put it "
                  "back to its default") for option in DDPM_ONLY if changed(config, option)]
    if config.loss_type in ("huber", "smooth_l1") and config.huber_schedule == "snr":
        problems.append(("huber_schedule", f"the snr schedule reads a DDPM noise schedule, which {name}'s rectified "
                         "flow has none of: choose huber_schedule 'exponential' or 'constant'"))
    if config.network_type != "lora" or config.use_dora:
        field = "use_dora" if config.use_dora else "network_type"
        problems.append((field, f"{name} LoRAs are written as plain LoRA (kohya's layout, fused q/k/v); LoHa, "
                         "LoKr and DoRA files for it are not written yet: use network_type 'lora' without DoRA"))
    return problems
