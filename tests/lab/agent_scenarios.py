"""Run inside a lab guest: real cevpn agents on every CE, configured over NETCONF with ncclient.

    python -m tests.lab.agent_scenarios SCENARIO N      (after `tests.lab.topology build N`)

Each agent runs in its CE's SP namespace and serves NETCONF on the CE's SP
address; the driver runs in the provider core's namespace (`pe`), the way a
VPN server reaches CEs.  Results go to $WORK/report.json.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ncclient import manager

from tests.lab.topology import Site

ROOT = Path(__file__).resolve().parents[2]
AGENT = str(ROOT / ".venv" / "bin" / "cevpn-agent")
WORK = Path(os.environ.get("WORK", "/tmp"))
NC = "urn:ietf:params:xml:ns:netconf:base:1.0"
CE = "urn:cevpn:yang:cevpn-ce"
T = "urn:cevpn:yang:cevpn-types"
PASSWORD = "lab-admin-password"
SERVER_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOUExW9Ajh9Sbqm7lpNpatUIlOzK45/zUIRlybyD+Vyp s"


@dataclass
class Agent:
    site: Site
    state: Path
    proc: subprocess.Popen[bytes] | None = None
    env: dict[str, str] = field(default_factory=dict)
    """Added to the agent's environment (fault injection: nc_core.faults)."""

    def start(self) -> None:
        self.state.mkdir(parents=True, exist_ok=True)
        if not (self.state / "running.xml").exists():
            pw = self.state.parent / f"{self.site.ce}.pw"
            pw.write_text(PASSWORD + "\n")
            subprocess.run(
                [AGENT, "adduser", "--state-dir", str(self.state), "admin",
                 "--password-file", str(pw), "--group", "admin"],
                check=True, capture_output=True,
            )  # fmt: skip
        log = (self.state.parent / f"{self.site.ce}.log").open("ab")
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", self.site.ce, AGENT, "--state-dir", str(self.state),
             "--listen", f"{self.site.sp_address}:830", "--vpn-netns", self.site.vpn],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, **self.env},
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"agent {self.site.ce} exited with status {self.proc.returncode}"
                )
            with suppress(OSError), socket.create_connection((self.site.sp_address, 830), 0.5):
                return
            time.sleep(0.1)
        raise RuntimeError(f"agent {self.site.ce} did not listen")

    def kill9(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(20)

    def connect(self) -> Any:
        key = (self.state / "ssh_host_ed25519_key.pub").read_text().split()[1]
        return manager.connect(
            host=self.site.sp_address, port=830, username="admin", password=PASSWORD,
            hostkey_verify=True, hostkey_b64=key, allow_agent=False, look_for_keys=False,
            timeout=60,
        )  # fmt: skip


def hexkey(n: int) -> str:
    return ":".join(f"{b:02x}" for b in secrets.token_bytes(n))


def preconfiguration(site: Site) -> str:
    return (
        f"<pre-configuration><site-id>site-{site.n}</site-id><vpn-id>lab</vpn-id>"
        f"<sp-address>{site.sp_address}</sp-address><vpn-server><endpoint>"
        f"<address>198.51.100.1</address><host-key>{SERVER_KEY}</host-key></endpoint>"
        "<username>ce</username></vpn-server><management><server-username>vpn-server"
        f"</server-username><server-authorized-key>{SERVER_KEY}</server-authorized-key>"
        "</management></pre-configuration>"
    )


@dataclass(frozen=True)
class PairKeys:
    spi_ab: int
    spi_ba: int
    key_ab: str
    key_ba: str


def pair_keys(a: Site, b: Site, generation: int = 1) -> PairKeys:
    base = 0x1000_0000 + generation * 0x10000
    return PairKeys(base + a.n * 256 + b.n, base + b.n * 256 + a.n, hexkey(36), hexkey(36))


def ikeless_sa(spi: int, key: str) -> str:
    return (
        f"<spi>{spi}</spi><encryption-algorithm>t:encr-aes-gcm-16-256</encryption-algorithm>"
        f"<encryption-key>{key}</encryption-key>"
    )


def peer_xml(me: Site, other: Site, keys: PairKeys, encapsulation: str) -> str:
    outbound = (keys.spi_ab, keys.key_ab) if me.n < other.n else (keys.spi_ba, keys.key_ba)
    inbound = (keys.spi_ba, keys.key_ba) if me.n < other.n else (keys.spi_ab, keys.key_ab)
    return (
        f"<peer><name>site-{other.n}</name><sp-address>{other.sp_address}</sp-address>"
        f"<tunnel><encapsulation>{encapsulation}</encapsulation>"
        f"<remote-prefix>{other.lan_prefix}</remote-prefix></tunnel>"
        f"<ikeless><outbound>{ikeless_sa(*outbound)}</outbound>"
        f"<inbound>{ikeless_sa(*inbound)}</inbound></ikeless></peer>"
    )


def config(body: str) -> str:
    return f'<config xmlns="{NC}"><ce xmlns="{CE}" xmlns:t="{T}">{body}</ce></config>'


def ping(src: Site, dst: Site, count: int = 2) -> bool:
    return (
        subprocess.run(
            [
                "ip",
                "netns",
                "exec",
                src.host,
                "ping",
                "-c",
                str(count),
                "-W",
                "2",
                dst.host_address,
            ],
            capture_output=True,
        ).returncode
        == 0
    )


def capture(name: str, netns: str = "pe", iface: str = "any") -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        ["ip", "netns", "exec", netns, "tcpdump", "-nni", iface, "-w", str(WORK / f"{name}.pcap"),
         "--immediate-mode", "ip"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    time.sleep(1.5)
    return proc


def stop_capture(proc: subprocess.Popen[bytes], name: str) -> list[str]:
    time.sleep(0.5)
    proc.terminate()
    proc.wait(10)
    out = subprocess.run(
        ["tcpdump", "-nn", "-r", str(WORK / f"{name}.pcap")], capture_output=True, text=True
    ).stdout
    return [line for line in out.splitlines() if line.strip()]


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


def configure_mesh(
    agents: dict[int, Agent], sites: list[Site], encapsulation: str, generation: int = 1
) -> dict[tuple[int, int], PairKeys]:
    keys = {(a.n, b.n): pair_keys(a, b, generation) for a in sites for b in sites if a.n < b.n}
    for me in sites:
        peers = "".join(
            peer_xml(me, other, keys[(min(me.n, other.n), max(me.n, other.n))], encapsulation)
            for other in sites
            if other.n != me.n
        )
        with agents[me.n].connect() as m:
            m.edit_config(target="running", config=config(preconfiguration(me) + peers))
    return keys


def started(sites: list[Site]) -> dict[int, Agent]:
    agents = {s.n: Agent(s, WORK / s.ce) for s in sites}
    for agent in agents.values():
        agent.start()
    return agents


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
        time.sleep(3)
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
            "old_spis": [old.spi_ab, old.spi_ba],
            "new_spis": [new.spi_ab, new.spi_ba],
            "ce1": kernel_objects(a),
            "ce2": kernel_objects(b),
        }
    finally:
        for agent in agents.values():
            agent.stop()


def ip(*args: str) -> str:
    return subprocess.run(["ip", *args], check=True, capture_output=True, text=True).stdout


def ping_address(src: Site, address: str, count: int = 3) -> bool:
    argv = ["ip", "netns", "exec", src.host, "ping", "-c", str(count), "-W", "2", address]
    return subprocess.run(argv, capture_output=True).returncode == 0


def dummy_peers(count: int) -> str:
    """Peers at addresses nobody answers on: many kernel objects for a long apply."""
    out = []
    for i in range(count):
        spi_out, spi_in = 0x2000_0000 + 2 * i, 0x2000_0001 + 2 * i
        out.append(
            f"<peer><name>dummy-{i}</name><sp-address>203.0.113.{1 + i % 250}</sp-address>"
            f"<tunnel><remote-prefix>172.{16 + i // 250}.{i % 250}.0/24</remote-prefix></tunnel>"
            f"<ikeless><outbound>{ikeless_sa(spi_out, hexkey(36))}</outbound>"
            f"<inbound>{ikeless_sa(spi_in, hexkey(36))}</inbound></ikeless></peer>"
        )
    return "".join(out)


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
            try:
                with agents[1].connect() as m:
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
        worker.join(60)
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
