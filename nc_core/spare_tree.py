"""A private copy of the running configuration made from the configuration it replaced.

Why: every edit works on a private copy of its datastore (datastore trees are replaced,
never changed in place: nc_core.validation relies on it).  On a CE holding 1,000 peers
that copy (some 20,000 lxml nodes), and freeing the configuration a commit replaced,
were a fifth of a one-peer change's work, and glibc's consolidation of the freed chunks
as much again.  But the configuration a commit replaced differs from the new running
configuration only in the entries the commit changed, and the validator knows which
(:class:`nc_core.edit.EntryPatch`).  So instead of being freed it is kept (a
:class:`Spare`), and the next edit's copy of running is made of it: the changed entries
copied in, the removed ones taken out.

Only a tree nobody else refers to is changed: the spare is used when the root's
reference count says that only the spare holds it (a pending confirmed commit's
rollback configuration, a datastore, a transaction still holding it: a whole copy, as
before), and when the patch's entries are where the patch says.  A tree holder that
keeps only an element inside the old configuration, not its root, is not seen by that
count: the server's own such holders (the remembered patch, the validator's record of
the last candidate check) are told to let go first, and no other code keeps elements of
a configuration a commit replaced.  ``tests/test_spare_tree.py`` checks the copies
against deep copies.
"""

from __future__ import annotations

import sys
from copy import deepcopy
from dataclasses import dataclass

from lxml import etree

from nc_core.edit import EntryPatch

_OWN_REFERENCES = 3
"""References to the old root while :func:`copy_from_spare` looks: the patch's, the
local variable's and ``sys.getrefcount``'s argument."""


@dataclass
class Spare:
    """A configuration a commit replaced (``patch.old``), and how the configuration that
    replaced it (``patch.new``) differs."""

    patch: EntryPatch


def copy_from_spare(spare: Spare, source: etree._Element) -> etree._Element | None:
    """``spare``'s old configuration changed in place into a copy of ``source`` (its
    ``patch.new``), or None when it cannot be for sure (the spare is then of no more
    use: it may have been changed part of the way)."""
    patch = spare.patch
    if patch.new is not source:
        return None
    old = patch.old
    if sys.getrefcount(old) > _OWN_REFERENCES:
        return None  # someone else still holds the old configuration
    old_parent, new_parent = _parent(old, patch.entries), _parent(source, patch.entries)
    if old_parent is None or new_parent is None:
        return None
    if any(e.getparent() is not old_parent for e in patch.removed):
        return None
    if any(e is not None and e.getparent() is not old_parent for e in patch.previous):
        return None
    if any(e.getparent() is not new_parent for e in patch.changed):
        return None
    if any(a.getparent() is not old_parent or b.getparent() is not new_parent
           for a, b in patch.leaves):  # fmt: skip
        return None
    for leaf, value in patch.leaves:
        copy = deepcopy(value)
        copy.tail = leaf.tail
        leaf.addnext(copy)
        old_parent.remove(leaf)
    for gone in patch.removed:
        old_parent.remove(gone)
    fresh = []
    for entry, previous in zip(patch.changed, patch.previous, strict=True):
        copy = deepcopy(entry)
        copy.tail = None
        if previous is None:
            fresh.append((entry, copy))
            continue
        previous.addnext(copy)
        old_parent.remove(previous)
    for entry, copy in fresh:  # in the new configuration's order: each after the ones before
        old_parent.insert(new_parent.index(entry), copy)
    if len(old_parent) != len(new_parent) or any(
        old_parent.index(copy) != new_parent.index(entry) for entry, copy in fresh
    ):
        return None  # not the copy it should be: nobody holds it, it is let go of
    return old


def _parent(root: etree._Element, tags: tuple[str, ...]) -> etree._Element | None:
    node: etree._Element | None = root
    for tag in tags[:-1]:
        if node is None:
            return None
        node = node.find(tag)
    return node
