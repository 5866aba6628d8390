"""nc_agent.routing without a daemon: the plan from the configuration, bird.conf, birdc output.

The rendered files are also handed to ``bird -p`` (parse only) when BIRD is
installed, so a configuration BIRD cannot read never ships.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from nc_agent.routing.bird import (
    CONTROL_SOCKET,
    Bird,
    Neighbor,
    failure,
    parse_neighbors,
    parse_routes,
    reply_lines,
)
from nc_agent.routing.bird_config import (
    OspfInterface,
    RoutingConfigProblem,
    RoutingPlan,
    kept_from_kernel,
    plan_from_config,
    reaches_kernel,
    render,
    router_id,
)
from tests.yang_defaults import ce_with_defaults

BIRD = "/usr/sbin/bird"
DEVICES = {"site-2": "cvi0002", "site-3": "cvi0003", "site-4": "cvi0004", "site-5": "cvt0005"}
LOG = Path("/var/lib/cevpn/routing/bird.log")


def peer(name: str, **tunnel: Any) -> dict[str, Any]:
    return {
        "name": name,
        "sp-address": "198.51.100.6",
        "enabled": tunnel.pop("enabled", True),
        "tunnel": {"dynamic-routing": True, "encapsulation": "transport-ipip", **tunnel},
    }


def ce_config(**changes: Any) -> dict[str, Any]:
    """A CE with OSPF on two peers, as RFC 7951 JSON with defaults."""
    ce: dict[str, Any] = {
        "peer": [peer("site-2"), peer("site-3", **{"ospf-cost": 50})],
        "routing": {
            "local-prefix": ["10.1.0.0/24"],
            "dynamic": {
                "protocol": "ospf",
                "ospf": {
                    "area": "0.0.0.0",
                    "hello-interval": 10,
                    "dead-interval": 40,
                    "default-cost": 10,
                    "redistribute-local": True,
                },
            },
        },
        "internet-access": {"role": "none"},
    }
    ce.update(changes)
    return ce


def with_routing(**routing: Any) -> dict[str, Any]:
    ce = ce_config()
    ce["routing"].update(routing)
    return ce


def with_ospf(**ospf: Any) -> dict[str, Any]:
    ce = ce_config()
    ce["routing"]["dynamic"]["ospf"].update(ospf)
    return ce


def planned(ce: dict[str, Any], devices: dict[str, str]) -> RoutingPlan | None:
    """plan_from_config of ``ce`` as the agent sees it, with the model's defaults."""
    return plan_from_config(ce_with_defaults(ce), devices)


def plan(ce: dict[str, Any]) -> RoutingPlan:
    result = planned(ce, DEVICES)
    assert result is not None
    return result


# -- plan_from_config ------------------------------------------------------------


def test_static_routing_needs_no_daemon() -> None:
    assert planned(with_routing(dynamic={"protocol": "none"}), DEVICES) is None
    assert planned(with_routing(dynamic={}), DEVICES) is None
    assert planned({}, DEVICES) is None


def test_a_full_plan_from_the_defaults() -> None:
    assert plan(ce_config()) == RoutingPlan(
        router_id="10.1.0.1",
        area="0.0.0.0",
        hello=10,
        dead=40,
        default_cost=10,
        interfaces=(OspfInterface("cvi0002", 10), OspfInterface("cvi0003", 50)),
        announce=("10.1.0.0/24",),
        originate_default=False,
    )


def test_the_configured_router_id_wins_over_the_derived_one() -> None:
    assert plan(with_routing(**{"router-id": "192.0.2.77"})).router_id == "192.0.2.77"


def test_the_router_id_is_derived_from_the_first_ipv4_local_prefix() -> None:
    ce = with_routing(**{"local-prefix": ["2001:db8:1::/48", "10.20.0.0/16", "10.1.0.0/24"]})
    assert router_id(ce) == "10.20.0.1"
    assert plan(ce).router_id == "10.20.0.1"


def test_no_router_id_and_no_ipv4_local_prefix_is_explained() -> None:
    ce = with_routing(**{"local-prefix": ["2001:db8:1::/48"]})
    with pytest.raises(RoutingConfigProblem, match=r"routing/router-id.*routing/local-prefix"):
        planned(ce, DEVICES)


