"""Tunnel devices and VPN-space routes, through pyroute2 (seed 2.2, 5).

A CE keeps two routing spaces apart: the SP space (the agent's network
namespace: the CE's SP address, the XFRM state) and the VPN space (another
namespace: the site LAN, the routing daemon).  Each peer's tunnel device is
created in the SP space -- so its encapsulated side stays there, under the
XFRM policies -- and then moved into the VPN space, where routes to the
peer's prefixes point into it.  Packets cross between the spaces only by
tunnelling (seed figure 2), so overlapping addresses are harmless and no
route leaks either way (seed 4).

- transport-ipip: an IP-in-IP device per peer; XFRM transport-mode policies
  on protocol 4 between the two SP addresses protect it.
- tunnel-mode: a VTI device per peer; its ikey/okey is the mark of the
  peer's XFRM policies and SAs (route-based tunnel mode).

Devices cevpn owns are named ``cvi`` (IP-in-IP) or ``cvt`` (VTI) followed by
four hex digits of the peer's reqid, so they are recognisable and nothing
else in the kernel is ever touched.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from pyroute2.netlink.exceptions import NetlinkError

from nc_agent.dataplane.link_batch import BatchError, add_tunnels, batchable
from nc_agent.dataplane.netns import netlink_reason, with_ipr

IPIP_PREFIX = "cvi"
VTI_PREFIX = "cvt"
OWNED_PREFIXES = (IPIP_PREFIX, VTI_PREFIX)

Encapsulation = Literal["transport-ipip", "tunnel-mode"]
T = TypeVar("T")


class LinkError(Exception):
    """The kernel refused a device or route change; says which and why."""

    def __init__(self, message: str, created: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.created = list(created)
        """Devices this call had already made when it failed."""


def device_name(encapsulation: Encapsulation, reqid: int) -> str:
    prefix = IPIP_PREFIX if encapsulation == "transport-ipip" else VTI_PREFIX
    return f"{prefix}{reqid & 0xFFFF:04x}"


def esp_overhead(cipher: str, icv_bits: int) -> int:
    """Worst-case octets ESP adds to a packet (RFC 4303 2): header, IV, padding, trailer, ICV.

    Block ciphers in CBC mode carry a 16-octet IV and pad to 16 octets; AEAD
    and counter modes carry an 8-octet IV and pad to 4 (RFC 4106, 3686, 7634).
    """
    cbc = "cbc(" in cipher
    iv = 16 if cbc else 8
    padding = 15 if cbc else 3
    return 8 + iv + padding + 2 + icv_bits // 8


def tunnel_mtu(link_mtu: int, cipher: str, icv_bits: int) -> int:
    """The tunnel device MTU leaving room for the outer header and ESP (LAB.md: 1446, GCM)."""
    return link_mtu - 20 - esp_overhead(cipher, icv_bits)


@dataclass(frozen=True)
class Tunnel:
    """One peer's tunnel device, as the kernel should have it."""

    name: str
    encapsulation: Encapsulation
    local: str
    remote: str
    mtu: int
    key: int = 0
    """VTI ikey/okey: the mark of the peer's XFRM objects (0 for IP-in-IP)."""
    routes: tuple[str, ...] = ()
    """VPN-space prefixes routed into the device."""
    address: str | None = None
    """VPN-space address (a /32, the router ID) for unnumbered point-to-point use."""


@dataclass(frozen=True)
class Existing:
    name: str
    kind: str
    local: str
    remote: str
    mtu: int
    key: int
    up: bool
    routes: tuple[str, ...]


MAIN_TABLE = 254
"""RT_TABLE_MAIN: where the VPN-space routes into tunnels live."""
ROUTE_PROTO = 0xCE
"""rtnetlink protocol of the routes the agent installs: the routing daemon's routes into
the same devices (OSPF, proto bird) are never the agent's to compare or remove."""
RTPROT_BOOT = 3
"""What earlier versions installed their routes with (still recognised as the agent's)."""


def _ours(route: Any) -> bool:
    return route["proto"] in (ROUTE_PROTO, RTPROT_BOOT)


def _attr(msg: Any, name: str, default: Any = None) -> Any:
    value = msg.get_attr(name)
    return default if value is None else value


