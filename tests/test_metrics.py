"""Prometheus metrics (nc_core.metrics, nc_server.metrics, nc_agent.metrics): real daemons
started with --metrics-listen, driven over NETCONF, scraped over HTTP, and every scrape
checked by Debian's `promtool check metrics` (names and types by Prometheus conventions).

Agents run with --dataplane none here: tunnels up, SA bytes and packets and IKE
failures of a real data plane are the lab's to check (tests/lab)."""

from __future__ import annotations

import datetime as dt
import shutil
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.controller import controller, vpn_xml
from tests.netconf_server import (
    ROOT,
    ServerProcess,
    free_port,
    ncclient_connect,
    running_server,
)
from tests.test_alarms import certificate, set_certificate
from tests.waiting import wait_for

pytestmark = pytest.mark.timeout(180)

NC = "urn:ietf:params:xml:ns:netconf:base:1.0"
SVC = "urn:cevpn:yang:cevpn-service"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        assert reply.status == 200
        assert reply.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return str(reply.read().decode())


def promtool_clean(text: str) -> None:
    """`promtool check metrics`: no error and no lint warning."""
    promtool = shutil.which("promtool")
    assert promtool, "no promtool: Debian's prometheus (packaging/debian/development.txt)"
    done = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True
    )
    assert done.returncode == 0 and not done.stdout.strip() and not done.stderr.strip(), (
        done.stdout + done.stderr
    )


def samples(text: str) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def value(found: Samples, name: str, **labels: str) -> float | None:
    return found.get((name, frozenset(labels.items())))


def checked(port: int) -> Samples:
    text = scrape(port)
    promtool_clean(text)
    return samples(text)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[ServerProcess, int]]:
    port = free_port()
    with running_server(tmp_path, "cevpn-server", "--metrics-listen", f"127.0.0.1:{port}") as srv:
        yield srv, port


def add_vpn(srv: ServerProcess) -> None:
    with ncclient_connect(srv) as m:
        m.edit_config(target="running", config=f'<config xmlns="{NC}">{vpn_xml("red")}</config>')


# -- the engine (both daemons) ---------------------------------------------------------------


