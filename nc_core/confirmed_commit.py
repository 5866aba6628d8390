"""<commit>, confirmed commit and <cancel-commit> (RFC 6241 8.3.4 and 8.4, :confirmed-commit:1.1).

A confirmed commit applies the candidate at once but keeps the previous
running configuration; unless a confirming <commit> arrives within the
timeout, the server puts the old configuration back.  That is what lets a VPN
server push a change that might cut its own management path: if the CE cannot
be reached to confirm, it rolls back by itself.

The previous configuration is also written to the state directory while a
confirmed commit is pending, so a crash or a kill -9 during that window rolls
back at the next start instead of keeping an unconfirmed change forever.
"""

from __future__ import annotations

import asyncio
import logging
import time
from copy import deepcopy
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lxml import etree

from nc_core import faults
from nc_core.base_ops import checked, parameter
from nc_core.datastore import document_bytes
from nc_core.errors import RpcError
from nc_core.xmlutil import NC_NS

if TYPE_CHECKING:
    from nc_core.server import NetconfServer, RpcContext
    from nc_core.session import Session

log = logging.getLogger("cevpn.netconf")

DEFAULT_TIMEOUT = 600  # seconds, RFC 6241 8.4.5.1
BACKUP = "confirmed-commit-rollback"
"""The persisted document holding the configuration to roll back to."""
PERSISTENT_COMMIT_PENDING = "persistent-commit-pending"
"""error-app-tag of a commit refused because another client's persistent confirmed commit
is pending: a client that lost its token (it restarted) knows to wait for the rollback."""


@dataclass
class PendingCommit:
    session_id: int
    user: str
    source_host: str
    persist: str | None
    rollback_to: etree._Element
    timer: asyncio.TimerHandle | None = None
    server: str | None = None
    """The server sharing running (nc_core.shared_running) whose session made it; None: this
    one.  Another server's pending commit is mirrored here so that RFC 6241 holds across
    servers: changes are refused, and its persist-id confirms or cancels it."""
    deadline: float | None = None
    """When it rolls back (time.time())."""


