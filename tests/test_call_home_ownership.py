"""Call Home CEs (RFC 8071) with two cevpn-servers on one PostgreSQL database.

A call-home CE can be provisioned only over the connection it opens, and it
keeps the first endpoint of its bundle that answers: it is owned by the
server it called, not by its rendezvous winner, and when that server dies it
calls the next one, which then owns it.  Real servers (a on 127.0.0.2, b on
127.0.0.3, each listening for calls on one port at its own address), real
PostgreSQL, real agents (``--dataplane none``).  Each CE's own log says from
which server every change of its running came (the server's address on a
call it made; the ``--southbound-source`` on a connection a server dialled).
"""

from __future__ import annotations

import itertools
import os
import re
import signal
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import psycopg
import pytest

from nc_server.leases import owner_of
from tests.controller import SVC_NS, Agent, Controller, vpn_xml
from tests.netconf_server import ADMIN, ServerProcess, free_port
from tests.waiting import wait_for

pytestmark = pytest.mark.timeout(300)

ADDRESSES = {"a": "127.0.0.2", "b": "127.0.0.3"}
COMMIT_LINE = re.compile(
    r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) .*running changed \(\w[\w-]*\) by cevpn-server "
    r"\(session \d+ from ([\d.]+)\)"
)


def lease_names(url: str) -> list[str]:
    with psycopg.connect(url) as conn:
        return sorted(str(r[0]) for r in conn.execute("SELECT server FROM cevpn_server_lease"))


def owners(url: str) -> dict[str, str]:
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT site, server FROM cevpn_ce_owner").fetchall()
    return {str(s): str(o) for s, o in rows}


def name_of(server: ServerProcess, url: str) -> str:
    assert server.proc is not None
    (name,) = [n for n in lease_names(url) if f"(pid {server.proc.pid})" in n]
    return name


