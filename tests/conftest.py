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

# Under pytest-xdist (the default, see pyproject.toml) each worker is a process of its own: one torch thread each,
# so two workers on two cores do not oversubscribe them (OpenMP threads that wait on a busy core spin and slow
# everything down many times over), and a port range of its own for the gradio servers the tests start, so two
# workers never race for the same port. Both must be set before torch and gradio are imported.
WORKER = os.environ.get("PYTEST_XDIST_WORKER")
if WORKER:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ["GRADIO_SERVER_PORT"] = str(7860 + 100 * int(WORKER.removeprefix("gw")))


@pytest.fixture(scope="session", autouse=True)
def model_cache(tmp_path_factory) -> Path:
    """Point the built-in model cache at a folder that lives for the test session, shared by the xdist workers
    (the cache is written atomically, so two workers building the same model at once is safe)."""
    shared = tmp_path_factory.getbasetemp().parent / "model-cache" if WORKER else None
    cache = Path(os.environ.get("LORA_STUDIO_TEST_CACHE") or shared or tmp_path_factory.mktemp("model-cache"))
    cache.mkdir(parents=True, exist_ok=True)
    os.environ["LORA_STUDIO_CACHE"] = str(cache)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return cache


@pytest.fixture
def dataset_dir(tmp_path) -> Path:
    """A copy of the demo dataset that a test may modify."""
    target = tmp_path / "dataset"
    shutil.copytree(SHAPES_DATASET, target)
    return target