def test_only_enabled_peers_with_dynamic_routing_get_ospf() -> None:
    ce = ce_config(
        peer=[
            peer("site-2"),
            peer("site-3", enabled=False),
            peer("site-4", **{"dynamic-routing": False}),
            peer("site-5", encapsulation="tunnel-mode"),  # refused by the model anyway
            peer("site-9"),  # no device yet
        ]
    )
    assert [i.device for i in plan(ce).interfaces] == ["cvi0002"]


def test_a_peer_cost_overrides_the_default_cost() -> None:
    ce = with_ospf(**{"default-cost": 7})
    assert {i.device: i.cost for i in plan(ce).interfaces} == {"cvi0002": 7, "cvi0003": 50}


def test_ospf_timers_and_area_come_from_the_configuration() -> None:
    p = plan(with_ospf(area="0.0.0.5", **{"hello-interval": 1, "dead-interval": 4}))
    assert (p.area, p.hello, p.dead) == ("0.0.0.5", 1, 4)


def test_local_prefixes_and_static_routes_are_announced_once_each() -> None:
    ce = with_routing(
        **{
            "local-prefix": ["10.1.0.0/24", "10.1.1.0/24"],
            "static-route": [
                {"prefix": "192.168.7.0/24", "next-hop": "10.1.0.254"},
                {"prefix": "10.1.1.0/24", "next-hop": "10.1.0.254"},
            ],
        }
    )
    assert plan(ce).announce == ("10.1.0.0/24", "10.1.1.0/24", "192.168.7.0/24")


def test_ipv6_prefixes_are_not_announced_by_ospfv2() -> None:
    ce = with_routing(
        **{
            "local-prefix": ["10.1.0.0/24", "2001:db8:1::/48"],
            "static-route": [{"prefix": "2001:db8:2::/48", "next-hop": "2001:db8:1::9"}],
        }
    )
    assert plan(ce).announce == ("10.1.0.0/24",)


def test_redistribute_local_false_announces_nothing() -> None:
    p = plan(with_ospf(**{"redistribute-local": False}))
    assert p.announce == () and p.router_id == "10.1.0.1"


@pytest.mark.parametrize(
    ("access", "originates"),
    [
        ({"role": "integrated-gateway", "integrated-gateway": {"originate-default": True}}, True),
        ({"role": "integrated-gateway"}, True),  # the model's default
        ({"role": "integrated-gateway", "integrated-gateway": {"originate-default": False}}, False),
        ({"role": "via-gateway-site", "gateway-peer": "site-2"}, False),
        ({"role": "none", "integrated-gateway": {"originate-default": True}}, False),
        ({}, False),
    ],
)
def test_only_an_integrated_gateway_originates_a_default(
    access: dict[str, Any], originates: bool
) -> None:
    assert plan(ce_config(**{"internet-access": access})).originate_default is originates


def test_values_bird_would_misread_are_refused() -> None:
    with pytest.raises(RoutingConfigProblem, match="interface name"):
        OspfInterface("cvi*", 10)
    with pytest.raises(RoutingConfigProblem, match="cost"):
        OspfInterface("cvi0001", 0)
    with pytest.raises(RoutingConfigProblem, match="dead interval"):
        RoutingPlan("10.1.0.1", hello=10, dead=10)
    with pytest.raises(RoutingConfigProblem, match="router ID"):
        RoutingPlan("10.1.0")
    with pytest.raises(RoutingConfigProblem, match="IPv4 prefix"):
        RoutingPlan("10.1.0.1", announce=("10.1.0.1/24",))
    with pytest.raises(RoutingConfigProblem, match="twice"):
        RoutingPlan("10.1.0.1", interfaces=(OspfInterface("a", 1), OspfInterface("a", 2)))


# -- render ----------------------------------------------------------------------

GATEWAY = RoutingPlan(
    router_id="10.1.0.1",
    hello=1,
    dead=4,
    interfaces=(OspfInterface("cvi0002", 10), OspfInterface("cvi0003", 50)),
    announce=("10.1.0.0/24", "192.168.7.0/24"),
    originate_default=True,
)
PLANS = {
    "gateway": GATEWAY,
    "bare": RoutingPlan("10.9.0.1"),
    "from-config": plan(ce_config()),
    "area": RoutingPlan("10.9.0.1", area="0.0.0.7", interfaces=(OspfInterface("cvi00ff", 1),)),
}


