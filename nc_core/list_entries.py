"""The entries of one entry-scoped list (nc_core.schema.EntryScopedList) in an lxml
datastore tree: found by key, serialised and digested.

Why a module of its own: a one-peer commit on a CE holding 1,000 peers looks entries up
by key some ten times (in the configuration before, the edited copy, the canonical form
after), and compares the changed ones with what they were.  Scanning 1,000 entries for a
key costs 0.4-0.7 ms, and digesting every entry before the change (what the validator's
memo compared with) 8 ms on the first small change after a whole one: together a third
of the agent's work for a pushed change.  :class:`ListEntries` answers both in
proportion to the change: an index of where each key is, made by one XPath over the key
leaves (0.2 ms), and the digests of the entries a change asks about only.
"""

from __future__ import annotations

import hashlib

from lxml import etree

from nc_core.schema import EntryScopedList

Key = tuple[str, ...]

AT_END = -1
"""A position hint for an entry a change added: where a change puts new entries, after
the others (:func:`find_entry` looks from the last entry back)."""


def digest(data: bytes) -> bytes:
    """What is kept of serialised data to compare it with later, instead of its bytes."""
    return hashlib.blake2b(data, digest_size=32).digest()


def parent_of(root: etree._Element, scoped: EntryScopedList) -> etree._Element | None:
    """The element holding the list's entries in ``root``, if there is one."""
    node: etree._Element | None = root
    for tag in scoped.tags[:-1]:
        if node is None:
            return None
        node = node.find(tag)
    return node


def entries_of(parent: etree._Element | None, scoped: EntryScopedList) -> list[etree._Element]:
    return [] if parent is None else parent.findall(scoped.tags[-1])


def key_of(entry: etree._Element, scoped: EntryScopedList) -> Key:
    """An entry's key values as written (keys come first in canonical data: tried there
    before searching)."""
    values = []
    count = len(entry)
    for position, tag in enumerate(scoped.keys):
        child = entry[position] if position < count else None
        if child is None or child.tag != tag:
            child = entry.find(tag)
        values.append("" if child is None else (child.text or ""))
    return tuple(values)


def find_entry(
    parent: etree._Element | None, scoped: EntryScopedList, key: Key, near: int | None = None
) -> etree._Element | None:
    """The entry of ``parent`` (canonical data: key values exactly as written) with this
    key; ``near``: the child position it is expected at (looked at first), or
    :data:`AT_END` for an entry expected among the last.

    Canonical entries start with their keys: read there, a look-up among 1,000 peers
    costs a tenth of the XPath that compares every entry's key leaves wherever they are
    (which an entry not starting with its keys is left to)."""
    if parent is None:
        return None
    if near is not None:
        found = (
            _entry_at(parent, near, scoped, key) if near >= 0 else _last_entry(parent, scoped, key)
        )
        if found is not None:
            return found
    for entry in parent.iterchildren(scoped.tags[-1]):
        same = _leading_keys_are(entry, scoped, key)
        if same:
            return entry
        if same is None:
            break  # not an entry starting with its keys: the XPath looks
    else:
        return None
    found_by_xpath = finder(scoped)(parent, **{f"k{i}": v for i, v in enumerate(key)})
    if (
        isinstance(found_by_xpath, list)
        and found_by_xpath
        and isinstance(found_by_xpath[0], etree._Element)
    ):
        return found_by_xpath[0]
    return None


def _last_entry(parent: etree._Element, scoped: EntryScopedList, key: Key) -> etree._Element | None:
    """:func:`find_entry` looking from the last entry back, among those starting with
    their keys (None when it reaches one that does not: the forward scan decides)."""
    for entry in parent.iterchildren(scoped.tags[-1], reversed=True):
        same = _leading_keys_are(entry, scoped, key)
        if same:
            return entry
        if same is None:
            return None
    return None


def _entry_at(
    parent: etree._Element, position: int, scoped: EntryScopedList, key: Key
) -> etree._Element | None:
    """The child at ``position`` if it is the entry with this key, as :func:`find_entry`
    would find it (its key leaves first, without children)."""
    if position < 0 or position >= len(parent):
        return None
    entry = parent[position]
    if entry.tag != scoped.tags[-1] or not _leading_keys_are(entry, scoped, key):
        return None
    return entry


