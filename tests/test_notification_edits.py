"""netconf-config-change edit records (RFC 6470): which nodes a commit reports."""

from __future__ import annotations

import cProfile

from lxml import etree

from nc_core.edit import Change
from nc_core.notifications import MAX_EDITS_PER_PARENT, _top_changes


def created_entries(parents: int, per_parent: int) -> list[Change]:
    """Entries created under ``parents`` lists, interleaved; only the entries are held."""
    top = etree.SubElement(etree.Element("data"), "top")
    lists = [etree.SubElement(top, f"list{p}") for p in range(parents)]
    entries = [
        etree.SubElement(lists[p], "entry") for _ in range(per_parent) for p in range(parents)
    ]
    return [Change("create", e) for e in entries]


def test_a_few_creations_are_reported_one_by_one() -> None:
    changes = created_entries(1, 3)
    assert [(e.tag, op) for e, op in _top_changes(changes)] == [("entry", "create")] * 3


def test_many_creations_under_one_parent_are_one_merge_of_it() -> None:
    changes = created_entries(1, MAX_EDITS_PER_PARENT + 1)
    assert [(e.tag, op) for e, op in _top_changes(changes)] == [("list0", "merge")]


def test_parents_are_told_apart_whatever_the_allocator_does() -> None:
    # A profiler's allocations make lxml hand out new proxy objects (new ids) for the
    # same parent node between two getparent() calls: the count must not depend on it.
    changes = created_entries(3, MAX_EDITS_PER_PARENT + 1)
    out = cProfile.Profile().runcall(_top_changes, changes)
    assert sorted((e.tag, op) for e, op in out) == [
        ("list0", "merge"),
        ("list1", "merge"),
        ("list2", "merge"),
    ]