def test_ospf_runs_on_the_planned_devices_only_never_on_a_pattern() -> None:
    text = render(GATEWAY, LOG)
    assert 'interface "cvi0002" { type ptp; hello 1; dead 4; cost 10; };' in text
    assert 'interface "cvi0003" { type ptp; hello 1; dead 4; cost 50; };' in text
    assert text.count("interface ") == 2 and "*" not in text


def test_the_kernel_gets_ospf_routes_but_never_the_own_router_id_or_prefixes() -> None:
    text = render(GATEWAY, LOG)
    kept = "10.1.0.1/32, 10.1.0.0/24+, 192.168.7.0/24+, 0.0.0.0/0"
    assert f"if net ~ [ {kept} ] then reject;" in text
    assert (
        "if source ~ [ RTS_OSPF, RTS_OSPF_IA, RTS_OSPF_EXT1, RTS_OSPF_EXT2 ] then accept;" in text
    )
    assert "import none;" in text


def test_a_default_prefix_is_kept_from_the_kernel_exactly_not_with_all_inside_it() -> None:
    assert kept_from_kernel(RoutingPlan("10.1.0.1", announce=("0.0.0.0/0",))) == [
        "10.1.0.1/32",
        "0.0.0.0/0",
    ]


def test_reading_routes_back_applies_the_kernel_filter() -> None:
    learned = ["0.0.0.0/0", "10.1.0.1/32", "10.1.0.128/25", "10.2.0.0/24", "10.2.0.1/32"]
    assert [p for p in learned if reaches_kernel(GATEWAY, p)] == ["10.2.0.0/24", "10.2.0.1/32"]
    member = RoutingPlan("10.2.0.1", announce=("10.2.0.0/24",))
    expected = ["0.0.0.0/0", "10.1.0.1/32", "10.1.0.128/25"]
    assert [p for p in learned if reaches_kernel(member, p)] == expected


def test_the_announced_prefixes_are_unreachable_statics_exported_to_ospf_only() -> None:
    text = render(GATEWAY, LOG)
    static = text[text.index("protocol static local_prefixes") :].split("}", 1)[0]
    assert static.split("\n")[1:-1] == [
        "  ipv4;",
        "  route 10.1.0.0/24 unreachable;",
        "  route 192.168.7.0/24 unreachable;",
        "  route 0.0.0.0/0 unreachable;",
    ]
    assert 'export where proto = "local_prefixes";' in text
    assert "protocol direct" not in text
    assert "0.0.0.0/0 unreachable" not in render(plan(ce_config()), LOG)


def test_the_log_has_no_per_packet_classes_and_the_text_is_deterministic() -> None:
    text = render(GATEWAY, LOG)
    assert f'log "{LOG}" {{ info, remote, warning, error, auth, fatal }};' in text
    (log_line,) = [line for line in text.splitlines() if line.startswith("log ")]
    assert "all" not in log_line and "router id 10.1.0.1;" in text
    assert render(GATEWAY, LOG) == text
    assert render(plan(ce_config()), LOG) == render(plan(ce_config()), LOG)


def test_a_log_path_with_a_quote_is_refused() -> None:
    with pytest.raises(RoutingConfigProblem):
        render(GATEWAY, Path('/tmp/a"b/bird.log'))


@pytest.mark.skipif(not Path(BIRD).exists(), reason="BIRD 2 is not installed")
@pytest.mark.parametrize("name", sorted(PLANS))
def test_bird_parses_every_rendered_configuration(name: str, tmp_path: Path) -> None:
    conf = tmp_path / "bird.conf"
    conf.write_text(render(PLANS[name], tmp_path / "bird.log"))
    parsed = subprocess.run([BIRD, "-p", "-c", str(conf)], capture_output=True, text=True)
    assert parsed.returncode == 0, parsed.stderr


@pytest.mark.skipif(not Path(BIRD).exists(), reason="BIRD 2 is not installed")
def test_bird_would_refuse_a_broken_file(tmp_path: Path) -> None:
    """The lab's refused-reconfiguration check relies on this being an error."""
    conf = tmp_path / "bird.conf"
    conf.write_text(render(GATEWAY, tmp_path / "bird.log") + "protocol nonsense {}\n")
    parsed = subprocess.run([BIRD, "-p", "-c", str(conf)], capture_output=True, text=True)
    assert parsed.returncode != 0 and "syntax error" in parsed.stderr


# -- birdc output ----------------------------------------------------------------

