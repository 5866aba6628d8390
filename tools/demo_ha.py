"""`make demo-ha`: no single VPN server and no single database is a single point of failure.

    python tools/demo_ha.py [--sites N] [--work DIR] [--no-promotion]

On this machine, without the User-Mode Linux lab: a PostgreSQL primary with a
synchronous streaming-replication standby (lab/postgres.py, Debian's binaries),
two cevpn-servers A and B on it (one multi-host URL with
``target_session_attrs=read-write``), and N CE agents without a data plane
(``--dataplane none``, in bench/agent_farm.py processes).  An operator creates a
VPN and its sites over NETCONF (ncclient) on A; A is killed (kill -9) while the
CEs are being provisioned and B finishes the job; an operator adds a site on B;
during a stream of operator commits on B the primary database is killed
(kill -9 of all its processes) and the standby promoted; B reconnects by
itself; every acknowledged commit is in B's running and in the database, every
CE is in-sync (as B reports it and as each CE's own datastore holds it); A is
restarted and follows.

Each step is printed as it happens with a check line (✓ or ✗); the exit status
is 1 if any check failed (2 if PostgreSQL cannot run here).  Every process the
demo started is stopped on the way out, also after a failure or Ctrl-C.
``--no-promotion`` kills the primary and never promotes the standby: B cannot
reconnect, and the demo must say so and fail (its test uses that).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import psycopg  # noqa: E402
from lxml import etree  # noqa: E402
from ncclient import manager  # noqa: E402
from ncclient.operations.rpc import RPCError  # noqa: E402

from bench.agent_farm import start_farms, stop_farms  # noqa: E402
from lab.postgres import (  # noqa: E402
    PostgresUnavailable,
    ReplicatedPostgres,
    free_port,
    replicated_cluster,
)
from lab.waiting import wait_until  # noqa: E402

BIN = Path(sys.executable).parent
SVC = "urn:cevpn:yang:cevpn-service"
CE = "urn:cevpn:yang:cevpn-ce"
NC = "urn:ietf:params:xml:ns:netconf:base:1.0"
NS = {"s": SVC}
VPN = "acme"
ADMIN = ("noc", "noc-demo-password")  # a throw-away account of a throw-away database
T0 = time.monotonic()
SERVER_PIDS: dict[int, str] = {}
"""Each server process the demo started, by pid: its name (A, B) in the owner leaves shown."""


# -- presentation ----------------------------------------------------------------------


class Abort(Exception):
    """A check failed that the following steps depend on."""


@dataclass
class Report:
    failures: list[str] = field(default_factory=list)

    def step(self, title: str) -> None:
        print(f"\n[{time.monotonic() - T0:6.1f}s] == {title}", flush=True)

    def say(self, text: str) -> None:
        print(f"          {text}", flush=True)

    def check(self, what: str, ok: bool, detail: str = "", *, fatal: bool = False) -> bool:
        mark = "✓" if ok else "✗"
        print(f"          {mark} {what}" + (f"  ({detail})" if detail else ""), flush=True)
        if not ok:
            self.failures.append(what)
            if fatal:
                raise Abort(what)
        return ok


# -- the actors: servers, operators, CEs -------------------------------------------------


@dataclass
class Server:
    name: str
    state_dir: Path
    database: str
    host: str
    """Each server its own address: CEs' bundles list endpoints by address."""
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def log(self) -> Path:
        return self.state_dir.parent / f"server-{self.name}.log"

    def cli(self, *args: str) -> None:
        subprocess.run(
            [str(BIN / "cevpn-server"), *args[:1], "--state-dir", str(self.state_dir),
             "--database", self.database, *args[1:]],
            check=True, capture_output=True,
        )  # fmt: skip

    def start(self) -> None:
        self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [str(BIN / "cevpn-server"), "--state-dir", str(self.state_dir),
                 "--listen", f"{self.host}:{self.port}", "--database", self.database],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        SERVER_PIDS[self.proc.pid] = self.name
        if wait_until(self.listening, 30, 0.05) is None:
            raise Abort(f"server {self.name} did not listen (see {self.log})")

    def listening(self) -> bool:
        import socket

        if self.proc is None or self.proc.poll() is not None:
            raise Abort(f"server {self.name} exited (see {self.log})")
        with contextlib.suppress(OSError), socket.create_connection((self.host, self.port), 1):
            return True
        return False

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(15)
        self.proc = None

    def host_key_b64(self) -> str:
        return (self.state_dir / "ssh_host_ed25519_key.pub").read_text().split()[1]

    def connect(self) -> Any:
        return manager.connect(
            host=self.host, port=self.port, username=ADMIN[0], password=ADMIN[1],
            hostkey_verify=True, hostkey_b64=self.host_key_b64(),
            allow_agent=False, look_for_keys=False, timeout=30,
        )  # fmt: skip


