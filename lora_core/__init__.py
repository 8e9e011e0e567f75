"""lora_core: the LoRA training engine. The only package that imports torch, diffusers, peft, accelerate.

Flow: config (TrainConfig) -> plan (dataset, model family, length, device) -> setup -> fit -> events / exported
.safetensors (training.py).
Faces (train_lora.py, webui.py) build a TrainConfig, submit it to a Worker and read the Job's events.
Importing this package is cheap: torch is imported by the modules that need it, when they are used.
"""

from lora_core.config import ConfigError, TrainConfig, load_config, parse_config

__all__ = ["ConfigError", "TrainConfig", "load_config", "parse_config"]
