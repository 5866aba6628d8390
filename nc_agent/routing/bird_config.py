"""From a cevpn-ce routing configuration to a BIRD 2 configuration (seed 4, 4.3, 6.1).

Pure logic, no daemon: the agent's datastore (RFC 7951 JSON with defaults)
becomes a `RoutingPlan`, and a plan becomes the text of bird.conf.  Keeping
the mapping apart from the process lets it be tested (and parse-checked with
``bird -p``) without a VPN space, and read in one place.

Why the configuration looks like this (proven in the lab, ../shared/LAB.md)
---------------------------------------------------------------------------
- BIRD runs in the VPN space only, so nothing it learns or announces can reach
  the SP space (seed 4): the provider core never sees a VPN route.
- OSPFv2 runs on explicitly named tunnel devices, never on a pattern such as
  ``"cvi*"``: a tunnel whose peer has no dynamic routing must not form an
  adjacency (nor announce this site) just because its name matches.  A named
  device that does not exist yet is accepted by BIRD and picked up when it
  appears, so the tunnel and the routing daemon can be set up in any order.
- Tunnels are point-to-point and unnumbered: every tunnel device carries the
  router ID as a /32, hence ``type ptp``.
- The site's own prefixes are announced from a static protocol with
  ``unreachable`` routes that are never exported to the kernel: they only
  give OSPF something to announce; the real routes (the connected LAN, the
  static routes towards the site's routers) are installed by other code.
  ``protocol direct`` is not used: it would announce the tunnel /32s and any
  other address of the VPN space.
- The kernel gets OSPF routes only, and never one for the router's own router
  ID (BIRD otherwise installs a multipath route for it over the tunnels, which
  would shadow the local address) nor one inside an announced prefix (those
  are the site's own, connected or statically routed).
- BIRD's kernel routes have its default metric (32), so a route the agent
  installed itself (metric 0) wins over a learned one for the same prefix.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PROTOCOL_NAME = "cevpn_ospf"
"""BIRD's name for the OSPF instance (``vpn`` is a BIRD keyword: never name anything so)."""
STATIC_NAME = "local_prefixes"
BACKBONE = "0.0.0.0"  # noqa: S104 -- an OSPF area ID, nothing binds to it
OSPF_SOURCES = "RTS_OSPF, RTS_OSPF_IA, RTS_OSPF_EXT1, RTS_OSPF_EXT2"
LOG_CLASSES = "info, remote, warning, error, auth, fatal"
"""Everything but the per-packet 'trace' and 'debug' classes, which fill the log in hours."""

_DEVICE = re.compile(r"[A-Za-z0-9_.-]{1,15}")
"""A Linux interface name without BIRD pattern characters (``*``, ``?``) or quotes."""


class RoutingConfigProblem(ValueError):
    """The routing configuration cannot be realised; the message says what to change."""


@dataclass(frozen=True)
class OspfInterface:
    """One tunnel device OSPF runs on, with its cost."""

    device: str
    cost: int

    def __post_init__(self) -> None:
        if not _DEVICE.fullmatch(self.device):
            raise RoutingConfigProblem(f"{self.device!r} is not a usable interface name")
        if not 1 <= self.cost <= 65535:
            raise RoutingConfigProblem(f"OSPF cost {self.cost} of {self.device} is not in 1..65535")