def commits(tmp: Path, site: str) -> list[tuple[datetime, str]]:
    """(when, which server) of each change of the CE's running by a server, in order."""
    out = []
    for line in (tmp / f"{site}.log").read_text(errors="replace").splitlines():
        m = COMMIT_LINE.match(line)
        if m:
            server = next(k for k, v in ADDRESSES.items() if v == m.group(2))
            out.append((datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f"), server))
    return out


def runs(tmp: Path, site: str) -> list[str]:
    """The servers that changed the CE, one entry per unbroken run; asserts no server came
    back after another started and that runs do not overlap."""
    out: list[tuple[str, datetime, datetime]] = []
    for when, server in commits(tmp, site):
        if out and out[-1][0] == server:
            out[-1] = (server, out[-1][1], when)
        else:
            out.append((server, when, when))
    servers = [r[0] for r in out]
    assert len(servers) == len(set(servers)), f"{site}: servers interleaved: {servers}"
    for before, after in itertools.pairwise(out):
        assert before[2] < after[1], f"{site}: {before} overlaps {after}"
    return servers


def provisioning(ctl: Controller, server: ServerProcess) -> dict[str, dict[str, str]]:
    saved, ctl.server = ctl.server, server
    try:
        return ctl.provisioning()
    finally:
        ctl.server = saved


def add_site(ctl: Controller, site: str, n: int, *, call_home: bool) -> int:
    port = free_port()
    connection = "<connection>call-home</connection>" if call_home else ""
    ctl.edit(
        f'<vpn-service xmlns="{SVC_NS}"><vpn><id>jade</id><site><id>{site}</id>'
        f"<ce-address>192.0.2.{n}</ce-address><management><address>127.0.0.1</address>"
        f"<port>{port}</port>{connection}</management>"
        f"<local-prefix>10.{n}.0.0/24</local-prefix></site></vpn></vpn-service>"
    )
    return port


def in_sync_on(
    ctl: Controller, server: ServerProcess, url: str, sites: dict[str, str], timeout: float
) -> None:
    """Each site owned by the server named, in-sync there, and its CE running that
    server's target version."""
    problems: list[str] = []

    def check() -> bool:
        problems.clear()
        now = owners(url)
        view = provisioning(ctl, server)
        for site, owner in sites.items():
            record = view.get(site, {})
            running = ctl.agents[site].running_ce()["version"]
            if (
                now.get(site) != owner
                or record.get("status") != "in-sync"
                or running != record.get("target-version")
            ):
                problems.append(f"{site}: owner {now.get(site)}, {record}, CE runs {running}")
        return not problems

    try:
        wait_for(check, timeout, "the CEs in-sync on their owners", step=0.2)
    except AssertionError:
        raise AssertionError(f"not in-sync on their owners: {problems}") from None


@pytest.fixture
def servers(tmp_path: Path, postgres_url: str) -> Iterator[dict[str, ServerProcess]]:
    started: dict[str, ServerProcess] = {}
    try:
        for key, address in ADDRESSES.items():
            server = ServerProcess(
                "cevpn-server", tmp_path / key, free_port(), host=address, database=postgres_url
            )
            if key == "a":
                server.adduser(ADMIN[0], ADMIN[1], ("admin",))
            server.start("--southbound-source", address)
            started[key] = server
        yield started
    finally:
        for server in started.values():
            server.stop()


@pytest.mark.parametrize("death", ["kill", "freeze"])
def test_a_call_home_ce_is_owned_by_the_server_it_calls_and_follows_its_calls_when_it_dies(
    tmp_path: Path, postgres_url: str, servers: dict[str, ServerProcess], death: str
) -> None:
    """``kill``: kill -9 of a, the CEs see their connections reset.  ``freeze``: SIGSTOP of
    a, as a host that vanished: the connections stay open, and the CEs notice by their SSH
    keepalives (15 s) that nobody answers, then call b (after a's port, which still takes
    the TCP connection, times out the handshake)."""
    a, b = servers["a"], servers["b"]
    ctl = Controller(tmp_path, a)
    try:
        call_home_port = free_port()
        endpoints = "".join(
            f"<endpoint><address>{s.host}</address><port>{s.port}</port></endpoint>" for s in (a, b)
        )
        ctl.edit(
            f'<vpn-service xmlns="{SVC_NS}"><server>{endpoints}'
            f"<call-home><port>{call_home_port}</port></call-home>"
            "<confirm-timeout>4</confirm-timeout><unreachable-retry-limit>2"
            "</unreachable-retry-limit><ce-orphan-after>2</ce-orphan-after>"
            "</server></vpn-service>"
        )
        ctl.edit(vpn_xml("jade"))
        wait_for(lambda: len(lease_names(postgres_url)) == 2, 20, "two leases")
        name_a, name_b = name_of(a, postgres_url), name_of(b, postgres_url)
        # Sites whose rendezvous winner is b: by that rule, a would never own them.
        for_b = (
            f"c{n}" for n in itertools.count() if owner_of(f"c{n}", [name_a, name_b]) == name_b
        )
        calling = [next(for_b) for _ in range(2)]
        dialled = [f"d{n}" for n in range(1, 4)]
        agents: dict[str, Agent] = {}
        for n, site in enumerate(calling + dialled, start=1):
            port = add_site(ctl, site, n, call_home=site in calling)
            agents[site] = ctl.enrol("jade", site, port)
        for agent in agents.values():
            agent.start()
        # Every bundle of a call-home site lists a's call-home endpoint first: its CE calls a,
        # and a owns it; the dialled CEs keep their rendezvous owners.
        expected = {site: name_a for site in calling}
        expected |= {site: owner_of(site, [name_a, name_b]) or "" for site in dialled}
        in_sync_on(ctl, a, postgres_url, {s: o for s, o in expected.items() if o == name_a}, 90)
        in_sync_on(ctl, b, postgres_url, {s: o for s, o in expected.items() if o == name_b}, 90)
        for site in calling:
            assert provisioning(ctl, a)[site].get("called-from")
            assert runs(tmp_path, site) in ([], ["a"])
        # a dies; a change is made afterwards, through b.
        assert a.proc is not None
        os.killpg(a.proc.pid, signal.SIGKILL if death == "kill" else signal.SIGSTOP)
        killed = time.monotonic()
        if death == "kill":
            a.proc.wait(10)
            a.proc = None
        before = {site: agents[site].running_ce()["peers"] for site in agents}
        ctl.server = b
        add_site(ctl, "extra", 9, call_home=False)  # never enrolled: a new peer of every CE
        # The call-home CEs call b (a's endpoint refuses), b owns them and pushes the change.
        wait_for(
            lambda: all(owners(postgres_url).get(s) == name_b for s in agents),
            20,
            "every CE owned by b",
            step=0.05,
        )
        takeover = time.monotonic() - killed
        in_sync_on(ctl, b, postgres_url, dict.fromkeys(agents, name_b), 90)
        in_sync = time.monotonic() - killed
        print(f"{death} of a: takeover {takeover:.2f} s, all in-sync {in_sync:.2f} s after it")
        assert takeover < 10.0
        for site, agent in agents.items():
            assert agent.running_ce()["peers"] == sorted([*before[site], "extra"]), site
        for site in calling:
            assert provisioning(ctl, b)[site].get("called-from")
            log = (tmp_path / f"{site}.log").read_text(errors="replace")
            assert f"call-home connection to {b.host} port {call_home_port} open" in log
            assert runs(tmp_path, site)[-1] == "b"
        for site in dialled:
            runs(tmp_path, site)
    finally:
        for agent in ctl.agents.values():
            agent.stop()
        if a.proc is not None:
            os.killpg(a.proc.pid, signal.SIGKILL)
            a.proc.wait(10)
            a.proc = None
