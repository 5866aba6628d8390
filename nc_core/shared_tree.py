"""Validated libyang trees shared by reference count, and made from their predecessor
in place once nobody else can see it.

Why: after a one-peer commit on a CE holding 1,000 peers, the new configuration's
libyang tree is the old one with one entry replaced.  Copying the old tree to put the
entry in (some 20,000 nodes), and later freeing the old one, was a fifth of the
agent's work per commit (and glibc's consolidation of the freed chunks as much again).
Both trees must exist while the commit's transaction runs (the application reads the
old and the new configuration), but what the application reads of either, on a CE, is
a few nodes outside the peers (``Transaction.new_at``), the same in both.

So the validator's result is a :class:`SharedTree` that is *pending*: its predecessor
(``base``) with a patch (:class:`Patch`: the changed entries, parsed on their own, and
the removed keys), not yet made.  Reading a node outside the patched list reads the
predecessor's (nothing there differs: the validator only takes this path for a change
confined to one entry-scoped list's entries).  Anything else that needs the tree
(printing it whole, a look into the list, the next commit's patch) makes it: in place
in the predecessor when the pending tree holds the last reference to it (the old
configuration was let go of: nobody can see it change), else in a copy of it, as
before.  A commit every few seconds thus costs in proportion to the change.

Holders never change a tree they were handed, and a tree is only changed in place
when its reference count says it has no other holder.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import libyang
from _libyang import ffi, lib

_PLAIN_PATH = re.compile(r"(?:/(?:[\w.-]+:)?[\w.-]+)+")


class SharedTree:
    """A validated libyang tree handed out to several holders, freed with the last one.

    Every tree the validator returns is one handle (a DNode whose ``free()`` lets go of
    it); the validator's memo holds one more.  Holders only read their trees (the server
    prints them, the application reads them), never change them."""

    def __init__(self, tree: Any) -> None:
        self.context = tree.context
        self.cdata = tree.cdata
        self.refs = 1  # the memo's
        self.pending: Patch | None = None
        tree.cdata = None  # the parser's handle is replaced by ours

    @classmethod
    def patched(cls, base: SharedTree, patch: Patch) -> SharedTree:
        """The tree ``base`` makes with ``patch`` (made when first needed); holds a
        reference to ``base`` until then.  ``base`` must be made already."""
        assert base.pending is None and base.cdata is not None
        tree = cls.__new__(cls)
        tree.context = base.context
        tree.cdata = None
        tree.refs = 1
        tree.pending = patch
        base.refs += 1
        return tree

    def made(self) -> Any:
        """The tree's first top-level node, the pending patch applied first."""
        patch = self.pending
        if patch is not None:
            self.cdata = patch.make()
            self.pending = None
        return self.cdata

    def handle(self) -> Any:
        node: Any
        if self.pending is None:
            node = libyang.DNode.new(self.context, self.cdata)
        else:
            node = LazyNode(self)
        node.shared_tree = self
        node.free_func = self._let_go
        self.refs += 1
        return node

    def _let_go(self, node: Any) -> None:
        self.release()

    def release(self) -> None:
        self.refs -= 1
        if self.refs == 0:
            patch, self.pending = self.pending, None
            if patch is not None:
                patch.drop()
            elif self.cdata is not None:
                lib.lyd_free_all(self.cdata)
            self.cdata = None

    def take_over(self) -> Any:
        """The tree itself, for its last holder to change in place (this object is
        then empty)."""
        assert self.refs == 1 and self.pending is None
        cdata, self.cdata = self.cdata, None
        self.refs = 0
        return cdata


class Release:
    """A :class:`SharedTree`'s memo reference, let go of by ``free()`` (free_later)."""

    def __init__(self, shared: SharedTree) -> None:
        self.shared = shared

    def free(self) -> None:
        self.shared.release()