@dataclass(frozen=True)
class RoutingPlan:
    """What BIRD must do on one CE; two equal plans give the same bird.conf.

    ``announce``: IPv4 prefixes announced into OSPF (the local prefixes, and the
    static-route prefixes when redistribute-local is true).  ``originate_default``:
    announce 0.0.0.0/0 too -- an integrated Internet gateway only (seed 6.1); the
    gateway's own default route is installed by other code, BIRD only announces it.
    """

    router_id: str
    area: str = BACKBONE
    hello: int = 10
    dead: int = 40
    default_cost: int = 10
    interfaces: tuple[OspfInterface, ...] = ()
    announce: tuple[str, ...] = ()
    originate_default: bool = False

    def __post_init__(self) -> None:
        """Every value lands in a configuration file: refuse what BIRD would misread."""
        for what, value in (("router ID", self.router_id), ("OSPF area", self.area)):
            try:
                ipaddress.IPv4Address(value)
            except ValueError:
                raise RoutingConfigProblem(
                    f"{what} {value!r} is not a dotted-quad IPv4 address"
                ) from None
        if not 1 <= self.hello <= 65535 or not 1 <= self.dead <= 65535:
            raise RoutingConfigProblem("OSPF hello and dead intervals must be in 1..65535 s")
        if self.dead <= self.hello:
            raise RoutingConfigProblem(
                f"the OSPF dead interval ({self.dead} s) must be longer than the hello "
                f"interval ({self.hello} s)"
            )
        if not 1 <= self.default_cost <= 65535:
            raise RoutingConfigProblem(f"OSPF default cost {self.default_cost} is not in 1..65535")
        for prefix in self.announce:
            try:
                ipaddress.IPv4Network(prefix)
            except ValueError:
                raise RoutingConfigProblem(
                    f"{prefix!r} is not an IPv4 prefix (host bits must be zero)"
                ) from None
        devices = [i.device for i in self.interfaces]
        if len(set(devices)) != len(devices):
            raise RoutingConfigProblem(f"a tunnel device appears twice in {devices}")


def _name(value: str) -> str:
    """'cevpn-types:ospf' -> 'ospf' (enumerations and identities alike)."""
    return value.rpartition(":")[2]


def router_id(ce: Mapping[str, Any]) -> str:
    """The VPN-space router ID: routing/router-id, else the first IPv4 local prefix + 1.

    The same address is the local address of the unnumbered tunnel devices, so
    whoever configures those devices should take it from here."""
    routing = ce.get("routing", {})
    configured = routing.get("router-id")
    if configured:
        return str(configured)
    for prefix in routing.get("local-prefix", ()):
        network = ipaddress.ip_network(prefix, strict=False)
        if isinstance(network, ipaddress.IPv4Network):
            return str(network.network_address + 1)
    raise RoutingConfigProblem(
        "Dynamic routing needs a router ID: set routing/router-id, or configure an IPv4 "
        "routing/local-prefix (its first address is used).  The router ID identifies this "
        "CE in OSPF and is the address of its unnumbered tunnel devices."
    )


def _ipv4_prefixes(prefixes: Iterable[str]) -> list[str]:
    """The IPv4 prefixes, normalised and without repeats, in configuration order."""
    found: list[str] = []
    for prefix in prefixes:
        network = ipaddress.ip_network(prefix, strict=False)
        if isinstance(network, ipaddress.IPv4Network) and str(network) not in found:
            found.append(str(network))
    return found


def plan_from_config(ce: Mapping[str, Any], devices: Mapping[str, str]) -> RoutingPlan | None:
    """The routing plan of a cevpn-ce ``ce`` container; None when routing is static.

    ``devices`` maps a peer name to its tunnel device in the VPN space.  OSPF
    runs on the devices of enabled peers whose tunnel has dynamic-routing true
    and IP-in-IP encapsulation (the YANG model refuses dynamic routing on
    tunnel mode: tunnel-mode policies would not carry OSPF's multicast); a peer
    the caller has no device for yet is left out until it has one.

    IPv6 local prefixes and static routes are not announced: OSPFv2 carries
    IPv4 only (they are still routed statically by the rest of the agent).
    """
    routing = ce["routing"]
    dynamic = routing["dynamic"]
    protocol = _name(str(dynamic["protocol"]))
    if protocol == "none":
        return None
    if protocol != "ospf":
        raise RoutingConfigProblem(
            f"Routing protocol {protocol!r} is not supported on this CE: use 'ospf' or 'none'."
        )
    ospf = dynamic["ospf"]
    default_cost = int(ospf["default-cost"])
    interfaces = []
    for peer in ce.get("peer", ()):
        tunnel = peer["tunnel"]
        if not peer["enabled"] or not tunnel["dynamic-routing"]:
            continue
        if _name(str(tunnel["encapsulation"])) != "transport-ipip":
            continue
        device = devices.get(peer["name"])
        if device is not None:
            interfaces.append(OspfInterface(device, int(tunnel.get("ospf-cost", default_cost))))
    announce: list[str] = []
    if ospf["redistribute-local"]:
        statics = (route["prefix"] for route in routing.get("static-route", ()))
        announce = _ipv4_prefixes([*routing.get("local-prefix", ()), *statics])
    access = ce["internet-access"]
    gateway = _name(str(access["role"])) == "integrated-gateway"
    originate = gateway and bool(access["integrated-gateway"]["originate-default"])
    try:
        return RoutingPlan(
            router_id=router_id(ce),
            area=str(ospf["area"]),
            hello=int(ospf["hello-interval"]),
            dead=int(ospf["dead-interval"]),
            default_cost=default_cost,
            interfaces=tuple(sorted(interfaces, key=lambda i: i.device)),
            announce=tuple(announce),
            originate_default=originate,
        )
    except RoutingConfigProblem as exc:
        raise RoutingConfigProblem(f"Routing configuration: {exc}") from None


