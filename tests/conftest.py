"""Shared fixtures: a per-session model cache (the tiny models are built there once). Shared helpers (the
tiny config, paths) are in helpers.py."""

from __future__ import annotations

import json
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


DURATIONS = Path(__file__).resolve().parent / "durations.json"  # seconds per module, from --record-durations


def pytest_addoption(parser) -> None:
    parser.addoption("--record-durations", action="store_true",
                     help=f"write each test module's seconds (setup, call, teardown) to {DURATIONS.name}, "
                          "which orders the modules of later runs, the longest first")


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the xdist_group marks
def pytest_collection_modifyitems(config, items: list[pytest.Item]) -> None:
    """Two rules for the xdist workers (see pyproject.toml: `--dist loadgroup --no-loadscope-reorder`):

    - A module whose tests share a module-scoped fixture of its own (a trained run, a launched page) is one
      xdist group, so one worker builds the fixture once instead of each worker building it.
    - The longest modules run first (by tests/durations.json; a module not in it counts 5 s per end-to-end
      test), so the quick tests fill the end of the run and neither worker waits long for the other. A module's
      tests stay together and in their order, so its module fixtures are built once on a worker.
    """
    for item in items:
        if shares_a_module_fixture(item) and not any(item.iter_markers("xdist_group")):
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))
    recorded = json.loads(DURATIONS.read_text(encoding="utf-8")) if DURATIONS.is_file() else {}
    modules: dict[str, list[pytest.Item]] = {}
    for item in items:
        modules.setdefault(module_of(item.nodeid), []).append(item)

    def seconds(module: str) -> float:
        return recorded.get(module, 5.0 * sum(1 for test in modules[module] if test.get_closest_marker("e2e")))

    items[:] = [item for module in sorted(modules, key=lambda module: -seconds(module)) for item in modules[module]]


def shares_a_module_fixture(item: pytest.Item) -> bool:
    definitions = getattr(item, "_fixtureinfo", None)
    if definitions is None or getattr(item, "module", None) is None:
        return False
    return any(fixture.scope == "module" and getattr(fixture.func, "__module__", None) == item.module.__name__
               for fixtures in definitions.name2fixturedefs.values() for fixture in fixtures[-1:])


def module_of(nodeid: str) -> str:
    return nodeid.split("::")[0]


MODULE_SECONDS: dict[str, float] = {}


def pytest_runtest_logreport(report) -> None:  # in the controller, every worker's reports arrive here
    MODULE_SECONDS[module_of(report.nodeid)] = MODULE_SECONDS.get(module_of(report.nodeid), 0.0) + report.duration


def pytest_sessionfinish(session, exitstatus) -> None:
    if session.config.getoption("record_durations") and not WORKER and exitstatus == 0:
        ordered = dict(sorted(((module, round(value, 1)) for module, value in MODULE_SECONDS.items()),
                              key=lambda pair: -pair[1]))
        DURATIONS.write_text(json.dumps(ordered, indent=1) + "\n", encoding="utf-8")


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
