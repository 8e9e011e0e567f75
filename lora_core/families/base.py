"""What every family provides; the Stable Diffusion UNet families share most of it (sd1.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # families are read when a model is inspected, before torch is needed
    import torch

    from lora_core.config import TrainConfig


class Family:
    name: str  # the id used in ModelInfo.family and the LoRA metadata: sd1 | sd2 | sdxl
    display_name: str  # for people: "SD 1.x"
    detect_priority: int  # detection tries families in ascending order; the most specific first
    single_file_builtin: str  # the built-in architecture whose parameters stand in for a single file's
    single_file_down_levels: int  # the UNet's levels, for a single file (whose configs come at load time)
    vae_fp16_overflows: bool = False  # its VAE must run in fp32 where the rest runs in fp16

    # --- recognising and loading ---
    def matches_folder(self, index: dict, unet: dict) -> bool:
        raise NotImplementedError

    def matches_single_file(self, keys: list[str]) -> bool:
        raise NotImplementedError

    def pipeline_class(self) -> type:
        raise NotImplementedError

    def load_kwargs(self) -> dict[str, Any]:
        """Extra keyword arguments for the pipeline's from_pretrained / from_single_file."""
        return {}

    # --- adapters and export ---
    def add_unet_adapter(self, unet, config: TrainConfig) -> list[torch.nn.Parameter]:
        raise NotImplementedError

    def add_text_encoder_adapter(self, encoder, config: TrainConfig) -> list[torch.nn.Parameter]:
        raise NotImplementedError

    def lora_file_contents(self, unet, config: TrainConfig, text_encoders: list
                           ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """The exported file's tensors under this family's names, and the header entries the format needs."""
        raise NotImplementedError

    # --- conditioning ---
    def encode_captions(self, pipeline, texts: list[str], device: torch.device, dtype: torch.dtype
                        ) -> dict[str, torch.Tensor]:
        """Captions -> text conditioning from the pipeline's frozen text encoders."""
        raise NotImplementedError

    def encode_with(self, tokenizers: list, encoders: list, texts: list[str], device: torch.device,
                    dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The same through `encoders` (wrapped for training, so `pipeline.encode_prompt` cannot call them)."""
        raise NotImplementedError

    def unet_inputs(self, text: dict[str, torch.Tensor], time_ids: torch.Tensor) -> dict[str, Any]:
        """The UNet's conditioning keyword arguments from the text conditioning and the batch's size/crop ids
        (rows of orig h, orig w, crop top, crop left, target h, target w)."""
        raise NotImplementedError

    def sample_inputs(self, pipeline, prompt: str, device: torch.device) -> dict[str, Any]:
        """The sample pipeline's keyword arguments for one prompt (with the empty negative prompt), encoded."""
        raise NotImplementedError


def tokenize(tokenizer, texts: list[str], device: torch.device) -> torch.Tensor:
    return tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids.to(device)


def tokenizers(pipeline) -> list:
    return [t for t in (getattr(pipeline, "tokenizer", None), getattr(pipeline, "tokenizer_2", None)) if t]
