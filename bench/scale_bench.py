"""The VPN server holding 10,000 sites: load, compile, <get>, audit, memory and CPU by size.

    python -m bench.scale_bench [--sites 1000,2000,5000,10000] [--agents 2000]
                                [--per-process 100] [--json FILE]

One real ``cevpn-server`` process (tests.netconf_server.ServerProcess, as an
operator starts it) and one operator session (nc_core.client, ncclient over
SSH).  The database grows to each size in turn, in VPNs of 100 full-mesh
sites (IKE keying, the model's default), no CE enrolled: the server compiles
every CE's configuration and keeps it, and provisions nothing.  At each size:

load
    the sites added since the previous size, as an operator would add them:
    ``<edit-config>`` of the candidate and ``<commit>``, ten VPNs (1,000
    sites) per commit; ``commit_s`` is the commits' share (validation,
    service rules, compile, persistence).
one-site commit
    a site added to a VPN (edit + commit), then removed again (untimed):
    what an operator's ordinary commit costs with this many sites.
get
    ``<get>`` of every site's provisioning state (the operational state the
    server exposes per site: status, versions, peer count), time as the
    client sees it and reply size.
audit
    the ``audit`` RPC over all VPNs.  It reads only enrolled CEs, so with
    none enrolled it answers an empty result: measured, as the bound of its
    bookkeeping.  The audit that reads CEs is measured with the agents.
RSS and CPU
    of the server process (/proc/PID/status VmRSS, /proc/PID/stat), after
    the step's work is done (the server's CPU time stops growing); growth
    per site is the RSS added since the previous size over the sites added.

``--agents`` sites (the first VPNs, whole) are enrolled through the
``enrol`` RPC, one commit of running each, as soon as the database holds
them (a commit costs more the larger the database: 2,000 enrolments at
10,000 sites would take over half an hour); the sizes measured after that
hold their host keys and CE accounts too.  At the largest size they become
real CE agents (``--dataplane none``, ``--per-process`` per bench.agent_farm
process).  When every one is in-sync (polled through <get>), the server
holds a standing management link to each (one SSH connection, two NETCONF
sessions: nc_server.southbound) and each agent a session to the server; the
bench reports the server's RSS and CPU, the ESTABLISHED TCP connections of
the server process (``ss``; outbound: the standing links, inbound: the
agents' and the operator's sessions), and an audit of the enrolled CEs over
the standing links.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from lxml import etree

from bench.agent_farm import cpu_seconds, rss_mb, start_farms, stop_farms
from bench.server_bench import NC, SVC, free_ports, site_xml
from tests.netconf_server import ServerProcess

T = TypeVar("T")
SITES_PER_VPN = 100
VPNS_PER_COMMIT = 10
RPC_TIMEOUT = 1800.0
"""Seconds the operator's session waits for one reply."""
SPARE_PORT = 830
"""The management port of a site that never gets an agent (never dialled: not enrolled)."""


def vpn_id(k: int) -> str:
    return f"v{k:03d}"


def vpn_xml(k: int, ports: Sequence[int]) -> str:
    """VPN k: sites k*100+1 .. k*100+100 (server_bench's site_xml), agent ports first."""
    sites = "".join(
        site_xml(n, ports[n - 1] if n <= len(ports) else SPARE_PORT)
        for n in range(k * SITES_PER_VPN + 1, (k + 1) * SITES_PER_VPN + 1)
    )
    return (
        f"<vpn><id>{vpn_id(k)}</id><customer>customer-{k}</customer>"
        f"<topology><type>full-mesh</type></topology>{sites}</vpn>"
    )


def config(inner: str) -> str:
    return f'<config xmlns="{NC}"><vpn-service xmlns="{SVC}">{inner}</vpn-service></config>'


def timed(action: Callable[[], T]) -> tuple[float, T]:
    started = time.perf_counter()
    result = action()
    return time.perf_counter() - started, result


def wait_for(what: str, condition: Callable[[], bool], timeout: float, every: float) -> bool:
    """Poll ``condition`` until true (True) or ``timeout`` (False), sleeping ``every``
    seconds or five times as long as the condition took, whichever is longer: a <get>
    of 10,000 sites' state is seconds of the server's CPU, which the polls must not eat."""
    deadline = time.monotonic() + timeout
    while True:
        started = time.monotonic()
        if condition():
            return True
        if time.monotonic() > deadline:
            logging.warning("gave up waiting for %s after %.0f s", what, timeout)
            return False
        time.sleep(max(every, 5 * (time.monotonic() - started)))


