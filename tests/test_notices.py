"""Library notices reach the console once, and the meaningless ones not at all."""

from __future__ import annotations

import logging

import pytest

from lora_core.notices import quiet_library_notices


@pytest.fixture
def diffusers_console():
    """What the diffusers logger's own handler prints, as the server console would show it."""
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.get_logger("diffusers")  # makes sure the library's handler is installed
    root = logging.getLogger("diffusers")
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    handler = Collect()
    root.addHandler(handler)
    quiet_library_notices()
    yield lines
    root.removeHandler(handler)


def test_each_notice_is_printed_once_and_the_safety_checker_one_never(diffusers_console):
    logger = logging.getLogger("diffusers.models.modeling_utils")
    for _ in range(30):  # as many model loads as a server makes in an afternoon
        logger.warning("Set `low_cpu_mem_usage` to True as `_keep_in_fp32_modules` is not None.")
        logging.getLogger("diffusers.pipelines").warning("You have disabled the safety checker for <class>")
        logger.warning("a notice worth reading")
    assert diffusers_console == ["a notice worth reading"]


def test_installing_twice_adds_one_filter():
    quiet_library_notices()
    quiet_library_notices()
    logger = logging.getLogger("transformers")
    assert sum(type(item).__name__ == "OnceFilter" for item in logger.filters) == 1
