"""Three-way merge of datastore trees: a candidate's own changes onto the current running.

A ``<commit>`` used to replace running with the candidate wholesale.  The
candidate is a copy of running taken when a client first edits it, so every
change running acknowledged after that moment (another session's edit of
running, the VPN server enrolling a CE) was silently reverted by the commit.
:func:`merge3` instead takes running as it is now and applies only what the
candidate changed relative to the running it was taken from.  Where both
sides changed the same node differently there is no right answer, so the
merge refuses with :class:`MergeConflict`, which names every such node and
builds the rpc-error the server sends.

Nodes are matched by schema identity -- list entries by their keys,
leaf-list entries by value, containers and leaves by name -- as
:func:`nc_core.edit.diff` does, never by position.  The merge is pure: it
reads its three inputs (running's tree is shared read-only) and returns a
new tree.  It does not validate: the caller validates the result with
libyang like any other new running, because two independently valid
changes can still combine into invalid data (a leafref to an entry the
other side deleted, a must expression over both).

Cost is linear in the size of the trees: siblings are indexed by identity
in dicts, and a subtree whose serialised bytes are equal on two sides is
decided without being walked (a 10,000-entry list where one entry changed
on each side walks only those two entries' subtrees).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from copy import deepcopy
from dataclasses import dataclass
from typing import Any

from lxml import etree

from nc_core.edit import instance_identity, instance_path, new_datastore, schema_of
from nc_core.errors import RpcError
from nc_core.schema import SchemaIndex, SchemaNode
from nc_core.xmlutil import NC_NS, local, namespace, qn

__all__ = ["Conflict", "MergeConflict", "merge3"]

Key = tuple[str, tuple[str, ...]]
"""A child's identity among its siblings: (Clark tag, key values / leaf-list value / ())."""

_Indexed = dict[Key, tuple[etree._Element, SchemaNode | None]]

_LEAFLIKE = frozenset({"leaf", "anydata", "anyxml"})

MESSAGE_PATHS = 3
"""How many conflicting paths the error message names before saying 'and N more'."""


@dataclass(frozen=True, eq=False)
class Conflict:
    """One node both sides changed in ways that cannot both hold."""

    element: etree._Element
    """The node in running-now (theirs) if it exists there, else in the candidate
    (mine); its ancestors reach the <data> root, so a path with keys can be built."""
    reason: str
    """What each side did, for logs and tests."""
    path: str
    """Absolute XPath with module-name prefixes (RFC 6241 error-path)."""
    path_ns: Mapping[str, str]
    """The prefixes ``path`` uses."""
    readable: str
    """The path as a person reads it: ``/vpn-service/vpn[id='acme']/customer``."""


class MergeConflict(Exception):
    """Running changed since the candidate was taken, where the candidate changed too.

    Carries every conflict found (the merge does not stop at the first), so a
    client learns all it must redo in one round trip.
    """

    def __init__(self, conflicts: Sequence[Conflict]) -> None:
        if not conflicts:
            raise ValueError("a MergeConflict needs at least one conflict")
        self.conflicts = list(conflicts)
        super().__init__(self.message())

    @property
    def paths(self) -> list[str]:
        return [c.path for c in self.conflicts]

    def message(self) -> str:
        names = [c.readable for c in self.conflicts]
        shown = names[:MESSAGE_PATHS]
        rest = len(names) - len(shown)
        if len(shown) == 1:
            where = shown[0]
        elif rest:
            where = ", ".join(shown) + f" and {rest} more place{'s' if rest > 1 else ''}"
        else:
            where = ", ".join(shown[:-1]) + f" and {shown[-1]}"
        several = len(names) > 1
        return (
            f"Running changed at {where} since the candidate was taken (by another session "
            f"or the server itself); your change{'s' if several else ''} there would revert "
            f"{'them' if several else 'it'}. Use <discard-changes> and make your edit again, "
            "or edit running directly."
        )

    def rpc_error(self) -> RpcError:
        """The rpc-error a refused <commit> replies with; error-path is the first conflict."""
        first = self.conflicts[0]
        return RpcError(
            "operation-failed",
            self.message(),
            type="application",
            app_tag="running-changed",
            path=first.path if first.path != "/" else None,
            path_ns=dict(first.path_ns) if first.path != "/" else {},
        )