class ConfirmedCommit:
    def __init__(self, server: NetconfServer) -> None:
        self.server = server
        self.pending: PendingCommit | None = None
        self.store = server.persistence
        self._tasks: set[asyncio.Task[None]] = set()
        self.operation: str | None = None
        """"confirm", "extend" or "rollback" while such a change of running is made: a
        coordinator of servers sharing running tells it from any other change."""

    def pending_session(self) -> int | None:
        return self.pending.session_id if self.pending is not None else None

    # -- operations -------------------------------------------------------------

    async def commit(self, ctx: RpcContext, op: etree._Element) -> None:
        server, session = self.server, ctx.session
        confirmed = parameter(op, "confirmed", required=False) is not None
        timeout = _timeout(op)
        persist = _text(op, "persist")
        persist_id = _text(op, "persist-id")
        if not confirmed and (timeout is not None or persist is not None):
            name = "confirm-timeout" if timeout is not None else "persist"
            raise RpcError(
                "invalid-value",
                f"<{name}> only makes sense with <confirmed/>.",
                type="protocol",
                info=[("bad-element", name)],
            )
        server.require_writer(session, "commit")
        async with server.config_lock:
            server.check_not_locked("running", session)
            server.check_not_locked("candidate", session)
            pending = self.pending
            if pending is None:
                if persist_id is not None:
                    raise RpcError(
                        "invalid-value",
                        "No confirmed commit is pending, so there is nothing to confirm with "
                        f"persist-id {persist_id!r}.",
                        type="protocol",
                        info=[("bad-element", "persist-id")],
                    )
                if not confirmed:
                    await self._commit_candidate(session)
                    return
                # Running's trees are replaced, never modified: the reference is the copy.
                rollback_to = server.datastores["running"].root
                self._keep_backup(rollback_to)
                try:
                    await self._commit_candidate(session)
                except BaseException:
                    self.store.delete(BACKUP)
                    raise
                self.pending = PendingCommit(
                    session.id, session.user, session.source_host, persist, rollback_to
                )
                self._arm(timeout or DEFAULT_TIMEOUT)
                server.notifications.confirmed_commit(session, "start", timeout or DEFAULT_TIMEOUT)
                return
            self._check_owner(pending, session, persist_id, "commit")
            if not confirmed:
                faults.point("confirming-commit")  # tests: a confirmation that fails
            self.operation = "extend" if confirmed else "confirm"
            try:
                await self._commit_candidate(session)
            finally:
                self.operation = None
            if confirmed:  # a follow-up confirmed commit extends the window
                if persist is not None:
                    pending.persist = persist
                pending.server = None  # made here: this server keeps it now
                self._arm(timeout or DEFAULT_TIMEOUT)
                server.notifications.confirmed_commit(session, "extend", timeout or DEFAULT_TIMEOUT)
            else:
                self._finish()
                server.notifications.confirmed_commit(session, "complete", None)

    async def cancel_commit(self, ctx: RpcContext, op: etree._Element) -> None:
        persist_id = _text(op, "persist-id")
        self.server.require_writer(ctx.session, "cancel-commit")
        async with self.server.config_lock:
            pending = self.pending
            if pending is None:
                raise RpcError(
                    "operation-failed",
                    "No confirmed commit is in progress.",
                    type="protocol",
                )
            self._check_owner(pending, ctx.session, persist_id, "cancel-commit")
            await self._rollback("cancel", ctx.session)

    def _check_owner(
        self, pending: PendingCommit, session: Session, persist_id: str | None, what: str
    ) -> None:
        if pending.persist is not None:
            if persist_id != pending.persist:
                raise RpcError(
                    "invalid-value",
                    f"A persistent confirmed commit is pending: <{what}> needs its <persist-id>"
                    + ("" if persist_id is None else f" ({persist_id!r} does not match)")
                    + ".",
                    type="protocol",
                    app_tag=PERSISTENT_COMMIT_PENDING,
                    info=[("bad-element", "persist-id")],
                )
        elif persist_id is not None:
            raise RpcError(
                "invalid-value",
                "The pending confirmed commit was not given a <persist> token.",
                type="protocol",
                info=[("bad-element", "persist-id")],
            )
        elif pending.session_id != session.id or pending.server is not None:
            raise RpcError(
                "in-use",
                f"Session {pending.session_id}{_of(pending)} has a confirmed commit in progress; "
                f"only it can {'confirm' if what == 'commit' else 'cancel'} it.",
                type="protocol",
                info=[("session-id", str(pending.session_id))],
            )

    def _keep_backup(self, rollback_to: etree._Element) -> None:
        """Persist the configuration a rollback restores: the committed running document.

        A journal copies it with a record naming it, made durable by the commit's own
        sync, which comes after it in the file (so a crash can never leave the new
        running configuration without its rollback document); other persistence
        writes the document."""
        copy = getattr(self.store, "copy", None)
        if copy is not None and self.store.read("running") is not None:
            copy("running", BACKUP)
        else:
            self.store.write(BACKUP, document_bytes(rollback_to))

    async def _commit_candidate(self, session: Session) -> None:
        server = self.server
        await server.change_running(server.candidate_onto_running(), session, reason="commit")
        server.reset_candidate()

    # -- rollback ---------------------------------------------------------------

    def _arm(self, timeout: int) -> None:
        assert self.pending is not None
        if self.pending.timer is not None:
            self.pending.timer.cancel()
        loop = asyncio.get_running_loop()
        self.pending.timer = loop.call_later(timeout, self._spawn_rollback, "timeout")
        self.pending.deadline = time.time() + timeout
        if self.server.shared is not None:
            self.server.shared.confirmed_commit_armed(self.pending)

    def mirror(self, pending: PendingCommit | None, *, grace: float = 1.0) -> None:
        """Another server's pending commit (None: none any more, this server's included, which
        another server confirmed or cancelled), as its coordinator sees it in the database.

        Its rollback is armed at its deadline plus ``grace``: the server that made it
        normally rolls it back first, and if that server died, this one does."""
        current = self.pending
        if current is not None and current is not pending and current.timer is not None:
            current.timer.cancel()
        self.pending = pending
        if pending is not None and pending.deadline is not None:
            if pending.timer is not None:
                pending.timer.cancel()
            wait = max(pending.deadline - time.time(), 0.0) + grace
            pending.timer = asyncio.get_running_loop().call_later(
                wait, self._spawn_rollback, "timeout"
            )

    def roll_back_soon(self, reason: str) -> None:
        """Roll the pending commit back as soon as the configuration lock is free (a
        coordinator of servers sharing running: the server that made it died)."""
        self._spawn_rollback(reason)

    def _spawn_rollback(self, reason: str) -> None:
        task = asyncio.get_running_loop().create_task(self._locked_rollback(reason))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _locked_rollback(self, reason: str) -> None:
        async with self.server.config_lock:
            if self.server.shared is not None:
                await self.server.shared.refresh()  # another server may have ended it
            if self.pending is not None:
                await self._rollback(reason, None)

    async def _rollback(self, reason: str, session: Session | None) -> None:
        pending = self.pending
        assert pending is not None
        log.warning("confirmed commit of session %d rolled back (%s)", pending.session_id, reason)
        self.operation = "rollback"
        edited = self.server.candidate_modified or self.server.candidate_edited
        try:
            await self.server.change_running(
                deepcopy(pending.rollback_to), None, reason="rollback", check_access=False
            )
        except Exception:
            log.exception("rollback of a confirmed commit failed; keeping the rollback file")
            raise
        finally:
            self.operation = None
        self.server.running_rolled_back(
            f"the confirmed commit of session {pending.session_id}: {reason}", edited=edited
        )
        self._finish()
        self.server.notifications.confirmed_commit(session, reason, None, pending=pending)

    def _finish(self) -> None:
        if self.pending is not None and self.pending.timer is not None:
            self.pending.timer.cancel()
        self.pending = None
        self.store.delete(BACKUP)

    def session_ended(self, session: Session) -> None:
        """RFC 6241 8.4.1: a non-persistent confirmed commit dies with its session."""
        pending = self.pending
        if (
            pending is not None
            and pending.persist is None
            and pending.server is None
            and pending.session_id == session.id
        ):
            self._spawn_rollback("cancel")

    def recover_after_restart(self) -> None:
        """A confirmed commit pending when the server died is rolled back now."""
        backup = self.store.read(BACKUP)
        if backup is None:
            return
        log.warning("rolling back a confirmed commit left pending by the previous run")
        self.store.write("running", backup)
        self.store.delete(BACKUP)

    def shutdown(self) -> None:
        if self.pending is not None and self.pending.timer is not None:
            self.pending.timer.cancel()


def _of(pending: PendingCommit) -> str:
    return "" if pending.server is None else f" of server {pending.server}"


def _text(op: etree._Element, name: str) -> str | None:
    elem = parameter(op, name, required=False)
    return None if elem is None else (elem.text or "").strip()


def _timeout(op: etree._Element) -> int | None:
    text = _text(op, "confirm-timeout")
    if text is None:
        return None
    if not text.isdigit() or not 0 < int(text) <= 0xFFFFFFFF:
        raise RpcError(
            "invalid-value",
            f"confirm-timeout {text!r} is not a number of seconds between 1 and 4294967295.",
            type="protocol",
            info=[("bad-element", "confirm-timeout")],
        )
    return int(text)


def register(server: NetconfServer) -> ConfirmedCommit:
    confirmed = ConfirmedCommit(server)
    server.register(NC_NS, "commit", "ietf-netconf", checked(confirmed.commit))
    server.register(NC_NS, "cancel-commit", "ietf-netconf", checked(confirmed.cancel_commit))
    return confirmed
