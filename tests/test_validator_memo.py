"""The validator's memo of the configuration last found valid (nc_core.validation.Validator).

A confirmed commit validates the same configuration twice (the commit, then the
confirming commit); the second time the memo hands out the tree and canonical form
made the first time.  What must not change: every configuration a commit accepts is
fully valid, an invalid one is refused with the same rpc-errors as by a validator
that never saw anything before (constraints spanning the changed peer and the
unchanged ones included), and what is handed out equals what parsing would give.
"""

from __future__ import annotations

from collections.abc import Iterator
from copy import deepcopy

import pytest
from lxml import etree

from nc_core.datastore import free, serialize
from nc_core.edit import Change, Editor, diff, instance_path, new_datastore
from nc_core.errors import RpcErrors
from nc_core.schema import CE_MODULES
from nc_core.server import NetconfServer, ServerOptions
from nc_core.transaction import Application, Transaction, tree_json
from nc_core.validation import Validator

NC = "urn:ietf:params:xml:ns:netconf:base:1.0"
CE = "urn:cevpn:yang:cevpn-ce"
T = "urn:cevpn:yang:cevpn-types"
HOST_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHvPq4zJr6uZ0ZbqT6hzK3y9zN0s9jzrUO3qS5tKqK8C x"


class CeOnly(Application):
    modules = CE_MODULES


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NetconfServer]:
    yield NetconfServer(ServerOptions(state_dir=tmp_path_factory.mktemp("state")), CeOnly())


def peer(i: int, sp_address: str | None = None) -> str:
    key = ":".join(["ab"] * 36)
    sa = (
        "<spi>%d</spi><encryption-algorithm>t:encr-aes-gcm-16-256</encryption-algorithm>"
        f"<encryption-key>{key}</encryption-key>"
    )
    return (
        f"<peer><name>site-{i}</name><sp-address>{sp_address or f'10.1.0.{i + 1}'}</sp-address>"
        f"<tunnel><remote-prefix>172.16.{i}.0/24</remote-prefix></tunnel><ikeless>"
        f"<outbound>{sa % (0x1000 + 2 * i)}</outbound><inbound>{sa % (0x1001 + 2 * i)}</inbound>"
        "</ikeless></peer>"
    )


def configuration(server: NetconfServer, body: str) -> etree._Element:
    root = new_datastore()
    config = etree.fromstring(
        f'<config xmlns="{NC}"><ce xmlns="{CE}" xmlns:t="{T}"><pre-configuration>'
        "<site-id>a</site-id><vpn-id>v</vpn-id><sp-address>10.0.0.1</sp-address><vpn-server>"
        f"<endpoint><address>198.51.100.1</address><host-key>{HOST_KEY}</host-key></endpoint>"
        "<username>ce</username></vpn-server><management><server-username>s</server-username>"
        f"<server-authorized-key>{HOST_KEY}</server-authorized-key></management>"
        "</pre-configuration><configuration-version>v1</configuration-version>"
        f"{body}</ce></config>"
    )
    Editor(server.index).apply(root, config, "merge")
    return root


def with_defaults(tree: object) -> str:
    return str(tree.print_mem("json", with_siblings=True, include_implicit_defaults=True))  # type: ignore[attr-defined]


def errors_of(validator: Validator, root: etree._Element) -> list[tuple[str, str | None, str]]:
    with pytest.raises(RpcErrors) as exc:
        validator.validate(root)
    return [(e.tag, e.app_tag, e.message) for e in exc.value.errors]


def fresh(server: NetconfServer) -> Validator:
    return Validator(server.schema, server.index)


def test_the_configuration_a_commit_made_validates_again_into_the_same_tree(server):
    validator = fresh(server)
    root = configuration(server, "".join(peer(i) for i in range(20)))
    first = validator.validate(root)
    canonical = validator.canonical(first)
    again = validator.validate(deepcopy(canonical))  # the confirming commit's candidate
    parsed = server.schema.parse_config(serialize(canonical), "xml")
    try:
        assert with_defaults(again) == with_defaults(parsed) == with_defaults(first)
        assert etree.tostring(validator.canonical(again)) == etree.tostring(canonical)
    finally:
        for tree in (first, again, parsed):
            free(tree)


