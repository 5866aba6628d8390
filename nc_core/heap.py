"""Python's full garbage collections kept off the reply path of a server holding a large
configuration.

A CE agent holding 1,000 peers keeps 26,000-71,000 Python objects alive for as long as
its configuration lasts.  A full (generation 2) collection walks every one of them:
15-32 ms, measured in the agent with ``gc.callbacks`` under
``bench/agent_commit_bench.py``, and it lands inside whichever request happened to
allocate when it began: the p99 of a one-peer exchange was 36-58 ms against a p50 of
7-9 ms.  With those objects moved to the permanent generation (``gc.freeze``) no full
collection ran in 100 changes and the p99 was 17 ms.

So the objects that live as long as the configuration are frozen once they exist:
after start-up, and after a commit that changed much of the configuration (a load, a
full resynchronisation), at the event loop's next turn, after the reply has been
written.  Settling first unfreezes and collects everything: cyclic garbage made of
frozen objects in between is collected then, so what freezing can keep alive is bounded
by what one such commit replaces.  Small commits change nothing here; the objects they
make are collected as usual, and a full collection walks only those.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nc_core.edit import Change

LARGE_CHANGE = 200
"""Changed nodes from which a commit settles the heap (a one-peer change is ~1-20)."""

_scheduled: set[asyncio.AbstractEventLoop] = set()


def settle() -> None:
    """Collect everything, then freeze what survived: it is the configuration's."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()


def settle_soon() -> None:
    """:func:`settle` at the running loop's next turn (once however often asked in a turn);
    at once without a running loop."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        settle()
        return
    if loop in _scheduled:
        return
    _scheduled.add(loop)

    def run() -> None:
        _scheduled.discard(loop)
        settle()

    loop.call_soon(run)


def changed_nodes(changes: Sequence[Change], limit: int = LARGE_CHANGE) -> int:
    """How many nodes ``changes`` touch, counted up to ``limit`` (a created or deleted
    subtree is one Change for all of its nodes, nc_core.edit.diff)."""
    count = 0
    for change in changes:
        if change.op == "update":
            count += 1
        else:
            for _ in change.element.iter():
                count += 1
                if count >= limit:
                    return count
        if count >= limit:
            return count
    return count


def after_commit(changes: Sequence[Change]) -> None:
    """A commit made ``changes``: settle the heap after the reply if it was a large one."""
    if changed_nodes(changes) >= LARGE_CHANGE:
        settle_soon()
