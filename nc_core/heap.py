"""What a large commit freed, collected and given back to the system after the reply; what
survived frozen out of Python's full collections.

A commit of a 999-peer configuration parses, validates and serialises several
transient copies of it (the edit's text, the candidate, libyang's trees, the
document), some 15 MB that glibc otherwise keeps in its heaps for good, between the
chunks still in use.  In a farm of 50 agents in one process (bench/agent_farm.py)
that was half of each agent's resident memory (docs/benchmarks.md).  And Python's
full collections walk the 26,000-71,000 objects of a 1,000-peer configuration
(15-32 ms, measured with ``gc.callbacks``), landing inside requests: the p99 of a
one-peer exchange at 1,000 peers was 36.6-58.3 ms.

So after start-up, and after a commit that changed much of the configuration (a
load, a full resynchronisation), at the event loop's next turn, after the reply has
been written, the heap is settled: everything is unfrozen and collected (cyclic
garbage among what was frozen before is found then), what survives is frozen
(``gc.freeze``: it lives as long as the configuration) and ``malloc_trim`` gives the
free pages back.  About a millisecond per 100 MB; small commits change nothing here.

History: the freeze was withdrawn twice because an agent of the lab's demo did not
exit within 30 s of SIGTERM in the CI runs that had it, and then the module
altogether when the hang came without it.  The cause was found later (stack dumps,
nc_core.cli_common): concurrent XFRM netlink dumps on one socket, fixed in
nc_agent.dataplane.xfrm; this module had only changed the timing.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nc_core.edit import Change

LARGE_CHANGE = 200
"""Changed nodes from which a commit settles the heap (a one-peer change is ~1-20)."""

_scheduled: set[asyncio.AbstractEventLoop] = set()

settled = 0
"""How many times the heap was settled (what tests observe)."""


def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None where the C library has none (musl, macOS).

    Looked up among the symbols the process has loaded already (``dlopen(NULL)``), not
    by ``ctypes.util.find_library``, which runs ``ldconfig -p``: a daemon starts no
    process at import (tests/test_start_up_imports.py; each costs ~50 ms in the lab)."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
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
    """Collect everything, freeze what survived (the configuration's), and give what the
    collection and the commit before it freed back to the system."""
    global settled
    gc.unfreeze()
    gc.collect()
    gc.freeze()
    release_free_memory()
    settled += 1


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
