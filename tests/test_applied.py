"""What each CE confirmed last (nc_server.applied): kept cheaply, never wrongly believed in sync."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from nc_server.applied import APPLIED, AppliedLedger
from nc_server.storage import SqliteStorage

CONFIG = {"peer": [{"name": "s2"}], "configuration-version": "v2"}


def stored(path: Path, site: str) -> dict[str, object] | None:
    storage = SqliteStorage(path)
    try:
        raw = storage.get(APPLIED, site)
        return None if raw is None else json.loads(raw)
    finally:
        storage.close()


def test_a_confirmed_version_is_stored_without_the_configuration(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    storage = SqliteStorage(path)
    original = storage.transaction

    async def run() -> None:
        flushed = asyncio.Event()

        @contextmanager
        def noticed() -> Iterator[None]:
            with original():
                yield
            flushed.set()

        storage.transaction = noticed  # type: ignore[method-assign]
        ledger = AppliedLedger(storage, flush_delay=0)
        ledger.record("s1", "v2", CONFIG, 8301)
        assert ledger.get("s1").config is CONFIG  # the same object, kept in memory
        await asyncio.wait_for(flushed.wait(), 30)  # written by the scheduled flush

    asyncio.run(run())
    assert stored(path, "s1") == {"version": "v2", "port": 8301}


def test_confirmations_waiting_together_are_written_in_one_transaction(tmp_path: Path) -> None:
    storage = SqliteStorage(tmp_path / "db.sqlite")
    original = storage.transaction
    depth = outermost = 0

    @contextmanager
    def counting() -> Iterator[None]:
        nonlocal depth, outermost
        outermost += depth == 0
        depth += 1
        try:
            with original():
                yield
        finally:
            depth -= 1

    storage.transaction = counting  # type: ignore[method-assign]

    async def run() -> None:
        ledger = AppliedLedger(storage, flush_delay=3600)  # written only by the flush below
        for n in range(50):
            ledger.record(f"s{n}", "v2", CONFIG, 8300 + n)
        assert storage.scan(APPLIED) == []
        ledger.flush()

    asyncio.run(run())
    assert outermost == 1
    assert len(storage.scan(APPLIED)) == 50


def test_an_unknown_state_is_written_at_once(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"

    async def run() -> None:
        ledger = AppliedLedger(SqliteStorage(path))
        ledger.record("s1", "v2", CONFIG, 8301)
        ledger.flush()
        ledger.record("s1", None, None, 8301)  # a push failed: what the CE holds is unknown
        assert stored(path, "s1") == {"version": None, "port": 8301}
        assert ledger.get("s1").config is None

    asyncio.run(run())


def test_after_a_restart_the_version_is_known_and_the_configuration_is_not(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"

    async def run() -> None:
        ledger = AppliedLedger(SqliteStorage(path))
        ledger.record("s1", "v2", CONFIG, 8301)
        ledger.flush()

    asyncio.run(run())
    again = AppliedLedger(SqliteStorage(path)).get("s1")
    assert (again.version, again.port, again.config) == ("v2", 8301, None)


def test_a_record_of_an_older_release_gives_its_configuration(tmp_path: Path) -> None:
    storage = SqliteStorage(tmp_path / "db.sqlite")
    legacy = {"version": "v2", "config": CONFIG, "port": 8301}
    storage.put(APPLIED, "s1", json.dumps(legacy).encode())
    assert AppliedLedger(storage).get("s1").config == CONFIG


def test_a_forgotten_site_is_gone_from_memory_and_storage(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"

    async def run() -> None:
        ledger = AppliedLedger(SqliteStorage(path))
        ledger.record("s1", "v2", CONFIG, 8301)
        ledger.forget("s1")  # before the batch is written: it must not come back
        ledger.flush()
        assert ledger.get("s1").version is None

    asyncio.run(run())
    assert stored(path, "s1") is None
