"""The CE agent in a real kernel: agents configured over NETCONF carry site traffic through ESP.

Each test boots a UML guest with the lab topology, starts a cevpn-agent on
every CE and configures them from the provider core with ncclient
(tests/lab/agent_scenarios.py), then checks what the sites and the core saw.
"""

from __future__ import annotations

import json

import pytest

from lab.uml import run_guest

pytestmark = pytest.mark.lab


def scenario(name: str, sites: int = 3) -> dict:
    result = run_guest(
        f"""
        set -e
        .venv/bin/python -m lab.topology build {sites}
        ip netns exec pe .venv/bin/python -m tests.lab.agent_scenarios {name} {sites}
        """,
        timeout=420,
    )
    assert result.returncode == 0, result.console[-4000:]
    return json.loads(result.read("report.json"))


@pytest.mark.parametrize("encapsulation", ["transport", "tunnel"])
def test_full_mesh_of_three_sites_every_site_pings_every_other(encapsulation):
    report = scenario(f"mesh-{encapsulation}")
    assert report["pings"] and all(report["pings"].values()), report["pings"]
    assert report["pe_ipv4"], "the core saw no traffic"
    assert all("ESP(spi=" in line for line in report["pe_ipv4"] if " 10." in line or "ESP" in line)
    assert not any(" 10." in line for line in report["pe_ipv4"]), report["pe_ipv4"]
    assert "10." not in report["pe_routes"]
    for routes in report["vpn_routes"].values():
        assert "198.51.100." not in routes  # no SP route in any VPN space
    assert report["state"].count("<status>up</status>") == 2


def test_removing_a_peer_removes_exactly_its_kernel_objects():
    report = scenario("remove-peer")
    before, after = report["before"], report["after"]
    gone_links = set(before["vpn_links"]) - set(after["vpn_links"])
    assert len(gone_links) == 1 and next(iter(gone_links)).startswith("cvi")
    assert set(after["vpn_links"]) < set(before["vpn_links"])
    assert len(before["sas"]) - len(after["sas"]) == 2  # that peer's two SAs
    assert set(after["sas"]) < set(before["sas"])
    assert any("reqid 7" in sa for sa in after["sas"])  # somebody else's SA untouched
    assert len(before["policies"]) > len(after["policies"])
    assert not any("10.3.0.0" in r for r in after["vpn_routes"])
    assert report["ping_2"] is True and report["ping_3"] is False


def test_a_rekey_during_a_continuous_ping_loses_no_packet():
    report = scenario("rekey", 2)
    assert report["traffic_before_rekey"] is not None  # the old SA carried the ping first
    assert report["ping"] and " 0% packet loss" in report["ping"][0], report["ping"]
    new_hex = {f"{spi:#010x}" for spi in report["new_spis"]}
    installed = {sa.split()[0] for sa in report["ce1"]["sas"]}
    assert new_hex <= installed


def test_kill_9_in_the_middle_of_an_apply_converges_to_running_without_orphans():
    # The agent is stopped at a named step of the apply (nc_core.faults: SAs and policies
    # of the 150 new peers installed, their devices not) and killed there.
    report = scenario("kill-mid-apply", 2)
    assert report["killed_during_edit"]
    assert report["after_kill"]["sas"] > 2  # the half-applied change was in the kernel
    assert report["peers_in_running"] == 1  # it was never committed
    after = report["after_restart"]
    assert after["sas"] == after["distinct_sas"] == 2  # no orphan, no duplicate
    assert after["devices"] == 1
    assert report["ping"] is True


def test_kernel_refused_and_invalid_changes_leave_kernel_and_datastore_as_they_were():
    report = scenario("refused", 2)
    refused = report["refused"]
    assert refused and refused["tag"] == "operation-failed"
    assert "peer site-2" in refused["message"] and "File exists" in refused["message"]
    assert refused["path"] == "/cevpn-ce:ce/cevpn-ce:peer[cevpn-ce:name='site-2']"
    assert report["invalid"] and report["invalid"]["tag"] == "operation-failed"
    assert "key length" in report["invalid"]["message"]
    assert report["running_unchanged"] is True
    assert report["kernel_unchanged"] is True
    assert report["ping"] is True


def test_a_missing_sa_drops_traffic_and_nothing_leaves_in_clear():
    report = scenario("missing-sa", 2)
    assert report["ping_without_sa"] is False
    assert report["ping_without_policy"] is False  # the guard policy still blocks IP-in-IP
    assert not any(" 10." in line for line in report["pe_ipv4"]), report["pe_ipv4"]
    assert not any("ipip" in line.lower() or "IP-in-IP" in line for line in report["pe_ipv4"])
    assert "<status>down</status>" in report["state"]


def test_overlapping_prefixes_in_two_vpns_work_independently():
    report = scenario("overlap", 4)
    assert report["ping_vpn_a"] is True and report["ping_vpn_b"] is True
    assert report["a_reached"]["2"] >= 3 and report["a_reached"]["4"] == 0
    assert report["b_reached"]["4"] >= 3 and report["b_reached"]["2"] == 0
