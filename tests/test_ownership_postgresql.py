"""CE ownership (nc_server.ownership) on a real PostgreSQL, two owners in one process.

Short lease times make a takeover a matter of seconds; one owner "freezes"
(its event loop stops turning, or the whole process stops) and the other takes
its CEs over with epoch + 1, while the frozen one's own clock has already
stopped its pushes and its records at the old epoch are refused.  An owner
whose loop is only busy keeps its lease (nc_server.lease_keepalive), and a
lease renewed while another server judges it dead is never both renewed and
taken over.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import psycopg
import pytest

from nc_server.leases import Fenced, LeaseTimes
from nc_server.ownership import SharedOwnership
from nc_server.storage_postgresql import PostgresStorage
from tests.waiting import wait_for, wait_for_async

pytestmark = pytest.mark.timeout(120)

TIMES = LeaseTimes(ttl=1.5, renew=0.3, margin=0.3, grace=0.3, stall=0.3)
STEADY = LeaseTimes(ttl=5.0, renew=0.3, margin=0.5, grace=0.5)
"""For a test in which no server may seem dead until one is made to: renewals late by
more than a second under a loaded CI (two test workers and PostgreSQL on 2 cores) must
not let another server take its CEs."""
SITES = {f"site-{n}" for n in range(40)}


def freeze_loop(own: SharedOwnership) -> None:
    """The owner's event loop stops turning for it: no heartbeat, no ownership round
    (nothing is given up; its keep-alive thread runs on, as in a hung loop)."""
    assert own._task is not None and own._heartbeat is not None
    own._task.cancel()
    own._heartbeat.cancel()


async def kill(own: SharedOwnership) -> None:
    """The owner's process dies: its loop and its keep-alive stop, nothing is given up."""
    freeze_loop(own)
    await asyncio.to_thread(own.keepalive.stop)


async def forget(own: SharedOwnership) -> None:
    """Close what a frozen or killed owner left open in this test process."""
    own.lease.lapse()
    await asyncio.to_thread(own.keepalive.stop)
    if own._conn is not None:
        await own._conn.close()


async def rounds(first: SharedOwnership, second: SharedOwnership, times: int = 3) -> None:
    """Ownership rounds in turn, ``times`` each (three: both live, every CE owned, no
    handover left)."""
    for _ in range(times):
        await first.renew()
        await second.renew()


def lock_waiters(storage: PostgresStorage) -> int:
    """Sessions of the test's database waiting on a lock now."""
    rows = storage.query(
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE wait_event_type = 'Lock' AND datname = current_database()"
    )
    return int(rows[0][0])


@pytest.fixture
def storage(postgres_url: str) -> Iterator[PostgresStorage]:
    store = PostgresStorage(postgres_url)
    try:
        yield store
    finally:
        store.close()


def owner(
    storage: PostgresStorage,
    name: str,
    events: list[tuple[set[str], set[str]]],
    holding: set[str] | None = None,
    busy: set[str] | None = None,
    times: LeaseTimes = TIMES,
) -> SharedOwnership:
    """An owner of SITES; with ``holding``, every site calls home and this is the set of
    sites whose call this owner holds (the test changes it as CEs would call)."""
    return SharedOwnership(
        storage,
        name,
        known_sites=lambda: SITES,
        busy=(lambda: set(busy)) if busy is not None else set,
        changed=lambda gained, lost: events.append((gained, lost)),
        call_home=(lambda: SITES) if holding is not None else frozenset,
        holding=(lambda: set(holding)) if holding is not None else frozenset,
        times=times,
    )


