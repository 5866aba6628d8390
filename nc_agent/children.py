"""The daemons the agent runs as its children (charon, BIRD): how they start and stop.

A child gets SIGKILL when the agent dies (PR_SET_PDEATHSIG), so a killed agent
never leaves a daemon behind that nobody supervises; a stop is SIGTERM (the
daemon cleans up: charon deletes its SAs, BIRD withdraws its routes and
flushes its LSAs), then SIGKILL if it has not exited after a grace period.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import signal

PR_SET_PDEATHSIG = 1
STOP_GRACE = 10.0


def die_with_parent() -> None:
    """preexec_fn: SIGKILL when the agent (the parent) dies."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


async def terminate(proc: asyncio.subprocess.Process | None, grace: float = STOP_GRACE) -> None:
    """SIGTERM, then SIGKILL after ``grace`` seconds; an absent or exited child is fine."""
    if proc is None or proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(proc.wait(), grace)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
