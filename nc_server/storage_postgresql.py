"""The VPN server's storage in PostgreSQL: several servers, one replicated database.

SQLite (nc_server.storage) serves one server on one machine.  Past that, the
VPN database lives in PostgreSQL (with streaming replication to a synchronous
standby, run by the provider's DBAs): this is the same :class:`Storage` on one
table, so no caller changes.

Semantics kept from SQLite:

- A transaction is serialised against every other one, in this process (a
  lock) and in every other process sharing the database (a transaction-scoped
  advisory lock taken first, as SQLite's ``BEGIN IMMEDIATE`` takes the write
  lock): callers read, decide and write inside one transaction and must never
  lose an update to a concurrent one.
- Nested ``transaction()`` blocks join the outermost, which alone commits; a
  transaction belongs to the thread that opened it (its connection is that
  thread's until the end), while other threads read the last committed state
  on other connections of the pool.
- ``scan`` is in byte order of the UTF-8 keys (the key column is
  ``COLLATE "C"``), with a prefix as an index range, never ``LIKE``.
- Commits are durable: ``synchronous_commit`` is on (turned on if a default
  of the database or role turned it off).

The server creates and migrates its own schema, versioned in ``cevpn_schema``,
under an advisory lock so that servers starting together do not race; a
database whose schema is newer than this code is refused.

The connection string may carry a password: it never appears in an error or a
log line (:func:`redact`); a password file (``~/.pgpass``, ``PGPASSFILE``) keeps
it off the command line altogether.

A primary and its standby are given as one multi-host URL
(``postgresql://user@primary:5432,standby:5432/cevpn?target_session_attrs=read-write``):
every connection, the pool's included, goes to whichever of them accepts
writes.  When the primary dies, a statement on a broken connection fails with
:class:`DatabaseUnavailable` (the caller's rpc-error: nothing acknowledged);
the pool drops broken connections when it hands them out
(``check_connection``), and its reconnection attempts never back off for more
than :data:`RECONNECT` seconds, so once the standby is promoted the next use of
the storage reaches it (docs/server.md, "A standby database").  No use of the
storage waits more than :data:`POOL_WAIT` seconds for a connection.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Collection, Iterator, Mapping
from contextlib import contextmanager
from typing import Any
from urllib.parse import unquote

import psycopg
from psycopg_pool import ConnectionPool, PoolTimeout

from nc_server.storage import StorageError

log = logging.getLogger("cevpn.storage")

SCHEMA_VERSION = 3
"""The schema this code reads and writes; MIGRATIONS[n] brings version n to n + 1."""

MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        "CREATE TABLE cevpn_schema (version integer NOT NULL)",
        "INSERT INTO cevpn_schema (version) VALUES (0)",
        'CREATE TABLE cevpn_kv (tbl text NOT NULL, key text COLLATE "C" NOT NULL,'
        " value bytea NOT NULL, PRIMARY KEY (tbl, key))",
    ),
    (
        # nc_server.ownership: each server's lease (its expiry set by the database's clock)
        # and which server provisions each CE, with the epoch that fences a former owner.
        "CREATE TABLE cevpn_server_lease (server text PRIMARY KEY,"
        " expires timestamptz NOT NULL, since timestamptz NOT NULL DEFAULT now())",
        'CREATE TABLE cevpn_ce_owner (site text COLLATE "C" PRIMARY KEY,'
        " server text NOT NULL, epoch bigint NOT NULL,"
        " since timestamptz NOT NULL DEFAULT now())",
    ),
    (
        # nc_server.ownership: which server holds which call-home CE's connection (RFC
        # 8071), rewritten by each server at its lease renewals: such a CE is owned by
        # the server it called.
        'CREATE TABLE cevpn_ce_caller (site text COLLATE "C" NOT NULL,'
        " server text NOT NULL, since timestamptz NOT NULL DEFAULT now(),"
        " PRIMARY KEY (site, server))",
    ),
)
assert len(MIGRATIONS) == SCHEMA_VERSION

# pg_advisory_xact_lock keys: any two 64-bit numbers no other application of the
# database uses ("cevpn" in ASCII, then 1 and 2).
SCHEMA_LOCK = 0x636576706E_0001
WRITE_LOCK = 0x636576706E_0002
OWNERSHIP_LOCK = 0x636576706E_0006
"""Serialises the servers' changes of CE ownership (nc_server.ownership; 3 to 5 are
nc_server.shared_running's)."""

