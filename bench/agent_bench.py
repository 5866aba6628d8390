"""Commit-to-forwarding time of the CE agent for 100 peers, next to `ip -batch` doing the same.

    .venv/bin/python -m bench.agent_bench          (on the host: boots a UML guest)

Inside one guest, four CEs: ce1 and ce2 run cevpn agents; ce3 and ce4 are set
up by hand.  For the agent: one <edit-config> gives ce1 100 IKE-less peers
(99 at addresses nobody answers, plus ce2, which already knows ce1); the
clock runs from sending the edit until site 1 pings site 2 through the
tunnel.  For the reference: the same 200 SAs, 200 policies, 100 IP-in-IP
devices moved into the VPN space and their routes, written as `ip -batch`
files for ce3, timed from the first `ip` until site 3 pings site 4.  The
reference does no validation, no NETCONF, no persistence: the ratio says
what all of that costs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

PEERS = 100


def guest_main() -> None:
    from lab.agents import (
        CE,
        Agent,
        config,
        dummy_peers,
        pair_keys,
        peer_xml,
        preconfiguration,
    )
    from lab.topology import Site

    work = Path(os.environ["WORK"])
    s1, s2, s3, s4 = (Site(n) for n in (1, 2, 3, 4))
    agents = {s.n: Agent(s, work / s.ce) for s in (s1, s2)}
    result: dict[str, float] = {}
    try:
        for agent in agents.values():
            agent.start()
        keys = pair_keys(s1, s2)
        with agents[2].connect() as m:
            m.edit_config(
                target="running",
                config=config(preconfiguration(s2) + peer_xml(s2, s1, keys, "transport-ipip")),
            )
        body = (
            preconfiguration(s1) + dummy_peers(PEERS - 1) + peer_xml(s1, s2, keys, "transport-ipip")
        )
        with agents[1].connect() as m:
            start = time.perf_counter()
            m.edit_config(target="running", config=config(body))
            result["agent_commit_s"] = time.perf_counter() - start
            result["agent_forwarding_s"] = _until_ping(s1, s2, start)
            result["agent_peers"] = m.get(
                filter=("subtree", f'<ce xmlns="{CE}"><peer/></ce>')
            ).data_xml.count("<status>up</status>")
        result["reference_forwarding_s"] = _reference(s3, s4, work)
    finally:
        for agent in agents.values():
            agent.stop()
    (work / "bench.json").write_text(json.dumps(result))


def _until_ping(src, dst, start: float) -> float:  # type: ignore[no-untyped-def]
    deadline = start + 120
    while time.perf_counter() < deadline:
        done = subprocess.run(
            ["ip", "netns", "exec", src.host, "ping", "-c", "1", "-W", "0.2", dst.host_address],
            capture_output=True,
        )
        if done.returncode == 0:
            return time.perf_counter() - start
    raise RuntimeError(f"{src.host} never reached {dst.host_address}")


def _reference(a, b, work: Path) -> float:  # type: ignore[no-untyped-def]
    key = "0x" + "44" * 36
    alg = f"aead 'rfc4106(gcm(aes))' {key} 128 replay-window 1024"

    def sa(src: str, dst: str, spi: int, reqid: int) -> str:
        return f"xfrm state add src {src} dst {dst} proto esp spi {hex(spi)} reqid {reqid} " + (
            f"mode transport {alg}"
        )

    def pol(src: str, dst: str, direction: str, reqid: int) -> str:
        return (
            f"xfrm policy add src {src}/32 dst {dst}/32 proto 4 dir {direction} "
            f"tmpl proto esp mode transport reqid {reqid}"
        )

    def tunnel(dev: str, local: str, remote: str, vpn: str) -> list[str]:
        return [
            f"link add {dev} type ipip local {local} remote {remote}",
            f"link set {dev} mtu 1443",
            f"link set {dev} netns {vpn}",
        ]

    # b is set up first, untimed, like ce2 for the agent
    _batch(
        b.ce,
        [
            sa(a.sp_address, b.sp_address, 0x4001, 9),
            sa(b.sp_address, a.sp_address, 0x4002, 9),
            pol(b.sp_address, a.sp_address, "out", 9),
            pol(a.sp_address, b.sp_address, "in", 9),
            *tunnel("ref9", b.sp_address, a.sp_address, b.vpn),
        ],
        work / "b.batch",
    )
    _batch(b.vpn, ["link set ref9 up", f"route add {a.lan_prefix} dev ref9"], work / "bv.batch")
    sp_cmds: list[str] = []
    vpn_cmds: list[str] = []
    for i in range(PEERS):
        real = i == PEERS - 1
        remote = b.sp_address if real else f"203.0.113.{1 + i % 250}"
        to_a, from_a = (0x4002, 0x4001) if real else (0x5000 + 2 * i, 0x5001 + 2 * i)
        reqid = 9 if real else 100 + i
        dev = "refb" if real else f"ref{i}"
        prefix = b.lan_prefix if real else f"172.{16 + i // 250}.{i % 250}.0/24"
        sp_cmds += [
            sa(remote, a.sp_address, to_a, reqid),
            sa(a.sp_address, remote, from_a, reqid),
            pol(a.sp_address, remote, "out", reqid),
            pol(remote, a.sp_address, "in", reqid),
            *tunnel(dev, a.sp_address, remote, a.vpn),
        ]
        vpn_cmds += [f"link set {dev} up", f"route add {prefix} dev {dev}"]
    start = time.perf_counter()
    _batch(a.ce, sp_cmds, work / "a.batch")
    _batch(a.vpn, vpn_cmds, work / "av.batch")
    return _until_ping(a, b, start)


def _batch(netns: str, commands: list[str], path: Path) -> None:
    path.write_text("\n".join(commands) + "\n")
    subprocess.run(["ip", "-n", netns, "-batch", str(path)], check=True)


def host_main() -> int:
    from lab.uml import run_guest

    result = run_guest(
        "set -e\n.venv/bin/python -m lab.topology build 4\n"
        "ip netns exec pe .venv/bin/python -m bench.agent_bench --guest\n",
        timeout=900,
    )
    if result.returncode != 0:
        print(result.console[-4000:], file=sys.stderr)
        return 1
    data = json.loads(result.read("bench.json"))
    ours, ref = data["agent_forwarding_s"], data["reference_forwarding_s"]
    print(f"commit-to-forwarding for {PEERS} peers, inside one UML guest")
    print(f"{'':<44} {'seconds':>8}")
    print(f"{'cevpn agent: edit-config returned':<44} {data['agent_commit_s']:>8.2f}")
    print(f"{'cevpn agent: first ping through the tunnel':<44} {ours:>8.2f}")
    print(f"{'ip -batch (reference): first ping':<44} {ref:>8.2f}")
    print(
        f"ratio reference / cevpn: {ref / ours:.2f} (above 1: cevpn faster); "
        f"peers up: {data['agent_peers']}"
    )
    return 0


if __name__ == "__main__":
    if "--guest" in sys.argv:
        guest_main()
    else:
        sys.exit(host_main())
