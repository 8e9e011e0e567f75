"""Library notices, each printed once per process (or not at all when it means nothing to the user).

diffusers and transformers log the same notice every time a pipeline or model is built: a server that
trains, samples and renders grids builds them dozens of times, and the console filled with copies of
"Set `low_cpu_mem_usage` to True as `_keep_in_fp32_modules` is not None" (AutoencoderKL's float32 modules)
and the disabled-safety-checker warning, neither of which a LoRA trainer's user can act on.
"""

from __future__ import annotations

import logging
import threading

LIBRARY_LOGGERS = ("diffusers", "transformers", "accelerate", "peft")
SILENCED = (  # fragments of notices that say nothing a user of this trainer can act on
    "_keep_in_fp32_modules",
    "You have disabled the safety checker",
    "safety_checker=None",
)


class OnceFilter(logging.Filter):
    """Lets each distinct message through once; drops the SILENCED ones."""

    def __init__(self) -> None:
        super().__init__()
        self._seen: set[tuple[str, int, str]] = set()
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        decided = getattr(record, "_lora_core_once", None)  # one record passes several handlers
        if decided is None:
            decided = self._first_time(record)
            record._lora_core_once = decided
        return decided

    def _first_time(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if any(fragment in message for fragment in SILENCED):
            return False
        key = (record.name, record.levelno, message)
        with self._lock:
            if key in self._seen:
                return False
            self._seen.add(key)
        return True


_FILTER = OnceFilter()


class ImportNoiseFilter(logging.Filter):
    """Drops what torchao and bitsandbytes log when diffusers and peft import them (base_quantization's
    libraries): kernels for other GPUs or torch builds that a CPU or CUDA install without them never uses."""

    FRAGMENTS = ("Failed to load", "kernels-community", "is an Enum subclass and is now natively supported",
                 "Unable to import `torchao` Tensor objects")  # diffusers: for checkpoints saved by torchao

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(fragment in record.getMessage() for fragment in self.FRAGMENTS)


# exact logger names: a logger's filter does not see its children's records
IMPORT_NOISE_LOGGERS = ("torchao", "bitsandbytes.backends.cpu.ops", "torch.utils._pytree",
                        "diffusers.quantizers.torchao.torchao_quantizer")


def quiet_optional_library_imports() -> None:
    """Install ImportNoiseFilter before anything imports torchao or bitsandbytes (lora_core's __init__)."""
    for name in IMPORT_NOISE_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, ImportNoiseFilter) for f in logger.filters):
            logger.addFilter(ImportNoiseFilter())


def quiet_library_notices() -> None:
    """Install the filter on the libraries' loggers (idempotent; cheap enough to call before every load)."""
    for name in LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
        for handler in logger.handlers:  # their own handlers see records of child loggers, too
            if _FILTER not in handler.filters:
                handler.addFilter(_FILTER)