def test_a_tree_handed_out_twice_is_never_the_same_tree(server):
    validator = fresh(server)
    root = configuration(server, peer(1))
    first = validator.validate(root)
    second = validator.validate(root)
    third = validator.validate(root)  # the memo's copy went with the second: parsed anew
    try:
        assert len({id(first), id(second), id(third)}) == 3
        assert {with_defaults(t) for t in (first, second, third)} == {with_defaults(first)}
    finally:
        for tree in (first, second, third):
            free(tree)


def test_a_changed_peer_duplicating_an_unchanged_peers_address_is_refused_as_before(server):
    validator = fresh(server)
    free(validator.validate(configuration(server, "".join(peer(i) for i in range(10)))))
    invalid = configuration(server, "".join(peer(i) for i in range(10)) + peer(10, "10.1.0.4"))
    found = errors_of(validator, invalid)
    assert found == errors_of(fresh(server), invalid)
    assert found[0][:2] == ("operation-failed", "data-not-unique")


def test_a_peer_with_the_ces_own_address_is_refused_as_before(server):
    """The must on a peer's sp-address reads the unchanged pre-configuration."""
    validator = fresh(server)
    free(validator.validate(configuration(server, peer(1))))
    invalid = configuration(server, peer(1) + peer(2, "10.0.0.1"))
    found = errors_of(validator, invalid)
    assert found == errors_of(fresh(server), invalid)
    assert found[0][:2] == ("operation-failed", "must-violation")


def test_removing_the_peer_a_leafref_points_to_is_refused_as_before(server):
    """internet-access/gateway-peer, unchanged, names the peer the change removes."""
    validator = fresh(server)
    gateway = (
        "<internet-access><role>via-gateway-site</role><gateway-peer>site-1</gateway-peer>"
        "</internet-access>"
    )
    free(validator.validate(configuration(server, gateway + peer(1) + peer(2))))
    invalid = configuration(server, gateway + peer(2))
    found = errors_of(validator, invalid)
    assert found == errors_of(fresh(server), invalid)
    assert found[0][:2] == ("data-missing", "instance-required")


def test_an_entry_without_its_key_is_refused_as_before(server):
    validator = fresh(server)
    valid = configuration(server, peer(1))
    free(validator.validate(valid))
    invalid = deepcopy(valid)
    name = invalid.find(f"{{{CE}}}ce/{{{CE}}}peer/{{{CE}}}name")
    assert name is not None
    name.getparent().remove(name)
    found = errors_of(validator, invalid)
    assert found == errors_of(fresh(server), invalid)


def test_a_configuration_changed_in_place_after_validation_is_validated_again(server):
    validator = fresh(server)
    root = configuration(server, peer(1) + peer(2))
    free(validator.validate(root))
    address = root.findall(f"{{{CE}}}ce/{{{CE}}}peer/{{{CE}}}sp-address")[1]
    address.text = "10.1.0.2"  # peer 1's: the unique constraint must fail now
    assert errors_of(validator, root)[0][1] == "data-not-unique"


def test_the_canonical_form_of_the_remembered_configuration_is_shared_not_copied(server):
    """Like the server's datastore trees, what the validator hands out is replaced, never
    changed in place: the confirming commit gets the running tree itself back, and
    compares it with itself for nothing."""
    validator = fresh(server)
    first = validator.validate(configuration(server, peer(1)))
    canonical = validator.canonical(first)
    again = validator.validate(canonical)  # the running tree itself, as the candidate
    try:
        assert validator.canonical(again) is canonical
        assert validator.counts["remembered"] == 1
    finally:
        free(first)
        free(again)


def test_a_transactions_subtree_json_is_the_whole_documents_subtree(server):
    """What the agent reads of a commit besides its peers (Transaction.new_at)."""
    validator = fresh(server)
    tree = validator.validate(configuration(server, peer(1)))
    defaults = server.schema.defaults_json()
    try:
        txn = Transaction(
            new_datastore(), new_datastore(), None, tree, [], None, 0, defaults=defaults
        )
        whole = tree_json(tree, defaults)["cevpn-ce:ce"]
        for step in ("certificates", "pre-configuration", "routing", "configuration-version"):
            assert txn.new_at(f"/cevpn-ce:ce/{step}") == whole.get(step), step
        assert txn.old_at("/cevpn-ce:ce/certificates") == defaults["cevpn-ce:ce"]["certificates"]
    finally:
        free(tree)


# -- incremental validation: the same verdicts, trees and canonical forms as full ---------


