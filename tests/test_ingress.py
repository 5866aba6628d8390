"""The CE's SP-side filter (seed 6.2) and integrated gateway NAT (seed 6.1) as nft scripts.

Rendering and configuration mapping are pure and compared as text.  Where this host lets
root use nftables, every rendered variant also goes through ``nft --check`` (the kernel
validates it without applying anything), and a throw-away network namespace receives a
real policy, so a script nft would refuse can never ship.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nc_agent.dataplane import ingress_nft
from nc_agent.dataplane.gateway import set_forwarding
from nc_agent.dataplane.ingress_nft import REMOVE_SCRIPT, Nftables, render
from nc_agent.dataplane.ingress_policy import (
    GATEWAY_MARK,
    GATEWAY_SP_DEVICE,
    AllowRule,
    Gateway,
    IngressError,
    IngressPolicy,
    policy_from_config,
)
from tests.yang_defaults import ce_with_defaults


def policy_of(ce: dict[str, Any], sp_interface: str) -> IngressPolicy | None:
    """policy_from_config of ``ce`` as the agent sees it, with the model's defaults."""
    return policy_from_config(ce_with_defaults(ce), sp_interface)


SP = "sp0"
ADDRESS = "192.0.2.1"
ADDRESS6 = "2001:db8::1"
EXAMPLES = Path(__file__).resolve().parent / "examples" / "valid"

PLAIN = """\
table inet cevpn {}
delete table inet cevpn
table inet cevpn {
\tchain input {
\t\ttype filter hook input priority filter; policy accept;
\t\tiifname "sp0" ip daddr 192.0.2.1 ip protocol ipip meta ipsec missing drop
\t\tiifname "sp0" ct state established,related accept
\t\tiifname "sp0" ip daddr 192.0.2.1 ip protocol esp accept
\t\tiifname "sp0" ip daddr 192.0.2.1 udp dport { 500, 4500 } accept
\t\tiifname "sp0" ip daddr 192.0.2.1 ip protocol ipip meta ipsec exists accept
\t\tiifname "sp0" ip daddr 192.0.2.1 tcp dport 830 accept
\t\tiifname "sp0" drop
\t}

\tchain forward {
\t\ttype filter hook forward priority filter; policy accept;
\t\tiifname "sp0" drop
\t}
}
"""

GATEWAY_CHAINS = """\
\tchain forward {
\t\ttype filter hook forward priority filter; policy accept;
\t\tiifname "cvg1" oifname "sp0" accept
\t\tiifname "sp0" oifname "cvg1" ct state established,related accept
\t\tiifname "sp0" drop
\t}

\tchain prerouting {
\t\ttype filter hook prerouting priority mangle; policy accept;
\t\tiifname "cvg1" ct mark set 0xce
\t\tiifname "sp0" ct mark 0xce meta mark set 0xce
\t}

\tchain postrouting {
\t\ttype nat hook postrouting priority srcnat; policy accept;
\t\toifname "sp0" ct mark 0xce snat ip to 192.0.2.1
\t}
}
"""


def policy(**changes: Any) -> IngressPolicy:
    values: dict[str, Any] = {"sp_interface": SP, "sp_address": ADDRESS}
    values.update(changes)
    return IngressPolicy(**values)


def lines(script: str) -> list[str]:
    return [line.strip() for line in script.splitlines()]


def chain(script: str, name: str) -> list[str]:
    """The rules of one chain, without its hook line."""
    out: list[str] = []
    inside = False
    for line in lines(script):
        if line == f"chain {name} {{":
            inside = True
        elif inside and line == "}":
            return out[1:]
        elif inside:
            out.append(line)
    return []


# -- rendering: a plain CE -----------------------------------------------------------------


def test_a_plain_ce_accepts_ipsec_ike_and_management_to_its_address_and_drops_the_rest() -> None:
    assert render(policy()) == PLAIN


