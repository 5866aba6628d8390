"""nc_agent.dataplane.links in a real kernel: made in the SP space, used in the VPN space."""

from __future__ import annotations

import json

import pytest

from lab.uml import run_guest
from nc_agent.dataplane.links import esp_overhead, tunnel_mtu


def test_tunnel_mtu_leaves_room_for_gcm_esp_as_lab_measured():
    assert tunnel_mtu(1500, "rfc4106(gcm(aes))", 128) <= 1446


def test_cbc_overhead_counts_the_larger_iv_and_padding():
    assert esp_overhead("cbc(aes)", 128) > esp_overhead("rfc4106(gcm(aes))", 128)


@pytest.mark.lab
def test_ipip_devices_from_links_carry_traffic_and_go_away_with_their_routes():
    result = run_guest(
        """
        set -e
        .venv/bin/python -m lab.topology build 2
        .venv/bin/python -m tests.lab.links_scenario
        """,
        timeout=180,
    )
    assert result.returncode == 0, result.console[-3000:]
    report = json.loads(result.read("links.json"))
    assert report["ipip_ping"] is True
    ((name, (kind, local, remote, mtu, up, routes)),) = report["existing"].items()
    assert name.startswith("cvi") and kind == "ipip" and up
    assert (local, remote) == ("198.51.100.2", "198.51.100.6")
    assert mtu <= 1446 and routes == ["10.2.0.0/24"]
    assert report["routes_after_reconfigure"] == ["10.2.0.0/24", "10.22.0.0/24"]
    assert report["after_remove"] == []
    assert "10.2.0.0" not in report["vpn_routes_after_remove"]
    assert "cvi" not in report["sp_links"]  # the device lived in the VPN space only
