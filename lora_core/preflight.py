"""`--validate-only`: the run plan's report (plan.plan_report), without training or loading weights.

Kept as the name the faces call; the checks themselves live in plan.py, where training runs them too.
"""

from __future__ import annotations

from typing import Any

from lora_core.config import TrainConfig
from lora_core.plan import OutputFolderError, check_output_folder, plan_report

__all__ = ["OutputFolderError", "check_output_folder", "preflight"]


def preflight(config: TrainConfig, num_processes: int | None = None) -> dict[str, Any]:
    """A JSON-ready report; `ok` is False when training would fail, with each problem naming its field.

    `num_processes`: data-parallel processes (devices) the run will use; by default the launcher's count."""
    return plan_report(config, num_processes)
