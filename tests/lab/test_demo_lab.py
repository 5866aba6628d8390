"""`make demo`'s main job, checked: one lab run of tools/demo_lab.py, then one test per claim.

The demo is the product working end to end (server, OSS, five CE agents,
IKEv2, OSPF through the tunnels, the Internet gateway, the ingress policy, a
site joining and one leaving); its report holds what each step measured.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from lab.uml import run_guest

pytestmark = pytest.mark.lab

GUEST = """\
set -e
.venv/bin/python -m lab.topology build 5
ip netns exec pe .venv/bin/python tools/demo_lab.py
"""


@pytest.fixture(scope="module")
def report() -> dict[str, Any]:
    result = run_guest(GUEST, timeout=600)
    data: dict[str, Any] = json.loads(result.read("report.json"))
    data["_console"] = result.console[-8000:]
    data["_rc"] = result.returncode
    return data


def test_the_demo_passes_every_step_and_exits_zero(report: dict[str, Any]) -> None:
    assert report["failures"] == [], report["_console"]
    assert report["_rc"] == 0


def test_four_ces_bring_up_the_ike_mesh(report: dict[str, Any]) -> None:
    tunnels = report["tunnels_first"]
    assert sorted(tunnels) == ["ce1", "ce2", "ce3", "ce4"]
    for ce, peers in tunnels.items():
        assert len(peers) == 3, (ce, peers)
        assert {p["status"] for p in peers.values()} == {"up"}, (ce, peers)


def test_ospf_through_the_tunnels_redistributes_every_site_prefix(report: dict[str, Any]) -> None:
    for n in range(1, 5):
        learned = set(report["ospf_routes"][f"ce{n}"])
        assert {f"10.{o}.0.0/24" for o in range(1, 5) if o != n} <= learned, (n, learned)


def test_the_tunnel_table_shows_each_ospf_adjacency_full(report: dict[str, Any]) -> None:
    for ce, peers in report["tunnels_first"].items():
        assert {p.get("routing-adjacency") for p in peers.values()} == {"Full/PtP"}, (ce, peers)


def test_only_the_gateway_site_originates_a_default_route(report: dict[str, Any]) -> None:
    defaults = report["defaults"]
    assert "cvg0" in defaults["ce1"] and "proto bird" not in defaults["ce1"], defaults
    for ce in ("ce2", "ce3", "ce4"):
        assert "proto bird" in defaults[ce], defaults


def test_no_route_leaks_between_the_sp_and_the_vpn_space(report: dict[str, Any]) -> None:
    assert not any(report["leaks"].values()), report["leaks"]


def test_site_to_site_pings_cross_the_core_as_esp_only(report: dict[str, Any]) -> None:
    assert all(report["pings_first"].values()), report["pings_first"]
    assert report["core_capture"].get("ESP", 0) > 0
    assert report["core_capture"].get("other", 0) == 0, report["core_other"]


def test_a_site_without_gateway_reaches_the_internet_through_the_gateway_site_nated(
    report: dict[str, Any],
) -> None:
    internet = report["internet"]
    assert internet["ping"]
    assert "198.51.100.2" in internet["sources_seen_by_internet_host"]
    assert not any(s.startswith("10.") for s in internet["sources_seen_by_internet_host"])
    assert report["internet_inbound_blocked"]


def test_the_ingress_policy_accepts_management_and_drops_the_rest(report: dict[str, Any]) -> None:
    ingress = report["ingress"]
    assert ingress["port830"]
    assert not ingress["ping"] and not ingress["port22"]


def test_a_fifth_site_is_discovered_without_touching_the_others(report: dict[str, Any]) -> None:
    assert report["join_up_s"] is not None
    assert report["bird_restarted"] == []
    assert all(report["pings_join"].values()), report["pings_join"]


def test_a_removed_site_leaves_nothing_behind(report: dict[str, Any]) -> None:
    removed = report["removed"]
    assert removed["sas"] == [] and removed["ipsec_policies"] == [], removed
    assert removed["tunnel_devices"] == [], removed
    assert all(report["pings_after_removal"].values()), report["pings_after_removal"]
    for ce, peers in report["tunnels_final"].items():
        assert "site-2" not in peers, (ce, peers)