def test_metrics_are_off_by_default_and_prometheus_client_is_not_even_imported() -> None:
    code = (
        "import sys, tempfile, pathlib\n"
        "from nc_core.cli_common import build_parser\n"
        "from nc_core.server import NetconfServer, ServerOptions\n"
        "args = build_parser('x', 'x').parse_args([])\n"
        "assert args.metrics_listen is None\n"
        "server = NetconfServer(ServerOptions(pathlib.Path(tempfile.mkdtemp())))\n"
        "print(server.metrics.enabled, 'prometheus_client' in sys.modules)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert done.stdout.split() == ["False", "False"]


def test_a_commit_is_counted_by_reason_and_timed(server) -> None:
    srv, port = server
    add_vpn(srv)
    found = checked(port)
    assert value(found, "cevpn_netconf_commits_total", reason="edit", outcome="ok") == 1
    assert value(found, "cevpn_netconf_commit_duration_seconds_count", reason="edit") == 1
    assert (value(found, "cevpn_netconf_commit_duration_seconds_sum", reason="edit") or 0) > 0


def test_a_commit_refused_by_validation_is_counted_failed(server) -> None:
    srv, port = server
    with ncclient_connect(srv) as m, pytest.raises(Exception, match="red"):
        m.edit_config(
            target="running",
            config=f'<config xmlns="{NC}"><vpn-service xmlns="{SVC}"><vpn><id>red</id>'
            "<customer>acme</customer><site><id>a</id><ce-address>192.0.2.1</ce-address>"
            "<local-prefix>10.1.0.0/24</local-prefix></site><site><id>b</id>"
            "<ce-address>192.0.2.2</ce-address><local-prefix>10.1.0.0/24</local-prefix>"
            "</site></vpn></vpn-service></config>",
        )
    found = checked(port)
    assert value(found, "cevpn_netconf_commits_total", reason="edit", outcome="failed") == 1
    assert value(found, "cevpn_netconf_commits_total", reason="edit", outcome="ok") is None


def test_rpcs_are_counted_by_operation_and_outcome_and_timed(server) -> None:
    srv, port = server
    with ncclient_connect(srv) as m:
        m.get_config("running")
        m.get_config("running")
        with pytest.raises(Exception):  # noqa: B017 - any rpc-error
            m.get_config("no-such-datastore")
    found = checked(port)
    assert value(found, "cevpn_netconf_rpcs_total", operation="get-config", outcome="ok") == 2
    assert value(found, "cevpn_netconf_rpcs_total", operation="get-config", outcome="error") == 1
    assert value(found, "cevpn_netconf_rpc_duration_seconds_count", operation="get-config") == 3
    bucket = value(
        found, "cevpn_netconf_rpc_duration_seconds_bucket", operation="get-config", le="+Inf"
    )
    assert bucket == 3


def test_an_operation_nobody_serves_is_one_label_value_whatever_its_name(server) -> None:
    from lxml import etree

    srv, port = server
    with ncclient_connect(srv) as m:
        for name in ("frobnicate", "defenestrate"):
            with pytest.raises(Exception):  # noqa: B017 - operation-not-supported
                m.dispatch(etree.fromstring(f'<{name} xmlns="{SVC}"/>'))
    found = checked(port)
    assert value(found, "cevpn_netconf_rpcs_total", operation="unsupported", outcome="error") == 2
    operations = {dict(labels).get("operation") for (name, labels) in found}
    assert not operations & {"frobnicate", "defenestrate"}


def test_open_sessions_are_a_gauge_and_started_sessions_a_counter(server) -> None:
    srv, port = server
    with ncclient_connect(srv):
        found = checked(port)
        assert value(found, "cevpn_netconf_sessions", transport="netconf-ssh") == 1
    wait_for(
        lambda: value(checked(port), "cevpn_netconf_sessions", transport="netconf-ssh") == 0,
        10,
        "the session closed",
    )
    assert value(checked(port), "cevpn_netconf_sessions_started_total") == 1


def test_the_endpoint_serves_get_of_metrics_only(server) -> None:
    _, port = server
    for path, method, status in (("/", "GET", 404), ("/metrics", "POST", 405)):
        request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=10)
        assert refused.value.code == status
    with socket.create_connection(("127.0.0.1", port), 10) as sock:
        sock.sendall(b"GET /" + b"x" * 20000 + b" HTTP/1.1\r\n\r\n")  # past the head limit
        assert sock.recv(100) == b""  # closed without an answer
    assert scrape(port)  # and it still serves


