"""What the server sends a CE: the smallest edit, and what an audit reports."""

from __future__ import annotations

from lxml import etree

from nc_server.ce_config import (
    CE_NS,
    add_management_port,
    deprovision_document,
    differences,
    edit_document,
    full_edit,
    incremental_edit,
)

NC_OP = "{urn:ietf:params:xml:ns:netconf:base:1.0}operation"


def peer(name: str, prefix: str) -> dict[str, object]:
    return {
        "name": name,
        "sp-address": f"192.0.2.{ord(name[0])}",
        "tunnel": {"remote-prefix": [prefix]},
        "ike": {"pre-shared-key": "k" * 32},
    }


OLD = {
    "configuration-version": "v1",
    "routing": {"local-prefix": ["10.1.0.0/24"]},
    "peer": [peer("b", "10.2.0.0/24"), peer("c", "10.3.0.0/24")],
}


def target_xml(config: dict[str, object]) -> etree._Element:
    from nc_server.ce_config import CeCodec

    return CeCodec().to_xml(config, "a")


def test_adding_a_site_sends_one_peer_and_the_new_version_only() -> None:
    new = {**OLD, "configuration-version": "v2", "peer": [*OLD["peer"], peer("d", "10.4.0.0/24")]}  # type: ignore[list-item]
    edit = incremental_edit(OLD, new)
    assert edit.peers == ["d"]
    assert edit.sections == ["configuration-version"]
    assert edit.removed_peers == [] and edit.removed_sections == []


def test_a_removed_peer_is_removed_and_a_changed_one_replaced() -> None:
    new = {**OLD, "peer": [peer("b", "10.22.0.0/24")]}
    edit = incremental_edit(OLD, new)
    assert edit.peers == ["b"] and edit.removed_peers == ["c"]


def test_the_edit_document_replaces_peers_and_sections_and_removes_the_rest() -> None:
    new = {**OLD, "configuration-version": "v2", "peer": [peer("b", "10.2.0.0/24")]}
    doc = edit_document(target_xml(new), incremental_edit(OLD, new))
    ce = doc.find(f"{{{CE_NS}}}ce")
    assert ce is not None
    ops = [
        (etree.QName(c).localname, c.findtext(f"{{{CE_NS}}}name") or c.text, c.get(NC_OP))
        for c in ce
    ]
    assert ("configuration-version", "v2", "replace") in ops
    assert ("peer", "c", "remove") in ops
    assert not any(name == "peer" and who == "b" for name, who, _ in ops)


def test_a_full_resynchronisation_removes_peers_the_ce_has_and_the_server_does_not() -> None:
    edit = full_edit(OLD, ["b", "c", "stale"])
    assert edit.removed_peers == ["stale"] and sorted(edit.peers) == ["b", "c"]
    assert "routing" in edit.sections


def test_deprovisioning_removes_every_vpn_part_but_not_the_pre_configuration() -> None:
    doc = deprovision_document(["b", "c"], ["routing", "configuration-version"])
    text = etree.tostring(doc).decode()
    assert "pre-configuration" not in text
    assert text.count('operation="remove"') == 4


def test_moving_the_management_port_edits_that_leaf_only() -> None:
    doc = edit_document(target_xml(OLD), incremental_edit(OLD, OLD))
    add_management_port(doc, 8830)
    port = doc.find(f".//{{{CE_NS}}}pre-configuration/{{{CE_NS}}}management/{{{CE_NS}}}port")
    assert port is not None and port.text == "8830" and port.get(NC_OP) == "replace"


def test_audit_names_the_missing_peer_and_never_a_value() -> None:
    have = {**OLD, "peer": [peer("b", "10.2.0.0/24")]}
    assert differences(OLD, have) == ["/cevpn-ce:ce/peer[name='c']"]
    secret = {**OLD, "peer": [{**peer("b", "10.2.0.0/24"), "key": "s3cret"}, OLD["peer"][1]]}  # type: ignore[index]
    diffs = differences(
        secret, {**OLD, "peer": [{**peer("b", "10.2.0.0/24"), "key": "other"}, OLD["peer"][1]]}
    )  # type: ignore[index]
    assert diffs == ["/cevpn-ce:ce/peer[name='b']/key"]
    assert not any("s3cret" in d or "other" in d for d in diffs)


def test_audit_of_a_ce_with_no_peers_lists_each_missing_one() -> None:
    have = {k: v for k, v in OLD.items() if k != "peer"}
    assert differences(OLD, have) == [
        "/cevpn-ce:ce/peer[name='b']",
        "/cevpn-ce:ce/peer[name='c']",
    ]


def test_an_edit_that_changes_nothing_in_the_configuration_converts_to_an_empty_ce() -> None:
    from nc_server.ce_config import CeCodec

    doc = etree.fromstring(CeCodec().incremental_document(OLD, incremental_edit(OLD, OLD), "a"))
    ce = doc.find(f"{{{CE_NS}}}ce")
    assert ce is not None and len(ce) == 0


def infoset(elem: etree._Element) -> tuple[object, ...]:
    """Names (with their namespaces), attributes, text and children, in order: what a
    document says whatever prefixes and namespace declarations it is written with."""
    return (
        elem.tag,
        sorted(elem.attrib.items()),
        (elem.text or "").strip(),
        [infoset(child) for child in elem],
    )


def test_the_incremental_document_is_the_edit_document_serialised() -> None:
    """The one-peer path (libyang's XML marked in place) sends what edit_document would."""
    from nc_server.ce_config import CeCodec

    new = {
        **OLD,
        "configuration-version": "v2",
        "minimum-strength": "cevpn-types:strength-128",
        "peer": [peer("b", "10.22.0.0/24"), peer("d", "10.4.0.0/24")],
    }
    edit = incremental_edit(OLD, new)
    expected = edit_document(target_xml(new), edit)
    add_management_port(expected, 8830)
    sent = CeCodec().incremental_document(new, edit, "a", management_port=8830)
    assert infoset(etree.fromstring(sent)) == infoset(expected)


def test_an_incremental_edit_with_a_value_the_schema_refuses_is_not_made() -> None:
    """A compiler mistake in one peer is caught on the server, before anything is sent."""
    import pytest

    from nc_server.ce_config import CeCodec, InvalidCompiledConfig

    bad = {**peer("d", "10.4.0.0/24"), "sp-address": "not-an-address"}
    new = {**OLD, "peer": [*OLD["peer"], bad]}  # type: ignore[list-item]
    with pytest.raises(InvalidCompiledConfig, match="compiled configuration of a"):
        CeCodec().incremental_document(new, incremental_edit(OLD, new), "a")


def test_the_changed_peers_are_sent_even_from_a_peer_list_not_sorted_by_name() -> None:
    """The compiler keeps peers sorted (binary search finds them); any other order is
    scanned."""
    from nc_server.ce_config import CeCodec

    new = {**OLD, "peer": [peer("d", "10.4.0.0/24"), *OLD["peer"], peer("a", "10.9.0.0/24")]}  # type: ignore[list-item]
    edit = incremental_edit(OLD, new)
    doc = etree.fromstring(CeCodec().incremental_document(new, edit, "x"))
    sent = [p.findtext(f"{{{CE_NS}}}name") for p in doc.iter(f"{{{CE_NS}}}peer")]
    assert sent == ["d", "a"]