URL_SCHEMES = ("postgresql://", "postgres://")
CONNECT_TIMEOUT = 10
POOL_SIZE = 8
WRITE_CHUNK = 5000
"""Keys per DELETE statement of :meth:`PostgresStorage.write_many`."""
COPY_MIN = 1000
"""Rows from which :meth:`PostgresStorage.write_many` copies them in (binary COPY into a
temporary table, then one INSERT): 6.6 us a row here, against 18 us through arrays and
156 us through one INSERT per row (40,000 key material rows).  Fewer rows go in one
INSERT of arrays, without the temporary table's catalog work."""
POOL_WAIT = 10.0
"""Seconds a use of the storage waits for a connection before it fails (database down)."""
RECONNECT = 5.0
"""Seconds the pool goes on retrying one reconnection before it starts a new one: its
back-off between attempts (1, 2, 4 s...) never grows past this, so a standby promoted
after a long outage is reached within seconds."""


class SchemaTooNew(StorageError):
    """The database was migrated by a newer cevpn: this code must not write to it."""


class DatabaseUnavailable(StorageError):
    """The database cannot be reached, or refuses the connection."""


def is_postgresql_url(database: str) -> bool:
    return database.startswith(URL_SCHEMES)


def _secrets(url: str) -> set[str]:
    """The password of ``url`` as it may appear in any message: raw, decoded."""
    found: set[str] = set()
    after_scheme = url.split("://", 1)[-1]
    userinfo, at, _ = after_scheme.partition("@")
    if at and "/" not in userinfo:
        _, colon, password = userinfo.partition(":")
        if colon:
            found.add(password)
    _, _, query = url.partition("?")
    for pair in query.split("&"):
        name, eq, value = pair.partition("=")
        if eq and unquote(name) == "password":
            found.add(value)
    with_decoded = found | {unquote(secret) for secret in found}
    return {secret for secret in with_decoded if secret}


def redact(url: str) -> str:
    """``url`` with its password replaced by ``***``: what messages and logs may show."""
    return redact_text(url, url)