def edit_config(edit: str) -> etree._Element:
    return etree.fromstring(
        f'<config xmlns="{NC}"><ce xmlns="{CE}" xmlns:t="{T}" xmlns:nc="{NC}">{edit}</ce></config>'
    )


def edited(server: NetconfServer, root: etree._Element, edit: str) -> etree._Element:
    """``root`` after an edit of its ``ce`` (nc:operation attributes allowed)."""
    work = deepcopy(root)
    Editor(server.index).apply(work, edit_config(edit), "merge")
    return work


EDITS = {
    "add a peer": peer(50),
    "change a peer's prefix": "<peer><name>site-7</name><tunnel><remote-prefix>172.31.0.0/24"
    "</remote-prefix></tunnel></peer>",
    "disable a peer": "<peer><name>site-3</name><enabled>false</enabled></peer>",
    "remove a peer": '<peer nc:operation="remove"><name>site-11</name></peer>',
    "remove the first and add two": '<peer nc:operation="remove"><name>site-0</name></peer>'
    + peer(60)
    + peer(61),
    "change a peer's keying": "<peer><name>site-5</name><ike><pre-shared-key>"
    "0123456789abcdef0123</pre-shared-key></ike></peer>",
    "change something else too": peer(62) + "<minimum-strength>t:strength-128</minimum-strength>",
    # What the VPN server sends (nc_server.ce_config): a new configuration-version, a leaf
    # beside the peers that no constraint reads, with every change.
    "a new version with a new peer, as the server sends them": "<configuration-version "
    'nc:operation="replace">v2</configuration-version>'
    + peer(63).replace("<peer>", '<peer nc:operation="replace">', 1),
    "a new version alone": "<configuration-version>v3</configuration-version>",
    "a new version and a removed peer": "<configuration-version>v4</configuration-version>"
    '<peer nc:operation="remove"><name>site-11</name></peer>',
    "the version removed and a peer added": '<configuration-version nc:operation="remove"/>'
    + peer(64),
}
VALIDATED_WHOLE = {"change something else too", "the version removed and a peer added"}
"""Changes outside the peers and the free leaves beside them."""


@pytest.mark.parametrize("name", sorted(EDITS))
def test_a_valid_change_makes_what_full_validation_makes(server, name):
    validator = fresh(server)
    base = configuration(server, "".join(peer(i) for i in range(40)))
    first = validator.validate(base)
    canonical = validator.canonical(first)
    new = edited(server, canonical, EDITS[name])
    tree = validator.validate(new)
    assert validator.counts["changed-entries"] == (name not in VALIDATED_WHOLE)
    reference = server.schema.parse_config(serialize(new), "xml")
    try:
        assert with_defaults(tree) == with_defaults(reference)
        made = validator.canonical(tree)
        assert etree.tostring(made) == etree.tostring(fresh(server).canonical(reference))
        # and the next change starts from it
        again = validator.validate(edited(server, made, peer(70)))
        free(again)
        assert validator.counts["changed-entries"] == (name not in VALIDATED_WHOLE) + 1
    finally:
        for t in (first, tree, reference):
            free(t)


INVALID = {
    "a new peer with an existing peer's address": peer(50, "10.1.0.4"),
    "a changed peer with an existing peer's address": "<peer><name>site-9</name>"
    "<sp-address>10.1.0.2</sp-address></peer>",
    "a new peer with the CE's own address": peer(50, "10.0.0.1"),
    "a changed peer with another's address written otherwise": "<peer><name>site-9</name>"
    "<sp-address>2001:DB8::0:1</sp-address></peer>",
    "a new peer without its keying": "<peer><name>site-90</name><sp-address>10.1.9.9"
    "</sp-address></peer>",
    "removing the gateway peer": '<peer nc:operation="remove"><name>site-1</name></peer>',
    "a default route to another peer than the gateway": "<peer><name>site-2</name><tunnel>"
    "<remote-prefix>0.0.0.0/0</remote-prefix></tunnel></peer>",
    "a new peer with a version too long": peer(50)
    + f"<configuration-version>{'v' * 65}</configuration-version>",
    "an outbound SA alone": "<peer><name>site-91</name><sp-address>10.1.9.1</sp-address>"
    "<ikeless><outbound><spi>4242</spi><encryption-algorithm>t:encr-aes-gcm-16-256"
    "</encryption-algorithm><encryption-key>"
    + ":".join(["ab"] * 36)
    + "</encryption-key></outbound></ikeless></peer>",
}


