"""IKEv2 through strongSwan between real agents (seed 3.3, 3.4, 3.6, 5), a charon on every CE.

Each test boots a UML guest with the lab topology (lab/topology.py);
the scenarios run in the provider core (`pe`): as the VPN server's OSS
(tests/lab/server_scenarios.py) or talking NETCONF straight to the agents
and listening to their notifications (tests/lab/ike_scenarios.py).
"""

from __future__ import annotations

import itertools
import json
import re
from typing import Any

import pytest

from lab.uml import LabUnavailable, prepare_host, run_guest

pytestmark = pytest.mark.lab

# Lines tcpdump prints for what may cross the provider core: ESP, IKE, the
# NETCONF/SSH management sessions between the VPN server and the CEs, and ICMP
# errors about those, which quote only an outer header ("ICMP host X
# unreachable" from the core when a CE is cut off, "ICMP X udp port 500
# unreachable" from a CE whose charon is restarting).
ALLOWED = re.compile(
    r"ESP\(spi=|isakmp|\.830[ :]"
    r"|ICMP (host )?198\.51\.100\.\d+ (udp port (500|4500) )?unreachable"
)


def scenario(module: str, name: str, sites: int) -> dict[str, Any]:
    result = run_guest(
        f"""
        set -e
        .venv/bin/python -m lab.topology build {sites}
        ip netns exec pe .venv/bin/python -m tests.lab.{module} {name} {sites}
        """,
        timeout=540,
    )
    assert result.returncode == 0, result.console[-6000:]
    report: dict[str, Any] = json.loads(result.read("report.json"))
    return report


def clear_text(lines: list[str]) -> list[str]:
    return [line for line in lines if not ALLOWED.search(line)]


@pytest.mark.parametrize("encapsulation", ["transport", "tunnel"])
@pytest.mark.parametrize("authentication", ["psk", "cert"])
def test_the_server_provisions_an_ike_mesh_and_the_core_sees_only_ike_and_esp(
    authentication: str, encapsulation: str
) -> None:
    report = scenario("server_scenarios", f"ike-{authentication}-{encapsulation}", 3)
    assert report["statuses"] == {f"site-{n}": "in-sync" for n in (1, 2, 3)}
    assert all(v == {f"site-{o}": "up" for o in (1, 2, 3) if f"ce{o}" != ce}
               for ce, v in report["tunnels"].items()), report["tunnels"]  # fmt: skip
    assert report["pings"] and all(report["pings"].values()), report["pings"]
    core = report["pe_ipv4"]
    assert any("ESP(spi=" in line for line in core) and any("isakmp" in line for line in core)
    assert clear_text(core) == []
    assert not any(" 10." in line for line in core)
    auth = "pre-shared key" if authentication == "psk" else "public key"
    for ce, conns in report["charon_conns"].items():
        assert len(conns) == 2 and all(c["auth"] == auth for c in conns.values()), (ce, conns)
        if authentication == "cert":  # each peer is known by its certificate's identity
            assert {c["remote-id"] for c in conns.values()} == {
                f"O=cevpn, OU=lab, CN={peer}" for peer in conns
            }
    if authentication == "psk":
        assert report["psk_count"] == 3  # one key per pair, the same at both ends
    else:
        assert report["psk_count"] == 0
        assert all(report["key_files"][f"ce{n}/ike_own_key.pem"] == "0o600" for n in (1, 2, 3))
    assert report["secrets_in_logs"] == []
    assert set(report["key_files"].values()) == {"0o600"}


def test_a_wrong_psk_retries_on_the_seed_schedule_raises_the_alarm_and_a_fix_clears_it() -> None:
    """Retry policy minimum-wait 2, t1 3, factor 2, limit 12: waits 2, 3, 6, then the alarm."""
    report = scenario("ike_scenarios", "wrong-psk", 2)
    failures = report["failures"]
    assert [f["retry-count"] for f in failures[:4]] == ["1", "2", "3", "4"], failures
    assert all("AUTHENTICATION_FAILED" in f["reason"] for f in failures[:4]), failures
    gaps = [b["t"] - a["t"] for a, b in itertools.pairwise(failures[:4])]
    for gap, wait in zip(gaps, (2, 3, 6), strict=True):
        assert wait <= gap < wait + 2, gaps  # never early (seed: "at least"); + one negotiation
    assert report["alarm_after_failure"] is not None and report["alarm_after_failure"] < 1
    [alarm] = report["alarm_raised"]
    assert alarm["type"] == "cevpn-types:tunnel-establishment-failure"
    assert alarm["resource"] == "site-2" and "human action" in alarm["text"]
    assert report["state_in_alarm"]["status"] == "failed"
    assert report["state_in_alarm"]["retry-count"] == "4"
    assert "next-attempt" in report["state_in_alarm"]
    assert [a["resource"] for a in report["alarms"]] == ["site-2"]
    # The other end (it initiates too, permanent) says what it sees, in words.
    assert "pre-shared key" in report["state_on_responder"]["last-error"]
    assert report["cleared_after_fix_s"] is not None
    assert report["state_after_fix"]["status"] == "up"
    assert report["state_after_fix"]["retry-count"] == "0"
    assert report["alarms_after_fix"] == []
    assert report["ping"] is True
    assert report["secrets_in_logs"] == []


