"""The CE agent's commit of a one-peer change, on a CE holding many peers.

    python -m bench.agent_commit_bench [--peers 1000] [--changes 200] [--pause 0] [--json FILE]

Two real agents (``cevpn-agent --dataplane none``, their own processes, real
SSH) are loaded with ``--peers`` and with 10 IKE-less peers (SA keys and
lifetimes as the VPN server compiles them).  Then ``--changes`` one-peer
changes are made on each, alternating between the two agents so both see the
same machine load, exactly as the VPN server provisions a CE
(nc_server/southbound.py): on session A ``<discard-changes/>``, an
``<edit-config>`` of the candidate merging one ``peer``, ``<commit>
<confirmed/>`` with a ``<persist>`` token; then on session B the confirming
``<commit>`` with its ``<persist-id>``.  The changes are a mix: add a new
peer, change one peer's remote prefix, remove one peer (the one added before).

Timed: the exchange (from sending the edit to the confirming commit's <ok/>),
and each RPC on its own.  Both sessions stay open for the whole run: the
SSH handshake the server pays per push is not the commit's cost.  The
10-peer agent is the reference in the same run: the ratio of the two says how
far from proportional to the change a commit is (1.0: not at all dependent
on the size of the configuration).

``--pause S`` waits S seconds before each change, as a CE sees its pushes in
production (minutes apart): with S above the agent's spare_keep_seconds (5 s)
each change finds an agent that has settled (nc_core/server.py ``_settle``),
not one warm from the change before.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.thin_client import ThinNetconfClient, reply_is_ok  # noqa: E402
from lab.agents import hexkey, ikeless_sa  # noqa: E402
from tests.netconf_server import ServerProcess, free_port  # noqa: E402

NC = "urn:ietf:params:xml:ns:netconf:base:1.0"
CE = "urn:cevpn:yang:cevpn-ce"
T = "urn:cevpn:yang:cevpn-types"
RPCS = ("discard", "edit", "commit", "confirm")
REFERENCE_PEERS = 10


def sa(spi: int) -> str:
    """An IKE-less SA with the lifetimes the server compiles."""
    return (
        ikeless_sa(spi, hexkey(36))
        + "<lifetime><soft-seconds>75600</soft-seconds>"
        + "<hard-seconds>86400</hard-seconds></lifetime>"
    )


def peer(i: int, prefix_generation: int = 0) -> str:
    """Peer i: its own SP address, LAN prefix and SPIs (unique sp-address, as YANG asks)."""
    third = (i + prefix_generation) % 250
    return (
        f"<peer><name>site-{i}</name><sp-address>10.{1 + i // 62500}.{i // 250 % 250}."
        f"{1 + i % 250}</sp-address><tunnel><remote-prefix>172.{16 + i // 250 % 16}."
        f"{third}.0/24</remote-prefix></tunnel><ikeless><outbound>{sa(0x1000_0000 + 2 * i)}"
        f"</outbound><inbound>{sa(0x1000_0001 + 2 * i)}</inbound></ikeless></peer>"
    )


def config(body: str) -> str:
    return f'<config xmlns="{NC}"><ce xmlns="{CE}" xmlns:t="{T}">{body}</ce></config>'


def version(n: int) -> str:
    """The configuration-version the VPN server replaces with every change it pushes."""
    return (
        f'<configuration-version xmlns:nc="{NC}" nc:operation="replace">v{n:016x}'
        "</configuration-version>"
    )


def preconfiguration(server_key: str) -> str:
    """A CE's pre-configuration as an enrolment leaves it (the server's keys: any key)."""
    return (
        "<pre-configuration><site-id>bench</site-id><vpn-id>bench</vpn-id>"
        "<sp-address>10.0.0.1</sp-address><vpn-server><endpoint>"
        f"<address>198.51.100.1</address><host-key>{server_key}</host-key></endpoint>"
        "<username>ce</username></vpn-server><management><server-username>vpn-server"
        f"</server-username><server-authorized-key>{server_key}</server-authorized-key>"
        "</management></pre-configuration>"
    )


class Agent:
    """One cevpn-agent process with ``peers`` peers and two open sessions."""

    def __init__(self, work: Path, name: str, peers: int, key: Path, pub: str) -> None:
        self.peers = peers
        self.process = ServerProcess("cevpn-agent", work / name / "state", free_port())
        self.process.adduser("bench", key=Path(pub), groups=("admin",))
        self.process.start("--dataplane", "none", "--log-level", "WARNING")
        self.a = self._connect(key)
        self.b = self._connect(key)
        body = (
            preconfiguration(Path(pub).read_text().strip())
            + version(0)
            + "".join(peer(i) for i in range(peers))
        )
        self.a.rpc_ok(
            f"<edit-config><target><running/></target>{config(body)}</edit-config>", timeout=600
        )
        self.added: int | None = None
        self.next_new = peers
        self.generation = 0
        self.times: dict[str, list[float]] = {k: [] for k in (*RPCS, "exchange")}
        self.cpu: list[float] = []

    def _connect(self, key: Path) -> ThinNetconfClient:
        return ThinNetconfClient.connect(
            self.process.host,
            self.process.port,
            "bench",
            key,
            self.process.host_key_line,
            timeout=600,
        )

    def change(self, n: int) -> str:
        """The edit of change ``n``: add a peer, change a prefix, remove the added peer;
        each with a new configuration-version, as the VPN server sends every change."""
        kind = n % 3
        if kind == 0 or self.added is None:
            self.added = self.next_new
            self.next_new += 1
            return config(version(n + 1) + peer(self.added))
        if kind == 1:
            self.generation += 1
            victim = n % self.peers
            return config(
                f"{version(n + 1)}<peer><name>site-{victim}</name><tunnel><remote-prefix>"
                f"172.31.{self.generation % 250}.0/24</remote-prefix></tunnel></peer>"
            )
        gone, self.added = self.added, None
        return config(
            f'{version(n + 1)}<peer xmlns:nc="{NC}" nc:operation="remove"><name>site-{gone}'
            "</name></peer>"
        )

    def exchange(self, n: int) -> None:
        token = secrets.token_hex(16)
        edit = f"<edit-config><target><candidate/></target>{self.change(n)}</edit-config>"
        commit = (
            "<commit><confirmed/><confirm-timeout>120</confirm-timeout>"
            f"<persist>{token}</persist></commit>"
        )
        confirm = f"<commit><persist-id>{token}</persist-id></commit>"
        cpu = self.process.cpu_seconds()
        t0 = time.perf_counter()
        self._ok(self.a, "<discard-changes/>")
        t1 = time.perf_counter()
        self._ok(self.a, edit)
        t2 = time.perf_counter()
        self._ok(self.a, commit)
        t3 = time.perf_counter()
        self._ok(self.b, confirm)
        t4 = time.perf_counter()
        self.cpu.append(self.process.cpu_seconds() - cpu)
        for name, seconds in zip(RPCS, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
            self.times[name].append(seconds)
        self.times["exchange"].append(t4 - t1)

    @staticmethod
    def _ok(client: ThinNetconfClient, body: str) -> None:
        reply = client.rpc(body)
        if not reply_is_ok(reply):
            raise RuntimeError(f"not <ok/>: {reply[:2000]!r}")

    def peer_count(self) -> int:
        reply = self.a.rpc_data(
            "<get-config><source><running/></source><filter type='subtree'>"
            f'<ce xmlns="{CE}"><peer><name/></peer></ce></filter></get-config>'
        )
        return reply.count(b"<name>")

    def close(self) -> None:
        for client in (self.a, self.b):
            client.close()
        self.process.stop()


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def summary(agent: Agent) -> dict[str, Any]:
    out: dict[str, Any] = {"peers": agent.peers}
    for name, values in agent.times.items():
        out[name] = {
            "p50_ms": statistics.median(values) * 1000,
            "p99_ms": percentile(values, 99) * 1000,
            "max_ms": max(values) * 1000,
        }
    out["agent_cpu_ms_per_change"] = statistics.mean(agent.cpu) * 1000
    return out


def run(peers: int, changes: int, warmup: int, pause: float = 0.0) -> dict[str, Any]:
    from nc_server.enrolment import new_ed25519

    with tempfile.TemporaryDirectory(prefix="cevpn-agent-commit-") as tmp:
        work = Path(tmp)
        os.chmod(work, 0o700)
        pair = new_ed25519("bench")
        key = work / "bench_key"
        key.write_text(pair.private_openssh)
        key.chmod(0o600)
        pub = work / "bench_key.pub"
        pub.write_text(pair.public_line + "\n")
        started = time.perf_counter()
        big = Agent(work, "big", peers, key, str(pub))
        load_s = time.perf_counter() - started
        small = Agent(work, "small", REFERENCE_PEERS, key, str(pub))
        try:
            for n in range(warmup):
                big.exchange(n)
                small.exchange(n)
            for agent in (big, small):
                agent.times = {k: [] for k in agent.times}
                agent.cpu = []
            for n in range(warmup, warmup + changes):
                if pause:
                    time.sleep(pause)  # the pace of the changes is the measured condition
                big.exchange(n)
                small.exchange(n)
            counts = (big.peer_count(), small.peer_count())
        finally:
            big.close()
            small.close()
    result = {
        "changes": changes,
        "pause_s": pause,
        "load_s": load_s,
        "big": summary(big),
        "small": summary(small),
    }
    result["peer_counts_after"] = counts
    result["ratio_p50"] = (
        result["big"]["exchange"]["p50_ms"] / result["small"]["exchange"]["p50_ms"]
    )
    result["ratio_p99"] = (
        result["big"]["exchange"]["p99_ms"] / result["small"]["exchange"]["p99_ms"]
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", type=int, default=1000)
    parser.add_argument("--changes", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=6)
    parser.add_argument(
        "--pause", type=float, default=0.0, help="seconds before each change (6: settled agents)"
    )
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args()
    result = run(args.peers, args.changes, args.warmup, args.pause)
    big, small = result["big"], result["small"]
    print(
        f"CE agent (--dataplane none), one-peer change, {result['changes']} changes "
        f"(add/change/remove), {result['pause_s']:g} s apart, 2 cores shared; "
        f"{big['peers']} peers loaded in "
        f"{result['load_s']:.1f} s"
    )
    print(
        f"  {'line':<10} {big['peers']:>6} peers p50 / p99     {small['peers']:>3} peers p50 / p99"
    )
    for name in ("exchange", *RPCS):
        b, s = big[name], small[name]
        print(
            f"  {name:<10} {b['p50_ms']:8.1f} / {b['p99_ms']:6.1f} ms    "
            f"{s['p50_ms']:6.1f} / {s['p99_ms']:6.1f} ms"
        )
    print(
        f"  agent CPU per change: {big['agent_cpu_ms_per_change']:.1f} ms vs "
        f"{small['agent_cpu_ms_per_change']:.1f} ms"
    )
    print(
        f"  ratio {big['peers']}/{small['peers']} peers (exchange): p50 {result['ratio_p50']:.2f}, "
        f"p99 {result['ratio_p99']:.2f}"
    )
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
