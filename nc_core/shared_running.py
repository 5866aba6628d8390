"""Running shared by several servers on one database: what the engine needs of it.

A server alone (SQLite, the agent's journal) shares nothing: its
``NetconfServer.shared`` is None and nothing here runs.  Several VPN servers on
one PostgreSQL database (nc_server.shared_running) share one running
configuration, and the engine needs three things from whatever coordinates
them, all behind :class:`SharedRunning` so that the engine never learns which
database that is:

- a commit is serialised against every other server's (:meth:`SharedRunning.committing`)
  and judged on the newest running: if another server committed since this
  server's running was taken, that commit is first adopted (made this server's
  running through the application's own path, :meth:`NetconfServer.adopt_running`)
  and this server's change is redone on top of it when the two are disjoint
  (:func:`rebase`), or refused with :data:`CHANGED_ELSEWHERE` when they touch the
  same nodes;
- another server's commit reaches this one without a commit of its own (the
  coordinator calls ``adopt_running`` when the database tells it);
- the running datastore's ``<lock>`` holds on every server (:meth:`SharedRunning.lock`);
- a pending confirmed commit holds on every server: the coordinator shares this
  server's (:meth:`SharedRunning.confirmed_commit_armed`) and mirrors another's in
  ``ConfirmedCommit.mirror``, so that changes are refused everywhere, its persist-id
  works everywhere, and it is rolled back even if its server died.
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from lxml import etree

from nc_core.errors import RpcError
from nc_core.merge import MESSAGE_PATHS, MergeConflict, merge3
from nc_core.schema import SchemaIndex

if TYPE_CHECKING:
    from nc_core.confirmed_commit import PendingCommit

CHANGED_ELSEWHERE = "configuration-changed-elsewhere"
"""error-app-tag of a change refused because another server changed the same nodes first."""


@dataclass(frozen=True)
class NewerRunning:
    """Another server's commit, adopted just before this server's commit was judged."""

    generation: int
    """The database's count of commits of running, this one included."""
    committed_by: str
    """The server that made it, as it names itself."""


class SharedRunning(Protocol):
    def committing(self) -> AbstractAsyncContextManager[NewerRunning | None]:
        """Hold the commit of running against every other server for the block.

        Entered with the engine's configuration lock held.  Raises an RpcError
        (in-use) when a session of another server holds the running lock.
        When another server committed since this server's running was taken,
        adopts it (``NetconfServer.adopt_running``) and yields what it adopted,
        else yields None.  The commit made in the block is published with the
        next generation; an exception leaves the database as it was.
        """
        ...

    async def lock(self, name: str, session_id: int) -> None:
        """Take ``name``'s lock for the whole group of servers, or raise RpcError
        (lock-denied, the holder's session-id in error-info) when a session of another
        server holds it.  Called after the local checks passed."""
        ...

    async def unlock(self, name: str) -> None:
        """Release this server's lock of ``name`` (unlock, or its session ended)."""
        ...

    async def refresh(self) -> None:
        """Catch up with the other servers now (running, their pending confirmed commit);
        the caller holds the configuration lock."""
        ...

    def confirmed_commit_armed(self, pending: PendingCommit) -> None:
        """This server's confirmed commit is pending until ``pending.deadline``: share it, so
        that the others refuse changes, accept its persist-id and roll it back if this
        server dies (at once, or at the deadline for a persistent one)."""
        ...


def rebase(
    base: etree._Element,
    mine: etree._Element,
    theirs: etree._Element,
    index: SchemaIndex,
    newer: NewerRunning,
) -> etree._Element:
    """``mine`` (a change of ``base``) redone onto ``theirs``, another server's newer running.

    Disjoint changes (nothing ``mine`` changed was changed in ``theirs``, node by
    node and list entry by list entry: nc_core.merge) are merged and both
    survive; otherwise the change is refused with an rpc-error that names the
    other server's commit and what to do, and nothing is changed.
    """
    try:
        return merge3(base, mine, theirs, index)
    except MergeConflict as conflict:
        raise changed_elsewhere(conflict, newer) from None


def changed_elsewhere(conflict: MergeConflict, newer: NewerRunning) -> RpcError:
    names = [c.readable for c in conflict.conflicts]
    shown = ", ".join(names[:MESSAGE_PATHS])
    if len(names) > MESSAGE_PATHS:
        shown += f" and {len(names) - MESSAGE_PATHS} more"
    first = conflict.conflicts[0]
    return RpcError(
        "operation-failed",
        f"Server {newer.committed_by} committed running (generation {newer.generation}) "
        f"while this change was being made, and changed {shown} too; this change was not "
        "made, so that it does not silently revert that one. Use <discard-changes>, look at "
        "running as it is now, and make your edit again.",
        type="application",
        app_tag=CHANGED_ELSEWHERE,
        path=first.path if first.path != "/" else None,
        path_ns=dict(first.path_ns) if first.path != "/" else {},
    )
