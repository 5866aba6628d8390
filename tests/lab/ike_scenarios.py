"""Run inside a lab guest: IKEv2 between real agents, each supervising its own charon.

    python -m tests.lab.ike_scenarios SCENARIO N      (after `lab.topology build N`)

The agents are configured over NETCONF from the provider core, as in
agent_scenarios; the driver also subscribes to each agent's notifications
to see what an operator's OSS would see.  Results go to $WORK/report.json.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from lxml import etree

from lab.agents import (
    CE,
    Agent,
    capture,
    config,
    ping,
    preconfiguration,
    started,
    stop_capture,
)
from lab.topology import Site
from tests.waiting import wait_until

WORK = Path(os.environ.get("WORK", "/tmp"))
NC = "urn:ietf:params:xml:ns:netconf:base:1.0"
PSK = "lab-pre-shared-key-0123456789abcdef"
WRONG = "not-the-right-key-0123456789abcdef"
FAST_DPD = "<sa-defaults><ike><dpd><delay>2</delay><timeout>6</timeout></dpd></ike></sa-defaults>"


def retry_xml(minimum: int, t1: int, factor: str, limit: int) -> str:
    return (
        f"<retry-policy><minimum-wait>{minimum}</minimum-wait><t1>{t1}</t1>"
        f"<backoff-factor>{factor}</backoff-factor><limit>{limit}</limit></retry-policy>"
    )


def ike_peer_xml(
    me: Site,
    other: Site,
    *,
    psk: str = PSK,
    encapsulation: str = "transport-ipip",
    establishment: str = "permanent",
    idle: int | None = None,
) -> str:
    del me
    idle_xml = f"<idle-timeout>{idle}</idle-timeout>" if idle else ""
    return (
        f"<peer><name>site-{other.n}</name><sp-address>{other.sp_address}</sp-address>"
        f"<tunnel><establishment>{establishment}</establishment>{idle_xml}"
        f"<encapsulation>{encapsulation}</encapsulation>"
        f"<remote-prefix>{other.lan_prefix}</remote-prefix></tunnel>"
        f"<ike><pre-shared-key>{psk}</pre-shared-key></ike></peer>"
    )


class Notifications:
    """Every notification of one agent, with the time it arrived (a thread per agent)."""

    def __init__(self, agent: Agent) -> None:
        self.m = agent.connect()
        self.m.create_subscription()
        self.events: list[tuple[float, str, dict[str, str]]] = []
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop:
            try:
                n = self.m.take_notification(block=True, timeout=0.5)
            except Exception:
                return
            if n is None:
                continue
            root = etree.fromstring(n.notification_xml.encode())
            for child in root:
                name = etree.QName(child).localname
                if name == "eventTime":
                    continue
                leaves = {etree.QName(e).localname: e.text or "" for e in child}
                self.events.append((time.monotonic(), name, leaves))

    def named(self, name: str, peer: str | None = None) -> list[tuple[float, dict[str, str]]]:
        return [
            (t, leaves)
            for t, n, leaves in self.events
            if n == name and (peer is None or leaves.get("peer") == peer)
        ]

    def wait_for(
        self, name: str, peer: str | None = None, after: float | None = None, timeout: float = 60
    ) -> float | None:
        """When the first such notification at or after ``after`` (default: now) arrived."""
        since = time.monotonic() if after is None else after
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [t for t, _ in self.named(name, peer) if t >= since]
            if found:
                return found[0]
            time.sleep(0.05)
        return None

    def close(self) -> None:
        self._stop = True
        self._thread.join(5)
        try:
            self.m.close_session()
        except Exception:
            pass


def peer_state(agent: Agent, peer: str) -> dict[str, str]:
    with agent.connect() as m:
        data = m.get(filter=("subtree", f'<ce xmlns="{CE}"><peer><name>{peer}</name></peer></ce>'))
    root = etree.fromstring(data.data_xml.encode())
    state = root.find(f".//{{{CE}}}state")
    return {} if state is None else {etree.QName(e).localname: e.text or "" for e in state}


def alarms(agent: Agent) -> list[dict[str, str]]:
    with agent.connect() as m:
        data = m.get(filter=("subtree", f'<ce-state xmlns="{CE}"><alarms/></ce-state>'))
    root = etree.fromstring(data.data_xml.encode())
    return [
        {etree.QName(e).localname: e.text or "" for e in alarm}
        for alarm in root.iter(f"{{{CE}}}alarm")
    ]


def configure(agent: Agent, body: str) -> None:
    with agent.connect() as m:
        m.edit_config(target="running", config=config(body))


def configure_pair(agents: dict[int, Agent], extra: str = "", **peer: Any) -> None:
    """Sites 1 and 2 as each other's IKE peer (fast DPD; ``extra``: more CE-wide XML)."""
    a, b = Site(1), Site(2)
    for me, other in ((a, b), (b, a)):
        body = preconfiguration(me) + FAST_DPD + extra + ike_peer_xml(me, other, **peer)
        configure(agents[me.n], body)


