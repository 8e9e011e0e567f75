"""The training configuration: one pydantic model, the single source of every rule and range.

The CLI, the web page, the presets and `config_schema.json` all derive from `TrainConfig`.
A config file may give the optional fields flat or nested under `training_params`. A file is read with
strict types (`"steps": "2"` or `true` is an error, as is `"bucketing": "yes"`); the page's form, whose
widgets give numbers as floats, converts its own values (`parse_config(..., strict=False)`).
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
    model_validator,
)

from lora_core.compile_rules import cuda_graphs_conflict
from lora_core.config_concepts import ConceptOptions
from lora_core.config_ema import EmaOptions, MaskOptions
from lora_core.config_flow import MAX_PATH_CHARS, FlowMatchingOptions, path_text_problem
from lora_core.config_loss import OPTIMIZER_NOTES, LossOptions
from lora_core.config_memory import MemoryOptions
from lora_core.config_paths import DATA_PATH
from lora_core.config_scoring import ScoringOptions
from lora_core.errors import FieldConflict, UserError

UNET_FAMILIES = ["sd1", "sd2", "sdxl"]  # the form hint of the DDPM objective's options (flow families refuse them)
REQUIRED_FIELDS = ("dataset_path", "base_model", "output_path", "trigger_words")
NESTED_KEY = "training_params"
DEFAULT_STEPS = 1000  # the run length when a config gives neither steps nor epochs (plan.run_length)
LENGTH_FIELDS = ("steps", "epochs")
PATH_FIELDS = ("dataset_path", "base_model", "output_path")
MAX_CONFIG_BYTES = 4 * 1024**2  # a config is a few kB; more is a mistake (or an attack on the parser)
MAX_VALIDATION_IMAGES = 10_000  # held out by count; a validation pass over more would cost more than it tells
MAX_SHOWN_CHARS = 120  # of a value quoted back in an error message
# Text that reaches a text encoder: CLIP reads 75 tokens (about 300 characters; sd-scripts' long prompts 225).
MAX_TRIGGER_WORDS, MAX_TRIGGER_CHARS, MAX_PROMPT_CHARS = 32, 200, 2000
TriggerWord = Annotated[str, StringConstraints(max_length=MAX_TRIGGER_CHARS)]
Prompt = Annotated[str, StringConstraints(max_length=MAX_PROMPT_CHARS)]


def _ui(group: str, **extra: Any) -> dict[str, Any]:
    """Hints for the web page: which panel a field sits in (basic / advanced / sampling)."""
    return {"group": group, **extra}


class CoreOptions(BaseModel):
    """The options every family has (TrainConfig adds the flow-matching families' own, config_flow.py)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # --- required ---
    dataset_path: str = Field(description="Folder of images with optional same-named .txt captions.",
                              min_length=1, max_length=MAX_PATH_CHARS, json_schema_extra=_ui("basic", **DATA_PATH))
    base_model: str = Field(
        description="'builtin:tiny-sd', a Hugging Face hub id, a local diffusers folder, "
        "or a single-file .safetensors checkpoint.", min_length=1, max_length=MAX_PATH_CHARS,
        json_schema_extra=_ui("basic"))
    output_path: str = Field(description="Folder for checkpoints, samples, the final LoRA and events.",
                             min_length=1, max_length=MAX_PATH_CHARS, json_schema_extra=_ui("basic"))
    trigger_words: list[TriggerWord] = Field(
        description="Words put in front of every caption (or used as the caption where there is none).",
        min_length=1, max_length=MAX_TRIGGER_WORDS, json_schema_extra=_ui("basic"))

    # --- length ---
    steps: int | None = Field(None, ge=1, le=1_000_000, description=(
        "Optimizer steps to run. When given, training runs exactly this many; when only `epochs` is given, the "
        f"length comes from epochs; when neither is, {DEFAULT_STEPS} steps."),
        json_schema_extra=_ui("basic", form_default=DEFAULT_STEPS))
    epochs: int | None = Field(None, ge=1, le=10_000, description=(
        "Passes over the dataset; decides the length only when `steps` is not given."),
        json_schema_extra=_ui("basic", form_default=10))

    # --- optimisation ---
    learning_rate: float = Field(1e-4, gt=0, le=1.0, description="AdamW learning rate for the LoRA weights.",
                                 json_schema_extra=_ui("basic", step=1e-5))
    batch_size: int = Field(1, ge=1, le=64, description="Images per step on each device.",
                            json_schema_extra=_ui("basic"))
    gradient_accumulation_steps: int = Field(1, ge=1, le=1024, description=(
        "Batches whose gradients are summed before one optimizer step."), json_schema_extra=_ui("advanced"))
    optimizer: Literal["adamw", "adamw8bit", "paged_adamw8bit", "prodigy", "adafactor", "lion", "lion8bit",
                       "paged_lion8bit", "adamw_schedulefree", "came"] = Field("adamw", description=(
        "adamw (fused on CUDA and the CPU); adamw8bit keeps AdamW's moments in 8 bits (bitsandbytes); "
        "paged_adamw8bit also pages them to host memory when the GPU runs short (bitsandbytes, CUDA only); "
        "prodigy (prodigyopt) sets its own step size: use learning_rate 1.0 with it; adafactor; " + OPTIMIZER_NOTES),
        json_schema_extra=_ui("advanced"))
    lr_scheduler: Literal["constant", "linear", "cosine", "cosine_with_restarts"] = Field(
        "constant", description="Learning-rate schedule after warmup.", json_schema_extra=_ui("advanced"))
    lr_scheduler_num_cycles: int = Field(1, ge=1, le=100, description=(
        "Hard restarts for cosine_with_restarts."), json_schema_extra=_ui("advanced"))
    lr_warmup_steps: int = Field(0, ge=0, le=100_000, description="Steps of linear warmup from 0.",
                                 json_schema_extra=_ui("advanced"))
    adam_weight_decay: float = Field(1e-2, ge=0, le=1.0, description="AdamW weight decay.",
                                     json_schema_extra=_ui("advanced"))
    min_snr_gamma: float = Field(5.0, ge=0, le=20, description=(
        "Min-SNR loss weighting gamma (5 is the usual choice); 0 turns it off. SD 1.x/2.x/SDXL (DDPM) only."),
        json_schema_extra=_ui("advanced", families=UNET_FAMILIES))
    noise_offset: float = Field(0.0, ge=0, le=1.0, description=(
        "Add this much per-channel offset noise (about 0.05) so very dark or bright images can be learned."),
        json_schema_extra=_ui("advanced", families=UNET_FAMILIES))
    zero_terminal_snr: bool = Field(False, description=(
        "Rescale the noise schedule so the last timestep is pure noise; for v-prediction models."),
        json_schema_extra=_ui("advanced", families=UNET_FAMILIES))
    max_grad_norm: float = Field(1.0, ge=0, le=1000, description="Gradient clipping norm; 0 turns clipping off.",
                                 json_schema_extra=_ui("advanced"))
    seed: int = Field(42, ge=0, le=2**32 - 1, description="Seed for noise, timesteps, data order and LoRA init.",
                      json_schema_extra=_ui("advanced"))

    # --- the LoRA ---
    lora_rank: int = Field(16, ge=1, le=256, description="LoRA rank (network dim).", json_schema_extra=_ui("basic"))
    lora_alpha: float = Field(32, gt=0, le=1024, description="LoRA alpha; the update is scaled by alpha / rank.",
                              json_schema_extra=_ui("basic"))
    network_type: Literal["lora", "loha", "lokr"] = Field("lora", description=(
        "lora: low-rank matrices (every loader reads them); loha (LoHa) or lokr (LoKr): LyCORIS's Hadamard and "
        "Kronecker products, written in LyCORIS's layout, which ComfyUI, A1111, Forge and the studio's own tools "
        "read but diffusers' load_lora_weights does not. lora_rank, lora_alpha and lora_target apply to all three."),
        json_schema_extra=_ui("advanced"))
    lokr_factor: int = Field(-1, ge=-1, le=1024, description=(
        "LoKr only: the Kronecker factor's size (LyCORIS's factor); -1 splits each dimension near its square "
        "root."), json_schema_extra=_ui("advanced"))
    lora_target: Literal["attention", "attention_mlp", "locon"] = Field("attention", description=(
        "Which UNet layers get a LoRA: the attention projections; plus the feed-forward and projection "
        "layers; or all that plus the ResNet convolutions (LoCon)."), json_schema_extra=_ui("advanced"))
    lora_dropout: float = Field(0.0, ge=0, lt=1, description=(
        "Dropout on the LoRA path during training (for loha/lokr: LyCORIS's rank dropout)."),
        json_schema_extra=_ui("advanced"))
    use_dora: bool = Field(False, description=(
        "DoRA: learn each adapted weight's magnitude apart from its direction (often closer to a full "
        "fine-tune at the same rank; steps are slower). Written in LyCORIS's kohya layout (dora_scale), which "
        "LyCORIS and the studio apply exactly; ComfyUI, Forge and A1111 load it but compute DoRA differently "
        "(see the README's loader table)."),
        json_schema_extra=_ui("advanced"))
    train_text_encoder: bool = Field(False, description=(
        "Also train a LoRA on the text encoder(s) (their attention projections), at text_encoder_lr. Captions are "
        "then encoded every step and the text encoders stay on the device (more memory, slower steps)."),
        json_schema_extra=_ui("advanced"))
    text_encoder_lr: float = Field(1e-5, gt=0, le=1.0, description=(
        "Learning rate for the text-encoder LoRA when train_text_encoder is on; usually well below "
        "learning_rate."), json_schema_extra=_ui("advanced", step=1e-6))

    # --- data ---
    resolution: int = Field(512, ge=64, le=2048, multiple_of=8, description=(
        "Training size in pixels (square); must also be a multiple of the model's pixel step (64 for SD, 16 "
        "for builtin:toy-sd, whose own size is 64)."),
        json_schema_extra=_ui("basic", step=64))
    bucketing: bool = Field(True, description=(
        "Aspect-ratio bucketing: train each image at about resolution² pixels in the shape (bucket) nearest its "
        "aspect ratio instead of a centre square; a batch never mixes buckets. Off: every image square."),
        json_schema_extra=_ui("basic"))
    min_bucket_resolution: int = Field(256, ge=64, le=4096, multiple_of=8, description=(
        "Shortest bucket side in pixels (rounded up to the model's multiple); at most resolution."),
        json_schema_extra=_ui("advanced", step=64))
    max_bucket_resolution: int = Field(2048, ge=64, le=4096, multiple_of=8, description=(
        "Longest bucket side in pixels; at least resolution."), json_schema_extra=_ui("advanced", step=64))
    bucket_no_upscale: bool = Field(False, description=(
        "Never enlarge an image smaller than its bucket: it gets a bucket of its own size (rounded down to the "
        "model's multiple) instead."), json_schema_extra=_ui("advanced"))
    crop: Literal["center", "random"] = Field("center", description=(
        "Where to cut an image that overhangs its bucket. 'random' picks a new crop every step, which cached "
        "latents cannot follow: it needs latent_cache 'off'."), json_schema_extra=_ui("advanced"))
    flip_horizontal: bool = Field(False, description=(
        "Mirror each image at random (half the steps); cached latents hold both sides. Leave off for "
        "asymmetric subjects or text."), json_schema_extra=_ui("advanced"))
    repeats: int = Field(1, ge=1, le=1000, description=(
        "Times each image appears per epoch (kohya's folder repeats)."), json_schema_extra=_ui("basic"))
    trigger_placement: Literal["first", "shuffled", "none"] = Field("first", description=(
        "'first': the trigger words lead every caption and stay first when tags are shuffled; 'shuffled': "
        "they lead it but shuffle like other tags (beyond keep_tokens); 'none': captions are used as written "
        "(put the trigger words in them), and images without a caption get the trigger words."),
        json_schema_extra=_ui("advanced"))
    shuffle_tags: bool = Field(False, description=(
        "Shuffle the comma-separated tags of each caption every step (for tag-style captions). The captions "
        "are then encoded every step instead of once."), json_schema_extra=_ui("advanced"))
    keep_tokens: int = Field(0, ge=0, le=255, description=(
        "With shuffle_tags, the first N tags stay in place; the trigger words count."),
        json_schema_extra=_ui("advanced"))
    caption_dropout: float = Field(0.0, ge=0, le=1.0, description=(
        "Probability that an image trains with an empty caption (unconditional) on a step; about 0.05 helps "
        "the LoRA respond to guidance."), json_schema_extra=_ui("advanced"))
    latent_cache: Literal["memory", "disk", "off"] = Field("memory", description=(
        "Encode each image with the VAE once, before training: 'memory' keeps the latents on the device; "
        "'disk' stores them under <output_path>/cache (reused by later runs while the image, bucket, crop, "
        "flip and model are unchanged) and reads them each step; 'off' encodes every step."),
        json_schema_extra=_ui("advanced"))

    # --- device ---
    device: Literal["auto", "cuda", "cpu"] = Field("auto", description="Where to train; auto takes CUDA when present.",
                                                   json_schema_extra=_ui("advanced"))
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = Field("auto", description=(
        "auto: bf16 on GPUs that have it, else fp16 on CUDA, fp32 on CPU."), json_schema_extra=_ui("advanced"))
    gradient_checkpointing: Literal["auto", "on", "off"] = Field("auto", description=(
        "Recompute the UNet's activations in the backward pass instead of keeping them: far less memory, slower "
        "steps. auto: on only when the memory estimate says the run would not fit in the GPU's free memory "
        "otherwise (never on the CPU). true/false read as on/off."), json_schema_extra=_ui("advanced"))
    compile_unet: Literal["auto", "on", "off"] = Field("auto", description=("Compile the UNet's repeated blocks (regional torch.compile): faster steps after a one-off compile of minutes on a CPU. auto: on when the run is long enough to win it back (never for the demo). true/false read as on/off."), json_schema_extra=_ui("advanced"))  # noqa: E501
    cuda_graphs: bool = Field(False, description=("Capture the compiled blocks as CUDA graphs (mode reduce-overhead) for small-batch steps. CUDA only, no text-encoder training; where it cannot apply at run time (changing batch shapes, ...) the run compiles without graphs and the started event says why."), json_schema_extra=_ui("advanced"))  # noqa: E501

    # --- events and outputs ---
    checkpoint_steps: int = Field(500, ge=1, le=1_000_000, description="Save a LoRA every N steps.",
                                  json_schema_extra=_ui("basic"))
    validation_steps: int = Field(100, ge=1, le=1_000_000, description=(
        "Make sample images every N steps (and at the end); also the validation loss's cadence while "
        "validation_loss_steps is 0."), json_schema_extra=_ui("sampling"))
    validation_images: int | float | None = Field(None, description=(
        "Hold out images of dataset_path for a validation loss; they never train. A whole number is a count "
        "(2), a number below 1 a fraction of the images (0.1 = 10 %, at least one image). The held-out images "
        "are picked by their file names, not the seed, so runs compare on the same ones. Empty: none."),
        json_schema_extra=_ui("sampling", allowed=f"a count [1, {MAX_VALIDATION_IMAGES}] or a fraction (0, 1)"))
    validation_dataset_path: str | None = Field(None, min_length=1, max_length=MAX_PATH_CHARS, description=(
        "Instead of validation_images: a separate folder of held-out images (with optional .txt captions, "
        "read like dataset_path's) for the validation loss."), json_schema_extra=_ui("sampling", **DATA_PATH))
    validation_loss_steps: int = Field(0, ge=0, le=1_000_000, description=(
        "With held-out images, compute their denoising loss (fixed noise and timesteps, the same every time) "
        "every N steps and at the end; 0: every validation_steps."), json_schema_extra=_ui("sampling"))
    keep_checkpoints: int = Field(3, ge=1, le=1000, description=(
        "Training states (for --resume) to keep; older ones are deleted once a newer one is complete. "
        "Every checkpoint's LoRA file is kept."), json_schema_extra=_ui("advanced"))
    max_nonfinite_steps: int = Field(5, ge=1, le=1000, description=(
        "Stop with an error after this many steps in a row whose loss or gradients were NaN/inf "
        "(each such step is skipped, not applied)."), json_schema_extra=_ui("advanced"))
    progress_steps: int = Field(1, ge=1, le=10_000, description=(
        "Emit a progress event every N steps (the loss is read back from the device only then)."),
        json_schema_extra=_ui("advanced"))
    log_with: Literal["none", "tensorboard"] = Field("none", description=(
        "Also log loss, learning rate and sample images for TensorBoard, in <output_path>/logs "
        "(needs the tensorboard package)."), json_schema_extra=_ui("advanced"))
    sample_prompts: list[Prompt] = Field(default_factory=list, max_length=16, description=(
        "Prompts for sample images; empty means the trigger words."), json_schema_extra=_ui("sampling"))
    sample_inference_steps: int = Field(20, ge=1, le=150, description="Denoising steps per sample image.",
                                        json_schema_extra=_ui("sampling"))
    sample_guidance_scale: float = Field(7.0, ge=1.0, le=30.0, description="Classifier-free guidance for samples.",
                                         json_schema_extra=_ui("sampling"))

    @field_validator("trigger_words", mode="before")
    @classmethod
    def _one_word_is_a_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("gradient_checkpointing", "compile_unet", mode="before")
    @classmethod
    def _bool_is_on_or_off(cls, value: Any) -> Any:
        return ("on" if value else "off") if isinstance(value, bool) else value

    @field_validator("trigger_words", "sample_prompts")
    @classmethod
    def _no_blank_strings(cls, value: list[str]) -> list[str]:
        if any(not item.strip() for item in value):
            raise ValueError("entries must not be blank")
        return value

    @field_validator("validation_images", mode="before")
    @classmethod
    def _not_a_bool(cls, value: Any) -> Any:
        if isinstance(value, bool):  # true would read as 1 image, which nobody means
            raise ValueError("must be a number: a count of images or a fraction below 1, not true/false")
        return value

    @field_validator("validation_images")
    @classmethod
    def _a_count_or_a_fraction(cls, value: int | float | None) -> int | float | None:
        if value is None:
            return None
        if not math.isfinite(value) or value <= 0:
            raise ValueError("must be a count of images (1 or more) or a fraction between 0 and 1 (0.1 = 10 %); "
                             "leave it empty to hold out none")
        if value < 1:
            return float(value)
        if value != int(value):
            raise ValueError(f"{value:g} is neither a whole count of images nor a fraction below 1; use a count "
                             f"such as {int(value)}, or a fraction such as 0.1")
        if value > MAX_VALIDATION_IMAGES:
            raise ValueError(f"at most {MAX_VALIDATION_IMAGES} images can be held out")
        return int(value)

    @field_validator(*PATH_FIELDS, "validation_dataset_path")
    @classmethod
    def _a_path_has_no_control_characters(cls, value: str | None) -> str | None:
        if value is not None and (problem := path_text_problem(value)):
            raise ValueError(problem)
        return value

    @model_validator(mode="before")
    @classmethod
    def _old_cache_latents_name(cls, data: Any) -> Any:
        """`cache_latents: true/false` (before latent_cache existed) still reads as 'memory' / 'off'."""
        if not isinstance(data, dict) or "cache_latents" not in data:
            return data
        data = dict(data)
        old = data.pop("cache_latents")
        if not isinstance(old, bool):
            raise FieldConflict(("cache_latents",), "is the old name of latent_cache and must be true or false; "
                                "better, use latent_cache 'memory' or 'off'")
        mapped = "memory" if old else "off"
        if data.setdefault("latent_cache", mapped) != mapped:
            raise FieldConflict(("cache_latents", "latent_cache"), f"cache_latents {old} (the old name of "
                                f"latent_cache) contradicts latent_cache {data['latent_cache']!r}; remove "
                                "cache_latents")
        return data

    @model_validator(mode="after")
    def _data_fields_agree(self) -> CoreOptions:
        if self.crop == "random" and self.latent_cache != "off":
            raise FieldConflict(("crop", "latent_cache"), f"crop 'random' cuts a new crop every step, which "
                                f"latents cached once (latent_cache {self.latent_cache!r}) cannot follow; set "
                                "crop to 'center', or latent_cache to 'off'")
        if self.cuda_graphs and (conflict := cuda_graphs_conflict(self)):
            raise FieldConflict(("cuda_graphs", conflict[0]), conflict[1])
        if self.bucketing and not self.min_bucket_resolution <= self.resolution <= self.max_bucket_resolution:
            raise FieldConflict(("min_bucket_resolution", "max_bucket_resolution", "resolution"),
                                f"with bucketing, resolution {self.resolution} must lie between "
                                f"min_bucket_resolution {self.min_bucket_resolution} and max_bucket_resolution "
                                f"{self.max_bucket_resolution}; change one of them")
        return self

    @model_validator(mode="after")
    def _validation_options_agree(self) -> CoreOptions:
        if self.validation_images is not None and self.validation_dataset_path is not None:
            raise FieldConflict(("validation_images", "validation_dataset_path"), "hold out images either from "
                                "dataset_path (validation_images) or from a separate folder "
                                "(validation_dataset_path), not both; clear one of them")
        if self.validation_dataset_path is not None and os.path.normpath(self.validation_dataset_path) == \
                os.path.normpath(self.dataset_path):
            raise FieldConflict(("validation_dataset_path",), "is dataset_path itself, whose images all train; "
                                "give a folder of other images, or use validation_images to hold some out")
        return self

    @model_validator(mode="after")
    def _network_options_agree(self) -> CoreOptions:
        if self.use_dora and self.network_type != "lora":
            raise FieldConflict(("use_dora", "network_type"), f"DoRA is a LoRA variant; network_type "
                                f"{self.network_type!r} cannot use it: turn use_dora off or use network_type 'lora'")
        if self.lokr_factor == 0:
            raise FieldConflict(("lokr_factor",), "must be -1 (automatic) or a factor of at least 1")
        return self


class TrainConfig(ScoringOptions, ConceptOptions, LossOptions, EmaOptions, MaskOptions, MemoryOptions,
                  FlowMatchingOptions, CoreOptions):
    """Everything one LoRA training run needs. Units: steps are optimizer steps, sizes are pixels."""


def changed(config: TrainConfig, name: str) -> bool:
    """Whether a field differs from its default. A family refuses an option it cannot honour only when it is
    changed: the page sends every field (at its default unless the user changed it), and a default means the
    same whether a file gives it or not."""
    return getattr(config, name) != TrainConfig.model_fields[name].get_default(call_default_factory=True)


class ConfigError(UserError):
    """A config that cannot be used. `problems` is a list of (field, message), each naming the fix."""

    def __init__(self, problems: list[tuple[str, str]], source: str | None = None):
        self.problems = problems
        self.source = source
        where = f" in {source}" if source else ""
        lines = [f"{field}: {message}" for field, message in problems]
        super().__init__(f"invalid config{where}:\n  " + "\n  ".join(lines))

    @property
    def field(self) -> str:
        return self.problems[0][0]


@functools.cache
def _field_schemas() -> dict[str, Any]:
    """Each field's JSON schema, built once: pydantic builds the whole schema anew on every call (9 ms), and a
    document with many bad fields asks once per field."""
    return TrainConfig.model_json_schema()["properties"]


def allowed_range(name: str) -> str:
    """The range or choices of a field, from the model itself, for error messages."""
    info = TrainConfig.model_fields.get(name)
    if info is None:
        return ""
    schema = non_null_schema(_field_schemas().get(name, {}))
    if "enum" in schema:
        return "choose one of " + ", ".join(repr(choice) for choice in schema["enum"])
    text = range_text(schema)
    return f"allowed range {text}" if text else ""


def non_null_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """An optional field's schema (`int | None`: anyOf with null) as that of its non-null type."""
    options = [option for option in schema.get("anyOf", []) if option.get("type") != "null"]
    return {**schema, **options[0]} if len(options) == 1 else schema


def range_text(schema: dict[str, Any], number: Callable[[Any], str] = str) -> str:
    """'[low, high]' (round brackets for exclusive bounds) and any multiple, from a field's JSON schema."""
    low = schema.get("minimum", schema.get("exclusiveMinimum"))
    high = schema.get("maximum", schema.get("exclusiveMaximum"))
    if low is None and high is None:
        return ""
    low_mark = "(" if "exclusiveMinimum" in schema else "["
    high_mark = ")" if "exclusiveMaximum" in schema else "]"
    text = f"{low_mark}{number(low)}, {number(high)}{high_mark}"
    return text + (f", a multiple of {number(schema['multipleOf'])}" if "multipleOf" in schema else "")