def redact_text(text: str, url: str) -> str:
    """``text`` (an error message, say) without any form of ``url``'s password."""
    for secret in sorted(_secrets(url), key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


def redact_error(exc: BaseException, url: str) -> str:
    """The error in one line (its type's name if it says nothing), never with ``url``'s
    password: what a log line about a failed statement or connection shows."""
    return redact_text(" ".join(str(exc).split()) or type(exc).__name__, url)


class _RedactingFilter(logging.Filter):
    """Takes the passwords of the open storages out of psycopg's own log records."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if self.urls:
            message = record.getMessage()
            clean = message
            for url in self.urls:
                clean = redact_text(clean, url)
            if clean != message:
                record.msg, record.args = clean, None
        return True


_REDACTING = _RedactingFilter()


def _redact_psycopg_logs(url: str) -> None:
    """Filter ``url``'s password out of every psycopg logger.

    A logger's filter sees only the records logged on that very logger, not its
    children's, and psycopg's modules log on loggers of their own names: each
    one present (they are made when psycopg and psycopg_pool are imported,
    before any storage is opened) gets the filter.
    """
    _REDACTING.urls.add(url)
    for name, logger in list(logging.root.manager.loggerDict.items()):
        if isinstance(logger, logging.Logger) and name.split(".")[0] in ("psycopg", "psycopg_pool"):
            logger.addFilter(_REDACTING)


def _connection_error(url: str, exc: BaseException) -> DatabaseUnavailable:
    detail = redact_text(" ".join(str(exc).split()), url)
    return DatabaseUnavailable(f"cannot use the database {redact(url)}: {detail}")


UNAVAILABLE = (psycopg.OperationalError, psycopg.InterfaceError, PoolTimeout)
"""What a lost or unreachable database raises (a statement's own errors are not these)."""


class _ThreadState(threading.local):
    connection: psycopg.Connection[Any] | None = None
    depth = 0


class PostgresStorage:
    """:class:`~nc_server.storage.Storage` in one PostgreSQL table; thread-safe."""

    def __init__(self, url: str, *, pool_size: int = POOL_SIZE) -> None:
        if not is_postgresql_url(url):
            raise StorageError(f"not a postgresql:// URL: {redact(url)}")
        self.url = url
        self.display_url = redact(url)
        _redact_psycopg_logs(url)
        self._local = _ThreadState()
        self._transactions = threading.Lock()
        try:
            with psycopg.connect(url, autocommit=True, connect_timeout=CONNECT_TIMEOUT) as conn:
                migrate(conn, self.display_url)
            self._pool: ConnectionPool[psycopg.Connection[Any]] = ConnectionPool(
                url,
                min_size=1,
                max_size=pool_size,
                kwargs={"autocommit": True, "connect_timeout": CONNECT_TIMEOUT},
                configure=_durable,
                check=ConnectionPool.check_connection,
                name="cevpn-storage",
                timeout=POOL_WAIT,
                reconnect_timeout=RECONNECT,
                open=False,
            )
            try:
                self._pool.open(wait=True, timeout=CONNECT_TIMEOUT)
            except BaseException:
                self._pool.close()
                raise
        except StorageError:
            raise
        except Exception as exc:
            raise _connection_error(url, exc) from None
        log.info("storage: PostgreSQL at %s (schema version %d)", self.display_url, SCHEMA_VERSION)

    @contextmanager
    def _reading(self) -> Iterator[psycopg.Connection[Any]]:
        """This thread's transaction's connection, or any of the pool for one statement."""
        if self._local.connection is not None:
            yield self._local.connection
            return
        try:
            with self._pool.connection() as conn:
                yield conn
        except UNAVAILABLE as exc:
            raise _connection_error(self.url, exc) from None

    def get(self, table: str, key: str) -> bytes | None:
        with self._reading() as conn:
            row = conn.execute(
                "SELECT value FROM cevpn_kv WHERE tbl = %s AND key = %s", (table, key)
            ).fetchone()
        return None if row is None else bytes(row[0])

    def get_many(self, table: str, keys: Collection[str]) -> dict[str, bytes]:
        with self._reading() as conn:
            rows = conn.execute(
                "SELECT key, value FROM cevpn_kv WHERE tbl = %s AND key = ANY(%s)",
                (table, list(keys)),
            ).fetchall()
        return {str(k): bytes(v) for k, v in rows}

    def put(self, table: str, key: str, value: bytes) -> None:
        with self.transaction():
            assert self._local.connection is not None
            self._local.connection.execute(
                "INSERT INTO cevpn_kv (tbl, key, value) VALUES (%s, %s, %s)"
                " ON CONFLICT (tbl, key) DO UPDATE SET value = EXCLUDED.value",
                (table, key, value),
            )

    def delete(self, table: str, key: str) -> None:
        with self.transaction():
            assert self._local.connection is not None
            self._local.connection.execute(
                "DELETE FROM cevpn_kv WHERE tbl = %s AND key = %s", (table, key)
            )

    def write_many(self, rows: Mapping[tuple[str, str], bytes | None]) -> None:
        puts = [(table, key, value) for (table, key), value in rows.items() if value is not None]
        gone: dict[str, list[str]] = {}
        for (table, key), value in rows.items():
            if value is None:
                gone.setdefault(table, []).append(key)
        with self.transaction():
            conn = self._local.connection
            assert conn is not None
            if len(puts) >= COPY_MIN:
                _copy_in(conn, puts)
            elif puts:
                conn.execute(
                    "INSERT INTO cevpn_kv (tbl, key, value)"
                    " SELECT * FROM unnest(%s::text[], %s::text[], %s::bytea[])"
                    " ON CONFLICT (tbl, key) DO UPDATE SET value = EXCLUDED.value",
                    (
                        [table for table, _, _ in puts],
                        [key for _, key, _ in puts],
                        [value for _, _, value in puts],
                    ),
                )
            for table, keys in gone.items():
                for start in range(0, len(keys), WRITE_CHUNK):
                    conn.execute(
                        "DELETE FROM cevpn_kv WHERE tbl = %s AND key = ANY(%s)",
                        (table, keys[start : start + WRITE_CHUNK]),
                    )

    def scan(self, table: str, prefix: str = "") -> list[tuple[str, bytes]]:
        with self._reading() as conn:
            if prefix:
                # key >= prefix AND key < prefix + U+10FFFF: an index range (the column is
                # COLLATE "C": UTF-8 byte order), and % or _ in a prefix mean themselves.
                rows = conn.execute(
                    "SELECT key, value FROM cevpn_kv WHERE tbl = %s AND key >= %s AND key < %s"
                    " ORDER BY key",
                    (table, prefix, prefix + "\U0010ffff"),
                ).fetchall()
            else:
                rows = conn.execute(
                    "SELECT key, value FROM cevpn_kv WHERE tbl = %s ORDER BY key", (table,)
                ).fetchall()
        return [(str(k), bytes(v)) for k, v in rows]

    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """Rows of one statement on a table of its own (nc_server.ownership's), inside this
        thread's transaction if one is open: a conditional write reads there."""
        with self._reading() as conn:
            cur = conn.execute(sql, params)
            return list(cur.fetchall()) if cur.description is not None else []

    def notify(self, channel: str, payload: str) -> None:
        """NOTIFY ``channel`` when this thread's transaction commits (never if it rolls
        back): what other servers LISTEN on to follow a commit (nc_server.shared_running)."""
        with self.transaction():
            assert self._local.connection is not None
            self._local.connection.execute("SELECT pg_notify(%s, %s)", (channel, payload))

    @contextmanager
    def transaction(self) -> Iterator[None]:
        state = self._local
        if state.depth:
            state.depth += 1
            try:
                yield
            finally:
                state.depth -= 1
            return
        try:
            with self._transactions, self._pool.connection() as conn, conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (WRITE_LOCK,))
                state.connection, state.depth = conn, 1
                try:
                    yield
                finally:
                    state.connection, state.depth = None, 0
        except UNAVAILABLE as exc:
            # Lost before COMMIT: nothing was written.  Lost during COMMIT: the outcome is
            # unknown (the caller must not acknowledge it, and reads what is stored later).
            raise _connection_error(self.url, exc) from None

    def close(self) -> None:
        self._pool.close()
        _REDACTING.urls.discard(self.url)


def _copy_in(conn: psycopg.Connection[Any], rows: list[tuple[str, str, bytes]]) -> None:
    """Upsert many rows in the open transaction: binary COPY into a temporary table, one
    INSERT ... ON CONFLICT from it, and the table dropped (by the transaction's end if
    anything fails: a rolled-back CREATE leaves nothing)."""
    conn.execute(
        'CREATE TEMPORARY TABLE cevpn_kv_in (tbl text, key text COLLATE "C", value bytea)'
        " ON COMMIT DROP"
    )
    with conn.cursor() as cur:
        with cur.copy("COPY cevpn_kv_in (tbl, key, value) FROM STDIN (FORMAT BINARY)") as copy:
            copy.set_types(["text", "text", "bytea"])
            for row in rows:
                copy.write_row(row)
        cur.execute(
            "INSERT INTO cevpn_kv (tbl, key, value) SELECT tbl, key, value FROM cevpn_kv_in"
            " ON CONFLICT (tbl, key) DO UPDATE SET value = EXCLUDED.value"
        )
        cur.execute("DROP TABLE cevpn_kv_in")


def _durable(conn: psycopg.Connection[Any]) -> None:
    """Every connection commits durably, whatever the database's or role's default.

    ``synchronous_commit = off`` would acknowledge a commit a crash of the database
    then loses; ``local``, ``remote_write`` and ``remote_apply`` are left as the DBA
    chose them (durable locally, with or without a standby).
    """
    row = conn.execute("SHOW synchronous_commit").fetchone()
    if row is not None and row[0] == "off":
        conn.execute("SET synchronous_commit = on")


def migrate(conn: psycopg.Connection[Any], display_url: str) -> int:
    """Bring the database's schema to :data:`SCHEMA_VERSION`; its version before.

    One transaction under an advisory lock: a second server starting at the same
    moment waits, then finds the schema made and does nothing.
    """
    encoding = conn.execute("SHOW server_encoding").fetchone()
    if encoding is None or encoding[0] != "UTF8":
        raise StorageError(
            f"the database {display_url} is in encoding {encoding and encoding[0]}: "
            "cevpn needs UTF8 (CREATE DATABASE ... ENCODING 'UTF8')"
        )
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
        version = schema_version(conn)
        if version > SCHEMA_VERSION:
            raise SchemaTooNew(
                f"the database {display_url} has cevpn schema version {version}, newer than "
                f"version {SCHEMA_VERSION} this cevpn-server knows: upgrade cevpn-server "
                "(never point an older server at a migrated database)"
            )
        for step in range(version, SCHEMA_VERSION):
            for statement in MIGRATIONS[step]:
                conn.execute(statement)
            conn.execute("UPDATE cevpn_schema SET version = %s", (step + 1,))
        if version < SCHEMA_VERSION:
            log.info(
                "storage: schema of %s migrated from version %d to %d",
                display_url,
                version,
                SCHEMA_VERSION,
            )
    return version


def schema_version(conn: psycopg.Connection[Any]) -> int:
    """The version recorded in the database; 0 when it holds no cevpn schema yet."""
    found = conn.execute("SELECT to_regclass('cevpn_schema')").fetchone()
    if found is None or found[0] is None:
        return 0
    row = conn.execute("SELECT version FROM cevpn_schema").fetchone()
    if row is None:
        raise StorageError("the table cevpn_schema holds no version: repair the database")
    return int(row[0])
