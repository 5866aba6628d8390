"""A change redone onto another server's newer running, or refused (nc_core.shared_running).

Pure logic on the real models: base is the running a server's change was made
on, mine the change, theirs the running another server committed meanwhile.
"""

from __future__ import annotations

from copy import deepcopy

import pytest
from lxml import etree

from nc_core.edit import Editor
from nc_core.errors import RpcError
from nc_core.schema import Schema, SchemaIndex
from nc_core.shared_running import CHANGED_ELSEWHERE, NewerRunning, rebase
from nc_core.validation import Validator
from nc_core.xmlutil import NC_NS

SVC = "urn:cevpn:yang:cevpn-service"
NS = {"s": SVC}
NEWER = NewerRunning(7, "vpn-b (pid 42)")


class Store:
    def __init__(self) -> None:
        schema = Schema(
            ["ietf-netconf-acm", "ietf-system", "cevpn-system-deviations", "cevpn-types",
             "cevpn-service"],
            features={"ietf-system": ("authentication", "local-users")},
        )  # fmt: skip
        self.index = SchemaIndex(schema)
        self.validator = Validator(schema, self.index)

    def canonical(self, root: etree._Element) -> etree._Element:
        tree = self.validator.validate(root)
        try:
            return self.validator.canonical(tree)
        finally:
            tree.free()

    def edit(self, root: etree._Element, body: str) -> etree._Element:
        work = deepcopy(root)
        config = etree.fromstring(f'<config xmlns="{NC_NS}"><vpn-service xmlns="{SVC}">{body}'
                                  "</vpn-service></config>")  # fmt: skip
        Editor(self.index).apply(work, config, "merge")
        return self.canonical(work)


def vpn(name: str, customer: str = "acme") -> str:
    return (
        f"<vpn><id>{name}</id><customer>{customer}</customer><topology><type>full-mesh</type>"
        "</topology><keying>ikeless</keying></vpn>"
    )


@pytest.fixture(scope="module")
def store() -> Store:
    return Store()


@pytest.fixture(scope="module")
def base(store: Store) -> etree._Element:
    return store.edit(etree.Element(f"{{{NC_NS}}}data"), vpn("jade"))


def customers(root: etree._Element) -> dict[str, str]:
    return {
        v.findtext("s:id", namespaces=NS): v.findtext("s:customer", namespaces=NS)
        for v in root.iterfind(".//s:vpn", NS)
    }


def test_new_list_entries_on_both_servers_are_both_kept(store: Store, base) -> None:
    mine = store.edit(base, vpn("amber"))
    theirs = store.edit(base, vpn("beryl"))
    assert set(customers(rebase(base, mine, theirs, store.index, NEWER))) == {
        "jade", "amber", "beryl"
    }  # fmt: skip


def test_different_leaves_of_one_entry_are_both_kept(store: Store, base) -> None:
    mine = store.edit(base, "<vpn><id>jade</id><customer>mine</customer></vpn>")
    theirs = store.edit(base, "<vpn><id>jade</id><keying>ike</keying></vpn>")
    merged = rebase(base, mine, theirs, store.index, NEWER)
    assert customers(merged) == {"jade": "mine"}
    assert merged.findtext(".//s:vpn/s:keying", namespaces=NS) == "ike"


def test_the_same_leaf_changed_on_both_is_refused_naming_the_other_commit(
    store: Store, base
) -> None:
    mine = store.edit(base, "<vpn><id>jade</id><customer>mine</customer></vpn>")
    theirs = store.edit(base, "<vpn><id>jade</id><customer>theirs</customer></vpn>")
    with pytest.raises(RpcError) as refused:
        rebase(base, mine, theirs, store.index, NEWER)
    error = refused.value
    assert (error.tag, error.app_tag) == ("operation-failed", CHANGED_ELSEWHERE)
    assert "vpn-b (pid 42)" in error.message
    assert "generation 7" in error.message
    assert "<discard-changes>" in error.message
    assert error.path is not None and "jade" in error.path


def test_an_entry_deleted_there_and_changed_here_is_refused(store: Store, base) -> None:
    mine = store.edit(base, "<vpn><id>jade</id><customer>mine</customer></vpn>")
    theirs = deepcopy(base)
    theirs_vpn = theirs.find(".//s:vpn", NS)
    assert theirs_vpn is not None
    theirs_vpn.getparent().remove(theirs_vpn)  # type: ignore[union-attr]
    with pytest.raises(RpcError) as refused:
        rebase(base, mine, store.canonical(theirs), store.index, NEWER)
    assert refused.value.app_tag == CHANGED_ELSEWHERE


def test_the_same_change_on_both_is_no_conflict(store: Store, base) -> None:
    mine = store.edit(base, "<vpn><id>jade</id><customer>same</customer></vpn>")
    theirs = store.edit(base, "<vpn><id>jade</id><customer>same</customer></vpn>")
    assert customers(rebase(base, mine, theirs, store.index, NEWER)) == {"jade": "same"}
