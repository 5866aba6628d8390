"""nc_agent.routing.Bird in a real kernel: OSPF between three CEs' VPN spaces (seed 4, 4.3).

One guest boot runs tests/lab/routing_scenario.py (three sites, plain IP-in-IP
tunnels, a BIRD per VPN space driven through Bird); each test asserts one
behaviour on its JSON report.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from lab.topology import Site
from lab.uml import LabUnavailable, prepare_host, run_guest

pytestmark = pytest.mark.lab


@pytest.fixture(scope="module")
def report() -> dict[str, Any]:
    try:  # the lab fixture of conftest.py runs after a module-scoped one
        prepare_host()
    except LabUnavailable as exc:
        pytest.skip(str(exc))
    result = run_guest(
        """
        set -e
        .venv/bin/python -m lab.topology build 3
        .venv/bin/python -m tests.lab.routing_scenario
        """,
        timeout=300,
    )
    data: dict[str, Any] = json.loads(result.read("routing.json"))
    assert "error" not in data, data.get("traceback", data)
    assert result.returncode == 0, result.console[-3000:]
    return data


def test_bird_starts_with_a_control_socket_path_longer_than_unix_sockets_allow(report):
    assert report["ce1_socket_path_length"] > 107
    assert all(report["pids"].values()), report["pids"]


def test_ospf_gives_every_site_routes_to_the_others_and_transit_through_ce1(report):
    assert report["seconds_to_routes"] is not None, "OSPF never converged"
    assert sorted(report["neighbors_ce1"]) == [
        ["10.2.0.1", "Full/PtP", "cvi0001"],
        ["10.3.0.1", "Full/PtP", "cvi0002"],
    ]
    assert report["ping_2_3_via_ce1"] is True
    assert " via 10.1.0.1 dev cvi0001 " in report["route_2_3_via_ce1"]


def test_a_static_route_to_a_site_router_is_installed_and_announced_to_the_others(report):
    assert (
        report["static_route_ce1"] == f"10.1.128.0/24 via {Site(1).host_address} dev lan0 proto 206"
    )
    assert report["seconds_to_static_route_learned"] is not None, "never learned by ce2, ce3"
    assert report["static_route_ce2"].startswith(
        "10.1.128.0/24 via 10.1.0.1 dev cvi0001 proto bird"
    )
    assert report["seconds_to_static_route_withdrawn"] is not None, "ce2 or ce3 kept it"


def test_a_new_tunnel_is_picked_up_by_reconfiguration_without_a_restart(report):
    assert report["seconds_to_new_tunnel_route"] is not None, "ce2 never used the new tunnel"
    assert report["pids_after_new_tunnel"] == report["pids"]
    assert sorted(report["neighbors_ce2"]) == [
        ["10.1.0.1", "Full/PtP", "cvi0001"],
        ["10.3.0.1", "Full/PtP", "cvi0003"],
    ]
    assert report["ping_2_3_direct"] is True
    assert sorted(report["ospf_routes_ce2"]) == [
        "10.1.0.0/24",
        "10.1.0.1/32",
        "10.3.0.0/24",
        "10.3.0.1/32",
    ]  # what the kernel has: not ce2's own router ID


def test_the_kernel_gets_neither_the_own_router_id_nor_the_own_prefix(report):
    for n, routes in report["bird_routes"].items():
        assert routes, f"ce{n}-vpn has no BIRD route"
        own = [r for r in routes if r.startswith(f"10.{n}.0.")]
        assert own == [], (n, routes)
        assert any(r.startswith("10.") and "/24" in r for r in routes), routes


def test_no_vpn_route_reaches_the_provider_core_or_the_sp_spaces(report):
    assert report["leaks"] == {ns: [] for ns in ("pe", "ce1", "ce2", "ce3", "guest")}


def test_the_routing_state_is_private(report):
    assert report["modes"] == {
        "routing": "0o700",
        "bird.conf": "0o600",
        "bird.log": "0o600",
        "bird.stdout": "0o600",
    }


def test_a_cost_change_reroutes_without_a_restart(report):
    assert report["seconds_to_cost_change"] is not None, "the dearer tunnel stayed in use"
    assert report["pid_ce2_after_cost"] == report["pids"]["2"]


def test_a_refused_configuration_raises_and_the_previous_one_keeps_running(report):
    assert report["refused"] and "syntax error" in report["refused"], report["refused"]
    after = report["after_refusal"]
    assert after["pid"] == report["pids"]["2"] and after["running"] is True
    assert after["conf_unchanged"] is True and after["new_conf_left"] is False
    assert after["plan_kept"] is True
    assert after["device_to_3"] == "cvi0001"  # still the cost-100 configuration
    assert sorted(n[1] for n in after["neighbors"]) == ["Full/PtP", "Full/PtP"]
    assert after["status"].startswith("0013 Daemon is up and running")


def test_a_crash_is_reported_and_its_leftovers_are_removed(report):
    crash = report["crash"]
    assert crash["on_exit"] == [-9]
    assert crash["routes_left"] > 0  # a killed BIRD cannot withdraw its routes
    assert crash["routes_after_cleanup"] == [] and crash["pid_file_after_cleanup"] is False


def test_stop_withdraws_the_routes_and_leaves_no_daemon(report):
    after = report["after_stop"]
    assert after["routes"] == {"1": [], "2": [], "3": []}
    assert after["processes"] == [] and after["pid_files"] == [] and after["running"] == []
