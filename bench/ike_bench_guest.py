"""The guest half of bench/ike_bench.py: run inside the lab guest, in netns `pe`.

Needs `python -m lab.topology build 2` first.  Writes $WORK/ike_bench.json.
Everything the two measurements share (the 50 IkePeer objects, the responder,
the strongswan.conf of the CE's charon, the "all up" condition) is built once
here, so the agent and the reference differ only in who loads the connections.
"""

from __future__ import annotations

import ipaddress
import json
import os
import resource
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lxml import etree

from lab.agents import CE, Agent, T, config, preconfiguration
from lab.topology import Site
from nc_agent.allocations import Allocations
from nc_agent.children import die_with_parent
from nc_agent.desired import compile_desired
from nc_agent.ike.charon import Charon, CharonSettings, text
from nc_agent.ike.connections import IkePeer
from nc_core.schema import ce_schema

WORK = Path(os.environ.get("WORK", "/tmp"))
CE1, CE2 = Site(1), Site(2)
PEER_NET = "203.0.113.64/26"
"""The peers' SP addresses, 203.0.113.65..126, owned by ce2 and routed there by pe.  Not
203.0.113.1..: pe owns 203.0.113.1 (its link to `inet`, lab.topology) and `inet` is
203.0.113.10, so IKE to a peer at 203.0.113.1 was answered by pe itself (port 500
unreachable) and that peer stayed CONNECTING in every run, which made every figure
n/a.  Above 198.51.100.2, so ce1 has the lower address of every pair: the agent leads
(initiates at once, nc_agent.ike.manager), as swanctl's start_action = start does."""
POLL = 0.05
"""Seconds between two VICI list-sas polls of the CE's charon."""
UP_TIMEOUT = 90.0


def peer_address(i: int) -> str:
    return str(ipaddress.ip_network(PEER_NET)[i])


def peer_name(i: int) -> str:
    return f"peer-{i:02d}"


def psk(i: int) -> str:
    return f"ike-bench-psk-{i:02d}-{'0123456789abcdef' * 2}"


def peers_xml(count: int) -> str:
    return "".join(
        f"<peer><name>{peer_name(i)}</name><sp-address>{peer_address(i)}</sp-address>"
        "<tunnel><establishment>permanent</establishment>"
        "<encapsulation>transport-ipip</encapsulation>"
        f"<remote-prefix>172.16.{i}.0/24</remote-prefix></tunnel>"
        f"<ike><pre-shared-key>{psk(i)}</pre-shared-key></ike></peer>"
        for i in range(1, count + 1)
    )


def ike_peers(body: str, names: list[str]) -> dict[str, IkePeer]:
    """The IkePeer objects the agent derives from ``body`` (the same code path: YANG
    defaults by libyang, reqids by Allocations in configuration order, compile_desired)."""
    tree = ce_schema().parse_config(f'<ce xmlns="{CE}" xmlns:t="{T}">{body}</ce>', "xml")
    cfg = json.loads(tree.print_mem("json", with_siblings=True, include_implicit_defaults=True))
    with tempfile.TemporaryDirectory() as tmp:
        allocations = Allocations(Path(tmp) / "dataplane.json")
        allocations.reserve(names)
    return compile_desired(cfg, allocations.reqids).ike_peers()


def settings_for(peers: Mapping[str, IkePeer]) -> CharonSettings:
    """What IkeManager.settings() gives for these peers."""
    timeouts = [p.dpd_timeout for p in peers.values() if p.dpd_delay > 0]
    return CharonSettings.for_dpd_timeout(min(timeouts)) if timeouts else CharonSettings()


# -- processes and kernel state ------------------------------------------------------


def sh(*argv: str, stdin: str | None = None) -> str:
    done = subprocess.run(argv, input=stdin, text=True, capture_output=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip()}")
    return done.stdout


