"""IKE-less rekeys follow the VPNs present now (nc_server.rekey): a real key store, a
controllable clock and wait, no sleeping."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from nc_server.compiler import SaSuite
from nc_server.keystore import KeyStore
from nc_server.rekey import IDLE_CHECK, RETRY_AFTER_FAILURE, RekeyPlan, RekeyScheduler
from nc_server.storage import SqliteStorage

GCM = SaSuite("cevpn-types:encr-aes-gcm-16-256", None, 3600, 4200)


class FakeTime:
    """A clock the test moves; a wait that moves it instead of sleeping (or, for the idle
    wait, blocks until the scheduler is woken)."""

    def __init__(self) -> None:
        self.now = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)
        self.waits: list[float] = []
        self._waiting = asyncio.Event()

    def clock(self) -> datetime:
        return self.now

    async def until(self, condition: Callable[[], object]) -> None:
        """Until ``condition`` holds, looked at each time the scheduler comes to a wait (its
        only points of rest, where whatever it did is done)."""
        while not condition():
            self._waiting.clear()
            await self._waiting.wait()

    async def wait(self, event: asyncio.Event, timeout: float) -> None:
        self.waits.append(timeout)
        self._waiting.set()
        if timeout >= IDLE_CHECK:
            await event.wait()
        else:
            self.now += timedelta(seconds=timeout)
            await asyncio.sleep(0)  # a real wait yields to the other tasks too


@pytest.fixture
def setup(tmp_path: Path) -> tuple[KeyStore, FakeTime, list[RekeyPlan], list[tuple[str, int]]]:
    fake = FakeTime()
    keys = KeyStore(SqliteStorage(tmp_path / "db"), clock=fake.clock)
    plans: list[RekeyPlan] = []
    rekeyed: list[tuple[str, int]] = []
    return keys, fake, plans, rekeyed


def make_sas(keys: KeyStore, vpn: str) -> None:
    for a, b in (("a", "b"), ("b", "a")):
        keys.ikeless_sa(vpn, a, b, "outbound", GCM)


def scheduler(
    keys: KeyStore, fake: FakeTime, plans: list[RekeyPlan], rekeyed: list
) -> RekeyScheduler:  # type: ignore[type-arg]
    def rekey(vpn: str, due: list[tuple[str, str]]) -> None:
        keys.begin_rekey(vpn, due)
        rekeyed.append((vpn, len(due)))

    return RekeyScheduler(keys, lambda: plans, rekey, clock=fake.clock, wait=fake.wait)


def test_without_ikeless_sas_there_is_nothing_to_wait_for(setup):
    keys, fake, plans, rekeyed = setup
    assert scheduler(keys, fake, plans, rekeyed).seconds_to_next() is None


def test_a_vpn_added_with_a_short_interval_is_due_after_its_own_interval(setup):
    keys, fake, plans, rekeyed = setup
    plans.append(RekeyPlan("slow", 3600))
    make_sas(keys, "slow")
    fake.now += timedelta(seconds=100)
    plans.append(RekeyPlan("fast", 10))
    make_sas(keys, "fast")
    assert scheduler(keys, fake, plans, rekeyed).seconds_to_next() == 10


def test_only_due_sas_are_rekeyed(setup):
    keys, fake, plans, rekeyed = setup
    plans.extend([RekeyPlan("slow", 3600), RekeyPlan("fast", 10)])
    make_sas(keys, "slow")
    make_sas(keys, "fast")
    s = scheduler(keys, fake, plans, rekeyed)
    fake.now += timedelta(seconds=9)
    assert s.run_due() == 0
    fake.now += timedelta(seconds=1)
    assert s.run_due() == 2
    assert rekeyed == [("fast", 2)]


def test_the_scheduler_wakes_for_a_new_vpn_and_rekeys_it_on_time(setup):
    keys, fake, plans, rekeyed = setup
    s = scheduler(keys, fake, plans, rekeyed)

    async def scenario() -> None:
        task = asyncio.get_running_loop().create_task(s.run())
        await fake.until(lambda: fake.waits)  # asleep with nothing to do
        assert fake.waits == [IDLE_CHECK]
        start = fake.now
        plans.append(RekeyPlan("fast", 10))
        make_sas(keys, "fast")
        s.changed()  # what a commit does
        await fake.until(lambda: rekeyed)
        assert fake.now - start == timedelta(seconds=10)  # on time, not at a fixed period
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
    assert rekeyed == [("fast", 2)]
    assert fake.waits[:2] == [IDLE_CHECK, 10]


def test_a_rekey_that_fails_is_retried_later_not_in_a_busy_loop(setup):
    keys, fake, plans, _ = setup
    plans.append(RekeyPlan("fast", 10))
    make_sas(keys, "fast")
    fake.now += timedelta(seconds=10)
    attempts: list[str] = []

    def broken(vpn: str, due: list[tuple[str, str]]) -> None:
        attempts.append(vpn)
        raise RuntimeError("recompile failed")

    s = RekeyScheduler(keys, lambda: plans, broken, clock=fake.clock, wait=fake.wait)

    async def scenario() -> None:
        task = asyncio.get_running_loop().create_task(s.run())
        await fake.until(lambda: len(attempts) >= 3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
    assert all(w > 0 for w in fake.waits)  # it waited between attempts


def test_a_server_that_does_not_lead_begins_no_rekey_and_asks_again_later(setup):
    """With several servers on one database only the leader rekeys; another one checks
    again every RETRY_AFTER_FAILURE seconds, so it takes over when it comes to lead."""
    keys, fake, plans, rekeyed = setup
    plans.append(RekeyPlan("fast", 10))
    make_sas(keys, "fast")
    fake.now += timedelta(seconds=10)
    leading = [False]

    def rekey(vpn: str, due: list[tuple[str, str]]) -> None:
        keys.begin_rekey(vpn, due)
        rekeyed.append((vpn, len(due)))

    s = RekeyScheduler(
        keys, lambda: plans, rekey, clock=fake.clock, wait=fake.wait, leads=lambda: leading[0]
    )
    assert s.run_due() == 0 and rekeyed == []

    async def scenario() -> None:
        task = asyncio.get_running_loop().create_task(s.run())
        await fake.until(lambda: len(fake.waits) >= 2)
        assert rekeyed == []
        assert fake.waits[:2] == [RETRY_AFTER_FAILURE] * 2  # not a busy loop
        leading[0] = True  # the leader died: this server leads now
        await fake.until(lambda: rekeyed)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
    assert rekeyed == [("fast", 2)]


def test_a_wake_up_before_anything_is_due_does_not_look_for_due_sas(setup):
    """Every commit wakes the scheduler; looking for due SAs walks every SA of the VPN
    (0.2 s at 1,000 sites), so it is done only once one is due."""
    keys, fake, plans, rekeyed = setup
    plans.append(RekeyPlan("slow", IDLE_CHECK))  # a wait that only a wake-up ends
    make_sas(keys, "slow")
    looked: list[str] = []
    due_for_rekey = keys.due_for_rekey

    def counted(vpn: str, interval: float, now: datetime | None = None) -> list[tuple[str, str]]:
        looked.append(vpn)
        return due_for_rekey(vpn, interval, now)

    keys.due_for_rekey = counted  # type: ignore[method-assign]
    s = scheduler(keys, fake, plans, rekeyed)

    async def scenario() -> None:
        task = asyncio.get_running_loop().create_task(s.run())
        await fake.until(lambda: fake.waits)  # asleep until woken
        for commits in range(1, 4):
            s.changed()  # what a commit does
            await fake.until(lambda n=commits: len(fake.waits) > n)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
    assert fake.waits == [IDLE_CHECK] * 4
    assert looked == [] and rekeyed == []
