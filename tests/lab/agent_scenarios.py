"""Run inside a lab guest: real cevpn agents on every CE, configured over NETCONF with ncclient.

    python -m tests.lab.agent_scenarios SCENARIO N      (after `lab.topology build N`)

Each agent runs in its CE's SP namespace and serves NETCONF on the CE's SP
address; the driver runs in the provider core's namespace (`pe`), the way a
VPN server reaches CEs.  Results go to $WORK/report.json.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from typing import Any

from lab.agents import (
    CE,
    NC,
    WORK,
    Agent,
    capture,
    config,
    configure_mesh,
    dummy_peers,
    hexkey,
    ikeless_sa,
    pair_keys,
    peer_xml,
    ping,
    preconfiguration,
    started,
    stop_capture,
)
from lab.topology import Site
from tests.waiting import wait_until


def mesh(count: int, encapsulation: str) -> dict[str, Any]:
    sites = [Site(n) for n in range(1, count + 1)]
    agents = {s.n: Agent(s, WORK / s.ce) for s in sites}
    report: dict[str, Any] = {}
    try:
        for agent in agents.values():
            agent.start()
        keys = {(a.n, b.n): pair_keys(a, b) for a in sites for b in sites if a.n < b.n}
        for me in sites:
            peers = "".join(
                peer_xml(me, other, keys[tuple(sorted((me.n, other.n)))], encapsulation)  # type: ignore[index]
                for other in sites
                if other.n != me.n
            )
            with agents[me.n].connect() as m:
                m.edit_config(target="running", config=config(preconfiguration(me) + peers))
        cap = capture("mesh")
        report["pings"] = {f"{a.n}->{b.n}": ping(a, b) for a in sites for b in sites if a != b}
        report["pe_ipv4"] = stop_capture(cap, "mesh")
        report["pe_routes"] = subprocess.run(
            ["ip", "-n", "pe", "route"], capture_output=True, text=True
        ).stdout
        report["vpn_routes"] = {
            s.vpn: subprocess.run(
                ["ip", "-n", s.vpn, "route"], capture_output=True, text=True
            ).stdout
            for s in sites
        }
        with agents[1].connect() as m:
            report["state"] = m.get(filter=("subtree", f'<ce xmlns="{CE}"><peer/></ce>')).data_xml
    except Exception:
        for agent in agents.values():
            code = agent.proc.poll() if agent.proc else None
            print(f"{agent.site.ce}: agent exit status {code}", file=sys.stderr)
        raise
    finally:
        for agent in agents.values():
            agent.stop()
    return report


def kernel_objects(site: Site) -> dict[str, list[str]]:
    """What the CE's kernel holds, as `ip` prints it (for before/after comparisons)."""

    def lines(*args: str) -> list[str]:
        out = subprocess.run(["ip", *args], capture_output=True, text=True).stdout
        return sorted(line.strip() for line in out.splitlines() if line.strip())

    states = subprocess.run(
        ["ip", "-n", site.ce, "xfrm", "state"], capture_output=True, text=True
    ).stdout
    return {
        "sas": sorted(
            line.split("spi ")[1].split()[0] + " reqid " + line.split("reqid ")[1].split()[0]
            for line in states.replace("\n\t", " ").splitlines()
            if "spi " in line and "reqid " in line
        ),
        "policies": lines("-n", site.ce, "xfrm", "policy"),
        "vpn_links": [
            entry.split(":")[1].strip().split("@")[0]
            for entry in lines("-n", site.vpn, "-o", "link")
        ],
        "vpn_routes": lines("-n", site.vpn, "route"),
    }


def remove_peer() -> dict[str, Any]:
    sites = [Site(n) for n in (1, 2, 3)]
    agents = started(sites)
    try:
        configure_mesh(agents, sites, "transport-ipip")
        # somebody else's SA and policy, which the agent must never touch
        subprocess.run(["ip", "-n", "ce1", "xfrm", "state", "add", "src", "192.0.2.7", "dst",
                        "192.0.2.8", "proto", "esp", "spi", "0x7777", "reqid", "7", "mode",
                        "transport", "enc", "cbc(aes)", "0x" + "00" * 16, "auth", "hmac(sha1)",
                        "0x" + "00" * 20], check=True)  # fmt: skip
        before = kernel_objects(sites[0])
        with agents[1].connect() as m:
            m.edit_config(
                target="running",
                config=f'<config xmlns="{NC}"><ce xmlns="{CE}" xmlns:nc="{NC}">'
                '<peer nc:operation="delete"><name>site-3</name></peer></ce></config>',
            )
        after = kernel_objects(sites[0])
        return {"before": before, "after": after, "ping_2": ping(sites[0], sites[1]),
                "ping_3": ping(sites[0], sites[2], 1)}  # fmt: skip
    finally:
        for agent in agents.values():
            agent.stop()