def merge3(
    base: etree._Element,
    mine: etree._Element,
    theirs: etree._Element,
    index: SchemaIndex,
) -> etree._Element:
    """``theirs`` with ``mine``'s changes relative to ``base`` applied, as a new tree.

    ``base`` is running when the candidate was taken, ``mine`` the candidate,
    ``theirs`` running now; all are ``<data>`` datastore roots in canonical
    form and none is modified.  Raises :class:`MergeConflict` naming every
    node both sides changed differently.
    """
    merger = _Merger(index)
    result = new_datastore()
    merger.children(base, mine, theirs, None, result)
    if merger.conflicts:
        raise MergeConflict(merger.conflicts)
    return result


class _Merger:
    def __init__(self, index: SchemaIndex) -> None:
        self.index = index
        self.conflicts: list[Conflict] = []

    # -- one level of siblings ------------------------------------------------------

    def children(
        self,
        base: etree._Element | None,
        mine: etree._Element | None,
        theirs: etree._Element | None,
        parent_snode: SchemaNode | None,
        out: etree._Element,
    ) -> None:
        """Merge the children of three versions of one node into ``out``.

        A missing version (None) has no children: a non-presence container
        that one side emptied, or an entry that did not exist in base.
        """
        b_idx = self._index(base, parent_snode)
        m_idx = self._index(mine, parent_snode)
        t_idx = self._index(theirs, parent_snode)
        keys = list(t_idx)
        keys += [k for k in m_idx if k not in t_idx]
        keys += [k for k in b_idx if k not in t_idx and k not in m_idx]

        merged: dict[Key, tuple[etree._Element, etree._Element, SchemaNode | None]] = {}
        for key in keys:
            b = b_idx.get(key)
            m = m_idx.get(key)
            t = t_idx.get(key)
            snode = next(x[1] for x in (t, m, b) if x is not None)
            node = self._node(
                None if b is None else b[0],
                None if m is None else m[0],
                None if t is None else t[0],
                snode,
            )
            if node is not None:
                merged[key] = (*node, snode)

        order = _interleave(list(t_idx), list(m_idx), merged.keys())
        order = self._user_order(order, b_idx, m_idx, t_idx, merged, theirs, mine)
        self._check_cases(order, merged)
        for key in order:
            out.append(merged[key][0])

    def _index(self, parent: etree._Element | None, parent_snode: SchemaNode | None) -> _Indexed:
        out: _Indexed = {}
        if parent is None:
            return out
        seen: dict[str, int] = {}
        # Looked up once per tag, not per child: a 10,000-entry list has one tag.
        snodes: dict[str, tuple[SchemaNode | None, tuple[str, ...]]] = {}
        for child in parent:
            if not isinstance(child.tag, str):
                continue
            found = snodes.get(child.tag)
            if found is None:
                snode = schema_of(self.index, parent_snode, child)
                key_tags = _key_tags(snode)
                snodes[child.tag] = (snode, key_tags)
            else:
                snode, key_tags = found
            if snode is not None:
                ident = _identity(child, snode, key_tags)
            else:
                # No schema node (invalid data): an opaque subtree, matched by
                # its position among same-named siblings so none is dropped.
                count = seen.get(child.tag, 0)
                seen[child.tag] = count + 1
                ident = (f"#{count}",)
            out[(child.tag, ident)] = (child, snode)
        return out

    # -- one node --------------------------------------------------------------------

    def _node(
        self,
        b: etree._Element | None,
        m: etree._Element | None,
        t: etree._Element | None,
        snode: SchemaNode | None,
    ) -> tuple[etree._Element, etree._Element] | None:
        """The merged node and the input element it stands for, or None if absent."""
        if _same(m, b, snode):
            return None if t is None else (_copy(t), t)
        if _same(t, b, snode):
            return None if m is None else (_copy(m), m)
        if _same(m, t, snode):  # the same change on both sides, deletion included
            return None if t is None else (_copy(t), t)
        if _interior(snode, m, t):
            assert snode is not None
            source = t if t is not None else m
            assert source is not None
            shell = _shell(source)
            self.children(b, m, t, snode, shell)
            if len(shell) == 0 and snode.kind == "container" and not snode.presence:
                return None
            return shell, source
        self._conflict(t if t is not None else m, _reason(b, m, t))
        return None

    def _conflict(self, element: etree._Element | None, reason: str) -> None:
        assert element is not None
        path, path_ns = instance_path(element, self.index)
        self.conflicts.append(
            Conflict(element, reason, path, path_ns, _readable_path(element, self.index))
        )

    # -- order of siblings -----------------------------------------------------------

    def _user_order(
        self,
        order: list[Key],
        b_idx: _Indexed,
        m_idx: _Indexed,
        t_idx: _Indexed,
        merged: Mapping[Key, tuple[etree._Element, etree._Element, SchemaNode | None]],
        theirs: etree._Element | None,
        mine: etree._Element | None,
    ) -> list[Key]:
        """The order of each ordered-by user list or leaf-list among ``order``'s keys.

        Running's order, unless only the candidate reordered the list: then
        the candidate's.  Only entries present in all three versions say
        whether a side reordered; an entry one side added is placed after its
        preceding sibling on that side (see _interleave).
        """
        tags = {k[0] for k, (_, _, s) in merged.items() if s is not None and s.user_ordered}
        for tag in sorted(tags):

            def surviving(idx: _Indexed, tag: str = tag) -> list[Key]:
                return [k for k in idx if k[0] == tag and k in b_idx and k in m_idx and k in t_idx]

            in_base, in_mine, in_theirs = surviving(b_idx), surviving(m_idx), surviving(t_idx)
            tagged_mine = [k for k in m_idx if k[0] == tag]
            tagged_theirs = [k for k in t_idx if k[0] == tag]
            if in_mine == in_base:
                primary, secondary = tagged_theirs, tagged_mine
            elif in_theirs in (in_base, in_mine):
                primary, secondary = tagged_mine, tagged_theirs
            else:
                snode = merged[in_mine[0]][2]
                what = snode.path if snode is not None else local(tag)
                parent = theirs if theirs is not None else mine
                self._conflict(
                    parent,
                    f"the ordered-by user list {what} was reordered differently on both sides",
                )
                continue
            # The entries of one list are placed by this list alone: the general
            # sibling rule may anchor an appended entry to a leaf of another name.
            slots = iter(_interleave(primary, secondary, merged.keys()))
            order = [next(slots) if k[0] == tag else k for k in order]
        return order

    def _check_cases(
        self,
        order: Sequence[Key],
        merged: Mapping[Key, tuple[etree._Element, etree._Element, SchemaNode | None]],
    ) -> None:
        """Each side may have picked a different case of a choice: both cannot hold."""
        chosen: dict[str, str] = {}
        reported: set[str] = set()
        for key in order:
            _, source, snode = merged[key]
            if snode is None:
                continue
            for choice, case in snode.cases:
                other = chosen.setdefault(choice, case)
                if other != case and choice not in reported:
                    reported.add(choice)
                    self._conflict(
                        source,
                        f"one side chose case {other!r} and the other case {case!r} "
                        f"of the choice {choice}",
                    )


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------