IDENTITY_FILES = ("ssh_host_ed25519_key", "southbound_ed25519_key")


def same_identity(first: Server, other: Server) -> bool:
    """Do both servers hold the same host key and southbound key?  CEs pin one server host
    key (their bundle's) and authorise one southbound key: the first server on a database
    stores both there, and every other takes them at start-up (nc_server.identity)."""
    return all(
        (first.state_dir / name).read_bytes() == (other.state_dir / name).read_bytes()
        for name in IDENTITY_FILES
    )


def config(body: str) -> str:
    return f'<config xmlns="{NC}"><vpn-service xmlns="{SVC}">{body}</vpn-service></config>'


def site_id(n: int) -> str:
    return f"s{n:02d}"


def site_xml(n: int, port: int) -> str:
    return (
        f"<site><id>{site_id(n)}</id><ce-address>192.0.2.{n}</ce-address>"
        f"<management><address>127.0.0.1</address><port>{port}</port></management>"
        f"<local-prefix>10.{n}.0.0/24</local-prefix></site>"
    )


def provisioning(m: Any) -> dict[str, dict[str, str]]:
    """Each site's provisioning leaves, as a server reports them."""
    data = m.get(filter=("subtree", f'<vpn-service xmlns="{SVC}"/>')).data_ele
    out: dict[str, dict[str, str]] = {}
    for site in data.iter(f"{{{SVC}}}site"):
        prov = site.find(f"{{{SVC}}}provisioning")
        if prov is not None:
            out[site.findtext(f"{{{SVC}}}id") or ""] = {
                etree.QName(c).localname: c.text or "" for c in prov
            }
    return out


def owner_name(leaves: dict[str, str]) -> str | None:
    """ "A" or "B": which of this demo's servers the owner leaf names."""
    found = re.search(r"\(pid (\d+)", leaves.get("owner", ""))
    return None if found is None else SERVER_PIDS.get(int(found.group(1)))


def as_owners_report(
    on_a: dict[str, dict[str, str]], on_b: dict[str, dict[str, str]]
) -> dict[str, dict[str, str]]:
    """Each site's provisioning leaves as the server provisioning it reports them."""
    return {
        site: on_b.get(site, leaves) if owner_name(leaves) == "B" else leaves
        for site, leaves in on_a.items()
    }


def statuses(prov: dict[str, dict[str, str]]) -> dict[str, str]:
    return {site: leaves.get("status", "") for site, leaves in prov.items()}


def in_sync(prov: dict[str, dict[str, str]]) -> list[str]:
    return sorted(site for site, status in statuses(prov).items() if status == "in-sync")


def owners(prov: dict[str, dict[str, str]]) -> str:
    """Which server provisions which CE, when servers say (the owner leaf of leases)."""
    by: dict[str, list[str]] = {}
    for site, leaves in sorted(prov.items()):
        if leaves.get("owner"):
            by.setdefault(leaves["owner"], []).append(site)
    if not by:
        return "every server provisions every CE (no CE ownership on this version)"

    def named(owner: str) -> str:
        for pid, name in SERVER_PIDS.items():
            owner = owner.replace(f"(pid {pid})", f"(pid {pid}, server {name})")
        return owner

    return "; ".join(f"{named(owner)}: {' '.join(sites)}" for owner, sites in sorted(by.items()))