# Captured from BIRD 2.0.12 (`birdc -v`), CEs over /32 unnumbered ptp links; the second
# neighbour, the multipath next hop and the alternative route are edited in, in BIRD's format.
NEIGHBORS = """\
0001 BIRD 2.0.12 ready.
1013-cevpn_ospf:
     Router ID   \tPri\t     State     \tDTime\tInterface  Router IP
     10.2.0.1    \t  1\tFull/PtP  \t 3.990\tcvi0001    10.2.0.1
     10.3.0.1    \t  1\tInit/PtP  \t 3.006\tcvi0002    10.3.0.1
"""
ROUTES = """\
0001 BIRD 2.0.12 ready.
1007-Table master4:
     0.0.0.0/0            unicast [cevpn_ospf 10:33:59.079] * E2 (150/10/10000) [10.1.0.1]
     \tvia 10.1.0.1 on cvi0001 onlink
     10.1.0.0/24          unicast [cevpn_ospf 10:33:59.079] * E2 (150/10/10000) [10.1.0.1]
     \tvia 10.1.0.1 on cvi0001 onlink
1007-10.1.0.1/32          unicast [cevpn_ospf 10:33:59.079] * I (150/10) [10.1.0.1]
     \tvia 10.1.0.1 on cvi0001 onlink
     \tvia 10.3.0.1 on cvi0002 onlink
     10.1.0.1/32          unicast [cevpn_ospf 10:33:59.079] I (150/20) [10.1.0.1]
     10.2.0.1/32          unicast [cevpn_ospf 10:33:52.079] * I (150/0) [10.2.0.1]
     \tdev cvi0001
"""
CONFIGURE_REFUSED = """\
0001 BIRD 2.0.12 ready.
0002-Reading configuration from /tmp/rt/bad.conf
8002 /tmp/rt/bad.conf:2:10 syntax error, unexpected CF_SYM_UNDEFINED
"""


def test_neighbors_are_parsed_from_birdc_output() -> None:
    assert parse_neighbors(NEIGHBORS) == [
        Neighbor("10.2.0.1", 1, "Full/PtP", "cvi0001", "10.2.0.1"),
        Neighbor("10.3.0.1", 1, "Init/PtP", "cvi0002", "10.3.0.1"),
    ]
    assert parse_neighbors("0001 BIRD 2.0.12 ready.\n1013-cevpn_ospf:\n") == []


def test_ospf_prefixes_are_parsed_once_each_from_birdc_output() -> None:
    assert parse_routes(ROUTES) == ["0.0.0.0/0", "10.1.0.0/24", "10.1.0.1/32", "10.2.0.1/32"]


def test_birdc_replies_carry_their_codes_and_errors() -> None:
    assert reply_lines(CONFIGURE_REFUSED)[1:] == [
        (2, "Reading configuration from /tmp/rt/bad.conf"),
        (8002, "/tmp/rt/bad.conf:2:10 syntax error, unexpected CF_SYM_UNDEFINED"),
    ]
    assert failure(CONFIGURE_REFUSED) == (
        "/tmp/rt/bad.conf:2:10 syntax error, unexpected CF_SYM_UNDEFINED"
    )
    ok = "0001 BIRD 2.0.12 ready.\n0002-Reading configuration from /x\n0003 Reconfigured\n"
    assert failure(ok) is None
    refused = "Unable to connect to server control socket (bird.ctl): No such file or directory"
    assert failure(refused) == refused


def test_the_control_socket_is_named_relative_to_the_routing_directory() -> None:
    """A long state directory must not break the 107-byte Unix socket path limit."""
    bird = Bird(Path("/" + "x" * 200), "ce1-vpn")
    command = bird.command()
    assert command[:4] == ["ip", "netns", "exec", "ce1-vpn"]
    assert command[command.index("-s") + 1] == CONTROL_SOCKET == "bird.ctl"
    assert command[command.index("-c") + 1] == "/" + "x" * 200 + "/routing/bird.conf"


def test_a_cli_reply_is_complete_only_at_a_final_code_line() -> None:
    from nc_agent.routing.bird import _complete

    assert not _complete(b"1007-Table master4:\n 10.9.0.0/24 unreachable\n")
    assert not _complete(b"1007-Table master4:\n0000")
    assert _complete(b"1007-Table master4:\n 10.9.0.0/24 unreachable\n0000 \n")
    assert _complete(b"8003 syntax error\n")
