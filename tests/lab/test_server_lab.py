"""The VPN server provisions real CE agents in a real kernel; the sites ping through ESP.

The driver is an OSS talking NETCONF to the server only: it creates a VPN of
three sites, enrols each CE (the agent starts from the bundle), and waits for
the server to report every CE in-sync.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from lab.uml import run_guest

pytestmark = pytest.mark.lab


def scenario(name: str, sites: int = 3) -> dict[str, Any]:
    result = run_guest(
        f"""
        set -e
        .venv/bin/python -m lab.topology build {sites}
        ip netns exec pe .venv/bin/python -m tests.lab.server_scenarios {name} {sites}
        """,
        timeout=480,
    )
    assert result.returncode == 0, result.console[-6000:]
    report: dict[str, Any] = json.loads(result.read("report.json"))
    return report


def test_the_server_provisions_three_agents_and_the_sites_ping_each_other_through_esp() -> None:
    report = scenario("mesh-transport")
    assert report["statuses"] == {f"site-{n}": "in-sync" for n in (1, 2, 3)}
    assert report["pings"] and all(report["pings"].values()), report["pings"]
    core = report["pe_ipv4"]
    assert any("ESP(spi=" in line for line in core), core[:20]
    assert not any(" 10." in line for line in core), [line for line in core if " 10." in line]
    for count in report["xfrm_states"].values():
        assert "4" in count  # two SAs per peer, two peers


def test_in_the_pull_model_a_new_sites_first_packets_make_its_peers_fetch() -> None:
    """Seed 3.5: a CE fetches its configuration 'when an unknown peer tries to reach it'."""
    report = scenario("unknown-peer")
    assert report["before"] == {"site-1": "in-sync", "site-2": "in-sync"}
    waited = report["first_ping_after_s"]
    assert all(v is not None for v in waited.values()), waited
    assert all(report["pings"].values()), report["pings"]
    # Each old site fetched because ESP arrived for an SA it did not have.
    assert report["old_logs"] == {"ce1": 1, "ce2": 1}, report["old_logs"]


def test_in_hub_and_spoke_spoke_to_spoke_traffic_goes_through_the_hub() -> None:
    report = scenario("hub-and-spoke")
    assert report["statuses"] == {f"site-{n}": "in-sync" for n in (1, 2, 3)}
    # The hub has a tunnel to each spoke; each spoke has one tunnel, to the hub.
    assert [len(v) for v in report["devices"].values()] == [2, 1, 1], report["devices"]
    assert report["spoke_to_spoke"] and report["spoke_to_hub"]
    # site-2 -> site-3 leaves site-2 through its only tunnel, to the hub ...
    assert report["devices"]["ce2"][0] in report["route_get"], report["route_get"]
    # ... and the core sees ESP between each spoke and the hub, never between the spokes.
    pairs = report["esp_pairs"]
    assert pairs.get("198.51.100.2<->198.51.100.6") and pairs.get("198.51.100.10<->198.51.100.2")
    assert "198.51.100.10<->198.51.100.6" not in pairs, pairs


def test_a_ce_behind_a_nat_is_provisioned_only_through_call_home_and_pings_through_esp() -> None:
    """RFC 8071: the server (behind pe) cannot open a connection to site 3's CE, which pe
    masquerades; the CE calls home, is provisioned over its own connection like the
    dialled CEs, and every site reaches every other through ESP."""
    report = scenario("call-home-nat")
    assert report["statuses"] == {f"site-{n}": "in-sync" for n in (1, 2, 3)}
    # The server never reached the CE: the NAT drops what it opens towards it.
    assert report["server_dials_natted_ce"] is False
    # Site 3 is managed over the connection it opened, seen from pe's (the NAT's) address.
    assert report["called_from"] == {"site-1": "", "site-2": "", "site-3": "203.0.113.1"}
    assert report["pings"] and all(report["pings"].values()), report["pings"]
    assert report["esp_with_natted_ce"] > 0
    assert report["cleartext_lan"] == []


def test_a_tunnel_failure_on_a_ce_is_an_alarm_on_the_server_until_the_tunnel_returns() -> None:
    """RFC 8632 on the server, fed by what CEs notify (their watcher sessions): site 2's CE
    drops off the network, site 1's CE reports the tunnel down, and both daemons' metrics
    follow the alarm."""
    report = scenario("tunnel-failure-alarm", 2)
    assert report["statuses"] == {"site-1": "in-sync", "site-2": "in-sync"}
    assert report["tunnels_before"] == {"ce1": {"site-2": "up"}, "ce2": {"site-1": "up"}}
    assert report["alarm_before"] in (None, "true")
    assert report["agent_up_before"] == 1
    assert report["raised_after_s"] is not None, report
    assert "reports its tunnel to site-2 down" in report["alarm_text"]
    assert report["server_metric_raised"] == 1
    assert report["agent_up_while_cut"] == 0
    assert report["cleared_after_s"] is not None, report
    assert report["server_metric_cleared"] is None
    assert report["agent_up_after"] == 1
    assert report["ping_after"]
    # The kernel's SA counters, per peer and direction, as the agent's metrics give them.
    assert all(v is not None and v > 0 for v in report["agent_sa"].values()), report["agent_sa"]
