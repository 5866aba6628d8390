"""When the server provisions a CE again: back-off, no retry of refusals, one job at a time."""

from __future__ import annotations

import asyncio

from nc_server.provisioner import CeRecord, Provisioner, retry_delay
from nc_server.southbound import CeRefused, CeUnreachable, ConfirmLost, NotConfirmed


def test_retries_back_off_exponentially_up_to_the_limit() -> None:
    assert [retry_delay(n, 10) for n in range(1, 7)] == [1, 2, 4, 8, 10, 10]


def run(
    job_results: list[object], limit: float = 0.01
) -> tuple[CeRecord, list[tuple[str, str]], int]:
    """Provision one CE whose job gives these results in turn, until nothing is left to
    do (no job running, no retry scheduled)."""
    calls = 0
    changes: list[tuple[str, str]] = []

    async def main() -> CeRecord:
        nonlocal calls

        async def job(rec: CeRecord) -> str:
            nonlocal calls
            result = job_results[min(calls, len(job_results) - 1)]
            calls += 1
            if isinstance(result, Exception):
                raise result
            return str(result)

        prov = Provisioner(job, lambda rec, old, err: changes.append((old, rec.status)),
                           max_concurrent=2, retry_limit=limit)  # fmt: skip
        rec = prov.record("v", "s")
        prov.want("s")
        await asyncio.wait_for(prov.idle(), 30)
        await prov.close()
        return rec

    rec = asyncio.run(main())
    return rec, changes, calls


def test_an_unreachable_ce_is_retried_until_it_answers() -> None:
    rec, changes, calls = run([CeUnreachable("down"), CeUnreachable("down"), "in-sync"])
    assert calls == 3
    assert rec.status == "in-sync" and rec.retry_count == 0 and rec.last_error is None
    assert ("pending", "unreachable") in changes and ("unreachable", "in-sync") in changes


def test_a_refused_configuration_is_not_retried() -> None:
    rec, _, calls = run([CeRefused("bad value", path="/ce/peer")])
    assert calls == 1 and rec.status == "failed" and "bad value" in (rec.last_error or "")


def test_an_unconfirmed_change_is_not_pushed_again() -> None:
    rec, _, calls = run([NotConfirmed("lost the CE")])
    assert calls == 1 and rec.status == "failed"


def test_a_confirmation_lost_over_a_working_path_is_pushed_again() -> None:
    rec, changes, calls = run([ConfirmLost("no reply to the confirmation"), "in-sync"])
    assert calls == 2 and rec.status == "in-sync"
    assert ("pending", "unreachable") in changes


def test_work_asked_for_while_running_runs_once_more_not_in_parallel() -> None:
    running = 0
    most = 0
    calls = 0

    async def main() -> None:
        async def job(rec: CeRecord) -> str:
            nonlocal running, most, calls
            running += 1
            calls += 1
            most = max(most, running)
            await asyncio.sleep(0.05)
            running -= 1
            return "in-sync"

        prov = Provisioner(job, lambda *a: None, max_concurrent=4)
        prov.record("v", "s")
        for _ in range(5):
            prov.want("s")
        await asyncio.wait_for(prov.idle(), 30)
        await prov.close()

    asyncio.run(main())
    assert most == 1 and calls == 2


def test_a_ce_is_busy_while_its_job_waits_for_a_slot_or_runs_not_while_a_retry_waits() -> None:
    """What a CE's fetch is told (nc_server.controller.fetch: being-pushed) rests on this."""
    seen: dict[str, list[bool]] = {"a": [], "b": []}

    async def main() -> None:
        gate = asyncio.Event()
        a_running = asyncio.Event()
        b_unreachable = asyncio.Event()
        outcomes = {"a": ["in-sync"], "b": [CeUnreachable("down"), "in-sync"]}

        async def job(rec: CeRecord) -> str:
            if rec.site == "a":
                a_running.set()
                await gate.wait()
            result = outcomes[rec.site].pop(0)
            if isinstance(result, Exception):
                raise result
            return str(result)

        def status(rec: CeRecord, old: str, error: str | None) -> None:
            if rec.site == "b" and rec.status == "unreachable":
                b_unreachable.set()

        prov = Provisioner(job, status, max_concurrent=1, retry_limit=3600)
        prov.record("v", "a")
        prov.record("v", "b")
        assert not prov.busy("a")
        prov.want("a")
        prov.want("b")
        await a_running.wait()  # a holds the one slot at the gate; b waits for it
        seen["a"].append(prov.busy("a"))
        seen["b"].append(prov.busy("b"))
        gate.set()
        await b_unreachable.wait()
        await prov.settle()
        seen["a"].append(prov.busy("a"))
        seen["b"].append(prov.busy("b"))  # its retry is only a timer now
        await prov.close()

    asyncio.run(main())
    assert seen == {"a": [True, False], "b": [True, False]}
