"""Validation of configuration datastores by libyang, in proportion to the change.

Why a module of its own: the datastores (nc_core.datastore) are what is kept and
persisted; this is how a tree becomes a validated libyang tree and a canonical form,
and most of it is the machinery that makes a one-peer commit on a CE holding 1,000
peers cost what the change costs, not what the configuration weighs (issue 17):

- a memo of the configuration last found valid, with its libyang tree (shared by
  reference count, :class:`SharedTree`) and its canonical form (shared with the
  running configuration: trees handed out are replaced, never changed in place);
- incremental validation of a change confined to the entries of one entry-scoped list
  (nc_core.schema.entry_scoped_lists), falling back to whole validation, whose
  rpc-errors are the only ones ever reported;
- the node-by-node check of an edit of the candidate, by its changed entries.

It is kept apart so that the datastore module stays small and readable, and so that
what this machinery may assume (which trees are shared, which are private) is said in
one place: :meth:`Validator.checked_nodes` may take over a tree the caller hands it
(``owned``), every other tree it is given it only reads.
"""

from __future__ import annotations

from collections import Counter
from copy import deepcopy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from _libyang import ffi, lib
from lxml import etree

from nc_core.datastore import free, serialize, validation_errors
from nc_core.edit import EntryPatch, new_datastore, remember_patch, remembered_patch
from nc_core.errors import RpcErrors
from nc_core.list_entries import (
    ListEntries,
    counter,
    digest,
    entries_of,
    find_entry,
    key_of,
    parent_of,
)
from nc_core.release import drop_later, free_later
from nc_core.schema import (
    EntryScopedList,
    Schema,
    SchemaIndex,
    ValidationFailed,
    entry_scoped_lists,
)
from nc_core.shared_tree import Patch, Release, SharedTree
from nc_core.xmlutil import NC_NS, XmlRejected, parse_message, qn


@dataclass
class _Valid:
    """The configuration last found fully valid (Validator's memo)."""

    inputs: set[bytes]
    """Digests (:func:`digest`) of serialised datastores known to make ``tree`` (what was
    validated; the canonical form's is added once made, see :meth:`canonical_digest`).
    Not the bytes themselves: on a CE holding 1,000 peers they were 0.9 MB kept for as
    long as the configuration, a second copy of the journal's document."""
    tree: SharedTree
    canonical: etree._Element | None = None
    """Its canonical form, shared with whoever it was handed to (the running
    configuration): trees handed out are replaced, never changed in place, as the
    server's datastore trees are."""
    _canonical_digest: bytes | None = None
    lists: dict[tuple[str, ...], ListEntries] = field(default_factory=dict)
    """Per entry-scoped list, its entries in ``canonical`` by key, and the digests of
    those a change was compared with (digests, not the bytes: those were another 0.8 MB
    on a CE holding 1,000 peers)."""

    def canonical_digest(self) -> bytes | None:
        """``canonical`` serialised, digested (made when first needed: a commit the
        confirming commit hands back as the same tree never needs it)."""
        if self._canonical_digest is None and self.canonical is not None:
            self._canonical_digest = digest(serialize(self.canonical))
            self.inputs.add(self._canonical_digest)
        return self._canonical_digest

    def knows(self, root: etree._Element) -> bool:
        """Whether ``root`` is this configuration: its canonical form itself, or a tree
        with the same bytes as something validated into it."""
        if root is self.canonical:
            return True
        self.canonical_digest()
        return digest(serialize(root)) in self.inputs


