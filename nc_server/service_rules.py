"""What makes a VPN deployable beyond what its YANG can say: the service rules.

An operator's ``<commit>`` answering ``<ok/>`` must mean every CE of the VPN
can be configured.  YANG checks each value; these rules check how the sites
of one VPN fit together, so a configuration that would give one CE a route to
part of its own LAN, or two tunnels for one prefix, never reaches a CE:

- **One address family.** A VPN's prefixes are IPv4: its tunnels are IP-in-IP
  (IP protocol 4) or VTI devices and its routing protocol OSPFv2, which all
  carry IPv4 only.  An IPv6 prefix would commit and then never be routed.
- **No default route as a site prefix.** 0.0.0.0/0 (or ::/0) at a site would
  route every destination, the other sites' included, into that site's
  tunnel; Internet access is ``internet-gateway`` (seed 6.1).
- **Each address belongs to one site.** Two sites' prefixes may neither be
  equal nor contain one another: the CE of the site with the longer prefix
  would send part of its own LAN into a tunnel, and other CEs would have two
  tunnels for one prefix.
- **One site per identifier and per CE, over all VPNs.** A site id names one
  site, and a CE SP address one CE, whichever VPN they are in
  (:func:`check_sites_unique`).  These were YANG ``must`` statements counting
  the matching sites of every VPN, which libyang evaluates once per site: the
  whole datastore's validation grew with the square of the sites (1.7 s at
  1,000 sites, 7.5 s at 2,000).  One dict over all sites does it in one pass;
  the error is the one the ``must`` gave (operation-failed, must-violation,
  the same message), at the second site's leaf.

The per-VPN rules are pure functions over one ``vpn`` entry (RFC 7951 JSON, as
libyang prints it) and return every violation, each naming the VPN, the
site(s) and the prefix with list keys in its error-path, and the rule in its
message.  ``ServiceApplication.validate`` (nc_server.application) runs them, with
the compiler, for ``<commit>``, ``<validate>``, ``test-only`` and
``cevpn-server validate``.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from nc_core.errors import RpcError

SVC_NS = "urn:cevpn:yang:cevpn-service"
PREFIX = "cevpn-svc"
VPN_FAMILY = 4
"""The address family of every VPN: IPv4 (see the module docstring)."""
MAX_REPORTED = 20
"""Violations reported per commit at most: past that, the first ones say enough."""

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class Violation:
    """One rule broken by one site's prefix."""

    vpn: str
    site: str
    prefix: str
    message: str
    rule: str
    """error-app-tag: which rule (prefix-family, default-route, prefix-overlap)."""

    def rpc_error(self) -> RpcError:
        return RpcError(
            "invalid-value",
            self.message,
            path=prefix_path(self.vpn, self.site, self.prefix),
            path_ns={PREFIX: SVC_NS},
            app_tag=self.rule,
            info=[("bad-element", "local-prefix")],
        )


@dataclass(frozen=True)
class Duplicate:
    """A site reusing another site's identifier or CE SP address (in any VPN)."""

    vpn: str
    site: str
    leaf: str
    """``id`` or ``ce-address``."""
    message: str

    def rpc_error(self) -> RpcError:
        # What libyang answered for the YANG must these checks replace (RFC 7950 15.5).
        return RpcError(
            "operation-failed",
            self.message,
            path=f"{site_path(self.vpn, self.site)}/{PREFIX}:{self.leaf}",
            path_ns={PREFIX: SVC_NS},
            app_tag="must-violation",
        )


SITE_ID_TAKEN = "A site identifier must be unique across all VPNs."
CE_ADDRESS_TAKEN = "Another site already has this CE SP address: a CE belongs to one site."


def check_sites_unique(vpns: Iterable[Mapping[str, Any]]) -> list[Duplicate]:
    """Every site, in datastore order, whose id or CE SP address an earlier site (of any
    VPN) already has: one pass over all sites.  Within one VPN YANG already refuses a
    repeated id (the list key) or ce-address (``unique``); this adds the other VPNs."""
    ids: set[str] = set()
    addresses: set[Any] = set()
    found: list[Duplicate] = []
    for vpn in vpns:
        vpn_id = str(vpn.get("id", ""))
        for site in vpn.get("site", ()):
            site_id = str(site.get("id", ""))
            if site_id in ids:
                found.append(Duplicate(vpn_id, site_id, "id", SITE_ID_TAKEN))
            ids.add(site_id)
            address = site.get("ce-address")
            if address is None:
                continue
            key = _address(str(address))
            if key in addresses:
                found.append(Duplicate(vpn_id, site_id, "ce-address", CE_ADDRESS_TAKEN))
            addresses.add(key)
    return found


