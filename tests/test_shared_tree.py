"""Validated trees made from their predecessor when first needed, in place once nobody
else holds it (nc_core.shared_tree): what a holder reads is what full validation makes,
reads outside the changed list do not make the tree, and a violating change is refused
with full validation's rpc-errors whatever is pending."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from nc_core.datastore import free, serialize
from nc_core.server import NetconfServer, ServerOptions
from nc_core.shared_tree import LazyNode, SharedTree, has_node
from nc_core.transaction import Transaction
from nc_core.validation import Validator
from tests.test_validator_memo import (
    CeOnly,
    configuration,
    edited,
    errors_of,
    fresh,
    peer,
    with_defaults,
)

PRE = "/cevpn-ce:ce/pre-configuration"
VERSION = "/cevpn-ce:ce/configuration-version"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NetconfServer]:
    yield NetconfServer(ServerOptions(state_dir=tmp_path_factory.mktemp("state")), CeOnly())


def is_whole_validation(server: NetconfServer, tree: Any, validator: Validator) -> bool:
    """Whether ``tree`` prints as parsing its canonical form whole does."""
    whole = server.schema.parse_config(serialize(validator.canonical(tree)), "xml")
    try:
        return with_defaults(tree) == with_defaults(whole)
    finally:
        free(whole)


def start(server: NetconfServer) -> tuple[Validator, Any]:
    """A validator that remembers 10 peers (with the canonical form, as a commit makes)."""
    validator = fresh(server)
    tree = validator.validate(configuration(server, "".join(peer(i) for i in range(10))))
    validator.canonical(tree)
    return validator, tree


def changed(server: NetconfServer, validator: Validator, tree: Any, edit: str) -> Any:
    return validator.validate(edited(server, validator.canonical(tree), edit))


def test_a_one_peer_change_is_handed_out_pending_and_read_outside_the_peers_unmade(server):
    validator, old = start(server)
    new = changed(server, validator, old, peer(10))
    assert isinstance(new, LazyNode) and new.shared_tree.pending is not None
    txn = Transaction(validator.canonical(old), validator.canonical(new), old, new, [], None, 0)
    assert txn.new_at(PRE) == txn.old_at(PRE) is not None
    assert txn.new_at(VERSION) == "v1"
    assert has_node(new, "/cevpn-ce:ce")
    assert has_node(new, VERSION)
    assert not has_node(new, "/cevpn-ce:ce/certificates/certificate")
    assert new.shared_tree.pending is not None  # nothing above made it
    free(old)
    free(new)


def test_a_changed_leaf_beside_the_peers_is_read_from_the_change(server):
    """The configuration's version, changed with a peer as the VPN server pushes it: a
    free leaf (nc_core.schema), patched with the entries, never read from the base."""
    validator, old = start(server)
    new = changed(
        server, validator, old, peer(10) + "<configuration-version>v2</configuration-version>"
    )
    assert isinstance(new, LazyNode) and new.shared_tree.pending is not None
    assert validator.counts["changed-entries"] == 1
    assert has_node(new, VERSION)
    txn = Transaction(validator.canonical(old), validator.canonical(new), old, new, [], None, 0)
    assert (txn.old_at(VERSION), txn.new_at(VERSION)) == ("v1", "v2")
    assert new.shared_tree.pending is not None  # read from the change, not made for that
    assert is_whole_validation(server, new, validator)
    free(old)
    free(new)


def test_a_pending_tree_made_while_its_predecessor_is_held_is_a_copy(server):
    validator, old = start(server)
    old_json = with_defaults(old)
    new = changed(server, validator, old, peer(10))
    assert isinstance(new, LazyNode)
    assert is_whole_validation(server, new, validator)
    assert with_defaults(old) == old_json
    free(old)
    free(new)


def test_a_pending_tree_made_in_place_is_what_full_validation_makes(server, monkeypatch):
    taken: list[SharedTree] = []
    take_over = SharedTree.take_over
    monkeypatch.setattr(SharedTree, "take_over", lambda s: taken.append(s) or take_over(s))
    validator, old = start(server)
    base = validator._valid.tree  # type: ignore[union-attr]
    new = changed(server, validator, old, peer(10))
    assert isinstance(new, LazyNode)
    free(old)  # the pending tree holds the last reference to its predecessor
    newer = changed(server, validator, new, peer(11))  # which it is made of: in place
    assert taken == [base]
    assert validator.counts["changed-entries"] == 2
    assert is_whole_validation(server, new, validator)  # made in place, still held
    assert is_whole_validation(server, newer, validator)
    free(new)
    free(newer)


def test_a_change_duplicating_an_address_is_refused_as_before_with_a_pending_tree(server):
    validator, old = start(server)
    new = changed(server, validator, old, peer(10))
    assert isinstance(new, LazyNode)
    invalid = edited(server, validator.canonical(new), peer(11, "10.1.0.4"))
    found = errors_of(validator, invalid)
    assert found == errors_of(fresh(server), invalid)
    assert found[0][:2] == ("operation-failed", "data-not-unique")
    free(old)
    free(new)
