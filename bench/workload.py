"""The NETCONF benchmark workload, run over :class:`bench.thin_client.ThinNetconfClient`.

Lines (each reported as seconds per operation):

``session_open``
    connect + SSH handshake + authentication + subsystem + hello exchange,
    averaged over ``sessions`` (20) fresh sessions; close-session not timed.
``get_config_small``
    ``ops`` (1,000) ``<get-config>`` of all of running while it is small.
``edit_config_small``
    ``ops`` (1,000) ``<edit-config>`` setting ``/cb:bench/cb:counter`` to i;
    with target candidate each operation is ``<edit-config>`` + ``<commit>``.
``commit_large``
    one ``<edit-config>`` creating ``entries`` (10,000) list entries, plus its
    ``<commit>`` with target candidate, timed together.
``get_config_large``
    one ``<get-config>`` of that list (subtree filter).

The server must start empty (the reference and the cevpn server are started
fresh for each run).  Every reply is checked (``<ok/>``, no ``<rpc-error>``,
counter and entry count read back), so a server cannot win by failing fast.

Reference run::

    .venv/bin/python bench/workload.py --reference-only [--target running|candidate|both]
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Literal, Protocol, cast

if __package__ in (None, ""):  # run as `python bench/workload.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.reference_netconfd import (
    NetconfdReference,
    ReferenceServerError,
    free_loopback_port,
)
from bench.thin_client import (
    CAP_CANDIDATE,
    CAP_WRITABLE_RUNNING,
    NetconfError,
    RpcError,
    ThinNetconfClient,
    reply_has_error,
)

BENCH_NS = "urn:cevpn:yang:cevpn-bench"
EditTarget = Literal["running", "candidate"]

LINE_LABELS = {
    "session_open": "session open (connect + hello)",
    "get_config_small": "<get-config> running, small",
    "edit_config_small": "small <edit-config>",
    "commit_large": "commit of a {entries}-entry list",
    "get_config_large": "<get-config> of the {entries}-entry list",
}

_ENTRY = re.compile(rb"<(?:[A-Za-z_][\w.-]*:)?entry[\s>]")
_COUNTER = re.compile(rb"<(?:[A-Za-z_][\w.-]*:)?counter[^>]*>\s*(\d+)\s*<")


class Endpoint(Protocol):
    """What the workload needs to reach a server (NetconfdReference has it)."""

    host: str
    port: int
    username: str

    @property
    def client_key_path(self) -> Path: ...

    @property
    def host_key_pub(self) -> str: ...


@dataclass
class LineResult:
    key: str
    label: str
    samples: list[float]  # seconds, one per operation
    note: str = ""

    @property
    def ops(self) -> int:
        return len(self.samples)

    @property
    def total(self) -> float:
        return sum(self.samples)

    @property
    def mean(self) -> float:
        return self.total / len(self.samples)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def p95(self) -> float:
        if len(self.samples) < 20:
            return max(self.samples)
        return statistics.quantiles(self.samples, n=20, method="inclusive")[-1]

    @property
    def ops_per_s(self) -> float:
        return len(self.samples) / self.total

    def summary(self) -> dict[str, object]:
        return {
            "key": self.key,
            "label": self.label,
            "ops": self.ops,
            "mean_s": self.mean,
            "median_s": self.median,
            "p95_s": self.p95,
            "ops_per_s": self.ops_per_s,
            "note": self.note,
        }


@dataclass
class WorkloadResult:
    server: str
    target: EditTarget
    framing: str
    lines: list[LineResult] = field(default_factory=list)

    def line(self, key: str) -> LineResult:
        for ln in self.lines:
            if ln.key == key:
                return ln
        raise KeyError(key)

    def summary(self) -> dict[str, object]:
        d = {k: v for k, v in asdict(self).items() if k != "lines"}
        d["lines"] = [ln.summary() for ln in self.lines]
        return d


# ------------------------------------------------------------------ requests


def connect(ep: Endpoint, timeout: float = 60.0) -> ThinNetconfClient:
    return ThinNetconfClient.connect(
        ep.host, ep.port, ep.username, ep.client_key_path, ep.host_key_pub, timeout=timeout
    )


def choose_target(nc: ThinNetconfClient, wanted: EditTarget | Literal["auto"]) -> EditTarget:
    """The edit target to use: ``wanted`` if the server supports it; with
    "auto", running if writable, else candidate."""
    has_running = CAP_WRITABLE_RUNNING in nc.server_capabilities
    has_candidate = CAP_CANDIDATE in nc.server_capabilities
    if wanted == "auto":
        if has_running:
            return "running"
        if has_candidate:
            return "candidate"
        raise NetconfError("server supports neither :writable-running nor :candidate")
    if (wanted == "running" and not has_running) or (wanted == "candidate" and not has_candidate):
        raise NetconfError(f"server does not support edit target {wanted}")
    return wanted


def get_config_running(filter_xml: str = "") -> str:
    flt = f'<filter type="subtree">{filter_xml}</filter>' if filter_xml else ""
    return f"<get-config><source><running/></source>{flt}</get-config>"


def edit_config(target: EditTarget, config_inner: str) -> str:
    return f"<edit-config><target><{target}/></target><config>{config_inner}</config></edit-config>"


def counter_config(i: int) -> str:
    return f'<bench xmlns="{BENCH_NS}"><counter>{i}</counter></bench>'


def entries_config(n: int) -> str:
    parts = [f'<bench xmlns="{BENCH_NS}">']
    parts.extend(
        f"<entry><name>e{i:06d}</name><value>{i}</value><note>note {i}</note></entry>"
        for i in range(n)
    )
    parts.append("</bench>")
    return "".join(parts)


def _edit(nc: ThinNetconfClient, target: EditTarget, body: str, timeout: float | None) -> None:
    nc.rpc_ok(body, timeout=timeout)
    if target == "candidate":
        nc.rpc_ok("<commit/>", timeout=timeout)


def _timed(n: int, op: Callable[[int], object]) -> list[float]:
    samples: list[float] = []
    clock = time.perf_counter
    for i in range(n):
        t0 = clock()
        op(i)
        samples.append(clock() - t0)
    return samples


# --------------------------------------------------------------------- lines


def time_session_open(ep: Endpoint, sessions: int = 20) -> LineResult:
    samples: list[float] = []
    for _ in range(sessions):
        t0 = time.perf_counter()
        nc = connect(ep)
        samples.append(time.perf_counter() - t0)
        nc.close()
    return LineResult("session_open", LINE_LABELS["session_open"], samples)


def time_get_config_small(nc: ThinNetconfClient, ops: int = 1000, warmup: int = 10) -> LineResult:
    body = get_config_running()
    for _ in range(warmup):
        nc.rpc_data(body)
    samples = _timed(ops, lambda _i: nc.rpc_data(body))
    return LineResult("get_config_small", LINE_LABELS["get_config_small"], samples)


def time_edit_config_small(
    nc: ThinNetconfClient, target: EditTarget, ops: int = 1000, warmup: int = 10
) -> LineResult:
    for i in range(warmup):
        _edit(nc, target, edit_config(target, counter_config(1_000_000 + i)), None)
    # Build the requests outside the timed loop.
    bodies = [edit_config(target, counter_config(i)) for i in range(ops)]
    samples = _timed(ops, lambda i: _edit(nc, target, bodies[i], None))
    got = _COUNTER.search(nc.rpc_data(get_config_running()))
    if got is None or int(got.group(1)) != ops - 1:
        raise NetconfError(f"counter reads back {got and got.group(1)!r}, expected {ops - 1}")
    note = "edit-config + commit" if target == "candidate" else "edit-config on running"
    return LineResult("edit_config_small", LINE_LABELS["edit_config_small"], samples, note)


def time_commit_large(
    nc: ThinNetconfClient, target: EditTarget, entries: int = 10_000, timeout: float = 600.0
) -> LineResult:
    body = edit_config(target, entries_config(entries))
    t0 = time.perf_counter()
    _edit(nc, target, body, timeout)
    elapsed = time.perf_counter() - t0
    note = "edit-config + commit" if target == "candidate" else "edit-config on running"
    label = LINE_LABELS["commit_large"].format(entries=f"{entries:,}")
    return LineResult("commit_large", label, [elapsed], note)


def time_get_config_large(
    nc: ThinNetconfClient, entries: int = 10_000, timeout: float = 600.0
) -> LineResult:
    body = get_config_running(f'<bench xmlns="{BENCH_NS}"><entry/></bench>')
    t0 = time.perf_counter()
    reply = nc.rpc(body, timeout=timeout)
    elapsed = time.perf_counter() - t0
    if reply_has_error(reply):  # checked outside the timing: 1 MB to scan
        raise RpcError(reply)
    found = len(_ENTRY.findall(reply))
    if found != entries:
        raise NetconfError(f"get-config returned {found} entries, expected {entries}")
    label = LINE_LABELS["get_config_large"].format(entries=f"{entries:,}")
    return LineResult("get_config_large", label, [elapsed], f"{len(reply):,} bytes")


def run_workload(
    ep: Endpoint,
    *,
    server: str,
    target: EditTarget | Literal["auto"] = "auto",
    sessions: int = 20,
    ops: int = 1000,
    entries: int = 10_000,
    warmup: int = 10,
    progress: Callable[[str], None] | None = None,
) -> WorkloadResult:
    """Run every line against a freshly started, empty server."""
    say = progress or (lambda _msg: None)
    say(f"{server}: session open x{sessions}")
    opened = time_session_open(ep, sessions)
    with connect(ep) as nc:
        used = choose_target(nc, target)
        result = WorkloadResult(server=server, target=used, framing=nc.framing)
        result.lines.append(opened)
        say(f"{server}: get-config x{ops}")
        result.lines.append(time_get_config_small(nc, ops, warmup))
        say(f"{server}: edit-config x{ops} (target {used})")
        result.lines.append(time_edit_config_small(nc, used, ops, warmup))
        say(f"{server}: edit-config of {entries} entries (target {used})")
        result.lines.append(time_commit_large(nc, used, entries))
        say(f"{server}: get-config of {entries} entries")
        result.lines.append(time_get_config_large(nc, entries))
    return result


# --------------------------------------------------------------------- output


def format_table(result: WorkloadResult) -> str:
    head = f"{result.server}: target {result.target}, {result.framing} framing"
    rows = [
        head,
        f"{'line':<42} {'ops':>6} {'mean ms':>10} {'p50 ms':>9} {'p95 ms':>9} {'ops/s':>9}  note",
    ]
    for ln in result.lines:
        rows.append(
            f"{ln.label:<42} {ln.ops:>6} {ln.mean * 1e3:>10.3f} {ln.median * 1e3:>9.3f} "
            f"{ln.p95 * 1e3:>9.3f} {ln.ops_per_s:>9.1f}  {ln.note}"
        )
    return "\n".join(rows)


def netconfd_version() -> str:
    proc = subprocess.run(
        ["dpkg-query", "-W", "-f=${Version}", "netconfd"], capture_output=True, text=True
    )
    return proc.stdout.strip() or "?"


@dataclass
class _Args:
    reference_only: bool
    target: str
    sessions: int
    ops: int
    entries: int
    warmup: int
    port: int
    workdir: Path | None
    json: Path | None
    log_level: str


def _parse(argv: list[str] | None) -> _Args:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument(
        "--reference-only",
        action="store_true",
        help="run only against yuma123 netconfd (the cevpn server is not wired in yet)",
    )
    p.add_argument("--target", choices=["running", "candidate", "both"], default="both")
    p.add_argument("--sessions", type=int, default=20)
    p.add_argument("--ops", type=int, default=1000)
    p.add_argument("--entries", type=int, default=10_000)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--port", type=int, default=0, help="SSH port (default: a free one)")
    p.add_argument("--workdir", type=Path, help="keep server files here (default: temp dir)")
    p.add_argument("--json", type=Path, help="also write the results as JSON")
    p.add_argument("--log-level", default="warn", help="netconfd --log-level")
    return _Args(**vars(p.parse_args(argv)))


def _tail(path: Path, limit: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-limit:]
    except OSError:
        return "(none)"


def _sigterm(_signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # unwinds through the context managers


def _workdirs(base: Path | None, name: str) -> Iterator[Path]:
    if base is not None:
        d = base / name
        d.mkdir(parents=True, exist_ok=True)
        yield d
    else:
        with tempfile.TemporaryDirectory(prefix=f"cevpn-bench-{name}-") as tmp:
            yield Path(tmp)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if not args.reference_only:
        print(
            "the cevpn NETCONF server is not wired into this bench yet: run with --reference-only",
            file=sys.stderr,
        )
        return 2
    signal.signal(signal.SIGTERM, _sigterm)
    targets: list[EditTarget] = (
        ["running", "candidate"] if args.target == "both" else [cast(EditTarget, args.target)]
    )
    version = netconfd_version()
    results: list[WorkloadResult] = []
    for target in targets:
        for workdir in _workdirs(args.workdir, f"netconfd-{target}"):
            port = args.port or free_loopback_port()
            with NetconfdReference(workdir, port, target=target, log_level=args.log_level) as ref:
                try:
                    res = run_workload(
                        ref,
                        server=f"yuma123 netconfd {version}",
                        target=target,
                        sessions=args.sessions,
                        ops=args.ops,
                        entries=args.entries,
                        warmup=args.warmup,
                        progress=lambda m: print(f"  .. {m}", file=sys.stderr, flush=True),
                    )
                except (NetconfError, OSError) as exc:
                    # Show the servers' side before the workdir goes away.
                    print(f"workload failed against {ref!r}: {exc!r}", file=sys.stderr)
                    for log in (ref.netconfd_stdout, ref.netconfd_log, ref.sshd_log):
                        print(f"--- {log.name} (tail)\n{_tail(log)}", file=sys.stderr)
                    raise
            results.append(res)
            print(format_table(res), flush=True)
            print(flush=True)
    if args.json:
        args.json.write_text(json.dumps([r.summary() for r in results], indent=2) + "\n")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (NetconfError, RpcError, ReferenceServerError) as exc:
        print(f"workload failed: {exc}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted; servers stopped", file=sys.stderr)
        sys.exit(130)