@functools.lru_cache(maxsize=65_536)
def _address(text: str) -> Any:
    """The address itself, not its spelling (the ``must`` compared libyang's canonical
    values; an IPv6 address can be written several ways), parsed once per address."""
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return text


def vpn_path(vpn: str) -> str:
    return f"/{PREFIX}:vpn-service/{PREFIX}:vpn[{PREFIX}:id={_literal(vpn)}]"


def site_path(vpn: str, site: str) -> str:
    return f"{vpn_path(vpn)}/{PREFIX}:site[{PREFIX}:id={_literal(site)}]"


def prefix_path(vpn: str, site: str, prefix: str) -> str:
    return f"{site_path(vpn, site)}/{PREFIX}:local-prefix[.={_literal(prefix)}]"


def _literal(value: str) -> str:
    return f"'{value}'" if "'" not in value else f'"{value}"'


def check_vpn(vpn: Mapping[str, Any]) -> list[Violation]:
    """Every service rule the VPN breaks, site by site in the VPN's order."""
    vpn_id = str(vpn.get("id", ""))
    found: list[Violation] = []
    owned: list[tuple[Network, str, str]] = []
    for site in vpn.get("site", []):
        site_id = str(site.get("id", ""))
        for text in site.get("local-prefix", ()):
            network = _network(str(text))
            if network.version != VPN_FAMILY:
                found.append(
                    Violation(
                        vpn_id,
                        site_id,
                        str(text),
                        f"Site {site_id!r} of VPN {vpn_id!r}: {text} is an IPv{network.version} "
                        f"prefix; a VPN's prefixes are IPv{VPN_FAMILY} (its tunnels, IP-in-IP "
                        "or VTI, and OSPFv2 carry IPv4 only).",
                        "prefix-family",
                    )
                )
                continue
            if network.prefixlen == 0:
                found.append(
                    Violation(
                        vpn_id,
                        site_id,
                        str(text),
                        f"Site {site_id!r} of VPN {vpn_id!r}: {text} is a default route, which "
                        "would send every other site's traffic into this site's tunnel; give "
                        "the site's own prefixes, and Internet access with internet-gateway.",
                        "default-route",
                    )
                )
                continue
            owned.append((network, site_id, str(text)))
    found.extend(_overlaps(vpn_id, owned))
    return found


@functools.lru_cache(maxsize=65_536)
def _network(text: str) -> Network:
    """A prefix parsed once: every commit checks every site of a changed VPN again, and
    ipaddress costs 20 us a prefix (20 ms of adding a site to a 1,000-site mesh)."""
    return ipaddress.ip_network(text, strict=False)


def _overlaps(vpn: str, owned: Sequence[tuple[Network, str, str]]) -> Iterable[Violation]:
    """Prefixes of different sites that are equal or contain one another.

    Sorted by first address (then shortest first), a prefix overlaps an
    earlier one exactly when it starts before the widest range seen so far
    ends: one pass, n log n for the sort, whatever the number of sites.
    """
    ordered = sorted(
        owned, key=lambda item: (int(item[0].network_address), item[0].prefixlen, item[1])
    )
    widest: tuple[Network, str, str] | None = None
    for network, site, text in ordered:
        if widest is not None and int(network.network_address) <= int(widest[0].broadcast_address):
            other_net, other_site, other_text = widest
            if other_site != site:
                if network == other_net:
                    how = f"is also a prefix of site {other_site!r}"
                else:
                    how = f"lies inside {other_text} of site {other_site!r}"
                yield Violation(
                    vpn,
                    site,
                    text,
                    f"Site {site!r} of VPN {vpn!r}: {text} {how}; each address of a VPN belongs "
                    "to one site (the other CEs would have two tunnels for it, and a site's CE "
                    "would route part of its own LAN into a tunnel).",
                    "prefix-overlap",
                )
            if int(network.broadcast_address) > int(widest[0].broadcast_address):
                widest = (network, site, text)
        else:
            widest = (network, site, text)
