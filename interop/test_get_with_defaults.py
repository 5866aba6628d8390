"""<get> (configuration and state) in every with-defaults mode of RFC 6243, through ncclient,
on both servers, without a filter and with subtree and XPath filters.

The VPN server is given a VPN whose ``site-removal`` is left to its default;
the CE agent (``--dataplane none``) a ``/ce`` container whose
``minimum-strength`` is left to its default.  State data (RFC 6022
monitoring) is in every unfiltered reply.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest

from tests.netconf_server import ServerProcess, ncclient_connect, running_server

NC = "urn:ietf:params:xml:ns:netconf:base:1.0"
SVC = "urn:cevpn:yang:cevpn-service"
CE = "urn:cevpn:yang:cevpn-ce"
WD_ATTR = "urn:ietf:params:xml:ns:netconf:default:1.0"
MODES = ["report-all", "trim", "report-all-tagged", "explicit"]

SERVERS = {
    "cevpn-server": {
        "config": (
            f'<config xmlns="{NC}"><vpn-service xmlns="{SVC}"><vpn><id>acme</id>'
            "<customer>ACME</customer><topology><type>full-mesh</type></topology>"
            "<site><id>a</id><ce-address>192.0.2.1</ce-address>"
            "<local-prefix>10.1.0.0/24</local-prefix></site>"
            "</vpn></vpn-service></config>"
        ),
        "subtree": f'<vpn-service xmlns="{SVC}"><vpn><id>acme</id></vpn></vpn-service>',
        "xpath": ({"s": SVC}, "/s:vpn-service/s:vpn[s:id='acme']"),
        "default": r"<site-removal[^>]*>deprovision</site-removal>",
        "explicit": "<customer>ACME</customer>",
    },
    "cevpn-agent": {
        "config": (
            f'<config xmlns="{NC}"><ce xmlns="{CE}"><configuration-version>v1'
            "</configuration-version></ce></config>"
        ),
        "subtree": f'<ce xmlns="{CE}"/>',
        "xpath": ({"c": CE}, "/c:ce"),
        "default": r"<minimum-strength[^>]*>[\w-]+:strength-128</minimum-strength>",
        "explicit": "<configuration-version>v1</configuration-version>",
    },
}


@pytest.fixture(scope="module", params=list(SERVERS))
def server(request, tmp_path_factory) -> Iterator[tuple[str, ServerProcess]]:  # type: ignore[no-untyped-def]
    command = request.param
    extra = ("--dataplane", "none") if command == "cevpn-agent" else ()
    with running_server(tmp_path_factory.mktemp(command), command, *extra) as srv:
        with ncclient_connect(srv) as m:
            m.edit_config(target="running", config=SERVERS[command]["config"])
        yield command, srv


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", ["no-filter", "subtree", "xpath"])
def test_get_answers_in_every_with_defaults_mode(server, mode, kind):
    command, srv = server
    case = SERVERS[command]
    flt = None if kind == "no-filter" else (kind, case[kind])
    with ncclient_connect(srv) as m:
        reply = m.get(filter=flt, with_defaults=mode).data_xml
    assert case["explicit"] in reply
    has_default = re.search(case["default"], reply) is not None
    assert has_default == (mode in ("report-all", "report-all-tagged"))
    assert (WD_ATTR in reply) == (mode == "report-all-tagged")
    if kind == "no-filter":
        assert "<netconf-state" in reply  # state data too