class Scale:
    def __init__(self, server: ServerProcess, oss: Any, ports: Sequence[int], work: Path) -> None:
        self.server = server
        self.oss = oss
        self.ports = ports
        self.work = work
        self.vpns = 0
        self.step = "empty"
        self.unsettled: list[str] = []

    @property
    def pid(self) -> int:
        assert self.server.proc is not None
        return self.server.proc.pid

    def settled(self) -> tuple[float, float]:
        """The server's RSS (MiB) and CPU seconds once its CPU time stops growing (the
        work a commit schedules after answering is done): less than 5% of a core over
        0.5 s, twice in a row.  If it never does within 5 minutes (it has not, in any
        run), the numbers are taken anyway and the step is listed in ``unsettled``."""
        quiet = 0
        last = cpu_seconds(self.pid)

        def idle() -> bool:
            nonlocal quiet, last
            now = cpu_seconds(self.pid)
            quiet = quiet + 1 if now - last < 0.025 else 0
            last = now
            return quiet >= 2

        if not wait_for("the server to become idle", idle, 300, 0.5):
            self.unsettled.append(self.step)
        return rss_mb(self.pid), last

    def commit(self, edit: str) -> tuple[float, float]:
        """edit-config of the candidate, then commit: (edit seconds, commit seconds)."""
        edit_s, _ = timed(lambda: self.oss.edit_config(target="candidate", config=edit))
        commit_s, _ = timed(self.oss.commit)
        return edit_s, commit_s

    def grow(self, sites: int) -> dict[str, float]:
        """Add VPNs until the database holds ``sites`` sites."""
        load = commit = 0.0
        target = sites // SITES_PER_VPN
        while self.vpns < target:
            batch = range(self.vpns, min(target, self.vpns + VPNS_PER_COMMIT))
            edit_s, commit_s = self.commit(config("".join(vpn_xml(k, self.ports) for k in batch)))
            load += edit_s + commit_s
            commit += commit_s
            self.vpns = batch[-1] + 1
        return {"load_s": load, "commit_s": commit}

    def one_site_commit(self, sites: int) -> float:
        """A site added to the first VPN (timed: edit + commit), then removed (untimed)."""
        n = sites + 1
        vpn = vpn_id(0)
        edit_s, commit_s = self.commit(config(f"<vpn><id>{vpn}</id>{site_xml(n, 830)}</vpn>"))
        self.commit(
            f'<config xmlns="{NC}" xmlns:nc="{NC}"><vpn-service xmlns="{SVC}"><vpn>'
            f'<id>{vpn}</id><site nc:operation="delete"><id>s{n:03d}</id></site></vpn>'
            "</vpn-service></config>"
        )
        return edit_s + commit_s

    def provisioning(self, vpns: Sequence[int] | None = None) -> tuple[float, int, Counter[str]]:
        """<get> of the sites' provisioning state (all VPNs, or these): seconds, reply
        bytes, and the sites by status (``peers``: the compiled peers of all of them)."""
        wanted = [f"<id>{vpn_id(k)}</id>" for k in vpns] if vpns is not None else ["<id/>"]
        selection = "".join(f"<vpn>{key}<site><id/><provisioning/></site></vpn>" for key in wanted)
        wanted_filter = ("subtree", f'<vpn-service xmlns="{SVC}">{selection}</vpn-service>')
        seconds, reply = timed(lambda: self.oss.get(filter=wanted_filter))
        text = reply.xml.encode()
        found: Counter[str] = Counter()
        for state in etree.fromstring(text).iter(f"{{{SVC}}}provisioning"):
            found[state.findtext(f"{{{SVC}}}status") or ""] += 1
            found["peers"] += int(state.findtext(f"{{{SVC}}}peer-count") or 0)
        return seconds, len(text), found

    def audit(self) -> tuple[float, Counter[str]]:
        seconds, reply = timed(
            lambda: self.oss.dispatch(etree.fromstring(f'<audit xmlns="{SVC}"/>'))
        )
        root = etree.fromstring(reply.xml.encode())
        return seconds, Counter(e.text or "" for e in root.iter(f"{{{SVC}}}outcome"))

    def connections(self) -> dict[str, int]:
        """ESTABLISHED TCP connections of the server process: outbound (its standing links
        to CE agents) and inbound (sessions of agents and operators to its port)."""
        out = subprocess.run(
            ["ss", "-tnpH", "state", "established"], capture_output=True, text=True, check=True
        ).stdout
        counts = {"outbound": 0, "inbound": 0}
        for line in out.splitlines():
            if f"pid={self.pid}," not in line:
                continue
            local = line.split()[2]
            inbound = local.rsplit(":", 1)[1] == str(self.server.port)
            counts["inbound" if inbound else "outbound"] += 1
        return counts

    def measure_size(self, sites: int) -> dict[str, Any]:
        self.step = f"{sites} sites"
        row: dict[str, Any] = {"sites": sites, **self.grow(sites)}
        row["rss_mb"], row["cpu_s"] = self.settled()
        row["one_site_commit_s"] = self.one_site_commit(sites)
        row["get_s"], row["get_bytes"], statuses = self.provisioning()
        row["compiled_peers"] = statuses.pop("peers")
        if sum(statuses.values()) != sites:
            raise RuntimeError(f"<get> reported {sum(statuses.values())} sites, not {sites}")
        row["statuses"] = dict(statuses)
        row["audit_s"], outcomes = self.audit()
        row["audit_results"] = sum(outcomes.values())
        row["rss_after_mb"], row["cpu_after_s"] = self.settled()
        return row

    def enrol(self, count: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Enrol the first ``count`` sites through the enrol RPC (each a commit of running,
        whose cost grows with the database: it is done as soon as the database holds
        them); their bundles and agent specs."""
        from nc_server.application import bundle_document_from_xml

        self.step = f"enrolling {count}"
        result: dict[str, Any] = {"agents": count, "enrolled_at_sites": self.vpns * SITES_PER_VPN}
        specs = []
        started = time.perf_counter()
        for n in range(1, count + 1):
            vpn = vpn_id((n - 1) // SITES_PER_VPN)
            request = etree.fromstring(
                f'<enrol xmlns="{SVC}"><vpn>{vpn}</vpn><site>s{n:03d}</site></enrol>'
            )
            reply = etree.fromstring(self.oss.dispatch(request).xml.encode())
            bundle = reply.find(f".//{{{SVC}}}bundle")
            assert bundle is not None
            path = self.work / f"s{n:03d}.json"
            path.write_text(json.dumps(bundle_document_from_xml(bundle)))
            specs.append({"state_dir": str(self.work / f"ce-s{n:03d}"),
                          "port": self.ports[n - 1], "bundle": str(path)})  # fmt: skip
        result["enrol_s"] = time.perf_counter() - started
        return result, specs

    def agents(
        self, result: dict[str, Any], specs: list[dict[str, Any]], per_process: int
    ) -> dict[str, Any]:
        """The enrolled sites as agents in farms, until every one is in-sync; then the
        server's memory, CPU, connections, and an audit of them."""
        count = len(specs)
        self.step = f"{count} agents"
        result["rss_enrolled_mb"], result["cpu_enrolled_s"] = self.settled()
        started = time.perf_counter()
        farms = start_farms(specs, per_process, self.work)
        try:
            result["farms_ready_s"] = time.perf_counter() - started
            vpns = range((count + SITES_PER_VPN - 1) // SITES_PER_VPN)
            polls: list[Counter[str]] = []

            def all_in_sync() -> bool:
                polls.append(self.provisioning(vpns)[2])
                return polls[-1]["in-sync"] >= count

            if not wait_for("the agents to be in-sync", all_in_sync, 3600, 5):
                raise RuntimeError(f"not all agents in-sync after an hour: {polls[-1]}")
            result["in_sync_s"] = time.perf_counter() - started
            result["rss_mb"], result["cpu_s"] = self.settled()
            result["connections"] = self.connections()
            result["audit_s"], outcomes = self.audit()
            result["audit_outcomes"] = dict(outcomes)
            result["rss_after_audit_mb"], result["cpu_after_audit_s"] = self.settled()
            result["farm_rss_mb"] = sum(rss_mb(farm.pid) for farm in farms)
            result["farm_cpu_s"] = sum(cpu_seconds(farm.pid) for farm in farms)
        finally:
            stop_farms(farms)
        return result


@contextmanager
def scale_server(work: Path, agents: int) -> Iterator[Scale]:
    """The server process, an admin key, the operator's session, the server settings."""
    from nc_core.client import Endpoint, connect
    from nc_server.enrolment import new_ed25519

    admin = new_ed25519("bench")
    key_file = work / "bench_key"
    key_file.write_text(admin.private_openssh)
    key_file.chmod(0o600)
    key_file.with_suffix(".pub").write_text(admin.public_line + "\n")
    ports = free_ports(agents + 1)
    server = ServerProcess("cevpn-server", work / "state", ports[-1])
    server.state_dir.mkdir(mode=0o700)
    server.adduser("bench", groups=("admin",), key=key_file.with_suffix(".pub"))
    server.start("--log-level", "WARNING")
    try:
        oss = connect(Endpoint("127.0.0.1", server.port, [server.host_key_line], "bench",
                               key_file, timeout=60))  # fmt: skip
        oss.timeout = RPC_TIMEOUT
        try:
            oss.edit_config(
                target="candidate",
                config=config(
                    "<server><endpoint><address>127.0.0.1</address>"
                    f"<port>{server.port}</port></endpoint></server>"
                ),
            )
            oss.commit()
            yield Scale(server, oss, ports[:agents], work)
        finally:
            oss.close_session()
    finally:
        server.stop()


def growth(rows: Sequence[dict[str, Any]], base_mb: float) -> None:
    """KB of RSS per site added since the previous size (the first: since empty)."""
    previous_sites, previous_mb = 0, base_mb
    for row in rows:
        row["growth_kb_per_site"] = (
            (row["rss_mb"] - previous_mb) * 1024 / (row["sites"] - previous_sites)
        )
        previous_sites, previous_mb = row["sites"], row["rss_mb"]


def report(result: dict[str, Any]) -> str:
    lines = [
        f"VPN server, VPNs of {SITES_PER_VPN} full-mesh sites; server process RSS and CPU "
        f"(empty: {result['empty_rss_mb']:.0f} MB, {result['empty_cpu_s']:.1f} s)",
        f"{'sites':>6} {'load s':>8} {'commit s':>9} {'1-site s':>9} {'get s':>7} "
        f"{'get MB':>7} {'audit s':>8} {'RSS MB':>8} {'CPU s':>8} {'KB/site':>8}",
    ]
    for r in result["sizes"]:
        lines.append(
            f"{r['sites']:>6} {r['load_s']:>8.1f} {r['commit_s']:>9.1f} "
            f"{r['one_site_commit_s']:>9.2f} {r['get_s']:>7.2f} {r['get_bytes'] / 1e6:>7.2f} "
            f"{r['audit_s']:>8.3f} {r['rss_mb']:>8.0f} {r['cpu_s']:>8.1f} "
            f"{r['growth_kb_per_site']:>8.1f}"
        )
    a = result.get("agents")
    if a:
        c = a["connections"]
        lines += [
            f"{a['agents']} agents (--dataplane none) at {result['sizes'][-1]['sites']} sites: "
            f"enrolled in {a['enrol_s']:.0f} s (at {a['enrolled_at_sites']} sites), "
            f"all in-sync {a['in_sync_s']:.0f} s after their start",
            f"  server RSS {a['rss_mb']:.0f} MB (enrolled, no agents: "
            f"{a['rss_enrolled_mb']:.0f} MB), CPU {a['cpu_s']:.0f} s so far",
            f"  server TCP connections ESTABLISHED: {c['outbound']} outbound (standing links), "
            f"{c['inbound']} inbound",
            f"  audit of {sum(a['audit_outcomes'].values())} CEs: {a['audit_s']:.1f} s "
            f"{a['audit_outcomes']}",
        ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", default="1000,2000,5000,10000",
                        help="sizes, comma-separated, multiples of 100")  # fmt: skip
    parser.add_argument("--agents", type=int, default=2000, help="0: no agent step")
    parser.add_argument("--per-process", type=int, default=100)
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    sizes = sorted(int(s) for s in args.sites.split(","))
    if any(s % SITES_PER_VPN for s in sizes) or args.agents > sizes[-1]:
        parser.error(f"sizes must be multiples of {SITES_PER_VPN}, agents at most the largest")
    logging.basicConfig(level=logging.WARNING)
    for noisy in ("ncclient", "paramiko", "asyncssh"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    # The server and the farms inherit it: a link and a session per agent, and more.
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    result: dict[str, Any] = {"sites_per_vpn": SITES_PER_VPN, "nofile": hard}
    with tempfile.TemporaryDirectory(prefix="cevpn-scale-bench-") as tmp:
        with scale_server(Path(tmp), args.agents) as scale:
            result["empty_rss_mb"], result["empty_cpu_s"] = scale.settled()
            result["sizes"] = []
            enrolled: tuple[dict[str, Any], list[dict[str, Any]]] | None = None
            for sites in sizes:
                result["sizes"].append(scale.measure_size(sites))
                print(json.dumps(result["sizes"][-1]), flush=True)
                if args.agents and enrolled is None and sites >= args.agents:
                    enrolled = scale.enrol(args.agents)
            growth(result["sizes"], result["empty_rss_mb"])
            if enrolled is not None:
                result["agents"] = scale.agents(*enrolled, args.per_process)
                print(json.dumps(result["agents"]), flush=True)
            result["unsettled"] = scale.unsettled
    print(report(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
