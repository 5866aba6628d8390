"""Several VPN servers on one PostgreSQL database: one running configuration for all.

Any server accepts operators' NETCONF sessions.  What keeps them one truth:

- **A generation number** of running, stored in the same transaction as the
  document (table ``cluster``, key ``running``: the number and the server that
  committed it).  Each server knows the generation its own running is.
- **Commits serialised through the database.**  A commit of running (edit-config,
  commit, copy-config, a confirmed commit's rollback, the server's own enrol and
  remove-site: everything that goes through ``NetconfServer.change_running``)
  holds a session-level advisory lock (:data:`COMMIT_LOCK`) on a connection of
  its own from before it is validated until it is published.  Inside it, a
  database generation newer than this server's means another server committed
  meanwhile: that commit is adopted first, then this change is redone on top of
  it if the two are disjoint or refused (configuration-changed-elsewhere) if not
  (nc_core.shared_running).  Publishing checks the generation again in its
  transaction (a fence: it cannot differ while the commit lock is held) and
  NOTIFYs the new one.
- **Followers.**  Each server LISTENs on :data:`CHANNEL` and adopts the newer
  running through the same application path a local commit takes (the
  controller compiles, subscribers get netconf-config-change with changed-by
  server); it also polls every :data:`POLL` seconds, which catches up after a
  lost connection or notification and notices a dead listening connection.
- **The running lock** is a session-level advisory lock (:data:`RUNNING_LOCK`)
  on a connection of its own, so it dies with the server's process or its
  connection; a row names the holder (server, session-id) for the error other
  servers give.

A session's lock and a session-level advisory lock are both owned by a
database session: each of the three connections here is this server's alone.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import psycopg

from nc_core.errors import RpcError
from nc_core.shared_running import NewerRunning
from nc_server.storage import SqliteDatastores
from nc_server.storage_postgresql import (
    CONNECT_TIMEOUT,
    PostgresStorage,
    redact_text,
)

if TYPE_CHECKING:
    from nc_core.server import NetconfServer

log = logging.getLogger("cevpn.shared")

CHANNEL = "cevpn_running"
"""NOTIFY channel: the payload is the generation just committed."""
TABLE = "cluster"
"""The storage table of what the servers share about running."""
GENERATION_KEY = "running"
LOCK_KEY = "lock:"
"""+ a datastore name: the holder of its lock (``server-name\\nsession-id``)."""

# Session-level advisory locks ("cevpn", then 3 and 4; storage_postgresql has 1 and 2).
COMMIT_LOCK = 0x636576706E_0003
RUNNING_LOCK = 0x636576706E_0004

COMMIT_WAIT = 30.0
"""Seconds a commit waits for another server's commit to finish before it is refused."""
POLL = 2.0
"""Seconds between checks of the database when no notification comes."""


def server_name() -> str:
    """How a server names itself to the others (messages, changed-by in logs)."""
    return f"{socket.gethostname()} (pid {os.getpid()})"


@dataclass(frozen=True)
class Generation:
    """Which commit of running the database holds, and who made it."""

    number: int
    committed_by: str

    def encode(self) -> bytes:
        return f"{self.number}\n{self.committed_by}".encode()

    @classmethod
    def decode(cls, value: bytes | None) -> Generation:
        if value is None:
            return cls(0, "")
        number, _, by = value.decode().partition("\n")
        return cls(int(number), by)


class StaleRunning(RuntimeError):
    """Running in the database is not the one this commit was judged on: never published."""


