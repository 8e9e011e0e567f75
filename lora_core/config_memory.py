"""The low-memory options (a quantised frozen base, the memory picker), part of the one configuration model.

They live apart only to keep config.py readable: `TrainConfig` inherits them, so the CLI, the page, the presets
and `config_schema.json` see them like every other field. What the device and the installed libraries allow is
checked by the plan (lora_core/memory.py), which refuses a mode at its field with the reason.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, model_validator

from lora_core.errors import FieldConflict


def _advanced() -> dict[str, Any]:
    return {"group": "advanced"}


QUANTIZED_BASE_NOTE = (
    "The LoRA is used on the ordinary (unquantised) base: it learns against a slightly rounded base. The cost "
    "the sources report: small for 8 bits (kohya's fp8_base and SimpleTuner's int8 FLUX.1 LoRAs are used on the "
    "bf16 model), and for NF4 the QLoRA paper found 16-bit fine-tuning quality on language models, while "
    "image trainers call 4 bits the lossiest choice; the studio has not measured it on images.")


class MemoryOptions(BaseModel):
    base_quantization: Literal["none", "fp8", "int8", "nf4"] = Field("none", description=(
        "Store the frozen denoiser (and FLUX / SD 3's T5 encoder when it stays on the device) in less memory; the "
        "LoRA's weights, gradients and optimizer state stay fp32. fp8: weights stored in float8 and upcast layer "
        "by layer for compute (diffusers' layerwise casting; about half of bf16, convolutions kept; it saves memory "
        "only with gradient_checkpointing, as each layer's upcast copy otherwise lives until the backward); int8: "
        "torchao's "
        "int8 weight-only linears (needs torchao; CUDA and CPU); nf4: bitsandbytes' 4-bit NormalFloat linears "
        "(needs bitsandbytes and a CUDA GPU; the smallest, the slowest). " + QUANTIZED_BASE_NOTE),
        json_schema_extra=_advanced())
    offload_blocks: int = Field(0, ge=0, le=200, description=(
        "FLUX.1 and SD 3.x: keep the frozen weights of the transformer's first N blocks in CPU memory and copy each "
        "block to the GPU just before it runs (the next one copied while the current one computes, as kohya's "
        "blocks_to_swap), so they leave the GPU save for two blocks in flight; the LoRA's weights stay on the GPU. "
        "Slower steps (each offloaded block crosses the PCIe bus twice a step) but the same math. Needs "
        "gradient_checkpointing (auto turns it on). 0: none. On the CPU it changes nothing (the weights are "
        "already in host memory); the UNet families refuse it."),
        json_schema_extra={**_advanced(), "families": ["sd3", "flux"]})
    memory_mode: Literal["off", "auto"] = Field("off", description=(
        "auto: on a CUDA GPU whose free memory is known, choose the fastest combination of base_quantization and "
        "gradient_checkpointing (then, for FLUX.1 and SD 3.x, offload_blocks) whose estimated peak fits it "
        "(shown by --validate-only and the started event: 'your GPU with 11.5 GiB free: fp8 base + checkpointing "
        "+ 17 blocks offloaded, est. 10.2 GiB'); it then chooses those fields, so leave base_quantization 'none', "
        "gradient_checkpointing 'auto' and offload_blocks 0. On the CPU it changes nothing. off: "
        "use the fields as given."),
        json_schema_extra=_advanced())

    @model_validator(mode="after")
    def _memory_options_agree(self) -> Any:
        chosen = [name for name, free in (("base_quantization", "none"), ("gradient_checkpointing", "auto"),
                                          ("offload_blocks", 0)) if getattr(self, name, free) != free]
        if self.memory_mode == "auto" and chosen:
            raise FieldConflict(("memory_mode", *chosen),
                                "memory_mode 'auto' chooses base_quantization, gradient_checkpointing and "
                                "offload_blocks itself; leave them at 'none', 'auto' and 0, or set memory_mode 'off' "
                                "to choose them yourself")
        if self.offload_blocks and getattr(self, "gradient_checkpointing", "auto") == "off":
            # without checkpointing autograd keeps each block's weights referenced until its backward: the
            # offloaded weights could not leave the GPU
            raise FieldConflict(("offload_blocks", "gradient_checkpointing"), "offload_blocks needs gradient "
                                "checkpointing (without it the backward pass keeps every block's weights on the "
                                "GPU, so nothing would be freed); set gradient_checkpointing to 'auto' or 'on'")
        compiled = [name for name, on in (("compile_unet", getattr(self, "compile_unet", "auto") == "on"),
                                          ("cuda_graphs", getattr(self, "cuda_graphs", False))) if on]
        if self.offload_blocks and compiled:
            raise FieldConflict(("offload_blocks", *compiled), "offload_blocks swaps the blocks' weights at "
                                "every call, which a compiled block would recompile for; set compile_unet to 'auto' "
                                "or 'off' and cuda_graphs off")
        if self.offload_blocks and self.base_quantization == "nf4":
            # bitsandbytes quantises a Linear4bit when it moves to the GPU: an offloaded one would be quantised
            # again at every use
            raise FieldConflict(("offload_blocks", "base_quantization"), "offload_blocks works with an fp8 or "
                                "int8 base (or none); nf4 is already the smallest: set offload_blocks to 0")
        if self.base_quantization != "none" and getattr(self, "use_dora", False):
            # peft's DoRA reads the base weight's norm outside the layer's forward, where a quantised weight is
            # not dequantised (fp8 storage has no float kernels on the CPU; int8/nf4 are tensor subclasses)
            raise FieldConflict(("base_quantization", "use_dora"), "DoRA reads the base weights directly, which "
                                "a quantised base does not give; turn use_dora off or set base_quantization 'none'")
        return self