def charon_pid(site: Site) -> int:
    return int((WORK / site.ce / "ike" / "run" / "charon.pid").read_text().strip())


def grep_secrets(sites: list[Site], secrets: list[str]) -> list[str]:
    """Logs (agents', charons', the VPN server's) that contain a secret in clear."""
    found = []
    logs = [*WORK.glob("*.log"), *(p for s in sites for p in (WORK / s.ce).rglob("*.log"))]
    logs += [p for s in sites for p in (WORK / s.ce / "ike").glob("charon.*")]
    for path in logs:
        content = path.read_text(errors="replace")
        found += [f"{path}: {secret[:6]}..." for secret in secrets if secret in content]
    return found


# -- scenarios --------------------------------------------------------------------


def wrong_psk() -> dict[str, Any]:
    """Site 1 has the wrong key for site 2: seed 3.4's schedule, then the alarm; fixing clears."""
    a, b = Site(1), Site(2)
    agents = started([a, b])
    report: dict[str, Any] = {}
    retry = retry_xml(2, 3, "2.0", 12)  # waits 2, 3, 6, then 12 = the limit: alarm
    try:
        notes = Notifications(agents[1])
        configure(agents[2], preconfiguration(b) + FAST_DPD + retry + ike_peer_xml(b, a, psk=PSK))
        configure(agents[1], preconfiguration(a) + FAST_DPD + retry + ike_peer_xml(a, b, psk=WRONG))
        alarm_at = notes.wait_for("alarm-raised", after=0, timeout=90)
        failures = notes.named("tunnel-establishment-failed", "site-2")
        report["failures"] = [
            {"t": t, "retry-count": leaves.get("retry-count"), "reason": leaves.get("reason"),
             "next-attempt": leaves.get("next-attempt")}
            for t, leaves in failures
        ]  # fmt: skip
        report["alarm_after_failure"] = (
            None if alarm_at is None or not failures else alarm_at - failures[-1][0]
        )
        report["alarm_raised"] = [leaves for _, leaves in notes.named("alarm-raised")]
        report["state_in_alarm"] = peer_state(agents[1], "site-2")
        report["alarms"] = alarms(agents[1])
        report["state_on_responder"] = peer_state(agents[2], "site-1")
        fixed_at = time.monotonic()
        with agents[1].connect() as m:
            m.edit_config(
                target="running",
                config=config(
                    f"<peer><name>site-2</name><ike><pre-shared-key>{PSK}</pre-shared-key>"
                    "</ike></peer>"
                ),
            )
        cleared = notes.wait_for("alarm-cleared", after=fixed_at, timeout=30)
        report["cleared_after_fix_s"] = None if cleared is None else cleared - fixed_at
        report["state_after_fix"] = peer_state(agents[1], "site-2")
        report["alarms_after_fix"] = alarms(agents[1])
        report["ping"] = ping(a, b)
        report["secrets_in_logs"] = grep_secrets([a, b], [PSK, WRONG])
        notes.close()
    finally:
        for agent in agents.values():
            agent.stop()
    return report


