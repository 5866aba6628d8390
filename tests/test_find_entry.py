"""Looking an entry up by its key (nc_core.list_entries): read from the leading key leaves
of canonical entries, with the answer of the XPath that compares every entry's key
leaves wherever they are; and by the index of where each key is (ListEntries)."""

from __future__ import annotations

from copy import deepcopy

from lxml import etree

from nc_core.list_entries import AT_END, ListEntries, digest
from nc_core.list_entries import find_entry as _find_entry
from nc_core.list_entries import finder as _finder
from nc_core.schema import EntryScopedList

N = "urn:example"
LIST = EntryScopedList((f"{{{N}}}top", f"{{{N}}}entry"), (f"{{{N}}}a", f"{{{N}}}b"), ())


def parent(entries: str) -> etree._Element:
    return etree.fromstring(f'<top xmlns="{N}">{entries}</top>')


def by_xpath(top: etree._Element, key: tuple[str, ...]) -> etree._Element | None:
    found = _finder(LIST)(top, **{f"k{i}": v for i, v in enumerate(key)})
    return found[0] if isinstance(found, list) and found else None  # type: ignore[return-value]


def test_an_entry_of_canonical_data_is_found_as_the_xpath_finds_it() -> None:
    top = parent("".join(f"<entry><a>{i}</a><b>x{i}</b><c/></entry>" for i in range(20)))
    for key in (("0", "x0"), ("7", "x7"), ("19", "x19"), ("7", "x8"), ("20", "x20")):
        assert _find_entry(top, LIST, key) is by_xpath(top, key)


def test_an_entry_not_starting_with_its_keys_is_found_by_the_xpath() -> None:
    top = parent("<entry><a>1</a><b>y</b></entry><entry><c/><b>x</b><a>2</a></entry>")
    found = _find_entry(top, LIST, ("2", "x"))
    assert found is not None and found is by_xpath(top, ("2", "x"))


def test_a_key_leaf_with_children_is_left_to_the_xpath() -> None:
    top = parent("<entry><a>1<i/></a><b>y</b></entry><entry><a>1</a><b>y</b></entry>")
    assert _find_entry(top, LIST, ("1", "y")) is by_xpath(top, ("1", "y"))


# -- ListEntries: the same answers, from an index of where each key is ------------------


def test_an_indexed_look_up_finds_what_the_scan_finds() -> None:
    top = parent(
        "<other/>" + "".join(f"<entry><a>{i}</a><b>x{i}</b><c/></entry>" for i in range(20))
    )
    entries = ListEntries(top, LIST)
    for key in (("0", "x0"), ("7", "x7"), ("19", "x19"), ("7", "x8"), ("20", "x20"), ("", "")):
        assert entries.find(key) is _find_entry(top, LIST, key)
        assert (key in entries) == (_find_entry(top, LIST, key) is not None)
    assert entries.position(("7", "x7")) == 8  # after <other/>


def test_entries_sharing_their_first_key_are_found_by_scanning() -> None:
    top = parent("<entry><a>1</a><b>x</b></entry><entry><a>1</a><b>y</b></entry>")
    entries = ListEntries(top, LIST)
    assert entries.position(("1", "y")) is None
    assert entries.find(("1", "y")) is top[1]


def test_an_entry_without_a_first_key_value_makes_absence_a_scan() -> None:
    top = parent("<entry><a></a><b>x</b></entry><entry><a>2</a><b>y</b></entry>")
    entries = ListEntries(top, LIST)
    assert entries.find(("", "x")) is top[0]
    assert entries.find(("2", "y")) is top[1]
    assert entries.find(("3", "y")) is None


def test_a_position_hint_is_checked_before_it_is_trusted() -> None:
    top = parent("".join(f"<entry><a>{i}</a><b>x{i}</b></entry>" for i in range(5)))
    assert _find_entry(top, LIST, ("3", "x3"), near=3) is top[3]
    assert _find_entry(top, LIST, ("3", "x3"), near=1) is top[3]  # moved: scanned for
    assert _find_entry(top, LIST, ("3", "x3"), near=99) is top[3]
    assert _find_entry(top, LIST, ("9", "x9"), near=3) is None


def test_digests_are_made_for_the_entries_asked_about_only(monkeypatch) -> None:
    top = parent("".join(f"<entry><a>{i}</a><b>x{i}</b></entry>" for i in range(50)))
    written: list[etree._Element] = []
    tostring = etree.tostring
    monkeypatch.setattr(
        etree, "tostring", lambda node, *a, **k: written.append(node) or tostring(node, *a, **k)
    )
    entries = ListEntries(top, LIST)
    assert entries.digest(("4", "x4")) == digest(tostring(top[4]))
    assert entries.digest(("4", "x4")) is not None
    assert entries.digest(("99", "x")) is None
    assert written == [top[4]]
    assert list(entries.digests()) == [(str(i), f"x{i}") for i in range(50)]


def test_the_entries_after_a_change_keep_the_digests_of_those_it_left_alone() -> None:
    top = parent("".join(f"<entry><a>{i}</a><b>x{i}</b></entry>" for i in range(5)))
    before = ListEntries(top, LIST)
    kept = before.digest(("1", "x1"))
    gone = before.digest(("2", "x2"))
    assert kept is not None and gone is not None
    after = before.changed_to(top, {("2", "x2")}, {("3", "x3"): b"new"})
    assert after.known_digests() == {("1", "x1"): kept, ("3", "x3"): b"new"}


def test_a_key_not_in_the_list_is_looked_for_from_the_end_of_a_changed_copy() -> None:
    top = parent("".join(f"<entry><a>{i}</a><b>x{i}</b></entry>" for i in range(5)))
    entries = ListEntries(top, LIST)
    assert entries.position(("9", "x9")) == AT_END
    changed = parent(
        "".join(f"<entry><a>{i}</a><b>x{i}</b></entry>" for i in range(5))
        + "<entry><a>9</a><b>x9</b></entry><entry><a>8</a><b>x8</b></entry>"
    )
    assert _find_entry(changed, LIST, ("9", "x9"), near=AT_END) is changed[5]
    assert _find_entry(changed, LIST, ("1", "x1"), near=AT_END) is changed[1]
    assert _find_entry(changed, LIST, ("7", "x7"), near=AT_END) is None


def test_the_index_after_a_change_finds_what_a_new_index_finds() -> None:
    old = parent("<x/>" + "".join(f"<entry><a>{i}</a><b>x{i}</b></entry>" for i in range(5)))
    before = ListEntries(old, LIST)
    assert before.find(("2", "x2")) is old[3]  # the index is made
    new = deepcopy(old)
    new[3].find(f"{{{N}}}b").text = "x2"  # an entry changed in place (same key)
    for text in ("<entry><a>7</a><b>x7</b></entry>", "<entry><a>1</a><b>y</b></entry>"):
        new[-1].addnext(etree.fromstring(text.replace("<entry>", f'<entry xmlns="{N}">')))
    after = before.changed_to(new, set(), {("2", "x2"): b"", ("7", "x7"): b"", ("1", "y"): b""})
    fresh = ListEntries(new, LIST)
    for key in [(str(i), f"x{i}") for i in range(8)] + [("1", "y"), ("9", "x9")]:
        assert after.find(key) is fresh.find(key) is _find_entry(new, LIST, key)
    assert after.position(("7", "x7")) == 6
    assert after.position(("1", "y")) is None  # shares its first key with ("1", "x1")