@pytest.mark.parametrize("name", sorted(INVALID))
def test_an_invalid_change_is_refused_with_the_rpc_errors_of_full_validation(server, name):
    validator = fresh(server)
    gateway = (
        "<internet-access><role>via-gateway-site</role><gateway-peer>site-1</gateway-peer>"
        "</internet-access>"
    )
    base = configuration(
        server, gateway + "".join(peer(i) for i in range(20)) + peer(30, "2001:db8::1")
    )
    first = validator.validate(base)
    canonical = validator.canonical(first)
    invalid = edited(server, canonical, INVALID[name])
    try:
        assert errors_of(validator, invalid) == errors_of(fresh(server), invalid)
    finally:
        free(first)


# -- the candidate's node-by-node check: the same canonical form and rpc-errors -----------


def whole_check(server: NetconfServer, old: etree._Element, new: etree._Element):  # type: ignore[no-untyped-def]
    validator = fresh(server)
    tree = validator.parse_only(new)
    try:
        canonical = validator.canonical(tree)
    finally:
        free(tree)
    return etree.tostring(canonical), etree.tostring(old) != etree.tostring(canonical)


NODE_EDITS = {
    **EDITS,
    "the same peer again": peer(4),
    "a non-canonical value": "<peer><name>site-8</name><ikeless><replay-window>0064"
    "</replay-window></ikeless></peer>",
    "a non-canonical value equal to the stored one": "<peer><name>site-8</name><tunnel>"
    "<remote-prefix>172.16.8.0/24</remote-prefix></tunnel><enabled>true</enabled></peer>",
}


@pytest.mark.parametrize("name", sorted(NODE_EDITS))
def test_an_edit_of_the_candidate_is_checked_into_the_same_canonical_form(server, name):
    validator = fresh(server)
    old = configuration(server, "".join(peer(i) for i in range(30)))
    tree = validator.parse_only(old)
    old = validator.canonical(tree)
    free(tree)
    new = edited(server, old, NODE_EDITS[name])
    canonical, differs = validator.checked_nodes(old, new)
    assert (etree.tostring(canonical), differs) == whole_check(server, old, new)
    assert validator.counts["checked-entries"] == (name not in VALIDATED_WHOLE)


NODE_ERRORS = {
    "an address that is none": "<peer><name>site-3</name><sp-address>10.1.0.300</sp-address>"
    "</peer>",
    "an SPI out of range": peer(40).replace("<spi>4176</spi>", "<spi>12</spi>"),
    "two bad values in two peers": "<peer><name>site-3</name><sp-address>x</sp-address></peer>"
    "<peer><name>site-4</name><sp-address>y</sp-address></peer>",
    "a version too long": f"<configuration-version>{'v' * 65}</configuration-version>" + peer(40),
}


@pytest.mark.parametrize("name", sorted(NODE_ERRORS))
def test_an_edit_of_the_candidate_is_refused_with_the_rpc_error_of_the_whole_check(server, name):
    validator = fresh(server)
    old = configuration(server, "".join(peer(i) for i in range(30)))
    tree = validator.parse_only(old)
    old = validator.canonical(tree)
    free(tree)
    new = edited(server, old, NODE_ERRORS[name])
    with pytest.raises(RpcErrors) as got:
        validator.checked_nodes(old, new)
    with pytest.raises(RpcErrors) as expected:
        fresh(server).parse_only(new)
    found = [(e.tag, e.app_tag, e.message, e.path) for e in got.value.errors]
    assert found == [(e.tag, e.app_tag, e.message, e.path) for e in expected.value.errors]


@pytest.mark.parametrize("name", sorted(NODE_EDITS))
def test_committing_a_checked_candidate_makes_what_full_validation_makes(server, name):
    """The commit takes the changed entries from the candidate's check, not comparing
    every entry again: the result must not tell."""
    validator = fresh(server)
    first = validator.validate(configuration(server, "".join(peer(i) for i in range(40))))
    running = validator.canonical(first)
    candidate, _ = validator.checked_nodes(running, edited(server, running, NODE_EDITS[name]))
    committed = deepcopy(candidate)  # what candidate_onto_running hands over
    tree = validator.validate(committed)
    reference = server.schema.parse_config(serialize(committed), "xml")
    try:
        entries_only = name not in VALIDATED_WHOLE
        assert validator.counts["recorded"] == entries_only
        assert with_defaults(tree) == with_defaults(reference)
        made = validator.canonical(tree)
        assert etree.tostring(made) == etree.tostring(fresh(server).canonical(reference))
    finally:
        for t in (first, tree, reference):
            free(t)


