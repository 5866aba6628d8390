"""Which VPN server provisions which CE: exactly one live server each, fenced.

With SQLite there is one server and it owns every CE (:class:`SoleOwnership`:
nothing stored, nothing checked).  With several servers on one PostgreSQL
database (:class:`SharedOwnership`), the rules of nc_server.leases run on two
tables (nc_server.storage_postgresql, schema version 2):

- ``cevpn_server_lease``: each server's lease, renewed every second by a
  thread of its own (nc_server.lease_keepalive), so that a busy event loop
  does not lose it; its expiry is the database's ``now()`` + TTL, so every
  server judges it by the same clock.
- ``cevpn_ce_owner``: site -> server, epoch.  Every second an ownership round
  runs on the event loop, in one transaction, under an advisory lock all
  servers take: read who is live, take over the CEs of servers whose lease
  expired (their rows locked and checked again, epoch + 1, one log line per
  dead server), give new CEs their rendezvous owner, hand over this server's
  CEs another live server now wins (only those with no push in flight), and
  renew this server's lease as well.
- ``cevpn_ce_caller``: site -> server, for each call-home CE's connection a
  server holds (RFC 8071).  Each server rewrites its own rows in every
  renewal, from its live links; a call-home CE is owned by the server holding
  its connection (nc_server.leases.winner), and handed over by its owner only
  once the owner holds no live connection from it (and no push is in flight).

A push checks :meth:`SharedOwnership.check` just before its edit, its commit
and its confirmation go out: the CE must be this server's at the epoch the
push began with, and the lease valid by the local clock (nc_server.leases.
LocalLease).  What a CE confirmed is recorded only while this server still
owns it at that epoch, checked in the very transaction that writes it
(:meth:`SharedOwnership.writable`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Collection, Mapping
from typing import TYPE_CHECKING, Any, Protocol

import psycopg

from nc_server.leases import (
    Calls,
    Change,
    Fenced,
    LeaseTimes,
    LocalLease,
    Owner,
    hands_over,
    plan,
)

if TYPE_CHECKING:
    from nc_server.storage_postgresql import PostgresStorage

log = logging.getLogger("cevpn.ownership")

OwnershipChanged = Callable[[set[str], set[str]], None]
"""Told (gained, lost) after each change of the CEs this server owns (and, as gained,
every CE it owns when its lease comes back after it lapsed)."""


class Ownership(Protocol):
    """What provisioning asks of ownership; both kinds below implement it."""

    name: str
    shared: bool

    def epoch(self, site: str) -> int | None:
        """This server's epoch of the CE if it may push to it now; None otherwise."""
        ...

    def check(self, site: str, epoch: int) -> None:
        """Raise :class:`Fenced` unless the CE is still this server's at ``epoch`` and its
        lease is valid: called just before anything goes out to the CE."""
        ...

    def owner(self, site: str) -> str | None:
        """The server owning the CE as last seen (None: unknown, or not shared)."""
        ...

    def writable(self, epochs: Mapping[str, int]) -> set[str]:
        """The sites whose record may be written now (inside the storage transaction)."""
        ...

    def forget(self, site: str) -> None:
        """The site left the database (or its CE is deprovisioned): its row goes."""
        ...

    def leads(self) -> bool:
        """Whether this server is the one that begins IKE-less rekeys now (the first live
        server by name; nc_server.shared_keys)."""
        ...

    def defer(self, site: str) -> None:
        """A push to the CE was not made, or stopped, because ownership was in doubt (the
        lease lapsing, the CE being handed over): if the CE is still this server's after
        the next renewal, it is reported gained again, so that its push is not lost."""
        ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


class SoleOwnership:
    """One server on its own database: it owns every CE, and nothing is checked."""

    shared = False

    def __init__(self, name: str = "") -> None:
        self.name = name

    def epoch(self, site: str) -> int | None:
        return 0

    def check(self, site: str, epoch: int) -> None:
        return None

    def owner(self, site: str) -> str | None:
        return None

    def writable(self, epochs: Mapping[str, int]) -> set[str]:
        return set(epochs)

    def forget(self, site: str) -> None:
        return None

    def defer(self, site: str) -> None:
        return None  # never in doubt

    def leads(self) -> bool:
        return True

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None


