"""cevpn's NETCONF engine against yuma123 netconfd, side by side, printing ratios.

    .venv/bin/python -m bench.netconf_bench [--target running|candidate|both] [--json FILE]

For each edit target both servers are started fresh and empty and driven by
the same thin paramiko client (bench.thin_client) through the same workload
(bench.workload): session open, 1,000 small get-config, 1,000 small
edit-config, one edit (+ commit) of a 10,000-entry list, one get-config of
that list.  Then a shorter run through stock ncclient (0.7.1, its default
100 ms polling tick untouched), as users' scripts would see the servers.

Each line prints both mean times and the ratio netconfd / cevpn: above 1.0
cevpn is faster.  cevpn runs as its own process (bench.cevpn_bench_server)
serving the same schema-only module as netconfd.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.reference_netconfd import NetconfdReference, free_loopback_port
from bench.workload import WorkloadResult, netconfd_version, run_workload

ROOT = Path(__file__).resolve().parent.parent
NC = "urn:ietf:params:xml:ns:netconf:base:1.0"
CB = "urn:cevpn:yang:cevpn-bench"


@dataclass
class CevpnEndpoint:
    host: str
    port: int
    username: str
    client_key_path: Path
    host_key_pub: str
    target: str = "running"


@contextmanager
def cevpn_server(workdir: Path, client_key: Path) -> Iterator[CevpnEndpoint]:
    """bench.cevpn_bench_server in its own process, fresh state, key auth."""
    port = free_loopback_port()
    state = workdir / "state"
    log = (workdir / "cevpn.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.cevpn_bench_server", "--state-dir", str(state),
         "--listen", f"127.0.0.1:{port}", "--key", f"{client_key}.pub"],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"cevpn bench server exited: {(workdir / 'cevpn.log').read_text()}"
                )
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("cevpn bench server did not listen") from None
                time.sleep(0.05)
        host_key = (state / "ssh_host_ed25519_key.pub").read_text().strip()
        yield CevpnEndpoint("127.0.0.1", port, "bench", client_key, host_key)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()


def ncclient_line(ep: Any, ops: int) -> dict[str, float]:
    """Mean seconds per get-config and per edit-config through stock ncclient."""
    from ncclient import manager

    target = getattr(ep, "target", "running")
    with manager.connect(
        host=ep.host, port=ep.port, username=ep.username, key_filename=str(ep.client_key_path),
        hostkey_verify=True, hostkey_b64=ep.host_key_pub.split()[1],
        allow_agent=False, look_for_keys=False, timeout=60,
    ) as m:  # fmt: skip
        start = time.perf_counter()
        for _ in range(ops):
            m.get_config("running")
        get = (time.perf_counter() - start) / ops
        start = time.perf_counter()
        for i in range(ops):
            m.edit_config(
                target=target,
                config=f'<config xmlns="{NC}"><bench xmlns="{CB}"><counter>{i}</counter>'
                "</bench></config>",
            )
            if target == "candidate":
                m.commit()
        edit = (time.perf_counter() - start) / ops
    return {"get": get, "edit": edit}


def table(ref: WorkloadResult, ours: WorkloadResult) -> str:
    rows = [
        f"target {ref.target}: mean per operation, ratio = netconfd time / cevpn time "
        "(above 1: cevpn faster)",
        f"{'line':<42} {'netconfd ms':>12} {'cevpn ms':>10} {'ratio':>7}",
    ]
    for theirs, mine in zip(ref.lines, ours.lines, strict=True):
        rows.append(
            f"{theirs.label:<42} {theirs.mean * 1e3:>12.3f} {mine.mean * 1e3:>10.3f} "
            f"{theirs.mean / mine.mean:>7.2f}"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", choices=("running", "candidate", "both"), default="both")
    parser.add_argument("--ops", type=int, default=1000)
    parser.add_argument("--entries", type=int, default=10_000)
    parser.add_argument("--ncclient-ops", type=int, default=50)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    targets = ["running", "candidate"] if args.target == "both" else [args.target]
    version = netconfd_version()
    summary: list[dict[str, Any]] = []

    def say(msg: str) -> None:
        print(f"  .. {msg}", file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="cevpn-bench-") as tmp:
        base = Path(tmp)
        key = base / "client"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
        for target in targets:
            ref_dir, our_dir = base / f"netconfd-{target}", base / f"cevpn-{target}"
            ref_dir.mkdir()
            our_dir.mkdir()
            with NetconfdReference(ref_dir, free_loopback_port(), target=target) as ref:  # type: ignore[arg-type]
                theirs = run_workload(
                    ref, server=f"netconfd {version}", target=target,  # type: ignore[arg-type]
                    ops=args.ops, entries=args.entries, progress=say,
                )  # fmt: skip
            with cevpn_server(our_dir, key) as ours_ep:
                ours = run_workload(
                    ours_ep, server="cevpn", target=target,  # type: ignore[arg-type]
                    ops=args.ops, entries=args.entries, progress=say,
                )  # fmt: skip
            print(table(theirs, ours), flush=True)
            print(flush=True)
            summary.append(
                {"target": target, "netconfd": theirs.summary(), "cevpn": ours.summary()}
            )
        # Through ncclient, target running, fresh servers again.
        say(f"ncclient x{args.ncclient_ops} against both")
        (base / "nc-ref").mkdir()
        (base / "nc-ours").mkdir()
        with NetconfdReference(base / "nc-ref", free_loopback_port(), target="running") as ref:
            theirs_nc = ncclient_line(ref, args.ncclient_ops)
        with cevpn_server(base / "nc-ours", key) as ours_ep:
            ours_nc = ncclient_line(ours_ep, args.ncclient_ops)
        print("through ncclient 0.7.1 (stock, 100 ms tick), target running")
        print(f"{'line':<42} {'netconfd ms':>12} {'cevpn ms':>10} {'ratio':>7}")
        for name, label in (
            ("get", "<get-config> running, small"),
            ("edit", "small <edit-config>"),
        ):
            print(
                f"{label:<42} {theirs_nc[name] * 1e3:>12.3f} {ours_nc[name] * 1e3:>10.3f} "
                f"{theirs_nc[name] / ours_nc[name]:>7.2f}"
            )
        summary.append({"ncclient": {"netconfd": theirs_nc, "cevpn": ours_nc}})
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
