"""What one hostile client costs everyone else: password guessing, a costly XPath filter,
a client that never reads its replies.

    .venv/bin/python -m bench.hostile_bench [--json FILE]

Each figure is measured against a real cevpn-server over real SSH, with its
reference taken in the same run on the same server:

- guesses/s: wrong passwords tried against one account for a fixed time, on
  one SSH connection (reconnecting whenever the server disconnects), and the
  time a failed login takes for an existing and for an unknown user name;
- a small ``<get-config>``'s latency from a second client while a hostile
  XPath filter runs, against the same request on the quiet server (ratio);
- the server's resident memory while one client sends ``<get>`` requests and
  never reads the replies, against its memory before.
"""

from __future__ import annotations

import argparse
import json
import re
import socket
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import paramiko

from bench.thin_client import ThinNetconfClient
from nc_core.asyncssh_import import asyncssh
from tests.netconf_server import ADMIN, ServerProcess, running_server

NC = "urn:ietf:params:xml:ns:netconf:base:1.0"
HELLO = (
    f'<hello xmlns="{NC}"><capabilities><capability>urn:ietf:params:netconf:base:1.0'
    "</capability></capabilities></hello>]]>]]>"
).encode()
# Nested scans of every node: n^3 node visits for an n-node datastore (one more level
# of nesting takes minutes on the fresh server's ~150 nodes).
HOSTILE_XPATH = "//*[count(//*[count(//*//*) > 0]) > 0]"


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _transport(server: ServerProcess) -> paramiko.Transport:
    transport = paramiko.Transport(socket.create_connection((server.host, server.port), 10))
    transport.start_client(timeout=10)
    return transport


class _Guesser(asyncssh.SSHClient):
    """Answers every password prompt with a new wrong guess, as long as the server asks."""

    def __init__(self, counter: list[int], until: float) -> None:
        self.counter = counter
        self.until = until

    def password_auth_requested(self) -> str | None:
        if time.monotonic() >= self.until:
            return None
        self.counter[0] += 1
        return f"wrong-{self.counter[0]}"


async def _guess(server: ServerProcess, seconds: float) -> dict[str, Any]:
    counter = [0]
    connections = 0
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        connections += 1
        try:
            await asyncssh.connect(
                server.host,
                server.port,
                username=ADMIN[0],
                known_hosts=None,
                client_factory=lambda: _Guesser(counter, until),
                client_keys=None,
                preferred_auth="password",
                agent_path=None,
                login_timeout=seconds + 30,
            )
        except (asyncssh.Error, OSError):
            pass
    return {
        "guesses": counter[0],
        "seconds": seconds,
        "per_second": counter[0] / seconds,
        "connections": connections,
    }


def guessing(server: ServerProcess, seconds: float) -> dict[str, Any]:
    """Wrong passwords against one account as fast as the server answers them, on one
    connection for as long as the server keeps it open (then on a new one)."""
    import asyncio

    return asyncio.run(_guess(server, seconds))


def failure_times(rounds: int) -> dict[str, float]:
    """Median time of one failed password check, existing vs unknown user: the check this
    server makes now (nc_core.ssh_auth, a fresh address each time so no delay applies)
    and, side by side, the check it made before (hash only for an existing user)."""
    import asyncio

    from nc_core.ssh_auth import PasswordGuard
    from nc_core.users import User, check_password, hash_password

    user = User("admin", hash_password("the-right-password"))
    guard = PasswordGuard()

    def legacy(account: User | None) -> bool:
        return bool(account and account.password and check_password("wrong", account.password))

    async def timed(account: User | None, address: int) -> float:
        started = time.perf_counter()
        await guard.check(account, "wrong", f"192.0.2.{address % 250}.{address}")
        return time.perf_counter() - started

    def timed_legacy(account: User | None) -> float:
        started = time.perf_counter()
        legacy(account)
        return time.perf_counter() - started

    async def run() -> dict[str, float]:
        now: list[float] = []
        unknown: list[float] = []
        for i in range(rounds):  # interleaved, so warming up favours neither
            now.append(await timed(user, 2 * i))
            unknown.append(await timed(None, 2 * i + 1))
        return {
            "existing_user": statistics.median(now),
            "unknown_user": statistics.median(unknown),
            "before_existing_user": statistics.median(timed_legacy(user) for _ in range(rounds)),
            "before_unknown_user": statistics.median(timed_legacy(None) for _ in range(rounds)),
        }

    return asyncio.run(run())


def small_get_config(client: ThinNetconfClient, rounds: int) -> list[float]:
    times = []
    body = (
        '<get-config><source><running/></source><filter type="subtree">'
        '<nacm xmlns="urn:ietf:params:xml:ns:yang:ietf-netconf-acm"><enable-nacm/></nacm>'
        "</filter></get-config>"
    )
    for _ in range(rounds):
        started = time.perf_counter()
        client.rpc_data(body)
        times.append(time.perf_counter() - started)
    return times


