"""Agents, addresses and captures in the User-Mode Linux lab (run inside a guest).

An :class:`Agent` is a real cevpn-agent in its CE's SP namespace serving
NETCONF on the CE's SP address, with an ``admin`` account the driver uses from
the provider core (`pe`), the way a VPN server reaches CEs.  The helpers make
the XML a scenario configures them with, ping across the VPN and capture
what crosses the core.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import time
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ncclient import manager

from lab.topology import Site
from nc_core.journal import read_document

ROOT = Path(__file__).resolve().parents[1]
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
        if read_document(self.state, "running") is None:
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
                log.close()
                tail = (self.state.parent / f"{self.site.ce}.log").read_text(errors="replace")
                raise RuntimeError(
                    f"agent {self.site.ce} exited with status {self.proc.returncode}:\n"
                    + tail[-3000:]
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


MARKER = "127.0.0.77"
"""Pinged on the capturing namespace's loopback to close a capture (see Capture.stop)."""


@dataclass
class Capture:
    """tcpdump in one namespace (LAB.md: --immediate-mode), packet-buffered to a pcap.

    Started and stopped on conditions, never after a sleep: ``capture`` returns once
    tcpdump says it is listening; ``stop`` pings a marker address on the loopback (a
    capture on 'any' sees it), waits until the marker is in the pcap -- so everything
    sent before it is there too -- and only then stops tcpdump."""

    name: str
    netns: str
    iface: str
    proc: subprocess.Popen[bytes]

    @property
    def pcap(self) -> Path:
        return WORK / f"{self.name}.pcap"

    def lines(self) -> list[str]:
        out = subprocess.run(
            ["tcpdump", "-nn", "-r", str(self.pcap)], capture_output=True, text=True
        ).stdout
        return [line for line in out.splitlines() if line.strip()]

    def stop(self) -> list[str]:
        if self.iface == "any":
            marker = f"> {MARKER}: ICMP"
            deadline = time.monotonic() + 30
            while not any(marker in line for line in self.lines()):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"capture {self.name}: the closing marker never arrived")
                subprocess.run(
                    ["ip", "netns", "exec", self.netns, "ping", "-c", "1", "-W", "1", MARKER],
                    capture_output=True,
                )  # fmt: skip
        self.proc.terminate()
        self.proc.wait(10)
        return [line for line in self.lines() if MARKER not in line]


def capture(name: str, netns: str = "pe", iface: str = "any") -> Capture:
    """Start capturing IPv4 in ``netns`` on ``iface``; returns once tcpdump listens."""
    log = WORK / f"{name}.tcpdump.log"
    with log.open("wb") as err:
        proc = subprocess.Popen(
            ["ip", "netns", "exec", netns, "tcpdump", "-nni", iface, "-U", "-w",
             str(WORK / f"{name}.pcap"), "--immediate-mode", "ip"],
            stdout=subprocess.DEVNULL, stderr=err,
        )  # fmt: skip
    deadline = time.monotonic() + 30
    while "listening on" not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"tcpdump did not start: {log.read_text(errors='replace')}")
        time.sleep(0.02)
    return Capture(name, netns, iface, proc)


def stop_capture(cap: Capture, name: str) -> list[str]:
    """The captured packets as tcpdump prints them (``name`` is the capture's)."""
    assert cap.name == name
    return cap.stop()


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