class Validator:
    """libyang validation of datastore trees, and the canonical form of the result.

    A one-peer commit on a CE holding 1,000 peers costs in proportion to the change,
    with the same verdicts and rpc-errors as validating everything:

    - The last configuration found valid is remembered with its libyang tree (shared
      with the holders of the handles given out: :class:`SharedTree`) and canonical
      form.  Validating the same bytes again (a confirming commit) hands out another
      handle and the canonical form made before.
    - A configuration that differs from it only in entries of one entry-scoped list
      (nc_core.schema.entry_scoped_lists: no constraint reads an entry from another
      entry or, but for leafrefs, from outside the list) is validated by libyang
      without the unchanged entries: the rest of the configuration and the changed
      entries, every constraint checked, with the list's ``unique`` statements and its
      keys checked against all entries apart.  The unchanged entries were valid and
      nothing they depend on changed.  Where that partial validation or the apart
      checks find anything, the whole configuration is validated instead: errors
      come from full validation only, so they are the same rpc-errors as always.  The
      result is the remembered tree with the changed entries put in, and the same for
      the canonical form (tests/test_validator_memo.py compares both with what full
      validation makes).
    """

    def __init__(self, schema: Schema, index: SchemaIndex) -> None:
        self.schema = schema
        self.index = index
        self._valid: _Valid | None = None
        self._lists: dict[tuple[str, ...], EntryScopedList] | None = None
        self._checked: _Checked | None = None
        self.counts: Counter[str] = Counter()
        """Full validations of configurations: 'whole', 'changed-entries' (incremental),
        'remembered' (the same bytes again); 'checked-entries': node-by-node checks of
        the changed entries only (:meth:`checked_nodes`); 'recorded': incremental
        validations of a candidate whose check had found its changes."""

    def forget_check_of(self, root: etree._Element) -> None:
        """Forget the last candidate check if it refers to ``root`` (a tree about to be
        changed in place: nc_core.spare_tree)."""
        record = self._checked
        if record is not None and (record.base is root or record.canonical is root):
            self._checked = None

    def validate(self, root: etree._Element, *, full: bool = True) -> Any:
        """Validate ``root`` as a configuration datastore; raise RpcErrors.

        full=False checks only what a node says about itself (types, ranges,
        patterns, unknown nodes): used for edits of the candidate, which may
        be incomplete until it is validated or committed (RFC 6241 8.3).
        The caller owns the returned libyang tree (``tree.free()``) and must not
        change it (a fully validated tree may be shared with other holders).
        """
        if not full:
            return self.parse_only(root)
        valid = self._valid
        if valid is not None and root is valid.canonical:
            self.counts["remembered"] += 1
            return valid.tree.handle()
        if valid is not None and valid.canonical is not None:
            quick = self._recorded(root, valid)
            if quick is not None:
                self.counts["changed-entries"] += 1
                return quick
        data = serialize(root)
        known = digest(data)
        if valid is not None and (valid.canonical_digest() == known or known in valid.inputs):
            self.counts["remembered"] += 1
            return valid.tree.handle()
        if valid is not None and valid.canonical is not None:
            found = self._entry_changes(valid.canonical, root, valid)
            quick = None if found is None else self._incremental(root, {known}, valid, found)
            if quick is not None:
                self.counts["changed-entries"] += 1
                return quick
        self.counts["whole"] += 1
        try:
            tree = self.schema.parse_config(data, "xml")
        except ValidationFailed as exc:
            raise validation_errors(exc, self.index) from None
        if tree is None:
            return None
        return self._remember(_Valid({known}, SharedTree(tree)))

    # -- incremental validation ---------------------------------------------------

    def _recorded(self, root: etree._Element, valid: _Valid) -> Any:
        """:meth:`_incremental` with the changes the candidate's check found, when
        ``root`` is that candidate (the same tree, or its bytes) and was checked against
        the remembered configuration: nothing to compare again."""
        record = self._checked
        if record is None or record.base is not valid.canonical:
            return None
        if root is not record.canonical:
            if serialize(root) != record.data():
                return None
        scoped = record.scoped
        old = valid.canonical
        assert old is not None
        before = self._entries_before(valid, old, scoped)
        parent = parent_of(root, scoped)
        changed = [
            find_entry(parent, scoped, key, near=before.position(key)) for key in record.changed
        ]
        if any(e is None for e in changed):
            return None
        found = _EntryChanges(
            scoped,
            [e for e in changed if e is not None],
            list(record.changed),
            set(record.removed),
            list(record.fresh),
            before,
            record.leaves,
        )
        quick = self._incremental(
            root, set(), valid, found, canonical_already=root is record.canonical
        )
        if quick is not None:
            self.counts["recorded"] += 1
        return quick

    def _incremental(
        self,
        root: etree._Element,
        inputs: set[bytes],
        valid: _Valid,
        found: _EntryChanges,
        *,
        canonical_already: bool = False,
    ) -> Any:
        """The tree of ``root`` validated through the changed entries of one entry-scoped
        list only (``found``), or None (nothing decided: validate it whole).

        The canonical form of the result is a copy of the remembered one with the
        changed entries as libyang prints them; or, with ``canonical_already`` (``root``
        is the candidate's check's canonical form, which nobody changes: datastore trees
        are replaced, never modified), ``root`` itself when its changed entries are what
        libyang prints: a whole copy of the configuration less per commit."""
        old = valid.canonical
        assert old is not None
        scoped, changed, keys, removed, fresh, before, leaves = found
        partial = _without_unchanged(root, scoped, changed)
        try:
            checked = self.schema.parse_config(serialize(partial), "xml")
        except ValidationFailed:
            return None  # full validation says what is wrong, in its words
        tree = None
        try:
            printed = self.canonical_of(checked)
            canonical = None
            made: list[etree._Element] | None = None  # the entries of ``keys`` in canonical
            if (
                canonical_already
                and _same_entries(changed, printed, scoped, keys)
                and _same_leaves(root, printed, scoped, leaves)
            ):
                canonical, made = root, changed
            if canonical is None:
                canonical = _patched_canonical(
                    old, scoped, printed, keys, removed, fresh, leaves, before
                )
            if canonical is None or not _unique_holds(canonical, keys, scoped, made):
                return None
            tree = self._patched_tree(valid, scoped, checked, keys, removed, fresh, leaves)
        finally:
            if tree is None:
                checked.free()  # else the pending tree owns it
        if tree is None:
            return None
        if made is None or remembered_patch(old, canonical) is None:
            # (The candidate's check remembered the patch from ``old`` to ``canonical``
            # already when ``canonical`` is the checked candidate.)
            differing = _changed_leaves(old, canonical, scoped, leaves)
            patch = (
                None
                if differing is None
                else _entry_patch(old, canonical, scoped, keys, removed, made, differing, before)
            )
            if patch is not None:
                remember_patch(patch)
        parent = parent_of(canonical, scoped)
        if made is None:
            found_entries = [find_entry(parent, scoped, key, before.position(key)) for key in keys]
            if any(e is None for e in found_entries):
                tree.release()
                return None
            made = [e for e in found_entries if e is not None]
        after = before.changed_to(
            parent,
            removed,
            {key: digest(etree.tostring(e)) for key, e in zip(keys, made, strict=True)},
        )
        return self._remember(_Valid(inputs, tree, canonical=canonical, lists={scoped.tags: after}))

    def checked_nodes(
        self,
        old: etree._Element,
        new: etree._Element,
        edit: etree._Element | None = None,
        default_operation: str = "merge",
        copy_of: etree._Element | None = None,
        *,
        owned: bool = False,
    ) -> tuple[etree._Element, bool]:
        """``new`` checked node by node (:meth:`parse_only`) and in canonical form, and
        whether it differs from ``old``, a canonical tree that passed the same check (the
        candidate before an edit); RpcErrors as parse_only's.

        When ``new`` differs from ``old`` in entries of one entry-scoped list only, only
        the changed entries are parsed and printed: nothing a node-by-node check finds
        can be anywhere else, and the first finding in the changed entries is the first
        in the whole document.  Anything found is reported by the check of the whole
        document, so the rpc-error is the one it always was.

        ``edit`` is the <config> of an <edit-config> that made ``new`` of ``old`` (with
        ``default_operation``): when it only merges entries of one such list into
        containers ``old`` has, the other entries are unchanged by what an edit is, and
        only those it names are looked at.  ``copy_of``: a tree ``old`` is an unchanged
        copy of (the running configuration a candidate follows, or that configuration's
        tree itself), so that it is known without comparing.

        ``owned``: ``new`` is the caller's private tree, a copy of ``old`` changed by
        ``edit``, which it hands over; when only the entries ``edit`` names were looked
        at, the result is ``new`` itself with those entries put in canonical form,
        instead of a copy of ``old`` with them (a whole copy of the configuration less
        per edit).  Otherwise ``new`` is only read."""
        quick = self._checked_entries(
            old, new, self._edited_entries(old, edit, default_operation), copy_of, owned=owned
        )
        if quick is not None:
            self.counts["checked-entries"] += 1
            return quick
        tree = self.parse_only(new)
        try:
            canonical = self.canonical(tree)
        finally:
            free(tree)
        return canonical, etree.tostring(old) != etree.tostring(canonical)

    def _edited_entries(
        self, old: etree._Element, edit: etree._Element | None, default_operation: str
    ) -> tuple[EntryScopedList, list[tuple[str, ...]], tuple[str, ...]] | None:
        """The list and the keys of the entries an edit names, and the free leaves beside
        them it names, when it names nothing else: no operation above them, containers
        ``old`` has (creating one could drop another case of a choice), keys written as
        they are stored."""
        if edit is None or default_operation == "replace":
            return None
        if self._lists is None:
            self._lists = entry_scoped_lists(self.index)
        top = [c for c in edit if isinstance(c.tag, str)]
        for scoped in self._lists.values():
            if not scoped.plain:
                continue
            level, held = top, old
            for tag in scoped.tags[:-1]:
                if len(level) != 1 or level[0].tag != tag or level[0].attrib:
                    break
                found = held.find(tag)
                if found is None:
                    break
                if len(level[0]) > FEW_ENTRIES * 2:
                    return None  # more than is worth looking at one by one
                level, held = [c for c in level[0] if isinstance(c.tag, str)], found
            else:
                leaves = tuple(c.tag for c in level if c.tag in scoped.free_leaves)
                level = [c for c in level if c.tag not in scoped.free_leaves]
                if len(level) > FEW_ENTRIES or not (level or leaves):
                    return None  # nothing, or more than is worth looking at one by one
                if any(c.tag != scoped.tags[-1] for c in level):
                    continue
                keys = []
                for entry in level:
                    key = []
                    for tag in scoped.keys:
                        leaf = entry.find(tag)
                        text = None if leaf is None else (leaf.text or "")
                        if text is None or text != text.strip() or len(leaf):  # type: ignore[arg-type]
                            return None
                        key.append(text)
                    keys.append(tuple(key))
                return (scoped, keys, leaves) if len(keys) <= FEW_ENTRIES else None
        return None

    def _named_changes(
        self,
        old: etree._Element,
        new: etree._Element,
        memo: _Valid | None,
        scoped: EntryScopedList,
        named: list[tuple[str, ...]],
        named_leaves: tuple[str, ...] = (),
    ) -> _EntryChanges | None:
        """:meth:`_entry_changes` when only the ``named`` entries and free leaves can have
        changed."""
        before = self._entries_before(memo, old, scoped)
        parent = parent_of(new, scoped)
        if parent is None:
            return None
        leaves = _differing_leaves(parent_of(old, scoped), parent, named_leaves)
        if leaves is None:
            return None
        changed: list[tuple[etree._Element, tuple[str, ...]]] = []
        removed: set[tuple[str, ...]] = set()
        fresh: list[tuple[etree._Element, tuple[str, ...]]] = []
        for key in dict.fromkeys(named):
            entry = find_entry(parent, scoped, key, near=before.position(key))
            if entry is None:
                if key in before:
                    removed.add(key)
            elif key not in before:
                fresh.append((entry, key))
            elif before.digest(key) != digest(etree.tostring(entry)):
                changed.append((entry, key))
        if fresh:
            last = parent.iterchildren(scoped.tags[-1], reversed=True)
            tail = [e for _, e in zip(fresh, last, strict=False)][::-1]
            order = {id(e): i for i, e in enumerate(tail)}
            if set(order) != {id(e) for e, _ in fresh}:
                return None  # new entries are not all after the others
            fresh.sort(key=lambda pair: order[id(pair[0])])
        changed.sort(key=lambda pair: parent.index(pair[0]))
        everything = changed + fresh
        return _EntryChanges(
            scoped,
            [e for e, _ in everything],
            [k for _, k in everything],
            removed,
            [k for _, k in fresh],
            before,
            leaves,
        )

    def _checked_entries(
        self,
        old: etree._Element,
        new: etree._Element,
        named: tuple[EntryScopedList, list[tuple[str, ...]], tuple[str, ...]] | None = None,
        copy_of: etree._Element | None = None,
        *,
        owned: bool = False,
    ) -> tuple[etree._Element, bool] | None:
        self._checked = None
        valid = self._valid
        memo = None
        if valid is not None and valid.canonical is not None:
            if (copy_of is not None and copy_of is valid.canonical) or valid.knows(old):
                memo = valid
        if named is not None:
            found = self._named_changes(old, new, memo, *named)
            if found is not None:
                self.counts["named-entries"] += 1
        else:
            found = self._entry_changes(old, new, memo)
        if found is None:
            return None
        scoped, changed, keys, removed, fresh, before, leaves = found
        partial = _without_unchanged(new, scoped, changed)
        try:
            tree = self.parse_only(partial)
        except RpcErrors:
            return None  # the whole document's check reports it
        try:
            printed = self.canonical_of(tree) if tree is not None else new_datastore()
        finally:
            free(tree)
        canonical = None
        made: list[etree._Element] | None = None  # the entries of ``keys`` in canonical
        if owned and named is not None:
            # Only the named entries can differ from ``old``: everything else in ``new`` is
            # the copy of ``old`` the edit was made on, canonical already.
            made = _canonical_entries_into(new, scoped, printed, keys, leaves, before)
            canonical = None if made is None else new
        if canonical is None:
            canonical = _patched_canonical(
                old, scoped, printed, keys, removed, fresh, leaves, before
            )
        if canonical is None:
            return None
        if made is None:
            parent = parent_of(canonical, scoped)
            found_entries = [find_entry(parent, scoped, key, before.position(key)) for key in keys]
            if any(e is None for e in found_entries):
                return None
            made = [e for e in found_entries if e is not None]
        differing = [
            key
            for key, entry in zip(keys, made, strict=True)
            if before.digest(key) != digest(etree.tostring(entry))
        ]
        changed_leaves = _changed_leaves(old, canonical, scoped, leaves)
        if changed_leaves is None:
            return None
        patch = _entry_patch(old, canonical, scoped, keys, removed, made, changed_leaves, before)
        if patch is not None:
            remember_patch(patch)
        if memo is not None and memo.canonical is not None:
            self._checked = _Checked(
                canonical,
                memo.canonical,
                scoped,
                tuple(differing),
                frozenset(removed),
                tuple(fresh),
                changed_leaves,
            )
        return canonical, bool(removed or differing or changed_leaves)

    def canonical_of(self, tree: Any) -> etree._Element:
        """:meth:`canonical` of a tree the memo does not know."""
        text = tree.print_mem("xml", with_siblings=True, pretty=False)
        return parse_message(f'<data xmlns="{NC_NS}">{text}</data>'.encode())

    def _patched_tree(
        self,
        valid: _Valid,
        scoped: EntryScopedList,
        checked: Any,
        keys: list[tuple[str, ...]],
        removed: set[tuple[str, ...]],
        fresh: list[tuple[str, ...]],
        leaves: tuple[str, ...] = (),
    ) -> SharedTree | None:
        """The remembered tree with the changed entries of ``checked`` in it, made when
        first needed (nc_core.shared_tree): in place once the remembered tree has no
        other holder, as when the next commit comes.  Takes ``checked`` over (freed with
        the patch), or None (``checked`` left to the caller) if an entry is not where it
        must be."""
        base = valid.tree
        base.made()  # the previous change, made now: one patch pending at a time
        for key in removed:
            if self._find(base.cdata, scoped, key) == ffi.NULL:
                return None
        for key in keys:
            if self._find(checked.cdata, scoped, key) == ffi.NULL:
                return None
            if key in fresh:
                if self._find_parent(base.cdata, scoped) == ffi.NULL:
                    return None
            elif self._find(base.cdata, scoped, key) == ffi.NULL:
                return None
        for tag in leaves:
            if ffi.NULL in (
                self._find_leaf(base.cdata, scoped, tag),
                self._find_leaf(checked.cdata, scoped, tag),
            ):
                return None
        fresh_keys = set(fresh)

        def apply(tree: Any, source: Any) -> None:
            self._patch_into(tree, source, scoped, keys, removed, fresh_keys, leaves)

        # Never a list at the top of the tree (entry_scoped_lists leaves those out): the
        # node a tree is held by is never an entry the patch removes.
        steps = self._list_steps(scoped)
        leaf_steps = tuple((*steps[:-1], self._step(tag)) for tag in leaves)
        return SharedTree.patched(base, Patch(base, checked, apply, steps, leaf_steps))

    def _patch_into(
        self,
        tree: Any,
        source_tree: Any,
        scoped: EntryScopedList,
        keys: list[tuple[str, ...]],
        removed: set[tuple[str, ...]],
        fresh: set[tuple[str, ...]],
        leaves: tuple[str, ...] = (),
    ) -> None:
        """Put the entries of ``keys`` in ``source_tree`` into ``tree`` (new ones after
        the others, changed ones in their place), remove those of ``removed``, and put
        the free ``leaves`` of ``source_tree`` in place of ``tree``'s; LookupError if one
        is not there."""
        node_p = ffi.new("struct lyd_node **")
        flags = lib.LYD_DUP_RECURSIVE | lib.LYD_DUP_WITH_FLAGS
        for tag in leaves:
            target = self._find_leaf(tree, scoped, tag)
            source = self._find_leaf(source_tree, scoped, tag)
            if target == ffi.NULL or source == ffi.NULL:
                raise LookupError(tag)
            parent = ffi.cast("struct lyd_node *", target.parent)
            if lib.lyd_dup_single(source, ffi.NULL, flags, node_p) != lib.LY_SUCCESS:
                raise LookupError(tag)
            lib.lyd_free_tree(target)
            # libyang puts a leaf among its siblings in schema order.
            if lib.lyd_insert_child(parent, node_p[0]) != lib.LY_SUCCESS:
                lib.lyd_free_tree(node_p[0])
                raise LookupError(tag)
        for key in removed:
            node = self._find(tree, scoped, key)
            if node == ffi.NULL:
                raise LookupError(key)
            lib.lyd_free_tree(node)
        for key in keys:
            source = self._find(source_tree, scoped, key)
            if source == ffi.NULL:
                raise LookupError(key)
            target = self._find(tree, scoped, key) if key not in fresh else ffi.NULL
            if target == ffi.NULL:
                # A new entry goes after the others, as parsing puts it.
                parent = self._find_parent(tree, scoped)
                if parent == ffi.NULL:
                    raise LookupError(key)
                if lib.lyd_dup_single(source, ffi.NULL, flags, node_p) != lib.LY_SUCCESS:
                    raise LookupError(key)
                if lib.lyd_insert_child(parent, node_p[0]) != lib.LY_SUCCESS:
                    lib.lyd_free_tree(node_p[0])
                    raise LookupError(key)
                continue
            # A changed entry keeps its place: its children are replaced.
            child = lib.lyd_child(target)
            while child != ffi.NULL:
                following = child.next
                if not (child.schema != ffi.NULL and child.schema.flags & lib.LYS_KEY):
                    lib.lyd_free_tree(child)
                child = following
            child = lib.lyd_child(source)
            while child != ffi.NULL:
                if not (child.schema != ffi.NULL and child.schema.flags & lib.LYS_KEY):
                    if lib.lyd_dup_single(child, ffi.NULL, flags, node_p) != lib.LY_SUCCESS:
                        raise LookupError(key)
                    if lib.lyd_insert_child(target, node_p[0]) != lib.LY_SUCCESS:
                        lib.lyd_free_tree(node_p[0])
                        raise LookupError(key)
                child = child.next

    def _list_steps(self, scoped: EntryScopedList) -> tuple[tuple[str, str], ...]:
        return tuple(self._step(tag) for tag in scoped.tags)

    def _step(self, tag: str) -> tuple[str, str]:
        """(module, name) of a Clark tag."""
        ns, _, name = tag[1:].partition("}")
        return self.index.namespaces[ns], name

    def _find(self, tree: Any, scoped: EntryScopedList, key: tuple[str, ...]) -> Any:
        path = self._list_path(scoped) + "".join(
            f"[{name}={_quoted(value)}]"
            for name, value in zip(self._key_names(scoped), key, strict=True)
        )
        return self._find_path(tree, path)

    def _find_leaf(self, tree: Any, scoped: EntryScopedList, tag: str) -> Any:
        """A free leaf beside the list's entries (ffi.NULL: not there)."""
        parent_path = self._list_path(scoped).rpartition("/")[0]
        ns, _, name = tag[1:].partition("}")
        module = self.index.namespaces[ns]
        return self._find_path(tree, f"{parent_path}/{module}:{name}")

    def _find_parent(self, tree: Any, scoped: EntryScopedList) -> Any:
        return self._find_path(tree, self._list_path(scoped).rpartition("/")[0])

    def _find_path(self, tree: Any, path: str) -> Any:
        """The node at the data path ``path`` in ``tree`` (ffi.NULL: not there)."""
        node_p = ffi.new("struct lyd_node **")
        if lib.lyd_find_path(tree, path.encode(), 0, node_p) != lib.LY_SUCCESS:
            lib.ly_err_clean(self.schema.ctx.cdata, ffi.NULL)
            return ffi.NULL
        return node_p[0]

    def _list_path(self, scoped: EntryScopedList) -> str:
        steps = []
        module = None
        for tag in scoped.tags:
            ns, _, name = tag[1:].partition("}")
            mod = self.index.namespaces[ns]
            steps.append(f"{mod}:{name}" if mod != module else name)
            module = mod
        return "/" + "/".join(steps)

    def _key_names(self, scoped: EntryScopedList) -> list[str]:
        return [tag.partition("}")[2] for tag in scoped.keys]

    def _entries_before(
        self, valid: _Valid | None, old: etree._Element, scoped: EntryScopedList
    ) -> ListEntries:
        """The entries of ``old`` by key, with their digests (:func:`digest`) as they are
        asked for (kept with the memo's canonical form, which ``old`` must be when
        ``valid`` is given)."""
        if valid is not None:
            cached = valid.lists.get(scoped.tags)
            if cached is not None:
                return cached
        made = ListEntries(parent_of(old, scoped), scoped)
        if valid is not None:
            valid.lists[scoped.tags] = made
        return made

    def _entry_changes(
        self, old: etree._Element, new: etree._Element, valid: _Valid | None
    ) -> _EntryChanges | None:
        """How ``new`` differs from ``old`` in the entries of one entry-scoped list, found
        by comparing them; None if it differs anywhere else, or moved entries."""
        if self._lists is None:
            self._lists = entry_scoped_lists(self.index)
        change = _entry_change(old, new, self._lists)
        if change is None:
            return None
        scoped, _, new_parent, leaves = change
        entries = self._entries_before(valid, old, scoped)
        before = entries.digests()
        now = entries_of(new_parent, scoped)
        if abs(len(now) - len(before)) > FEW_ENTRIES:
            return None
        keys = [key_of(e, scoped) for e in now]
        if len(set(keys)) != len(keys) or any(not all(k) for k in keys):
            return None  # duplicate or missing keys: the whole check names them
        present = set(keys)
        kept = [k for k in keys if k in before]
        if [k for k in before if k in present] != kept:
            return None  # entries moved
        fresh = [k for k in keys if k not in before]
        if fresh and keys[-len(fresh) :] != fresh:
            return None  # new entries elsewhere than after the others
        changed = [
            (e, k)
            for e, k in zip(now, keys, strict=True)
            if before.get(k) != digest(etree.tostring(e))
        ]
        if len(changed) + len(before) - len(kept) > FEW_ENTRIES:
            return None
        return _EntryChanges(
            scoped,
            [e for e, _ in changed],
            [k for _, k in changed],
            set(before) - present,
            fresh,
            entries,
            leaves,
        )

    def _remember(self, valid: _Valid) -> Any:
        forgotten, self._valid = self._valid, valid
        if forgotten is not None:
            # Its canonical form and entries go with it: after the reply (nc_core.release).
            drop_later(forgotten)
            free_later(Release(forgotten.tree))
        return valid.tree.handle()

    def _is_remembered(self, tree: Any) -> bool:
        valid = self._valid
        if valid is None:
            return False
        shared = getattr(tree, "shared_tree", None)
        if shared is not None:
            return shared is valid.tree  # without making a pending tree (shared_tree)
        return tree.cdata is not None and tree.cdata == valid.tree.made()

    def parse_only(self, root: etree._Element, *, state: bool = False) -> Any:
        """Parse without semantic validation (no must/when/leafref/mandatory checks)."""
        import libyang

        try:
            try:
                return self.schema.ctx.parse_data_mem(
                    serialize(root), "xml", no_state=not state, strict=True, parse_only=True
                )
            except libyang.LibyangError as exc:
                raise ValidationFailed(self.schema.ctx.take_issues(str(exc))) from exc
        except ValidationFailed as exc:
            raise validation_errors(exc, self.index) from None

    def canonical(self, tree: Any) -> etree._Element:
        """The datastore tree libyang would print: canonical values, explicit nodes only.

        For a tree :meth:`validate` returned, the result may be shared with other callers
        (the running configuration): callers must not change it in place."""
        root = new_datastore()
        if tree is None:
            return root
        valid = self._valid
        mine = valid is not None and self._is_remembered(tree)
        if mine and valid is not None and valid.canonical is not None:
            return valid.canonical  # shared: see _Valid.canonical
        text = tree.print_mem("xml", with_siblings=True, pretty=False)
        if text:
            wrapped = f'<data xmlns="{NC_NS}">{text}</data>'.encode()
            try:
                parsed = parse_message(wrapped)
            except XmlRejected as exc:  # pragma: no cover - libyang output is well formed
                raise RuntimeError(f"libyang printed unparsable XML: {exc}") from exc
            root = parsed
        if mine and valid is not None:
            valid.canonical = root
            valid.lists = {}
        return root

    def load_document(self, path: Path) -> etree._Element:
        """An instance document (XML, or RFC 7951 JSON by its suffix) as a datastore tree in
        canonical form; RpcErrors when it does not conform to the schema."""
        try:
            tree = self.schema.parse_config_file(path)
        except ValidationFailed as exc:
            raise validation_errors(exc, self.index) from None
        try:
            return self.canonical(tree)
        finally:
            free(tree)

    def load(self, data: bytes, origin: str) -> tuple[etree._Element, Any]:
        """Read a persisted datastore and validate it fully; ``origin`` names it in errors."""
        try:
            root = parse_message(data)
        except XmlRejected as exc:
            raise RuntimeError(f"{origin}: {exc}") from exc
        if root.tag != qn(NC_NS, "data"):
            raise RuntimeError(f"{origin}: not a datastore document (root is {root.tag})")
        try:
            tree = self.validate(root)
        except RpcErrors as exc:
            raise RuntimeError(f"{origin}: stored configuration no longer valid: {exc}") from exc
        return self.canonical(tree), tree