class SharedDatastores(SqliteDatastores):
    """The datastores on PostgreSQL, running with its generation (see the module)."""

    def __init__(self, storage: PostgresStorage, name: str | None = None) -> None:
        super().__init__(storage)
        self.postgres = storage
        self.name = name or server_name()
        self.generation: int | None = None
        """The generation this server's running is; None until running is first read."""

    def stored_generation(self) -> Generation:
        return Generation.decode(self.storage.get(TABLE, GENERATION_KEY))

    def read_running(self) -> tuple[bytes | None, Generation]:
        """Running and its generation, as one committed state of the database."""
        with self.storage.transaction():
            return self.storage.get(self.TABLE, "running"), self.stored_generation()

    def read(self, name: str) -> bytes | None:
        if name != "running" or self.generation is not None:
            return super().read(name)
        # The first read of running is the server loading it: its base generation.
        document, generation = self.read_running()
        self.generation = generation.number
        return document

    def write(self, name: str, data: bytes) -> None:
        if name != "running":
            super().write(name, data)
            return
        with self.storage.transaction():
            self._store_running(data, self.stored_generation())

    def publish(self, name: str) -> None:
        if name != "running":
            super().publish(name)
            return
        data = self._staged.pop(name)
        with self.storage.transaction():
            stored = self.stored_generation()
            if self.generation is not None and stored.number != self.generation:
                raise StaleRunning(
                    f"running in the database is generation {stored.number} (by "
                    f"{stored.committed_by}), this commit was judged on {self.generation}"
                )
            self._store_running(data, stored)

    def _store_running(self, data: bytes, stored: Generation) -> None:
        new = Generation(stored.number + 1, self.name)
        self.storage.put(self.TABLE, "running", data)
        self.storage.put(TABLE, GENERATION_KEY, new.encode())
        self.postgres.notify(CHANNEL, str(new.number))
        self.generation = new.number


@dataclass(frozen=True)
class LockHolder:
    server: str
    session_id: int

    @classmethod
    def decode(cls, value: bytes | None) -> LockHolder | None:
        if value is None:
            return None
        server, _, session = value.decode().partition("\n")
        return cls(server, int(session or 0))