def _leading_keys_are(entry: etree._Element, scoped: EntryScopedList, key: Key) -> bool | None:
    """Whether ``entry`` starts with key leaves of these values: True, False (its key
    leaves are first but another value is met), or None when it does not start with its
    key leaves (leaves of other names first, or a key leaf with children): canonical
    entries do, others are left to the XPath."""
    if len(entry) < len(scoped.keys):
        return None
    for position, tag in enumerate(scoped.keys):
        leaf = entry[position]
        if leaf.tag != tag or len(leaf):
            return None
        if (leaf.text or "") != key[position]:
            return False
    return True


class ListEntries:
    """The entries of ``scoped`` under ``parent``, in a canonical tree nobody changes
    while this is used (a datastore tree: replaced, never changed in place; the
    validator's memo holds it), by key.

    - :meth:`find`: one XPath reads every entry's first key leaf in document order,
      which gives each key's position among the parent's children; a look-up reads the
      child there and checks its keys.  Where canonical data would not be (a key leaf
      missing, a first key shared by entries), the position is not trusted and the
      entries are scanned.
    - :meth:`digest`: an entry serialised and digested, made when first asked for and
      kept (by the next memo too, for the entries a change left alone: their bytes are
      the same).
    - :meth:`digests`: every entry's, in document order: what a change found by
      comparing everything is compared with.
    """

    def __init__(
        self,
        parent: etree._Element | None,
        scoped: EntryScopedList,
        digests: dict[Key, bytes] | None = None,
    ) -> None:
        self.parent = parent
        self.scoped = scoped
        self._digests: dict[Key, bytes] = {} if digests is None else digests
        self._complete = False
        self._positions: dict[str, int] | None = None
        self._all_indexed = False
        """Every entry's first key is in ``_positions`` (or marked shared): a key not there
        is not in the list."""

    def _index(self) -> dict[str, int]:
        if self._positions is None:
            self._positions, self._all_indexed = _positions(self.parent, self.scoped)
        return self._positions

    def position(self, key: Key) -> int | None:
        """Where the entry with this key is expected among the parent's children in a
        copy of this tree a change made (a hint for :func:`find_entry`): its position
        here, :data:`AT_END` for a key not here (new entries go after the others), None
        when not known."""
        at = self._index().get(key[0])
        if at is None:
            return AT_END if self._all_indexed and key[0] != "" else None
        return None if at < 0 else at

    def find(self, key: Key) -> etree._Element | None:
        if self.parent is None:
            return None
        at = self._index().get(key[0])
        if at is None and self._all_indexed:
            return None
        if at is not None and at >= 0:
            found = _entry_at(self.parent, at, self.scoped, key)
            if found is not None:
                return found
        return find_entry(self.parent, self.scoped, key)

    def __contains__(self, key: object) -> bool:
        if self._complete:
            return key in self._digests
        return isinstance(key, tuple) and self.find(key) is not None

    def digest(self, key: Key) -> bytes | None:
        """The digest of the entry's serialisation; None if there is no such entry."""
        known = self._digests.get(key)
        if known is not None or self._complete:
            return known
        entry = self.find(key)
        if entry is None:
            return None
        made = self._digests[key] = digest(etree.tostring(entry))
        return made

    def digests(self) -> dict[Key, bytes]:
        """Every entry's digest by key, in document order."""
        if not self._complete:
            self._digests = {
                key_of(e, self.scoped): digest(etree.tostring(e))
                for e in entries_of(self.parent, self.scoped)
            }
            self._complete = True
        return self._digests

    def known_digests(self) -> dict[Key, bytes]:
        """The digests made so far (all of them once :meth:`digests` was asked)."""
        return self._digests

    def changed_to(
        self,
        parent: etree._Element | None,
        removed: set[Key],
        changed: dict[Key, bytes],
    ) -> ListEntries:
        """The entries under ``parent``, in the configuration a change made of this one:
        ``removed`` taken out, ``changed`` (added or changed, with their digests) put in
        (after the others when new: where a change puts them), every other entry's bytes
        the same, so its digest is kept."""
        digests = {k: v for k, v in self._digests.items() if k not in removed}
        digests.update(changed)
        made = ListEntries(parent, self.scoped, digests)
        made._complete = self._complete
        if self._positions is not None and self._all_indexed and not removed:
            # The same positions, new entries after the last (made again once an entry is
            # removed: the ones after it moved).  A wrong one only costs a scan: every
            # position is checked before it is trusted, and every key is in the index.
            positions = dict(self._positions)
            end = max(positions.values(), default=-1)
            for key in changed:
                if key[0] not in positions:
                    end += 1
                    positions[key[0]] = end
                elif self.find(key) is None:
                    positions[key[0]] = -1  # a new entry sharing an old one's first key
            made._positions, made._all_indexed = positions, True
        return made


