"""Seed 3.4 and 4.3 over NETCONF: traffic-driven tunnels with dynamic routing are refused.

Both servers are real processes spoken to with ncclient over SSH; the refusal
is a correct rpc-error (its path names the offending node, its message says
why) and the running datastore is unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from lxml import etree
from ncclient.operations import RPCError

from tests.netconf_server import ServerProcess, ncclient_connect, running_server

NC = "urn:ietf:params:xml:ns:netconf:base:1.0"
EXAMPLES = Path(__file__).resolve().parent / "examples" / "invalid"
MESSAGE = "cannot be combined with dynamic routing"


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with running_server(tmp_path_factory.mktemp("ce"), "cevpn-agent", "--dataplane", "none") as srv:
        yield srv


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with running_server(tmp_path_factory.mktemp("sp")) as srv:
        yield srv


def _config(document: str) -> str:
    return f'<config xmlns="{NC}">{document}</config>'


def test_a_ce_refuses_a_traffic_driven_tunnel_with_dynamic_routing(agent: ServerProcess) -> None:
    ce = etree.tostring(etree.parse(str(EXAMPLES / "ce-traffic-driven-with-dynamic-routing.xml")))
    with ncclient_connect(agent) as m:
        before = m.get_config(source="running").data_xml
        with pytest.raises(RPCError) as refused:
            m.edit_config(target="running", config=_config(ce.decode()))
        after = m.get_config(source="running").data_xml
    assert MESSAGE in refused.value.message
    assert refused.value.path.rstrip().endswith("/cevpn-ce:establishment"), refused.value.path
    # RFC 7950 15.1: a violated 'must' is operation-failed with app-tag must-violation.
    assert (refused.value.tag, refused.value.app_tag) == ("operation-failed", "must-violation")
    assert before == after


def test_the_vpn_server_refuses_a_traffic_driven_vpn_running_ospf(server: ServerProcess) -> None:
    vpn = (
        '<vpn-service xmlns="urn:cevpn:yang:cevpn-service"><vpn><id>acme</id>'
        "<customer>ACME</customer><tunnel-defaults><establishment>traffic-driven"
        "</establishment></tunnel-defaults><routing><protocol>ospf</protocol></routing>"
        "<site><id>site-a</id><ce-address>192.0.2.1</ce-address></site></vpn></vpn-service>"
    )
    with ncclient_connect(server) as m:
        before = m.get_config(source="running").data_xml
        with pytest.raises(RPCError) as refused:
            m.edit_config(target="running", config=_config(vpn))
        after = m.get_config(source="running").data_xml
    assert "dynamic routing" in refused.value.message, refused.value.message
    assert "establishment" in refused.value.path, refused.value.path
    assert before == after
