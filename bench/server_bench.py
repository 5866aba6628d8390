"""VPN server at scale: provisioning a full mesh of real CE agents, then propagating one added site.

    python -m bench.server_bench [--sites 200] [--per-process 50] [--json FILE] [--profile FILE]
                                 [--profile-farms DIR] [--profile-step B]
                                 [--servers 1] [--postgresql] [--census FILE]

The server runs in this process (so its own accounting can be read: compile
time, and per CE the time spent opening SSH connections and in NETCONF
exchanges); the CE agents (``--dataplane none``) run in bench.agent_farm
processes and are enrolled with the server's enrol operation.  The sites
are first created with an explicit topology and no links (each CE holds an
empty VPN configuration), then:

A. the topology becomes full-mesh: every CE receives N-1 peers (initial
   provisioning of the mesh);
B. site N+1 is added: every CE receives one more peer, as many CEs at a
   time as the server allows (max-concurrent-provisioning, 32);
C. site N+2 is added with max-concurrent-provisioning 1: each CE's
   exchange is then timed without the others competing for the 2 cores,
   which is what a CE on its own CPU would see (agent_commit_ms_p50/p99).

``--json`` writes the metric set (see summary()) and the raw result;
``--profile`` writes a cProfile of this process (the server's event loop)
over step B (``--profile-step``), and of the quiet window before A-B beside it
(``FILE.idle.prof``), for ``python -m pstats`` (the profiler slows the
server, so a profiled run's CPU figures are not comparable with an
unprofiled one's).  ``--profile-farms DIR`` profiles every agent farm over
the same step (``DIR/<pid>.prof``, one per farm process of 50 agents).
``--census FILE`` writes the server's live objects by type after step A
(where its memory is).

``--servers K`` runs K VPN servers on one PostgreSQL database (a throw-away
cluster, lab/postgres.py): this process's and K - 1 ``cevpn-server``
processes; each provisions its share of the CEs (nc_server.ownership), a CE
counts as in-sync when what its owner recorded it confirmed is its target,
and the servers' CPU is the sum of all K.  The per-exchange figures are this
process's share.  ``--postgresql`` puts one server on PostgreSQL (the
reference for K > 1).

Reference, side by side: one CE's provisioning exchange (get-config,
discard, edit-config, confirmed commit, confirming commit) for 20 CEs one
after the other, with stock ncclient opening two SSH sessions per change
(as the server did before it kept standing sessions) and with the
server's southbound on its standing links.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from lxml import etree

from bench.agent_farm import cpu_seconds, rss_mb, start_farms, stop_farms

SVC = "urn:cevpn:yang:cevpn-service"
CE = "urn:cevpn:yang:cevpn-ce"
NC = "urn:ietf:params:xml:ns:netconf:base:1.0"


def free_ports(count: int) -> list[int]:
    import socket

    socks, ports = [], []
    for _ in range(count):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def site_xml(n: int, port: int) -> str:
    return (
        f"<site><id>s{n:03d}</id><ce-address>10.{n // 250}.{n % 250}.1</ce-address>"
        f"<management><address>127.0.0.1</address><port>{port}</port></management>"
        f"<local-prefix>172.{16 + n // 250}.{n % 250}.0/24</local-prefix></site>"
    )


class Bench:
    def __init__(
        self,
        sites: int,
        per_process: int,
        work: Path,
        profile: Path | None = None,
        *,
        profile_farms: Path | None = None,
        profile_step: str = "B",
        servers: int = 1,
        database: str | None = None,
        census: Path | None = None,
    ) -> None:
        self.sites = sites
        self.per_process = per_process
        self.work = work
        self.profile = profile
        """Where the profiled step's cProfile goes (None: not profiled)."""
        self.profile_farms = profile_farms
        """Where the farms write their profiles of that step (None: not profiled)."""
        self.profile_step = profile_step
        self.farms: list[subprocess.Popen[bytes]] = []
        self.servers = servers
        """VPN servers on the one database: this process's and servers - 1 cevpn-server
        processes (they need ``database``, a PostgreSQL URL)."""
        self.database = database
        self.census = census
        """Where to write a census of this process's heap after step A (None: none)."""
        self.others: list[subprocess.Popen[bytes]] = []
        self.observer_cpu = 0.0
        """CPU seconds this process spent as the bench, not as the server: looking at the
        records for in-sync (each look is O(sites), every 0.2 s of a step that lasts
        minutes at 1,000 sites) and the OSS client's thread.  Taken off the server's."""

    async def run(self) -> dict[str, Any]:
        from nc_core.client import Endpoint, connect
        from nc_core.server import NetconfServer, ServerOptions
        from nc_core.transport_ssh import Listener, host_key_line
        from nc_server.enrolment import new_ed25519
        from nc_server.northbound import ServiceApplication

        state = self.work / "server"
        state.mkdir(mode=0o700)
        admin = new_ed25519("bench")
        key_file = self.work / "bench_key"
        key_file.write_text(admin.private_openssh)
        key_file.chmod(0o600)
        port = free_ports(1)[0]
        app = ServiceApplication(state, database=self.database)
        server = NetconfServer(ServerOptions(state_dir=state, host="127.0.0.1", port=port), app)
        server.add_user_offline("bench", password=None, public_keys=[admin.public_line],
                                groups=["admin"])  # fmt: skip
        await server.load()
        listener = Listener(server)
        server.listener = listener
        await listener.start()
        await app.started()
        self.others = [self._start_server(k) for k in range(2, self.servers + 1)]
        if self.others:
            await asyncio.to_thread(self._wait_leases, app)
        # The full-mesh commit at 1,000 sites compiles ~10^6 peer entries: minutes, not 30 s.
        endpoint = Endpoint(
            "127.0.0.1", port, [host_key_line(state)], "bench", key_file, timeout=1800.0
        )
        oss = await asyncio.to_thread(connect, endpoint)
        ports = free_ports(self.sites + 2)
        result: dict[str, Any] = {"sites": self.sites}
        try:
            sites = "".join(site_xml(n, ports[n - 1]) for n in range(1, self.sites + 1))
            config = (
                f'<config xmlns="{NC}"><vpn-service xmlns="{SVC}"><server><endpoint>'
                f"<address>127.0.0.1</address><port>{port}</port></endpoint>"
                "<unreachable-retry-limit>2</unreachable-retry-limit></server>"
                "<vpn><id>bench</id><customer>bench</customer><keying>ikeless</keying>"
                f"<topology><type>explicit</type></topology>{sites}</vpn></vpn-service></config>"
            )
            await asyncio.to_thread(oss.edit_config, target="running", config=config)
            started = time.perf_counter()
            specs = []
            for n in range(1, self.sites + 1):
                request = etree.fromstring(
                    f'<enrol xmlns="{SVC}"><vpn>bench</vpn><site>s{n:03d}</site></enrol>'
                )
                reply = await asyncio.to_thread(oss.dispatch, request)
                from nc_server.enrolment import bundle_document_from_xml

                bundle = etree.fromstring(reply.xml.encode()).find(f".//{{{SVC}}}bundle")
                assert bundle is not None
                path = self.work / f"s{n:03d}.json"
                path.write_text(json.dumps(bundle_document_from_xml(bundle)))
                specs.append({"state_dir": str(self.work / f"ce-s{n:03d}"),
                              "port": ports[n - 1], "bundle": str(path)})  # fmt: skip
            result["enrol_per_ce_ms"] = (time.perf_counter() - started) / self.sites * 1000
            if self.profile_farms is not None:
                # Inherited by the farms: each profiles between SIGUSR1 and SIGUSR2.
                os.environ["CEVPN_FARM_PROFILE"] = str(self.profile_farms)
                os.environ["CEVPN_FARM_PROFILE_ON_SIGNAL"] = "1"
            self.farms = await asyncio.to_thread(start_farms, specs, self.per_process, self.work)
            await self._all_in_sync(app, None, 600)
            # A CE that fetched its configuration at start-up is in-sync before the push the
            # server queued for it when it logged in has run: let those end, or step A
            # would count them (and their new SSH connections).
            await app.controller.provisioner.settle()
            result["standing_links_before_full_mesh"] = app.controller.jobs.southbound.open_links()
            result["A_full_mesh"] = await self._measure(
                "A",
                app,
                oss,
                f'<config xmlns="{NC}"><vpn-service xmlns="{SVC}"><vpn><id>bench</id>'
                "<topology><type>full-mesh</type></topology></vpn></vpn-service></config>",
            )
            result["rss_after_full_mesh_mb"] = rss_mb()
            if self.census is not None:
                write_census(self.census)
            stats = app.server.stats
            opened, dropped = stats.in_sessions, stats.dropped_sessions
            (
                result["server_idle_cpu_ms_per_s"],
                result["agents_idle_cpu_ms_per_s"],
            ) = await self._idle_cpu(IDLE_WINDOW)
            # Sessions the CEs opened to this server meanwhile (fetches over a connection of
            # their own, notification sessions made again): each is an SSH handshake.
            result["idle_sessions_opened"] = stats.in_sessions - opened
            result["idle_sessions_dropped"] = stats.dropped_sessions - dropped
            result["B_add_site"] = await self._measure(
                "B",
                app,
                oss,
                f'<config xmlns="{NC}"><vpn-service xmlns="{SVC}"><vpn><id>bench</id>'
                f"{site_xml(self.sites + 1, ports[-1])}</vpn></vpn-service></config>",
            )
            result["C_one_at_a_time"] = await self._measure(
                "C",
                app,
                oss,
                f'<config xmlns="{NC}"><vpn-service xmlns="{SVC}"><server>'
                "<max-concurrent-provisioning>1</max-concurrent-provisioning></server>"
                f"<vpn><id>bench</id>{site_xml(self.sites + 2, ports[-2])}</vpn></vpn-service>"
                "</config>",
            )
            result["server_rss_mb"] = rss_mb()  # the server runs in this process
            result["servers"] = self.servers
            result["reference"] = await self._reference(app, specs[:20])
        finally:
            await asyncio.to_thread(oss.close_session)
            stop_farms(self.farms)
            for other in self.others:
                other.terminate()
            for other in self.others:
                other.wait(60)
            # Did a server lose its lease under the load (CEs then change hands mid-bench)?
            logs = [self.work / f"server-{k}.log" for k in range(2, self.servers + 1)]
            result["lease_troubles"] = sum(
                text.count("lease renewal failed")
                + text.count("is dead")
                + text.count("the event loop has not turned")
                for text in (path.read_text(errors="replace") for path in logs)
            )
            listener.close()
            await app.stopping()
            server.close()
        return result

    def _start_server(self, k: int) -> subprocess.Popen[bytes]:
        """Server number ``k`` on the database, in its own process."""
        state = self.work / f"server-{k}"
        state.mkdir(mode=0o700)
        log = (self.work / f"server-{k}.log").open("ab")
        return subprocess.Popen(
            [str(Path(sys.executable).parent / "cevpn-server"), "--state-dir", str(state),
             "--database", str(self.database), "--listen", f"127.0.0.1:{free_ports(1)[0]}",
             "--log-level", "WARNING"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip

    def _wait_leases(self, app: Any) -> None:
        """Until every server holds a lease (no CE changes hands during the bench)."""
        deadline = time.monotonic() + 60
        storage = app.controller.jobs.ownership.storage
        while time.monotonic() < deadline:
            if len(storage.query("SELECT server FROM cevpn_server_lease")) == self.servers:
                return
            for other in self.others:
                if other.poll() is not None:
                    raise RuntimeError(f"a server exited: {other.args}")
            time.sleep(0.2)
        raise RuntimeError("the servers did not all take a lease")

    def _versions(self, app: Any) -> dict[str, tuple[str | None, str | None]]:
        """Site -> (target version, version the CE confirmed) as the servers know them: this
        server's records, or on PostgreSQL (one server or more) the confirmed versions every
        owner writes to the database (one query; written in batches every
        nc_server.applied.FLUSH_DELAY, so up to that much after the CE confirmed)."""
        from nc_server.applied import APPLIED

        records = app.controller.provisioner.records
        if self.database is None:
            return {
                site: (rec.target_version, rec.applied_version if rec.status == "in-sync" else None)
                for site, rec in records.items()
            }
        confirmed = {
            site: json.loads(raw).get("version") for site, raw in app.storage.scan(APPLIED)
        }
        return {site: (rec.target_version, confirmed.get(site)) for site, rec in records.items()}

    async def _all_in_sync(self, app: Any, previous: dict[str, str] | None, timeout: float) -> None:
        """Until every CE is in-sync (with a version other than ``previous``'s).  Polled every
        0.2 s: each look at the records is ~1.5 ms of this process's CPU, which the bench
        counts as the server's (every 50 ms, that was 2 ms per CE at 200 CEs)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            began = time.thread_time()  # the look runs on the event loop's thread
            versions = self._versions(app)
            done = all(
                (v := versions.get(f"s{n:03d}")) is not None
                and v[0] is not None
                and v[0] == v[1]
                and (previous is None or v[1] != previous[f"s{n:03d}"])
                for n in range(1, self.sites + 1)
            )
            self.observer_cpu += time.thread_time() - began
            if done:
                return
            await asyncio.sleep(0.2)
        raise RuntimeError("the CEs did not all become in-sync in time")

    async def _measure(self, step: str, app: Any, oss: Any, edit: str) -> dict[str, Any]:
        import cProfile

        from nc_server.southbound import Timings

        previous = {site: str(confirmed) for site, (_, confirmed) in self._versions(app).items()}
        for n in range(1, self.sites + 1):
            app.controller.provisioner.records[f"s{n:03d}"].timings = Timings()
        app.controller.compile_seconds = 0.0
        profile = self.profile if step == self.profile_step else None
        profiler = cProfile.Profile() if profile is not None else None
        farms_profiled = self.profile_farms is not None and step == self.profile_step
        collector = CollectorTime()
        gc.callbacks.append(collector)
        self.observer_cpu = 0.0
        cpu_server, cpu_agents = self._cpu()
        if farms_profiled:
            for farm in self.farms:
                farm.send_signal(signal.SIGUSR1)
        if profiler is not None:
            profiler.enable()  # this thread: the event loop, where the server runs
        started = time.perf_counter()

        def commit() -> None:  # the OSS client, in a thread of this process
            began = time.thread_time()
            try:
                oss.edit_config(target="running", config=edit)
            finally:
                self.observer_cpu += time.thread_time() - began

        await asyncio.to_thread(commit)
        committed = time.perf_counter()
        await self._all_in_sync(app, previous, 900)
        done = time.perf_counter()
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(str(profile))
        if farms_profiled:
            for farm in self.farms:
                farm.send_signal(signal.SIGUSR2)
        cpu_server_end, cpu_agents_end = self._cpu()
        observer = self.observer_cpu
        cpu_server_end -= observer
        gc.callbacks.remove(collector)
        # The exchanges this process's server made (with several servers, its share).
        ownership = app.controller.jobs.ownership
        records = [
            app.controller.provisioner.records[f"s{n:03d}"]
            for n in range(1, self.sites + 1)
            if ownership.epoch(f"s{n:03d}") is not None
        ]
        ssh = sum(r.timings.ssh for r in records)
        netconf = sum(r.timings.netconf for r in records)
        exchanges = sorted(r.timings.netconf * 1000 for r in records)
        compile_s = app.controller.compile_seconds
        total = ssh + netconf + compile_s
        return {
            "wall_s": done - started,
            "commit_s": committed - started,
            "per_ce_ms": (ssh + netconf) / max(1, len(records)) * 1000,
            "compile_s": compile_s,
            "share_ssh": ssh / total,
            "share_netconf": netconf / total,
            "share_compile": compile_s / total,
            "ces_per_s": self.sites / (done - started),
            "server_cpu_per_ce_ms": (cpu_server_end - cpu_server) / self.sites * 1000,
            "agent_cpu_per_ce_ms": (cpu_agents_end - cpu_agents) / self.sites * 1000,
            "server_cpu_s": cpu_server_end - cpu_server,
            "observer_cpu_s": observer,
            "exchange_ms_p50": _percentile(exchanges, 50),
            "exchange_ms_p99": _percentile(exchanges, 99),
            "ssh_connections_opened": sum(r.timings.sessions for r in records),
            "gc_ms": collector.seconds * 1000,
            "gc_collections": collector.collections,
            "standing_links": app.controller.jobs.southbound.open_links(),
        }

    async def _idle_cpu(self, seconds: float) -> tuple[float, float]:
        """The servers' and the agent farms' CPU per second with no change under way (SSH
        keepalives to and from every CE, the CEs' periodic fetches and notification
        sessions, timers): what part of a step's CPU is the standing cost of holding the
        CEs, not the change."""
        import cProfile

        profiler = cProfile.Profile() if self.profile is not None else None
        before, agents_before = self._cpu()
        if profiler is not None:
            profiler.enable()
        await asyncio.sleep(seconds)
        if profiler is not None and self.profile is not None:
            profiler.disable()
            profiler.dump_stats(str(self.profile.with_suffix(".idle.prof")))
        after, agents_after = self._cpu()
        return (after - before) / seconds * 1000, (agents_after - agents_before) / seconds * 1000

    def _cpu(self) -> tuple[float, float]:
        """CPU seconds used so far by the servers (this process and the others) and by the
        agent farms."""
        servers = cpu_seconds() + sum(cpu_seconds(other.pid) for other in self.others)
        return servers, sum(cpu_seconds(farm.pid) for farm in self.farms)

    async def _reference(self, app: Any, specs: list[dict[str, Any]]) -> dict[str, float]:
        """The same provisioning exchange per CE, 20 CEs one after the other: stock ncclient
        (two new SSH sessions per change, as the server did before) against the server's
        southbound on its standing links."""
        from ncclient import manager

        from nc_server.southbound import Southbound

        edit = (
            f'<ce xmlns="{CE}"><minimum-strength xmlns:t="urn:cevpn:yang:cevpn-types">'
            "t:strength-128</minimum-strength></ce>"
        )

        def exchange(endpoint: Any) -> None:
            token = secrets.token_hex(8)
            with stock(endpoint) as m:
                m.get_config(
                    "running", filter=("subtree", f'<ce xmlns="{CE}"><peer><name/></peer></ce>')
                )
                m.discard_changes()
                m.edit_config(target="candidate", config=f'<config xmlns="{NC}">{edit}</config>')
                m.commit(confirmed=True, timeout="60", persist=token)
            with stock(endpoint) as m:
                m.commit(persist_id=token)

        def stock(endpoint: Any) -> Any:
            return manager.connect(
                host=endpoint.host, port=endpoint.port, username=endpoint.username,
                key_filename=str(endpoint.key_file), hostkey_verify=True,
                hostkey_b64=endpoint.host_keys[0].split()[1], allow_agent=False,
                look_for_keys=False, timeout=30,
            )  # fmt: skip

        def make(_: Any) -> etree._Element:
            return etree.fromstring(f'<config xmlns="{NC}">{edit}</config>')

        views = [app.controller.sites[Path(s["bundle"]).stem] for s in specs]
        endpoints = [app.controller.jobs.endpoint(view) for view in views]
        times = {}
        started = time.perf_counter()
        for endpoint in endpoints:
            await asyncio.to_thread(exchange, endpoint)
        times["stock_ncclient"] = (time.perf_counter() - started) / len(endpoints) * 1000
        southbound = Southbound()
        try:
            for view, endpoint in zip(views, endpoints, strict=True):  # links opened, untimed
                await southbound.read_ce(view.site, endpoint)
            started = time.perf_counter()
            for view, endpoint in zip(views, endpoints, strict=True):
                await southbound.push(view.site, endpoint, make, 60, needs_peer_list=True)
            times["cevpn_southbound"] = (time.perf_counter() - started) / len(endpoints) * 1000
        finally:
            await southbound.close()
        times["ratio"] = times["stock_ncclient"] / times["cevpn_southbound"]
        return times


class CollectorTime:
    """A gc callback: how long the cyclic garbage collector ran (its pauses count as the
    server's CPU, charged by a profiler to whatever allocated when one began)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.collections: dict[int, int] = {}
        self._started = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        self.seconds += time.perf_counter() - self._started
        generation = int(info["generation"])
        self.collections[generation] = self.collections.get(generation, 0) + 1


IDLE_WINDOW = 15.0
"""Seconds of quiet measured between steps A and B (half an SSH keepalive interval,
nc_core.netconf_client.KEEPALIVE_INTERVAL: the links' keepalives are spread over it, as
the links were opened at different times)."""


def _percentile(ordered: list[float], pct: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    if not ordered:
        return float("nan")
    rank = max(1, min(len(ordered), round(pct / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def write_census(path: Path, top: int = 40) -> None:
    """The live objects of this process by type, the largest total first: where the
    server's memory is, read after a full collection (``sys.getsizeof`` counts each object
    alone, not what it refers to, so the totals add up without double counting)."""
    gc.collect()
    counts: dict[str, list[int]] = {}
    for obj in gc.get_objects():
        kind = type(obj)
        entry = counts.setdefault(f"{kind.__module__}.{kind.__qualname__}", [0, 0])
        entry[0] += 1
        entry[1] += sys.getsizeof(obj)
    # Objects the collector does not track (str, bytes, numbers) are reached through
    # the tracked containers that hold them.
    untracked: dict[str, list[int]] = {}
    seen: set[int] = set()
    for obj in gc.get_objects():
        for item in gc.get_referents(obj):
            if gc.is_tracked(item) or id(item) in seen:
                continue
            seen.add(id(item))
            kind = type(item)
            entry = untracked.setdefault(f"{kind.__module__}.{kind.__qualname__}", [0, 0])
            entry[0] += 1
            entry[1] += sys.getsizeof(item)
    lines = [f"RSS {rss_mb():.0f} MB"]
    for title, table in (("tracked", counts), ("untracked, reached", untracked)):
        total = sum(size for _, size in table.values())
        lines.append(f"{title}: {total / 2**20:.0f} MB")
        for name, (count, size) in sorted(table.items(), key=lambda kv: -kv[1][1])[:top]:
            lines.append(f"  {size / 2**20:10.1f} MB {count:12,d}  {name}")
    path.write_text("\n".join(lines) + "\n")


def summary(result: dict[str, Any]) -> dict[str, Any]:
    """The issue's metric set, from the raw result.

    The server's CPU excludes what this process spent as the bench (its looks for
    in-sync, the OSS client), not the standing cost of the CEs' links
    (``server_idle_cpu_ms_per_s`` measures it apart).

    ``projected_site_add_s`` is the site add if every CE had its own CPU: the
    server's CPU time for the whole add (it is one process on one core, so
    its work is serial) plus the slowest (p99) uncontended one-peer exchange
    of a CE, measured in step C (CEs provisioned one at a time).
    """
    a, b, c = result["A_full_mesh"], result["B_add_site"], result["C_one_at_a_time"]
    return {
        "sites": result["sites"],
        "servers": result.get("servers", 1),
        "full_mesh_all_in_sync_s": a["wall_s"],
        "site_add_all_in_sync_s": b["wall_s"],
        "server_cpu_ms_per_ce_site_add": b["server_cpu_per_ce_ms"],
        "agent_cpu_ms_per_ce_site_add": b["agent_cpu_per_ce_ms"],
        "agent_commit_ms_p50": c["exchange_ms_p50"],
        "agent_commit_ms_p99": c["exchange_ms_p99"],
        "server_rss_mb": result["server_rss_mb"],
        "projected_site_add_s": b["server_cpu_s"] + c["exchange_ms_p99"] / 1000,
        "ssh_connections_opened_site_add": b["ssh_connections_opened"],
        "server_idle_cpu_ms_per_s": result["server_idle_cpu_ms_per_s"],
        "agents_idle_cpu_ms_per_s": result["agents_idle_cpu_ms_per_s"],
        "bench_observer_cpu_s_site_add": b["observer_cpu_s"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=200)
    parser.add_argument("--per-process", type=int, default=50)
    parser.add_argument("--json", type=Path, help="write the metric set and raw result here")
    parser.add_argument("--profile", type=Path, help="write a cProfile of the server here")
    parser.add_argument(
        "--profile-farms", type=Path, help="each agent farm writes its cProfile in this folder"
    )
    parser.add_argument(
        "--profile-step", choices="ABC", default="B", help="the step profiled (default B)"
    )
    parser.add_argument(
        "--servers", type=int, default=1,
        help="VPN servers on one PostgreSQL database (a throw-away cluster; 1: SQLite)",
    )  # fmt: skip
    parser.add_argument("--postgresql", action="store_true", help="PostgreSQL even with one server")
    parser.add_argument(
        "--census", type=Path, help="write a census of the server's heap after step A here"
    )
    args = parser.parse_args()
    import logging

    logging.basicConfig(level=logging.WARNING)
    for noisy in ("ncclient", "paramiko", "asyncssh", "cevpn"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    with contextlib.ExitStack() as stack:
        database = None
        if args.servers > 1 or args.postgresql:
            from lab.postgres import postgres_cluster

            database = stack.enter_context(postgres_cluster()).database("bench")
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="cevpn-server-bench-"))
        os.chmod(tmp, 0o700)
        bench = Bench(
            args.sites, args.per_process, Path(tmp), args.profile,
            profile_farms=args.profile_farms, profile_step=args.profile_step,
            servers=args.servers, database=database, census=args.census,
        )  # fmt: skip
        result = asyncio.run(bench.run())
    n = result["sites"]
    where = "SQLite" if database is None else "PostgreSQL"
    print(f"VPN server, full mesh of {n} CE agents (--dataplane none), 2 cores shared")
    print(f"  {args.servers} server(s) on one {where} database")
    print(f"  enrol: {result['enrol_per_ce_ms']:.1f} ms per CE (one session, sequential)")
    print(f"  standing links to CEs before A: {result['standing_links_before_full_mesh']}")
    print(f"  server RSS: {result['rss_after_full_mesh_mb']:.0f} MB after A, "
          f"{result['server_rss_mb']:.0f} MB at the end")  # fmt: skip
    print(f"  CPU with nothing under way: server {result['server_idle_cpu_ms_per_s']:.1f} ms/s, "
          f"agents {result['agents_idle_cpu_ms_per_s']:.1f} ms/s "
          f"({result['idle_sessions_opened']} sessions opened and "
          f"{result['idle_sessions_dropped']} dropped in {IDLE_WINDOW:.0f} s)")  # fmt: skip
    for key, title in (("A_full_mesh", f"A. initial full mesh ({n - 1} peers per CE)"),
                       ("B_add_site", "B. one site added (1 peer per CE)"),
                       ("C_one_at_a_time", "C. a site added, CEs one at a time")):  # fmt: skip
        r = result[key]
        rate = f"{r['ces_per_s']:.1f} CEs/s; commit answered in {r['commit_s']:.2f} s"
        print(f"  {title}: all {n} CEs in-sync after {r['wall_s']:.2f} s ({rate})")
        print(f"     CPU per CE: server {r['server_cpu_per_ce_ms']:.1f} ms, agent "
              f"{r['agent_cpu_per_ce_ms']:.1f} ms (2 cores for both); server's garbage "
              f"collector {r['gc_ms']:.0f} ms {r['gc_collections']}; the bench's own "
              f"{r['observer_cpu_s'] * 1000:.0f} ms taken off")  # fmt: skip
        print(f"     per CE {r['per_ce_ms']:.1f} ms in flight; shares: SSH {r['share_ssh']:.0%}, "
              f"NETCONF {r['share_netconf']:.0%}, compile {r['share_compile']:.0%} "
              f"({r['compile_s']:.2f} s)")  # fmt: skip
        print(f"     exchange per CE p50 {r['exchange_ms_p50']:.1f} ms, p99 "
              f"{r['exchange_ms_p99']:.1f} ms; SSH connections opened "
              f"{r['ssh_connections_opened']}, standing links {r['standing_links']}")  # fmt: skip
    ref = result["reference"]
    print("  reference, one CE's provisioning exchange (5 RPCs), 20 CEs sequential:")
    print(f"     stock ncclient, 2 new sessions {ref['stock_ncclient']:.1f} ms/CE; cevpn "
          f"southbound, standing links {ref['cevpn_southbound']:.1f} ms/CE: "
          f"ratio {ref['ratio']:.2f}")  # fmt: skip
    metrics = summary(result)
    print(json.dumps(metrics, indent=1))
    if args.json:
        args.json.write_text(json.dumps({**metrics, "raw": result}, indent=1) + "\n")


if __name__ == "__main__":
    main()
