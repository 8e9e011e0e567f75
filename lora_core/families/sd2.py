"""SD 2.x: SD 1.x's pipeline with OpenCLIP (1024-wide conditioning, linear attention projections); often
v-prediction, which the model's scheduler config says (ModelInfo.prediction_type)."""

from __future__ import annotations

from lora_core.families.sd1 import SD1


class SD2(SD1):
    name = "sd2"
    display_name = "SD 2.x"
    detect_priority = 20

    def matches_folder(self, index: dict, unet: dict) -> bool:
        return bool(unet.get("use_linear_projection")) or unet.get("cross_attention_dim") == 1024

    def matches_single_file(self, keys: list[str]) -> bool:
        return any(key.startswith("cond_stage_model.model.") for key in keys)