def test_the_script_replaces_the_whole_table_and_touches_no_other() -> None:
    script = render(policy(gateway=Gateway(GATEWAY_SP_DEVICE)))
    assert script.startswith("table inet cevpn {}\ndelete table inet cevpn\ntable inet cevpn {\n")
    tables = [line for line in lines(script) if line.startswith(("table", "delete", "flush"))]
    assert all(" inet cevpn" in line for line in tables)


def test_clear_ip_in_ip_is_dropped_before_conntrack_could_call_it_established() -> None:
    rules = chain(render(policy()), "input")
    clear = rules.index('iifname "sp0" ip daddr 192.0.2.1 ip protocol ipip meta ipsec missing drop')
    assert clear < rules.index('iifname "sp0" ct state established,related accept')


def test_every_filtering_rule_matches_the_sp_interface_only() -> None:
    script = render(policy(allow=(AllowRule("gre", 47),), log_drops=True))
    for name in ("input", "forward"):
        assert all(rule.startswith('iifname "sp0" ') for rule in chain(script, name))


def test_the_management_port_follows_the_policy() -> None:
    assert 'iifname "sp0" ip daddr 192.0.2.1 tcp dport 2022 accept' in chain(
        render(policy(management_port=2022)), "input"
    )


def test_rendering_is_deterministic() -> None:
    made = policy(
        management_sources=("203.0.113.0/24", "198.51.100.0/24"),
        allow=(AllowRule("web", 6, 443), AllowRule("gre", 47)),
        gateway=Gateway(GATEWAY_SP_DEVICE),
    )
    assert render(made) == render(copy.deepcopy(made))


# -- rendering: management sources ---------------------------------------------------------


def test_management_is_accepted_only_from_the_configured_sources_sorted() -> None:
    rules = chain(render(policy(management_sources=("203.0.113.0/24", "198.51.100.7/32"))), "input")
    assert (
        'iifname "sp0" ip daddr 192.0.2.1 ip saddr { 198.51.100.7/32, 203.0.113.0/24 } '
        "tcp dport 830 accept"
    ) in rules
    assert 'iifname "sp0" ip daddr 192.0.2.1 tcp dport 830 accept' not in rules


def test_a_single_management_source_is_matched_without_a_set() -> None:
    assert 'iifname "sp0" ip daddr 192.0.2.1 ip saddr 203.0.113.0/24 tcp dport 830 accept' in (
        chain(render(policy(management_sources=("203.0.113.0/24",))), "input")
    )


def test_overlapping_management_sources_are_merged_and_host_bits_cleared() -> None:
    rules = chain(render(policy(management_sources=("10.1.0.0/16", "10.9.9.9/8"))), "input")
    assert 'iifname "sp0" ip daddr 192.0.2.1 ip saddr 10.0.0.0/8 tcp dport 830 accept' in rules


def test_management_sources_of_the_other_family_are_left_out() -> None:
    rules = chain(render(policy(management_sources=("2001:db8::/32", "203.0.113.0/24"))), "input")
    assert 'iifname "sp0" ip daddr 192.0.2.1 ip saddr 203.0.113.0/24 tcp dport 830 accept' in rules


def test_management_sources_all_of_the_other_family_leave_management_closed() -> None:
    rules = chain(render(policy(management_sources=("2001:db8::/32",))), "input")
    assert not any("tcp dport 830" in rule for rule in rules)


# -- rendering: allow rules ----------------------------------------------------------------


def test_an_allow_rule_with_a_port_matches_tcp_or_udp_to_the_sp_address() -> None:
    rules = chain(
        render(policy(allow=(AllowRule("web", 6, 443), AllowRule("dns", 17, 53)))), "input"
    )
    assert 'iifname "sp0" ip daddr 192.0.2.1 tcp dport 443 accept comment "allow web"' in rules
    assert 'iifname "sp0" ip daddr 192.0.2.1 udp dport 53 accept comment "allow dns"' in rules


