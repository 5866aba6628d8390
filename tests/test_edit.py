"""<edit-config> semantics (nc_core.edit) on the real cevpn-ce model, without a server."""

from __future__ import annotations

from copy import deepcopy

import pytest
from lxml import etree

from nc_core.edit import Editor, diff, new_datastore
from nc_core.errors import RpcError, RpcErrors
from nc_core.schema import SchemaIndex
from nc_core.validation import Validator

NC = "urn:ietf:params:xml:ns:netconf:base:1.0"
CE = "urn:cevpn:yang:cevpn-ce"
T = "urn:cevpn:yang:cevpn-types"
PSK = "0123456789abcdef0123"


@pytest.fixture(scope="module")
def index(ce_schema):
    return SchemaIndex(ce_schema)


@pytest.fixture(scope="module")
def validator(ce_schema, index):
    return Validator(ce_schema, index)


def config(body: str) -> etree._Element:
    return etree.fromstring(
        f'<config xmlns="{NC}" xmlns:nc="{NC}" xmlns:yang="urn:ietf:params:xml:ns:yang:1" '
        f'xmlns:t="{T}"><ce xmlns="{CE}">{body}</ce></config>'
    )


def peer(name: str, address: str = "192.0.2.2", op: str = "", extra: str = "") -> str:
    attr = f' nc:operation="{op}"' if op else ""
    return (
        f"<peer{attr}><name>{name}</name><sp-address>{address}</sp-address>"
        f"<ike><pre-shared-key>{PSK}</pre-shared-key></ike>{extra}</peer>"
    )


def apply(index, root, body: str, default: str = "merge") -> etree._Element:
    """Edit a copy, then parse it as the server does for the candidate."""
    work = deepcopy(root)
    Editor(index).apply(work, config(body), default)
    try:
        _VALIDATOR[0].validate(work, full=False)
    except RpcErrors as errs:
        raise errs.errors[0] from None
    return work


_VALIDATOR: list[Validator] = []


@pytest.fixture(autouse=True)
def _remember_validator(validator):
    _VALIDATOR[:] = [validator]


def names(root: etree._Element, tag: str = "peer") -> list[str]:
    return [e.findtext(f"{{{CE}}}name") for e in root.iter(f"{{{CE}}}{tag}")]


def test_merge_creates_missing_parents(index):
    root = apply(index, new_datastore(), peer("b"))
    assert names(root) == ["b"]


def test_an_identityref_keeps_the_prefix_declared_on_config_when_copied_whole(index):
    # <ce> is new and carries no operation: it is copied whole, and its value's prefix
    # (declared on <config>, not on <ce>) must stay in scope for libyang to resolve it.
    root = apply(index, new_datastore(), "<minimum-strength>t:strength-192</minimum-strength>")
    leaf = root.find(f"{{{CE}}}ce/{{{CE}}}minimum-strength")
    assert leaf is not None and leaf.text == "t:strength-192"
    assert leaf.nsmap.get("t") == T


def test_values_without_prefixes_are_copied_as_they_are(index):
    root = apply(index, new_datastore(), peer("b") + peer("c", "192.0.2.3"))
    assert names(root) == ["b", "c"]
    assert root.find(f"{{{CE}}}ce/{{{CE}}}peer/{{{CE}}}name").text == "b"


def test_create_of_an_existing_entry_is_data_exists_with_its_path(index):
    root = apply(index, new_datastore(), peer("b"))
    with pytest.raises(RpcError) as err:
        apply(index, root, peer("b", op="create"))
    assert err.value.tag == "data-exists"
    assert err.value.path == "/cevpn-ce:ce/cevpn-ce:peer[cevpn-ce:name='b']"


def test_delete_of_a_missing_entry_is_data_missing_and_remove_is_silent(index):
    with pytest.raises(RpcError) as err:
        apply(index, new_datastore(), '<peer nc:operation="delete"><name>x</name></peer>')
    assert err.value.tag == "data-missing"
    root = apply(index, new_datastore(), '<peer nc:operation="remove"><name>x</name></peer>')
    assert names(root) == []


def test_replace_drops_what_the_new_entry_does_not_have(index):
    root = apply(index, new_datastore(), peer("b", extra="<description>old</description>"))
    root = apply(index, root, peer("b", "192.0.2.9", op="replace"))
    assert root.find(f".//{{{CE}}}description") is None
    assert root.findtext(f".//{{{CE}}}sp-address") == "192.0.2.9"


def test_default_operation_none_only_navigates(index):
    root = apply(index, new_datastore(), peer("b"))
    root = apply(
        index,
        root,
        '<peer><name>b</name><description nc:operation="create">d</description></peer>',
        "none",
    )
    assert root.findtext(f".//{{{CE}}}description") == "d"
    with pytest.raises(RpcError) as err:
        apply(index, root, "<peer><name>zz</name><description>d</description></peer>", "none")
    assert err.value.tag == "data-missing"