def vpns_of(document: bytes | str) -> set[str]:
    root = etree.fromstring(document.encode() if isinstance(document, str) else document)
    return {vpn.findtext("s:id", namespaces=NS) or "" for vpn in root.iterfind(".//s:vpn", NS)}


def sites_of(document: bytes | str) -> set[str]:
    root = etree.fromstring(document.encode() if isinstance(document, str) else document)
    return {s.findtext("s:id", namespaces=NS) or "" for s in root.iterfind(".//s:vpn/s:site", NS)}


def running(m: Any) -> str:
    reply = m.get_config(source="running", filter=("subtree", f'<vpn-service xmlns="{SVC}"/>'))
    return str(reply.data_xml)


def stored_running(url: str) -> bytes:
    """Running as the database holds it (read directly, not through a server)."""
    with psycopg.connect(url, autocommit=True, connect_timeout=5) as conn:
        row = conn.execute(
            "SELECT value FROM cevpn_kv WHERE tbl = 'datastore' AND key = 'running'"
        ).fetchone()
    if row is None:
        raise Abort("the database holds no running configuration")
    return bytes(row[0])


def ce_peers(state_dir: Path) -> list[str]:
    """The peers a CE's own running configuration holds (read from its state directory)."""
    from nc_core.journal import stored_running as ce_running

    try:
        root = etree.fromstring(ce_running(state_dir))
    except FileNotFoundError:
        return []
    return sorted(p.findtext(f"{{{CE}}}name") or "" for p in root.iter(f"{{{CE}}}peer"))