def test_an_allow_rule_without_a_port_matches_the_protocol_number() -> None:
    assert 'iifname "sp0" ip daddr 192.0.2.1 ip protocol 1 accept comment "allow ping"' in chain(
        render(policy(allow=(AllowRule("ping", 1),))), "input"
    )


def test_an_allow_rule_with_a_source_prefix_matches_that_source() -> None:
    rule = AllowRule("bgp", 6, 179, source_prefix="198.51.100.0/24")
    assert (
        'iifname "sp0" ip daddr 192.0.2.1 ip saddr 198.51.100.0/24 tcp dport 179 accept '
        'comment "allow bgp"'
    ) in chain(render(policy(allow=(rule,))), "input")


def test_an_allow_rule_from_the_other_family_is_left_out() -> None:
    rule = AllowRule("v6only", 47, source_prefix="2001:db8::/32")
    assert "v6only" not in render(policy(allow=(rule,)))


def test_allow_rules_come_after_management_and_before_the_drop() -> None:
    rules = chain(render(policy(allow=(AllowRule("gre", 47),))), "input")
    allow = rules.index(
        'iifname "sp0" ip daddr 192.0.2.1 ip protocol 47 accept comment "allow gre"'
    )
    assert rules.index('iifname "sp0" ip daddr 192.0.2.1 tcp dport 830 accept') < allow
    assert allow < rules.index('iifname "sp0" drop')


def test_an_allow_rule_port_needs_tcp_or_udp() -> None:
    with pytest.raises(ValueError, match="TCP"):
        AllowRule("icmp", 1, 80)


def test_an_allow_rule_name_must_be_a_cevpn_name() -> None:
    with pytest.raises(ValueError, match="name"):
        AllowRule('x" accept', 6)


# -- rendering: logging, disabling -----------------------------------------------------------


def test_log_drops_logs_rate_limited_before_each_drop() -> None:
    script = render(policy(log_drops=True))
    assert chain(script, "input")[-2:] == [
        'iifname "sp0" limit rate 5/minute log prefix "cevpn ingress drop: "',
        'iifname "sp0" drop',
    ]
    assert chain(script, "forward")[-2:] == [
        'iifname "sp0" limit rate 5/minute log prefix "cevpn forward drop: "',
        'iifname "sp0" drop',
    ]


def test_without_log_drops_nothing_is_logged() -> None:
    assert " log " not in render(policy())


def test_a_disabled_policy_without_a_gateway_removes_the_table() -> None:
    assert render(policy(enabled=False)) == REMOVE_SCRIPT


def test_a_disabled_policy_filters_nothing_but_keeps_the_gateways_mark_and_nat() -> None:
    script = render(policy(enabled=False, gateway=Gateway(GATEWAY_SP_DEVICE)))
    assert "chain input" not in script and "chain forward" not in script
    assert chain(script, "prerouting") and chain(script, "postrouting")


# -- rendering: IPv6 -------------------------------------------------------------------------


def test_an_ipv6_sp_address_is_matched_with_ip6_and_l4proto() -> None:
    rules = chain(render(policy(sp_address=ADDRESS6)), "input")
    assert 'iifname "sp0" ip6 daddr 2001:db8::1 meta l4proto esp accept' in rules
    assert 'iifname "sp0" ip6 daddr 2001:db8::1 udp dport { 500, 4500 } accept' in rules
    assert 'iifname "sp0" ip6 daddr 2001:db8::1 meta l4proto ipip meta ipsec exists accept' in rules
    assert 'iifname "sp0" ip6 daddr 2001:db8::1 tcp dport 830 accept' in rules
    assert not any(" ip daddr" in rule for rule in rules)


def test_an_ipv6_sp_address_keeps_neighbour_discovery_from_the_link() -> None:
    rules = chain(render(policy(sp_address=ADDRESS6)), "input")
    nd = (
        'iifname "sp0" icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert, nd-router-advert } '
        "ip6 hoplimit 255 accept"
    )
    assert rules.index(nd) < rules.index('iifname "sp0" drop')


