"""lora_core: the LoRA training engine. The only package that imports torch, diffusers, peft, accelerate.

Flow: config (TrainConfig) -> plan (dataset, model family, length, device) -> setup -> fit -> events / exported
.safetensors (training.py).
Faces build a TrainConfig and run it as a job: `python -m lora_core train` (cli.py, which calls
job.run_job on its main thread), a process per job that the web page starts and follows (studio/launcher.py).
Importing this package is cheap: torch is imported by the modules that need it, when they are used.
"""

from lora_core.notices import quiet_optional_library_imports

quiet_optional_library_imports()  # before diffusers or peft import torchao / bitsandbytes (logging only: cheap)

from lora_core.config import ConfigError, TrainConfig  # noqa: E402
from lora_core.configfile import load_config, parse_config  # noqa: E402

__all__ = ["ConfigError", "TrainConfig", "load_config", "parse_config"]