class Links:
    """Tunnel devices of one CE: created in ``sp_netns``, living in ``vpn_netns``."""

    def __init__(self, vpn_netns: str, sp_netns: str | None = None) -> None:
        self.vpn_netns = vpn_netns
        self.sp_netns = sp_netns

    # -- reading ---------------------------------------------------------------

    def existing(self) -> dict[str, Existing]:
        """cevpn's tunnel devices in the VPN space, with the routes into them."""
        return with_ipr(self.vpn_netns, _existing)

    # -- changing --------------------------------------------------------------

    def add(self, tunnel: Tunnel) -> None:
        self.add_many([tunnel])

    def add_many(self, tunnels: Sequence[Tunnel]) -> None:
        """Create devices in the SP space, move them to the VPN space, configure them there.

        One namespace switch and one rtnetlink handle for the whole batch (each
        costs tens of milliseconds under a slow kernel); IPv4 devices, all new,
        go to the kernel in one netlink batch per namespace (link_batch).  On
        failure the LinkError's ``created`` lists the devices already made.
        """
        if tunnels and all(batchable(t) for t in tunnels):
            try:
                add_tunnels(tunnels, self.sp_netns, self.vpn_netns, ROUTE_PROTO)
            except BatchError as exc:
                raise LinkError(str(exc), exc.created) from exc
            return
        created: list[str] = []

        def create_all(sp: Any) -> None:
            for tunnel in tunnels:
                try:
                    _create(sp, tunnel, self.vpn_netns)
                except NetlinkError as exc:
                    raise LinkError(
                        f"creating {tunnel.name} ({tunnel.local} -> {tunnel.remote}): "
                        f"{netlink_reason(exc)}",
                        created,
                    ) from exc
                created.append(tunnel.name)

        if tunnels:
            with_ipr(self.sp_netns, create_all)
            try:
                self.configure_many(tunnels)
            except LinkError as exc:
                exc.created = created
                raise

    def configure(self, tunnel: Tunnel) -> None:
        self.configure_many([tunnel])

    def configure_many(self, tunnels: Sequence[Tunnel]) -> None:
        """Bring devices up with their MTU, address and routes (idempotent)."""

        def configure_all(vpn: Any) -> None:
            for tunnel in tunnels:
                try:
                    _configure(vpn, tunnel, self.vpn_netns)
                except NetlinkError as exc:
                    raise LinkError(f"configuring {tunnel.name}: {netlink_reason(exc)}") from exc

        if tunnels:
            with_ipr(self.vpn_netns, configure_all)

    def remove(self, name: str) -> None:
        self.remove_many([name])

    def remove_many(self, names: Sequence[str]) -> None:
        """Delete our devices (their routes go with them); missing devices are fine."""
        for name in names:
            if not name.startswith(OWNED_PREFIXES):
                raise ValueError(f"{name} is not a cevpn device")

        def delete(vpn: Any) -> None:
            for name in names:
                found = vpn.link_lookup(ifname=name)
                if found:
                    vpn.link("del", index=found[0])

        if names:
            with_ipr(self.vpn_netns, delete)


def _existing(vpn: Any) -> dict[str, Existing]:
    out: dict[str, Existing] = {}
    routes: dict[int, list[str]] = {}
    for route in vpn.get_routes(family=2, table=MAIN_TABLE):
        if not _ours(route):
            continue
        oif = _attr(route, "RTA_OIF")
        dst = _attr(route, "RTA_DST")
        if oif is not None and dst is not None:
            routes.setdefault(oif, []).append(f"{dst}/{route['dst_len']}")
    for link in vpn.get_links():
        name = _attr(link, "IFLA_IFNAME", "")
        if not name.startswith(OWNED_PREFIXES):
            continue
        info = _attr(link, "IFLA_LINKINFO")
        kind = info.get_attr("IFLA_INFO_KIND") if info is not None else ""
        data = info.get_attr("IFLA_INFO_DATA") if info is not None else None
        prefix = "IFLA_IPIP" if kind == "ipip" else "IFLA_VTI"
        local = remote = ""
        key = 0
        if data is not None:
            local = data.get_attr(f"{prefix}_LOCAL") or ""
            remote = data.get_attr(f"{prefix}_REMOTE") or ""
            if kind == "vti":
                key = data.get_attr("IFLA_VTI_IKEY") or 0
        out[name] = Existing(
            name=name,
            kind=kind,
            local=local,
            remote=remote,
            mtu=_attr(link, "IFLA_MTU", 0),
            key=key,
            up=bool(link["flags"] & 1),
            routes=tuple(sorted(routes.get(link["index"], []))),
        )
    return out


def _create(sp: Any, tunnel: Tunnel, vpn_netns: str) -> None:
    if tunnel.encapsulation == "transport-ipip":
        sp.link(
            "add",
            ifname=tunnel.name,
            kind="ipip",
            ipip_local=tunnel.local,
            ipip_remote=tunnel.remote,
            ipip_ttl=64,
        )
    else:
        sp.link(
            "add",
            ifname=tunnel.name,
            kind="vti",
            vti_local=tunnel.local,
            vti_remote=tunnel.remote,
            vti_ikey=tunnel.key,
            vti_okey=tunnel.key,
        )
    index = sp.link_lookup(ifname=tunnel.name)[0]
    sp.link("set", index=index, mtu=tunnel.mtu)
    sp.link("set", index=index, net_ns_fd=vpn_netns)


def _configure(vpn: Any, tunnel: Tunnel, vpn_netns: str) -> None:
    found = vpn.link_lookup(ifname=tunnel.name)
    if not found:
        raise LinkError(f"{tunnel.name} is missing from the VPN space {vpn_netns}")
    index = found[0]
    vpn.link("set", index=index, mtu=tunnel.mtu, state="up")
    if tunnel.address:
        present = {_attr(a, "IFA_ADDRESS") for a in vpn.get_addr(index=index, family=2)}
        if tunnel.address not in present:
            vpn.addr("add", index=index, address=tunnel.address, prefixlen=32)
    current = {
        f"{_attr(r, 'RTA_DST')}/{r['dst_len']}"
        # The main table only: an address on the device puts its local and broadcast
        # routes in table 'local', which are the kernel's, not ours to remove.
        for r in vpn.get_routes(family=2, oif=index, table=MAIN_TABLE)
        if _attr(r, "RTA_DST") is not None and _ours(r)
    }
    wanted = {str(ipaddress.ip_network(p, strict=False)) for p in tunnel.routes}
    for prefix in sorted(current - wanted):
        vpn.route("del", dst=prefix, oif=index)
    for prefix in sorted(wanted - current):
        vpn.route("replace", dst=prefix, oif=index, proto=ROUTE_PROTO)
