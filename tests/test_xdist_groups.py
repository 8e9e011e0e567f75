"""The suite's own machinery (tests/conftest.py): a module whose tests share a module fixture of its own runs on
one xdist worker, so the fixture (a trained run several tests read, a launched page) is built once; and the
longest modules are scheduled first. pytest 9.2 with pytest-xdist 3.8 ignored the group mark silently, which
built every shared run once per worker."""

from __future__ import annotations

import json

import pytest
from conftest import DURATIONS, shares_a_module_fixture


@pytest.fixture(scope="module")
def shared() -> list:
    return []


def test_a_test_that_shares_a_module_fixture_runs_in_its_modules_group(request, shared):
    assert shares_a_module_fixture(request.node)
    assert request.node.get_closest_marker("xdist_group").args == ("test_xdist_groups",)
    if getattr(request.config.option, "loadgroup", False):  # under -n 0, or another --dist, nothing is grouped
        assert request.node.nodeid.endswith("@test_xdist_groups"), request.node.nodeid


def test_the_recorded_durations_name_modules_that_exist():
    recorded = json.loads(DURATIONS.read_text(encoding="utf-8"))
    root = DURATIONS.parent.parent
    assert recorded and all((root / module).is_file() for module in recorded), sorted(recorded)
