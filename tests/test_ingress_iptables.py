"""The ingress policy's iptables backend (kernels whose nf_tables has no family, the lab's).

Rendering is pure; the namespace tests apply it with iptables-legacy to a
throw-away network namespace of this host (skipped when not root).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator

import pytest

from nc_agent.dataplane.ingress_iptables import Iptables, render, rules
from nc_agent.dataplane.ingress_policy import AllowRule, Gateway, IngressError, IngressPolicy

POLICY = IngressPolicy("sp0", "198.51.100.2")
GATEWAY = IngressPolicy("sp0", "198.51.100.2", gateway=Gateway("cvg1"))


def test_only_esp_ike_ipsec_protected_ipip_and_management_reach_the_ce() -> None:
    accepted = [r for r in rules(POLICY)["CEVPN-INPUT"] if r.endswith("ACCEPT")]
    assert accepted == [
        "-i sp0 -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT",
        "-i sp0 -d 198.51.100.2 -p esp -j ACCEPT",
        "-i sp0 -d 198.51.100.2 -p udp --dport 500 -j ACCEPT",
        "-i sp0 -d 198.51.100.2 -p udp --dport 4500 -j ACCEPT",
        "-i sp0 -d 198.51.100.2 -p 4 -m policy --dir in --pol ipsec -j ACCEPT",
        "-i sp0 -d 198.51.100.2 -p tcp --dport 830 -j ACCEPT",
    ]
    assert rules(POLICY)["CEVPN-INPUT"][-1] == "-i sp0 -j DROP"


def test_clear_ip_in_ip_is_dropped_before_conntrack_can_accept_it() -> None:
    chain = rules(POLICY)["CEVPN-INPUT"]
    assert chain[0] == "-i sp0 -d 198.51.100.2 -p 4 -m policy --dir in --pol none -j DROP"


def test_management_sources_and_allow_rules_narrow_what_is_accepted() -> None:
    policy = IngressPolicy(
        "sp0", "198.51.100.2", management_sources=("192.0.2.0/24",),
        allow=(AllowRule("snmp", 17, 161, "192.0.2.0/24"),),
    )  # fmt: skip
    chain = rules(policy)["CEVPN-INPUT"]
    assert "-i sp0 -d 198.51.100.2 -p tcp -s 192.0.2.0/24 --dport 830 -j ACCEPT" in chain
    assert "-i sp0 -d 198.51.100.2 -p 17 -s 192.0.2.0/24 --dport 161 -j ACCEPT" in chain


def test_a_gateway_forwards_out_and_only_replies_back_marked_and_nated() -> None:
    chains = rules(GATEWAY)
    assert chains["CEVPN-FORWARD"][:2] == [
        "-i cvg1 -o sp0 -j ACCEPT",
        "-i sp0 -o cvg1 -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT",
    ]
    assert chains["CEVPN-POSTROUTING"] == [
        "-o sp0 -m connmark --mark 0xce -j SNAT --to-source 198.51.100.2"
    ]
    assert "-i cvg1 -j CONNMARK --set-mark 0xce" in chains["CEVPN-PREROUTING"]


def test_a_disabled_policy_filters_nothing_but_the_gateway_still_nats() -> None:
    policy = IngressPolicy("sp0", "198.51.100.2", enabled=False, gateway=Gateway("cvg1"))
    chains = rules(policy)
    assert chains["CEVPN-INPUT"] == [] and chains["CEVPN-FORWARD"] == []
    assert chains["CEVPN-POSTROUTING"]


def test_existing_jumps_are_not_added_twice() -> None:
    present = {"-A INPUT -j CEVPN-INPUT", "-A FORWARD -j CEVPN-FORWARD"}
    script = render(POLICY, present)
    assert "-I INPUT 1 -j CEVPN-INPUT" not in script
    assert "-I PREROUTING 1 -j CEVPN-PREROUTING" in script


def test_an_ipv6_sp_address_needs_nftables() -> None:
    with pytest.raises(IngressError, match="IPv4 only"):
        rules(IngressPolicy("sp0", "2001:db8::1"))


needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("iptables-legacy-restore") is None,
    reason="needs root and iptables-legacy",
)


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"cevpn-ipt-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    subprocess.run(
        ["ip", "-n", name, "link", "add", "sp0", "type", "veth", "peer", "name", "x0"], check=True
    )
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


@needs_root
def test_applying_twice_then_removing_leaves_one_jump_and_empty_chains(netns: str) -> None:
    ipt = Iptables(netns)
    ipt.apply(GATEWAY)
    ipt.apply(GATEWAY)
    current = ipt.current()
    assert current.count("-A INPUT -j CEVPN-INPUT") == 1
    assert "--to-source 198.51.100.2" in current
    ipt.apply(None)
    after = ipt.current()
    assert "-A CEVPN-INPUT" not in after and "SNAT" not in after
    assert after.count("-A INPUT -j CEVPN-INPUT") == 1


@needs_root
def test_a_refused_rule_changes_nothing(netns: str, monkeypatch: pytest.MonkeyPatch) -> None:
    ipt = Iptables(netns)
    ipt.apply(POLICY)
    before = ipt.current()
    import nc_agent.dataplane.ingress_iptables as backend

    monkeypatch.setattr(backend, "rules", lambda policy: {"CEVPN-INPUT": ["-p nosuch -j DROP"]})
    with pytest.raises(IngressError, match="refused"):
        ipt.apply(POLICY)
    assert ipt.current() == before