def _same(a: etree._Element | None, b: etree._Element | None, snode: SchemaNode | None) -> bool:
    if a is None or b is None:
        return a is b
    if snode is None or snode.kind in _LEAFLIKE:
        return _value(a) == _value(b)
    if snode.kind == "leaf-list":
        return True  # matched by value: two entries with one identity are equal
    # Equal bytes, equal subtree: serialising in C is far cheaper than walking.
    return etree.tostring(a, with_tail=False) == etree.tostring(b, with_tail=False)


def _key_tags(snode: SchemaNode | None) -> tuple[str, ...]:
    if snode is None or snode.kind != "list":
        return ()
    return tuple(qn(snode.namespace, key) for key in snode.keys)


def _identity(
    elem: etree._Element, snode: SchemaNode, key_tags: tuple[str, ...]
) -> tuple[str, ...]:
    """instance_identity, reading the keys by position when they come first in key order.

    libyang prints a list entry's keys first, in key order, so this is the
    common case; a position check costs a fraction of the lookups by name
    instance_identity makes, which dominate the time of indexing a large list.
    """
    if key_tags and len(elem) >= len(key_tags):
        values = []
        for position, tag in enumerate(key_tags):
            key = elem[position]
            if key.tag != tag:
                return instance_identity(elem, snode)
            values.append((key.text or "").strip())
        return tuple(values)
    return instance_identity(elem, snode)


def _value(elem: etree._Element) -> bytes:
    """A leaf's or opaque node's value, normalised as nc_core.edit.diff compares it."""
    if len(elem):
        return etree.tostring(elem, method="c14n")
    return (elem.text or "").strip().encode()


