"""Run inside a lab guest: nc_agent.dataplane.links builds both kinds of tunnel device.

    python -m tests.lab.links_scenario        (after `python -m lab.topology build 2`)

Writes a JSON report to $WORK/links.json.
"""

from __future__ import annotations

import json
import os
import subprocess

from lab.topology import Site
from nc_agent.dataplane.links import Links, Tunnel, device_name, tunnel_mtu

KEY = "0x" + "33" * 36


def xfrm(ns: str, *args: str) -> None:
    subprocess.run(["ip", "-n", ns, "xfrm", *args], check=True)


def ping(src: str, dst: str) -> bool:
    return subprocess.run(["ip", "netns", "exec", src, "ping", "-c", "2", "-W", "2", dst],
                          capture_output=True).returncode == 0  # fmt: skip


def main() -> None:
    a, b = Site(1), Site(2)
    report: dict[str, object] = {}
    mtu = tunnel_mtu(1500, "rfc4106(gcm(aes))", 128)
    # transport mode protecting IP-in-IP: devices from Links, XFRM by hand
    for me, peer, reqid in ((a, b, 0x0CE00002), (b, a, 0x0CE00001)):
        links = Links(me.vpn, me.ce)
        links.add(Tunnel(device_name("transport-ipip", reqid), "transport-ipip", me.sp_address,
                         peer.sp_address, mtu, routes=(peer.lan_prefix,)))  # fmt: skip
        for src, dst in ((me.sp_address, peer.sp_address), (peer.sp_address, me.sp_address)):
            spi = 0x101 if src == a.sp_address else 0x102  # one SPI per direction, on both CEs
            xfrm(me.ce, "state", "add", "src", src, "dst", dst, "proto", "esp", "spi", hex(spi),
                 "reqid", str(reqid), "mode", "transport",
                 "aead", "rfc4106(gcm(aes))", KEY, "128", "replay-window", "64")  # fmt: skip
        tmpl = ("tmpl", "proto", "esp", "mode", "transport", "reqid", str(reqid))
        xfrm(me.ce, "policy", "add", "src", me.sp_address, "dst", peer.sp_address,
             "proto", "4", "dir", "out", *tmpl)  # fmt: skip
        xfrm(me.ce, "policy", "add", "src", peer.sp_address, "dst", me.sp_address,
             "proto", "4", "dir", "in", *tmpl)  # fmt: skip
    report["ipip_ping"] = ping(a.host, b.host_address)
    existing = Links(a.vpn, a.ce).existing()
    report["existing"] = {
        n: [e.kind, e.local, e.remote, e.mtu, e.up, list(e.routes)] for n, e in existing.items()
    }
    # the route moves with a reconfiguration, and removal takes the device and its routes
    name = device_name("transport-ipip", 0x0CE00002)
    wider = ("10.2.0.0/24", "10.22.0.0/24")
    Links(a.vpn, a.ce).configure(
        Tunnel(name, "transport-ipip", a.sp_address, b.sp_address, mtu, routes=wider)
    )
    report["routes_after_reconfigure"] = list(
        Links(a.vpn, a.ce).existing()[device_name("transport-ipip", 0x0CE00002)].routes
    )
    Links(a.vpn, a.ce).remove(device_name("transport-ipip", 0x0CE00002))
    report["after_remove"] = sorted(Links(a.vpn, a.ce).existing())
    report["vpn_routes_after_remove"] = subprocess.run(
        ["ip", "-n", a.vpn, "route"], capture_output=True, text=True
    ).stdout
    report["sp_links"] = subprocess.run(
        ["ip", "-n", a.ce, "-o", "link"], capture_output=True, text=True
    ).stdout
    with open(os.path.join(os.environ["WORK"], "links.json"), "w") as out:
        json.dump(report, out, indent=2)


if __name__ == "__main__":
    main()
