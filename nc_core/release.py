"""Letting go of a replaced configuration after the reply, not before it.

A commit on a CE holding 1,000 peers replaces trees of the whole configuration: the
previous running configuration's libyang tree, the lxml trees the candidate and the
validator's memo held.  Freeing one is a walk over some 20,000 nodes (and, with glibc,
the consolidation of their freed chunks at the next larger allocation): a few
milliseconds that nothing the client waits for depends on.  :func:`drop_later` keeps
the last references until the event loop has run the current step (the operation, and
its reply written to the session), then drops them; :func:`free_later` does the same for
a libyang tree's explicit ``free()``.

Nothing is kept longer than one turn of the loop, and without a running loop (tools,
tests calling the validator directly) things are let go of at once, as before.

:func:`trim_after_release` then asks glibc to give the free pages back to the system
(``malloc_trim``): freed nodes of a large configuration leave the heap full of holes that
Python's and libxml2's small allocations only partly fill again, so a CE agent that let
go of a 1,000-peer configuration kept some 6 MB more resident than it used.  A trim walks
the whole process's heap, so it is paced (:data:`TRIM_EVERY`): one trim gives back what
every datastore of the process let go of since the last.  Where one process holds many
servers (bench/agent_farm.py: 50 agents in one 575 MB heap) each one's trim after its
own commit was a walk over all the others' memory: 8.6% of the agents' work in a site
add at 1,000 sites.
"""

from __future__ import annotations

import asyncio
import ctypes
import time
from collections.abc import Callable
from typing import Any

TRIM_EVERY = 10.0
"""Seconds between two trims of the heap: a trim asked for sooner is made when they have
passed (one for all asked for meanwhile)."""


class _Pending:
    """What one event loop lets go of at its next turn."""

    def __init__(self) -> None:
        self.kept: list[Any] = []
        self.frees: list[Any] = []
        self.trim = False

    def release(self) -> None:
        frees, self.frees = self.frees, []
        self.kept = []
        for tree in frees:
            tree.free()
        if self.trim:
            self.trim = False
            _pacer.trim()


_pending: dict[asyncio.AbstractEventLoop, _Pending] = {}
"""Per loop (tests run servers on several loops, in several threads), until its turn."""


def drop_later(*objects: Any) -> None:
    """Hold ``objects`` (about to lose their last other reference) until the loop's next
    turn."""
    pending = _pending_of_running_loop()
    if pending is not None:
        pending.kept.extend(objects)


def free_later(tree: Any) -> None:
    """``tree.free()`` (a libyang tree, or anything with ``free``; None: nothing) at the
    loop's next turn, or now without a running loop."""
    if tree is None:
        return
    pending = _pending_of_running_loop()
    if pending is None:
        tree.free()
    else:
        pending.frees.append(tree)


def _pending_of_running_loop() -> _Pending | None:
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return None
    pending = _pending.get(loop)
    if pending is None:
        for other in [other for other in _pending if other.is_closed()]:
            _pending.pop(other).release()  # a loop that closed before its turn came
        pending = _pending[loop] = _Pending()
        loop.call_soon(_release, loop)
    return pending


def _release(loop: asyncio.AbstractEventLoop) -> None:
    pending = _pending.pop(loop, None)
    if pending is not None:
        pending.release()


def trim_after_release() -> None:
    """Give the heap's free pages back to the system once what is pending is let go of
    (at once without a running loop)."""
    pending = _pending_of_running_loop()
    if pending is None:
        trim_heap()
    else:
        pending.trim = True


def _malloc_trim() -> Callable[[int], int] | None:
    try:
        function = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None  # not glibc: its allocator keeps its own ways
    function.argtypes = [ctypes.c_size_t]
    function.restype = ctypes.c_int
    return function


_TRIM = _malloc_trim()


def trim_heap() -> None:
    """``malloc_trim(0)``: every whole free page of the heap back to the system."""
    if _TRIM is not None:
        _TRIM(0)


class TrimPacer:
    """At most one :func:`trim_heap` every ``every`` seconds (``clock``: tests drive it);
    one asked for sooner is made when they have passed, on the loop that asked."""

    def __init__(
        self,
        every: float = TRIM_EVERY,
        clock: Callable[[], float] = time.monotonic,
        trim: Callable[[], None] | None = None,
    ) -> None:
        self.every = every
        self.clock = clock
        self._trim = trim
        """What trims (None: :func:`trim_heap`)."""
        self._last: float | None = None
        self._due: asyncio.TimerHandle | None = None
        self._due_on: asyncio.AbstractEventLoop | None = None
        self.trims = 0

    def trim(self) -> None:
        """Trim now if the last trim was long enough ago, else once when it will be (at
        once without a running loop: nothing would make it later)."""
        now = self.clock()
        if self._last is None or now - self._last >= self.every:
            self._now(now)
            return
        due_on = self._due_on
        if self._due is not None and due_on is not None and not due_on.is_closed():
            return  # one is coming: it gives back this one's pages too
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._now(now)
            return
        self._due = loop.call_later(self._last + self.every - now, self._later)
        self._due_on = loop

    def _later(self) -> None:
        self._due = self._due_on = None
        self._now(self.clock())

    def _now(self, now: float) -> None:
        if self._due is not None:
            self._due.cancel()
            self._due = self._due_on = None
        self._last = now
        self.trims += 1
        (self._trim or trim_heap)()


_pacer = TrimPacer()