class _EntryChanges(NamedTuple):
    """How a configuration differs from the one before in the entries of one entry-scoped
    list (and in leaves beside them that nothing reads)."""

    scoped: EntryScopedList
    changed: list[etree._Element]
    """Its changed or new entries."""
    keys: list[tuple[str, ...]]
    """Their keys."""
    removed: set[tuple[str, ...]]
    """The removed keys."""
    fresh: list[tuple[str, ...]]
    """The new keys, in order (after all others)."""
    before: ListEntries
    """The entries before, by key, with their digests."""
    leaves: tuple[str, ...] = ()
    """Tags of the leaves of ``scoped.free_leaves`` whose value differs."""


@dataclass
class _Checked:
    """What the last check of the candidate found (Validator.checked_nodes)."""

    canonical: etree._Element
    """The checked candidate (canonical), as handed out."""
    base: etree._Element
    """The remembered canonical configuration it was an edit of."""
    scoped: EntryScopedList
    changed: tuple[tuple[str, ...], ...]
    """Keys of the entries it added or changed (their canonical form differs)."""
    removed: frozenset[tuple[str, ...]]
    fresh: tuple[tuple[str, ...], ...]
    leaves: tuple[str, ...] = ()
    """Tags of the free leaves whose canonical value it changed."""
    _data: bytes | None = None

    def data(self) -> bytes:
        """The checked candidate serialised (for a copy of it, made when first needed)."""
        if self._data is None:
            self._data = serialize(self.canonical)
        return self._data


