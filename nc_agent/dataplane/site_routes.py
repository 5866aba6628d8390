"""Static routes towards the site's own routers, in the VPN space (cevpn-ce routing/static-route).

A site whose LAN is bigger than the CE's own subnets reaches the rest through
routers of its own: ``routing/static-route`` names each such prefix and its
next hop in the site.  The agent installs them in the VPN space's main table
with its own protocol number (0xce), like the routes into its tunnels, so
that it only ever compares and removes routes it made; with dynamic routing
BIRD also announces them to the other sites (nc_agent.routing).

Routes through the agent's own devices (tunnels ``cvi*``/``cvt*``, the
gateway link ``cvg0``) belong to the links and gateway layers and are never
touched here.  A next hop the kernel cannot reach (no connected route to it)
is refused with the prefix named, and the routes installed by the same call
are taken back.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from pyroute2.netlink.exceptions import NetlinkError

from nc_agent.dataplane.links import (
    IPIP_PREFIX,
    MAIN_TABLE,
    ROUTE_PROTO,
    VTI_PREFIX,
    LinkError,
    _attr,
)
from nc_agent.dataplane.netns import netlink_reason, with_ipr

AGENT_DEVICES = (IPIP_PREFIX, VTI_PREFIX, "cvg")
"""Name prefixes of devices whose routes other layers own."""


@dataclass(frozen=True, order=True)
class StaticRoute:
    prefix: str
    next_hop: str

    @property
    def family(self) -> int:
        return 10 if ipaddress.ip_network(self.prefix, strict=False).version == 6 else 2

    def describe(self) -> str:
        return f"{self.prefix} via {self.next_hop}"


def static_routes_from_config(ce: Mapping[str, Any]) -> frozenset[StaticRoute]:
    """The static routes of a cevpn-ce ``ce`` container (prefixes in canonical form)."""
    return frozenset(
        StaticRoute(str(ipaddress.ip_network(r["prefix"], strict=False)), str(r["next-hop"]))
        for r in ce.get("routing", {}).get("static-route", ())
    )


class SiteRoutes:
    """The static routes of one CE's VPN space."""

    def __init__(self, vpn_netns: str) -> None:
        self.vpn_netns = vpn_netns

    def installed(self) -> frozenset[StaticRoute]:
        return with_ipr(self.vpn_netns, _installed)

    def apply(self, wanted: Iterable[StaticRoute]) -> None:
        """Make the VPN space hold exactly ``wanted`` of the agent's static routes.

        LinkError names the route the kernel refused; what this call added or
        removed before it is put back as it was."""
        target = frozenset(wanted)
        with_ipr(self.vpn_netns, lambda vpn: _apply(vpn, target))


def _installed(vpn: Any) -> frozenset[StaticRoute]:
    skip = {
        link["index"]
        for link in vpn.get_links()
        if str(_attr(link, "IFLA_IFNAME", "")).startswith(AGENT_DEVICES)
    }
    found: set[StaticRoute] = set()
    for family, default in ((2, "0.0.0.0"), (10, "::")):  # noqa: S104 - a default route
        for route in vpn.get_routes(family=family, table=MAIN_TABLE):
            gateway = _attr(route, "RTA_GATEWAY")
            if route["proto"] != ROUTE_PROTO or gateway is None:
                continue
            if _attr(route, "RTA_OIF") in skip:
                continue
            dst = _attr(route, "RTA_DST", default)
            found.add(StaticRoute(f"{dst}/{route['dst_len']}", str(gateway)))
    return frozenset(found)


def _apply(vpn: Any, wanted: frozenset[StaticRoute]) -> None:
    current = _installed(vpn)
    # A route whose next hop changed is replaced in place (one prefix, one route).
    kept_prefixes = {w.prefix for w in wanted}
    stale = {r for r in current - wanted if r.prefix not in kept_prefixes}
    done: list[tuple[str, StaticRoute]] = []
    try:
        for route in sorted(wanted - current):
            _set(vpn, "replace", route)
            done.append(("added", route))
        for route in sorted(stale):
            _set(vpn, "del", route)
            done.append(("removed", route))
    except NetlinkError as exc:
        failed = route
        for what, route in reversed(done):
            previous = next((c for c in current if c.prefix == route.prefix), None)
            try:
                if what == "removed":
                    _set(vpn, "replace", route)
                elif previous is not None:
                    _set(vpn, "replace", previous)
                else:
                    _set(vpn, "del", route)
            except NetlinkError:
                pass  # the next commit's reconciliation tries again
        raise LinkError(
            f"static route {failed.describe()}: {netlink_reason(exc)} "
            "(the next hop must be on a subnet of the site the CE is connected to)"
        ) from exc


def _set(vpn: Any, op: str, route: StaticRoute) -> None:
    vpn.route(
        op,
        dst=route.prefix,
        gateway=route.next_hop,
        family=route.family,
        table=MAIN_TABLE,
        proto=ROUTE_PROTO,
    )
