"""Stopping background tasks so that a daemon's shutdown always ends.

Why: a task is stopped by cancelling it once and awaiting it, and that cancellation can
be lost.  In Python 3.11, ``asyncio.wait_for`` returns the result (or raises the
exception) of an awaitable that finished in the same turn of the loop as the task was
cancelled (gh-86296); a loop around it (a link kept up, a server dialled again) then
carries on, and whoever awaits the task waits for ever.  That happened to two CE agents
of a lab run: SIGTERM, and they were still running 30 s later with nothing to do.

:func:`stop_tasks` cancels again whatever is still running, until it ends or the grace
period is over; a task that outlives it is named in the log with where it stands, and
left behind rather than holding the shutdown.
"""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import Iterable
from typing import Any

log = logging.getLogger("cevpn.tasks")

STOP_GRACE = 10.0
"""Seconds tasks being stopped have to end."""
RECANCEL_EVERY = 0.05
"""Seconds between cancellations of a task that has not ended (one may have been lost)."""


async def stop_tasks(
    tasks: Iterable[asyncio.Task[Any]], grace: float = STOP_GRACE
) -> list[asyncio.Task[Any]]:
    """Cancel ``tasks`` and wait for them to end, cancelling again those that carry on, for
    at most ``grace`` seconds; the ones still running then (logged with their stacks)."""
    loop = asyncio.get_running_loop()
    tasks = list(tasks)
    pending = {t for t in tasks if not t.done()}
    deadline = loop.time() + grace
    while pending:
        for task in pending:
            task.cancel()
        left = deadline - loop.time()
        if left <= 0:
            break
        _, pending = await asyncio.wait(pending, timeout=min(left, RECANCEL_EVERY))
    for task in pending:
        stack = io.StringIO()
        task.print_stack(file=stack)
        log.error(
            "task %s did not stop within %.0f s:\n%s", task.get_name(), grace, stack.getvalue()
        )
    for task in tasks:
        if task.done() and not task.cancelled():
            task.exception()  # retrieved: a failure before the stop was logged where it failed
    return list(pending)