def _entry_patch(
    old: etree._Element,
    new: etree._Element,
    scoped: EntryScopedList,
    keys: list[tuple[str, ...]],
    removed: set[tuple[str, ...]],
    made: list[etree._Element] | None = None,
    leaves: tuple[str, ...] = (),
    before: ListEntries | None = None,
) -> EntryPatch | None:
    """What :func:`nc_core.edit.diff` needs to compare ``old`` and ``new`` (the patched
    canonical form of a change) by their changed entries (and free ``leaves``) only;
    ``made``: the entries of ``keys`` in ``new``, when known; ``before``: the entries of
    ``old``, when known."""
    old_parent, new_parent = parent_of(old, scoped), parent_of(new, scoped)
    if old_parent is None or new_parent is None:
        return None
    pairs = [(old_parent.find(tag), new_parent.find(tag)) for tag in leaves]
    if any(a is None or b is None for a, b in pairs):
        return None
    if before is None or before.parent is not old_parent:
        before = ListEntries(old_parent, scoped)
    gone = [before.find(key) for key in removed]
    changed: list[etree._Element | None] = (
        list(made)
        if made is not None
        else [find_entry(new_parent, scoped, key, before.position(key)) for key in keys]
    )
    previous = [before.find(key) for key in keys]
    if any(e is None for e in gone) or any(e is None for e in changed):
        return None
    return EntryPatch(
        old,
        new,
        scoped.tags,
        tuple(sorted((e for e in gone if e is not None), key=old_parent.index)),
        tuple(e for e in changed if e is not None),
        tuple(previous),
        tuple(
            sorted(
                ((a, b) for a, b in pairs if a is not None and b is not None),
                key=lambda pair: new_parent.index(pair[1]),
            )
        ),
    )