def _connect(server: ServerProcess, key: Path, timeout: float = 600.0) -> ThinNetconfClient:
    return ThinNetconfClient.connect(
        server.host, server.port, ADMIN[0], key, server.host_key_line, timeout=timeout
    )


def hostile_filter(server: ServerProcess, key: Path, rounds: int, seconds: float) -> dict[str, Any]:
    with _connect(server, key) as quiet:
        small_get_config(quiet, 5)
        reference = small_get_config(quiet, rounds)
        outcome: dict[str, Any] = {}
        started_attack = threading.Event()

        def attack() -> None:
            started = time.perf_counter()
            try:
                with _connect(server, key, timeout=seconds + 120) as attacker:
                    started_attack.set()
                    reply = attacker.rpc(
                        f'<get><filter type="xpath" select="{HOSTILE_XPATH}"/></get>'
                    )
                    error = re.search(rb"<error-message[^>]*>([^<]*)<", reply)
                    outcome["answer"] = f"rpc-error: {error.group(1).decode()}" if error else "data"
            except Exception as exc:
                outcome["answer"] = f"{type(exc).__name__}: {str(exc)[:120]}"
            outcome["attack_s"] = time.perf_counter() - started

        thread = threading.Thread(target=attack, daemon=True)
        thread.start()
        started_attack.wait(30)
        time.sleep(0.2)  # the attacker's filter is running
        loaded = small_get_config(quiet, rounds)
        thread.join(seconds + 180)
    return {
        "quiet_ms_median": statistics.median(reference) * 1000,
        "under_attack_ms_median": statistics.median(loaded) * 1000,
        "under_attack_ms_max": max(loaded) * 1000,
        "ratio": statistics.median(loaded) / statistics.median(reference),
        "attacker": outcome,
    }


def never_reads(server: ServerProcess, seconds: float) -> dict[str, Any]:
    assert server.proc is not None
    pid = server.proc.pid
    before = rss_kib(pid)
    transport = _transport(server)
    transport.auth_password(ADMIN[0], ADMIN[1])
    chan = transport.open_session()
    chan.invoke_subsystem("netconf")
    chan.sendall(HELLO)
    request = (f'<rpc message-id="1" xmlns="{NC}"><get/></rpc>]]>]]>').encode()
    sent = 0
    peak = before
    end = time.monotonic() + seconds
    chan.settimeout(0.5)
    while time.monotonic() < end:
        try:
            chan.sendall(request * 16)
            sent += 16
        except (TimeoutError, OSError):
            pass  # the server stopped reading: what back-pressure looks like
        peak = max(peak, rss_kib(pid))
    after = rss_kib(pid)
    transport.close()
    return {
        "rss_before_mib": before / 1024,
        "rss_peak_mib": peak / 1024,
        "grown_mib": (peak - before) / 1024,
        "requests_sent": sent,
        "rss_end_mib": after / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--seconds", type=float, default=30.0)
    args = parser.parse_args()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in "abd":
            (Path(tmp) / name).mkdir()
        key = Path(tmp) / "id_ed25519"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
        with running_server(Path(tmp) / "a") as server:
            server.stop()
            server.adduser(ADMIN[0], groups=("admin",), key=key.with_suffix(".pub"))
            server.start()
            results["hostile_filter"] = hostile_filter(server, key, 20, 30.0)
        with running_server(Path(tmp) / "d") as server:
            results["never_reads"] = never_reads(server, 3.0)
        with running_server(Path(tmp) / "b") as server:
            results["guessing"] = guessing(server, args.seconds)
        results["failed_login_s"] = failure_times(50)
    g, f, n, t = (
        results["guessing"],
        results["hostile_filter"],
        results["never_reads"],
        results["failed_login_s"],
    )
    print(
        f"password guesses on one account: {g['per_second']:.1f}/s "
        f"({g['guesses']} in {g['seconds']:.0f} s on {g['connections']} connections)"
    )
    print(
        f"failed password check: existing user {t['existing_user'] * 1000:.2f} ms, "
        f"unknown user {t['unknown_user'] * 1000:.2f} ms (the check before this policy: "
        f"{t['before_existing_user'] * 1000:.2f} ms and {t['before_unknown_user'] * 1000:.2f} ms)"
    )
    print(
        f"small <get-config> quiet {f['quiet_ms_median']:.1f} ms, during a hostile XPath "
        f"filter {f['under_attack_ms_median']:.1f} ms (max {f['under_attack_ms_max']:.1f}), "
        f"ratio {f['ratio']:.1f}; attacker: {f['attacker']}"
    )
    print(
        f"client that never reads: server RSS {n['rss_before_mib']:.1f} -> "
        f"{n['rss_peak_mib']:.1f} MiB (+{n['grown_mib']:.1f}) after {n['requests_sent']} "
        "requests in 3 s"
    )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