def test_a_checked_candidate_changed_afterwards_is_compared_again(server):
    validator = fresh(server)
    first = validator.validate(configuration(server, "".join(peer(i) for i in range(10))))
    running = validator.canonical(first)
    candidate, _ = validator.checked_nodes(running, edited(server, running, peer(20)))
    later = edited(server, candidate, "<peer><name>site-2</name><sp-address>10.1.0.2"
                   "</sp-address></peer>")  # fmt: skip
    try:
        assert errors_of(validator, later)[0][1] == "data-not-unique"
        assert validator.counts["recorded"] == 0
    finally:
        free(first)


def described(changes: list[Change], index: object) -> list[tuple[str, str]]:
    return [(c.op, instance_path(c.element, index)[0]) for c in changes]  # type: ignore[arg-type]


@pytest.mark.parametrize("name", sorted(EDITS))
def test_the_diff_of_a_patched_configuration_is_the_diff_of_the_whole(server, name):
    """diff() compares only the entries incremental validation changed: with the same
    changes, in the same order, as comparing everything."""
    validator = fresh(server)
    first = validator.validate(configuration(server, "".join(peer(i) for i in range(40))))
    running = validator.canonical(first)
    tree = validator.validate(edited(server, running, EDITS[name]))
    made = validator.canonical(tree)
    try:
        expected = diff(deepcopy(running), deepcopy(made), server.index)
        assert expected
        assert described(diff(running, made, server.index), server.index) == described(
            expected, server.index
        )
    finally:
        free(first)
        free(tree)


def test_a_tree_compared_with_itself_has_no_changes(server):
    root = configuration(server, peer(1))
    assert diff(root, root, server.index) == []


def test_committing_the_checked_candidate_tree_itself_uses_what_its_check_found(server):
    validator = fresh(server)
    first = validator.validate(configuration(server, "".join(peer(i) for i in range(10))))
    running = validator.canonical(first)
    candidate, _ = validator.checked_nodes(running, edited(server, running, peer(20)))
    tree = validator.validate(candidate)
    reference = server.schema.parse_config(serialize(candidate), "xml")
    try:
        assert validator.counts["recorded"] == 1
        assert with_defaults(tree) == with_defaults(reference)
    finally:
        for t in (first, tree, reference):
            free(t)


@pytest.mark.parametrize("name", sorted(NODE_EDITS))
def test_an_edit_naming_its_entries_is_checked_into_the_same_canonical_form(server, name):
    """Given the edit, only the entries it names are looked at: the others are what they
    were, by what an edit is."""
    validator = fresh(server)
    old = configuration(server, "".join(peer(i) for i in range(30)))
    tree = validator.parse_only(old)
    old = validator.canonical(tree)
    free(tree)
    new = edited(server, old, NODE_EDITS[name])
    canonical, differs = validator.checked_nodes(old, new, edit_config(NODE_EDITS[name]))
    assert (etree.tostring(canonical), differs) == whole_check(server, old, new)
    assert validator.counts["named-entries"] == (name not in VALIDATED_WHOLE)


def test_an_edit_replacing_the_container_names_no_entries(server):
    validator = fresh(server)
    old = configuration(server, "".join(peer(i) for i in range(5)))
    tree = validator.parse_only(old)
    old = validator.canonical(tree)
    free(tree)
    config = edit_config(peer(9))
    config[0].set(f"{{{NC}}}operation", "replace")
    new = deepcopy(old)
    Editor(server.index).apply(new, config, "merge")
    canonical, differs = validator.checked_nodes(old, new, config)
    assert (etree.tostring(canonical), differs) == whole_check(server, old, new)
    assert validator.counts["named-entries"] == 0


def test_a_change_of_many_entries_is_validated_whole(server):
    """Each changed entry costs a look-up among all: past a few, whole is cheaper."""
    validator = fresh(server)
    first = validator.validate(configuration(server, peer(0)))
    running = validator.canonical(first)
    many = "".join(peer(i) for i in range(1, 41))
    candidate, _ = validator.checked_nodes(
        running, edited(server, running, many), edit_config(many)
    )
    tree = validator.validate(candidate)
    try:
        assert validator.counts["named-entries"] == validator.counts["changed-entries"] == 0
        assert validator.counts["whole"] == 2
    finally:
        free(first)
        free(tree)


