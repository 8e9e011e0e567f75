"""SD 2.x: SD 1.x's pipeline with OpenCLIP (1024-wide conditioning, linear attention projections); often
v-prediction, which the model's scheduler config says (ModelInfo.prediction_type)."""

from __future__ import annotations

from lora_core.families.sd1 import SD1


class SD2(SD1):
    name = "sd2"
    display_name = "SD 2.x"
    detect_priority = 20

    def matches_folder(self, index: dict, denoiser_config: dict) -> bool:
        return "unet" in index and (bool(denoiser_config.get("use_linear_projection"))
                                    or denoiser_config.get("cross_attention_dim") == 1024)

    def matches_single_file(self, keys: list[str]) -> bool:
        return any(key.startswith("cond_stage_model.model.") for key in keys)

    def metadata(self, prediction_type: str, variant: str = "") -> dict[str, str]:
        v = prediction_type == "v_prediction"  # SD 2.x-768 is a v-model: its own architecture id
        return {"modelspec.architecture": "stable-diffusion-v2-768-v/lora" if v else "stable-diffusion-v2-512/lora",
                "modelspec.implementation": self.implementation,
                "ss_base_model_version": "sd_v2_v" if v else "sd_v2", "ss_v2": "True"}
