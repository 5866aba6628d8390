"""The lab network, built inside a UML guest: a provider core and N customer sites.

    pe                      the SP's core router (no VPN knowledge, no 10.x route)
    ceN                     CE N's SP space: its SP address, XFRM state, the agent
    ceN-vpn                 CE N's VPN space: the site LAN and the tunnel devices
    siteN                   a host on site N's LAN
    inet                    a host "on the Internet", behind pe (seed 6.1)

Addresses (documentation prefixes for the SP space, as LAB.md suggests):
    pe <-> ceN              198.51.100.(4N-3)/30 on pe, 198.51.100.(4N-2)/30 on ceN
    ceN SP address          the ceN end of that link; default route via pe
    ceN-vpn <-> siteN       10.N.0.1/24 on ceN-vpn, 10.N.0.2/24 on siteN
    pe <-> inet             203.0.113.1/24 on pe, 203.0.113.10/24 on inet

Usage inside a guest:  python -m lab.topology build N
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass

INTERNET_HOST = "203.0.113.10"
INTERNET_GATEWAY = "203.0.113.1"


@dataclass(frozen=True)
class Site:
    n: int

    @property
    def ce(self) -> str:
        return f"ce{self.n}"

    @property
    def vpn(self) -> str:
        return f"ce{self.n}-vpn"

    @property
    def host(self) -> str:
        return f"site{self.n}"

    @property
    def pe_address(self) -> str:
        return f"198.51.100.{4 * self.n - 3}"

    @property
    def sp_address(self) -> str:
        return f"198.51.100.{4 * self.n - 2}"

    @property
    def lan_prefix(self) -> str:
        return f"10.{self.n}.0.0/24"

    @property
    def lan_gateway(self) -> str:
        return f"10.{self.n}.0.1"

    @property
    def host_address(self) -> str:
        return f"10.{self.n}.0.2"


def ip_batch(commands: list[str], netns: str | None = None) -> None:
    """Run ip commands in one process (every exec costs ~55 ms under UML)."""
    argv = ["ip", *(["-n", netns] if netns else []), "-force", "-batch", "-"]
    subprocess.run(argv, input="\n".join(commands) + "\n", text=True, check=True)


def build(count: int) -> list[Site]:
    sites = [Site(n) for n in range(1, count + 1)]
    spaces = ["pe", "inet", *(n for s in sites for n in (s.ce, s.vpn, s.host))]
    ip_batch([f"netns add {ns}" for ns in spaces])
    cmds = ["link add pe-inet netns pe type veth peer name eth0 netns inet"]
    for s in sites:
        cmds += [
            f"link add pe-{s.ce} netns pe type veth peer name sp0 netns {s.ce}",
            f"link add lan0 netns {s.vpn} type veth peer name eth0 netns {s.host}",
        ]
    ip_batch(cmds)
    per_ns: dict[str, list[str]] = {ns: ["link set lo up"] for ns in spaces}
    per_ns["pe"] += [f"addr add {INTERNET_GATEWAY}/24 dev pe-inet", "link set pe-inet up"]
    per_ns["inet"] += [
        f"addr add {INTERNET_HOST}/24 dev eth0",
        "link set eth0 up",
        f"route add default via {INTERNET_GATEWAY}",
    ]
    for s in sites:
        per_ns["pe"] += [f"addr add {s.pe_address}/30 dev pe-{s.ce}", f"link set pe-{s.ce} up"]
        per_ns[s.ce] += [
            f"addr add {s.sp_address}/30 dev sp0",
            "link set sp0 up",
            f"route add default via {s.pe_address}",
        ]
        per_ns[s.vpn] += [f"addr add {s.lan_gateway}/24 dev lan0", "link set lan0 up"]
        per_ns[s.host] += [
            f"addr add {s.host_address}/24 dev eth0",
            "link set eth0 up",
            f"route add default via {s.lan_gateway}",
        ]
    for ns, ns_cmds in per_ns.items():
        ip_batch(ns_cmds, ns)
    for ns in ["pe", *[s.vpn for s in sites]]:
        subprocess.run(
            ["ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv4.ip_forward=1"], check=True
        )
    return sites


def main() -> None:
    if sys.argv[1:2] == ["build"]:
        for site in build(int(sys.argv[2])):
            print(f"{site.ce}: SP {site.sp_address}, LAN {site.lan_prefix}")
    else:
        print(__doc__)


if __name__ == "__main__":
    main()