def peer_sa_xml(
    name: str, outbound: tuple[int, str] | None, inbound: tuple[int, str] | None
) -> str:
    parts = ""
    if outbound:
        parts += f"<outbound>{ikeless_sa(*outbound)}</outbound>"
    if inbound:
        parts += f"<inbound>{ikeless_sa(*inbound)}</inbound>"
    return config(f"<peer><name>{name}</name><ikeless>{parts}</ikeless></peer>")


def rekey() -> dict[str, Any]:
    a, b = Site(1), Site(2)
    agents = started([a, b])
    try:
        old = configure_mesh(agents, [a, b], "transport-ipip")[(1, 2)]
        new = pair_keys(a, b, generation=2)
        pinger = subprocess.Popen(
            ["ip", "netns", "exec", a.host, "ping", "-i", "0.05", "-c", "300", "-W", "1",
             b.host_address],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        # The rekey happens while the ping runs: the old A->B SA has carried traffic.
        report_traffic = wait_packets(b, old.spi_ab, 20)
        # the VPN server's order: each receiver learns its new inbound SA first
        with agents[2].connect() as m:  # B: new inbound for A->B, outbound unchanged
            m.edit_config(
                target="running", config=peer_sa_xml("site-1", None, (new.spi_ab, new.key_ab))
            )
        with agents[1].connect() as m:  # A: new inbound for B->A, new outbound A->B
            m.edit_config(
                target="running",
                config=peer_sa_xml("site-2", (new.spi_ab, new.key_ab), (new.spi_ba, new.key_ba)),
            )
        with agents[2].connect() as m:  # B: new outbound B->A
            m.edit_config(
                target="running", config=peer_sa_xml("site-1", (new.spi_ba, new.key_ba), None)
            )
        out, _ = pinger.communicate(timeout=120)
        summary = [line for line in out.splitlines() if "packet loss" in line]
        return {
            "ping": summary,
            "traffic_before_rekey": report_traffic,
            "old_spis": [old.spi_ab, old.spi_ba],
            "new_spis": [new.spi_ab, new.spi_ba],
            "ce1": kernel_objects(a),
            "ce2": kernel_objects(b),
        }
    finally:
        for agent in agents.values():
            agent.stop()


def esp_packets(site: Site, spi: int) -> int:
    """Packets the SA with this SPI on the site's CE has carried (ip -s xfrm state)."""
    out = subprocess.run(
        ["ip", "-n", site.ce, "-s", "xfrm", "state", "list", "spi", hex(spi)],
        capture_output=True, text=True,
    ).stdout  # fmt: skip
    found = re.search(r"(\d+)\(packets\)", out)
    return int(found.group(1)) if found else 0


def wait_packets(site: Site, spi: int, packets: int, timeout: float = 30) -> float | None:
    """Seconds until the SA has carried ``packets`` packets (None: it never did)."""
    return wait_until(lambda: esp_packets(site, spi) >= packets, timeout, 0.05)


def ip(*args: str) -> str:
    return subprocess.run(["ip", *args], check=True, capture_output=True, text=True).stdout


def ping_address(src: Site, address: str, count: int = 3) -> bool:
    argv = ["ip", "netns", "exec", src.host, "ping", "-c", str(count), "-W", "2", address]
    return subprocess.run(argv, capture_output=True).returncode == 0


def owned_counts(site: Site) -> dict[str, int]:
    states = subprocess.run(
        ["ip", "-n", site.ce, "xfrm", "state"], capture_output=True, text=True
    ).stdout
    policies = subprocess.run(
        ["ip", "-n", site.ce, "xfrm", "policy"], capture_output=True, text=True
    ).stdout
    links = subprocess.run(
        ["ip", "-n", site.vpn, "-o", "link"], capture_output=True, text=True
    ).stdout
    spis = [line.split("spi ")[1].split()[0] for line in states.splitlines() if "spi 0x" in line]
    return {
        "sas": len(spis),
        "distinct_sas": len(set(spis)),
        "policies": policies.count("\tdir ") + policies.count(" dir "),
        "devices": sum(1 for line in links.splitlines() if ": cvi" in line or ": cvt" in line),
    }


def kill_mid_apply() -> dict[str, Any]:
    import threading

    from nc_core import faults

    a, b = Site(1), Site(2)
    armed, reached = WORK / "fault-armed", WORK / "faults-reached"
    agents = {s.n: Agent(s, WORK / s.ce) for s in (a, b)}
    agents[1].env = {
        faults.ENV: "agent-apply-sas-installed=stop",
        faults.ARMED_ENV: str(armed),
        faults.REPORT_ENV: str(reached),
    }
    for agent in agents.values():
        agent.start()
    report: dict[str, Any] = {}
    try:
        configure_mesh(agents, [a, b], "transport-ipip")
        edit_error: list[str] = []

        def big_edit() -> None:
            # No `with`: its close-session, on a session whose agent was killed, can wait
            # ncclient's whole 60 s timeout for a reply that cannot come, and the join
            # below would give up first (seen once in CI: killed_during_edit False).
            try:
                m = agents[1].connect()
                m.edit_config(target="running", config=config(dummy_peers(150)))
            except Exception as exc:  # the agent is killed under us: expected
                edit_error.append(type(exc).__name__)

        # Stopped at a named step of the apply (SAs and policies installed, devices not),
        # then killed there: no guess at how long the apply takes.
        armed.touch()
        worker = threading.Thread(target=big_edit)
        worker.start()
        deadline = time.monotonic() + 120
        while "agent-apply-sas-installed" not in (reached.read_text() if reached.exists() else ""):
            assert time.monotonic() < deadline, "the agent never reached the fault point"
            assert worker.is_alive(), f"the edit ended before the fault point: {edit_error}"
            time.sleep(0.05)
        agents[1].kill9()
        armed.unlink()
        worker.join(90)  # ncclient's RPC timeout (60 s) at the latest
        report["killed_during_edit"] = bool(edit_error)
        report["after_kill"] = owned_counts(a)
        agents[1].start()
        with agents[1].connect() as m:
            running = m.get_config("running").data_xml
        report["peers_in_running"] = running.count("<peer>")
        report["after_restart"] = owned_counts(a)
        report["ping"] = ping(a, b)
    finally:
        for agent in agents.values():
            agent.stop()
    return report


def refused_and_invalid() -> dict[str, Any]:
    a, b = Site(1), Site(2)
    agents = started([a, b])
    report: dict[str, Any] = {}
    try:
        keys = configure_mesh(agents, [a, b], "transport-ipip")[(1, 2)]
        # an SA that is not ours holds the SPI the next change wants
        taken = 0x3000_0001
        subprocess.run(["ip", "-n", a.ce, "xfrm", "state", "add", "src", b.sp_address, "dst",
                        a.sp_address, "proto", "esp", "spi", hex(taken), "reqid", "9", "mode",
                        "transport", "enc", "cbc(aes)", "0x" + "00" * 16, "auth", "hmac(sha1)",
                        "0x" + "00" * 20], check=True)  # fmt: skip
        before = kernel_objects(a)
        with agents[1].connect() as m:
            running_before = m.get_config("running").data_xml
            try:
                m.edit_config(
                    target="running",
                    config=peer_sa_xml("site-2", (keys.spi_ab, keys.key_ab), (taken, hexkey(36))),
                )
                report["refused"] = None
            except Exception as exc:
                report["refused"] = {"tag": getattr(exc, "tag", None), "message": str(exc),
                                     "path": getattr(exc, "path", None)}  # fmt: skip
            try:
                m.edit_config(
                    target="running",
                    config=peer_sa_xml("site-2", None, (keys.spi_ba, hexkey(20))),  # wrong length
                )
                report["invalid"] = None
            except Exception as exc:
                report["invalid"] = {"tag": getattr(exc, "tag", None), "message": str(exc)}
            report["running_unchanged"] = m.get_config("running").data_xml == running_before
        report["kernel_unchanged"] = kernel_objects(a) == before
        report["ping"] = ping(a, b)
    finally:
        for agent in agents.values():
            agent.stop()
    return report


def missing_sa() -> dict[str, Any]:
    a, b = Site(1), Site(2)
    agents = started([a, b])
    report: dict[str, Any] = {}
    try:
        keys = configure_mesh(agents, [a, b], "transport-ipip")[(1, 2)]
        # ce1 loses its outbound SA, then its outbound policy for the peer
        ip("-n", a.ce, "xfrm", "state", "delete", "src", a.sp_address, "dst", b.sp_address,
           "proto", "esp", "spi", hex(keys.spi_ab))  # fmt: skip
        cap = capture("missing-sa")
        report["ping_without_sa"] = ping(a, b, 2)
        ip("-n", a.ce, "xfrm", "policy", "delete", "src", f"{a.sp_address}/32",
           "dst", f"{b.sp_address}/32", "proto", "4", "dir", "out")  # fmt: skip
        report["ping_without_policy"] = ping(a, b, 2)
        report["pe_ipv4"] = stop_capture(cap, "missing-sa")
        with agents[1].connect() as m:
            report["state"] = m.get(filter=("subtree", f'<ce xmlns="{CE}"><peer/></ce>')).data_xml
    finally:
        for agent in agents.values():
            agent.stop()
    return report


def overlap() -> dict[str, Any]:
    sites = [Site(n) for n in (1, 2, 3, 4)]
    # VPN B (sites 3 and 4) uses the same LAN prefixes as VPN A (sites 1 and 2)
    for site, lan in ((sites[2], 1), (sites[3], 2)):
        subprocess.run(["ip", "-n", site.vpn, "addr", "flush", "dev", "lan0"], check=True)
        subprocess.run(
            ["ip", "-n", site.vpn, "addr", "add", f"10.{lan}.0.1/24", "dev", "lan0"], check=True
        )
        subprocess.run(["ip", "-n", site.host, "addr", "flush", "dev", "eth0"], check=True)
        subprocess.run(
            ["ip", "-n", site.host, "addr", "add", f"10.{lan}.0.2/24", "dev", "eth0"], check=True
        )
        subprocess.run(
            ["ip", "-n", site.host, "route", "add", "default", "via", f"10.{lan}.0.1"], check=True
        )
    agents = started(sites)
    report: dict[str, Any] = {}
    try:
        for x, y in ((sites[0], sites[1]), (sites[2], sites[3])):
            keys = pair_keys(x, y)
            for me, other, lan in ((x, y, 2), (y, x, 1)):
                peer = peer_xml(me, other, keys, "transport-ipip").replace(
                    other.lan_prefix, f"10.{lan}.0.0/24"
                )
                with agents[me.n].connect() as m:
                    m.edit_config(target="running", config=config(preconfiguration(me) + peer))

        def inbound_packets(site: Site) -> int:
            out = ip("-n", site.ce, "-s", "xfrm", "state", "list", "dst", site.sp_address)
            total = 0
            for match in re.finditer(r"(\d+)\(bytes\), (\d+)\(packets\)", out):
                total += int(match.group(2))
            return total

        before = {s.n: inbound_packets(s) for s in sites}
        report["ping_vpn_a"] = ping_address(sites[0], "10.2.0.2")
        mid = {s.n: inbound_packets(s) for s in sites}
        report["ping_vpn_b"] = ping_address(sites[2], "10.2.0.2")
        after = {s.n: inbound_packets(s) for s in sites}
        report["a_reached"] = {n: mid[n] - before[n] for n in before}
        report["b_reached"] = {n: after[n] - mid[n] for n in before}
    finally:
        for agent in agents.values():
            agent.stop()
    return report


def main() -> None:
    scenario, count = sys.argv[1], int(sys.argv[2])
    if scenario == "mesh-transport":
        report = mesh(count, "transport-ipip")
    elif scenario == "mesh-tunnel":
        report = mesh(count, "tunnel-mode")
    elif scenario == "remove-peer":
        report = remove_peer()
    elif scenario == "rekey":
        report = rekey()
    elif scenario == "kill-mid-apply":
        report = kill_mid_apply()
    elif scenario == "refused":
        report = refused_and_invalid()
    elif scenario == "missing-sa":
        report = missing_sa()
    elif scenario == "overlap":
        report = overlap()
    else:
        raise SystemExit(f"unknown scenario {scenario}")
    (WORK / "report.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
