"""Shared fixtures: a per-session model cache (the tiny models are built there once) and tiny configs."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DEMO_DATASET = ROOT / "demo" / "dataset"
sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session", autouse=True)
def model_cache(tmp_path_factory) -> Path:
    """Point the built-in model cache at a folder that lives for the test session."""
    cache = Path(os.environ.get("LORA_STUDIO_TEST_CACHE") or tmp_path_factory.mktemp("model-cache"))
    os.environ["LORA_STUDIO_CACHE"] = str(cache)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return cache


@pytest.fixture
def dataset_dir(tmp_path) -> Path:
    """A copy of the demo dataset that a test may modify."""
    target = tmp_path / "dataset"
    shutil.copytree(DEMO_DATASET, target)
    return target


def tiny_config(dataset: Path, output: Path, **overrides) -> dict:
    """The smallest config that exercises every event: 256 px, rank 4 (alpha 8 so alpha != rank)."""
    config = {
        "dataset_path": str(dataset),
        "base_model": "builtin:tiny-sd",
        "output_path": str(output),
        "trigger_words": ["shapestyle"],
        "training_params": {
            "steps": 6, "resolution": 256, "batch_size": 2, "learning_rate": 1e-3, "lora_rank": 4,
            "lora_alpha": 8, "checkpoint_steps": 3, "validation_steps": 3, "sample_inference_steps": 2,
            "seed": 7,
        },
    }
    config["training_params"].update(overrides)
    return config


def run_job_here(config, resume: bool = False, stop_after_step: int | None = None) -> tuple:
    """Run one job in this process through the engine's `run_job` (what `python -m lora_core train` does):
    (final event, every event). With `stop_after_step`, a stop is asked once that step's progress is seen."""
    from lora_core.job import run_job

    events: list = []

    def should_stop() -> bool:
        return stop_after_step is not None and any(e.type == "progress" and e.step >= stop_after_step
                                                   for e in events)

    terminal = run_job(config, events.append, should_stop, resume=resume)
    return terminal, events