def test_a_candidate_known_as_a_copy_of_running_is_checked_against_it_without_comparing(server):
    """base_ops passes the running tree a candidate nobody changed is a copy of."""
    validator = fresh(server)
    first = validator.validate(configuration(server, "".join(peer(i) for i in range(10))))
    running = validator.canonical(first)
    old = deepcopy(running)
    new = edited(server, old, peer(20))
    candidate, differs = validator.checked_nodes(old, new, edit_config(peer(20)), copy_of=running)
    tree = validator.validate(deepcopy(candidate))
    reference = server.schema.parse_config(serialize(new), "xml")
    try:
        assert differs and validator.counts["recorded"] == 1
        assert with_defaults(tree) == with_defaults(reference)
    finally:
        for t in (first, tree, reference):
            free(t)


def counting_serialisations(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """From now on, the local name of every element lxml serialises (``etree.tostring``,
    which nc_core.validation and nc_core.list_entries call), in order."""
    written: list[str] = []
    tostring = etree.tostring

    def counting(node: etree._Element, *args: object, **kwargs: object) -> bytes:
        written.append(etree.QName(node).localname)
        return tostring(node, *args, **kwargs)  # type: ignore[no-any-return]

    monkeypatch.setattr(etree, "tostring", counting)
    return written


def test_where_two_configurations_differ_is_found_without_writing_out_the_ce(server, monkeypatch):
    """Finding that a change lies in the peer entries alone serialises only what lies
    beside the path to the list (at 1,000 peers the CE's whole configuration was written
    out twice per check); a change elsewhere is still told apart."""
    from nc_core import validation
    from nc_core.schema import entry_scoped_lists

    lists = entry_scoped_lists(server.index)
    body = "<minimum-strength>t:strength-128</minimum-strength>"
    old = configuration(server, body + "".join(peer(i) for i in range(1, 4)))
    one_peer = configuration(server, body + "".join(peer(i) for i in (1, 2, 3, 4)))
    elsewhere = configuration(server, "<minimum-strength>t:strength-256</minimum-strength>"
                              + "".join(peer(i) for i in range(1, 4)))  # fmt: skip
    written = counting_serialisations(monkeypatch)
    found = validation._entry_change(old, one_peer, lists)
    assert found is not None and found[0].tags[-1] == f"{{{CE}}}peer"
    assert "ce" not in written and "peer" not in written
    same = validation._entry_change(old, deepcopy(old), lists)
    assert same is not None and same[0].tags[-1] == f"{{{CE}}}peer"
    assert validation._entry_change(old, elsewhere, lists) is None


def peers_serialised_by_a_pushed_change(server, monkeypatch, peers: int) -> int:  # type: ignore[no-untyped-def]
    """Peers serialised by the check and commit of a server-like push (version, a changed
    peer, a new one) made right after a configuration of ``peers`` validated whole."""
    validator = fresh(server)
    first = validator.validate(configuration(server, "".join(peer(i) for i in range(peers))))
    running = validator.canonical(first)
    edit = (
        '<configuration-version nc:operation="replace">v9</configuration-version>'
        "<peer><name>site-7</name><tunnel><remote-prefix>172.31.0.0/24</remote-prefix>"
        "</tunnel></peer>" + peer(200)
    )
    work = edited(server, running, edit)
    written = counting_serialisations(monkeypatch)
    candidate, differs = validator.checked_nodes(
        running, work, edit_config(edit), copy_of=running, owned=True
    )
    tree = validator.validate(candidate)
    monkeypatch.undo()
    reference = server.schema.parse_config(serialize(candidate), "xml")
    try:
        assert differs and validator.counts["recorded"] == 1
        assert with_defaults(tree) == with_defaults(reference)
    finally:
        for t in (first, tree, reference):
            free(t)
    return written.count("peer")


def test_a_pushed_change_after_a_whole_one_serialises_only_the_peers_it_names(server, monkeypatch):
    """The first small change after a configuration validated whole (a CE's full mesh,
    then a site added) compares the peers it names with what they were, not every peer
    (which cost a CE holding 1,000 peers 8 ms per push)."""
    few = peers_serialised_by_a_pushed_change(server, monkeypatch, 20)
    many = peers_serialised_by_a_pushed_change(server, monkeypatch, 80)
    assert few == many < 20
