"""What a large commit freed is collected and given back after the reply (nc_core.heap);
a small commit leaves the collector alone."""

from __future__ import annotations

import asyncio
import gc

from lxml import etree

from nc_core import heap
from nc_core.edit import Change
from tests.waiting import next_turn


def peers(n: int) -> etree._Element:
    ce = etree.Element("ce")
    for i in range(n):
        peer = etree.SubElement(ce, "peer")
        etree.SubElement(peer, "name").text = f"p{i}"
        etree.SubElement(peer, "address").text = f"192.0.2.{i % 250}"
    return ce


def test_settling_collects_every_generation() -> None:
    seen: list[int] = []

    def watch(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            seen.append(info["generation"])

    gc.callbacks.append(watch)
    try:
        heap.settle()
    finally:
        gc.callbacks.remove(watch)
    assert 2 in seen


def test_settling_freezes_nothing() -> None:
    heap.settle()
    assert gc.get_freeze_count() == 0


def test_a_created_subtree_counts_all_its_nodes() -> None:
    assert heap.changed_nodes([Change("create", peers(100))]) == heap.LARGE_CHANGE


def test_an_updated_leaf_counts_one_node() -> None:
    leaf = etree.Element("address")
    assert heap.changed_nodes([Change("update", leaf), Change("delete", peers(1)[0])]) == 4


def test_a_large_commit_settles_the_heap_at_the_next_turn_not_before() -> None:
    async def run() -> tuple[int, int]:
        settled = heap.settled
        heap.after_commit([Change("create", peers(100))])
        before = heap.settled - settled  # the reply is still being written
        await next_turn()
        return before, heap.settled - settled

    before, after = asyncio.run(run())
    assert before == 0 and after == 1


def test_a_small_commit_leaves_the_collector_alone() -> None:
    async def run() -> int:
        settled = heap.settled
        heap.after_commit([Change("create", peers(1))])
        await next_turn()
        return heap.settled - settled

    assert asyncio.run(run()) == 0