FEW_ENTRIES = 32
"""Entries a change may add, change or remove for them to be validated apart: each costs a
look-up among all entries, so past a few the whole configuration is cheaper (a
10,000-entry edit is validated whole)."""


def _quoted(value: str) -> str:
    return f"'{value}'" if "'" not in value else f'"{value}"'


def _entry_change(
    old: etree._Element,
    new: etree._Element,
    lists: dict[tuple[str, ...], EntryScopedList],
) -> tuple[EntryScopedList, etree._Element, etree._Element, tuple[str, ...]] | None:
    """The entry-scoped list in whose entries alone ``new`` differs from ``old`` (both
    datastore roots), with its parent in each, and the tags of the free leaves beside
    them whose values differ; None if the difference is anywhere else (or in the entries
    of more than one list).  Two equal roots may give a list (whose entries then show no
    change) rather than None: either way nothing needs checking."""
    path: list[str] = []
    o, n = old, new
    while True:
        o_children = [c for c in o if isinstance(c.tag, str)]
        n_children = [c for c in n if isinstance(c.tag, str)]
        entry_tag = None
        scoped = None
        leaves: tuple[str, ...] | None = None
        for candidate in lists.values():
            if candidate.tags[:-1] == tuple(path):
                o_others = [c for c in o_children if c.tag != candidate.tags[-1]]
                n_others = [c for c in n_children if c.tag != candidate.tags[-1]]
                leaves = _same_but_free_leaves(o_others, n_others, candidate.free_leaves)
                if leaves is not None and _contiguous(n_children, candidate.tags[-1]):
                    entry_tag, scoped = candidate.tags[-1], candidate
                    break
        if entry_tag is not None and scoped is not None and leaves is not None:
            return scoped, o, n, leaves
        if [c.tag for c in o_children] != [c.tag for c in n_children]:
            return None
        pairs = list(zip(o_children, n_children, strict=True))
        below = len(path) + 1
        # Children under which an entry-scoped list lies, and the others.  Only the others
        # are serialised to be compared: a difference in one of them can be no entry's.
        # The one child that leads to the lists is then gone into without comparing it (at
        # 1,000 peers it is the CE's whole configuration, 0.8 MB written out twice per
        # check); if it does not differ either, the lists' entries are found unchanged.
        leading = {
            id(b) for _, b in pairs if any(c.tags[:below] == (*path, b.tag) for c in lists.values())
        }
        if any(etree.tostring(a) != etree.tostring(b) for a, b in pairs if id(b) not in leading):
            return None
        candidates = [(a, b) for a, b in pairs if id(b) in leading]
        if len(candidates) > 1:
            candidates = [(a, b) for a, b in candidates if etree.tostring(a) != etree.tostring(b)]
        if len(candidates) != 1:
            return None
        o, n = candidates[0]
        path.append(str(n.tag))
        if not any(c.tags[: len(path)] == tuple(path) for c in lists.values()):
            return None


