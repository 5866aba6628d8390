"""PostgreSQL storage: its schema, its durability, its care for the password.

The contract every storage keeps (order, prefixes, transactions) is in
tests/test_storage.py; here is what only PostgreSQL has.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import psycopg
import pytest

from nc_server.storage import SqliteStorage, StorageError, open_storage
from nc_server.storage_postgresql import (
    SCHEMA_VERSION,
    DatabaseUnavailable,
    PostgresStorage,
    SchemaTooNew,
    redact,
)
from tests.postgres import PASSWORD, PostgresCluster
from tests.waiting import wait_until


def as_owner(url: str) -> psycopg.Connection:  # type: ignore[type-arg]
    return psycopg.connect(url, autocommit=True)


def test_the_schema_is_created_on_first_use_with_its_version(postgres_url: str) -> None:
    PostgresStorage(postgres_url).close()
    with as_owner(postgres_url) as conn:
        assert conn.execute("SELECT version FROM cevpn_schema").fetchall() == [(SCHEMA_VERSION,)]
        collation = conn.execute(
            "SELECT collation_name FROM information_schema.columns"
            " WHERE table_name = 'cevpn_kv' AND column_name = 'key'"
        ).fetchone()
    assert collation == ("C",)


def test_opening_a_database_with_the_current_schema_changes_nothing(postgres_url: str) -> None:
    PostgresStorage(postgres_url).close()
    with as_owner(postgres_url) as conn:
        before = conn.execute("SELECT xmin::text, version FROM cevpn_schema").fetchall()
    PostgresStorage(postgres_url).close()
    with as_owner(postgres_url) as conn:
        assert conn.execute("SELECT xmin::text, version FROM cevpn_schema").fetchall() == before


def test_two_storages_opened_together_on_an_empty_database_both_succeed(
    postgres_url: str,
) -> None:
    start = threading.Barrier(2)
    opened: list[PostgresStorage] = []
    errors: list[BaseException] = []

    def open_one() -> None:
        start.wait()
        try:
            opened.append(PostgresStorage(postgres_url))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=open_one) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    opened[0].put("t", "k", b"v")
    assert opened[1].get("t", "k") == b"v"
    for store in opened:
        store.close()
    with as_owner(postgres_url) as conn:
        assert conn.execute("SELECT version FROM cevpn_schema").fetchall() == [(SCHEMA_VERSION,)]


def test_a_database_with_a_newer_schema_is_refused_naming_both_versions(
    postgres_url: str,
) -> None:
    PostgresStorage(postgres_url).close()
    with as_owner(postgres_url) as conn:
        conn.execute("UPDATE cevpn_schema SET version = %s", (SCHEMA_VERSION + 1,))
    with pytest.raises(SchemaTooNew) as refused:
        PostgresStorage(postgres_url)
    message = str(refused.value)
    assert f"version {SCHEMA_VERSION + 1}" in message
    assert f"version {SCHEMA_VERSION} this cevpn-server knows" in message
    assert PASSWORD not in message


def test_a_database_not_in_utf8_is_refused(postgres: PostgresCluster) -> None:
    with postgres.superuser() as conn:
        conn.execute("CREATE DATABASE latin OWNER cevpn_test ENCODING 'LATIN1' TEMPLATE template0")
    with pytest.raises(StorageError, match="needs UTF8"):
        PostgresStorage(postgres.url("latin"))


def test_a_committed_put_survives_a_crash_of_the_database(
    postgres: PostgresCluster, postgres_url: str
) -> None:
    store = PostgresStorage(postgres_url)
    with store.transaction():
        store.put("t", "kept", b"committed")
    store.close()
    postgres.restart_after_crash()
    again = PostgresStorage(postgres_url)
    assert again.get("t", "kept") == b"committed"
    again.close()


def test_commits_are_durable_even_where_the_database_turns_synchronous_commit_off(
    postgres_url: str,
) -> None:
    dbname = postgres_url.rsplit("/", 1)[1]
    with as_owner(postgres_url) as conn:
        conn.execute(f"ALTER DATABASE {dbname} SET synchronous_commit = off")
    store = PostgresStorage(postgres_url)
    with store.transaction():
        # The transaction's own connection (no Storage call shows a setting).
        conn = store._local.connection
        assert conn is not None
        assert conn.execute("SHOW synchronous_commit").fetchone() == ("on",)
    store.close()


def test_a_storage_works_again_once_the_database_is_back_after_a_restart(
    postgres: PostgresCluster, postgres_url: str
) -> None:
    store = PostgresStorage(postgres_url)
    store.put("t", "before", b"1")
    postgres.restart_after_crash()
    # The pool checks a connection before lending it: the dead ones are replaced.
    store.put("t", "after", b"2")
    assert store.scan("t") == [("after", b"2"), ("before", b"1")]
    store.close()


def test_closing_returns_every_connection_to_the_database(
    postgres: PostgresCluster, postgres_url: str
) -> None:
    store = PostgresStorage(postgres_url)
    store.put("t", "k", b"v")
    dbname = postgres_url.rsplit("/", 1)[1]
    store.close()

    def connections() -> int:
        with postgres.superuser() as conn:
            row = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = %s", (dbname,)
            ).fetchone()
        return int(row[0]) if row else -1

    wait_until(lambda: connections() == 0, 10, 0.02)


@pytest.mark.parametrize(
    "wrong",
    ["port", "database", "password"],
)
def test_the_password_never_appears_in_an_error_or_a_log_line(
    postgres: PostgresCluster,
    postgres_url: str,
    wrong: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from tests.netconf_server import free_port

    dbname = postgres_url.rsplit("/", 1)[1]
    secret = "Wrong-pw-also-secret-9k" if wrong == "password" else PASSWORD
    url = {
        "port": postgres.url(dbname, port=free_port()),
        "database": postgres.url("no_such_database"),
        "password": postgres.url(dbname, password=secret),
    }[wrong]
    caplog.set_level(logging.DEBUG)
    with pytest.raises(DatabaseUnavailable) as refused:
        PostgresStorage(url)
    chain: list[BaseException] = []
    exc: BaseException | None = refused.value
    while exc is not None and exc not in chain:
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    for link in chain:
        assert secret not in str(link) and secret not in repr(link)
    assert "cevpn_test:***@127.0.0.1" in str(refused.value)
    assert secret not in caplog.text


@pytest.mark.parametrize("logger", ["psycopg", "psycopg.pool", "psycopg_pool.sched"])
def test_a_psycopg_log_line_holding_the_password_shows_it_redacted(
    postgres_url: str, logger: str, caplog: pytest.LogCaptureFixture
) -> None:
    store = PostgresStorage(postgres_url)
    caplog.set_level(logging.DEBUG)
    logging.getLogger(logger).warning("error connecting to %s", postgres_url)
    store.close()
    assert PASSWORD not in caplog.text
    assert "cevpn_test:***@127.0.0.1" in caplog.text


def test_redact_hides_every_form_of_the_password() -> None:
    assert (
        redact("postgresql://u:s3cr%2Ft@h1:5432,h2:5433/db")
        == "postgresql://u:***@h1:5432,h2:5433/db"
    )
    assert redact("postgres://u@h/db?password=s3cr%2Ft&sslmode=require") == (
        "postgres://u@h/db?password=***&sslmode=require"
    )
    assert redact("postgresql://h/db") == "postgresql://h/db"


def test_open_storage_is_sqlite_in_the_state_directory_by_default(tmp_path: Path) -> None:
    for database in (None, "", "sqlite:"):
        store = open_storage(database, tmp_path)
        assert isinstance(store, SqliteStorage) and store.path == tmp_path / "vpn-server.db"
        store.close()


def test_open_storage_takes_an_sqlite_path_relative_to_the_state_directory(
    tmp_path: Path,
) -> None:
    for database, path in (("sqlite:other.db", tmp_path / "other.db"), ("x.db", tmp_path / "x.db")):
        store = open_storage(database, tmp_path)
        assert isinstance(store, SqliteStorage) and store.path == path
        store.close()


def test_open_storage_opens_postgresql_for_a_postgresql_url(
    postgres_url: str, tmp_path: Path
) -> None:
    for url in (postgres_url, postgres_url.replace("postgresql://", "postgres://", 1)):
        store = open_storage(url, tmp_path)
        assert isinstance(store, PostgresStorage)
        store.close()
    assert not (tmp_path / "vpn-server.db").exists()


def test_open_storage_refuses_another_kind_of_database_without_its_password(
    tmp_path: Path,
) -> None:
    with pytest.raises(StorageError) as refused:
        open_storage("mysql://u:Top-secret-3@h/db", tmp_path)
    assert "mysql://" in str(refused.value) and "Top-secret-3" not in str(refused.value)