def test_an_ipv4_sp_address_has_no_neighbour_discovery_rule() -> None:
    assert "icmpv6" not in render(policy())


def test_an_ipv6_allow_rule_source_uses_ip6_saddr() -> None:
    rule = AllowRule("gre", 47, source_prefix="2001:db8:1::/48")
    assert (
        'iifname "sp0" ip6 daddr 2001:db8::1 ip6 saddr 2001:db8:1::/48 meta l4proto 47 accept '
        'comment "allow gre"'
    ) in chain(render(policy(sp_address=ADDRESS6, allow=(rule,))), "input")


# -- rendering: the integrated gateway -------------------------------------------------------


def test_a_gateway_forwards_out_marks_its_connections_and_nats_to_the_sp_address() -> None:
    script = render(policy(gateway=Gateway(GATEWAY_SP_DEVICE)))
    assert script.endswith(GATEWAY_CHAINS)


def test_a_gateway_lets_only_replies_back_into_the_veth() -> None:
    rules = chain(render(policy(gateway=Gateway(GATEWAY_SP_DEVICE))), "forward")
    assert 'iifname "sp0" oifname "cvg1" ct state established,related accept' in rules
    assert not any('oifname "cvg1" accept' in rule for rule in rules)


def test_a_gateway_without_nat_marks_but_does_not_translate() -> None:
    script = render(policy(gateway=Gateway(GATEWAY_SP_DEVICE, nat=False)))
    assert chain(script, "prerouting") == [
        'iifname "cvg1" ct mark set 0xce',
        'iifname "sp0" ct mark 0xce meta mark set 0xce',
    ]
    assert "postrouting" not in script and "snat" not in script


def test_a_gateway_with_an_ipv6_sp_address_translates_with_snat_ip6() -> None:
    script = render(policy(sp_address=ADDRESS6, gateway=Gateway(GATEWAY_SP_DEVICE)))
    assert chain(script, "postrouting") == ['oifname "sp0" ct mark 0xce snat ip6 to 2001:db8::1']


def test_a_gateway_uses_its_own_mark() -> None:
    script = render(policy(gateway=Gateway(GATEWAY_SP_DEVICE, mark=0x1234)))
    assert 'iifname "sp0" ct mark 0x1234 meta mark set 0x1234' in chain(script, "prerouting")


def test_without_a_gateway_nothing_arriving_on_the_sp_interface_is_forwarded() -> None:
    script = render(policy())
    assert chain(script, "forward") == ['iifname "sp0" drop']
    assert "prerouting" not in script and "postrouting" not in script


def test_interface_names_are_validated_before_they_are_quoted() -> None:
    with pytest.raises(ValueError, match="interface"):
        policy(sp_interface='sp0" accept')
    with pytest.raises(ValueError, match="interface"):
        Gateway("a-name-longer-than-15")


def test_an_unresolved_sp_interface_can_be_held_but_not_rendered() -> None:
    with pytest.raises(ValueError, match="not been resolved"):
        render(policy(sp_interface=""))


def test_the_gateway_device_cannot_be_the_sp_interface() -> None:
    with pytest.raises(ValueError, match="gateway device"):
        policy(gateway=Gateway(SP))


# -- the configuration -----------------------------------------------------------------------


def ce_config(**sections: Any) -> dict[str, Any]:
    ce: dict[str, Any] = {"pre-configuration": {"sp-address": ADDRESS}}
    ce.update(sections)
    return ce


def test_a_ce_without_an_sp_address_has_no_policy() -> None:
    assert policy_of({}, SP) is None
    assert policy_of({"pre-configuration": {"site-id": "a"}}, SP) is None


def test_a_configuration_without_ingress_settings_gives_the_defaults() -> None:
    assert policy_of(ce_config(), SP) == IngressPolicy(SP, ADDRESS)