def _interior(snode: SchemaNode | None, m: etree._Element | None, t: etree._Element | None) -> bool:
    """Whether two different versions of a node can be merged child by child."""
    if snode is None:
        return False
    if snode.kind == "list":
        return m is not None and t is not None and bool(snode.keys)
    if snode.kind == "container":
        # A non-presence container exists only through its children: absent is
        # empty, so one side emptying it while the other edits it is merged
        # per child.  A presence container's existence is itself configuration.
        return not snode.presence or (m is not None and t is not None)
    return False


def _reason(b: etree._Element | None, m: etree._Element | None, t: etree._Element | None) -> str:
    if t is None:
        return "running deleted it; the candidate changed it"
    if m is None:
        return "the candidate deletes it; running changed it"
    if b is None:
        return "created on both sides with different values"
    return "changed differently on both sides"


def _copy(elem: etree._Element) -> etree._Element:
    copy = deepcopy(elem)
    copy.tail = None
    return copy


def _shell(source: etree._Element) -> etree._Element:
    """An empty copy of ``source`` (tag, attributes, its own namespace declarations)."""
    parent = source.getparent()
    inherited: Mapping[str | None, str] = parent.nsmap if parent is not None else {}
    own: Any = {p: ns for p, ns in source.nsmap.items() if inherited.get(p) != ns}
    shell = etree.Element(source.tag, nsmap=own)
    for name, value in source.attrib.items():
        shell.set(name, value)
    shell.text = source.text if source.text and source.text.strip() else None
    return shell


def _interleave(primary: Sequence[Key], secondary: Sequence[Key], keep: Iterable[Key]) -> list[Key]:
    """The keys of ``keep`` in ``primary``'s order, with those only ``secondary`` has
    placed where ``secondary`` put them relative to the shared ones.

    A secondary-only key goes after its preceding sibling in ``secondary``;
    one before every shared sibling goes before the first of them, and one
    after every shared sibling is appended (an entry added at the end stays
    at the end, after what the other side appended too).
    """
    kept = set(keep)
    in_primary = set(primary)
    shared = [k for k in secondary if k in kept and k in in_primary]
    first_shared = shared[0] if shared else None
    last_shared = shared[-1] if shared else None
    after: dict[Key, list[Key]] = {}
    lead: list[Key] = []
    trail: list[Key] = []
    anchor: Key | None = None
    past_last = last_shared is None
    for key in secondary:
        if key not in kept:
            continue
        if key in in_primary:
            past_last = key == last_shared
        elif past_last:
            trail.append(key)
            continue
        elif anchor is None:
            lead.append(key)
        else:
            after.setdefault(anchor, []).append(key)
        anchor = key

    out: list[Key] = []

    def emit(start: Key) -> None:
        # Iterative: 10,000 entries one side added form one chain of anchors.
        stack = [start]
        while stack:
            key = stack.pop()
            out.append(key)
            stack.extend(reversed(after.get(key, ())))

    for key in primary:
        if key not in kept:
            continue
        if key == first_shared:
            for led in lead:
                emit(led)
        emit(key)
    out.extend(trail)
    return out


def _readable_path(elem: etree._Element, index: SchemaIndex) -> str:
    """The path a person reads: names and keys, a module prefix only where it changes."""
    chain: list[etree._Element] = []
    node: etree._Element | None = elem
    while node is not None and not (namespace(node.tag) == NC_NS and local(node.tag) == "data"):
        chain.append(node)
        node = node.getparent()
    steps: list[str] = []
    snode: SchemaNode | None = None
    parent_ns: str | None = None
    for step in reversed(chain):
        ns = namespace(step.tag)
        snode = schema_of(index, snode, step) if (snode is not None or not steps) else None
        prefix = f"{index.namespaces.get(ns or '', 'ns')}:" if steps and ns != parent_ns else ""
        text = f"/{prefix}{local(step.tag)}"
        if snode is not None:
            ident = instance_identity(step, snode)
            if snode.kind == "list" and ident:
                text += "".join(f"[{k}='{v}']" for k, v in zip(snode.keys, ident, strict=True))
            elif snode.kind == "leaf-list":
                text += f"[.='{ident[0]}']"
        steps.append(text)
        parent_ns = ns
    return "".join(steps) or "/"