@dataclass
class CommitStream:
    """Commits from one operator session in a thread, one new VPN each, until stopped."""

    server: Server
    acknowledged: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    last_ok: float = 0.0
    stop: threading.Event = field(default_factory=threading.Event)
    failure: BaseException | None = None
    thread: threading.Thread | None = None

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            with self.server.connect() as m:
                n = 0
                while not self.stop.is_set():
                    vpn = f"stream{n:03d}"
                    n += 1
                    try:
                        m.discard_changes()
                        m.edit_config(
                            target="candidate",
                            config=config(f"<vpn><id>{vpn}</id><customer>c{n}</customer></vpn>"),
                        )
                        m.commit()
                    except RPCError:
                        self.refused.append(vpn)
                        time.sleep(0.2)  # pacing only: the outage is waited for by the demo
                    else:
                        self.acknowledged.append(vpn)
                        self.last_ok = time.monotonic()
        except BaseException as exc:  # reported by the demo
            self.failure = exc

    def finish(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join(60)


# -- the demo ---------------------------------------------------------------------------


@dataclass
class Demo:
    work: Path
    sites: int
    promote: bool
    report: Report = field(default_factory=Report)
    servers: list[Server] = field(default_factory=list)
    farms: list[subprocess.Popen[bytes]] = field(default_factory=list)
    agents: dict[str, Path] = field(default_factory=dict)
    ports: dict[int, int] = field(default_factory=dict)

    def wait(self, what: str, check: Callable[[], Any], timeout: float) -> float | None:
        """Seconds until ``check`` held, or None after ``timeout`` (a check line says so)."""
        took = wait_until(check, timeout, 0.2)
        if took is None:
            self.report.check(what, False, f"not within {timeout:.0f} s")
        return took

    def first_to_boot(self, ops_a: Any, n_sites: int) -> tuple[list[int], list[int]]:
        """The sites whose CEs boot before A is killed, and the others: half of them,
        those A provisions first (which server provisions a CE is rendezvous hashing of
        the servers' names, pids included: it differs from run to run), so that A is
        killed in the middle of its own work."""
        wait_until(lambda: all(p.get("owner") for p in provisioning(ops_a).values()), 10, 0.05)
        prov = provisioning(ops_a)
        mine = [n for n in range(1, n_sites + 1) if owner_name(prov.get(site_id(n), {})) == "A"]
        others = [n for n in range(1, n_sites + 1) if n not in mine]
        ordered = mine + others
        half = max(1, n_sites // 2)
        return sorted(ordered[:half]), sorted(ordered[half:])

    def start_agents(self, numbers: list[int], name: str) -> None:
        specs = []
        for n in numbers:
            site = site_id(n)
            specs.append(
                {"state_dir": str(self.agents[site]), "port": self.ports[n],
                 "bundle": str(self.work / f"{site}.bundle.json")}
            )  # fmt: skip
        farm_dir = self.work / name
        farm_dir.mkdir()
        self.farms += start_farms(specs, len(specs), farm_dir)

    def enrol(self, m: Any, n: int) -> list[str]:
        """Enrol site n on the server of session ``m``: its bundle's server endpoints."""
        from nc_server.enrolment import bundle_document_from_xml

        site = site_id(n)
        request = etree.fromstring(
            f'<enrol xmlns="{SVC}"><vpn>{VPN}</vpn><site>{site}</site></enrol>'
        )
        reply = etree.fromstring(m.dispatch(request).xml.encode())
        bundle = reply.find(f".//{{{SVC}}}bundle")
        if bundle is None:
            raise Abort(f"enrol of {site} returned no bundle")
        document = bundle_document_from_xml(bundle)
        path = self.work / f"{site}.bundle.json"
        path.write_text(json.dumps(document))
        path.chmod(0o600)
        self.agents[site] = self.work / f"ce-{site}"
        endpoints = document["cevpn-ce:ce"]["pre-configuration"]["vpn-server"]["endpoint"]
        return [f"{e['address']}:{e['port']}" for e in endpoints]

    def all_ces_hold_every_peer(self) -> tuple[bool, str]:
        expected = set(self.agents)
        wrong = [s for s, d in self.agents.items() if set(ce_peers(d)) != expected - {s}]
        return not wrong, f"{len(expected) - len(wrong)}/{len(expected)} CEs" + (
            f"; not yet: {' '.join(sorted(wrong))}" if wrong else ""
        )

    def run(self, db: ReplicatedPostgres) -> None:
        r = self.report
        n_sites = self.sites

        r.step("A primary PostgreSQL and its synchronous standby")
        url = db.database("cevpn_demo")
        r.say(f"primary 127.0.0.1:{db.primary.port}, standby 127.0.0.1:{db.standby.port}")
        r.say("servers are given " + url.replace(url.split("@")[0], "postgresql://cevpn_test:***"))
        state = db.sync_state()
        r.check("the standby streams synchronously (pg_stat_replication.sync_state)",
                state == "sync", f"sync_state = {state}", fatal=True)  # fmt: skip

        r.step("Two VPN servers, A and B, on that database")
        a = Server("A", self.work / "server-a", url, "127.0.0.1")
        b = Server("B", self.work / "server-b", url, "127.0.0.2")
        self.servers += [a, b]
        pw = self.work / ".noc.pw"
        pw.write_text(ADMIN[1] + "\n")
        pw.chmod(0o600)
        a.state_dir.mkdir(mode=0o700)
        a.cli("adduser", ADMIN[0], "--password-file", str(pw), "--group", "admin")
        a.start()
        r.say(f"server A listening on {a.host}:{a.port} (pid {a.proc.pid if a.proc else '?'})")
        wait_until(lambda: all((a.state_dir / f).exists() for f in IDENTITY_FILES), 10, 0.05)
        b.start()
        r.say(f"server B listening on {b.host}:{b.port} (pid {b.proc.pid if b.proc else '?'})")
        r.check(
            "B took the service's identity from the database",
            same_identity(a, b),
            "the host key the CEs' bundles pin and the southbound key they authorise",
        )
        with a.connect(), b.connect():
            pass
        r.check("the operator account made once is accepted by both servers", True,
                "one running configuration in the database")  # fmt: skip

        r.step(f"An operator creates VPN {VPN} with {n_sites} sites on server A (ncclient)")
        ops_a = a.connect()
        self.ports = {n: free_port() for n in range(1, n_sites + 2)}
        endpoints = "".join(
            f"<endpoint><address>{s.host}</address><port>{s.port}</port></endpoint>" for s in (a, b)
        )
        ops_a.edit_config(
            target="running",
            config=config(
                f"<server>{endpoints}<confirm-timeout>5</confirm-timeout>"
                "<unreachable-retry-limit>6</unreachable-retry-limit></server>"
                f"<vpn><id>{VPN}</id><customer>acme-corp</customer>"
                "<topology><type>full-mesh</type></topology><keying>ikeless</keying>"
                "<autodiscovery>push</autodiscovery>"
                + "".join(site_xml(n, self.ports[n]) for n in range(1, n_sites + 1))
                + "</vpn>"
            ),
        )
        listed: list[str] = []
        for n in range(1, n_sites + 1):
            listed = self.enrol(ops_a, n)
        r.check(f"{n_sites} CEs enrolled on A; each bundle lists both servers' endpoints",
                listed == [f"{a.host}:{a.port}", f"{b.host}:{b.port}"],
                " ".join(listed), fatal=True)  # fmt: skip
        with b.connect() as ops_b:
            took = wait_until(lambda: len(sites_of(running(ops_b))) == n_sites, 10, 0.05)
            on_b = len(sites_of(running(ops_b)))
        lag = f", {took:.2f} s after A's reply" if took is not None else ""
        r.check("B's running holds the VPN and its sites too", took is not None,
                f"{on_b} sites on B{lag}")  # fmt: skip

        first, later = self.first_to_boot(ops_a, n_sites)
        r.step(f"The CEs of sites {site_id(first[0])}..{site_id(first[-1])} boot "
               "(agents without a data plane); provisioning starts")  # fmt: skip
        self.start_agents(first, "farm-1")
        seen_a: dict[str, dict[str, str]] = {}
        watch_b = b.connect()

        def under_way() -> bool:
            # Each server reports the CEs it provisions; the others stay pending there.
            nonlocal seen_a
            seen_a = as_owners_report(provisioning(ops_a), provisioning(watch_b))
            return bool(in_sync(seen_a))

        self.wait("provisioning under way", under_way, 60)
        with contextlib.suppress(Exception):
            watch_b.close_session()
        done = in_sync(seen_a)
        r.say("their owners report: "
              + " ".join(f"{s}={st}" for s, st in sorted(statuses(seen_a).items())))  # fmt: skip
        r.say("who provisions: " + owners(seen_a))
        r.check("mid-provisioning: some CEs in-sync, some not yet",
                0 < len(done) < n_sites, f"{len(done)}/{n_sites} in-sync", fatal=True)  # fmt: skip

        r.step("Server A is killed (kill -9) in the middle of provisioning")
        with contextlib.suppress(Exception):
            ops_a.close_session()
        pid = a.proc.pid if a.proc else 0
        a.kill(signal.SIGKILL)
        killed_at = time.monotonic()
        r.check(f"server A (pid {pid}) is gone", a.proc is None)
        r.say(f"the other CEs ({site_id(later[0])}..{site_id(later[-1])}) boot now, "
              "with A dead: they reach B, the bundle's next endpoint")  # fmt: skip
        self.start_agents(later, "farm-2")

        r.step("Server B finishes the job")
        ops_b = b.connect()
        seen: dict[str, dict[str, str]] = {}

        def all_in_sync_on(m: Any, count: int) -> Callable[[], bool]:
            def check() -> bool:
                nonlocal seen
                seen = provisioning(m)
                return len(in_sync(seen)) == count

            return check

        took = self.wait(f"all {n_sites} CEs in-sync on B", all_in_sync_on(ops_b, n_sites), 120)
        r.say("B reports: " + " ".join(f"{s}={st}" for s, st in sorted(statuses(seen).items())))
        r.say("who provisions: " + owners(seen))
        if took is not None:
            r.check(f"all {n_sites} CEs in-sync as read from B",
                    True, f"{time.monotonic() - killed_at:.1f} s after A's kill -9")  # fmt: skip
        ok, detail = self.all_ces_hold_every_peer()
        if not ok:
            wait_until(lambda: self.all_ces_hold_every_peer()[0], 30, 0.5)
            ok, detail = self.all_ces_hold_every_peer()
        r.check("each CE's own running holds every other site as a peer", ok, detail, fatal=True)

        r.step("An operator adds a site on server B")
        new = n_sites + 1
        ops_b.edit_config(
            target="candidate",
            config=config(f"<vpn><id>{VPN}</id>{site_xml(new, self.ports[new])}</vpn>"),
        )
        ops_b.commit()
        self.enrol(ops_b, new)
        r.say(f"site {site_id(new)} committed and enrolled on B; its CE boots")
        self.start_agents([new], "farm-3")
        took = self.wait(f"all {new} CEs in-sync on B", all_in_sync_on(ops_b, new), 90)
        r.check(f"all {new} CEs in-sync, {site_id(new)} included", took is not None,
                f"{took:.1f} s" if took is not None else "")  # fmt: skip
        ok = wait_until(lambda: self.all_ces_hold_every_peer()[0], 30, 0.5) is not None
        r.check("every CE learnt of the new site", ok, self.all_ces_hold_every_peer()[1])

        r.step("A stream of operator commits on B; the primary database is killed (kill -9)")
        stream = CommitStream(b)
        stream.start()
        try:
            self.wait("commits acknowledged", lambda: len(stream.acknowledged) >= 5, 60)
            before = len(stream.acknowledged)
            db.primary.kill9()
            killed_at = time.monotonic()
            r.say(f"primary killed (every process of it) after {before} acknowledged commits")
            self.wait("commits refused while no database accepts writes",
                      lambda: len(stream.refused) >= 3, 30)  # fmt: skip
            r.check("commits made while no database accepts writes are refused (rpc-error), "
                    "not acknowledged", bool(stream.refused),
                    f"{len(stream.refused)} refused, {len(stream.acknowledged) - before} "
                    "acknowledged since the kill")  # fmt: skip

            r.step("The standby is promoted (pg_ctl promote)" if self.promote else
                   "The standby is NOT promoted (--no-promotion: this run must fail)")  # fmt: skip
            if self.promote:
                db.promote()
                r.check("the standby accepts writes (pg_is_in_recovery() = false)",
                        not db.standby.in_recovery(),
                        f"{time.monotonic() - killed_at:.1f} s after the kill")  # fmt: skip
            promoted_at = time.monotonic()
            count = len(stream.acknowledged)
            took = wait_until(lambda: len(stream.acknowledged) >= count + 3, 30, 0.1)
            detail = (
                f"first one {stream.last_ok - promoted_at:.1f} s after the promotion"
                if took is not None
                else "no commit acknowledged within 30 s"
            )
            r.check(
                "B reconnected by itself: its commits are acknowledged again",
                took is not None,
                detail,
                fatal=True,
            )
        finally:
            stream.finish()
        if stream.failure is not None:
            r.check("the operator's session lasted through the failover", False,
                    repr(stream.failure))  # fmt: skip
        acked = set(stream.acknowledged)
        r.say(f"{len(acked)} commits acknowledged, {len(stream.refused)} refused")

        r.step("Every acknowledged change is there")
        held = vpns_of(running(ops_b))
        missing = sorted(acked - held)
        r.check(f"all {len(acked)} acknowledged commits in B's running", not missing,
                f"missing: {' '.join(missing)}" if missing else "")  # fmt: skip
        stored = stored_running(url)
        missing = sorted(acked - vpns_of(stored))
        r.check(f"all {len(acked)} acknowledged commits in the database (the promoted standby)",
                not missing, f"missing: {' '.join(missing)}" if missing else "")  # fmt: skip
        sites = sites_of(stored)
        r.check(f"all {new} sites in the database", len(sites) == new, f"{len(sites)} sites")
        took = self.wait(f"all {new} CEs in-sync on B", all_in_sync_on(ops_b, new), 60)
        r.check(f"every CE in-sync after the failover ({new}/{new} on B)", took is not None)
        ok, detail = self.all_ces_hold_every_peer()
        r.check("each CE's own running holds every other site as a peer", ok, detail)

        r.step("Server A is restarted and follows")
        a.start()
        r.say(
            f"server A listening again on {a.host}:{a.port} (pid {a.proc.pid if a.proc else '?'})"
        )
        with a.connect() as ops_a:
            doc = running(ops_a)
            missing = sorted(acked - vpns_of(doc))
            r.check("A's running holds every acknowledged commit and every site",
                    not missing and len(sites_of(doc)) == new,
                    f"{len(acked) - len(missing)}/{len(acked)} commits, "
                    f"{len(sites_of(doc))} sites")  # fmt: skip
            took = self.wait(f"all {new} CEs in-sync on A", all_in_sync_on(ops_a, new), 60)
            r.check(f"A reports all {new} CEs in-sync", took is not None)
            r.say("who provisions: " + owners(seen))
            ops_a.edit_config(
                target="running",
                config=config(f"<vpn><id>{VPN}</id><customer>acme-renamed</customer></vpn>"),
            )
        ok = wait_until(
            lambda: "acme-renamed" in running(ops_b), 10, 0.05
        ) is not None  # fmt: skip
        r.check("a commit on the restarted A is seen on B", ok)
        with contextlib.suppress(Exception):
            ops_b.close_session()

    def cleanup(self) -> None:
        for server in self.servers:
            with contextlib.suppress(Exception):
                server.kill(signal.SIGTERM)
        stop_farms(self.farms)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sites", type=int, default=12, help="CEs at first (default 12)")
    parser.add_argument("--work", type=Path, help="keep logs here (default: a new temporary "
                        "directory, removed after a successful run)")  # fmt: skip
    parser.add_argument("--no-promotion", action="store_true",
                        help="never promote the standby: the demo must fail")  # fmt: skip
    args = parser.parse_args()
    if args.sites < 2:
        parser.error("--sites: at least 2")
    work = args.work or Path(tempfile.mkdtemp(prefix="cevpn-demo-ha-"))
    work.mkdir(parents=True, exist_ok=True)

    def terminated(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminated)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # also when started with it ignored
    print("cevpn demo-ha: two VPN servers and a replicated PostgreSQL on this machine; "
          f"{args.sites} CEs without a data plane; work directory {work}")  # fmt: skip
    demo = Demo(work, args.sites, not args.no_promotion)
    try:
        with replicated_cluster() as db:
            try:
                demo.run(db)
            finally:
                demo.cleanup()
    except PostgresUnavailable as exc:
        print(f"cevpn demo-ha: PostgreSQL cannot run here: {exc}", file=sys.stderr)
        return 2
    except Abort as exc:
        print(f"\ncevpn demo-ha: stopped: {exc}", flush=True)
    except KeyboardInterrupt:
        print("\ncevpn demo-ha: interrupted; every process it started is stopped", flush=True)
        return 130
    except Exception as exc:  # a step that broke: a failure like a failed check
        demo.report.failures.append(repr(exc))
        print(f"\ncevpn demo-ha: a step failed: {exc!r}", flush=True)
    elapsed = time.monotonic() - T0
    failures = demo.report.failures
    if failures:
        print(f"\ncevpn demo-ha: FAILED after {elapsed:.0f} s: {len(failures)} check(s) failed "
              f"({'; '.join(failures)}); logs in {work}")  # fmt: skip
        return 1
    print(f"\ncevpn demo-ha: every check passed in {elapsed:.0f} s")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
