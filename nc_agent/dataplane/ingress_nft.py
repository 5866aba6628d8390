"""The ingress policy (nc_agent.dataplane.ingress_policy) in nftables.

Seed 6.2: of what arrives from the PE, a CE accepts IPsec and IKE to its own
SP address and secured management traffic; an integrated Internet gateway
passes everything else to its gateway function, any other CE drops it
unless explicitly allowed.  Seed 6.1: an integrated gateway sends the VPN's
Internet traffic out of the SP interface, NATed to its SP address.

The VPN space reaches the SP space for the Internet through a veth pair
(``cvg0`` in the VPN space, ``cvg1`` in the SP space; other code creates
it).  VPN routes must stay out of the SP space's main table -- the VPN
space may use any addresses (seed 4) -- so replies find their way back by
a conntrack mark instead: every connection entering from the veth carries
``GATEWAY_MARK``; replies of such connections get the same packet mark on
the SP interface, and an ``ip rule fwmark`` (other code's) routes them into
the veth.

Everything lives in one nftables table, ``inet cevpn``, replaced whole in a
single ``nft -f`` transaction: nft applies a file atomically, so there is
never a moment with half a policy (or none), a failed apply changes
nothing, and nothing outside the table is ever touched.  Only packets
arriving on the SP interface are filtered: loopback, the veth and any other
interface are the operator's business.
"""

from __future__ import annotations

import ipaddress
import subprocess
from collections.abc import Callable, Iterable
from typing import TypeVar

from nc_agent.dataplane.ingress_policy import (
    FORWARD_LOG_PREFIX,
    IKE_PORTS,
    INPUT_LOG_PREFIX,
    AllowRule,
    Gateway,
    IngressError,
    IngressPolicy,
)
from nc_agent.dataplane.netns import create_in

TABLE = "inet cevpn"
LOG_RATE = "5/minute"
"""Dropped packets are whatever the SP network sends: logging each would let it flood the log."""
NFT_TIMEOUT = 30.0

REMOVE_SCRIPT = f"table {TABLE} {{}}\ndelete table {TABLE}\n"
"""Create-then-delete: removes the table whether or not it exists, in one transaction."""

T = TypeVar("T")


def _quote(name: str) -> str:
    return f'"{name}"'


def _prefixes(prefixes: Iterable[str], version: int) -> list[str]:
    """The prefixes of one address family, host bits cleared, overlaps merged, sorted.

    A prefix of the other family can never match a packet to the SP
    address, so it is left out rather than handed to nft (which would
    refuse an IPv6 prefix after ``ip saddr``).
    """
    networks = [ipaddress.ip_network(p, strict=False) for p in prefixes]
    if version == 4:
        v4 = [n for n in networks if isinstance(n, ipaddress.IPv4Network)]
        return [str(n) for n in ipaddress.collapse_addresses(v4)]
    v6 = [n for n in networks if isinstance(n, ipaddress.IPv6Network)]
    return [str(n) for n in ipaddress.collapse_addresses(v6)]


def _set(items: Iterable[str]) -> str:
    values = list(items)
    return values[0] if len(values) == 1 else "{ " + ", ".join(values) + " }"


class _Family:
    """The nft words for the SP address's family, so the rules below read the same for both."""

    def __init__(self, address: str) -> None:
        parsed = ipaddress.ip_address(address)
        self.version = parsed.version
        self.address = str(parsed)
        self.ip = "ip" if parsed.version == 4 else "ip6"
        # 'ip protocol' is IPv4's header field; for IPv6 'meta l4proto' looks past
        # extension headers, where 'ip6 nexthdr' would only see the first one.
        self.protocol = "ip protocol" if parsed.version == 4 else "meta l4proto"

    def to_us(self) -> str:
        return f"{self.ip} daddr {self.address}"

    def source(self, prefixes: list[str]) -> str:
        return f"{self.ip} saddr {_set(prefixes)} "


