"""Scenarios for tests/lab/test_xfrm.py, run inside a UML guest.

    .venv/bin/python -m tests.lab.xfrm_scenarios datapath|control

Each scenario drives nc_agent.dataplane.xfrm against the guest's kernel and
writes what it observed as JSON to $WORK/<name>.json; the test on the host
asserts on it.  Several independent checks share one boot (~10-15 s each).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from lab.agents import capture
from lab.topology import build, ip_batch
from nc_agent.dataplane.xfrm import (
    SA,
    Acquire,
    Algorithm,
    Expire,
    Lifetime,
    Policy,
    SAKey,
    Xfrm,
    XfrmError,
)

WORK = Path(os.environ.get("WORK", "/tmp"))
GCM = "rfc4106(gcm(aes))"
R = 0x0CE00001  # first owned reqid
A, B = "198.51.100.2", "198.51.100.6"  # ce1 and ce2 SP addresses (topology.py)


def key(byte: int) -> bytes:
    return bytes([byte]) * 36  # AES-256 key + 4-byte salt


def aead(byte: int) -> Algorithm:
    return Algorithm(GCM, key(byte), 128)


def sh(*argv: str) -> str:
    return subprocess.run(argv, capture_output=True, text=True, check=True).stdout


def ping(src_ns: str, dst: str) -> dict[str, Any]:
    res = subprocess.run(
        ["ip", "netns", "exec", src_ns, "ping", "-c", "3", "-W", "2", dst],
        capture_output=True,
        text=True,
    )
    return {"rc": res.returncode, "out": res.stdout + res.stderr}


def states(x: Xfrm) -> list[dict[str, Any]]:
    return [dataclasses.asdict(s) for s in x.dump_sas()]


# ------------------------------------------------------------------ datapath
def transport_objects(
    local: str, remote: str, out_spi: int, in_spi: int, reqid: int
) -> tuple[list[SA], list[Policy]]:
    """Transport-mode ESP protecting IP-in-IP (proto 4) between two SP addresses."""
    sas = [
        SA(local, remote, out_spi, reqid, "transport", aead=aead(out_spi & 0xFF)),
        SA(remote, local, in_spi, reqid, "transport", aead=aead(in_spi & 0xFF)),
    ]
    policies = [
        Policy("out", f"{local}/32", f"{remote}/32", 4, reqid=reqid),
        Policy("in", f"{remote}/32", f"{local}/32", 4, reqid=reqid),
    ]
    return sas, policies


def tunnel_objects(
    local: str, remote: str, out_spi: int, in_spi: int, mark: int
) -> tuple[list[SA], list[Policy]]:
    """Route-based tunnel mode: marked SAs and policies for a VTI with ikey/okey = mark."""
    sas = [
        SA(local, remote, out_spi, mark, "tunnel", aead=aead(out_spi & 0xFF), mark=mark),
        SA(remote, local, in_spi, mark, "tunnel", aead=aead(in_spi & 0xFF), mark=mark),
    ]
    policies = [
        Policy("out", "0.0.0.0/0", "0.0.0.0/0", 0, local, remote, "tunnel", mark, mark),
        Policy("in", "0.0.0.0/0", "0.0.0.0/0", 0, remote, local, "tunnel", mark, mark),
    ]
    return sas, policies


def datapath() -> dict[str, Any]:
    build(2)
    ends = {"ce1": (A, B, 2), "ce2": (B, A, 1)}
    xs = {ns: Xfrm(ns) for ns in ends}
    result: dict[str, Any] = {}

    # transport mode ESP over IP-in-IP, an ipip device per peer moved into the VPN netns
    for ns, (local, remote, peer) in ends.items():
        out_spi, in_spi = (0x1001, 0x2001) if ns == "ce1" else (0x2001, 0x1001)
        sas, policies = transport_objects(local, remote, out_spi, in_spi, R)
        xs[ns].apply(add_sas=sas, add_policies=policies)
        ip_batch(
            [
                f"link add ipip{peer} type ipip local {local} remote {remote}",
                f"link set ipip{peer} mtu 1446 netns {ns}-vpn",
            ],
            ns,
        )
        ip_batch(
            [f"link set ipip{peer} up", f"route add 10.{peer}.0.0/24 dev ipip{peer}"], f"{ns}-vpn"
        )
    cap = capture("transport")
    result["transport"] = {
        "ping": ping("site1", "10.2.0.2"),
        "pe": cap.stop(),
        "sas": states(xs["ce1"]),
        "ip_state": sh("ip", "-n", "ce1", "xfrm", "state"),
        "policies": [dataclasses.asdict(p) for p in xs["ce1"].dump_policies()],
    }
    # tear down with flush_owned, then route-based tunnel mode with a VTI per peer
    result["transport"]["flushed"] = {ns: x.flush_owned() for ns, x in xs.items()}
    mark = R + 0x10
    for ns, (local, remote, peer) in ends.items():
        ip_batch([f"link del ipip{peer}"], f"{ns}-vpn")
        out_spi, in_spi = (0x3001, 0x4001) if ns == "ce1" else (0x4001, 0x3001)
        sas, policies = tunnel_objects(local, remote, out_spi, in_spi, mark)
        xs[ns].apply(add_sas=sas, add_policies=policies)
        ip_batch(
            [
                f"link add vti{peer} type vti local {local} remote {remote}"
                f" ikey {mark} okey {mark}",
                f"link set vti{peer} netns {ns}-vpn",
            ],
            ns,
        )
        ip_batch(
            [f"link set vti{peer} up", f"route add 10.{peer}.0.0/24 dev vti{peer}"], f"{ns}-vpn"
        )
    cap = capture("tunnel")
    result["tunnel"] = {
        "ping": ping("site1", "10.2.0.2"),
        "pe": cap.stop(),
        "sas": states(xs["ce1"]),
        "ip_state": sh("ip", "-n", "ce1", "xfrm", "state"),
        "policies": [dataclasses.asdict(p) for p in xs["ce1"].dump_policies()],
    }
    return result


# ------------------------------------------------------------------- control
def snapshot(ns: str) -> list[str]:
    """The SAD and SPD as `ip xfrm` prints them, order-independent."""
    text = sh("ip", "-n", ns, "xfrm", "state") + sh("ip", "-n", ns, "xfrm", "policy")
    return sorted(text.splitlines())


def control() -> dict[str, Any]:
    ns = "ctl"
    ip_batch([f"netns add {ns}"])
    ip_batch(
        [
            "link set lo up",
            "link add xa type veth peer name xb",
            "addr add 192.0.2.1/24 dev xa",
            "link set xa up",
            "link set xb up",
        ],
        ns,
    )
    # somebody else's SA and policy (reqid 7, outside OWNED_REQIDS)
    ip_batch(
        [
            "xfrm state add src 192.0.2.1 dst 192.0.2.2 proto esp spi 0x999 reqid 7 mode "
            f"transport aead '{GCM}' 0x{key(9).hex()} 128 replay-window 32",
            "xfrm policy add dir out src 192.0.2.10/32 dst 192.0.2.20/32 "
            "tmpl proto esp reqid 7 mode transport",
        ],
        ns,
    )
    x = Xfrm(ns)
    res: dict[str, Any] = {}

    # install three peers and a fail-closed block policy; dumps give them back
    sas: list[SA] = []
    policies: list[Policy] = []
    for i in range(3):
        s, p = transport_objects("203.0.113.1", f"203.0.113.{10 + i}", 0x100 + i, 0x200 + i, R + i)
        sas += s
        policies += p
    sas.append(
        SA("203.0.113.1", "203.0.113.99", 0x300, R + 5, "transport", aead=aead(3), replay_window=32)
    )
    block = Policy("out", "0.0.0.0/0", "0.0.0.0/0", reqid=R + 9, priority=1000, action="block")
    policies.append(block)
    x.apply(add_sas=sas, add_policies=policies)
    dumped_sas = x.dump_sas()
    res["install"] = {
        "sas_match": sorted((s.src, s.dst, s.spi, s.reqid) for s in dumped_sas)
        == sorted((s.src, s.dst, s.spi, s.reqid) for s in sas),
        "windows": sorted({s.replay_window for s in dumped_sas}),
        "policies_match": sorted(map(repr, x.dump_policies())) == sorted(map(repr, policies)),
        "all_sas": len(x.dump_sas(owned_only=False)),
        "ip_state": sh("ip", "-n", ns, "xfrm", "state"),
    }

    # a failing batch: the second SA duplicates an existing SPI; the kernel is left as it was
    before = snapshot(ns)
    fresh = SA("203.0.113.1", "203.0.113.50", 0x500, R + 20, "transport", aead=aead(5))
    duplicate = dataclasses.replace(sas[0], reqid=R + 21)
    failures: dict[str, Any] = {}
    try:
        x.apply(
            add_sas=[fresh, duplicate],
            add_policies=[Policy("out", "203.0.113.1/32", "203.0.113.50/32", 4, reqid=R + 20)],
        )
        failures["add"] = None
    except XfrmError as exc:
        failures["add"] = {"text": str(exc), "errno": exc.errno}
    failures["add_unchanged"] = snapshot(ns) == before
    # deletes are undone too: delete a peer's SAs and policies, then fail on a duplicate
    try:
        x.apply(
            del_sas=[SAKey(s.dst, s.spi) for s in sas[:2]],
            del_policies=policies[:2],
            add_sas=[fresh, dataclasses.replace(sas[2], reqid=R + 22)],  # duplicates peer 2's
        )
        failures["mixed"] = None
    except XfrmError as exc:
        failures["mixed"] = {"text": str(exc), "errno": exc.errno}
    after = snapshot(ns)
    failures["mixed_unchanged"] = after == before
    failures["diff"] = sorted(set(before) ^ set(after))
    # refusing to touch somebody else's SA
    try:
        x.apply(del_sas=[("192.0.2.2", 0x999)])
        failures["foreign"] = None
    except ValueError as exc:
        failures["foreign"] = str(exc)
    res["failures"] = failures

    # flush_owned takes ours, leaves the reqid-7 SA and policy
    flushed = x.flush_owned()
    res["flush"] = {
        "count": flushed,
        "expected": len(sas) + len(policies),
        "ip_state": sh("ip", "-n", ns, "xfrm", "state"),
        "ip_policy": sh("ip", "-n", ns, "xfrm", "policy"),
        "owned_left": len(x.dump_sas()) + len(x.dump_policies()),
    }

    # events: soft and hard expire of a short-lived SA, acquire for a policy without SA
    events = x.events()
    short = SA(
        "203.0.113.1",
        "203.0.113.77",
        0x777,
        R + 30,
        "transport",
        aead=aead(7),
        lifetime=Lifetime(soft_seconds=1, hard_seconds=2),
    )
    x.apply(add_sas=[short])
    x.apply(add_policies=[Policy("out", "192.0.2.1/32", "192.0.2.99/32", reqid=R + 31)])
    subprocess.run(
        ["ip", "netns", "exec", ns, "ping", "-c", "1", "-W", "1", "192.0.2.99"],
        capture_output=True,
    )
    got: list[Any] = []
    deadline = time.monotonic() + 8
    while time.monotonic() < deadline:
        got += events.wait(0.5)
        expires = [e for e in got if isinstance(e, Expire)]
        if any(e.hard for e in expires) and any(isinstance(e, Acquire) for e in got):
            break
    res["events"] = {
        "expire": [
            {"spi": e.sa.spi, "reqid": e.sa.reqid, "hard": e.hard}
            for e in got
            if isinstance(e, Expire)
        ],
        "acquire": [dataclasses.asdict(e) for e in got if isinstance(e, Acquire)],
        "fileno": events.fileno() >= 0,
        "left_after_hard": [s.spi for s in x.dump_sas()],
    }
    events.close()
    x.close()
    return res


def main() -> None:
    name = sys.argv[1]
    scenario = {"datapath": datapath, "control": control}[name]
    try:
        out: Any = scenario()
    except Exception as exc:
        import traceback

        out = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
    (WORK / f"{name}.json").write_text(json.dumps(out, indent=1, default=str))
    print(json.dumps(out, default=str)[:4000])


if __name__ == "__main__":
    main()