class SharedOwnership:
    """CE ownership among the servers of one PostgreSQL database (see the module)."""

    shared = True

    def __init__(
        self,
        storage: PostgresStorage,
        name: str,
        *,
        known_sites: Callable[[], Collection[str]],
        busy: Callable[[], Collection[str]],
        changed: OwnershipChanged,
        call_home: Callable[[], Collection[str]] = frozenset,
        holding: Callable[[], Collection[str]] = frozenset,
        times: LeaseTimes | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.storage = storage
        self.name = name
        self.known_sites = known_sites
        self.busy = busy
        self.changed = changed
        self.call_home = call_home
        """The call-home sites (their CEs open the connection, RFC 8071)."""
        self.holding = holding
        """The call-home sites whose CE's connection this server holds, alive, now."""
        self.times = times or LeaseTimes.from_environment()
        self.lease = LocalLease(self.times, clock)
        # Imported here, as the PostgreSQL storage is: a server on SQLite never loads them.
        from nc_server.lease_keepalive import LeaseKeepAlive

        self.keepalive = LeaseKeepAlive(
            storage.url if storage else "", name, self.lease, self.times, clock
        )
        self._revivals_seen = 0
        self._heartbeat: asyncio.TimerHandle | None = None
        self.owned: dict[str, int] = {}
        """This server's CEs and their epochs, as of its last successful renewal."""
        self.owners: dict[str, str] = {}
        """Every CE's owner as of the last renewal (operational state)."""
        self.live: list[str] = []
        self.held: dict[str, set[str]] = {}
        """Call-home site -> servers holding its connection, as of the last renewal."""
        self._releasing: set[str] = set()
        """CEs being handed over: no push may start on them."""
        self._deferred: set[str] = set()
        """CEs whose push was refused while ownership was in doubt (:meth:`defer`)."""
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._task: asyncio.Task[None] | None = None
        self._round_failed = False
        self.rounds = 0
        """Ownership rounds done (each one renews the lease as well)."""

    # -- what provisioning asks --------------------------------------------------------

    def epoch(self, site: str) -> int | None:
        if not self.lease.valid() or site in self._releasing:
            return None
        return self.owned.get(site)

    def check(self, site: str, epoch: int) -> None:
        if not self.lease.valid():
            raise Fenced(f"the lease of server {self.name} may have run out")
        if site in self._releasing or self.owned.get(site) != epoch:
            raise Fenced(f"CE {site} is no longer provisioned by server {self.name}")

    def owner(self, site: str) -> str | None:
        return self.owners.get(site)

    def writable(self, epochs: Mapping[str, int]) -> set[str]:
        if not epochs:
            return set()
        rows = self.storage.query(
            "SELECT site, epoch FROM cevpn_ce_owner WHERE server = %s AND site = ANY(%s) FOR SHARE",
            (self.name, list(epochs)),
        )
        return {str(site) for site, epoch in rows if epochs.get(str(site)) == int(epoch)}

    def forget(self, site: str) -> None:
        self.storage.query("DELETE FROM cevpn_ce_owner WHERE site = %s", (site,))
        self.storage.query("DELETE FROM cevpn_ce_caller WHERE site = %s", (site,))
        self.owned.pop(site, None)
        self.owners.pop(site, None)
        self._deferred.discard(site)

    def defer(self, site: str) -> None:
        self._deferred.add(site)

    def leads(self) -> bool:
        return self.lease.valid() and bool(self.live) and self.live[0] == self.name

    # -- the lease -----------------------------------------------------------------------

    async def start(self) -> None:
        try:
            await self.renew()
        except (psycopg.Error, OSError) as exc:
            self._round_failed = True
            log.warning(
                "ownership: first lease renewal failed (%s); retrying",
                _brief(exc, self.storage.url),
            )
        self._beating()
        self.keepalive.start()
        self._task = asyncio.get_running_loop().create_task(self._renewing())

    def _beating(self) -> None:
        """The event loop's heartbeat, which the keep-alive renews the lease only while
        it hears (a hung loop loses the lease; a busy one does not)."""
        self.keepalive.beat()
        period = min(0.25, self.times.stall / 4)
        self._heartbeat = asyncio.get_running_loop().call_later(period, self._beating)

    async def _renewing(self) -> None:
        while True:
            await asyncio.sleep(self.times.renew)
            try:
                await self.renew()
                if self._round_failed:
                    log.info("ownership: ownership round done again")
                self._round_failed = False
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not self._round_failed:
                    # The lease itself is the keep-alive's: it says when that fails.
                    log.warning(
                        "ownership: ownership round failed (%s); takeovers and handovers"
                        " wait for the next one",
                        _brief(exc, self.storage.url),
                    )
                self._round_failed = True
                if self._conn is not None:
                    await self._conn.close()
                    self._conn = None

    async def _connection(self) -> psycopg.AsyncConnection[Any]:
        if self._conn is None or self._conn.closed:
            self._conn = await psycopg.AsyncConnection.connect(
                self.storage.url,
                autocommit=True,
                connect_timeout=max(1, int(self.times.renew * 2)),
            )
            # A round that cannot finish in time is worth nothing: give up and retry.
            timeout_ms = int(self.times.renew * 1000)
            await self._conn.execute(f"SET statement_timeout = {timeout_ms}")
            # A server frozen inside its round (SIGSTOP, a pause, a busy loop) must not
            # keep the ownership lock from the others, who may be taking CEs over: the
            # database ends its session, and its transaction with it, after this long.
            await self._conn.execute(f"SET idle_in_transaction_session_timeout = {timeout_ms}")
        return self._conn

    async def renew(self) -> None:
        """One ownership round: dead servers' CEs, new CEs, handovers, and the lease
        (one transaction)."""
        from nc_server.lease_keepalive import RENEW_SQL
        from nc_server.storage_postgresql import OWNERSHIP_LOCK

        conn = await self._connection()
        busy = set(self.busy())
        call_home = set(self.call_home())
        mine = set(self.holding()) & call_home
        # Synchronously with the snapshot of ``busy``: a push starting from now on a CE that
        # may be handed over is refused (pushes in flight keep their CE until they end).
        previously = Calls(call_home, self.held, mine)
        self._releasing = {
            site
            for site in self.owned
            if site not in busy
            and self.live
            and hands_over(self.name, site, self.live, previously) is not None
        }
        known = set(self.known_sites())
        sent = self.lease.sending()
        try:
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock(%s)", (OWNERSHIP_LOCK,))
                # The row is made if it is missing (the first round, or another server
                # took this one's CEs and deleted it), but not locked: the keep-alive's
                # renewals go on while this round runs.  This server's lease is renewed
                # by the round's last statement, so it counts as live here.
                await conn.execute(
                    "INSERT INTO cevpn_server_lease (server, expires) VALUES"
                    " (%s, now() + make_interval(secs => %s)) ON CONFLICT (server) DO NOTHING",
                    (self.name, self.times.ttl),
                )
                cur = await conn.execute(
                    "SELECT server, expires + make_interval(secs => %s) > now(), expires"
                    " FROM cevpn_server_lease",
                    (self.times.grace,),
                )
                leases = await cur.fetchall()
                dead = {
                    str(s): expires
                    for s, alive, expires in leases
                    if not alive and str(s) != self.name
                }
                if dead:
                    # Judged dead on a snapshot: lock the rows and judge them again on
                    # their latest version, so that a keep-alive renewing one now either
                    # commits first (and its server is live) or waits and finds it gone.
                    cur = await conn.execute(
                        "SELECT server FROM cevpn_server_lease WHERE server = ANY(%s)"
                        " AND expires + make_interval(secs => %s) <= now() FOR UPDATE",
                        (list(dead), self.times.grace),
                    )
                    still = {str(server) for (server,) in await cur.fetchall()}
                    dead = {server: at for server, at in dead.items() if server in still}
                live = sorted({str(s) for s, _, _ in leases} - set(dead) | {self.name})
                if dead:
                    await conn.execute(
                        "DELETE FROM cevpn_server_lease WHERE server = ANY(%s)", (list(dead),)
                    )
                # The call-home connections this server holds now replace what it recorded.
                await conn.execute(
                    "DELETE FROM cevpn_ce_caller WHERE server = %s OR server = ANY(%s)",
                    (self.name, list(dead)),
                )
                if mine:
                    await conn.execute(
                        "INSERT INTO cevpn_ce_caller (site, server) SELECT unnest(%s::text[]), %s",
                        (sorted(mine), self.name),
                    )
                cur = await conn.execute("SELECT site, server FROM cevpn_ce_caller")
                held: dict[str, set[str]] = {}
                for site, server in await cur.fetchall():
                    held.setdefault(str(site), set()).add(str(server))
                cur = await conn.execute("SELECT site, server, epoch FROM cevpn_ce_owner")
                rows = {str(s): Owner(str(o), int(e)) for s, o, e in await cur.fetchall()}
                # Not handed over: what is busy, and what was not marked releasing in time.
                keep = busy | (set(self.owned) - self._releasing)
                calls = Calls(call_home, held, mine)
                changes = plan(self.name, rows, live, known, busy=keep, calls=calls)
                if changes:
                    # One statement for them all: the transaction holds OWNERSHIP_LOCK, and
                    # a statement per CE (a round trip each, through a loaded event loop)
                    # made the renewal that assigns a thousand CEs outlast its own
                    # timeouts, rolled back and tried again at every renewal, while the
                    # other servers' renewals timed out waiting for the lock.
                    await conn.execute(
                        "INSERT INTO cevpn_ce_owner (site, server, epoch)"
                        " SELECT * FROM unnest(%s::text[], %s::text[], %s::bigint[])"
                        " ON CONFLICT (site) DO UPDATE SET server = EXCLUDED.server,"
                        " epoch = EXCLUDED.epoch, since = now()",
                        (
                            [change.site for change in changes],
                            [change.server for change in changes],
                            [change.epoch for change in changes],
                        ),
                    )
                await conn.execute(RENEW_SQL, (self.times.ttl, self.name))
        except BaseException:
            self._releasing = set()
            raise
        self.lease.renewed(sent)
        self.rounds += 1
        for change in changes:
            rows[change.site] = Owner(change.server, change.epoch)
        self._log_changes(changes, dead)
        led = bool(self.live) and self.live[0] == self.name
        self.live = live
        if (live[0] == self.name) != led:
            log.info(
                "ownership: this server %s IKE-less rekeys",
                "now leads" if not led else "no longer leads",
                extra={"step": "rekey-leader"},
            )
        self.held = held
        self.owners = {site: row.server for site, row in rows.items()}
        owned = {site: row.epoch for site, row in rows.items() if row.server == self.name}
        before = self.owned
        self.owned = owned
        self._releasing = set()
        gained = {site for site, epoch in owned.items() if before.get(site) != epoch}
        lost = {site for site, epoch in before.items() if owned.get(site) != epoch}
        if self.lease.revivals != self._revivals_seen:
            # The lease lapsed and is valid again (or this is the first round): pushes
            # were refused meanwhile, so every CE is gone over again.
            self._revivals_seen = self.lease.revivals
            gained = set(owned)
        # Pushes refused since the last renewal (the lease ran short while this one was
        # on its way, or the CE was about to be handed over and was not after all): the
        # CEs still this server's are gone over again, or they would wait for ever.
        deferred, self._deferred = self._deferred, set()
        gained |= deferred & set(owned)
        if gained or lost:
            self.changed(gained, lost - set(owned))

    def _log_changes(self, changes: list[Change], dead: Mapping[str, Any]) -> None:
        by_dead: dict[str, list[Change]] = {}
        for change in changes:
            if change.reason == "takeover" and change.previous is not None:
                by_dead.setdefault(change.previous, []).append(change)
        for server, taken in sorted(by_dead.items()):
            shares: dict[str, int] = {}
            for change in taken:
                shares[change.server] = shares.get(change.server, 0) + 1
            expired = dead.get(server)
            log.warning(
                "ownership: server %s is dead (lease expired %s): its %d CE(s) taken over by %s",
                server,
                expired.isoformat(timespec="milliseconds") if expired is not None else "earlier",
                len(taken),
                ", ".join(f"{s} ({n})" for s, n in sorted(shares.items())),
                extra={"step": "takeover", "dead_server": server, "sites": len(taken)},
            )
        handed = [c for c in changes if c.reason == "handover"]
        if handed:
            log.info(
                "ownership: %d CE(s) handed over to the servers that now win them",
                len(handed),
                extra={"step": "handover", "sites": len(handed)},
            )

    async def stop(self) -> None:
        """Stop pushing, then give the lease up so that the others take the CEs at once."""
        self.lease.lapse()
        await asyncio.to_thread(self.keepalive.stop)
        self.lease.lapse()  # a renewal under way when it was told to stop
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            self._heartbeat = None
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        try:
            conn = await self._connection()
            await conn.execute("DELETE FROM cevpn_server_lease WHERE server = %s", (self.name,))
            await conn.execute("DELETE FROM cevpn_ce_caller WHERE server = %s", (self.name,))
            log.info("ownership: lease of server %s given up", self.name)
        except (psycopg.Error, OSError) as exc:
            log.warning(
                "ownership: lease not given up (%s): it expires by itself",
                _brief(exc, self.storage.url),
            )
        if self._conn is not None:
            await self._conn.close()
            self._conn = None


def _brief(exc: BaseException, url: str) -> str:
    """The error in one line, never with the database's password (imported when an
    error is told: a server on SQLite never loads the PostgreSQL storage)."""
    from nc_server.storage_postgresql import redact_error

    return redact_error(exc, url)
