"""The bytes of a changed datastore document, made from the previous document's bytes.

Why: a commit stages the new running configuration's document in the journal
(nc_core.journal), which keeps only the bytes between what the two documents share at
their start and end.  Serialising the whole new document to find those bytes cost a
one-peer commit on a CE holding 1,000 peers (an 820 KB document) as much as a fifth
of the rest of its work.  When the commit's changes are known entry by entry (the
validator's :class:`nc_core.edit.EntryPatch`), the new document is the old one with
each changed entry's bytes put in place of the old entry's: serialising the changed
entries is enough.

Each entry is located by searching the document for its exact serialisation, which
must occur once: an entry that cannot be found, or found twice, or that is not
serialised in the document the way it is on its own (namespace declarations or
attributes of its own), gives up (None), and the caller serialises the whole
document.  So the result is either what :func:`nc_core.datastore.document_bytes`
makes of the new tree or nothing (tests/test_document_splice.py compares the two).
"""

from __future__ import annotations

from dataclasses import dataclass

from lxml import etree

from nc_core.edit import EntryPatch


@dataclass(frozen=True)
class Spliced:
    """A new document and how much of it it shares with the old one at each end."""

    data: bytes
    start: int
    """Bytes shared with the old document at the start."""
    end: int
    """Bytes shared with the old document at the end (not overlapping ``start``)."""


def spliced_document(old_data: bytes, patch: EntryPatch) -> Spliced | None:
    """``old_data`` (exactly ``document_bytes(patch.old)``) made into the document of
    ``patch.new``, or None when an entry cannot be placed for sure.

    Spliced in place in one buffer: each splice as slices of immutable bytes copied the
    whole 0.8 MB document four times."""
    data = bytearray(old_data)
    starts: list[int] = []  # where each splice began, in the document as it then was
    ends: list[int] = []  # the bytes after each splice it left alone (counted from the end)
    for gone in patch.removed:
        found = _place(data, gone)
        if found is None:
            return None
        at, gone_text = found
        del data[at : at + len(gone_text)]
        starts.append(at)
        ends.append(len(data) - at)
    for previous_leaf, leaf in patch.leaves:
        found = _place(data, previous_leaf)
        text = entry_bytes(leaf)
        if found is None or text is None:
            return None
        at, old_text = found
        data[at : at + len(old_text)] = text
        starts.append(at)
        ends.append(len(data) - at - len(text))
    for entry, previous in zip(patch.changed, patch.previous, strict=True):
        text = entry_bytes(entry)
        if text is None:
            return None
        if previous is not None:
            found = _place(data, previous)
            if found is None:
                return None
            at, old_text = found
            data[at : at + len(old_text)] = text
        else:
            anchor = entry.getprevious()
            if anchor is None or not isinstance(anchor.tag, str):
                return None  # the first child: its place is not found by a neighbour
            found = _place(data, anchor)
            if found is None:
                return None
            at = found[0] + len(found[1])
            data[at:at] = text
        starts.append(at)
        ends.append(len(data) - at - len(text))
    # A splice leaves the bytes before it and after it as they were, wherever the others
    # are: the shared ends are the smallest of each.
    shortest = min(len(data), len(old_data))
    start = min(starts, default=shortest)
    end = min(min(ends, default=0), shortest - start)
    return Spliced(bytes(data), start, end)


def entry_bytes(entry: etree._Element) -> bytes | None:
    """How ``entry`` (a list entry, or a leaf with a value) is serialised inside its
    document, or None when that is not known from the entry alone (it declares
    namespaces or has attributes, or a tail, or is empty)."""
    parent = entry.getparent()
    if parent is None or entry.attrib or entry.tail or (len(entry) == 0 and not entry.text):
        return None
    if dict(entry.nsmap) != dict(parent.nsmap):
        return None  # declarations of its own: printed in its start tag
    alone = etree.tostring(entry, encoding="UTF-8", with_tail=False)
    local = etree.QName(entry).localname
    head = (f"<{local}" if entry.prefix is None else f"<{entry.prefix}:{local}").encode()
    close = alone.find(b">")
    if not alone.startswith(head) or close < 0 or alone[close - 1 : close] == b"/":
        return None
    return head + alone[close:]


def _place(data: bytearray, entry: etree._Element) -> tuple[int, bytes] | None:
    """Where ``entry``'s serialisation is in ``data``, if exactly once."""
    text = entry_bytes(entry)
    if text is None:
        return None
    at = data.find(text)
    if at < 0 or data.find(text, at + 1) >= 0:
        return None
    return at, text