def _quoted(path: Path) -> str:
    text = str(path)
    if '"' in text or "\n" in text:
        raise RoutingConfigProblem(f"BIRD cannot name the file {text!r} (quote or newline)")
    return f'"{text}"'


def kept_from_kernel(plan: RoutingPlan) -> list[str]:
    """Prefix-set entries never exported to the kernel: the own router ID and the
    announced prefixes with everything inside them (a 0.0.0.0/0 only exactly)."""
    entries = [f"{plan.router_id}/32"]
    for prefix in plan.announce:
        entries.append(prefix if prefix.endswith("/0") else f"{prefix}+")
    if plan.originate_default and "0.0.0.0/0" not in plan.announce:
        entries.append("0.0.0.0/0")
    return entries


def reaches_kernel(plan: RoutingPlan, prefix: str) -> bool:
    """Whether the kernel export filter of ``plan`` lets an OSPF route for ``prefix`` through
    (the same rule as `kept_from_kernel`, for reading BIRD's routes back)."""
    network = ipaddress.ip_network(prefix, strict=False)
    if not isinstance(network, ipaddress.IPv4Network):
        return False
    if network == ipaddress.IPv4Network(f"{plan.router_id}/32"):
        return False
    if plan.originate_default and network.prefixlen == 0:
        return False
    for announced in map(ipaddress.IPv4Network, plan.announce):
        if network == announced or (announced.prefixlen > 0 and network.subnet_of(announced)):
            return False
    return True


def render(plan: RoutingPlan, log_file: Path) -> str:
    """bird.conf for ``plan``; the same plan always gives the same text."""
    routes = [*plan.announce]
    if plan.originate_default and "0.0.0.0/0" not in routes:
        routes.append("0.0.0.0/0")
    statics = "".join(f"  route {prefix} unreachable;\n" for prefix in routes)
    interfaces = "".join(
        f'    interface "{i.device}" {{ type ptp; hello {plan.hello}; dead {plan.dead}; '
        f"cost {i.cost}; }};\n"
        for i in plan.interfaces
    )
    return f"""# Written by the cevpn agent (nc_agent/routing); rewritten on every change.
log {_quoted(log_file)} {{ {LOG_CLASSES} }};
router id {plan.router_id};

protocol device {{
  scan time 10;
}}

# OSPF routes only, never the own router ID nor the site's own prefixes.
protocol kernel {{
  ipv4 {{
    import none;
    export filter {{
      if net ~ [ {", ".join(kept_from_kernel(plan))} ] then reject;
      if source ~ [ {OSPF_SOURCES} ] then accept;
      reject;
    }};
  }};
}}

# Announced only: never exported to the kernel.
protocol static {STATIC_NAME} {{
  ipv4;
{statics}}}

protocol ospf v2 {PROTOCOL_NAME} {{
  tick 1;
  ipv4 {{
    import all;
    export where proto = "{STATIC_NAME}";
  }};
  area {plan.area} {{
{interfaces}  }};
}}
"""