class PostgresSharedRunning:
    """nc_core.shared_running.SharedRunning on PostgreSQL, and the follower of other servers."""

    def __init__(self, server: NetconfServer, datastores: SharedDatastores) -> None:
        self.server = server
        self.datastores = datastores
        self.url = datastores.postgres.url
        self._commit_conn: psycopg.AsyncConnection[Any] | None = None
        self._lock_conn: psycopg.AsyncConnection[Any] | None = None
        self._lock_conn_use = asyncio.Lock()
        self._follower: asyncio.Task[None] | None = None
        self.adopted_at: float | None = None
        """time.monotonic() of the last adoption of another server's commit (tests, logs)."""

    # -- connections ---------------------------------------------------------------

    async def _connect(self) -> psycopg.AsyncConnection[Any]:
        try:
            return await psycopg.AsyncConnection.connect(
                self.url, autocommit=True, connect_timeout=CONNECT_TIMEOUT
            )
        except psycopg.Error as exc:
            raise RpcError(
                "resource-denied",
                "The shared VPN database cannot be reached: "
                + redact_text(" ".join(str(exc).split()), self.url),
            ) from None

    async def _commit_connection(self) -> psycopg.AsyncConnection[Any]:
        conn = self._commit_conn
        if conn is None or conn.closed:
            conn = await self._connect()
            await conn.execute(f"SET lock_timeout = '{int(COMMIT_WAIT * 1000)}ms'")
            self._commit_conn = conn
        return conn

    # -- commits -------------------------------------------------------------------

    @asynccontextmanager
    async def committing(self) -> AsyncIterator[NewerRunning | None]:
        conn = await self._commit_connection()
        try:
            await conn.execute("SELECT pg_advisory_lock(%s)", (COMMIT_LOCK,))
        except psycopg.errors.LockNotAvailable:
            raise RpcError(
                "resource-denied",
                f"Another server's commit of running has not finished in {COMMIT_WAIT:.0f} s; "
                "nothing was changed: try again.",
            ) from None
        except psycopg.Error as exc:
            await conn.close()
            raise RpcError(
                "operation-failed",
                "The commit could not be serialised with the other servers' (database: "
                + redact_text(" ".join(str(exc).split()), self.url)
                + "); nothing was changed.",
            ) from None
        try:
            await self._check_running_not_locked_elsewhere(conn)
            yield await self._catch_up_locked()
        finally:
            try:
                await conn.execute("SELECT pg_advisory_unlock(%s)", (COMMIT_LOCK,))
            except psycopg.Error:
                await conn.close()  # the lock goes with the session

    async def _check_running_not_locked_elsewhere(self, conn: psycopg.AsyncConnection[Any]) -> None:
        if self.server.locks.get("running") is not None:
            return  # a session of ours holds it: the engine refused everyone else already
        cur = await conn.execute("SELECT pg_try_advisory_lock_shared(%s)", (RUNNING_LOCK,))
        row = await cur.fetchone()
        if row is not None and row[0]:
            await conn.execute("SELECT pg_advisory_unlock_shared(%s)", (RUNNING_LOCK,))
            return
        holder = self._holder("running")
        raise RpcError(
            "in-use",
            f"The running datastore is locked by {_described(holder)}; try again once it is "
            "unlocked.",
            type="protocol",
            info=[("session-id", str(holder.session_id if holder else 0))],
        )

    def _holder(self, name: str) -> LockHolder | None:
        return LockHolder.decode(self.datastores.storage.get(TABLE, LOCK_KEY + name))

    # -- following the other servers ---------------------------------------------------

    async def catch_up(self) -> NewerRunning | None:
        """Adopt running if another server committed a newer one."""
        async with self.server.config_lock:
            return await self._catch_up_locked()

    async def _catch_up_locked(self) -> NewerRunning | None:
        document, stored = self.datastores.read_running()
        ours = self.datastores.generation
        if document is None or ours is None or stored.number <= ours:
            return None
        started = time.monotonic()
        await self.server.adopt_running(document)
        self.datastores.generation = stored.number
        self.adopted_at = time.monotonic()
        log.info(
            "running: adopted generation %d committed by %s (%.0f ms)",
            stored.number,
            stored.committed_by,
            (self.adopted_at - started) * 1000,
        )
        return NewerRunning(stored.number, stored.committed_by)

    async def start(self) -> None:
        self._follower = asyncio.get_running_loop().create_task(self._follow())

    async def _follow(self) -> None:
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(
                    self.url, autocommit=True, connect_timeout=CONNECT_TIMEOUT
                ) as conn:
                    await conn.execute(f"LISTEN {CHANNEL}")
                    while True:
                        await self._catch_up_logged()
                        async for _ in conn.notifies(timeout=POLL, stop_after=1):
                            pass
                        await conn.execute("SELECT 1")  # a dead connection raises here
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning(
                    "following the other servers: %s; reconnecting",
                    redact_text(" ".join(str(exc).split()), self.url),
                )
                await asyncio.sleep(1.0)

    async def _catch_up_logged(self) -> None:
        try:
            await self.catch_up()
        except (RpcError, psycopg.Error, RuntimeError):
            log.exception("running of another server could not be adopted; retrying")
            await asyncio.sleep(POLL)

    # -- locks -------------------------------------------------------------------------

    async def lock(self, name: str, session_id: int) -> None:
        async with self._lock_conn_use:
            conn = self._lock_conn
            if conn is None or conn.closed:
                conn = self._lock_conn = await self._connect()
            cur = await conn.execute("SELECT pg_try_advisory_lock(%s)", (RUNNING_LOCK,))
            row = await cur.fetchone()
            if row is None or not row[0]:
                holder = self._holder(name)
                raise RpcError(
                    "lock-denied",
                    f"The {name} datastore is already locked by {_described(holder)}.",
                    type="protocol",
                    info=[("session-id", str(holder.session_id if holder else 0))],
                )
            self.datastores.storage.put(
                TABLE, LOCK_KEY + name, f"{self.datastores.name}\n{session_id}".encode()
            )

    async def unlock(self, name: str) -> None:
        async with self._lock_conn_use:
            conn = self._lock_conn
            if conn is None or conn.closed:
                return  # the lock went with the connection
            try:
                await conn.execute("SELECT pg_advisory_unlock(%s)", (RUNNING_LOCK,))
            except psycopg.Error:
                await conn.close()
            holder = self._holder(name)
            if holder is not None and holder.server == self.datastores.name:
                self.datastores.storage.delete(TABLE, LOCK_KEY + name)

    # -- lifecycle ---------------------------------------------------------------------

    async def stop(self) -> None:
        if self._follower is not None:
            self._follower.cancel()
            try:
                await self._follower
            except asyncio.CancelledError:
                pass
            self._follower = None
        for conn in (self._commit_conn, self._lock_conn):
            if conn is not None and not conn.closed:
                await conn.close()


def _described(holder: LockHolder | None) -> str:
    if holder is None:
        return "a session of another server"
    return f"session {holder.session_id} of server {holder.server}"