def test_a_metrics_port_in_use_stops_the_start_with_a_clear_message(tmp_path: Path) -> None:
    from tests.netconf_server import BIN

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [
                str(BIN / "cevpn-server"),
                "--state-dir",
                str(tmp_path / "s"),
                "--listen",
                f"127.0.0.1:{free_port()}",
                "--metrics-listen",
                f"127.0.0.1:{port}",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == 1
    assert f"cannot serve metrics on 127.0.0.1 port {port}" in done.stderr


# -- the VPN server and its agents -----------------------------------------------------------


def test_the_server_counts_ces_by_provisioning_status_and_times_each_push(tmp_path: Path) -> None:
    port = free_port()
    with controller(tmp_path, server_args=("--metrics-listen", f"127.0.0.1:{port}")) as ctl:
        ctl.edit(vpn_xml("red"))
        ctl.join("red", "red-a", 1, "10.1.0.0/24")
        ctl.join("red", "red-b", 2, "10.2.0.0/24")
        ctl.in_sync("red-a", "red-b")
        found = checked(port)
    assert value(found, "cevpn_server_ces", status="in-sync") == 2
    assert value(found, "cevpn_server_ces", status="failed") == 0
    assert value(found, "cevpn_server_sites") == 2
    assert value(found, "cevpn_server_vpns") == 1
    pushes = value(
        found, "cevpn_server_provisioning_duration_seconds_count", kind="push", outcome="in-sync"
    )
    assert pushes is not None and pushes >= 2  # each CE once at least (red-a again for red-b)
    assert value(found, "cevpn_server_southbound_links", kind="dialled") == 2
    assert value(found, "cevpn_server_southbound_links", kind="call-home") == 0


def test_an_unreachable_ce_is_counted_as_such(tmp_path: Path) -> None:
    port = free_port()
    with controller(tmp_path, server_args=("--metrics-listen", f"127.0.0.1:{port}")) as ctl:
        ctl.edit(vpn_xml("red"))
        ctl.add_site("red", "red-a", 1, "10.1.0.0/24")
        ctl.enrol("red", "red-a", free_port())  # never started

        def unreachable() -> bool:
            found = checked(port)
            return value(found, "cevpn_server_ces", status="unreachable") == 1

        wait_for(unreachable, 60, "red-a unreachable in the metrics", step=0.5)
        found = checked(port)
    failed = value(
        found,
        "cevpn_server_provisioning_duration_seconds_count",
        kind="push",
        outcome="unreachable",
    )
    assert failed is not None and failed >= 1


def test_an_agent_reports_its_peers_without_a_data_plane_and_no_ike_failure(
    tmp_path: Path,
) -> None:
    agent_port = free_port()
    with controller(tmp_path) as ctl:
        ctl.edit(vpn_xml("red"))
        agent = ctl.enrol("red", "red-a", ctl.add_site("red", "red-a", 1, "10.1.0.0/24"))
        agent.extra = ("--metrics-listen", f"127.0.0.1:{agent_port}")
        agent.start()
        # In sync first: red-b then reaches red-a in a push, a commit on the CE (red-a's
        # start-up fetch could otherwise carry it, and no commit would be counted).
        ctl.in_sync("red-a")
        ctl.join("red", "red-b", 2, "10.2.0.0/24")
        ctl.in_sync("red-a", "red-b")
        found = checked(agent_port)
    assert value(found, "cevpn_agent_tunnels", status="no-data-plane") == 1
    assert value(found, "cevpn_agent_tunnel_up", peer="red-b") == 0
    assert not [k for k in found if k[0] == "cevpn_agent_ike_failures_total" and found[k]]
    # The server's pushes are commits on the CE: candidate, commit confirmed, confirm.
    commits = value(found, "cevpn_netconf_commits_total", reason="commit", outcome="ok")
    assert commits is not None and commits >= 1


def test_an_agent_counts_its_active_alarms_by_type_and_severity(tmp_path: Path) -> None:
    port = free_port()
    extra = ("--dataplane", "none", "--metrics-listen", f"127.0.0.1:{port}")
    with running_server(tmp_path, "cevpn-agent", *extra) as agent:
        assert not [k for k in checked(port) if k[0] == "cevpn_agent_alarms"]
        now = dt.datetime.now(dt.UTC)
        with ncclient_connect(agent) as m:
            pem, key = certificate(now - dt.timedelta(days=340), now + dt.timedelta(days=3))
            set_certificate(m, pem, key)
        found = checked(port)
    assert (
        value(
            found,
            "cevpn_agent_alarms",
            type="cevpn-types:certificate-expiry",
            severity="warning",
        )
        == 1
    )


# -- the Grafana dashboard ---------------------------------------------------------------------


def exposed_names(text: str) -> tuple[set[str], set[str]]:
    """The families a scrape declares (those without samples too: a peer's SA counters
    exist only with a data plane), and every sample name they can hold."""
    families, names = set(), set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            families.add(name)
            names.add(name)
            if kind == "histogram":
                names |= {f"{name}_bucket", f"{name}_count", f"{name}_sum"}
    return families, names


def dashboard_queries() -> list[str]:
    import json

    dashboard = json.loads((ROOT / "docs" / "grafana-dashboard.json").read_text())
    queries = []
    for panel in dashboard["panels"]:
        queries += [target["expr"] for target in panel.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            queries.append(variable["definition"])
    return queries


def test_the_grafana_dashboard_asks_only_for_metrics_the_daemons_serve(tmp_path: Path) -> None:
    import re

    families, names = set(), set()
    for command, extra in (("cevpn-server", ()), ("cevpn-agent", ("--dataplane", "none"))):
        port = free_port()
        where = tmp_path / command
        where.mkdir()
        with running_server(where, command, *extra, "--metrics-listen", f"127.0.0.1:{port}"):
            declared, samples = exposed_names(scrape(port))
        families |= declared
        names |= samples
    asked = {n for query in dashboard_queries() for n in re.findall(r"\bcevpn_[a-z_]+", query)}
    assert asked and asked <= names, asked - names
    unseen = {f for f in families if not any(n == f or n.startswith(f + "_") for n in asked)}
    assert not unseen, f"metrics the dashboard does not show: {unseen}"


def test_the_grafana_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """promtool parses each query as a recording rule (Grafana's variables replaced)."""
    import json

    rules = [
        {
            "record": f"cevpn:dashboard_query_{i}",
            "expr": query.replace("$__rate_interval", "5m")
            .replace("$server_job", "cevpn-server")
            .replace("$agent_job", "cevpn-agent"),
        }
        for i, query in enumerate(dashboard_queries())
        if not query.startswith("label_values(")  # Grafana's own function
    ]
    path = tmp_path / "rules.yml"
    path.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))
    promtool = shutil.which("promtool")
    assert promtool
    done = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


