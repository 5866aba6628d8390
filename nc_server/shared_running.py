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
  servers give.  When that connection breaks (a database failover, a network
  cut) the database has let the lock go: the server takes it again on a new
  connection within :data:`KEEP_LOCKS_EVERY` seconds of reaching the database,
  unless another server changed running meanwhile, or took the lock.  Then the
  lock was not a lock for a while: the holding session is ended (RFC 6022
  termination-reason ``other``), so that its client learns it at its next
  request instead of going on in the belief that nobody else changed running.
- **A pending confirmed commit** is stored: its rollback document (the datastore
  ``confirmed-commit-rollback``) and a record (:class:`ConfirmedRecord`: server,
  session, persist token, deadline), both written before the commit and deleted
  in the transaction that confirms or rolls it back.  Its server holds
  :data:`CONFIRMED_LOCK` meanwhile, so the others know whether it is alive.
  Every other server mirrors it (``ConfirmedCommit.mirror``): its sessions'
  changes are refused with in-use, its persist-id confirms or cancels it there,
  and when the deadline passes, or at once for a non-persistent one whose server
  died, the first server to notice rolls it back, once its server has looked dead
  for :data:`ORPHAN_GRACE` seconds (a live one whose connection broke takes the lock
  again in that time).
- **Startup** is stored with a generation of its own (key ``startup``, NOTIFY
  payload ``startup``): every server serves the startup any of them last saved.

A session's lock and a session-level advisory lock are both owned by a
database session: each of the three connections here is this server's alone.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import psycopg

from nc_core import faults
from nc_core.confirmed_commit import BACKUP, PendingCommit
from nc_core.datastore import free
from nc_core.errors import RpcError
from nc_core.shared_running import NewerRunning
from nc_core.tasks import stop_tasks
from nc_server import shared_contacts, shared_keys
from nc_server.storage import SqliteDatastores, StorageError
from nc_server.storage_postgresql import (
    CONNECT_TIMEOUT,
    PostgresStorage,
    redact_text,
)

if TYPE_CHECKING:
    from nc_core.server import NetconfServer
    from nc_server.shared_keys import KeyJournal, Rows

log = logging.getLogger("cevpn.shared")

CHANNEL = "cevpn_running"
"""NOTIFY channel: the payload is the generation just committed."""
TABLE = "cluster"
"""The storage table of what the servers share about running."""
GENERATION_KEY = "running"
KEYS_KEY = "keys:"
"""+ a generation: the key material rows its commit's compile wrote (shared_keys.KeyJournal)."""
KEYS_KEPT = 1_000
"""Generations whose key material rows are kept; a server further behind reads VPNs whole."""
STARTUP_KEY = "startup"
"""The generation of the stored startup (:class:`Generation`: number and saving server)."""
CONFIRMED_KEY = "confirmed-commit"
"""The pending confirmed commit (:class:`ConfirmedRecord` as JSON), while there is one."""
LOCK_KEY = "lock:"
"""+ a datastore name: the holder of its lock (``server-name\\nsession-id``)."""

# Session-level advisory locks ("cevpn", then 3 and 4; storage_postgresql has 1 and 2).
COMMIT_LOCK = 0x636576706E_0003
RUNNING_LOCK = 0x636576706E_0004
CONFIRMED_LOCK = 0x636576706E_0005

COMMIT_WAIT = 30.0
"""Seconds a commit waits for another server's commit to finish before it is refused."""
POLL = 2.0
"""Seconds between checks of the database when no notification comes."""
KEEP_LOCKS_EVERY = 1.0
"""Seconds between checks that the connections holding this server's locks still do."""
ORPHAN_GRACE = 5.0
"""Seconds a non-persistent confirmed commit's server must look dead before another
server rolls the commit back: several times KEEP_LOCKS_EVERY, so that a live server
whose connection broke has taken its lock again."""


_instances = itertools.count(1)


def server_name() -> str:
    """How a server names itself to the others (messages, logs); unique, as it also tells
    a server's own records from the others' (a second one in a process: tests)."""
    n = next(_instances)
    return f"{socket.gethostname()} (pid {os.getpid()}{'' if n == 1 else f' #{n}'})"


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


