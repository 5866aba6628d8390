"""Waiting on conditions, never on the clock: a test polls what it needs to be true."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from lab.waiting import wait_until

__all__ = ["next_turn", "wait_for", "wait_for_async", "wait_until"]


class _Poll:
    """One condition polled until a deadline: the rule both waits below share."""

    def __init__(self, what: Callable[[], Any], timeout: float, message: str) -> None:
        self.what = what
        self.deadline = time.monotonic() + timeout
        self.message = message
        self.last: Any = None

    def holds(self) -> bool:
        """Look once, unless the deadline has passed: then fail with the last value."""
        if time.monotonic() >= self.deadline:
            raise AssertionError(
                f"timed out waiting for {self.message or self.what}: last {self.last!r}"
            )
        self.last = self.what()
        return bool(self.last)


def wait_for(
    what: Callable[[], Any], timeout: float = 60.0, message: str = "", step: float = 0.05
) -> Any:
    """Poll ``what`` until it returns something true, and return that; fail after
    ``timeout`` seconds with the last value (the timeout bounds a broken run only)."""
    poll = _Poll(what, timeout, message)
    while not poll.holds():
        time.sleep(step)
    return poll.last


async def wait_for_async(
    what: Callable[[], Any], timeout: float = 60.0, message: str = "", step: float = 0.02
) -> Any:
    """:func:`wait_for` inside an event loop: the loop runs between polls."""
    poll = _Poll(what, timeout, message)
    while not poll.holds():
        await asyncio.sleep(step)
    return poll.last


async def next_turn() -> None:
    """Until the event loop has run every callback scheduled before this call (one turn):
    what code that defers work with ``loop.call_soon`` promises, awaited as a condition."""
    loop = asyncio.get_running_loop()
    turned = loop.create_future()
    loop.call_soon(turned.set_result, None)
    await turned
