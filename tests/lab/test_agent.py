"""The CE agent in a real kernel: agents configured over NETCONF carry site traffic through ESP.

Each test boots a UML guest with the lab topology, starts a cevpn-agent on
every CE and configures them from the provider core with ncclient
(tests/lab/agent_scenarios.py), then checks what the sites and the core saw.
"""

from __future__ import annotations

import json

import pytest

from tests.lab.uml import LabUnavailable, prepare_host, run_guest

pytestmark = pytest.mark.lab


@pytest.fixture(scope="module", autouse=True)
def lab() -> None:
    try:
        prepare_host()
    except LabUnavailable as exc:
        pytest.skip(str(exc))


def scenario(name: str, sites: int = 3) -> dict:
    result = run_guest(
        f"""
        set -e
        .venv/bin/python -m tests.lab.topology build {sites}
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