@dataclass(frozen=True)
class ConfirmedRecord:
    """A pending confirmed commit as the servers share it."""

    server: str
    session_id: int = 0
    user: str = ""
    source_host: str = ""
    persist: str | None = None
    deadline: float | None = None

    def encode(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @classmethod
    def decode(cls, value: bytes | None) -> ConfirmedRecord | None:
        return None if value is None else cls(**json.loads(value))


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
        self._owner_conn: psycopg.Connection[Any] | None = None
        self.holds_confirmed = False
        """This server holds CONFIRMED_LOCK: the pending confirmed commit is its own."""
        self.key_journal: KeyJournal | None = None
        """The key material rows of this server's commits, and of those it adopts (set by
        the application when it shares key material: nc_server.shared_keys)."""
        self.startup_generation = Generation(0, "")
        """The generation of the startup this server serves (read or saved): number and
        server, as two servers saving at once may both write the same number."""

    # -- a pending confirmed commit ------------------------------------------------------

    def confirmed_record(self) -> ConfirmedRecord | None:
        return ConfirmedRecord.decode(self.storage.get(TABLE, CONFIRMED_KEY))

    def _owner(self) -> psycopg.Connection[Any]:
        """This server's connection for CONFIRMED_LOCK (a session-level lock: it must stay)."""
        if self._owner_conn is None or self._owner_conn.closed:
            self._owner_conn = psycopg.connect(
                self.postgres.url, autocommit=True, connect_timeout=CONNECT_TIMEOUT
            )
            self.holds_confirmed = False
        return self._owner_conn

    def owner_alive(self) -> bool:
        """Does some server hold CONFIRMED_LOCK (this one excepted)?"""
        if self.holds_confirmed:
            return True
        conn = self._owner()
        row = conn.execute("SELECT pg_try_advisory_lock_shared(%s)", (CONFIRMED_LOCK,)).fetchone()
        if row is not None and row[0]:
            conn.execute("SELECT pg_advisory_unlock_shared(%s)", (CONFIRMED_LOCK,))
            return False
        return True

    def _take_confirmed_lock(self) -> bool:
        if not self.holds_confirmed:
            conn = self._owner()
            row = conn.execute("SELECT pg_try_advisory_lock(%s)", (CONFIRMED_LOCK,)).fetchone()
            self.holds_confirmed = bool(row is not None and row[0])
        return self.holds_confirmed

    def release_confirmed_lock(self) -> None:
        if self.holds_confirmed and self._owner_conn is not None:
            try:
                self._owner_conn.execute("SELECT pg_advisory_unlock(%s)", (CONFIRMED_LOCK,))
            except psycopg.Error:
                self._owner_conn.close()  # the lock goes with the session
        self.holds_confirmed = False

    def keep_confirmed_lock(self) -> bool:
        """CONFIRMED_LOCK still held, or taken again on a new connection if the old one
        broke (the database let it go with it); False if another server has it now."""
        conn = self._owner_conn
        if self.holds_confirmed and conn is not None and not conn.closed:
            try:
                conn.execute("SELECT 1")
                return True
            except psycopg.Error:
                conn.close()
        self.holds_confirmed = False
        faults.point("confirmed-lock-retake")
        if self._take_confirmed_lock():  # psycopg.Error while the database is unreachable
            log.warning("the pending confirmed commit's lock was taken again on a new connection")
            return True
        return False

    def update_confirmed(self, record: ConfirmedRecord) -> None:
        with self.storage.transaction():
            self.storage.put(TABLE, CONFIRMED_KEY, record.encode())
            self.postgres.notify(CHANNEL, "confirmed-commit")
        self._take_confirmed_lock()

    def _write_backup(self, data: bytes) -> None:
        """A confirmed commit starts here: refused while another server's is pending.

        CONFIRMED_LOCK is taken first, so that no server ever sees the record without
        a live owner (and rolls back a commit still being made)."""
        record: ConfirmedRecord | None = None
        taken = self._take_confirmed_lock()
        try:
            with self.storage.transaction():
                record = self.confirmed_record()
                if not taken or (record is not None and record.server != self.name):
                    raise confirmed_elsewhere(record)
                super().write(BACKUP, data)
                self.storage.put(TABLE, CONFIRMED_KEY, ConfirmedRecord(self.name).encode())
                self.postgres.notify(CHANNEL, "confirmed-commit")
        except BaseException:
            if taken:
                self.release_confirmed_lock()
            raise

    def _delete_backup(self) -> None:
        with self.storage.transaction():
            super().delete(BACKUP)
            if self.storage.get(TABLE, CONFIRMED_KEY) is not None:
                self.storage.delete(TABLE, CONFIRMED_KEY)
                self.postgres.notify(CHANNEL, "confirmed-commit")
        self.release_confirmed_lock()

    def _read_backup(self) -> bytes | None:
        """At start-up: the rollback document only if no server is left to see to it (its
        server died, and it is not a persistent one still within its deadline)."""
        record = self.confirmed_record()
        if record is not None:
            if self.owner_alive():
                return None
            if record.persist is not None and (record.deadline or 0) > time.time():
                return None  # mirrored once started: confirmable, rolled back at its deadline
        return super().read(BACKUP)

    def stored_generation(self) -> Generation:
        return Generation.decode(self.storage.get(TABLE, GENERATION_KEY))

    def read_running(self) -> tuple[bytes | None, Generation]:
        """Running and its generation, as one committed state of the database."""
        with self.storage.transaction():
            return self.storage.get(self.TABLE, "running"), self.stored_generation()

    def stored_startup_generation(self) -> Generation:
        return Generation.decode(self.storage.get(TABLE, STARTUP_KEY))

    def read_startup(self) -> bytes | None:
        """Startup and its generation, as one committed state of the database."""
        with self.storage.transaction():
            document = self.storage.get(self.TABLE, "startup")
            self.startup_generation = self.stored_startup_generation()
        return document

    def read(self, name: str) -> bytes | None:
        if name == BACKUP:
            return self._read_backup()
        if name == "startup":
            return self.read_startup()
        if name != "running" or self.generation is not None:
            return super().read(name)
        # The first read of running is the server loading it: its base generation.
        document, generation = self.read_running()
        self.generation = generation.number
        return document

    def write(self, name: str, data: bytes) -> None:
        if name == BACKUP:
            self._write_backup(data)
            return
        if name == "startup":
            with self.storage.transaction():
                saved = Generation(self.stored_startup_generation().number + 1, self.name)
                super().write(name, data)
                self.storage.put(TABLE, STARTUP_KEY, saved.encode())
                self.postgres.notify(CHANNEL, "startup")
            self.startup_generation = saved
            return
        if name != "running":
            super().write(name, data)
            return
        journal = self.key_journal
        record = None if journal is None else journal.pending()
        with self.storage.transaction():
            new = self._store_running(data, self.stored_generation(), record)
        self.generation = new  # committed: never before (a failed COMMIT leaves it as it was)
        if journal is not None:
            journal.published()

    def delete(self, name: str) -> None:
        if name == BACKUP:
            self._delete_backup()
        else:
            super().delete(name)

    def close(self) -> None:
        if self._owner_conn is not None:
            self._owner_conn.close()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """A change of running made by a command while servers run (``adduser``): under
        the servers' commit lock, on the running of that moment, refused while a session
        holds running's lock or a confirmed commit is pending.  Without the lock, a
        commit published between this read and this write would be silently undone."""
        try:
            conn = psycopg.connect(
                self.postgres.url, autocommit=True, connect_timeout=CONNECT_TIMEOUT
            )
        except psycopg.Error as exc:
            raise StorageError(
                "the shared VPN database cannot be reached: "
                + redact_text(" ".join(str(exc).split()), self.postgres.url)
            ) from None
        try:
            conn.execute(f"SET lock_timeout = '{int(COMMIT_WAIT * 1000)}ms'")
            try:
                conn.execute("SELECT pg_advisory_lock(%s)", (COMMIT_LOCK,))
            except psycopg.errors.LockNotAvailable:
                raise StorageError(
                    f"a server's commit of running has not finished in {COMMIT_WAIT:.0f} s; "
                    "nothing was changed: try again"
                ) from None
            row = conn.execute("SELECT pg_try_advisory_lock_shared(%s)", (RUNNING_LOCK,)).fetchone()
            if not (row is not None and row[0]):
                holder = _described(self.lock_holder("running"))
                raise StorageError(
                    f"the running datastore is locked by {holder}; nothing was changed: "
                    "try again once it is unlocked"
                )
            conn.execute("SELECT pg_advisory_unlock_shared(%s)", (RUNNING_LOCK,))
            record = self.confirmed_record()
            if record is not None and self.owner_alive():
                raise StorageError(
                    f"a confirmed commit of server {record.server} is pending; nothing was "
                    "changed: confirm or cancel it first"
                )
            self.generation = None  # running is read afresh, under the lock
            yield
        finally:
            conn.close()  # the session's advisory locks go with it

    def lock_holder(self, name: str) -> LockHolder | None:
        """Which server's session holds datastore ``name``'s lock, as that server recorded."""
        return LockHolder.decode(self.storage.get(TABLE, LOCK_KEY + name))

    def stage(
        self, name: str, data: bytes, *, base: bytes | None = None, shared: tuple[int, int] = (0, 0)
    ) -> None:
        if name == "running":
            self._check_base(self.stored_generation())  # before the application applies it
        super().stage(name, data, base=base, shared=shared)

    def publish(self, name: str) -> None:
        if name != "running":
            super().publish(name)
            return
        data = self._staged.pop(name)
        journal = self.key_journal
        record = None if journal is None else journal.pending()
        with self.storage.transaction():
            stored = self.stored_generation()
            self._check_base(stored)
            new = self._store_running(data, stored, record)
        self.generation = new  # committed: never before (a failed COMMIT leaves it as it was)
        if journal is not None:
            journal.published()

    def _check_base(self, stored: Generation) -> None:
        """The fence: under the commit lock no other server can commit, so this fails only
        if the lock was lost (its connection broke) while the commit was being made."""
        if self.generation is not None and stored.number != self.generation:
            raise StaleRunning(
                f"server {stored.committed_by} committed running (generation {stored.number}) "
                f"while this change, made on generation {self.generation}, was being applied; "
                "make the change again"
            )

    def _store_running(self, data: bytes, stored: Generation, keys: bytes | None = None) -> int:
        """Write running as the generation after ``stored``, in the caller's transaction;
        that generation, which becomes this server's once the transaction commits.

        A COMMIT whose connection breaks (the primary database died) may or may not have
        been made: this server's generation stays the one before, so that the follower
        adopts the commit if the database (the promoted standby) has it."""
        new = Generation(stored.number + 1, self.name)
        rows: dict[tuple[str, str], bytes | None] = {
            (self.TABLE, "running"): data,
            (TABLE, GENERATION_KEY): new.encode(),
            (TABLE, f"{KEYS_KEY}{new.number - KEYS_KEPT}"): None,
        }
        if keys is not None:
            rows[(TABLE, f"{KEYS_KEY}{new.number}")] = keys
        self.storage.write_many(rows)
        self.postgres.notify(CHANNEL, str(new.number))
        return new.number

    def key_rows_between(self, after: int, upto: int) -> dict[str, Rows] | None:
        """The key material rows the commits of generations ``after`` + 1 to ``upto`` wrote,
        by VPN; None when one of them is not known (pruned, or committed without a record)."""
        if upto - after > KEYS_KEPT:
            return None
        keys = [f"{KEYS_KEY}{n}" for n in range(after + 1, upto + 1)]
        found = self.storage.get_many(TABLE, keys)
        return shared_keys.merge_records(found.get(key) for key in keys)


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
        self._orphan: tuple[str, int] | None = None
        """The dead server's confirmed commit whose rollback this server started."""
        self.adopted_at: float | None = None
        """time.monotonic() of the last adoption of another server's commit (tests, logs)."""
        self.ce_heard: Callable[[str, str, str], None] | None = None
        """Told (server, site, source) when another server heard from a CE: the owner
        reacts (nc_server.shared_contacts)."""
        self.keys_changed: Callable[[Mapping[str, Rows] | None], None] | None = None
        """Told which VPNs' key material another server changed between commits (None: any
        may have, a notification may have been lost): nc_server.shared_keys."""
        self._keeper: asyncio.Task[None] | None = None
        self._adopted_while_locked = False
        """Another server's commit was adopted while a session here held running's lock:
        the lock had been lost (its connection broke), so it is not taken again."""
        self._owner_dead: tuple[tuple[str, int], float] | None = None
        """The pending confirmed commit (server, session) whose server was first seen dead,
        and when (time.monotonic()): rolled back after ORPHAN_GRACE."""

    # -- connections ---------------------------------------------------------------

    async def _connect(self) -> psycopg.AsyncConnection[Any]:
        try:
            return await psycopg.AsyncConnection.connect(
                self.url, autocommit=True, connect_timeout=CONNECT_TIMEOUT
            )
        except psycopg.Error as exc:
            detail = redact_text(" ".join(str(exc).split()), self.url)
            log.warning("the VPN database cannot be reached: %s", detail)
            raise RpcError(
                "resource-denied",
                f"The shared VPN database cannot be reached: {detail}; nothing was changed.",
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
            await conn.close()  # the next commit connects again (to the promoted standby)
            log.warning(
                "commit refused: the VPN database: %s",
                redact_text(" ".join(str(exc).split()), self.url),
            )
            raise RpcError(
                "operation-failed",
                "The commit could not be serialised with the other servers' (database: "
                + redact_text(" ".join(str(exc).split()), self.url)
                + "); nothing was changed.",
            ) from None
        try:
            try:
                await self._check_running_not_locked_elsewhere(conn)
                newer = await self._catch_up_locked()
                operation = self._check_confirmed_commit()
            except (psycopg.Error, StorageError) as exc:
                raise database_lost(exc, self.url) from None
            yield newer
            if operation in ("confirm", "rollback"):
                self.datastores.delete(BACKUP)  # inside the commit lock: no one rolls back twice
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

    def _check_confirmed_commit(self) -> str | None:
        """Refuse a change of running while another server's confirmed commit is pending, and
        the end of one no longer pending; the confirmed-commit operation under way."""
        operation = self.server.confirmed.operation
        record = self.datastores.confirmed_record()
        if operation in ("confirm", "extend", "rollback"):
            if record is None:
                raise RpcError(
                    "operation-failed",
                    "No confirmed commit is in progress any more: another server confirmed, "
                    "cancelled or rolled it back.",
                    type="protocol",
                )
        elif record is not None and record.server != self.datastores.name:
            raise confirmed_elsewhere(record)
        return operation

    def confirmed_commit_armed(self, pending: PendingCommit) -> None:
        self.datastores.update_confirmed(
            ConfirmedRecord(
                self.datastores.name,
                pending.session_id,
                pending.user,
                pending.source_host,
                pending.persist,
                pending.deadline,
            )
        )

    def _sync_confirmed(self) -> None:
        """Mirror the database's pending confirmed commit in this server's engine."""
        confirmed = self.server.confirmed
        record = self.datastores.confirmed_record()
        local = confirmed.pending
        if record is not None and record.server == self.datastores.name:
            return  # this server's own, as the engine knows it
        self.datastores.release_confirmed_lock()
        if record is None:
            if local is not None:
                log.info("the pending confirmed commit was ended by another server")
                confirmed.mirror(None)
            return
        if local is not None and local.server == record.server:
            if local.session_id == record.session_id:
                local.persist, local.deadline = record.persist, record.deadline
                confirmed.mirror(local)
                self._roll_back_orphan(record)
                return
        document = self.datastores.storage.get(self.datastores.TABLE, BACKUP)
        if document is None:
            return
        rollback_to, tree = self.server.validator.load(document, "confirmed-commit rollback")
        free(tree)
        confirmed.mirror(
            PendingCommit(
                record.session_id,
                record.user,
                record.source_host,
                record.persist,
                rollback_to,
                server=record.server,
                deadline=record.deadline,
            )
        )
        self._roll_back_orphan(record)

    def _roll_back_orphan(self, record: ConfirmedRecord) -> None:
        """A non-persistent confirmed commit dies with its session, so with its server: once
        that server has looked dead for ORPHAN_GRACE seconds (a live server whose database
        connection broke takes its lock again meanwhile: KEEP_LOCKS_EVERY)."""
        if record.persist is not None or self.datastores.owner_alive():
            self._owner_dead = None
            return
        key = (record.server, record.session_id)
        if self._orphan == key:
            return  # its rollback is under way
        now = time.monotonic()
        if self._owner_dead is None or self._owner_dead[0] != key:
            self._owner_dead = (key, now)
            log.info("server %s holds no lock on its pending confirmed commit", record.server)
            return
        if now - self._owner_dead[1] < ORPHAN_GRACE:
            return
        self._orphan = key
        log.warning("server %s died with a confirmed commit pending: rolling back", record.server)
        self.server.confirmed.roll_back_soon("cancel")

    def _holder(self, name: str) -> LockHolder | None:
        return self.datastores.lock_holder(name)

    # -- following the other servers ---------------------------------------------------

    async def catch_up(self) -> NewerRunning | None:
        """Adopt running if another server committed a newer one."""
        async with self.server.config_lock:
            return await self._catch_up_locked()

    async def refresh(self) -> None:
        await self._catch_up_locked()

    async def _catch_up_locked(self) -> NewerRunning | None:
        newer = await self._adopt_newer()
        self._sync_confirmed()
        self._sync_startup()
        return newer

    def _sync_startup(self) -> None:
        """Serve the startup another server saved (copy-config, delete-config)."""
        stored = self.datastores.stored_startup_generation()
        if stored == self.datastores.startup_generation:
            return
        document = self.datastores.read_startup()
        self.server.adopt_startup(document)
        log.info("startup: adopted the one saved by %s", stored.committed_by or "another server")

    async def _adopt_newer(self) -> NewerRunning | None:
        ours = self.datastores.generation
        # The generation alone first: most checks (every POLL seconds) find nothing new,
        # and a 1,000-site running is megabytes.
        if ours is None or self.datastores.stored_generation().number <= ours:
            return None
        document, stored = self.datastores.read_running()
        if document is None or stored.number <= ours:
            return None
        started = time.monotonic()
        if self.server.locks.get("running") is not None:
            self._adopted_while_locked = True  # the lock was lost: see _keep_running_lock
        journal = self.datastores.key_journal
        incoming = None
        if journal is not None:  # the material those commits made: read just that
            incoming = journal.incoming = self.datastores.key_rows_between(ours, stored.number)
        try:
            await self.server.adopt_running(document)
        finally:
            if journal is not None:
                journal.incoming = None
        self.datastores.generation = stored.number
        self.adopted_at = time.monotonic()
        log.info(
            "running: adopted generation %d committed by %s (%.0f ms; key material: %s)",
            stored.number,
            stored.committed_by,
            (self.adopted_at - started) * 1000,
            _described_rows(incoming),
        )
        return NewerRunning(stored.number, stored.committed_by)

    async def start(self) -> None:
        self._follower = asyncio.get_running_loop().create_task(self._follow())
        self._keeper = asyncio.get_running_loop().create_task(self._keep_locks())

    async def _follow(self) -> None:
        first = True
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(
                    self.url, autocommit=True, connect_timeout=CONNECT_TIMEOUT
                ) as conn:
                    await conn.execute(f"LISTEN {CHANNEL}")
                    await conn.execute(f"LISTEN {shared_keys.CHANNEL}")
                    await conn.execute(f"LISTEN {shared_contacts.CHANNEL}")
                    if not first:
                        await self._keys_changed(None)  # news may have come meanwhile
                    first = False
                    while True:
                        await self._catch_up_logged()
                        await self._other_news(conn)
                        await conn.execute("SELECT 1")  # a dead connection raises here
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning(
                    "following the other servers: the VPN database: %s; reconnecting",
                    redact_text(" ".join(str(exc).split()), self.url),
                )
                await asyncio.sleep(1.0)

    async def _other_news(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """Handle the news of keys and CEs until running's comes, or POLL seconds pass."""
        deadline = time.monotonic() + POLL
        while (left := deadline - time.monotonic()) > 0:
            # Several notifications may come in one packet: every one is handled.
            notes = [n async for n in conn.notifies(timeout=left, stop_after=1)]
            if not notes:
                return
            keys = [n.payload for n in notes if n.channel == shared_keys.CHANNEL]
            if keys:
                await self._key_news(keys)  # read again once for all of them
            for note in notes:
                if note.channel == shared_contacts.CHANNEL:
                    self._contact_news(note.payload)
            if any(note.channel == CHANNEL for note in notes):
                return

    async def _key_news(self, payloads: list[str]) -> None:
        changes: dict[str, Rows] | None = {}
        for payload in payloads:
            news = shared_keys.KeyNews.parse(payload)
            if news is None:
                log.warning("key material: a notification not understood was ignored")
            elif news.server != self.datastores.name:
                changes = shared_keys.merge_changes(changes, news.changes())
        if changes is None or changes:
            await self._keys_changed(changes)

    def _contact_news(self, payload: str) -> None:
        news = shared_contacts.ContactNews.parse(payload)
        if news is None:
            log.warning("CE contacts: a notification not understood was ignored")
        elif news.server != self.datastores.name and self.ce_heard is not None:
            self.ce_heard(news.server, news.site, news.source)

    async def _keys_changed(self, changes: Mapping[str, Rows] | None) -> None:
        """Under the configuration lock, as an adoption: a commit validated with the old
        material must not be applied after the new material was read.  If it cannot be
        read (the database), the follower connects again and reads every VPN."""
        if self.keys_changed is None:
            return
        async with self.server.config_lock:
            self.keys_changed(changes)

    async def _catch_up_logged(self) -> None:
        try:
            await self.catch_up()
        except (RpcError, psycopg.Error, RuntimeError):
            log.exception("running of another server could not be adopted; retrying")
            await asyncio.sleep(POLL)

    # -- locks -------------------------------------------------------------------------

    async def _lock_connection_up(self) -> bool:
        """Is the connection for running's lock up?  A broken one (the database failed
        over, a cut) is closed: its lock went with it.  The caller holds _lock_conn_use."""
        conn = self._lock_conn
        if conn is None or conn.closed:
            return False
        try:
            await conn.execute("SELECT 1")
            return True
        except psycopg.Error:
            await conn.close()
            return False

    async def lock(self, name: str, session_id: int) -> None:
        async with self._lock_conn_use:
            if not await self._lock_connection_up():
                self._lock_conn = await self._connect()
            conn = self._lock_conn
            assert conn is not None
            try:
                cur = await conn.execute("SELECT pg_try_advisory_lock(%s)", (RUNNING_LOCK,))
                row = await cur.fetchone()
            except psycopg.Error as exc:
                await conn.close()
                raise database_lost(exc, self.url) from None
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
            self._adopted_while_locked = False

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

    async def _keep_locks(self) -> None:
        """Every KEEP_LOCKS_EVERY seconds: are the connections that hold this server's
        locks still up?  A broken one's lock is taken again, or its holder told."""
        while True:
            await asyncio.sleep(KEEP_LOCKS_EVERY)
            try:
                await self._keep_running_lock()
                await self._keep_confirmed_lock()
            except asyncio.CancelledError:
                raise
            except (RpcError, psycopg.Error) as exc:
                detail = exc.message if isinstance(exc, RpcError) else str(exc)
                log.warning(
                    "keeping this server's locks: %s; trying again",
                    redact_text(" ".join(detail.split()), self.url),
                )

    async def _keep_running_lock(self) -> None:
        holder = self.server.locks.get("running")
        if holder is None:
            return
        async with self._lock_conn_use:
            if await self._lock_connection_up():
                return
            if self.server.locks.get("running") != holder:
                return  # unlocked meanwhile: the lock went with the connection
            # The database let the lock go with the connection: take it again, if it is
            # still what it was (nobody else committed or locked meanwhile).
            faults.point("lock-retake")
            conn = self._lock_conn = await self._connect()
            cur = await conn.execute("SELECT pg_try_advisory_lock(%s)", (RUNNING_LOCK,))
            row = await cur.fetchone()
            taken = bool(row is not None and row[0])
            stored = self.datastores.stored_generation()
            changed = self._adopted_while_locked or stored.number != self.datastores.generation
            if taken and not changed:
                log.warning(
                    "running's lock (session %d) was taken again on a new database "
                    "connection: nothing changed running meanwhile",
                    holder,
                )
                return
            if taken:
                await conn.execute("SELECT pg_advisory_unlock(%s)", (RUNNING_LOCK,))
        why = (
            f"server {stored.committed_by} changed running meanwhile"
            if changed
            else f"{_described(self._holder('running'))} took it meanwhile"
        )
        self._lock_lost(holder, why)

    def _lock_lost(self, holder: int, why: str) -> None:
        """Running's lock of session ``holder`` went with its database connection, and
        running may have changed since: the session is ended (as if killed) rather than
        left believing it still holds the lock."""
        log.error(
            "running's lock of session %d was lost when its database connection broke (%s): "
            "the session is ended",
            holder,
            why,
        )
        if self.server.locks.get("running") == holder:
            del self.server.locks["running"]
            self.server.lock_times.pop("running", None)
        mine = self._holder("running")
        if mine is not None and mine.server == self.datastores.name:
            self.datastores.storage.delete(TABLE, LOCK_KEY + "running")
        session = self.server.sessions.get(holder)
        if session is not None:
            session.close("other")

    async def _keep_confirmed_lock(self) -> None:
        pending = self.server.confirmed.pending
        if pending is None or pending.server is not None:
            return  # none pending, or another server's
        # On the loop, as every use of that connection: a worker thread taking the lock
        # again while the loop confirms the commit would keep a lock nothing releases.
        if not self.datastores.keep_confirmed_lock():
            log.error(
                "the pending confirmed commit's lock was lost with its database connection "
                "and another server holds it now"
            )

    # -- lifecycle ---------------------------------------------------------------------

    async def stop(self) -> None:
        await stop_tasks([t for t in (self._follower, self._keeper) if t is not None])
        self._follower = self._keeper = None
        for conn in (self._commit_conn, self._lock_conn):
            if conn is not None and not conn.closed:
                await conn.close()
        self.datastores.close()


def database_lost(exc: BaseException, url: str) -> RpcError:
    """The refusal of an operation whose database connection failed before it changed
    anything (the primary database died, say: it works again once the standby is
    promoted)."""
    detail = redact_text(" ".join(str(exc).split()), url)
    log.warning("the VPN database: %s", detail)
    return RpcError(
        "operation-failed",
        f"The VPN database could not be used ({detail}); nothing was changed: try again "
        "(if the primary database failed, once its standby is promoted).",
    )


def confirmed_elsewhere(record: ConfirmedRecord | None) -> RpcError:
    """The refusal of a change of running while another server's confirmed commit is
    pending (None: its record is not readable yet, only its lock is taken)."""
    who = (
        "Another server"
        if record is None
        else (f"Session {record.session_id} of server {record.server}")
    )
    return RpcError(
        "in-use",
        f"{who} has a confirmed commit pending; running cannot change until it is confirmed "
        "or rolled back.",
        type="protocol",
        info=[("session-id", str(record.session_id if record else 0))],
    )


def _described(holder: LockHolder | None) -> str:
    if holder is None:
        return "a session of another server"
    return f"session {holder.session_id} of server {holder.server}"


def _described_rows(incoming: dict[str, Rows] | None) -> str:
    if incoming is None:
        return "the VPNs compiled read whole"
    whole = sorted(vpn for vpn, rows in incoming.items() if rows is None)
    count = sum(len(rows) for rows in incoming.values() if rows is not None)
    text = f"{count} rows read"
    return text + (f", VPNs {', '.join(whole)} read whole" if whole else "")
