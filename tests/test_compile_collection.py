"""After a large VPN is compiled whole, the server makes the one full garbage collection
the new configurations would have caused, at once (nc_server/compile_cache.py): not at a
moment of the collector's choosing, in the middle of a later push."""

from __future__ import annotations

import asyncio
import gc
from typing import Any

import pytest

from nc_server import compile_cache
from nc_server.compiler import VpnCompiler
from tests.test_compiler import FakeKeys, parse_vpn, site, vpn_doc
from tests.waiting import next_turn


def doc(count: int, vpn_id: str = "acme") -> dict[str, Any]:
    return {**vpn_doc([site(f"s{i}", i + 1) for i in range(count)]), "id": vpn_id}


@pytest.fixture
def collections(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Full collections made (gc.collect), with 'large' meaning 3 sites or more."""
    made: list[int] = []
    monkeypatch.setattr(compile_cache, "_PAUSE_COLLECTOR_FROM", 9)
    monkeypatch.setattr(compile_cache.gc, "collect", lambda *a: made.append(1) or 0)
    return made


def test_a_large_vpn_compiled_whole_is_followed_by_one_full_collection(collections) -> None:
    async def main() -> None:
        VpnCompiler(FakeKeys()).compile(parse_vpn(doc(3)))
        assert collections == []  # not during the commit's own turn
        await next_turn()
        assert collections == [1]

    asyncio.run(main())


def test_several_vpns_compiled_in_one_commit_make_one_collection(collections) -> None:
    async def main() -> None:
        keys = FakeKeys()
        for vpn_id in ("a", "b", "c"):
            VpnCompiler(keys).compile(parse_vpn(doc(3, vpn_id)))
        await next_turn()
        assert collections == [1]

    asyncio.run(main())


def test_a_site_added_to_a_compiled_vpn_makes_no_collection(collections) -> None:
    async def main() -> None:
        compiler = VpnCompiler(FakeKeys())
        compiler.compile(parse_vpn(doc(3)))
        await next_turn()
        collections.clear()
        compiler.compile(parse_vpn(doc(4)))  # incremental: a few new entries
        await next_turn()
        assert collections == []

    asyncio.run(main())


def test_a_small_vpn_makes_no_collection(collections) -> None:
    async def main() -> None:
        VpnCompiler(FakeKeys()).compile(parse_vpn(doc(2)))
        await next_turn()
        assert collections == []

    asyncio.run(main())


def test_without_a_running_loop_nothing_is_collected(collections) -> None:
    VpnCompiler(FakeKeys()).compile(parse_vpn(doc(3)))
    assert collections == [] and gc.isenabled()


def test_a_collection_due_on_a_loop_that_closed_does_not_stop_the_next(
    collections, monkeypatch: pytest.MonkeyPatch
) -> None:
    closed = asyncio.new_event_loop()
    closed.close()  # it had a collection due at a turn that never came
    monkeypatch.setattr(compile_cache, "_full_collection_on", closed)

    async def main() -> None:
        VpnCompiler(FakeKeys()).compile(parse_vpn(doc(3)))
        await next_turn()

    asyncio.run(main())
    assert collections == [1]