def test_a_frozen_owner_is_fenced_before_its_ces_are_taken_over_with_a_new_epoch(
    storage: PostgresStorage,
) -> None:
    async def scenario() -> None:
        events_a: list[tuple[set[str], set[str]]] = []
        events_b: list[tuple[set[str], set[str]]] = []
        a, b = owner(storage, "a", events_a), owner(storage, "b", events_b)
        await a.start()
        await b.start()
        try:
            await wait_for_async(
                lambda: bool(a.owned) and bool(b.owned) and set(a.owned) | set(b.owned) == SITES,
                10,
                "every CE owned, by both",
            )
            assert not set(a.owned) & set(b.owned)
            assert set(a.owners) == SITES
            of_a = dict(a.owned)
            assert a.epoch(next(iter(of_a))) is not None
            # a's loop hangs: its keep-alive, hearing no heartbeat, stops renewing.
            freeze_loop(a)
            frozen = time.monotonic()
            await wait_for_async(lambda: set(b.owned) == SITES, 10, "b owns every CE")
            took = time.monotonic() - frozen
            print(f"takeover {took:.2f} s after the loop last turned")
            assert took <= TIMES.stall + TIMES.ttl + TIMES.grace + 2 * TIMES.renew + 0.5
            # a's own clock stopped its pushes before the takeover.
            assert not a.lease.valid()
            for site, epoch in of_a.items():
                assert b.owned[site] == epoch + 1
                assert a.epoch(site) is None
                with pytest.raises(Fenced):
                    a.check(site, epoch)
            # What a would record now is refused; b's records are written.
            with storage.transaction():
                assert a.writable(of_a) == set()
                assert b.writable(b.owned) == SITES
            assert set().union(*(gained for gained, _ in events_b)) == SITES
        finally:
            await b.stop()
            await forget(a)

    asyncio.run(scenario())


def test_a_server_that_stops_cleanly_gives_its_ces_up_at_once(storage: PostgresStorage) -> None:
    async def scenario() -> None:
        a, b = owner(storage, "a", []), owner(storage, "b", [])
        await a.start()
        await b.start()
        try:
            await wait_for_async(lambda: bool(a.owned) and bool(b.owned), 10, "both own CEs")
            await a.stop()
            stopped = time.monotonic()
            await wait_for_async(lambda: set(b.owned) == SITES, 10, "b owns every CE")
            # No waiting for a lease to expire: the next renewal takes them.
            assert time.monotonic() - stopped < TIMES.ttl
        finally:
            await b.stop()

    asyncio.run(scenario())


def test_a_call_home_ce_is_owned_by_the_server_holding_its_call_and_moves_with_it(
    storage: PostgresStorage,
) -> None:
    async def scenario() -> None:
        calls_a: set[str] = set(SITES)  # every CE called a
        calls_b: set[str] = set()
        busy_a: set[str] = set()
        a = owner(storage, "a", [], holding=calls_a, busy=busy_a, times=STEADY)
        b = owner(storage, "b", [], holding=calls_b, times=STEADY)
        await a.start()
        await b.start()
        try:
            await wait_for_async(lambda: set(a.owned) == SITES, 10, "a owns every call-home CE")
            assert not b.owned
            first = dict(a.owned)
            # A few CEs call b instead (their calls to a ended); one of them is being pushed
            # by a: it stays a's until that push ends.
            moved = set(sorted(SITES)[:5])
            busy_a.add(min(moved))
            calls_a -= moved
            calls_b |= moved
            await wait_for_async(
                lambda: set(b.owned) == moved - busy_a, 10, "b owns the CEs that called it"
            )
            assert all(b.owned[site] == first[site] + 1 for site in b.owned)
            busy_a.clear()
            await wait_for_async(lambda: set(b.owned) == moved, 10, "b owns the one pushed too")
            # A CE whose call b holds while a still holds one too (a has not seen its call
            # end): a keeps it.
            also = max(SITES)
            calls_b.add(also)
            await rounds(b, a)
            assert also in a.owned and also not in b.owned
            # a dies without giving anything up: b takes the CEs that call it, the others
            # go to the rendezvous winner among the live, which is b alone.
            await kill(a)
            await wait_for_async(lambda: set(b.owned) == SITES, 10, "b owns every CE")
        finally:
            await b.stop()
            await forget(a)

    asyncio.run(scenario())


