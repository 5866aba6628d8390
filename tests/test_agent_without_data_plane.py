"""An agent without a data plane (--dataplane none, for scale tests of the VPN server) says so:
in each peer's state, and when asked to reset a tunnel.  A real agent over NETCONF."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from lxml import etree
from ncclient.operations.rpc import RPCError
from ncclient.xml_ import to_ele

from tests.netconf_server import VIEWER, ServerProcess, ncclient_connect, running_server

NC = "urn:ietf:params:xml:ns:netconf:base:1.0"
CE = "urn:cevpn:yang:cevpn-ce"
PEER = (
    f'<config xmlns="{NC}"><ce xmlns="{CE}"><peer><name>site-b</name>'
    "<sp-address>192.0.2.2</sp-address><ike><pre-shared-key>0123456789abcdef0123"
    "</pre-shared-key></ike></peer></ce></config>"
)
RESET = f'<reset-tunnel xmlns="{CE}"><peer>site-b</peer></reset-tunnel>'


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with running_server(tmp_path_factory.mktemp("ce"), "cevpn-agent", "--dataplane", "none") as srv:
        with ncclient_connect(srv) as m:
            m.edit_config(target="running", config=PEER)
        yield srv


def test_each_peers_state_says_there_is_no_data_plane(agent):
    with ncclient_connect(agent) as m:
        data = m.get(filter=("subtree", f'<ce xmlns="{CE}"><peer/></ce>')).data_xml
    state = etree.fromstring(data.encode()).find(f".//{{{CE}}}state")
    assert state is not None
    assert state.findtext(f"{{{CE}}}status") == "no-data-plane"
    assert "--dataplane none" in (state.findtext(f"{{{CE}}}last-error") or "")


def test_reset_tunnel_says_there_is_no_tunnel_to_reset(agent):
    with ncclient_connect(agent) as m, pytest.raises(RPCError) as exc:
        m.dispatch(to_ele(RESET))
    assert exc.value.tag == "operation-failed"
    assert "without a data plane" in exc.value.message
    assert "site-b" in (exc.value.path or "")


def test_reset_tunnel_is_not_for_an_account_in_no_group(agent: ServerProcess, tmp_path: Path):
    with ncclient_connect(agent, VIEWER) as m, pytest.raises(RPCError) as exc:
        m.dispatch(to_ele(RESET))
    assert exc.value.tag == "access-denied"


# -- one-peer changes on a CE with many peers (incremental validation) ---------------------

KEY = ":".join(["ab"] * 36)


def many_peers_xml(indices: range | list[int], extra: str = "") -> str:
    sa = (
        "<spi>%d</spi><encryption-algorithm xmlns:t='urn:cevpn:yang:cevpn-types'>"
        f"t:encr-aes-gcm-16-256</encryption-algorithm><encryption-key>{KEY}</encryption-key>"
    )
    peers = "".join(
        f"<peer><name>p{i}</name><sp-address>10.9.{i // 250}.{1 + i % 250}</sp-address>"
        f"<tunnel><remote-prefix>172.20.{i}.0/24</remote-prefix></tunnel><ikeless>"
        f"<outbound>{sa % (0x3000 + 2 * i)}</outbound><inbound>{sa % (0x3001 + 2 * i)}</inbound>"
        "</ikeless></peer>"
        for i in indices
    )
    return f'<config xmlns="{NC}"><ce xmlns="{CE}">{peers}{extra}</ce></config>'


def running_ce(m) -> bytes:  # type: ignore[no-untyped-def]
    data = m.get_config("running", filter=("subtree", f'<ce xmlns="{CE}"/>')).data_xml
    return etree.tostring(etree.fromstring(data.encode()), method="c14n")


@pytest.fixture
def loaded(agent: ServerProcess) -> Iterator[ServerProcess]:
    with ncclient_connect(agent) as m:
        m.edit_config(target="running", config=many_peers_xml(range(60)))
    yield agent
    with ncclient_connect(agent) as m:
        m.edit_config(
            target="running",
            config=f'<config xmlns="{NC}" xmlns:nc="{NC}"><ce xmlns="{CE}">'
            + "".join(f'<peer nc:operation="remove"><name>p{i}</name></peer>' for i in range(61))
            + "</ce></config>",
        )


ONE_PEER = many_peers_xml(
    [60],
    "<peer><name>p3</name><tunnel><remote-prefix>172.30.0.0/24</remote-prefix></tunnel></peer>",
)
"""Peer p60 added and p3's prefix changed: what the VPN server sends for one new site."""


def test_a_cancelled_confirmed_one_peer_commit_restores_exactly_the_configuration(loaded):
    with ncclient_connect(loaded) as m:
        before = running_ce(m)
        m.discard_changes()
        m.edit_config(target="candidate", config=ONE_PEER)
        m.commit(confirmed=True, timeout="120", persist="t1")
        assert running_ce(m) != before
        m.cancel_commit(persist_id="t1")
        assert running_ce(m) == before


def test_a_confirmed_one_peer_commit_stays_once_confirmed_from_another_session(loaded):
    with ncclient_connect(loaded) as m:
        before = running_ce(m)
        m.discard_changes()
        m.edit_config(target="candidate", config=ONE_PEER)
        m.commit(confirmed=True, timeout="120", persist="t2")
        during = running_ce(m)
    with ncclient_connect(loaded) as m:
        m.commit(persist_id="t2")
        assert running_ce(m) == during != before
        assert during.count(b"<name>p60</name>") == 1


def test_a_one_peer_change_duplicating_an_address_is_refused_as_full_validation_refuses(loaded):
    duplicate = ONE_PEER.replace("10.9.0.61", "10.9.0.5")
    with ncclient_connect(loaded) as m, pytest.raises(RPCError) as exc:
        m.discard_changes()
        m.edit_config(target="candidate", config=duplicate)
        m.commit()
    assert exc.value.tag == "operation-failed"
    assert "Unique data leaf" in exc.value.message
