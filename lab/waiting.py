"""Waiting on a condition for a bounded time: the lab scenarios, the demo and the tests
report how long something took, polling what must become true (never a fixed sleep)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def wait_until(check: Callable[[], Any], timeout: float, step: float = 0.2) -> float | None:
    """Poll ``check`` until it is true: the seconds that took, or None after ``timeout``."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if check():
            return time.monotonic() - start
        time.sleep(step)
    return None