def test_a_push_refused_while_ownership_was_in_doubt_is_retried_after_the_next_renewal(
    storage: PostgresStorage,
) -> None:
    """A push skipped because the lease ran short during a renewal (or the CE was about to be
    handed over and was not) is not lost: the CE, still this server's, is reported gained
    again by the next renewal; a CE that is another server's is not."""

    async def scenario() -> None:
        events_a: list[tuple[set[str], set[str]]] = []
        a, b = owner(storage, "a", events_a, times=STEADY), owner(storage, "b", [], times=STEADY)
        try:
            await rounds(a, b)
            assert set(a.owned) | set(b.owned) == SITES and a.owned and b.owned
            events_a.clear()
            await a.renew()
            assert events_a == []  # a steady state reports nothing
            mine, theirs = min(a.owned), min(b.owned)
            a.defer(mine)
            a.defer(theirs)
            await a.renew()
            assert events_a == [({mine}, set())]
            await a.renew()
            assert events_a == [({mine}, set())]  # once: the deferral is used up
        finally:
            await a.stop()
            await b.stop()

    asyncio.run(scenario())


def test_exactly_one_live_server_leads_the_rekeys_and_another_takes_over_when_it_stops(
    storage: PostgresStorage,
) -> None:
    async def scenario() -> None:
        a, b = owner(storage, "a", [], times=STEADY), owner(storage, "b", [], times=STEADY)
        try:
            assert not a.leads() and not b.leads()  # no lease yet
            await rounds(a, b, 2)
            assert (a.leads(), b.leads()) == (True, False)  # the first live by name
            await a.stop()
            assert not a.leads()
            await b.renew()
            assert b.leads()
        finally:
            await b.stop()

    asyncio.run(scenario())


def test_one_renewal_assigns_thousands_of_new_ces_and_a_stopped_servers_all_move_at_once(
    storage: PostgresStorage,
) -> None:
    """The rows a renewal changes are written in one statement: 3,000 CEs enrolled at
    once are all owned after it, split between the two servers, and when one stops the
    other's next renewal takes its share whole, each CE at the next epoch."""
    many = {f"ce-{n:05d}" for n in range(3000)}

    def big_owner(name: str) -> SharedOwnership:
        return SharedOwnership(
            storage, name, known_sites=lambda: many, busy=set,
            changed=lambda gained, lost: None, call_home=frozenset, holding=frozenset,
            times=STEADY,
        )  # fmt: skip

    async def scenario() -> None:
        a, b = big_owner("a"), big_owner("b")
        await a.start()
        await b.start()
        try:
            await wait_for_async(
                lambda: set(a.owned) | set(b.owned) == many and bool(a.owned) and bool(b.owned),
                30,
                "every CE owned, by both",
            )
            rows = storage.query("SELECT site, server, epoch FROM cevpn_ce_owner")
            assert {str(site) for site, _, _ in rows} == many
            of_a = dict(a.owned)
            await a.stop()
            await wait_for_async(lambda: set(b.owned) == many, 30, "b owns every CE")
            assert all(b.owned[site] == epoch + 1 for site, epoch in of_a.items())
        finally:
            await b.stop()

    asyncio.run(scenario())


BUSY = LeaseTimes(ttl=3.0, renew=0.3, margin=0.5, grace=0.5)
"""Lease times for the busy loop: it stays busy past ttl + grace, well short of stall."""


def test_a_busy_event_loop_keeps_the_lease_and_every_ce_at_its_epoch(
    storage: PostgresStorage, caplog: pytest.LogCaptureFixture
) -> None:
    """The event loop of both servers is busy (here: blocked) for longer than a lease
    lasts: their keep-alive threads keep both leases, so when the loop turns again
    nobody takes anybody's CEs over.  Renewed on the loop alone, both leases expired.
    The busy stretch is logged, with where the loop was."""
    caplog.set_level("WARNING", logger="cevpn.ownership")

    async def scenario() -> None:
        events_a: list[tuple[set[str], set[str]]] = []
        a, b = owner(storage, "a", events_a, times=BUSY), owner(storage, "b", [], times=BUSY)
        await a.start()
        await b.start()
        try:
            await wait_for_async(
                lambda: bool(a.owned) and bool(b.owned) and set(a.owned) | set(b.owned) == SITES,
                10,
                "every CE owned, by both",
            )
            of_a, of_b = dict(a.owned), dict(b.owned)
            events_a.clear()
            renewed: list[bool | None] = []
            renew_a = a.keepalive.renew_once

            def counted() -> bool | None:
                renewed.append(renew_a())
                return renewed[-1]

            a.keepalive.renew_once = counted  # type: ignore[method-assign]
            # Busy: the loop does not turn (wait_for blocks it) until, by the database's
            # clock, both leases as they stood are past their expiry and grace: dead to
            # any round that ran then, had nothing renewed them.
            stood = storage.query(
                "SELECT max(expires) + make_interval(secs => %s) FROM cevpn_server_lease",
                (BUSY.grace,),
            )[0][0]
            wait_for(
                lambda: storage.query("SELECT now() > %s", (stood,))[0][0],
                30,
                "the leases as they stood past their grace, by the database's clock",
            )
            assert True in renewed, renewed
            assert a.lease.valid() and b.lease.valid()
            after = (a.rounds, b.rounds)
            await wait_for_async(
                lambda: a.rounds >= after[0] + 2 and b.rounds >= after[1] + 2,
                10,
                "two ownership rounds each since",
            )
            assert (a.owned, b.owned) == (of_a, of_b)
            assert events_a == []
            busy = await wait_for_async(
                lambda: [r.getMessage() for r in caplog.records if "was busy" in r.getMessage()],
                10,
                "the busy stretch logged",
            )
            assert "the lease was kept all along" in busy[0]
            assert "scenario (tests/test_ownership_postgresql.py:" in busy[0]
            assert not [r for r in caplog.records if "is dead" in r.getMessage()]
        finally:
            await a.stop()
            await b.stop()

    asyncio.run(scenario())


