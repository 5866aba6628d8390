"""The CE's SP-side packet filter and its integrated Internet gateway, through nftables.

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
import logging
import re
import subprocess
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from nc_agent.dataplane.gateway import MARK as GATEWAY_MARK
from nc_agent.dataplane.gateway import SP_DEVICE as GATEWAY_SP_DEVICE
from nc_agent.dataplane.netns import create_in

log = logging.getLogger("cevpn.agent")
TABLE = "inet cevpn"
DEFAULT_MANAGEMENT_PORT = 830
INPUT_LOG_PREFIX = "cevpn ingress drop: "
FORWARD_LOG_PREFIX = "cevpn forward drop: "
LOG_RATE = "5/minute"
"""Dropped packets are whatever the SP network sends: logging each would let it flood the log."""
IKE_PORTS = (500, 4500)
NFT_TIMEOUT = 30.0

REMOVE_SCRIPT = f"table {TABLE} {{}}\ndelete table {TABLE}\n"
"""Create-then-delete: removes the table whether or not it exists, in one transaction."""

_IFNAME = re.compile(r"[A-Za-z0-9_.:@-]{1,15}")
"""Interface names we are willing to quote into a script (IFNAMSIZ - 1 octets)."""
_RULE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
"""cevpn-types:name; allow-rule names end up inside a quoted nft comment."""

T = TypeVar("T")


class IngressError(Exception):
    """nft refused a change or a query; the message carries nft's own explanation."""


def _check_ifname(name: str, what: str) -> None:
    if not _IFNAME.fullmatch(name):
        raise ValueError(f"{what} {name!r} is not an interface name")


@dataclass(frozen=True)
class AllowRule:
    """Further traffic to the SP address a CE accepts ('complementary procedures', seed 6.2)."""

    name: str
    protocol: int
    destination_port: int | None = None
    """TCP or UDP only (YANG's 'when'): other protocols have no ports nft can match."""
    source_prefix: str | None = None
    """Absent: any source."""

    def __post_init__(self) -> None:
        if not _RULE_NAME.fullmatch(self.name):
            raise ValueError(f"allow rule name {self.name!r} is not a cevpn name")
        if not 0 <= self.protocol <= 255:
            raise ValueError(f"allow rule {self.name}: protocol {self.protocol} is not 0..255")
        if self.destination_port is not None:
            if self.protocol not in (6, 17):
                raise ValueError(f"allow rule {self.name}: a port needs TCP (6) or UDP (17)")
            if not 0 <= self.destination_port <= 65535:
                raise ValueError(f"allow rule {self.name}: port {self.destination_port}")
        if self.source_prefix is not None:
            ipaddress.ip_network(self.source_prefix, strict=False)


@dataclass(frozen=True)
class Gateway:
    """The integrated Internet gateway (seed 6.1) as the SP space sees it."""

    device: str
    """The SP-space end of the veth pair from the VPN space."""
    nat: bool = True
    """Without NAT the VPN's own addresses go out: only for VPNs numbered from public space."""
    mark: int = GATEWAY_MARK

    def __post_init__(self) -> None:
        _check_ifname(self.device, "gateway device")
        if not 0 < self.mark <= 0xFFFFFFFF:
            raise ValueError(f"gateway mark {self.mark:#x} is not a non-zero 32-bit value")


@dataclass(frozen=True)
class IngressPolicy:
    """What the CE accepts on its SP interface, and whether it is an Internet gateway."""

    sp_interface: str
    """Empty: not resolved yet (the interface holding ``sp_address``); render() refuses it."""
    sp_address: str
    management_port: int = DEFAULT_MANAGEMENT_PORT
    management_sources: tuple[str, ...] = ()
    """Prefixes management may come from; empty: any source."""
    allow: tuple[AllowRule, ...] = ()
    log_drops: bool = False
    enabled: bool = True
    """False: no filtering at all; a gateway still marks and NATs, so Internet access works."""
    gateway: Gateway | None = None

    def __post_init__(self) -> None:
        if self.sp_interface:
            _check_ifname(self.sp_interface, "SP interface")
        ipaddress.ip_address(self.sp_address)
        for prefix in self.management_sources:
            ipaddress.ip_network(prefix, strict=False)
        if not 0 < self.management_port <= 65535:
            raise ValueError(f"management port {self.management_port} is not 1..65535")
        if self.gateway is not None and self.gateway.device == self.sp_interface:
            raise ValueError("the gateway device cannot be the SP interface")


def policy_from_config(ce: Mapping[str, Any], sp_interface: str) -> IngressPolicy | None:
    """The ingress policy of a cevpn-ce ``ce`` container (RFC 7951 JSON, with defaults).

    ``sp_interface`` is pre-configuration/sp-interface, or "" for the caller
    to resolve later: the interface holding the SP address is the kernel's
    to say, and render() refuses a policy until it is known.  None when the
    CE has no SP address yet: there is nothing to guard and nothing to NAT
    to.  Allow rules are sorted by name, so one configuration always renders
    to one script whatever order the datastore printed the list in.
    """
    pre = ce.get("pre-configuration") or {}
    sp_address = pre.get("sp-address")
    if not sp_address:
        return None
    management = pre.get("management") or {}
    ingress = ce.get("ingress-policy") or {}
    access = ce.get("internet-access") or {}
    allow = tuple(
        sorted(
            (
                AllowRule(
                    name=str(rule["name"]),
                    protocol=int(rule["protocol"]),
                    destination_port=_optional_int(rule.get("destination-port")),
                    source_prefix=rule.get("source-prefix"),
                )
                for rule in ingress.get("allow") or ()
            ),
            key=lambda rule: rule.name,
        )
    )
    gateway = None
    if access.get("role", "none") == "integrated-gateway":
        integrated = access.get("integrated-gateway") or {}
        gateway = Gateway(GATEWAY_SP_DEVICE, nat=bool(integrated.get("nat", True)))
    return IngressPolicy(
        sp_interface=sp_interface,
        sp_address=str(sp_address),
        management_port=int(management.get("port", DEFAULT_MANAGEMENT_PORT)),
        management_sources=tuple(str(p) for p in ingress.get("management-source") or ()),
        allow=allow,
        log_drops=bool(ingress.get("log-drops", False)),
        enabled=bool(ingress.get("enabled", True)),
        gateway=gateway,
    )


def _optional_int(value: Any) -> int | None:
    return None if value is None else int(value)


# -- rendering -----------------------------------------------------------------


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


class IngressFilter:
    """The ingress policy in whichever packet filter the SP space's kernel has.

    nftables first; a kernel whose nf_tables has no address family (nft answers
    "Operation not supported" to any table) gets the same rules as iptables-legacy
    chains (nc_agent.dataplane.ingress_iptables) -- from then on, for this agent."""

    def __init__(self, sp_netns: str | None) -> None:
        self.nft = Nftables(sp_netns)
        self.sp_netns = sp_netns
        self.backend = "nftables"

    def apply(self, policy: IngressPolicy | None) -> None:
        from nc_agent.dataplane.ingress_iptables import Iptables

        if self.backend == "nftables":
            try:
                self.nft.apply(policy)
                return
            except IngressError as exc:
                if "Operation not supported" not in str(exc):
                    raise
                log.warning("this kernel's nf_tables has no address family: using iptables")
                self.backend = "iptables"
        Iptables(self.sp_netns).apply(policy)
