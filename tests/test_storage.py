"""The VPN server's storage: one contract, kept by SQLite and by PostgreSQL alike."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from nc_server.storage import SqliteDatastores, SqliteStorage, Storage

BACK_ENDS = ("sqlite", "postgresql")


@pytest.fixture(params=BACK_ENDS)
def open_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[[], Storage]]:
    """Opens a storage on the same database each time it is called (a new connection)."""
    opened: list[Storage] = []
    if request.param == "sqlite":

        def make() -> Storage:
            return SqliteStorage(tmp_path / "db")
    else:
        from nc_server.storage_postgresql import PostgresStorage

        url = request.getfixturevalue("postgres_url")

        def make() -> Storage:
            return PostgresStorage(url)

    def tracked() -> Storage:
        store = make()
        opened.append(store)
        return store

    yield tracked
    for store in opened:
        store.close()


@pytest.fixture
def store(open_store: Callable[[], Storage]) -> Storage:
    return open_store()


def test_a_value_put_is_read_back_and_replaced_by_the_next_put(store: Storage) -> None:
    assert store.get("t", "k") is None
    store.put("t", "k", b"\x00one\xff")
    assert store.get("t", "k") == b"\x00one\xff"
    store.put("t", "k", b"two")
    assert store.get("t", "k") == b"two"


def test_a_deleted_key_reads_as_absent_and_deleting_it_again_is_harmless(store: Storage) -> None:
    store.put("t", "k", b"v")
    store.delete("t", "k")
    store.delete("t", "k")
    assert store.get("t", "k") is None and store.scan("t") == []


def test_tables_are_separate(store: Storage) -> None:
    store.put("a", "k", b"in a")
    store.put("b", "k", b"in b")
    assert store.get("a", "k") == b"in a"
    assert store.scan("b") == [("k", b"in b")]


def test_scan_is_in_the_byte_order_of_the_utf8_keys(store: Storage) -> None:
    keys = ["b", "a/10", "Z", "é", "a/2", "日本", "\U0001f600", "a", "a b", "ä"]
    for key in keys:
        store.put("t", key, key.encode())
    # Code point order is UTF-8 byte order (SQLite's BINARY, PostgreSQL's COLLATE "C").
    expected = sorted(keys, key=lambda k: k.encode())
    assert [k for k, _ in store.scan("t")] == expected
    assert store.scan("t")[-1] == ("\U0001f600", "\U0001f600".encode())


def test_scan_with_a_prefix_returns_exactly_the_keys_starting_with_it(store: Storage) -> None:
    for key in ("site/a", "site/b", "site", "sitf/a", "sit", "site/é/1", "site/\U0001f600"):
        store.put("t", key, b"")
    assert [k for k, _ in store.scan("t", "site/")] == [
        "site/a",
        "site/b",
        "site/é/1",
        "site/\U0001f600",
    ]
    assert [k for k, _ in store.scan("t", "é")] == []


def test_percent_and_underscore_in_a_prefix_mean_themselves(store: Storage) -> None:
    for key in ("a%b/1", "a%b/2", "axb/1", "a_b/1", "aXb/1", "a%c", "a\\b/1"):
        store.put("t", key, b"")
    assert [k for k, _ in store.scan("t", "a%b/")] == ["a%b/1", "a%b/2"]
    assert [k for k, _ in store.scan("t", "a_b/")] == ["a_b/1"]
    assert [k for k, _ in store.scan("t", "a\\")] == ["a\\b/1"]


def test_write_many_puts_replaces_and_deletes_rows_of_several_tables(store: Storage) -> None:
    store.put("t", "old", b"1")
    store.put("t", "gone", b"2")
    store.put("u", "gone", b"3")
    store.write_many(
        {("t", "old"): b"\x00new\xff", ("t", "n\u00e9"): b"4", ("t", "gone"): None,
         ("u", "gone"): None, ("u", "absent"): None, ("u", "x"): b"5"}
    )  # fmt: skip
    assert store.scan("t") == [("n\u00e9", b"4"), ("old", b"\x00new\xff")]
    assert store.scan("u") == [("x", b"5")]


def test_write_many_of_more_rows_than_one_statement_takes_writes_them_all(store: Storage) -> None:
    rows: dict[tuple[str, str], bytes | None] = {
        ("t", f"k{n:05d}"): str(n).encode() for n in range(12_001)
    }
    store.write_many(rows)
    assert len(store.scan("t")) == 12_001 and store.get("t", "k12000") == b"12000"
    store.write_many({("t", f"k{n:05d}"): None for n in range(0, 12_001, 2)})
    assert [k for k, _ in store.scan("t")] == [f"k{n:05d}" for n in range(1, 12_001, 2)]


def test_two_large_write_manys_in_one_transaction_keep_the_last_value(store: Storage) -> None:
    with store.transaction():
        store.write_many({("t", f"k{n}"): b"first" for n in range(3000)})
        store.write_many({("t", f"k{n}"): b"second" for n in range(0, 3000, 3)})
    values = dict(store.scan("t"))
    assert len(values) == 3000 and values["k0"] == b"second" and values["k1"] == b"first"


def test_write_many_joins_the_open_transaction_and_rolls_back_with_it(
    open_store: Callable[[], Storage],
) -> None:
    store, other = open_store(), open_store()
    store.put("t", "a", b"1")
    with pytest.raises(RuntimeError), store.transaction():
        store.write_many({("t", "a"): None, ("t", "b"): b"2"})
        assert store.get("t", "a") is None and store.get("t", "b") == b"2"
        assert other.get("t", "b") is None  # not committed yet
        raise RuntimeError("abort")
    assert store.scan("t") == [("a", b"1")] and other.scan("t") == [("a", b"1")]


def test_a_failed_transaction_writes_nothing(store: Storage) -> None:
    store.put("t", "a", b"1")
    with pytest.raises(RuntimeError), store.transaction():
        store.put("t", "a", b"2")
        store.put("t", "b", b"3")
        raise RuntimeError("abort")
    assert store.get("t", "a") == b"1" and store.get("t", "b") is None


def test_a_transaction_reads_its_own_writes(store: Storage) -> None:
    with store.transaction():
        store.put("t", "a", b"1")
        assert store.get("t", "a") == b"1"
        assert store.scan("t") == [("a", b"1")]


def test_nested_transactions_commit_together_at_the_end_of_the_outermost(
    open_store: Callable[[], Storage],
) -> None:
    store, other = open_store(), open_store()
    with store.transaction():
        store.put("t", "outer", b"1")
        with store.transaction():
            store.put("t", "inner", b"2")
        # The inner block has ended: still nothing is committed.
        assert other.get("t", "inner") is None and other.get("t", "outer") is None
    assert other.scan("t") == [("inner", b"2"), ("outer", b"1")]


def test_an_exception_out_of_a_nested_transaction_rolls_back_everything(store: Storage) -> None:
    with pytest.raises(RuntimeError), store.transaction():
        store.put("t", "outer", b"1")
        with store.transaction():
            store.put("t", "inner", b"2")
            raise RuntimeError("abort")
    assert store.scan("t") == []
    store.put("t", "after", b"3")  # the storage is usable again
    assert store.scan("t") == [("after", b"3")]


def test_transactions_from_two_threads_do_not_interleave(store: Storage) -> None:
    """Read-modify-write in a transaction never loses the other thread's update."""
    store.put("t", "counter", b"0")
    rounds = 50
    errors: list[BaseException] = []

    def increment() -> None:
        try:
            for _ in range(rounds):
                with store.transaction():
                    value = int(store.get("t", "counter") or b"0")
                    store.put("t", "counter", str(value + 1).encode())
        except BaseException as exc:
            errors.append(exc)

    workers = [threading.Thread(target=increment) for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert errors == []
    assert store.get("t", "counter") == str(2 * rounds).encode()


def test_committed_values_survive_a_new_connection(open_store: Callable[[], Storage]) -> None:
    store = open_store()
    with store.transaction():
        store.put("t", "x/1", b"one")
        store.put("t", "x/2", b"two")
        store.put("t", "y/1", b"other")
    store.close()
    again = open_store()
    assert again.scan("t", "x/") == [("x/1", b"one"), ("x/2", b"two")]


def test_a_closed_storage_cannot_be_used(open_store: Callable[[], Storage]) -> None:
    store = open_store()
    store.put("t", "k", b"v")
    store.close()
    with pytest.raises(Exception):  # noqa: B017 - each engine has its own "closed" error
        store.get("t", "k")


def test_a_staged_datastore_is_invisible_until_published(store: Storage) -> None:
    docs = SqliteDatastores(store)
    docs.write("running", b"old")
    docs.stage("running", b"new")
    assert docs.read("running") == b"old"
    docs.publish("running")
    assert docs.read("running") == b"new"
    docs.stage("running", b"newer")
    docs.discard("running")
    assert docs.read("running") == b"new"


def test_a_deleted_datastore_reads_as_absent(store: Storage) -> None:
    docs = SqliteDatastores(store)
    docs.write("startup", b"<config/>")
    docs.delete("startup")
    assert docs.read("startup") is None and docs.peek("startup") is None


def test_the_sqlite_database_file_is_readable_by_its_owner_only(tmp_path: Path) -> None:
    store = SqliteStorage(tmp_path / "db")
    store.put("t", "k", b"secret")
    for path in tmp_path.iterdir():
        assert path.stat().st_mode & 0o077 == 0, path
