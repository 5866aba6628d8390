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