def test_killed_charon_or_agent_or_a_vanished_peer_never_lets_clear_text_out() -> None:
    report = scenario("ike_scenarios", "kill-charon", 2)
    # ESP flowed before each outage, and after the last one.
    for phase in ("before_kill", "after_charon_kill", "after_agent_kill", "after_dpd"):
        assert report[f"traffic_{phase}"] is not None, phase
    # kill -9 of charon: the agent starts a new one, the peer reports the outage at once.
    assert report["charon_restarted_after_s"] is not None
    assert report["charon_kill_down_after_s"] is not None
    assert report["charon_kill_down_after_s"] < 8  # dpd delay 2 + timeout 6
    assert report["charon_kill_back_after_s"] is not None
    assert "restarted" in report["down_reasons"][0]
    # kill -9 of the agent: its charon dies with it; a new agent brings the tunnel back.
    assert report["charon_gone_with_agent_after_s"] is not None
    assert report["agent_kill_back_after_s"] is not None
    # The peer's SP link goes down: dead peer detection reports it.  charon checks
    # liveness every dpd delay (2 s) and gives up 6 s after its request: <= 2*2 + 6.
    assert report["dpd_down_after_s"] is not None and report["dpd_down_after_s"] <= 10.5
    assert report["state_while_cut"]["status"] == "down"
    assert "dead peer detection" in report["state_while_cut"]["last-error"]
    assert report["dpd_back_after_s"] is not None
    assert report["ping_after"] is True
    core = report["pe_ipv4"]
    assert any("ESP(spi=" in line for line in core)
    assert clear_text(core) == [], clear_text(core)[:10]
    assert not any(" 10." in line for line in core)


def test_a_traffic_driven_peer_comes_up_on_its_first_packet_and_goes_down_when_idle() -> None:
    report = scenario("ike_scenarios", "traffic-driven", 2)
    assert report["before"]["status"] == "waiting-for-traffic"
    assert report["sas_before"] == 0
    assert report["first_ping"] is True
    assert report["up_after_first_packet_s"] is not None
    assert report["during"]["status"] == "up" and report["sas_during"] == 2
    assert report["down_after_idle_s"] is not None
    assert report["down"][-1]["reason"] == "idle for 6 s (traffic-driven)"
    assert report["after"]["status"] == "waiting-for-traffic"
    assert report["sas_after"] == 0 and report["ike_sas_after"] == 0  # IKE_SA deleted too
    assert report["second_ping"] is True


def _charon_name(kind: str, identity: str) -> str:
    """cevpn-types identity -> the name charon's get-algorithms uses."""
    special = {
        "encr-3des": "3des_cbc",
        "encr-chacha20-poly1305": "chacha20_poly1305",
        "prf-aes128-xcbc": "prf_aes128_xcbc",
    }
    if identity in special:
        return special[identity]
    name = identity.split("-", 1)[1] if kind in ("encryption", "integrity") else identity
    name = re.sub(r"-(128|192|256)$", "", name) if kind == "encryption" else name
    name = name.replace("curve", "curve_") if kind == "dh" else name
    return name.replace("-", "_")


def test_every_transform_cevpn_offers_is_available_in_the_agents_charon() -> None:
    report = scenario("ike_scenarios", "algorithms", 1)
    charon = report["charon"]
    available = {
        "encryption": set(charon["encryption"]) | set(charon["aead"]),
        "integrity": set(charon["integrity"]),
        "prf": set(charon["prf"]),
        "dh": set(charon["dh"]),
    }
    missing = [
        (kind, identity)
        for kind, identities in report["ours"].items()
        for identity in identities
        if _charon_name(kind, identity) not in available[kind]
    ]
    assert missing == []