def _input_rules(policy: IngressPolicy, family: _Family) -> list[str]:
    sp = f"iifname {_quote(policy.sp_interface)}"
    to_us = f"{sp} {family.to_us()}"
    ipip = f"{to_us} {family.protocol} ipip"
    rules = [
        # IP-in-IP is the tunnels' payload: accepted once ESP has been removed
        # (transport-ipip), never in clear.  The drop comes before the conntrack
        # rule because the CE's own outbound IP-in-IP makes a clear packet from
        # a peer's address look 'established'.
        f"{ipip} meta ipsec missing drop",
        f"{sp} ct state established,related accept",
        f"{to_us} {family.protocol} esp accept",
        f"{to_us} udp dport {_set(str(p) for p in IKE_PORTS)} accept",
        f"{ipip} meta ipsec exists accept",
    ]
    management = f"{to_us} tcp dport {policy.management_port} accept"
    if not policy.management_sources:
        rules.append(management)
    else:
        sources = _prefixes(policy.management_sources, family.version)
        if sources:  # only other-family sources: management is reachable from none
            rules.append(
                f"{to_us} {family.source(sources)}tcp dport {policy.management_port} accept"
            )
    for allow in policy.allow:
        rule = _allow_rule(allow, to_us, family)
        if rule is not None:
            rules.append(rule)
    if family.version == 6:
        # Without neighbour discovery the CE loses the PE; solicitations go to
        # multicast, not to the SP address.  Hop limit 255: from this link only.
        rules.append(
            f"{sp} icmpv6 type {{ nd-neighbor-solicit, nd-neighbor-advert, nd-router-advert }} "
            "ip6 hoplimit 255 accept"
        )
    rules.extend(_drop(sp, policy.log_drops, INPUT_LOG_PREFIX))
    return rules


def _allow_rule(allow: AllowRule, to_us: str, family: _Family) -> str | None:
    source = ""
    if allow.source_prefix is not None:
        prefixes = _prefixes([allow.source_prefix], family.version)
        if not prefixes:
            return None  # a source of the other family: the rule can never match
        source = family.source(prefixes)
    if allow.destination_port is not None:
        l4 = "tcp" if allow.protocol == 6 else "udp"
        match = f"{l4} dport {allow.destination_port}"
    else:
        match = f"{family.protocol} {allow.protocol}"
    return f'{to_us} {source}{match} accept comment "allow {allow.name}"'


def _drop(sp: str, log: bool, prefix: str) -> list[str]:
    logged = [f'{sp} limit rate {LOG_RATE} log prefix "{prefix}"'] if log else []
    return [*logged, f"{sp} drop"]


def _forward_rules(policy: IngressPolicy) -> list[str]:
    sp = f"iifname {_quote(policy.sp_interface)}"
    rules = []
    if policy.gateway is not None:
        veth = _quote(policy.gateway.device)
        out = _quote(policy.sp_interface)
        rules += [
            f"iifname {veth} oifname {out} accept",
            # Replies to the gateway's own flows only: it is a firewall, nothing
            # on the Internet opens a connection into the VPN.
            f"{sp} oifname {veth} ct state established,related accept",
        ]
    rules.extend(_drop(sp, policy.log_drops, FORWARD_LOG_PREFIX))
    return rules


def _mark_rules(policy: IngressPolicy, gateway: Gateway) -> list[str]:
    mark = f"{gateway.mark:#x}"
    return [
        f"iifname {_quote(gateway.device)} ct mark set {mark}",
        f"iifname {_quote(policy.sp_interface)} ct mark {mark} meta mark set {mark}",
    ]


def _nat_rules(policy: IngressPolicy, gateway: Gateway, family: _Family) -> list[str]:
    return [
        f"oifname {_quote(policy.sp_interface)} ct mark {gateway.mark:#x} "
        f"snat {family.ip} to {family.address}"
    ]


