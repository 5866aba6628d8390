"""Replaced configurations are let go of after the reply, not before it (nc_core.release)."""

from __future__ import annotations

import asyncio
import gc
import weakref

from nc_core import release
from nc_core.release import drop_later, free_later
from tests.waiting import next_turn


class Tree:
    """Stands for a libyang tree: counts its ``free()``."""

    def __init__(self) -> None:
        self.freed = 0

    def free(self) -> None:
        self.freed += 1


class Big:
    """Stands for an lxml tree: something only references keep alive."""


def test_without_a_running_loop_a_tree_is_freed_at_once() -> None:
    tree = Tree()
    free_later(tree)
    assert tree.freed == 1


def test_a_tree_is_freed_after_the_current_step_not_during_it() -> None:
    async def step() -> tuple[int, int]:
        tree = Tree()
        free_later(tree)
        during = tree.freed
        await next_turn()
        return during, tree.freed

    assert asyncio.run(step()) == (0, 1)


def test_an_object_dropped_later_lives_until_the_loops_next_turn() -> None:
    async def step() -> tuple[bool, bool]:
        big = Big()
        ref = weakref.ref(big)
        drop_later(big)
        del big
        gc.collect()
        alive_during = ref() is not None
        await next_turn()
        gc.collect()
        return alive_during, ref() is not None

    assert asyncio.run(step()) == (True, False)


def test_a_loop_that_closed_before_its_turn_has_its_trees_freed_by_the_next_loop() -> None:
    tree = Tree()
    loop = asyncio.new_event_loop()

    def last_callback() -> None:
        free_later(tree)
        loop.stop()  # callbacks scheduled by this one do not run: its turn never comes

    loop.call_soon(last_callback)
    loop.run_forever()
    loop.close()
    assert tree.freed == 0

    async def another() -> None:
        free_later(Tree())

    asyncio.run(another())
    assert tree.freed == 1


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_trim_long_after_the_last_is_made_at_once() -> None:
    clock, made = _Clock(), []
    pacer = release.TrimPacer(every=10.0, clock=clock, trim=lambda: made.append(clock.now))
    pacer.trim()
    clock.now += 10.0
    pacer.trim()
    assert made == [1000.0, 1010.0]


def test_trims_asked_for_within_the_pace_make_one_trim_when_it_has_passed() -> None:
    clock, made = _Clock(), []
    pacer = release.TrimPacer(every=10.0, clock=clock, trim=lambda: made.append(clock.now))

    async def main() -> None:
        pacer.trim()
        clock.now += 1.0
        pacer.trim()
        clock.now += 2.0
        pacer.trim()
        assert made == [1000.0]  # the two later ones wait for the pace
        assert pacer._due is not None
        clock.now = 1010.0
        pacer._due._run()  # the timer's callback, as the loop runs it when due
        assert made == [1000.0, 1010.0]
        assert pacer._due is None

    asyncio.run(main())


def test_a_trim_due_on_a_loop_that_closed_does_not_block_the_next() -> None:
    clock, made = _Clock(), []
    pacer = release.TrimPacer(every=10.0, clock=clock, trim=lambda: made.append(clock.now))

    async def ask() -> None:
        pacer.trim()

    asyncio.run(ask())
    clock.now += 1.0
    asyncio.run(ask())  # deferred on a loop that then closed: never runs
    clock.now += 1.0
    pacer.trim()  # no loop here: made at once
    assert made == [1000.0, 1002.0]
