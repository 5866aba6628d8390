"""Waiting on conditions, never on the clock: a test polls what it needs to be true."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def wait_for(
    what: Callable[[], Any], timeout: float = 60.0, message: str = "", step: float = 0.05
) -> Any:
    """Poll ``what`` until it returns something true, and return that; fail after
    ``timeout`` seconds with the last value (the timeout bounds a broken run only)."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = what()
        if last:
            return last
        time.sleep(step)
    raise AssertionError(f"timed out waiting for {message or what}: last {last!r}")


def wait_until(check: Callable[[], Any], timeout: float, step: float = 0.2) -> float | None:
    """Poll ``check`` until it is true: the seconds that took, or None after ``timeout``
    (for scenarios that report how long something took rather than fail at once)."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if check():
            return time.monotonic() - start
        time.sleep(step)
    return None