@dataclass
class Patch:
    """How a pending tree is made of its ``base``: ``apply`` puts the changed entries
    (in ``checked``, a tree this patch owns) into a tree of the base's content, raising
    LookupError if one is not where it must be (checked before the patch was made)."""

    base: SharedTree
    checked: Any
    apply: Callable[[Any, Any], None]
    list_steps: tuple[tuple[str, str], ...]
    """The patched list's data path, (module, name) per step."""
    leaf_steps: tuple[tuple[tuple[str, str], ...], ...] = ()
    """The data paths of the leaves beside the list whose value the patch changes
    (nc_core.schema.EntryScopedList.free_leaves): there before and after."""

    def make(self) -> Any:
        base = self.base
        if base.refs == 1:
            tree = base.take_over()  # nobody else sees it: changed in place
        else:
            node_p = ffi.new("struct lyd_node **")
            first = lib.lyd_first_sibling(base.cdata)
            flags = lib.LYD_DUP_RECURSIVE | lib.LYD_DUP_WITH_FLAGS
            if lib.lyd_dup_siblings(first, ffi.NULL, flags, node_p) != lib.LY_SUCCESS:
                raise MemoryError("libyang could not copy a configuration")
            tree = node_p[0]
            base.release()
        try:
            self.apply(tree, self.checked.cdata)
        except LookupError as exc:  # pragma: no cover - checked when the patch was made
            raise RuntimeError(f"a validated change no longer fits its tree: {exc}") from exc
        finally:
            self._free_checked()
        return lib.lyd_first_sibling(tree)

    def drop(self) -> None:
        """Never made: let go of the base and of the changed entries."""
        self._free_checked()
        self.base.release()

    def _free_checked(self) -> None:
        if self.checked is not None:
            self.checked.free()
            self.checked = None

    def outside(self, path: str) -> bool:
        """Whether the data path ``path`` (steps without predicates) names a node outside
        the patched list: one the base has exactly as the patched tree has it."""
        return self._where(path) == "outside"

    def changed_leaf(self, path: str) -> bool:
        """Whether ``path`` names one of the changed leaves beside the list, which
        ``checked`` holds exactly as the patched tree will (while the patch is pending)."""
        return self.checked is not None and self._where(path) == "changed leaf"

    def same_existence(self, path: str) -> bool:
        """Whether the base has a node at ``path`` exactly when the patched tree has: a
        node outside the list, or one above it (the patch changes entries only, never
        the containers holding them), or a changed leaf beside it (changed in value)."""
        return self._where(path) in ("outside", "above", "changed leaf")

    def _where(self, path: str) -> str:
        if not _PLAIN_PATH.fullmatch(path):
            return "unknown"
        module = ""
        steps: list[tuple[str, str]] = []
        for step in path[1:].split("/"):
            prefix, _, name = step.rpartition(":")
            module = prefix or module
            if not module:
                return "unknown"  # not a path libyang finds anything at
            steps.append((module, name))
        for leaf in self.leaf_steps:
            if tuple(steps[: len(leaf)]) == leaf:
                return "changed leaf"
        for depth, step_name in enumerate(steps):
            if depth >= len(self.list_steps):
                return "inside"
            if step_name != self.list_steps[depth]:
                return "outside"
        return "above" if len(steps) < len(self.list_steps) else "inside"


class LazyNode(libyang.DNode):
    """A handle of a pending :class:`SharedTree`: reads outside the patched list from
    the base, reads of a changed leaf beside it from the patch's checked tree, anything
    else (``cdata``) makes the tree first.  A node found through it is read at once, as
    any node of a tree that may be freed (the checked tree goes when the tree is made)."""

    def __init__(self, shared: SharedTree) -> None:
        super().__init__(shared.context, None)
        self.__dict__["lazy"] = shared

    @property
    def cdata(self) -> Any:
        shared = self.__dict__.get("lazy")
        return None if shared is None else shared.made()

    @cdata.setter
    def cdata(self, value: Any) -> None:
        if value is not None:
            raise TypeError("a lazy handle is not pointed elsewhere")
        self.__dict__["lazy"] = None  # freed (or being initialised)

    def find_path(self, path: str, output: bool = False) -> Any:
        shared = self.__dict__.get("lazy")
        patch = None if shared is None else shared.pending
        if patch is not None and not output:
            if patch.outside(path):
                return libyang.DNode.new(self.context, patch.base.cdata).find_path(path)
            if patch.changed_leaf(path):
                # The configuration's version, read by every commit of a pushed change:
                # without making (copying, at 1,000 peers) the whole tree for it.
                return libyang.DNode.new(self.context, patch.checked.cdata).find_path(path)
        return super().find_path(path, output)


def has_node(tree: Any, path: str) -> bool:
    """Whether ``tree`` (a libyang tree or handle) has a node at the data path ``path``;
    for a pending tree, without making it when its base answers the same."""
    if isinstance(tree, LazyNode):
        shared = tree.__dict__.get("lazy")
        patch = None if shared is None else shared.pending
        if patch is not None and patch.same_existence(path):
            node_p = ffi.new("struct lyd_node **")
            found = lib.lyd_find_path(patch.base.cdata, path.encode(), 0, node_p)
            if found != lib.LY_SUCCESS:
                lib.ly_err_clean(tree.context.cdata, ffi.NULL)
            return bool(found == lib.LY_SUCCESS)
    return tree.find_path(path) is not None
