"""The VPN server's persistent state behind one small interface (SQLite by default).

Everything the server must not lose lives here: its NETCONF datastores (the
VPN database itself), the key material it generates, enrolment records and
the last configuration each CE confirmed.  The interface is deliberately a
handful of key-value operations on named tables, grouped in transactions, so
that the PostgreSQL implementation (nc_server.storage_postgresql: one table,
the same statements) replaces SQLite for a replicated deployment without
touching any caller; :func:`open_storage` picks one from ``--database``.

SQLite runs in WAL mode with synchronous=FULL: a committed transaction
survives a kill -9 or a power cut.  The database file is created 0600: it
holds keys.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Collection, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Protocol

DATABASE_FILE = "vpn-server.db"


class StorageError(RuntimeError):
    """The storage cannot be opened or used as configured; the message says why."""


def open_storage(database: str | None, state_dir: Path) -> Storage:
    """The storage ``--database`` names: PostgreSQL for a ``postgresql://`` (or
    ``postgres://``) libpq URI, several hosts allowed; SQLite otherwise.

    None, "" and ``sqlite:`` are the SQLite file in the state directory (the
    default); ``sqlite:PATH`` or a bare PATH is that file, relative to the state
    directory.  What is per server (the SSH host key, local files) stays in the
    state directory either way.
    """
    if database and database.startswith(("postgresql://", "postgres://")):
        # Imported here: psycopg is not loaded by a server that does not use it.
        from nc_server.storage_postgresql import PostgresStorage

        return PostgresStorage(database)
    if not database:
        return SqliteStorage.in_state_dir(state_dir)
    if "://" in database and not database.startswith("sqlite:"):
        scheme = database.split("://", 1)[0]
        raise StorageError(
            f"unsupported database {scheme}://...: give postgresql://..., sqlite:PATH or a path"
        )
    path = database.removeprefix("sqlite:")
    return SqliteStorage(state_dir / path) if path else SqliteStorage.in_state_dir(state_dir)


class Storage(Protocol):
    """Named tables of key -> bytes; writes inside :meth:`transaction` commit together."""

    def get(self, table: str, key: str) -> bytes | None: ...

    def get_many(self, table: str, keys: Collection[str]) -> dict[str, bytes]:
        """The values of those of ``keys`` that ``table`` holds (one query, not one each)."""
        ...

    def put(self, table: str, key: str, value: bytes) -> None: ...

    def delete(self, table: str, key: str) -> None: ...

    def write_many(self, rows: Mapping[tuple[str, str], bytes | None]) -> None:
        """Put each (table, key) -> value and delete each (table, key) -> None, in one
        transaction (the caller's, if one is open), with a statement per batch of rows
        rather than one per row: a full mesh's key material is a million rows, and on
        PostgreSQL a statement is a round trip to the database."""
        ...

    def scan(self, table: str, prefix: str = "") -> list[tuple[str, bytes]]:
        """All (key, value) of ``table`` whose key starts with ``prefix``, in key order."""
        ...

    def transaction(self) -> AbstractContextManager[None]:
        """Everything written inside commits at its end, or nothing."""
        ...

    def close(self) -> None: ...


_SQLITE_VARIABLES = 900
"""Keys per statement of get_many (SQLite allows 999 variables before 3.32, 32,766 since)."""


class SqliteStorage:
    """:class:`Storage` in one SQLite file; safe to use from several threads."""

    def __init__(self, path: Path) -> None:
        self.path = path
        if not path.exists():
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
        os.chmod(path, 0o600)
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS kv ("
            " tbl TEXT NOT NULL, key TEXT NOT NULL, value BLOB NOT NULL,"
            " PRIMARY KEY (tbl, key)) WITHOUT ROWID"
        )
        self._lock = threading.RLock()
        self._depth = 0
        for suffix in ("-wal", "-shm"):
            side = path.with_name(path.name + suffix)
            if side.exists():
                os.chmod(side, 0o600)

    @classmethod
    def in_state_dir(cls, state_dir: Path) -> SqliteStorage:
        return cls(state_dir / DATABASE_FILE)

    def get(self, table: str, key: str) -> bytes | None:
        with self._lock:
            row = self._db.execute(
                "SELECT value FROM kv WHERE tbl = ? AND key = ?", (table, key)
            ).fetchone()
        return None if row is None else bytes(row[0])

    def get_many(self, table: str, keys: Collection[str]) -> dict[str, bytes]:
        wanted = list(dict.fromkeys(keys))
        found: dict[str, bytes] = {}
        with self._lock:
            for start in range(0, len(wanted), _SQLITE_VARIABLES):
                chunk = wanted[start : start + _SQLITE_VARIABLES]
                marks = ",".join("?" * len(chunk))  # only "?" marks are put in the text
                for key, value in self._db.execute(
                    f"SELECT key, value FROM kv WHERE tbl = ? AND key IN ({marks})",  # noqa: S608
                    (table, *chunk),
                ):
                    found[str(key)] = bytes(value)
        return found

    def put(self, table: str, key: str, value: bytes) -> None:
        with self.transaction():
            self._db.execute(
                "INSERT OR REPLACE INTO kv (tbl, key, value) VALUES (?, ?, ?)",
                (table, key, value),
            )

    def delete(self, table: str, key: str) -> None:
        with self.transaction():
            self._db.execute("DELETE FROM kv WHERE tbl = ? AND key = ?", (table, key))

    def write_many(self, rows: Mapping[tuple[str, str], bytes | None]) -> None:
        puts = [(table, key, value) for (table, key), value in rows.items() if value is not None]
        gone = [(table, key) for (table, key), value in rows.items() if value is None]
        with self.transaction():
            if puts:
                self._db.executemany(
                    "INSERT OR REPLACE INTO kv (tbl, key, value) VALUES (?, ?, ?)", puts
                )
            if gone:
                self._db.executemany("DELETE FROM kv WHERE tbl = ? AND key = ?", gone)

    def scan(self, table: str, prefix: str = "") -> list[tuple[str, bytes]]:
        with self._lock:
            if prefix:
                # key >= prefix AND key < prefix + U+10FFFF: an index range, no LIKE escaping.
                rows = self._db.execute(
                    "SELECT key, value FROM kv WHERE tbl = ? AND key >= ? AND key < ? ORDER BY key",
                    (table, prefix, prefix + "\U0010ffff"),
                ).fetchall()
            else:
                rows = self._db.execute(
                    "SELECT key, value FROM kv WHERE tbl = ? ORDER BY key", (table,)
                ).fetchall()
        return [(str(k), bytes(v)) for k, v in rows]

    @contextmanager
    def transaction(self) -> Iterator[None]:
        with self._lock:
            outermost = self._depth == 0
            if outermost:
                self._db.execute("BEGIN IMMEDIATE")
            self._depth += 1
            try:
                yield
            except BaseException:
                self._depth -= 1
                if outermost:
                    self._db.execute("ROLLBACK")
                raise
            self._depth -= 1
            if outermost:
                self._db.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._db.close()


class SqliteDatastores:
    """nc_core's datastore persistence on :class:`Storage`: the VPN database lives in it too.

    A staged document is held in memory until publish writes it in one
    transaction: if the process dies in between, the database still holds
    the previous document, which is what a discarded stage means.
    """

    TABLE = "datastore"

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self._staged: dict[str, bytes] = {}

    def read(self, name: str) -> bytes | None:
        return self.storage.get(self.TABLE, name)

    def peek(self, name: str) -> bytes | None:
        return self.read(name)  # a read changes nothing in the storage (SQLite or PostgreSQL)

    def write(self, name: str, data: bytes) -> None:
        self.storage.put(self.TABLE, name, data)

    def delete(self, name: str) -> None:
        self.storage.delete(self.TABLE, name)

    def stage(
        self, name: str, data: bytes, *, base: bytes | None = None, shared: tuple[int, int] = (0, 0)
    ) -> None:
        self._staged[name] = data  # stored whole: the hint (base, shared) is for journals

    def publish(self, name: str) -> None:
        self.storage.put(self.TABLE, name, self._staged.pop(name))

    def discard(self, name: str) -> None:
        self._staged.pop(name, None)

    def exclusive(self) -> AbstractContextManager[None]:
        return nullcontext()  # SQLite is one server's: the state directory's lock
