"""Looking an entry up by its key (nc_core.validation._find_entry): read from the leading
key leaves of canonical entries, with the answer of the XPath that compares every
entry's key leaves wherever they are."""

from __future__ import annotations

from lxml import etree

from nc_core.schema import EntryScopedList
from nc_core.validation import _find_entry, _finder

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