def kill_charon(encapsulation: str) -> dict[str, Any]:
    """Site 2's IKE side killed twice during a continuous ping, with a capture on pe.

    1. kill -9 of charon: the agent restarts it, the peer reports the outage;
    2. kill -9 of the agent itself: its charon dies with it, the peer notices by
       DPD; the agent is started again and the tunnel returns.
    At no moment may clear text cross the core."""
    a, b = Site(1), Site(2)
    agents = started([a, b])
    report: dict[str, Any] = {}
    try:
        configure_pair(agents, encapsulation=encapsulation)
        report["up_first"] = wait_until(lambda: _both_up(agents), 60)
        notes = Notifications(agents[1])
        cap = capture("kill-charon")
        pinger = subprocess.Popen(
            ["ip", "netns", "exec", a.host, "ping", "-i", "0.2", "-W", "1", b.host_address],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        report["traffic_before_kill"] = traffic_flows(agents[1], "site-2")

        old_pid = charon_pid(b)
        killed_at = time.monotonic()
        os.kill(old_pid, signal.SIGKILL)
        report["charon_restarted_after_s"] = wait_until(lambda: _pid_changed(b, old_pid), 30, 0.05)
        down = notes.wait_for("tunnel-down", "site-2", after=killed_at, timeout=30)
        report["charon_kill_down_after_s"] = None if down is None else down - killed_at
        back = wait_until(lambda: _both_up(agents), 60)
        report["charon_kill_back_after_s"] = None if back is None else time.monotonic() - killed_at

        report["traffic_after_charon_kill"] = traffic_flows(agents[1], "site-2")
        second_charon = charon_pid(b)
        killed_at = time.monotonic()
        agent_proc = agents[2].proc
        assert agent_proc is not None
        os.kill(agent_proc.pid, signal.SIGKILL)  # only the agent: charon must die with it
        agent_proc.wait()
        report["charon_gone_with_agent_after_s"] = wait_until(
            lambda: not _alive(second_charon), 5, 0.05
        )
        agents[2].start()
        back = wait_until(lambda: _both_up(agents), 60)
        report["agent_kill_back_after_s"] = None if back is None else time.monotonic() - killed_at

        # Site 2 vanishes from the network: only dead peer detection can tell.
        report["traffic_after_agent_kill"] = traffic_flows(agents[1], "site-2")
        subprocess.run(["ip", "-n", b.ce, "link", "set", "sp0", "down"], check=True)
        cut_at = time.monotonic()
        down = notes.wait_for("tunnel-down", "site-2", after=cut_at, timeout=30)
        report["dpd_down_after_s"] = None if down is None else down - cut_at
        report["state_while_cut"] = peer_state(agents[1], "site-2")
        subprocess.run(["ip", "-n", b.ce, "link", "set", "sp0", "up"], check=True)
        subprocess.run(
            ["ip", "-n", b.ce, "route", "replace", "default", "via", b.pe_address], check=True
        )
        restored_at = time.monotonic()
        back = wait_until(lambda: _both_up(agents), 90)
        report["dpd_back_after_s"] = None if back is None else time.monotonic() - restored_at
        report["down_reasons"] = [leaves.get("reason") for _, leaves in notes.named("tunnel-down")]
        report["traffic_after_dpd"] = traffic_flows(agents[1], "site-2")
        report["ping_after"] = ping(a, b)
        pinger.send_signal(signal.SIGINT)
        out, _ = pinger.communicate(timeout=10)
        report["ping_summary"] = [line for line in out.splitlines() if "packets" in line]
        report["pe_ipv4"] = stop_capture(cap, "kill-charon")
        notes.close()
    finally:
        for agent in agents.values():
            agent.stop()
    return report


def _packets_in(agent: Agent, peer: str) -> int:
    """ESP packets the agent's peer entry counts as received (its current SAs)."""
    try:
        return int(peer_state(agent, peer).get("in-packets", "0"))
    except ValueError:
        return 0


def traffic_flows(agent: Agent, peer: str, packets: int = 5, timeout: float = 30) -> float | None:
    """Until the peer's current SAs have carried ``packets`` packets in (a ping running)."""
    return wait_until(lambda: _packets_in(agent, peer) >= packets, timeout, 0.1)


def _both_up(agents: dict[int, Agent]) -> bool:
    return (
        peer_state(agents[1], "site-2").get("status") == "up"
        and peer_state(agents[2], "site-1").get("status") == "up"
    )


def _alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def _pid_changed(site: Site, old: int) -> bool:
    try:
        return charon_pid(site) != old
    except (OSError, ValueError):
        return False


def traffic_driven() -> dict[str, Any]:
    """A traffic-driven peer is down until its first packet, then up, then down when idle."""
    a, b = Site(1), Site(2)
    agents = started([a, b])
    report: dict[str, Any] = {}
    try:
        configure_pair(agents, establishment="traffic-driven", idle=6)
        notes = Notifications(agents[1])
        # An observation window, not a wait: with no packet sent, nothing may come up.
        time.sleep(3)
        report["before"] = peer_state(agents[1], "site-2")
        report["sas_before"] = _sa_count(a)
        t0 = time.monotonic()
        report["first_ping"] = ping(a, b, count=3)
        report["up_after_first_packet_s"] = wait_until(
            lambda: peer_state(agents[1], "site-2").get("status") == "up", 10
        )
        report["during"] = peer_state(agents[1], "site-2")
        report["sas_during"] = _sa_count(a)
        idle = notes.wait_for("tunnel-down", "site-2", after=t0, timeout=40)
        report["down_after_idle_s"] = None if idle is None else idle - t0
        report["down"] = [leaves for _, leaves in notes.named("tunnel-down")]
        # charon deletes the CHILD_SA and the IKE_SA as it reports the tunnel down
        wait_until(lambda: _sa_count(a) == 0 and _ike_sa_count(a) == 0, 10)
        report["after"] = peer_state(agents[1], "site-2")
        report["sas_after"] = _sa_count(a)
        report["ike_sas_after"] = _ike_sa_count(a)
        report["second_ping"] = ping(a, b, count=3)
        notes.close()
    finally:
        for agent in agents.values():
            agent.stop()
    return report


def peer_statuses(site: Site) -> dict[str, str]:
    """charon's own view: per connection, 'up' when an IKE_SA has an installed CHILD_SA."""
    from nc_agent.ike.charon import Charon, text

    try:
        sas = Charon(WORK / site.ce, None).list_sas()
    except OSError:
        return {}
    return {
        name: "up"
        if any(
            text(sa.get("state")) == "ESTABLISHED"
            and any(text(c.get("state")) == "INSTALLED" for c in sa.get("child-sas", {}).values())
            for sa in entries
        )
        else "down"
        for name, entries in sas.items()
    }


def remove_peer() -> dict[str, Any]:
    """Site 1 drops site 2 from its peers (seed 3.6): a delete exchange, then nothing.

    Site 2 still has site 1 configured and keeps trying (permanent); site 1 must
    refuse every attempt, so no SA between them exists again."""
    a, b = Site(1), Site(2)
    agents = started([a, b])
    report: dict[str, Any] = {}
    retry = retry_xml(1, 2, "1.5", 60)
    try:
        configure_pair(agents, extra=retry)
        report["up_first"] = wait_until(lambda: _both_up(agents), 60)
        report["sas_before"] = _sa_count(a)
        notes = Notifications(agents[2])
        cap = capture("remove-peer")
        removed_at = time.monotonic()
        configure(
            agents[1],
            f'<peer xmlns:nc="{NC}" nc:operation="delete"><name>site-2</name></peer>',
        )
        down = notes.wait_for("tunnel-down", "site-1", after=removed_at, timeout=20)
        report["peer_down_after_s"] = None if down is None else down - removed_at
        report["peer_down_reason"] = [
            leaves.get("reason") for _, leaves in notes.named("tunnel-down")
        ]
        # site 2 keeps trying (permanent): two refused attempts show it is refused for good
        wait_until(lambda: len(notes.named("tunnel-establishment-failed")) >= 2, 60)
        report["attempts_refused"] = [
            leaves.get("reason") for _, leaves in notes.named("tunnel-establishment-failed")
        ]
        report["pe_ipv4"] = stop_capture(cap, "remove-peer")
        report["ike_sas_on_1"] = _ike_sa_count(a)
        report["sas_on_1"] = _sa_count(a)
        report["policies_on_1"] = subprocess.run(
            ["ip", "-n", a.ce, "xfrm", "policy"], capture_output=True, text=True
        ).stdout.count("proto esp")
        report["links_on_1"] = subprocess.run(
            ["ip", "-n", a.vpn, "-o", "link"], capture_output=True, text=True
        ).stdout.count("cvi")
        report["state_on_2"] = peer_state(agents[2], "site-1")
        report["ping"] = ping(a, b, count=1)
        notes.close()
    finally:
        for agent in agents.values():
            agent.stop()
    report["delete_logged_on_2"] = (
        (WORK / b.ce / "ike" / "charon.log").read_text().count("received DELETE for IKE_SA")
    )
    return report


def algorithms() -> dict[str, Any]:
    """Which of the transforms cevpn can put in a proposal the loaded plugins lack."""
    import asyncio

    from nc_agent.ike.charon import Charon, CharonSettings, text
    from nc_agent.ike.proposals import DH_GROUP, ENCRYPTION, INTEGRITY, PRF

    charon = Charon(WORK / "algorithms", None)

    async def run() -> dict[str, Any]:
        await charon.start(CharonSettings())
        try:
            offered = charon.request("get-algorithms")
        finally:
            await charon.stop()
        names = {
            kind: sorted(text(k).lower() for k in algos)
            for kind, algos in ((text(k), v) for k, v in offered.items())
        }
        return {"charon": names}

    report = asyncio.run(run())
    report["ours"] = {
        "encryption": sorted(ENCRYPTION),
        "integrity": sorted(INTEGRITY),
        "prf": sorted(PRF),
        "dh": sorted(DH_GROUP),
    }
    return report


def _reset(agent: Agent, peer: str) -> str | None:
    """reset-tunnel on ``agent``; None, or the error it answered."""
    from ncclient.xml_ import to_ele

    try:
        with agent.connect() as m:
            m.dispatch(to_ele(f'<reset-tunnel xmlns="{CE}"><peer>{peer}</peer></reset-tunnel>'))
    except Exception as exc:
        return str(exc)
    return None


def _ike_sa_ids(site: Site, peer: str) -> set[str]:
    from nc_agent.ike.charon import Charon

    charon = Charon(WORK / site.ce, None)
    try:
        return {str(sa.get("uniqueid")) for sa in charon.list_sas(peer).get(peer, [])}
    except OSError:
        return set()


def reset_ike() -> dict[str, Any]:
    """reset-tunnel with IKE: a new IKE_SA and CHILD_SA, from the CE asked, traffic again."""
    a, b = Site(1), Site(2)
    agents = started([a, b])
    report: dict[str, Any] = {}
    try:
        configure_pair(agents)
        report["up_first"] = wait_until(lambda: _both_up(agents), 60)
        before_ids = _ike_sa_ids(a, "site-2")
        before = peer_state(agents[1], "site-2")
        notes = Notifications(agents[1])
        report["error"] = _reset(agents[1], "site-2")
        report["up_again"] = wait_until(
            lambda: (
                peer_state(agents[1], "site-2").get("status") == "up"
                and peer_state(agents[1], "site-2").get("outbound-spi")
                != before.get("outbound-spi")
            ),
            60,
        )
        after = peer_state(agents[1], "site-2")
        report["spis_before"] = [before.get("outbound-spi"), before.get("inbound-spi")]
        report["spis_after"] = [after.get("outbound-spi"), after.get("inbound-spi")]
        report["ike_sa_ids_before"] = sorted(before_ids)
        report["ike_sa_ids_after"] = sorted(_ike_sa_ids(a, "site-2"))
        report["ike_sas_on_each_end"] = [_ike_sa_count(a), _ike_sa_count(b)]
        report["down_reason"] = [d.get("reason") for _, d in notes.named("tunnel-down", "site-2")]
        notes.close()
        report["ping"] = ping(a, b) and ping(b, a)
    finally:
        for agent in agents.values():
            agent.stop()
    return report


def reset_ikeless() -> dict[str, Any]:
    """reset-tunnel without IKE: the peer CE restarted (its SAs installed afresh, sequence
    numbers from 1 again), so its packets fail our replay check; a reset of our inbound SA
    lets them in again."""
    from lab.agents import configure_mesh

    a, b = Site(1), Site(2)
    agents = started([a, b])
    report: dict[str, Any] = {}
    try:
        configure_mesh(agents, [a, b], "transport-ipip")
        report["ping_first"] = ping(a, b, count=20) and ping(b, a)
        # Site 2 restarts as after a power cut: its kernel loses every SA, its agent
        # installs them again from its configuration.
        agents[2].stop()
        subprocess.run(["ip", "-n", b.ce, "xfrm", "state", "flush"], check=True)
        agents[2].start()
        report["peer_sas_back"] = wait_until(lambda: _sa_count(b) >= 2, 30) is not None
        report["ping_after_peer_restart"] = ping(b, a, count=2)
        before = peer_state(agents[1], "site-2")
        report["error"] = _reset(agents[1], "site-2")
        report["ping_after_reset"] = ping(b, a, count=3) and ping(a, b, count=3)
        after = peer_state(agents[1], "site-2")
        report["spis"] = [before.get("inbound-spi"), after.get("inbound-spi")]
        report["status"] = after.get("status")
    finally:
        for agent in agents.values():
            agent.stop()
    return report


# -- one tunnel, one IKE_SA ---------------------------------------------------------

CROSSING_DPD = (
    "<sa-defaults><ike><dpd><delay>2</delay><timeout>30</timeout></dpd></ike></sa-defaults>"
)
"""A DPD timeout of 30 s: charon retransmits an unanswered IKE_SA_INIT after ~3.7 s and
gives up only after ~30 s, so an IKE_SA_INIT held back by the core is still being
retransmitted when the core lets it through."""


def _delete_peer(agent: Agent, name: str) -> None:
    configure(agent, f'<peer xmlns:nc="{NC}" nc:operation="delete"><name>{name}</name></peer>')


def _all_sas(site: Site) -> list[dict[str, Any]]:
    """Every IKE_SA charon of ``site`` holds, named or not (a half-open one the peer
    started is listed before it has a name), with its CHILD_SAs' states."""
    from nc_agent.ike.charon import Charon, text

    try:
        sas = Charon(WORK / site.ce, None).list_sas()
    except OSError:
        return []
    return [
        {
            "conn": conn,
            "state": text(sa.get("state")),
            "initiator": text(sa.get("initiator", "no")) == "yes",
            "children": [text(c.get("state")) for c in sa.get("child-sas", {}).values()],
        }
        for conn, entries in sas.items()
        for sa in entries
    ]


def _one_ike_sa_each(agents: dict[int, Agent], sites: list[Site]) -> bool:
    """Both ends hold exactly one IKE_SA (none half-open beside it) with exactly one
    CHILD_SA, installed, whose two kernel SAs are the only ones, and say 'up'."""
    for site in sites:
        sas = _all_sas(site)
        if [(sa["state"], sa["children"]) for sa in sas] != [("ESTABLISHED", ["INSTALLED"])]:
            return False
        if _sa_count(site) != 2:
            return False
    return all(
        peer_state(agents[s.n], f"site-{o.n}").get("status") == "up"
        for s in sites
        for o in sites
        if o != s
    )


def _nothing_left(sites: list[Site]) -> bool:
    return all(not _all_sas(s) and _sa_count(s) == 0 for s in sites)


def _duplicates_deleted(sites: list[Site]) -> int:
    """The agents' log lines for duplicates they deleted (nc_agent.ike.manager._dedupe)."""
    return sum(
        (WORK / f"{s.ce}.log").read_text(errors="replace").count("deleting the duplicate IKE_SA")
        for s in sites
    )


def _core_drops_ike(on: bool) -> None:
    """pe drops (or stops dropping) IKE between the CEs: both IKE_SA_INITs wait."""
    for port in ("500", "4500"):
        subprocess.run(
            ["iptables-legacy", "-I" if on else "-D", "FORWARD", "-p", "udp", "--dport", port,
             "-j", "DROP"],
            check=True,
        )  # fmt: skip


def _own_attempt_pending(site: Site) -> bool:
    return any(sa["initiator"] and sa["state"] == "CONNECTING" for sa in _all_sas(site))


def one_ike_sa() -> dict[str, Any]:
    """Sites 1 and 2 load their tunnel four times; each time it must end as ONE IKE_SA
    with one CHILD_SA on each end.

    1. staggered: site 2 (the higher address, which waits before it initiates) is
       provisioned first and negotiates in vain, refused as unknown; then site 1;
    2. together: both in the same instant (two threads released at once);
    3. crossing: both at once while the core holds IKE back until each end has sent
       its own IKE_SA_INIT, then lets both through: two IKE_SAs for sure;
    4. together again.
    Between loads both delete the peer and wait until nothing is left."""
    a, b = Site(1), Site(2)
    sites = [a, b]
    agents = started(sites)
    report: dict[str, Any] = {"rounds": []}
    retry = retry_xml(1, 4, "2.0", 60)
    try:
        for site in sites:
            configure(agents[site.n], preconfiguration(site) + CROSSING_DPD + retry)
        notes = Notifications(agents[2])

        def load(site: Site, other: Site, gate: threading.Barrier | None = None) -> None:
            if gate is not None:
                gate.wait(30)
            configure(agents[site.n], ike_peer_xml(site, other))

        def settle(kind: str, deleted_before: int) -> None:
            reached = wait_until(lambda: _one_ike_sa_each(agents, sites), 90)
            report["rounds"].append(
                {
                    "kind": kind,
                    "reached_after_s": reached,
                    "sas": {s.ce: _all_sas(s) for s in sites},
                    "kernel_sas": {s.ce: _sa_count(s) for s in sites},
                    "duplicates_deleted": _duplicates_deleted(sites) - deleted_before,
                }
            )
            for site, other in ((a, b), (b, a)):
                _delete_peer(agents[site.n], f"site-{other.n}")
            report["rounds"][-1]["cleared"] = wait_until(lambda: _nothing_left(sites), 30)

        # 1. staggered
        deleted = _duplicates_deleted(sites)
        load(b, a)
        wait_until(lambda: len(notes.named("tunnel-establishment-failed", "site-1")) >= 2, 30)
        report["refusals"] = [
            leaves for _, leaves in notes.named("tunnel-establishment-failed", "site-1")
        ]
        load(a, b)
        settle("staggered", deleted)

        for kind in ("together", "crossing", "together"):
            deleted = _duplicates_deleted(sites)
            if kind == "crossing":
                _core_drops_ike(True)
            gate = threading.Barrier(2)
            threads = [
                threading.Thread(target=load, args=(s, o, gate)) for s, o in ((a, b), (b, a))
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(60)
            if kind == "crossing":
                report["both_sent"] = wait_until(
                    lambda: all(_own_attempt_pending(s) for s in sites), 20, 0.05
                )
                _core_drops_ike(False)
            settle(kind, deleted)
        notes.close()
    finally:
        for agent in agents.values():
            agent.stop()
    return report


def _sa_count(site: Site) -> int:
    out = subprocess.run(["ip", "-n", site.ce, "xfrm", "state"], capture_output=True, text=True)
    return out.stdout.count("proto esp")


def _ike_sa_count(site: Site) -> int:
    from nc_agent.ike.charon import Charon

    charon = Charon(WORK / site.ce, None)
    try:
        return sum(len(v) for v in charon.list_sas().values())
    except OSError:
        return -1


def main() -> None:
    scenario = sys.argv[1]  # the site count (argv[2]) is fixed per scenario here
    if scenario == "wrong-psk":
        report = wrong_psk()
    elif scenario == "kill-charon":
        report = kill_charon("transport-ipip")
    elif scenario == "kill-charon-tunnel":
        report = kill_charon("tunnel-mode")
    elif scenario == "traffic-driven":
        report = traffic_driven()
    elif scenario == "remove-peer":
        report = remove_peer()
    elif scenario == "algorithms":
        report = algorithms()
    elif scenario == "reset-ike":
        report = reset_ike()
    elif scenario == "reset-ikeless":
        report = reset_ikeless()
    elif scenario == "one-ike-sa":
        report = one_ike_sa()
    else:
        raise SystemExit(f"unknown scenario {scenario}")
    report["at"] = datetime.now().isoformat()
    (WORK / "report.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