def test_removing_a_peer_deletes_its_ike_sa_with_a_delete_exchange_and_nothing_comes_back() -> None:
    """Seed 3.6: site 1 drops site 2; site 2 (still configured) keeps trying in vain."""
    report = scenario("ike_scenarios", "remove-peer", 2)
    assert report["sas_before"] >= 2  # a CHILD_SA: an inbound and an outbound SA
    assert report["delete_logged_on_2"] >= 1
    assert report["peer_down_after_s"] is not None
    assert report["peer_down_reason"] == ["the peer deleted the SAs"]
    assert any("inf2" in line for line in report["pe_ipv4"])  # the INFORMATIONAL exchange
    assert len(report["attempts_refused"]) >= 2  # site 2's retries, all refused
    assert report["state_on_2"]["status"] in ("connecting", "retrying", "failed")
    assert report["ike_sas_on_1"] == 0 and report["sas_on_1"] == 0
    assert report["links_on_1"] == 0
    assert report["policies_on_1"] == 2  # only the IP-in-IP guards (out and in) are left
    assert report["ping"] is False


def test_reset_tunnel_with_ike_negotiates_a_new_ike_sa_and_child_sa() -> None:
    report = scenario("ike_scenarios", "reset-ike", 2)
    assert report["up_first"] is not None
    assert report["error"] is None
    assert report["up_again"] is not None
    assert report["spis_after"][0] != report["spis_before"][0]
    assert report["spis_after"][1] != report["spis_before"][1]
    assert not set(report["ike_sa_ids_after"]) & set(report["ike_sa_ids_before"])
    assert report["ike_sas_on_each_end"] == [1, 1]  # one tunnel, one IKE_SA
    assert report["down_reason"] == ["reset by an operator (reset-tunnel)"]
    assert report["ping"]


def test_reset_tunnel_without_ike_resets_the_inbound_sa_after_the_peer_restarted() -> None:
    report = scenario("ike_scenarios", "reset-ikeless", 2)
    assert report["ping_first"]
    assert report["peer_sas_back"]
    assert report["ping_after_peer_restart"] is False  # replayed sequence numbers: dropped
    assert report["error"] is None
    assert report["ping_after_reset"]
    assert report["spis"][0] == report["spis"][1]  # the configured SA, installed again
    assert report["status"] == "up"


@pytest.fixture(scope="module")
def loads() -> dict[str, Any]:
    """One guest for both tests below: sites 1 and 2 load their tunnel four times."""
    try:
        prepare_host()
    except LabUnavailable as exc:
        pytest.skip(str(exc))
    return scenario("ike_scenarios", "one-ike-sa", 2)


def test_both_ends_loading_one_tunnel_end_with_one_ike_sa_and_one_child_sa_each_time(
    loads: dict[str, Any],
) -> None:
    """Staggered, together, crossing on the wire, together: always one IKE_SA per tunnel."""
    report = loads
    assert [r["kind"] for r in report["rounds"]] == [
        "staggered", "together", "crossing", "together",
    ]  # fmt: skip
    one = [{"conn": "site-2" if ce == "ce1" else "site-1", "state": "ESTABLISHED",
            "children": ["INSTALLED"]} for ce in ("ce1", "ce2")]  # fmt: skip
    for r in report["rounds"]:
        assert r["reached_after_s"] is not None, r
        for ce, expected in zip(("ce1", "ce2"), one, strict=True):
            assert [{k: sa[k] for k in expected} for sa in r["sas"][ce]] == [expected], r
        assert r["kernel_sas"] == {"ce1": 2, "ce2": 2}, r
        assert r["cleared"] is not None, r
    crossing = report["rounds"][2]
    assert report["both_sent"] is not None  # two IKE_SA_INITs crossed ...
    assert crossing["duplicates_deleted"] == 1  # ... and one end deleted the one it started


def test_a_peer_not_provisioned_yet_is_named_as_such_in_the_failure_reason(
    loads: dict[str, Any],
) -> None:
    """Site 2 negotiates before site 1 has its configuration: site 1's charon answers
    NO_PROPOSAL_CHOSEN, and site 2 says the peer does not know it (yet)."""
    refusals = loads["refusals"]
    assert [r["retry-count"] for r in refusals[:2]] == ["1", "2"], refusals
    assert all(
        r["reason"].startswith("the peer has no configuration for this CE") for r in refusals
    ), refusals
