"""Stopping background tasks always ends (nc_core.tasks.stop_tasks), even when a
cancellation is lost."""

from __future__ import annotations

import asyncio
import logging

import pytest

from nc_core.tasks import stop_tasks
from tests.waiting import next_turn


def test_tasks_that_end_when_cancelled_are_stopped() -> None:
    async def main() -> None:
        tasks = [asyncio.create_task(asyncio.Event().wait()) for _ in range(3)]
        assert await stop_tasks(tasks) == []
        assert all(t.cancelled() for t in tasks)

    asyncio.run(main())


def test_a_loop_that_lost_its_cancellation_is_cancelled_again() -> None:
    """What asyncio.wait_for does in Python 3.11 when the awaitable finishes in the turn the
    task is cancelled (gh-86296): the cancellation is swallowed, and a loop around it
    carries on.  Made here without a race: the first CancelledError is caught."""
    swallowed = []

    async def keeps_a_link_up() -> None:
        while True:
            try:
                await asyncio.Event().wait()  # until cancelled
            except asyncio.CancelledError:
                if swallowed:
                    raise
                swallowed.append(True)  # lost: the loop goes on, as after the race

    async def main() -> None:
        task = asyncio.create_task(keeps_a_link_up())
        await next_turn()  # the task has started
        assert await stop_tasks([task]) == []
        assert task.cancelled() and swallowed == [True]

    asyncio.run(main())


def test_the_wait_for_race_does_not_hold_the_stop() -> None:
    """The real race: the awaited future is done when the cancellation arrives."""

    async def dial_again_and_again(
        ready: asyncio.Event, answered: list[asyncio.Future[None]]
    ) -> None:
        while True:
            future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            answered.append(future)
            ready.set()
            try:
                await asyncio.wait_for(future, 3600)
            except OSError:
                pass  # the endpoint refused: dial again

    async def main() -> None:
        ready, answered = asyncio.Event(), []
        task = asyncio.create_task(dial_again_and_again(ready, answered))
        await ready.wait()
        answered[-1].set_exception(OSError("refused"))  # finished in this turn...
        task.cancel()  # ...as the task is cancelled
        assert await stop_tasks([task]) == []
        assert task.cancelled()

    asyncio.run(main())


def test_a_task_that_will_not_stop_is_named_and_left_behind(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def stubborn() -> None:
        while True:
            try:
                await asyncio.Event().wait()  # until cancelled
            except asyncio.CancelledError:
                pass

    async def main() -> None:
        task = asyncio.create_task(stubborn(), name="stubborn-loop")
        await next_turn()  # the task has started
        with caplog.at_level(logging.ERROR, logger="cevpn.tasks"):
            assert await stop_tasks([task], grace=0.2) == [task]
        assert "stubborn-loop did not stop" in caplog.text and "stubborn" in caplog.text
        task.get_coro().close()  # type: ignore[union-attr]

    asyncio.run(main())


def test_a_task_that_failed_before_the_stop_does_not_fail_the_stop() -> None:
    async def fails() -> None:
        raise RuntimeError("failed before")

    async def main() -> None:
        task = asyncio.create_task(fails())
        await next_turn()  # the task has started
        assert await stop_tasks([task]) == []

    asyncio.run(main())
