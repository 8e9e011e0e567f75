"""A bound on tests that could hang (pytest-timeout is not installed): the call runs in a daemon thread and the
test fails, instead of hanging the suite, when it has not returned in time."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def within(seconds: float, call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """`call(*args, **kwargs)`'s result; AssertionError when it takes longer than `seconds` (the thread is
    left behind as a daemon: a hang costs the test, not the run)."""
    result: list[Any] = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            result.append(call(*args, **kwargs))
        except BaseException as error:  # noqa: BLE001  (re-raised in the test's thread)
            failure.append(error)

    thread = threading.Thread(target=run, daemon=True, name=f"within-{getattr(call, '__name__', 'call')}")
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise AssertionError(f"{getattr(call, '__name__', call)} did not return within {seconds} s")
    if failure:
        raise failure[0]
    return result[0]