def test_a_lease_renewed_while_another_server_judges_it_dead_keeps_its_ces(
    storage: PostgresStorage, postgres_url: str
) -> None:
    """b's round sees a's lease expired, but a's keep-alive is renewing it at that very
    moment: b locks the row, waits, judges it again on the renewed row, and takes
    nothing.  (On the snapshot alone b would take a's CEs while a, renewed, pushed on.)"""

    async def scenario() -> None:
        a, b = owner(storage, "a", [], times=STEADY), owner(storage, "b", [], times=STEADY)
        try:
            await rounds(a, b)
            of_a = dict(a.owned)
            assert of_a and set(of_a) | set(b.owned) == SITES
            storage.query(
                "UPDATE cevpn_server_lease SET expires = now() - interval '1 hour'"
                " WHERE server = 'a'"
            )
            with psycopg.connect(postgres_url) as keepalive:  # a's, mid-renewal
                keepalive.execute(
                    "UPDATE cevpn_server_lease SET expires = now() + interval '1 minute'"
                    " WHERE server = 'a'"
                )
                judging = asyncio.get_running_loop().create_task(b.renew())
                await wait_for_async(lambda: lock_waiters(storage) == 1, 10, "b waits")
                assert not judging.done()
                keepalive.commit()
            await judging
            assert set(b.owned).isdisjoint(of_a)
            assert "a" in b.live
            await a.renew()
            assert a.owned == of_a
        finally:
            await a.stop()
            await b.stop()

    asyncio.run(scenario())


def test_a_lease_taken_over_while_its_keepalive_renews_it_is_lapsed_not_renewed(
    storage: PostgresStorage, postgres_url: str
) -> None:
    """b is taking a's CEs over (a's lease row locked, about to be deleted) when a's
    keep-alive sends its renewal: the renewal waits, finds no row, and a stops pushing
    at once rather than counting a lease it no longer has."""

    async def scenario() -> None:
        a = owner(storage, "a", [], times=STEADY)
        try:
            await a.renew()
            assert a.lease.valid() and a.owned
            results: list[bool | None] = []
            with psycopg.connect(postgres_url) as taker:
                taker.execute("SELECT 1 FROM cevpn_server_lease WHERE server = 'a' FOR UPDATE")
                renewal = threading.Thread(target=lambda: results.append(a.keepalive.renew_once()))
                renewal.start()
                await wait_for_async(lambda: lock_waiters(storage) == 1, 10, "a's renewal waits")
                assert results == []
                taker.execute("DELETE FROM cevpn_server_lease WHERE server = 'a'")
                taker.commit()
            await asyncio.to_thread(renewal.join, 10)
            assert results == [False]
            assert not a.lease.valid()
            first = dict(a.owned)
            await a.renew()  # a fresh lease
            assert a.lease.valid() and a.owned == first
        finally:
            await a.stop()

    asyncio.run(scenario())