def _chain(name: str, hook: str, rules: list[str]) -> str:
    body = "".join(f"\t\t{rule}\n" for rule in rules)
    return f"\tchain {name} {{\n\t\t{hook}; policy accept;\n{body}\t}}\n"


def render(policy: IngressPolicy) -> str:
    """The ``nft -f`` script that makes table ``inet cevpn`` exactly what ``policy`` asks.

    The table is created (in case it is absent), deleted and written anew
    in one transaction, so rules never accumulate from earlier versions.
    Chains hook with 'policy accept' and only drop what arrives on the SP
    interface.  A policy that asks for nothing (disabled, no gateway)
    renders to the table's removal.
    """
    if not policy.sp_interface:
        # An empty iifname would match no packet: the filter would silently guard nothing.
        raise ValueError("the ingress policy's SP interface has not been resolved")
    family = _Family(policy.sp_address)
    chains: list[str] = []
    if policy.enabled:
        chains.append(
            _chain("input", "type filter hook input priority filter", _input_rules(policy, family))
        )
        chains.append(
            _chain("forward", "type filter hook forward priority filter", _forward_rules(policy))
        )
    gateway = policy.gateway
    if gateway is not None:
        chains.append(
            _chain(
                "prerouting",
                "type filter hook prerouting priority mangle",
                _mark_rules(policy, gateway),
            )
        )
        if gateway.nat:
            chains.append(
                _chain(
                    "postrouting",
                    "type nat hook postrouting priority srcnat",
                    _nat_rules(policy, gateway, family),
                )
            )
    if not chains:
        return REMOVE_SCRIPT
    return REMOVE_SCRIPT + f"table {TABLE} {{\n" + "\n".join(chains) + "}\n"


# -- the kernel ----------------------------------------------------------------


class Nftables:
    """Table ``inet cevpn`` of the SP space (``sp_netns``; None: the agent's own namespace).

    nft runs as a child of a thread that entered the namespace: the child
    inherits the thread's network namespace, so its netlink socket talks to
    the SP space's nf_tables, and the agent never forks itself.
    """

    def __init__(self, sp_netns: str | None) -> None:
        self.sp_netns = sp_netns

    def apply(self, policy: IngressPolicy | None) -> None:
        """Replace the table with ``policy``'s (None: remove it; an absent table is fine).

        On failure nft has changed nothing: the previous policy stays whole.
        """
        script = REMOVE_SCRIPT if policy is None else render(policy)
        result = self._run(["-f", "-"], script)
        if result.returncode != 0:
            raise IngressError(f"nft refused the ingress policy: {_reason(result)}")

    def remove(self) -> None:
        self.apply(None)

    def current(self) -> str | None:
        """``nft list table inet cevpn`` as nft prints it; None when there is no such table."""

        def query() -> str | None:
            listed = _nft(["list", "table", *TABLE.split()])
            if listed.returncode == 0:
                return listed.stdout
            # nft's 'absent' error is strerror text; asking which tables exist is
            # how to tell it from a real failure without parsing messages.
            tables = _nft(["list", "tables", "inet"])
            if tables.returncode == 0 and f"table {TABLE}" not in tables.stdout.splitlines():
                return None
            raise IngressError(f"cannot list table {TABLE}: {_reason(listed)}")

        return self._in_netns(query)

    def _run(self, args: list[str], script: str) -> subprocess.CompletedProcess[str]:
        return self._in_netns(lambda: _nft(args, script))

    def _in_netns(self, work: Callable[[], T]) -> T:
        return create_in(self.sp_netns, work)


def _nft(args: list[str], script: str | None = None) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            ["nft", *args],
            input=script,
            capture_output=True,
            text=True,
            timeout=NFT_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise IngressError(f"cannot run nft: {exc}") from exc


def _reason(result: subprocess.CompletedProcess[str]) -> str:
    return result.stderr.strip() or f"nft exited with status {result.returncode}"
