"""An edit's copy of running made from the configuration the last commit replaced
(nc_core.spare_tree): the same bytes as a deep copy, and never made of a tree someone
else still holds."""

from __future__ import annotations

from collections.abc import Iterator
from copy import deepcopy
from pathlib import Path

import pytest
from lxml import etree
from ncclient.xml_ import to_ele

from nc_core.datastore import document_bytes
from nc_core.spare_tree import Spare, copy_from_spare
from tests.in_process import InProcessServer
from tests.test_document_splice import configuration, leaf, patch_of, peer, server_with_peers
from tests.test_shared_candidate import config as ce_config
from tests.test_shared_candidate import peer as ce_peer
from tests.waiting import wait_for

NC = "urn:ietf:params:xml:ns:netconf:base:1.0"


def changed(old: etree._Element) -> etree._Element:
    """``old`` with site-3 removed, site-7 changed and site-50 added."""
    new = deepcopy(old)
    gone = peer(new, "site-3")
    gone.getparent().remove(gone)  # type: ignore[union-attr]
    peer(new, "site-7")[1].text = "10.9.9.9"
    added = deepcopy(peer(new, "site-8"))
    added[0].text = "site-50"
    peer(new, "site-49").addnext(added)
    return new


def test_a_copy_from_the_spare_has_the_bytes_of_the_configuration_it_copies() -> None:
    old = configuration(50)
    new = changed(old)
    spare = Spare(
        patch_of(old, new, removed=("site-3",), changed=("site-7", "site-50"), fresh=("site-50",))
    )
    del old
    copy = copy_from_spare(spare, new)
    assert copy is not None and copy is not new
    assert document_bytes(copy) == document_bytes(new)


def test_a_copy_from_the_spare_has_the_changed_leaf_beside_the_entries() -> None:
    old = configuration(50)
    new = changed(old)
    leaf(new, "site-id").text = "another-site"
    spare = Spare(
        patch_of(
            old,
            new,
            removed=("site-3",),
            changed=("site-7", "site-50"),
            fresh=("site-50",),
            leaves=("site-id",),
        )
    )
    del old
    copy = copy_from_spare(spare, new)
    assert copy is not None and copy is not new
    assert document_bytes(copy) == document_bytes(new)


def test_a_spare_someone_else_holds_is_not_changed() -> None:
    old = configuration(50)
    new = changed(old)
    before = document_bytes(old)
    spare = Spare(
        patch_of(old, new, removed=("site-3",), changed=("site-7", "site-50"), fresh=("site-50",))
    )
    assert copy_from_spare(spare, new) is None  # ``old`` is still held here
    assert document_bytes(old) == before


def test_a_spare_of_another_configuration_is_not_used() -> None:
    old = configuration(50)
    new = changed(old)
    spare = Spare(patch_of(old, new, changed=("site-7",)))
    del old
    assert copy_from_spare(spare, deepcopy(new)) is None


# -- a server's edits ----------------------------------------------------------------------


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[InProcessServer]:
    with server_with_peers(tmp_path) as server:
        yield server


def running_bytes(lab: InProcessServer) -> bytes:
    return lab.run(lambda: document_bytes(lab.server.datastores["running"].root))


def candidate_bytes(lab: InProcessServer) -> bytes:
    return lab.run(lambda: document_bytes(lab.server.datastores["candidate"].root))


def test_edits_after_one_peer_commits_copy_running_from_the_replaced_configuration(
    lab: InProcessServer,
) -> None:
    remove = f'<peer xmlns:nc="{NC}" nc:operation="remove"><name>site-41</name></peer>'
    with lab.connect() as m:
        for edit in (ce_peer(1, prefix=1), ce_peer(41), ce_peer(2, prefix=2), remove):
            m.edit_config(target="candidate", config=ce_config(edit))
            m.commit()
        m.edit_config(target="candidate", config=ce_config(ce_peer(3, prefix=3)))
        expected = etree.fromstring(running_bytes(lab))
        tunnel = peer(expected, "site-3").find("{urn:cevpn:yang:cevpn-ce}tunnel")
        assert tunnel is not None
        tunnel.append(deepcopy(tunnel[0]))  # remote-prefix is a leaf-list: merged, added
        tunnel[-1].text = "172.19.3.0/24"
        assert candidate_bytes(lab) == document_bytes(expected)
    assert lab.run(lambda: lab.server.spare_copies) == 4


def test_a_pending_confirmed_commit_keeps_its_rollback_configuration_whole(
    lab: InProcessServer,
) -> None:
    before = running_bytes(lab)
    with lab.connect() as m:
        m.edit_config(target="candidate", config=ce_config(ce_peer(1, prefix=1)))
        m.commit(confirmed=True, timeout="60")
        m.edit_config(target="candidate", config=ce_config(ce_peer(2, prefix=2)))
        assert lab.run(lambda: lab.server.spare_copies) == 0  # the rollback holds it
        m.dispatch(to_ele(f'<cancel-commit xmlns="{NC}"/>'))
    assert running_bytes(lab) == before


def test_a_spare_no_edit_came_for_is_let_go_and_the_next_copy_is_made_whole(
    tmp_path: Path,
) -> None:
    """An idle server holds one copy of its configuration, not two."""
    with server_with_peers(tmp_path, spare_keep_seconds=0) as lab:
        with lab.connect() as m:
            m.edit_config(target="candidate", config=ce_config(ce_peer(1, prefix=1)))
            m.commit()
            wait_for(lambda: lab.run(lambda: lab.server._spare) is None, 10, "the spare let go")
            m.edit_config(target="candidate", config=ce_config(ce_peer(2, prefix=2)))
            m.commit()
            assert running_bytes(lab) == candidate_bytes(lab)
            assert b"site-2" in running_bytes(lab) and b"site-1" in running_bytes(lab)
        assert lab.run(lambda: lab.server.spare_copies) == 0
