"""What the config alone shows `cuda_graphs` cannot apply to (no torch here: the page validates configs too).
What only the run can show falls back instead, with the reason (lora_core.compile)."""

from __future__ import annotations

from typing import Any


def cuda_graphs_conflict(config: Any) -> tuple[str, str] | None:
    """(the other field, the message naming the fix) for a config that refuses cuda_graphs, else None."""
    if config.compile_unet == "off":
        return "compile_unet", ("cuda_graphs captures the compiled UNet, and compile_unet is 'off'; set "
                                "compile_unet to 'auto' or 'on', or cuda_graphs false")
    if config.device == "cpu":
        return "device", ("cuda_graphs needs a CUDA GPU and device is 'cpu'; set cuda_graphs false "
                          "(compile_unet still compiles on the CPU)")
    if config.train_text_encoder:
        return "train_text_encoder", ("cuda_graphs is not supported with train_text_encoder (the captured UNet "
                                      "would hand gradients back to the eager text encoders every step); set one "
                                      "of them false")
    return None