def test_creating_a_node_of_another_case_removes_the_old_case(index):
    root = apply(index, new_datastore(), peer("b"))
    key = ":".join(["ab"] * 36)
    sa = (
        "<spi>{}</spi><encryption-algorithm>t:encr-aes-gcm-16-256</encryption-algorithm>"
        f"<encryption-key>{key}</encryption-key>"
    )
    root = apply(
        index,
        root,
        f"<peer><name>b</name><ikeless><outbound>{sa.format(4096)}</outbound>"
        f"<inbound>{sa.format(4097)}</inbound></ikeless></peer>",
    )
    assert root.find(f".//{{{CE}}}ike") is None
    assert root.find(f".//{{{CE}}}ikeless") is not None


def test_list_entry_without_its_key_is_missing_element(index):
    with pytest.raises(RpcError) as err:
        apply(index, new_datastore(), "<peer><sp-address>192.0.2.2</sp-address></peer>")
    assert err.value.tag == "missing-element"
    assert ("bad-element", "name") in err.value.info


def test_unknown_element_is_named(index):
    with pytest.raises(RpcError) as err:
        apply(index, new_datastore(), "<peer><name>b</name><colour>red</colour></peer>")
    assert err.value.tag == "unknown-element"
    assert ("bad-element", "colour") in err.value.info


def test_state_data_cannot_be_configured(index):
    with pytest.raises(RpcError) as err:
        apply(
            index, new_datastore(), "<peer><name>b</name><state><status>up</status></state></peer>"
        )
    assert err.value.tag == "invalid-value"


def test_bad_operation_attribute_is_bad_attribute(index):
    with pytest.raises(RpcError) as err:
        apply(index, new_datastore(), '<peer nc:operation="frob"><name>b</name></peer>')
    assert err.value.tag == "bad-attribute"


def proposal(pid: int, op_attrs: str = "") -> str:
    return (
        f"<proposal {op_attrs}><id>{pid}</id><encryption>t:encr-aes-gcm-16-256</encryption>"
        "<prf>t:prf-hmac-sha2-256</prf><dh-group>t:curve25519</dh-group></proposal>"
    )


def ids(root: etree._Element) -> list[str]:
    return [e.text for e in root.iter(f"{{{CE}}}id")]


def test_insert_first_last_before_after_in_a_user_ordered_list(index):
    wrap = "<sa-defaults><ike>{}</ike></sa-defaults>"
    root = apply(index, new_datastore(), wrap.format(proposal(1) + proposal(2)))
    assert ids(root) == ["1", "2"]
    root = apply(index, root, wrap.format(proposal(3, 'yang:insert="first"')))
    assert ids(root) == ["3", "1", "2"]
    root = apply(index, root, wrap.format(proposal(4, 'yang:insert="after" yang:key="[id=\'3\']"')))
    assert ids(root) == ["3", "4", "1", "2"]
    root = apply(
        index, root, wrap.format(proposal(2, 'yang:insert="before" yang:key="[id=\'3\']"'))
    )
    assert ids(root) == ["2", "3", "4", "1"]
    root = apply(index, root, wrap.format(proposal(2, 'yang:insert="last"')))
    assert ids(root) == ["3", "4", "1", "2"]


def test_insert_relative_to_a_missing_entry_is_bad_attribute(index):
    wrap = "<sa-defaults><ike>{}</ike></sa-defaults>"
    with pytest.raises(RpcError) as err:
        apply(
            index,
            new_datastore(),
            wrap.format(proposal(1, 'yang:insert="after" yang:key="[id=\'9\']"')),
        )
    assert err.value.tag == "bad-attribute"
    assert err.value.app_tag == "missing-instance"


def test_continue_on_error_applies_the_good_parts(index):
    work = new_datastore()
    editor = Editor(index, continue_on_error=True)
    editor.apply(
        work,
        config(
            peer("b")
            + '<peer nc:operation="delete"><name>zz</name></peer>'
            + peer("c", "192.0.2.3")
        ),
        "merge",
    )
    assert names(work) == ["b", "c"]
    assert [e.tag for e in editor.errors] == ["data-missing"]


def test_diff_reports_created_subtrees_by_their_top_and_updated_leaves(index, validator):
    old = validator.canonical(validator.validate(apply(index, new_datastore(), peer("b"))))
    new = apply(index, old, peer("b", "192.0.2.7") + peer("c", "192.0.2.3"))
    changes = diff(old, new, index)
    updated = [c.element.tag.split("}")[1] for c in changes if c.op == "update"]
    created = [c.element for c in changes if c.op == "create"]
    assert updated == ["sp-address"]
    assert [e.findtext(f"{{{CE}}}name") for e in created] == ["c"]  # the new peer, whole


def test_diff_reports_a_deleted_subtree_once(index, validator):
    old = validator.canonical(validator.validate(apply(index, new_datastore(), peer("b"))))
    new = apply(index, old, '<peer nc:operation="delete"><name>b</name></peer>')
    changes = diff(old, new, index)
    assert [(c.op, c.element.tag.split("}")[1]) for c in changes] == [("delete", "peer")]


def test_diff_of_identical_trees_is_empty(index):
    root = apply(index, new_datastore(), peer("b"))
    assert diff(root, deepcopy(root), index) == []
