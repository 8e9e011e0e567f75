"""Shared fixtures: a per-session model cache (the tiny models are built there once). Shared helpers (the
tiny config, paths) are in helpers.py."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from helpers import ROOT, SHAPES_DATASET, tiny_config  # noqa: E402, F401  (re-exported for branches not yet ported)


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
    shutil.copytree(SHAPES_DATASET, target)
    return target