class BareCharon:
    """A charon started exactly the way nc_agent.ike.charon.Charon.start does it (its
    write_config, command and environment), without an agent."""

    def __init__(self, state: Path, netns: str, settings: CharonSettings) -> None:
        self.vici = Charon(state, netns)  # paths, command line, VICI sessions
        self.netns = netns
        self.settings = settings
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0) -> float:
        """Start and wait for the VICI socket; returns how long that took."""
        v = self.vici
        v.kill_stale()
        v.write_config(self.settings)
        with open(v.dir / "charon.stdout", "ab") as out:
            t0 = time.perf_counter()
            self.proc = subprocess.Popen(
                v.command(),
                env=v.environment(),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                preexec_fn=die_with_parent,
            )
        deadline = t0 + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"charon in {self.netns} exited ({self.proc.returncode})")
            try:
                v.open_session().transport.socket.close()
                return time.perf_counter() - t0
            except OSError:
                if time.perf_counter() > deadline:
                    raise RuntimeError(f"charon in {self.netns}: no VICI socket") from None
                time.sleep(0.02)

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def stop(self) -> None:
        v = self.vici
        v.disconnect()
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def flush_kernel() -> None:
    """Nothing but this bench lives in these namespaces: flush SAs, policies, devices."""
    for ns in (CE1.ce, CE2.ce):
        sh("ip", "-n", ns, "-batch", "-", stdin="xfrm state flush\nxfrm policy flush\n")
    for ns in (CE1.ce, CE1.vpn):
        names = [
            line.split(":")[1].strip().split("@")[0]
            for line in sh("ip", "-n", ns, "-o", "link", "show").splitlines()
        ]
        doomed = [n for n in names if n.startswith(("cvi", "cvt"))]
        if doomed:
            batch = "".join(f"link del {n}\n" for n in doomed)
            sh("ip", "-n", ns, "-force", "-batch", "-", stdin=batch)


CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU of a process so far (0 if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError, TypeError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def pid_of(charon: Charon) -> int | None:
    try:
        return int((charon.run_dir / "charon.pid").read_text().strip())
    except (OSError, ValueError):
        return None


def kernel_sa_count(ns: str) -> int:
    return sh("ip", "-n", ns, "xfrm", "state").count("proto esp")


def add_peer_addresses(count: int) -> None:
    """ce2 owns the 50 peers' SP addresses; pe routes them to ce2."""
    sh(
        "ip", "-n", CE2.ce, "-batch", "-",
        stdin="".join(f"addr add {peer_address(i)}/32 dev sp0\n" for i in range(1, count + 1)),
    )  # fmt: skip
    sh("ip", "-n", "pe", "route", "add", PEER_NET, "via", CE2.sp_address)


# -- the responder: one charon in ce2 answering for every peer -------------------------


def responder_connection(peer: IkePeer) -> tuple[dict[str, Any], dict[str, Any]]:
    """The mirror image of the CE's connection (load-conn, load-shared): never initiates."""
    conn = dict(peer.vici_connection()[peer.name])
    child = dict(conn["children"][peer.name])
    conn["local_addrs"], conn["remote_addrs"] = conn["remote_addrs"], conn["local_addrs"]
    conn["local"], conn["remote"] = conn["remote"], conn["local"]
    child["local_ts"], child["remote_ts"] = child["remote_ts"], child["local_ts"]
    child.pop("reqid")
    child.update(start_action="none", dpd_action="clear", close_action="none")
    conn["children"] = {peer.name: child}
    conn["keyingtries"] = "0"
    secret = peer.vici_shared_key()
    assert secret is not None
    return {peer.name: conn}, secret


def start_responder(responder: BareCharon, peers: Mapping[str, IkePeer]) -> None:
    responder.start()
    for peer in peers.values():
        conn, secret = responder_connection(peer)
        responder.vici.request("load-shared", secret)
        responder.vici.request("load-conn", conn)


# -- swanctl.conf: the agent's load-conn messages as a file ---------------------------


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _section(name: str, body: Mapping[str, Any], indent: int) -> list[str]:
    pad = "    " * indent
    lines = [f"{pad}{name} {{"]
    for key, value in body.items():
        if isinstance(value, Mapping):
            lines += _section(key, value, indent + 1)
        elif isinstance(value, list | tuple):
            lines.append(f"{pad}    {key} = {_quote(', '.join(value))}")
        else:
            lines.append(f"{pad}    {key} = {_quote(str(value))}")
    lines.append(f"{pad}}}")
    return lines


def swanctl_conf(peers: Mapping[str, IkePeer], start_action: str = "start") -> str:
    """Every peer's vici_connection() (children with ``start_action``) and its PSK."""
    conns: dict[str, Any] = {}
    secrets: dict[str, Any] = {}
    for peer in peers.values():
        for name, conn in peer.vici_connection().items():
            conn = dict(conn)
            conn["children"] = {
                c: {**child, "start_action": start_action} for c, child in conn["children"].items()
            }
            conns[name] = conn
        secret = peer.vici_shared_key()
        assert secret is not None
        owners = {f"id-{n}": owner for n, owner in enumerate(secret["owners"], 1)}
        secrets[f"ike-{peer.name}"] = {"secret": secret["data"], **owners}
    lines = _section("connections", conns, 0) + _section("secrets", secrets, 0)
    return "\n".join(lines) + "\n"


# -- the condition: charon on ce1 holds every tunnel -----------------------------------


def _up(entries: list[Mapping[Any, Any]]) -> bool:
    return any(
        text(sa.get("state")) == "ESTABLISHED"
        and any(text(c.get("state")) == "INSTALLED" for c in sa.get("child-sas", {}).values())
        for sa in entries
    )


class Poller:
    """Polls charon's list-sas every POLL seconds from ``t0`` on: when the first and when
    all ``names`` had an ESTABLISHED IKE_SA with an INSTALLED CHILD_SA."""

    def __init__(self, state: Path, names: set[str], t0: float) -> None:
        self.charon = Charon(state, None)
        self.names = names
        self.t0 = t0
        self.reachable: float | None = None
        self.first_sa: float | None = None
        self.first: float | None = None
        self.all: float | None = None
        self.up = 0
        self.polls = 0
        self.errors = 0
        self.last: dict[str, list[dict[str, Any]]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                sas = self.charon.list_sas()
            except Exception:  # no charon yet (the agent starts it), or it restarted
                self.errors += 1
                self.charon.disconnect()
                self._stop.wait(POLL)
                continue
            now = time.perf_counter() - self.t0
            self.polls += 1
            self.last = sas
            if self.reachable is None:
                self.reachable = now
            if self.first_sa is None and any(sas.get(name) for name in self.names):
                self.first_sa = now
            self.up = sum(1 for name in self.names if _up(sas.get(name, [])))
            if self.up and self.first is None:
                self.first = now
            if self.up == len(self.names):
                self.all = now
                return
            self._stop.wait(POLL)

    def wait(self, timeout: float) -> None:
        self._thread.join(timeout)
        self._stop.set()
        self._thread.join(5)
        self.charon.disconnect()

    def summary(self) -> dict[str, Any]:
        states = {
            name: [text(sa.get("state")) for sa in self.last.get(name, [])]
            for name in sorted(self.names)
            if not _up(self.last.get(name, []))
        }
        return {
            "charon_reachable_s": _r(self.reachable),
            "first_ike_sa_s": _r(self.first_sa),
            "first_up_s": _r(self.first),
            "all_up_s": _r(self.all),
            "up": self.up,
            "polls": self.polls,
            "not_up": states,
        }


def _r(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {text(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return text(value)


def loaded_connections(charon: Charon) -> dict[str, Any]:
    """list-conns as charon reports it (to prove A and B loaded the same thing)."""
    out: dict[str, Any] = {}
    for entry in charon.streamed("list-conns", "list-conn", {}):
        out.update(_plain(entry))
    return out


def without_start_action(conns: dict[str, Any]) -> dict[str, Any]:
    conns = json.loads(json.dumps(conns))
    for conn in conns.values():
        for child in conn.get("children", {}).values():
            child.pop("start_action", None)
    return conns


# -- the two measurements --------------------------------------------------------------


def agent_view(m: Any) -> int:
    data = m.get(filter=("subtree", f'<ce xmlns="{CE}"><peer/></ce>')).data_xml
    root = etree.fromstring(data.encode())
    return sum(1 for s in root.iter(f"{{{CE}}}status") if s.text == "up")


def run_agent(
    k: int, body: str, names: set[str], responder: BareCharon
) -> tuple[dict[str, Any], dict[str, Any]]:
    state = WORK / f"agent-{k}" / CE1.ce
    agent = Agent(CE1, state)
    res: dict[str, Any] = {"kind": "agent", "run": k}
    conns: dict[str, Any] = {}
    agent.start()
    try:
        assert agent.proc is not None
        with agent.connect() as m:
            cpu = cpu_seconds(agent.proc.pid), cpu_seconds(responder.pid)
            res["t0_wall"] = time.strftime("%H:%M:%S")  # to find the moment in the logs
            t0 = time.perf_counter()
            poller = Poller(state, names, t0)
            m.edit_config(target="running", config=config(body))
            res["rpc_s"] = round(time.perf_counter() - t0, 3)
            poller.wait(UP_TIMEOUT)
            res["cpu_s"] = {
                "agent": round(cpu_seconds(agent.proc.pid) - cpu[0], 2),
                "charon": round(cpu_seconds(pid_of(Charon(state, None))), 2),
                "responder": round(cpu_seconds(responder.pid) - cpu[1], 2),
            }
            res.update(poller.summary())
            res["kernel_sas"] = kernel_sa_count(CE1.ce)
            deadline = time.perf_counter() + 20
            view = agent_view(m)
            while view < len(names) and time.perf_counter() < deadline:
                time.sleep(0.2)
                view = agent_view(m)
            res["agent_view_up"] = view
            res["agent_view_at_s"] = round(time.perf_counter() - t0, 3)
            conns = loaded_connections(Charon(state, None))
            res["conf"] = (state / "ike" / "strongswan.conf").read_text()
    finally:
        agent.stop()
    res["kernel_sas_after_stop"] = kernel_sa_count(CE1.ce)
    return res, conns


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_swanctl(
    k: int, peers: Mapping[str, IkePeer], names: set[str], responder: BareCharon
) -> tuple[dict[str, Any], dict[str, Any]]:
    state = WORK / f"swanctl-{k}" / CE1.ce
    charon = BareCharon(state, CE1.ce, settings_for(peers))
    conf = state.parent / "swanctl.conf"
    conf.parent.mkdir(parents=True, exist_ok=True)
    conf.write_text(swanctl_conf(peers))
    res: dict[str, Any] = {"kind": "swanctl", "run": k}
    conns: dict[str, Any] = {}
    res["charon_start_s"] = round(charon.start(), 3)
    try:
        uri = f"unix://{charon.vici.run_dir / 'charon.vici'}"
        responder_cpu, children_cpu = cpu_seconds(responder.pid), _children_cpu()
        res["t0_wall"] = time.strftime("%H:%M:%S")
        t0 = time.perf_counter()
        poller = Poller(state, names, t0)
        done = subprocess.run(
            ["swanctl", "--load-all", "--noprompt", "--file", str(conf), "--uri", uri],
            capture_output=True,
            text=True,
        )
        res["swanctl_s"] = round(time.perf_counter() - t0, 3)
        swanctl_cpu = _children_cpu() - children_cpu
        (state.parent / "swanctl.out").write_text(done.stdout + done.stderr)
        if done.returncode != 0:
            poller.wait(0)
            raise RuntimeError(f"swanctl --load-all failed: {done.stderr[-2000:]}")
        poller.wait(UP_TIMEOUT)
        res["cpu_s"] = {
            "swanctl": round(swanctl_cpu, 2),
            "charon": round(cpu_seconds(charon.pid), 2),  # since its start, as for the agent
            "responder": round(cpu_seconds(responder.pid) - responder_cpu, 2),
        }
        res.update(poller.summary())
        res["kernel_sas"] = kernel_sa_count(CE1.ce)
        res["swanctl_loaded"] = [
            line for line in done.stdout.splitlines() if line.startswith("successfully")
        ]
        conns = loaded_connections(charon.vici)
        res["conf"] = charon.vici.conf.read_text()
    finally:
        charon.stop()
    res["kernel_sas_after_stop"] = kernel_sa_count(CE1.ce)
    return res, conns


def run(count: int, rounds: int) -> dict[str, Any]:
    add_peer_addresses(count)
    names = [peer_name(i) for i in range(1, count + 1)]
    body = preconfiguration(CE1) + peers_xml(count)
    peers = ike_peers(body, names)
    assert set(peers) == set(names), sorted(peers)
    responder = BareCharon(WORK / "responder" / CE2.ce, CE2.ce, settings_for(peers))
    runs: list[dict[str, Any]] = []
    conns: dict[str, dict[str, Any]] = {}
    confs: dict[str, str] = {}
    try:
        for k in range(1, rounds + 1):
            for kind in ("agent", "swanctl"):
                responder.stop()
                flush_kernel()
                start_responder(responder, peers)
                if kind == "agent":
                    res, conns[kind] = run_agent(k, body, set(names), responder)
                else:
                    res, conns[kind] = run_swanctl(k, peers, set(names), responder)
                confs[kind] = res.pop("conf").replace(str(WORK / f"{kind}-{k}"), "<state>")
                print(json.dumps(res), flush=True)
                runs.append(res)
    finally:
        responder.stop()
    same_conns = without_start_action(conns.get("agent", {})) == without_start_action(
        conns.get("swanctl", {})
    )
    out: dict[str, Any] = {
        "peers": count,
        "rounds": rounds,
        "runs": runs,
        "same_connections": same_conns,
        "same_strongswan_conf": confs.get("agent") == confs.get("swanctl"),
        "ikesa_example": {kind: c.get(names[0]) for kind, c in conns.items()},
    }
    if not same_conns:
        (WORK / "conns.json").write_text(json.dumps(conns, indent=1))
    return out


def main(count: int, rounds: int) -> None:
    res = run(count, rounds)
    (WORK / "ike_bench.json").write_text(json.dumps(res, indent=1))
