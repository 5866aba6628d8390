"""The CE's SP-side ingress policy (seed 6.2) and Internet gateway (seed 6.1), as data.

What a configuration asks the packet filter for: what the CE accepts on its SP
interface and whether it is an integrated Internet gateway.  Two back ends
install it, behind one interface (:class:`IngressBackend`): nftables
(nc_agent.dataplane.ingress_nft, the policy's home) and, for kernels whose
nf_tables has no address family, iptables-legacy
(nc_agent.dataplane.ingress_iptables).  nc_agent.dataplane.ingress picks one.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from nc_agent.dataplane.gateway import MARK as GATEWAY_MARK
from nc_agent.dataplane.gateway import SP_DEVICE as GATEWAY_SP_DEVICE

DEFAULT_MANAGEMENT_PORT = 830
INPUT_LOG_PREFIX = "cevpn ingress drop: "
FORWARD_LOG_PREFIX = "cevpn forward drop: "
IKE_PORTS = (500, 4500)

_IFNAME = re.compile(r"[A-Za-z0-9_.:@-]{1,15}")
"""Interface names we are willing to quote into a script (IFNAMSIZ - 1 octets)."""
_RULE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
"""cevpn-types:name; allow-rule names end up inside a quoted nft comment."""


class IngressError(Exception):
    """The packet filter refused a change or a query; the message carries its own words."""


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
    management = pre["management"]
    ingress = ce["ingress-policy"]
    access = ce["internet-access"]
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
    if access["role"] == "integrated-gateway":
        gateway = Gateway(GATEWAY_SP_DEVICE, nat=bool(access["integrated-gateway"]["nat"]))
    return IngressPolicy(
        sp_interface=sp_interface,
        sp_address=str(sp_address),
        management_port=int(management["port"]),
        management_sources=tuple(str(p) for p in ingress.get("management-source") or ()),
        allow=allow,
        log_drops=bool(ingress["log-drops"]),
        enabled=bool(ingress["enabled"]),
        gateway=gateway,
    )


def _optional_int(value: Any) -> int | None:
    return None if value is None else int(value)


# -- rendering -----------------------------------------------------------------


class IngressBackend(Protocol):
    """A packet filter that installs an :class:`IngressPolicy` (nftables or iptables)."""

    def apply(self, policy: IngressPolicy | None) -> None:
        """Replace what this back end installed with ``policy`` (None: remove it), atomically:
        on failure (IngressError) the previous policy stays whole."""
        ...
