"""The captioning model of lora_core/captioner.py: any image-to-text model transformers'
`AutoModelForImageTextToText` loads (from a hub id or a local folder, never with `trust_remote_code`), on the GPU
when there is one, asked what suits its kind:

- Florence-2 (`config.model_type` florence2): a task token, `<MORE_DETAILED_CAPTION>` by default;
- BLIP: nothing (unconditional captioning), or a prompt the caption then starts with;
- a chat model (its processor has a chat template: Qwen2.5-VL, SmolVLM, ...): an instruction in a user turn,
  the image beside it; only the answer is kept.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from lora_core.errors import UserError

if TYPE_CHECKING:
    from PIL import Image

DEFAULT_MODEL = "florence-community/Florence-2-large"
# By the model's `config.model_type`: what to ask when --prompt is not given (None: ask nothing).
DEFAULT_PROMPTS: dict[str, str | None] = {"florence2": "<MORE_DETAILED_CAPTION>", "blip": None}
CHAT_PROMPT = ("Describe this image in one detailed paragraph, as a caption for training an image model: the "
               "subject, its appearance, the setting, the lighting and the style. Answer with the caption only.")


class CaptionError(UserError):
    field = "dataset_path"


class Captioner:
    """A loaded captioning model and its processor, on one device."""

    def __init__(self, model: str, device: str = "auto", prompt: str | None = None):
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.name = model
        self.device = pick_device(device)
        self.dtype = torch.float32
        if self.device.type == "cuda":
            self.dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        source = str(Path(model).expanduser()) if Path(model).expanduser().is_dir() else model
        try:
            self.processor = AutoProcessor.from_pretrained(source)
            self.model = AutoModelForImageTextToText.from_pretrained(source, dtype=self.dtype)
        except Exception as error:  # no such id, no internet, not an image-to-text model, a missing package
            raise CaptionError(f"cannot load the captioning model {model!r}: {_first_line(error)}. Give a hub id "
                               "(downloaded once; needs the internet the first time) or a local folder holding the "
                               "model and its processor", field="model") from None
        self.model.to(self.device).eval()
        self.chat = bool(getattr(self.processor, "chat_template", None))
        kind = getattr(self.model.config, "model_type", "")
        self.prompt = prompt if prompt is not None else (CHAT_PROMPT if self.chat else DEFAULT_PROMPTS.get(kind))
        if self.chat:  # a decoder-only batch is padded on the left, so that every answer starts at the same place
            self.processor.tokenizer.padding_side = "left"

    def caption(self, images: list[Image.Image], max_new_tokens: int, num_beams: int = 1,
                should_stop: Callable[[], bool] | None = None) -> list[str]:
        """One caption per image (batched); [] when `should_stop` ended the generation early. A batch the GPU
        has no memory for is split in halves (a folder of large images need not be started again)."""
        import torch

        try:
            return self._generate(images, max_new_tokens, num_beams, should_stop)
        except torch.OutOfMemoryError:
            if len(images) == 1:
                raise CaptionError(f"out of {self.device.type.upper()} memory captioning one image with "
                                   f"{self.name}; choose a smaller model, fewer --num-beams or --max-new-tokens",
                                   field="model") from None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        half = len(images) // 2
        first = self.caption(images[:half], max_new_tokens, num_beams, should_stop)
        rest = self.caption(images[half:], max_new_tokens, num_beams, should_stop) if first else []
        return first + rest if rest else []

    def _generate(self, images: list[Image.Image], max_new_tokens: int, num_beams: int,
                  should_stop: Callable[[], bool] | None) -> list[str]:
        import torch

        inputs = self._inputs(images).to(self.device, dtype=self.dtype)
        with torch.inference_mode():
            ids = self.model.generate(**inputs, max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=False,
                                      stopping_criteria=_stopping(should_stop))
        if should_stop is not None and should_stop():
            return []
        prompt = inputs.get("input_ids")
        if prompt is not None and ids.shape[1] >= prompt.shape[1] and torch.equal(ids[:, :prompt.shape[1]], prompt):
            ids = ids[:, prompt.shape[1]:]  # a decoder-only model repeats its input before the answer
        return [" ".join(text.split()) for text in self.processor.batch_decode(ids, skip_special_tokens=True)]

    def _inputs(self, images: list[Image.Image]):
        if self.chat:
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": self.prompt}]}]
            text = self.processor.apply_chat_template(messages, add_generation_prompt=True)
            return self.processor(text=[text] * len(images), images=[[image] for image in images], padding=True,
                                  return_tensors="pt")
        if self.prompt is None:
            return self.processor(images=images, return_tensors="pt")
        return self.processor(text=[self.prompt] * len(images), images=images, padding=True, return_tensors="pt")


def pick_device(device: str):
    """Like training's hardware.pick_device: the GPU when there is one, unless told otherwise."""
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise CaptionError("device is 'cuda' but PyTorch sees no CUDA GPU; use 'auto' or 'cpu'", field="device")
    return torch.device("cuda" if device != "cpu" and torch.cuda.is_available() else "cpu")


def _stopping(should_stop: Callable[[], bool] | None):
    """A stopping criterion that ends generation at the next token once Stop is asked (big models on a CPU can
    take minutes a batch)."""
    if should_stop is None:
        return None
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    class _Stop(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), bool(should_stop()), dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([_Stop()])


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0][:300]