def _same_but_free_leaves(
    a: list[etree._Element], b: list[etree._Element], free: frozenset[str]
) -> tuple[str, ...] | None:
    """The tags of the free leaves (:attr:`EntryScopedList.free_leaves`) in which the
    nodes ``a`` and ``b`` differ, present in both with another value; None if they differ
    otherwise."""
    if len(a) != len(b):
        return None
    leaves = []
    for x, y in zip(a, b, strict=True):
        if x.tag != y.tag:
            return None
        if etree.tostring(x) == etree.tostring(y):
            continue
        if x.tag not in free or not _plain_leaf(x) or not _plain_leaf(y):
            return None
        leaves.append(str(y.tag))
    return tuple(leaves)


def _plain_leaf(leaf: etree._Element) -> bool:
    """A leaf with a value, as a datastore holds it: no children, no attributes."""
    return len(leaf) == 0 and not leaf.attrib and bool(leaf.text)


def _differing_leaves(
    old_parent: etree._Element | None, new_parent: etree._Element, tags: tuple[str, ...]
) -> tuple[str, ...] | None:
    """Of the free leaves ``tags`` (children of the list's parent in each tree), those
    whose values differ; None if one is not a single plain leaf in both."""
    if old_parent is None:
        return None
    differing = []
    for tag in dict.fromkeys(tags):
        before, now = old_parent.findall(tag), new_parent.findall(tag)
        if len(before) != 1 or len(now) != 1:
            return None
        if not (_plain_leaf(before[0]) and _plain_leaf(now[0])):
            return None
        if before[0].text != now[0].text:
            differing.append(tag)
    return tuple(differing)


