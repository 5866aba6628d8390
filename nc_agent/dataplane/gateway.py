"""The integrated Internet gateway's link between the two routing spaces (seed 6.1).

A CE that is an integrated Internet gateway forwards VPN traffic that is for
no other site to the SP side, without IPsec, after NAT.  The two spaces are
separate namespaces, so the gateway function gets its own link between them:
a veth pair, ``cvg0`` in the VPN space and ``cvg1`` in the SP space, on a
link-local /30 that is never routed anywhere else.

- VPN space: the default route points into ``cvg0`` (the site's "default
  route (v) pointing to their Internet Gateway", seed 6.1); dynamic routing
  announces it to the other sites (nc_agent.routing), static routing gives
  the other sites a default into their tunnel to this CE (the VPN server).
- SP space: packets from ``cvg1`` are NATed to the CE's SP address by the
  ingress policy's table (nc_agent.dataplane.ingress), which also marks
  their connections.  Replies are routed back into ``cvg1`` by a policy rule
  on that mark and a table of their own: the SP space's main table never
  holds a VPN route (seed 4), and only replies to the gateway's own flows
  ever reach the VPN space.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pyroute2.netlink.exceptions import NetlinkError

from nc_agent.dataplane.links import ROUTE_PROTO, LinkError
from nc_agent.dataplane.netns import create_in, netlink_reason, with_ipr

VPN_DEVICE = "cvg0"
SP_DEVICE = "cvg1"
SP_SIDE = "169.254.206.1"
VPN_SIDE = "169.254.206.2"
PREFIX_LENGTH = 30
MARK = 0xCE
"""Connection mark of the gateway's flows (set by the ingress policy's nftables table)."""
TABLE = 0xCE
"""SP-space routing table holding the one route back into the gateway link."""
RULE_PRIORITY = 1000


@dataclass(frozen=True)
class GatewayLink:
    """The gateway link should exist, with the VPN space's default route into it."""


class Gateway:
    """The gateway link of one CE: ``sp_netns`` (None: the agent's own) and ``vpn_netns``."""

    def __init__(self, vpn_netns: str, sp_netns: str | None = None) -> None:
        self.vpn_netns = vpn_netns
        self.sp_netns = sp_netns

    def present(self) -> bool:
        return bool(with_ipr(self.sp_netns, lambda sp: sp.link_lookup(ifname=SP_DEVICE)))

    def ensure(self) -> None:
        """Create the link if missing, then set addresses, routes and the rule (idempotent)."""
        try:
            with_ipr(self.sp_netns, lambda sp: self._sp_side(sp))
            with_ipr(self.vpn_netns, _vpn_side)
        except NetlinkError as exc:
            raise LinkError(f"the Internet gateway link: {netlink_reason(exc)}") from exc
        _loose_reverse_path(self.sp_netns)
        set_forwarding(self.sp_netns, True)

    def remove(self) -> None:
        """Delete the link (its addresses and routes go with it), the rule, and forwarding."""

        def sp_side(sp: Any) -> None:
            found = sp.link_lookup(ifname=SP_DEVICE)
            if found:
                sp.link("del", index=found[0])
            for rule in sp.get_rules(family=2):
                if rule.get_attr("FRA_TABLE") == TABLE and rule.get_attr("FRA_FWMARK") == MARK:
                    sp.rule("del", table=TABLE, fwmark=MARK, priority=RULE_PRIORITY)

        with_ipr(self.sp_netns, sp_side)
        set_forwarding(self.sp_netns, False)

    def _sp_side(self, sp: Any) -> None:
        if not sp.link_lookup(ifname=SP_DEVICE):
            sp.link("add", ifname=SP_DEVICE, kind="veth", peer={"ifname": VPN_DEVICE})
            peer = sp.link_lookup(ifname=VPN_DEVICE)[0]
            sp.link("set", index=peer, net_ns_fd=self.vpn_netns)
        index = sp.link_lookup(ifname=SP_DEVICE)[0]
        _address(sp, index, SP_SIDE)
        sp.link("set", index=index, state="up")
        sp.route("replace", dst="0.0.0.0/0", gateway=VPN_SIDE, oif=index, table=TABLE,
                 proto=ROUTE_PROTO)  # fmt: skip
        present = any(
            r.get_attr("FRA_TABLE") == TABLE and r.get_attr("FRA_FWMARK") == MARK
            for r in sp.get_rules(family=2)
        )
        if not present:
            sp.rule("add", table=TABLE, fwmark=MARK, priority=RULE_PRIORITY)


def _address(ipr: Any, index: int, address: str) -> None:
    present = {a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(index=index, family=2)}
    if address not in present:
        ipr.addr("add", index=index, address=address, prefixlen=PREFIX_LENGTH)


def _vpn_side(vpn: Any) -> None:
    found = vpn.link_lookup(ifname=VPN_DEVICE)
    if not found:
        raise LinkError(f"{VPN_DEVICE} is missing from the VPN space")
    index = found[0]
    _address(vpn, index, VPN_SIDE)
    vpn.link("set", index=index, state="up")
    vpn.route("replace", dst="0.0.0.0/0", gateway=SP_SIDE, oif=index, proto=ROUTE_PROTO)


def set_forwarding(netns: str | None, enabled: bool) -> None:
    """IPv4 forwarding in the SP space: on while the CE is a gateway, off otherwise.

    /proc/sys/net shows the namespace of the thread that opens the file, so a
    thread inside the SP space writes the SP space's value."""

    def write() -> None:
        with open("/proc/sys/net/ipv4/ip_forward", "w") as f:
            f.write("1\n" if enabled else "0\n")

    create_in(netns, write)


def _loose_reverse_path(netns: str | None) -> None:
    """The gateway link's reverse-path filter is loose: packets from the VPN carry VPN
    source addresses that the SP space cannot route back (by design), so a strict
    filter (``all`` = 1 wins over a lower per-device value) would drop them all."""

    def write() -> None:
        with open(f"/proc/sys/net/ipv4/conf/{SP_DEVICE}/rp_filter", "w") as f:
            f.write("2\n")

    create_in(netns, write)