# -- the agent's kernel-backed metrics agree with its <get> ------------------------------------


def test_an_agents_tunnel_and_sa_metrics_say_what_its_get_says(tmp_path: Path) -> None:
    """Not a substitute for the lab (no kernel here): the same kernel observation read by
    <get> and by the collector gives the same statuses and counters."""
    import asyncio
    from collections import Counter
    from types import SimpleNamespace

    from lxml import etree

    from nc_agent.application import AgentApplication
    from nc_agent.dataplane.links import Existing, Tunnel
    from nc_agent.dataplane.xfrm import SA, SAState
    from nc_agent.desired import Desired, PeerObjects
    from nc_agent.ike.health import TunnelHealth
    from nc_agent.ike.retry import RetryPolicy
    from nc_agent.kernel import Observed
    from nc_agent.metrics import AgentMetrics
    from nc_core.metrics import CallbackCollector

    me = "192.0.2.1"

    def sa(src: str, dst: str, spi: int, reqid: int) -> SA:
        return SA(src, dst, spi, reqid, "transport")

    def state(src: str, dst: str, spi: int, reqid: int, octets: int, packets: int) -> SAState:
        return SAState(src, dst, spi, reqid, "transport", None, octets, packets,
                       1, 0, 2, 1_700_000_000, 0, 1024, False)  # fmt: skip

    def tunnel(name: str, remote: str) -> Tunnel:
        return Tunnel(name, "transport-ipip", me, remote, 1400)

    def device(name: str, remote: str) -> Existing:
        return Existing(name, "ipip", me, remote, 1400, 0, True, ())

    peers = {
        "up": PeerObjects("up", 11, tunnel("t-up", "192.0.2.2"),
                          sa(me, "192.0.2.2", 0x101, 11), sa("192.0.2.2", me, 0x201, 11)),
        "half": PeerObjects("half", 12, tunnel("t-half", "192.0.2.3"),
                            sa(me, "192.0.2.3", 0x102, 12), sa("192.0.2.3", me, 0x202, 12)),
        "ike": PeerObjects("ike", 13, tunnel("t-ike", "192.0.2.4"),
                           ike=SimpleNamespace(permanent=True)),  # type: ignore[arg-type]
    }  # fmt: skip
    observed = Observed()
    for s in (
        state(me, "192.0.2.2", 0x101, 11, 5000, 50),
        state("192.0.2.2", me, 0x201, 11, 7000, 70),
        state(me, "192.0.2.3", 0x102, 12, 100, 1),  # its inbound SA is gone: down
        state(me, "192.0.2.4", 0x103, 13, 300, 3),  # IKE: two SAs each way after a rekey
        state(me, "192.0.2.4", 0x104, 13, 400, 4),
        state("192.0.2.4", me, 0x203, 13, 600, 6),
        state("192.0.2.4", me, 0x204, 13, 800, 8),
    ):
        observed.sas[s.key] = s
    for name, remote in (("t-up", "192.0.2.2"), ("t-half", "192.0.2.3"), ("t-ike", "192.0.2.4")):
        observed.tunnels[name] = device(name, remote)

    app = AgentApplication(tmp_path, "vpn", dataplane="kernel")
    app.kernel = SimpleNamespace(observe=lambda: observed)  # type: ignore[assignment]
    health = TunnelHealth(True, RetryPolicy())
    health.status = "up"
    app.ike = SimpleNamespace(  # type: ignore[assignment]
        health={"ike": health}, failures_total=Counter({"ike": 3})
    )
    app.current = Desired(sp_address=me, peers=peers)
    collector = AgentMetrics(app)

    async def both() -> tuple[list[etree._Element], str]:
        from prometheus_client import CollectorRegistry
        from prometheus_client.exposition import generate_latest

        got = await app.operational(None)
        await collector.refresh()
        registry = CollectorRegistry()
        registry.register(CallbackCollector(collector.collect))
        return got, generate_latest(registry).decode()

    got, text = asyncio.run(both())
    promtool_clean(text)
    found = samples(text)
    ce = "{urn:cevpn:yang:cevpn-ce}"
    assert len(got[0].findall(f"{ce}peer")) == 3
    for peer in got[0].iterfind(f"{ce}peer"):
        name = peer.findtext(f"{ce}name") or ""
        status = peer.findtext(f"{ce}state/{ce}status")
        assert value(found, "cevpn_agent_tunnel_up", peer=name) == (status == "up"), name
        if status != "up":
            continue
        for leaf, metric, direction in (
            ("in-octets", "cevpn_agent_sa_bytes_total", "in"),
            ("out-octets", "cevpn_agent_sa_bytes_total", "out"),
            ("in-packets", "cevpn_agent_sa_packets_total", "in"),
            ("out-packets", "cevpn_agent_sa_packets_total", "out"),
        ):
            expected = float(peer.findtext(f"{ce}state/{ce}{leaf}") or "nan")
            assert value(found, metric, peer=name, direction=direction) == expected, (name, leaf)
        errors = float(peer.findtext(f"{ce}state/{ce}in-errors") or "nan")
        assert value(found, "cevpn_agent_sa_errors_total", peer=name) == errors
    assert value(found, "cevpn_agent_tunnel_up", peer="half") == 0
    assert value(found, "cevpn_agent_sa_bytes_total", peer="ike", direction="in") == 1400
    assert value(found, "cevpn_agent_tunnels", status="up") == 2
    assert value(found, "cevpn_agent_tunnels", status="down") == 1
    assert value(found, "cevpn_agent_ike_failures_total", peer="ike") == 3


def test_the_servers_active_alarms_are_counted_by_type_and_severity(tmp_path: Path) -> None:
    port = free_port()
    with controller(tmp_path, server_args=("--metrics-listen", f"127.0.0.1:{port}")) as ctl:
        ctl.edit(vpn_xml("red"))
        ctl.join("red", "red-a", 1, "10.1.0.0/24")
        ctl.join("red", "red-b", 2, "10.2.0.0/24")
        ctl.in_sync("red-a", "red-b")
        assert not [k for k in checked(port) if k[0] == "cevpn_server_alarms"]
        ctl.agents["red-b"].stop()
        ctl.join("red", "red-c", 3, "10.3.0.0/24")  # red-b must learn of it, and cannot

        def alarmed() -> bool:
            found = checked(port)
            return value(found, "cevpn_server_alarms", type="ce-unreachable", severity="major") == 1

        wait_for(alarmed, 60, "red-b's ce-unreachable alarm in the metrics", step=0.5)
        ctl.agents["red-b"].start()
        ctl.in_sync("red-b")
        wait_for(
            lambda: not [k for k in checked(port) if k[0] == "cevpn_server_alarms" and k[1]],
            30,
            "the alarm cleared in the metrics",
            step=0.5,
        )