def _changed_leaves(
    old: etree._Element, new: etree._Element, scoped: EntryScopedList, tags: tuple[str, ...]
) -> tuple[str, ...] | None:
    """:func:`_differing_leaves` between two canonical datastores."""
    new_parent = parent_of(new, scoped)
    if new_parent is None:
        return None if tags else ()
    return _differing_leaves(parent_of(old, scoped), new_parent, tags)


def _same_leaves(
    mine: etree._Element, checked: etree._Element, scoped: EntryScopedList, tags: tuple[str, ...]
) -> bool:
    """Whether the free leaves ``tags`` of ``mine`` are exactly as ``checked`` has them."""
    if not tags:
        return True
    parent, printed = parent_of(mine, scoped), parent_of(checked, scoped)
    if parent is None or printed is None:
        return False
    for tag in tags:
        a, b = parent.find(tag), printed.find(tag)
        if a is None or b is None or etree.tostring(a) != etree.tostring(b):
            return False
    return True


def _put_leaves(parent: etree._Element, printed: etree._Element, tags: tuple[str, ...]) -> bool:
    """Put the leaves ``tags`` of ``printed`` (moved out of it) in place of those of
    ``parent``; False, ``parent`` unchanged, if one is missing."""
    pairs = [(parent.find(tag), printed.find(tag)) for tag in tags]
    if any(a is None or b is None for a, b in pairs):
        return False
    for a, b in pairs:
        assert a is not None and b is not None
        b.tail = a.tail
        a.addnext(b)
        parent.remove(a)
    return True


def _contiguous(children: list[etree._Element], tag: str) -> bool:
    places = [i for i, c in enumerate(children) if c.tag == tag]
    return not places or places[-1] - places[0] + 1 == len(places)


def _unique_holds(
    canonical: etree._Element,
    keys: list[tuple[str, ...]],
    scoped: EntryScopedList,
    made: list[etree._Element] | None = None,
) -> bool:
    """No changed entry of ``canonical`` (a whole canonical datastore) shares the values
    of a ``unique`` statement with another entry (the unchanged ones were valid among
    themselves); canonical values are equal exactly when their text is.  ``made``: the
    entries of ``keys`` in ``canonical``, when known."""
    if not scoped.uniques or not keys:
        return True
    parent = parent_of(canonical, scoped)
    if parent is None:
        return False
    for position, key in enumerate(keys):
        entry = made[position] if made is not None else find_entry(parent, scoped, key)
        if entry is None:
            return False
        for unique in scoped.uniques:
            values = []
            for leaf_path in unique:
                leaf = entry.find("/".join(leaf_path))
                if leaf is None:
                    break
                values.append(leaf.text or "")
            else:
                count = counter(scoped, unique)(
                    parent, **{f"v{i}": v for i, v in enumerate(values)}
                )
                if count != 1:
                    return False
    return True


