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
"""

from __future__ import annotations

import asyncio
from typing import Any

_kept: list[Any] = []
_frees: list[Any] = []
_scheduled = False


def _loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def drop_later(*objects: Any) -> None:
    """Hold ``objects`` (about to lose their last other reference) until the loop's next
    turn."""
    loop = _loop()
    if loop is None:
        return
    _kept.extend(objects)
    _schedule(loop)


def free_later(tree: Any) -> None:
    """``tree.free()`` (a libyang tree, or anything with ``free``; None: nothing) at the
    loop's next turn, or now without a running loop."""
    if tree is None:
        return
    loop = _loop()
    if loop is None:
        tree.free()
        return
    _frees.append(tree)
    _schedule(loop)


def _schedule(loop: asyncio.AbstractEventLoop) -> None:
    global _scheduled
    if not _scheduled:
        _scheduled = True
        loop.call_soon(_release)


def _release() -> None:
    global _scheduled
    _scheduled = False
    frees = list(_frees)
    _frees.clear()
    _kept.clear()
    for tree in frees:
        tree.free()
