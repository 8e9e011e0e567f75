"""The suite's own machinery: a module marked `xdist_group` runs on one xdist worker, so its module fixtures (a
trained run several tests read) are built once. pytest 9.2 with pytest-xdist 3.8 ignored the mark silently,
which built every shared run once per worker."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.xdist_group("test_xdist_groups")


def test_a_grouped_module_is_scheduled_as_one_group(request):
    if not getattr(request.config.option, "loadgroup", False):  # -n 0, or another --dist: nothing is grouped
        return
    assert request.node.nodeid.endswith("@test_xdist_groups"), request.node.nodeid
