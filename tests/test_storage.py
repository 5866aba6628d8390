"""The VPN server's storage: transactions, persistence, permissions."""

from __future__ import annotations

from pathlib import Path

import pytest

from nc_server.storage import SqliteDatastores, SqliteStorage


def test_a_failed_transaction_writes_nothing(tmp_path: Path) -> None:
    store = SqliteStorage(tmp_path / "db")
    store.put("t", "a", b"1")
    with pytest.raises(RuntimeError), store.transaction():
        store.put("t", "a", b"2")
        store.put("t", "b", b"3")
        raise RuntimeError("abort")
    assert store.get("t", "a") == b"1" and store.get("t", "b") is None


def test_committed_values_survive_a_new_connection(tmp_path: Path) -> None:
    store = SqliteStorage(tmp_path / "db")
    with store.transaction():
        store.put("t", "x/1", b"one")
        store.put("t", "x/2", b"two")
        store.put("t", "y/1", b"other")
    store.close()
    again = SqliteStorage(tmp_path / "db")
    assert again.scan("t", "x/") == [("x/1", b"one"), ("x/2", b"two")]


def test_the_database_file_is_readable_by_its_owner_only(tmp_path: Path) -> None:
    store = SqliteStorage(tmp_path / "db")
    store.put("t", "k", b"secret")
    for path in tmp_path.iterdir():
        assert path.stat().st_mode & 0o077 == 0, path


def test_a_staged_datastore_is_invisible_until_published(tmp_path: Path) -> None:
    docs = SqliteDatastores(SqliteStorage(tmp_path / "db"))
    docs.write("running", b"old")
    docs.stage("running", b"new")
    assert docs.read("running") == b"old"
    docs.publish("running")
    assert docs.read("running") == b"new"
    docs.stage("running", b"newer")
    docs.discard("running")
    assert docs.read("running") == b"new"