def test_the_management_port_comes_from_the_pre_configuration() -> None:
    config = {"pre-configuration": {"sp-address": ADDRESS, "management": {"port": 2022}}}
    made = policy_of(config, SP)
    assert made is not None and made.management_port == 2022


def test_the_ingress_policy_leaves_map_to_the_policy_with_allow_rules_sorted_by_name() -> None:
    config = ce_config(
        **{
            "ingress-policy": {
                "enabled": False,
                "management-source": ["203.0.113.0/24"],
                "allow": [
                    {"name": "web", "protocol": 6, "destination-port": 443},
                    {"name": "gre", "protocol": 47, "source-prefix": "198.51.100.0/24"},
                ],
                "log-drops": True,
            }
        }
    )
    assert policy_of(config, SP) == IngressPolicy(
        SP,
        ADDRESS,
        management_sources=("203.0.113.0/24",),
        allow=(AllowRule("gre", 47, None, "198.51.100.0/24"), AllowRule("web", 6, 443)),
        log_drops=True,
        enabled=False,
    )


def test_role_none_means_no_gateway() -> None:
    made = policy_of(ce_config(**{"internet-access": {"role": "none"}}), SP)
    assert made is not None and made.gateway is None


def test_role_via_gateway_site_means_no_gateway_here() -> None:
    made = policy_of(ce_config(**{"internet-access": {"role": "via-gateway-site"}}), SP)
    assert made is not None and made.gateway is None


def test_role_integrated_gateway_makes_a_natting_gateway_on_the_veth() -> None:
    made = policy_of(ce_config(**{"internet-access": {"role": "integrated-gateway"}}), SP)
    assert made is not None and made.gateway == Gateway(GATEWAY_SP_DEVICE, True, GATEWAY_MARK)


def test_an_integrated_gateway_can_forgo_nat() -> None:
    access = {"role": "integrated-gateway", "integrated-gateway": {"nat": False}}
    made = policy_of(ce_config(**{"internet-access": access}), SP)
    assert made is not None and made.gateway == Gateway(GATEWAY_SP_DEVICE, nat=False)


def test_a_validated_configuration_printed_with_defaults_maps_to_the_policy(ce_schema) -> None:
    """The leaf names above are cevpn-ce's: libyang validates them and fills in defaults."""
    document = json.loads((EXAMPLES / "ce-site-b-ikeless.json").read_text())
    ce = document["cevpn-ce:ce"]
    ce["internet-access"] = {"role": "integrated-gateway"}
    ce["ingress-policy"] = {
        "management-source": ["203.0.113.0/24"],
        "allow": [{"name": "web", "protocol": 6, "destination-port": 443}],
    }
    tree = ce_schema.parse_config(json.dumps(document), "json")
    printed = tree.print_mem("json", with_siblings=True, include_implicit_defaults=True)
    made = policy_from_config(json.loads(printed)["cevpn-ce:ce"], SP)
    assert made == IngressPolicy(
        SP,
        ce["pre-configuration"]["sp-address"],
        management_sources=("203.0.113.0/24",),
        allow=(AllowRule("web", 6, 443),),
        gateway=Gateway(GATEWAY_SP_DEVICE),
    )


# -- nft itself ------------------------------------------------------------------------------

NFT = shutil.which("nft")
AS_ROOT = os.geteuid() == 0
needs_nft = pytest.mark.skipif(NFT is None or not AS_ROOT, reason="needs nft and root")

