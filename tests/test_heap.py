"""What a large commit freed is collected and given back after the reply, and what survived
frozen (nc_core.heap); a small commit leaves the collector alone."""

from __future__ import annotations

import asyncio
import gc
import weakref
from collections.abc import Iterator
from pathlib import Path

import pytest
from lxml import etree

from nc_core import heap
from nc_core.edit import Change
from tests.waiting import next_turn


@pytest.fixture(autouse=True)
def unfrozen() -> Iterator[None]:
    """Settling freezes what lives: the other tests of this process get it back."""
    yield
    gc.unfreeze()


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


class Node:
    """An object in a reference cycle: only the cyclic collector frees it."""

    def __init__(self) -> None:
        self.me = self


def test_settling_freezes_what_survived_and_frees_frozen_cycles_at_the_next_settling() -> None:
    try:
        node = Node()
        ref = weakref.ref(node)
        heap.settle()
        assert gc.get_freeze_count() > 0
        del node
        gc.collect()
        assert ref() is not None  # frozen: full collections in requests skip it
        heap.settle()
        assert ref() is None  # unfrozen, collected
    finally:
        gc.unfreeze()


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.mark.skipif(heap._TRIM is None, reason="no malloc_trim (not glibc)")
def test_settling_gives_freed_memory_back_to_the_system() -> None:
    chunks = [bytes(2000) for _ in range(20_000)]  # 40 MB in small chunks
    kept = chunks[::256]  # a few stay in use, scattered over the heap
    del chunks
    before = rss_bytes()
    try:
        heap.settle()
    finally:
        gc.unfreeze()
    after = rss_bytes()
    assert before - after > 20 * 2**20, (before, after)
    assert len(kept) == 79


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