def _without_unchanged(
    root: etree._Element, scoped: EntryScopedList, changed: list[etree._Element]
) -> etree._Element:
    """``root`` without the entries of ``scoped`` that are not in ``changed`` (entries of
    ``root``): copied down the list's path, the rest shared by deep copies of small
    subtrees.  The list's parent's other children are found by an XPath: looking at each
    of 1,000 entries from Python to pass it over cost more than the rest."""
    out = etree.Element(root.tag, nsmap=root.nsmap)  # type: ignore[arg-type]
    src, dst = root, out
    for depth, tag in enumerate(scoped.tags):
        last = depth == len(scoped.tags) - 1
        next_src = None
        if last:
            others = _others(scoped)(src)
            kept = [c for c in others if isinstance(c, etree._Element)]  # type: ignore[union-attr]
            kept += [e for e in changed if e.getparent() is src]
            kept.sort(key=src.index)
            for child in kept:
                dst.append(deepcopy(child))
            break
        for child in src:
            if not isinstance(child.tag, str):
                continue
            if child.tag == tag and next_src is None:
                next_src = child
                shell = etree.SubElement(dst, child.tag, nsmap=child.nsmap)  # type: ignore[arg-type]
                next_dst = shell
            else:
                dst.append(deepcopy(child))
        if next_src is None:
            break
        src, dst = next_src, next_dst
    return out


_OTHERS: dict[tuple[str, ...], etree.XPath] = {}


def _others(scoped: EntryScopedList) -> etree.XPath:
    """An XPath selecting the children of the list's parent that are not its entries."""
    found = _OTHERS.get(scoped.tags)
    if found is None:
        ns, _, name = scoped.tags[-1][1:].partition("}")
        found = _OTHERS[scoped.tags] = etree.XPath(f"*[not(self::n:{name})]", namespaces={"n": ns})
    return found


def _patched_canonical(
    old: etree._Element,
    scoped: EntryScopedList,
    checked: etree._Element,
    keys: list[tuple[str, ...]],
    removed: set[tuple[str, ...]],
    fresh: list[tuple[str, ...]],
    leaves: tuple[str, ...] = (),
    before: ListEntries | None = None,
) -> etree._Element | None:
    """``old``'s canonical form with the canonical entries of ``checked`` in place of the
    changed ones, new ones after the others, removed ones gone, and its free ``leaves``;
    None if an entry or leaf is not where it should be.  ``before``: the entries of
    ``old``, whose positions are those of its copy until one is taken out (so the removed
    ones go last)."""
    out = deepcopy(old)
    parent = parent_of(out, scoped)
    printed = parent_of(checked, scoped)
    if parent is None or printed is None or not _put_leaves(parent, printed, leaves):
        return None
    if before is None:
        before = ListEntries(parent_of(old, scoped), scoped)
    new_keys = set(fresh)
    for key in keys:
        entry = find_entry(printed, scoped, key)
        if entry is None:
            return None
        if key in new_keys:
            last = next(parent.iterchildren(scoped.tags[-1], reversed=True), None)
            if last is not None:
                last.addnext(entry)
            else:
                _insert_in_schema_order(parent, entry, checked, scoped)
            continue
        replaced = find_entry(parent, scoped, key, before.position(key))
        if replaced is None:
            return None
        replaced.addnext(entry)
        parent.remove(replaced)
    for key in removed:
        gone = find_entry(parent, scoped, key, before.position(key))
        if gone is None:
            return None
        parent.remove(gone)
    return out


def _same_entries(
    mine: list[etree._Element],
    checked: etree._Element,
    scoped: EntryScopedList,
    keys: list[tuple[str, ...]],
) -> bool:
    """Whether ``mine``, the entries of these keys, are each exactly as ``checked`` has it."""
    printed = parent_of(checked, scoped)
    for entry, key in zip(mine, keys, strict=True):
        theirs = find_entry(printed, scoped, key)
        if theirs is None or etree.tostring(entry) != etree.tostring(theirs):
            return False
    return True


def _canonical_entries_into(
    new: etree._Element,
    scoped: EntryScopedList,
    checked: etree._Element,
    keys: list[tuple[str, ...]],
    leaves: tuple[str, ...] = (),
    before: ListEntries | None = None,
) -> list[etree._Element] | None:
    """Replace, in place, the entries of these keys in ``new`` (a private tree) by their
    canonical form printed in ``checked``, and return them (in the order of ``keys``),
    and the free ``leaves`` likewise; None, ``new`` unchanged, if one is not found.
    ``before``: the entries of the tree ``new`` is an edited copy of (where to look
    first).

    Removed entries are gone from ``new`` already and new ones are where the edit put
    them: after the others (checked before) or, for a list that had none, wherever the
    edit put it, so that case is left to :func:`_patched_canonical`."""
    parent = parent_of(new, scoped)
    printed = parent_of(checked, scoped)
    if parent is None or printed is None:
        return None
    pairs = []
    for key in keys:
        entry = find_entry(printed, scoped, key)
        replaced = find_entry(parent, scoped, key, None if before is None else before.position(key))
        if entry is None or replaced is None:
            return None
        pairs.append((replaced, entry))
    if pairs and len(entries_of(parent, scoped)) == len(pairs):
        return None  # no entry was there before: its place among the parent's children
    if any(parent.find(t) is None or printed.find(t) is None for t in leaves):
        return None
    _put_leaves(parent, printed, leaves)
    for replaced, entry in pairs:
        entry.tail = None
        replaced.addnext(entry)
        parent.remove(replaced)
    return [entry for _, entry in pairs]


def _insert_in_schema_order(
    parent: etree._Element, entry: etree._Element, checked: etree._Element, scoped: EntryScopedList
) -> None:
    """The first entry of a list: where libyang printed it among the parent's children."""
    printed = parent_of(checked, scoped)
    assert printed is not None
    before = [c.tag for c in printed if isinstance(c.tag, str)]
    position = before.index(entry.tag)
    following = set(before[position + 1 :]) - {entry.tag}
    for child in parent:
        if isinstance(child.tag, str) and child.tag in following:
            child.addprevious(entry)
            return
    parent.append(entry)
