"""The candidate shares running's tree until it is edited (copy-on-write), and nothing
ever changes a datastore tree in place.

NetconfServer.reset_candidate makes the candidate running's own tree instead of a copy
of it, candidate_onto_running hands the candidate itself to change_running, and the
validator may keep the candidate's checked tree as the new running configuration
(nc_core.validation).  That is only sound if no operation ever modifies a tree that
running (or the rollback of a confirmed commit) still references: each test takes the
trees a server holds, runs one operation, and checks that every one of them still
serialises to the same bytes.

An in-process server (real SSH, ncclient) serving the CE model, so that edits of peers
go through the incremental paths a CE's commits take.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from lxml import etree
from ncclient.operations.rpc import RPCError
from ncclient.xml_ import to_ele

from nc_core.errors import RpcError
from nc_core.schema import CE_MODULES
from nc_core.transaction import Application, Transaction
from nc_core.users import has_clear_text_passwords
from tests.in_process import InProcessServer

NC = "urn:ietf:params:xml:ns:netconf:base:1.0"
CE = "urn:cevpn:yang:cevpn-ce"
T = "urn:cevpn:yang:cevpn-types"
SYS = "urn:ietf:params:xml:ns:yang:ietf-system"
HOST_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHvPq4zJr6uZ0ZbqT6hzK3y9zN0s9jzrUO3qS5tKqK8C x"
PEERS = 40


class Refusing(Application):
    """The CE model; refuses a transaction in validate, or fails in apply, when told to."""

    modules = CE_MODULES

    def __init__(self) -> None:
        self.refuse = False
        self.fail_apply = False

    async def validate(self, txn: Transaction) -> None:
        if self.refuse and not txn.dry_run:
            raise RpcError("operation-failed", "refused by the test application")

    async def apply(self, txn: Transaction) -> None:
        if self.fail_apply:
            raise RuntimeError("apply failed on purpose")


def peer(i: int, prefix: int = 0) -> str:
    key = ":".join(["ab"] * 36)
    sa = (
        "<spi>%d</spi><encryption-algorithm>t:encr-aes-gcm-16-256</encryption-algorithm>"
        f"<encryption-key>{key}</encryption-key>"
    )
    return (
        f"<peer><name>site-{i}</name><sp-address>10.1.{i // 250}.{1 + i % 250}</sp-address>"
        f"<tunnel><remote-prefix>172.{16 + prefix}.{i % 250}.0/24</remote-prefix></tunnel>"
        f"<ikeless><outbound>{sa % (0x1000 + 2 * i)}</outbound>"
        f"<inbound>{sa % (0x1001 + 2 * i)}</inbound></ikeless></peer>"
    )


def config(body: str) -> str:
    return f'<config xmlns="{NC}"><ce xmlns="{CE}" xmlns:t="{T}">{body}</ce></config>'


def preconfiguration() -> str:
    return (
        "<pre-configuration><site-id>a</site-id><vpn-id>v</vpn-id>"
        "<sp-address>10.0.0.1</sp-address><vpn-server><endpoint>"
        f"<address>198.51.100.1</address><host-key>{HOST_KEY}</host-key></endpoint>"
        "<username>ce</username></vpn-server><management><server-username>s</server-username>"
        f"<server-authorized-key>{HOST_KEY}</server-authorized-key></management>"
        "</pre-configuration>"
    )


def clear_text_user(name: str) -> str:
    return (
        f'<config xmlns="{NC}"><system xmlns="{SYS}"><authentication><user>'
        f"<name>{name}</name><password>$0$secret-{name}</password>"
        "</user></authentication></system></config>"
    )


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessServer]:
    server = InProcessServer(Path(tmp_path_factory.mktemp("state")), Refusing())
    with server.connect() as m:
        body = preconfiguration() + "".join(peer(i) for i in range(PEERS))
        m.edit_config(target="running", config=config(body))
    yield server
    server.close()


@pytest.fixture
def m(lab: InProcessServer) -> Iterator[object]:
    app = lab.app
    assert isinstance(app, Refusing)
    app.refuse = app.fail_apply = False
    with lab.connect() as session:
        session.discard_changes()
        yield session


class Snapshot:
    """The trees a server holds now (running, candidate, a confirmed commit's rollback
    configuration), each with its bytes: :meth:`unchanged` says whether every one of
    them still serialises to the same bytes, whatever the server holds since."""

    def __init__(self, lab: InProcessServer) -> None:
        def take() -> list[tuple[etree._Element, bytes]]:
            server = lab.server
            trees = [server.datastores["running"].root, server.datastores["candidate"].root]
            pending = server.confirmed.pending
            if pending is not None:
                trees.append(pending.rollback_to)
            return [(tree, etree.tostring(tree)) for tree in trees]

        self.lab = lab
        self.trees = lab.run(take)

    def unchanged(self) -> bool:
        return self.lab.run(lambda: all(etree.tostring(t) == b for t, b in self.trees))


def running_root(lab: InProcessServer) -> etree._Element:
    return lab.run(lambda: lab.server.datastores["running"].root)


def candidate_root(lab: InProcessServer) -> etree._Element:
    return lab.run(lambda: lab.server.datastores["candidate"].root)


def test_a_discarded_candidate_is_runnings_own_tree_not_a_copy(lab, m):
    m.edit_config(target="candidate", config=config(peer(1, prefix=1)))
    m.discard_changes()
    assert candidate_root(lab) is running_root(lab)


def test_a_committed_candidate_is_then_runnings_own_tree(lab, m):
    m.edit_config(target="candidate", config=config(peer(2, prefix=2)))
    m.commit()
    assert candidate_root(lab) is running_root(lab)


def test_an_edit_of_the_candidate_leaves_runnings_tree_unchanged(lab, m):
    before = Snapshot(lab)
    m.edit_config(target="candidate", config=config(peer(3, prefix=3)))
    assert before.unchanged()
    assert candidate_root(lab) is not running_root(lab)


def test_an_edit_adding_and_removing_peers_leaves_runnings_tree_unchanged(lab, m):
    before = Snapshot(lab)
    remove = f'<peer xmlns:nc="{NC}" nc:operation="remove"><name>site-4</name></peer>'
    m.edit_config(target="candidate", config=config(peer(PEERS + 1) + remove))
    assert before.unchanged()


def test_an_edit_that_fails_leaves_running_and_the_shared_candidate_unchanged(lab, m):
    before = Snapshot(lab)
    create = peer(5).replace("<peer>", f'<peer xmlns:nc="{NC}" nc:operation="create">')
    with pytest.raises(RPCError):
        m.edit_config(target="candidate", config=config(create))  # site-5 exists
    assert before.unchanged()
    assert candidate_root(lab) is running_root(lab)


def test_discarding_an_edit_leaves_runnings_tree_unchanged(lab, m):
    m.edit_config(target="candidate", config=config(peer(6, prefix=4)))
    before = Snapshot(lab)
    m.discard_changes()
    assert before.unchanged()


def test_a_commit_refused_by_the_application_leaves_every_tree_unchanged(lab, m):
    m.edit_config(target="candidate", config=config(peer(7, prefix=5)))
    before = Snapshot(lab)
    lab.app.refuse = True  # type: ignore[attr-defined]
    with pytest.raises(RPCError):
        m.commit()
    assert before.unchanged()


def test_a_commit_whose_apply_fails_leaves_every_tree_unchanged(lab, m):
    m.edit_config(target="candidate", config=config(peer(8, prefix=6)))
    before = Snapshot(lab)
    lab.app.fail_apply = True  # type: ignore[attr-defined]
    with pytest.raises(RPCError):
        m.commit()
    assert before.unchanged()


def test_a_commit_refused_by_validation_leaves_every_tree_unchanged(lab, m):
    # site-10's sp-address given to site-9 too: sp-address is unique among peers.
    taken = "<peer><name>site-9</name><sp-address>10.1.0.11</sp-address></peer>"
    m.edit_config(target="candidate", config=config(taken))
    before = Snapshot(lab)
    with pytest.raises(RPCError):
        m.commit()
    assert before.unchanged()


def test_a_confirmed_commit_leaves_the_configuration_it_replaced_unchanged(lab, m):
    m.edit_config(target="candidate", config=config(peer(11, prefix=7)))
    before = Snapshot(lab)
    m.commit(confirmed=True, timeout="60")
    try:
        assert before.unchanged()
    finally:
        m.dispatch(to_ele(f'<cancel-commit xmlns="{NC}"/>'))


def test_rolling_back_a_confirmed_commit_leaves_every_tree_unchanged(lab, m):
    replaced = running_root(lab)
    m.edit_config(target="candidate", config=config(peer(12, prefix=8)))
    m.commit(confirmed=True, timeout="60")
    before = Snapshot(lab)
    m.dispatch(to_ele(f'<cancel-commit xmlns="{NC}"/>'))
    assert before.unchanged()
    assert etree.tostring(running_root(lab)) == etree.tostring(replaced)


def test_confirming_a_confirmed_commit_leaves_every_tree_unchanged(lab, m):
    m.edit_config(target="candidate", config=config(peer(13, prefix=9)))
    m.commit(confirmed=True, timeout="60")
    before = Snapshot(lab)
    m.commit()
    assert before.unchanged()


def test_a_clear_text_password_is_hashed_in_the_edited_copy_not_in_running(lab, m):
    before = Snapshot(lab)
    m.edit_config(target="candidate", config=clear_text_user("alice"))
    assert before.unchanged()
    candidate = candidate_root(lab)
    assert not lab.run(lambda: has_clear_text_passwords(candidate))


def test_a_commit_hashing_a_password_hashes_a_copy_of_the_tree_it_is_given(lab, m):
    running = running_root(lab)
    given = lab.run(lambda: etree.fromstring(etree.tostring(running)))
    users = given.find(f"{{{SYS}}}system/{{{SYS}}}authentication")
    user = etree.SubElement(users, f"{{{SYS}}}user")
    etree.SubElement(user, f"{{{SYS}}}name").text = "bob"
    etree.SubElement(user, f"{{{SYS}}}password").text = "$0$secret-bob"
    given_bytes = etree.tostring(given)
    before = Snapshot(lab)

    async def commit() -> None:
        async with lab.server.config_lock:
            await lab.server.change_running(given, None, reason="test", check_access=False)

    lab.call(commit())
    assert etree.tostring(given) == given_bytes  # still clear text: not changed in place
    assert before.unchanged()
    running = running_root(lab)
    assert not lab.run(lambda: has_clear_text_passwords(running))


def test_running_as_a_client_reads_it_is_what_was_committed(lab, m):
    m.edit_config(target="candidate", config=config(peer(14, prefix=10)))
    m.commit()
    reply = m.get_config(source="running", filter=("subtree", f'<ce xmlns="{CE}"/>')).data_xml
    stored = etree.fromstring(reply.encode())
    prefix = stored.xpath(
        "//c:peer[c:name='site-14']/c:tunnel/c:remote-prefix/text()", namespaces={"c": CE}
    )
    assert "172.26.14.0/24" in prefix