VARIANTS = {
    "plain": policy(),
    "everything": policy(
        management_sources=("203.0.113.0/24", "198.51.100.0/24", "2001:db8::/32"),
        allow=(
            AllowRule("web", 6, 443),
            AllowRule("dns", 17, 53, "198.51.100.0/24"),
            AllowRule("gre", 47),
            AllowRule("ping", 1, None, "203.0.113.7/32"),
        ),
        log_drops=True,
        gateway=Gateway(GATEWAY_SP_DEVICE),
    ),
    "disabled-gateway": policy(enabled=False, gateway=Gateway(GATEWAY_SP_DEVICE)),
    "gateway-without-nat": policy(gateway=Gateway(GATEWAY_SP_DEVICE, nat=False)),
    "ipv6": policy(
        sp_address=ADDRESS6,
        management_sources=("2001:db8:1::/48",),
        allow=(AllowRule("gre", 47, None, "2001:db8:2::/48"), AllowRule("web", 6, 443)),
        log_drops=True,
    ),
    "ipv6-gateway": policy(sp_address=ADDRESS6, gateway=Gateway(GATEWAY_SP_DEVICE)),
}


def nft_check(script: str) -> subprocess.CompletedProcess[str]:
    assert NFT is not None
    return subprocess.run(
        [NFT, "--check", "-f", "-"], input=script, capture_output=True, text=True, check=False
    )


@pytest.fixture(scope="module")
def nft_usable() -> None:
    probe = nft_check("table inet cevpn_probe {}\n")
    if probe.returncode != 0:
        pytest.skip(f"nft cannot talk to nf_tables here: {probe.stderr.strip()}")


@needs_nft
@pytest.mark.parametrize("name", [*VARIANTS, "removal"])
def test_every_rendered_variant_passes_nft_check(name: str, nft_usable: None) -> None:
    script = REMOVE_SCRIPT if name == "removal" else render(VARIANTS[name])
    result = nft_check(script)
    assert result.returncode == 0, f"{name}:\n{script}\n{result.stderr}"


