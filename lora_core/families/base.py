"""What every family provides. The Stable Diffusion UNet families share most of it (sd1.py); the flow-matching
transformers (sd3.py, flux.py) override the denoiser's call, the objective, the encoders and the file's names.

Everything that differs between model families is asked of the family: the engine never tests a family's name
(tests/test_layout.py checks that). docs/families.md explains each part with FLUX as the worked example.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # families are read when a model is inspected, before torch is needed
    import torch

    from lora_core.config import TrainConfig
    from lora_core.families.comfy import ComfySettings
    from lora_core.models import ModelInfo
    from lora_core.objective import Objective

# Activation bytes per latent pixel per activation unit (Family.activation_units), for one image at 2-byte
# precision: 37 from the tensors autograd saves in a bf16 LoRA step with flash attention (0.87 GiB for SD 1.5 at
# 512 px, 6.45 GiB for SDXL at 1024 px, counted on the CPU), x1.15 for the backward's transient buffers. To be
# confirmed against torch.cuda.max_memory_allocated by bench/gpu_check.sh (see bench/RESULTS.md).
ACTIVATION_BYTES_PER_UNIT = 42.0
CHECKPOINTING_FACTOR = 0.35  # the share of a UNet's activations kept with checkpointing (Family.checkpointed_...)
TEXT_ENCODER_ATTRIBUTES = ("text_encoder", "text_encoder_2", "text_encoder_3")  # a pipeline's, in its order
TOKENIZER_ATTRIBUTES = ("tokenizer", "tokenizer_2", "tokenizer_3")


def block_problems(family: Family, config: TrainConfig) -> list[tuple[str, str]]:
    """Block-wise rates and ranks (blocks.py): refused where the family has no UNet blocks, else their lengths
    checked against its layout."""
    from lora_core import blocks

    given = [name for name in blocks.FIELDS if getattr(config, name, "")]
    if given and not family.unet_blocks:
        return [(name, f"block-wise rates and ranks are for a UNet's blocks; {family.display_name} has none: "
                 "clear it") for name in given]
    try:
        if given:
            for conv in (False, True):
                blocks.dims_and_alphas(config, family.unet_blocks == "sdxl", conv)
    except blocks.BlockError as error:
        return [(error.field, str(error))]
    return []


class Family:
    name: str  # the id used in ModelInfo.family and the LoRA metadata: sd1 | sd2 | sdxl | sd3 | flux
    display_name: str  # for people: "SD 1.x"
    detect_priority: int  # detection tries families in ascending order; the most specific first
    single_file_builtin: str  # the built-in architecture whose parameters stand in for a single file's
    denoiser: str = "unet"  # the pipeline's attribute (and folder) holding the denoiser: unet | transformer
    vae_fp16_overflows: bool = False  # its VAE must run in fp32 where the rest runs in fp16
    flow_matching: bool = False  # trained with FlowObjective (the config's flow-matching options apply)
    sampler_label: str = "DPM-Solver"  # how samples are drawn, for people (a grid's title)
    diffusers_reads_lora: bool = True  # grids load its LoRA files with diffusers' load_lora_weights
    offloads_blocks: bool = False  # its denoiser is a chain of transformer blocks `offload_blocks` can offload
    unet_blocks: str = ""  # the block layout of block-wise rates and ranks (blocks.py): "sd", "sdxl"; "": none
    # variant -> a hub id holding the parts its single files may lack (the error message's example)
    components_examples: dict[str, str] = {}  # read only

    # --- recognising and loading ---
    def matches_folder(self, index: dict, denoiser_config: dict) -> bool:
        """A diffusers folder, from its model_index.json and its denoiser's config.json."""
        raise NotImplementedError

    def matches_single_file(self, keys: list[str]) -> bool:
        raise NotImplementedError

    def latent_multiple(self, denoiser_config: dict) -> int:
        """Latent sides must be a multiple of this (a UNet's down levels, a transformer's patch)."""
        raise NotImplementedError

    def single_file_latent_multiple(self) -> int:
        """The same for a single file, whose configs come only at load time."""
        raise NotImplementedError

    def pipeline_class(self) -> type:
        raise NotImplementedError

    def single_file_missing(self, keys: list[str], config: TrainConfig | None = None) -> dict[str, str]:
        """The pipeline's parts a single file with these tensor names lacks, {component: its name for people}:
        they must come from `pipeline_components`. {} when a file holds the whole model (the UNet families,
        whose configs diffusers reads from the family's hub repository)."""
        return {}

    def load_single_file(self, path: str, components: str | None, config: TrainConfig | None):
        """The pipeline from a single file, what it lacks from the `components` diffusers folder; None where
        the pipeline class's own `from_single_file` reads the file (the UNet families)."""
        return None

    def load_kwargs(self, config: TrainConfig | None = None) -> dict[str, Any]:
        """Extra keyword arguments for the pipeline's from_pretrained / from_single_file."""
        return {}

    def trim_pipeline(self, pipeline, config: TrainConfig | None):
        """The loaded pipeline without what the run does not use (SD 3 without T5); `load_kwargs` keeps a
        folder's from loading at all."""
        return pipeline

    def run_description(self, info: ModelInfo, config: TrainConfig) -> str:
        """The model as the started event names it, with what the run's options change about it."""
        return self.description(info)

    def check_config(self, config: TrainConfig) -> list[tuple[str, str]]:
        """(field, message) for each option this family cannot honour; the plan refuses the run with them."""
        if problems := block_problems(self, config):
            return problems
        if getattr(config, "offload_blocks", 0) and not self.offloads_blocks:
            return [("offload_blocks", f"offload_blocks moves a transformer's blocks to the CPU; {self.display_name}'s "
                     "UNet has no such chain of equal blocks (and fits a small card with base_quantization and "
                     "gradient checkpointing): set it to 0")]
        return []

    def description(self, info: ModelInfo) -> str:
        return self.display_name

    def variant(self, denoiser_config: dict) -> str:
        """Which model of the family a folder holds, where that matters (FLUX.1 dev or schnell); else ''."""
        return ""

    def single_file_variant(self, keys: list[str]) -> str:
        return ""

    def run_settings(self, config: TrainConfig, info: ModelInfo) -> dict[str, Any]:
        """What the run's options decide for the encoders and the denoiser's call (a T5 length, FLUX's training
        guidance): passed to `encode_*` and `sample_inputs`, and merged into `predict`'s inputs."""
        return {}

    # --- the denoiser and its objective ---
    def objective(self, config: TrainConfig, scheduler_config: Any, info: ModelInfo) -> Objective:
        raise NotImplementedError

    def predict(self, forward, noisy: torch.Tensor, levels: torch.Tensor, inputs: dict[str, Any]) -> torch.Tensor:
        """The denoiser's prediction for `noisy` latents (N, C, h, w) at the objective's `levels`, called through
        `forward` (the module, or its compiled form) with `inputs` (from `denoiser_inputs`); same shape back."""
        raise NotImplementedError

    # --- adapters and export ---
    def denoiser_targets(self) -> dict[str, Any]:
        """The denoiser's modules a LoRA adapts, for each `lora_target` this family accepts: a list of peft
        suffixes, or one regular expression over the whole module path (as peft reads a string)."""
        raise NotImplementedError

    def add_denoiser_adapter(self, denoiser, config: TrainConfig) -> list[torch.nn.Parameter]:
        raise NotImplementedError

    def add_text_encoder_adapter(self, encoder, config: TrainConfig) -> list[torch.nn.Parameter]:
        raise NotImplementedError

    def trainable_text_encoders(self, pipeline) -> list:
        """The text encoders that take a LoRA with train_text_encoder (SD 3 and FLUX keep T5 frozen)."""
        return text_encoders(pipeline)

    def quantizable_text_encoders(self, pipeline) -> list:
        """The text encoders `base_quantization` stores small while they stay on the device: those that never
        train (FLUX's and SD 3's T5-XXL, the biggest; none of SD's)."""
        trained = self.trainable_text_encoders(pipeline)
        return [e for e in text_encoders(pipeline) if not any(e is t for t in trained)]

    def lora_file_contents(self, denoiser, config: TrainConfig, text_encoders: list
                           ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """The exported file's tensors under this family's names, and the header entries the format needs."""
        raise NotImplementedError

    def companion_files(self, denoiser, config: TrainConfig, text_encoders: list
                        ) -> dict[str, tuple[dict[str, torch.Tensor], dict[str, str]]]:
        """Other layouts of the final LoRA for loaders that cannot read `lora_file_contents`' names, by a short
        name (`lora_final.<name>.safetensors`); none for most families."""
        return {}

    def metadata(self, prediction_type: str, variant: str = "") -> dict[str, str]:
        """The LoRA header's rows that name the base model's kind: `modelspec.architecture`,
        `modelspec.implementation`, `ss_base_model_version`, `ss_v2`."""
        raise NotImplementedError

    # --- conditioning ---
    def encode_captions(self, pipeline, texts: list[str], device: torch.device, dtype: torch.dtype,
                        settings: dict | None = None) -> dict[str, torch.Tensor]:
        """Captions -> text conditioning from the pipeline's frozen text encoders."""
        raise NotImplementedError

    def encode_with(self, pipeline, encoders: list, texts: list[str], device: torch.device,
                    dtype: torch.dtype, settings: dict | None = None) -> dict[str, torch.Tensor]:
        """The same through `encoders`, the trainable ones (`trainable_text_encoders`) wrapped for training, so
        `pipeline.encode_prompt` cannot call them; tokenizers and any frozen encoder come from `pipeline`."""
        raise NotImplementedError

    def denoiser_inputs(self, text: dict[str, torch.Tensor], time_ids: torch.Tensor) -> dict[str, Any]:
        """The denoiser's conditioning from the text conditioning and the batch's size/crop ids (rows of
        orig h, orig w, crop top, crop left, target h, target w)."""
        raise NotImplementedError

    # --- samples ---
    def sample_scheduler(self, scheduler_config: Any):
        """The scheduler samples, grids and sweeps draw with."""
        raise NotImplementedError

    def sample_inputs(self, pipeline, prompt: str, device: torch.device, settings: dict | None = None
                      ) -> dict[str, Any]:
        """The sample pipeline's keyword arguments for one prompt (with the empty negative prompt), encoded."""
        raise NotImplementedError

    def spatial_latents(self, pipeline, drawn: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """The latents a pipeline returns with output_type 'latent', as (N, C, h, w) for the VAE (FLUX's are
        packed into tokens)."""
        return drawn

    def sampling_kwargs(self, config: TrainConfig) -> dict[str, Any]:
        """The sample pipeline's guidance arguments."""
        return {"guidance_scale": config.sample_guidance_scale}

    def comfyui_graph(self, settings: ComfySettings) -> dict[str, Any]:
        """The ComfyUI workflow (API format) that draws as the run's samples do (families/comfy.py)."""
        from lora_core.families.comfy import checkpoint_graph

        return checkpoint_graph(settings)

    # --- memory ---
    def activation_units(self, denoiser_config: Any) -> float:
        """What the denoiser's saved activations per latent pixel scale with (ACTIVATION_BYTES_PER_UNIT)."""
        raise NotImplementedError

    def offloadable_blocks(self, denoiser) -> list:
        """The denoiser's blocks `offload_blocks` may keep on the CPU, in the order the forward runs them (the
        first N are offloaded); none for a UNet."""
        return []

    def checkpointed_activation_share(self, denoiser_config: Any) -> float:
        """The share of those activations gradient checkpointing keeps (a UNet checkpoints its ResNet and
        attention blocks: about a third, CHECKPOINTING_FACTOR)."""
        return CHECKPOINTING_FACTOR


def tokenize(tokenizer, texts: list[str], device: torch.device, max_length: int | None = None) -> torch.Tensor:
    return tokenizer(texts, padding="max_length", max_length=max_length or tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids.to(device)


def tokenizers(pipeline) -> list:
    return [t for t in (getattr(pipeline, name, None) for name in TOKENIZER_ATTRIBUTES) if t is not None]


def text_encoders(pipeline) -> list:
    """Every text encoder of a pipeline, in its order (SD 3 has three; a dropped T5 is None and not listed)."""
    return [e for e in (getattr(pipeline, name, None) for name in TEXT_ENCODER_ATTRIBUTES) if e is not None]
