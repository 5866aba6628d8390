"""Creating kernel handles inside another network namespace, without forking.

A netlink socket belongs to the namespace it was created in, whatever thread
later uses it.  So a short-lived thread enters the namespace (setns(2) moves
only the calling thread), creates the handle and ends.  pyroute2's own NetNS
forks a helper process instead, and a forked copy of an asyncio/uvloop
server shares its signal wake-up pipe: the SIGTERM pyroute2 sends its helper
reaches the server's loop as if the server itself had been told to stop.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Callable
from typing import Any, TypeVar

CLONE_NEWNET = 0x40000000
# The C library the interpreter already runs on: find_library("c") would start
# ldconfig, a process start the agent pays at every boot.
_libc = ctypes.CDLL(None, use_errno=True)

T = TypeVar("T")


def setns(fd: int) -> None:
    """Move the calling thread into the network namespace open on ``fd``."""
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def create_in(netns: str | None, factory: Callable[[], T]) -> T:
    """``factory()`` run by a fresh thread inside network namespace ``netns``.

    ``netns`` is a name under /run/netns; None keeps the current namespace.
    The thread is fresh either way: pyroute2 creates its sockets lazily, in
    the thread that first uses them, and must not find a running event loop.
    """
    result: list[T] = []
    failure: list[BaseException] = []

    def in_netns() -> None:
        try:
            if netns is not None:
                with open(f"/run/netns/{netns}") as target:
                    setns(target.fileno())
            result.append(factory())
        except BaseException as exc:  # handed to the caller below
            failure.append(exc)

    worker = threading.Thread(target=in_netns, name=f"netns-{netns or 'own'}")
    worker.start()
    worker.join()
    if failure:
        raise failure[0]
    return result[0]


def with_ipr(netns: str | None, work: Callable[[Any], T]) -> T:
    """Run ``work(ipr)`` with an rtnetlink handle of namespace ``netns``.

    pyroute2 creates its socket in the thread that first uses it, so the
    handle is created and used by one thread that entered the namespace.
    """
    from pyroute2 import IPRoute

    def run() -> T:
        with IPRoute() as ipr:
            return work(ipr)

    return create_in(netns, run)


def netlink_reason(exc: Exception) -> str:
    """The kernel's words for a NetlinkError (its errno text), for error messages."""
    return str(exc.args[1]) if len(exc.args) > 1 else str(exc)