@pytest.fixture
def sp_netns(nft_usable: None) -> Iterator[str]:
    """A throw-away namespace with an SP interface; always deleted."""
    if shutil.which("ip") is None:
        pytest.skip("needs iproute2")
    name = f"cvtest-{uuid.uuid4().hex[:8]}"
    made = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot create a network namespace: {made.stderr.strip()}")
    try:
        # A dummy device where the kernel has the driver, else one end of a veth pair.
        link = ["ip", "-n", name, "link", "add", SP, "type"]
        if subprocess.run([*link, "dummy"], capture_output=True, check=False).returncode != 0:
            subprocess.run([*link, "veth", "peer", "name", f"{SP}p"], check=True)
        subprocess.run(["ip", "-n", name, "addr", "add", f"{ADDRESS}/24", "dev", SP], check=True)
        subprocess.run(["ip", "-n", name, "link", "set", SP, "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False)


@needs_nft
def test_a_policy_applied_to_a_namespace_reads_back_and_is_removed(sp_netns: str) -> None:
    nft = Nftables(sp_netns)
    assert nft.current() is None
    nft.apply(VARIANTS["everything"])
    listed = nft.current()
    assert listed is not None
    assert 'iifname "sp0" ip daddr 192.0.2.1 ip protocol ipip meta ipsec exists accept' in listed
    assert 'oifname "sp0" ct mark 0x000000ce snat ip to 192.0.2.1' in listed
    nft.remove()
    assert nft.current() is None
    nft.remove()  # removing an absent table is fine


@needs_nft
def test_applying_again_replaces_the_table_rather_than_adding_to_it(sp_netns: str) -> None:
    nft = Nftables(sp_netns)
    nft.apply(VARIANTS["everything"])
    nft.apply(VARIANTS["plain"])
    listed = nft.current()
    assert listed is not None
    assert listed.count("meta ipsec exists accept") == 1
    assert "postrouting" not in listed and "allow web" not in listed


@needs_nft
def test_a_policy_does_not_leak_out_of_its_namespace(sp_netns: str) -> None:
    Nftables(sp_netns).apply(VARIANTS["plain"])
    own = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True, check=True)
    assert f"table {ingress_nft.TABLE}" not in own.stdout.splitlines()


@needs_nft
def test_a_refused_script_raises_with_nfts_reason_and_leaves_the_old_table(
    sp_netns: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    nft = Nftables(sp_netns)
    nft.apply(VARIANTS["plain"])
    before = nft.current()
    monkeypatch.setattr(
        ingress_nft, "render", lambda _: REMOVE_SCRIPT + "table inet cevpn { bogus }\n"
    )
    with pytest.raises(IngressError, match="Error"):
        nft.apply(VARIANTS["everything"])
    assert nft.current() == before


@needs_nft
def test_forwarding_is_switched_in_the_sp_namespace_only(sp_netns: str) -> None:
    def forwarding(*netns: str) -> str:
        prefix = ["ip", "netns", "exec", *netns] if netns else []
        command = [*prefix, "cat", "/proc/sys/net/ipv4/ip_forward"]
        return subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip()

    host = forwarding()
    set_forwarding(sp_netns, True)
    assert forwarding(sp_netns) == "1"
    set_forwarding(sp_netns, False)
    assert forwarding(sp_netns) == "0"
    assert forwarding() == host


@pytest.fixture
def three_spaces(nft_usable: None) -> Iterator[tuple[str, str, str]]:
    """VPN space -- SP space -- 'Internet', wired as an integrated gateway; always deleted.

    The veth, the fwmark rule and the routes are other code's in the agent; here they are
    made by hand so that the nft part can be seen carrying traffic.
    """
    if shutil.which("ip") is None or shutil.which("ping") is None:
        pytest.skip("needs iproute2 and ping")
    tag = uuid.uuid4().hex[:6]
    vpn, sp, internet = f"cvtv-{tag}", f"cvts-{tag}", f"cvti-{tag}"
    made: list[str] = []
    try:
        for name in (vpn, sp, internet):
            if subprocess.run(["ip", "netns", "add", name], check=False).returncode != 0:
                pytest.skip("cannot create a network namespace")
            made.append(name)
        for command in (
            f"-n {sp} link add cvg1 type veth peer name cvg0 netns {vpn}",
            f"-n {sp} link add {SP} type veth peer name {SP}p netns {internet}",
            f"-n {vpn} addr add 169.254.206.2/30 dev cvg0",
            f"-n {vpn} link set cvg0 up",
            f"-n {vpn} addr add 10.9.0.1/32 dev lo",
            f"-n {vpn} route add default via 169.254.206.1 src 10.9.0.1",
            f"-n {sp} addr add 169.254.206.1/30 dev cvg1",
            f"-n {sp} link set cvg1 up",
            f"-n {sp} addr add {ADDRESS}/24 dev {SP}",
            f"-n {sp} link set {SP} up",
            f"-n {sp} route add default via 192.0.2.254",
            f"-n {sp} rule add fwmark {GATEWAY_MARK:#x} lookup 100",
            f"-n {sp} route add default via 169.254.206.2 dev cvg1 table 100",
            f"-n {internet} addr add 192.0.2.254/24 dev {SP}p",
            f"-n {internet} link set {SP}p up",
            f"-n {internet} addr add 203.0.113.5/32 dev lo",
        ):
            subprocess.run(["ip", *command.split()], check=True)
        yield vpn, sp, internet
    finally:
        for name in made:
            subprocess.run(["ip", "netns", "delete", name], check=False)


@needs_nft
def test_a_gateway_carries_vpn_traffic_to_the_internet_and_its_replies_back(
    three_spaces: tuple[str, str, str],
) -> None:
    """The Internet side has no route to the VPN's 10.9.0.1: a reply arrives only if the
    request was NATed to the SP address and the reply was marked back into the veth."""
    vpn, sp, _ = three_spaces
    nft = Nftables(sp)
    nft.apply(policy(gateway=Gateway(GATEWAY_SP_DEVICE)))
    set_forwarding(sp, True)
    ping = ["ip", "netns", "exec", vpn, "ping", "-c1", "-W2", "203.0.113.5"]
    assert subprocess.run(ping, capture_output=True, check=False).returncode == 0