def _positions(
    parent: etree._Element | None, scoped: EntryScopedList
) -> tuple[dict[str, int], bool]:
    """Each entry's first key value and its position among ``parent``'s children (-1 for
    a value entries share), and whether every entry has one."""
    if parent is None:
        return {}, True
    first = parent.find(scoped.tags[-1])
    if first is None:
        return {}, True
    offset = parent.index(first)
    texts, count = _key_texts(scoped)(parent), _entry_count(scoped)(parent)
    if not isinstance(texts, list):
        return {}, False
    positions: dict[str, int] = {}
    for at, text in enumerate(texts):
        if isinstance(text, str):
            positions[text] = -1 if text in positions else offset + at
    return positions, len(texts) == count


_FINDERS: dict[
    tuple[str, ...], tuple[etree.XPath, dict[tuple[tuple[str, ...], ...], etree.XPath]]
] = {}
_KEY_TEXTS: dict[tuple[str, ...], tuple[etree.XPath, etree.XPath]] = {}


def finder(scoped: EntryScopedList) -> etree.XPath:
    """An XPath finding an entry among its parent's children by its key values ($k0...)."""
    found = _FINDERS.get(scoped.tags)
    if found is None:
        namespaces, name = _xpath_names(scoped.tags[-1:] + scoped.keys)
        test = " and ".join(f"{name[k]} = $k{i}" for i, k in enumerate(scoped.keys))
        found = _FINDERS[scoped.tags] = (
            etree.XPath(f"{name[scoped.tags[-1]]}[{test}]", namespaces=namespaces),
            {},
        )
    return found[0]


def counter(scoped: EntryScopedList, unique: tuple[tuple[str, ...], ...]) -> etree.XPath:
    """An XPath counting the parent's entries whose ``unique`` leaves have the values
    $v0...: canonical values, equal exactly when their text is."""
    finder(scoped)
    cache = _FINDERS[scoped.tags][1]
    found = cache.get(unique)
    if found is None:
        tags = scoped.tags[-1:] + tuple(t for path in unique for t in path)
        namespaces, name = _xpath_names(tags)
        test = " and ".join(
            "/".join(name[t] for t in path) + f" = $v{i}" for i, path in enumerate(unique)
        )
        found = cache[unique] = etree.XPath(
            f"count({name[scoped.tags[-1]]}[{test}])", namespaces=namespaces
        )
    return found


def _key_texts(scoped: EntryScopedList) -> etree.XPath:
    """An XPath reading the text of every entry's first key leaf, in document order."""
    return _texts_and_count(scoped)[0]


def _entry_count(scoped: EntryScopedList) -> etree.XPath:
    return _texts_and_count(scoped)[1]


def _texts_and_count(scoped: EntryScopedList) -> tuple[etree.XPath, etree.XPath]:
    found = _KEY_TEXTS.get(scoped.tags)
    if found is None:
        namespaces, name = _xpath_names(scoped.tags[-1:] + scoped.keys[:1])
        entry, key = name[scoped.tags[-1]], name[scoped.keys[0]]
        found = _KEY_TEXTS[scoped.tags] = (
            etree.XPath(f"{entry}/{key}/text()", namespaces=namespaces, smart_strings=False),
            etree.XPath(f"count({entry})", namespaces=namespaces),
        )
    return found


def _xpath_names(tags: tuple[str, ...]) -> tuple[dict[str, str], dict[str, str]]:
    namespaces: dict[str, str] = {}
    names: dict[str, str] = {}
    for tag in tags:
        ns, _, local_name = tag[1:].partition("}")
        prefix = next((p for p, n in namespaces.items() if n == ns), f"n{len(namespaces)}")
        namespaces[prefix] = ns
        names[tag] = f"{prefix}:{local_name}"
    return namespaces, names
