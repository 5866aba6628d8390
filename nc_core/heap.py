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

Settling also gives the memory such a commit freed back to the system
(``malloc_trim``): a commit of a 999-peer configuration parses, validates and
serialises several transient copies of it (the edit's text, the candidate, libyang's
trees, the document), some 15 MB that glibc otherwise keeps in its heaps for good,
between the chunks still in use.  In a farm of 50 agents in one process
(bench/agent_farm.py) that was half of each agent's resident memory
(docs/benchmarks.md).  Trimming a process's heaps takes about a millisecond per
100 MB, at the same moment, after the reply.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import gc
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nc_core.edit import Change

LARGE_CHANGE = 200
"""Changed nodes from which a commit settles the heap (a one-peer change is ~1-20)."""

_scheduled: set[asyncio.AbstractEventLoop] = set()


def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None where the C library has none (musl, macOS)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        trim = libc.malloc_trim
    except (OSError, AttributeError, TypeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


_TRIM = _malloc_trim()


def release_free_memory() -> None:
    """Give the pages malloc holds free, in every arena, back to the system."""
    if _TRIM is not None:
        _TRIM(0)


def settle() -> None:
    """Collect everything, then freeze what survived: it is the configuration's; and
    give what the collection and the commit before it freed back to the system."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()
    release_free_memory()


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
