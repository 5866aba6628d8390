"""Run inside a lab guest: the VPN server in the provider core provisions real CE agents.

    python -m tests.lab.server_scenarios SCENARIO N     (after `lab.topology build N`)

The server runs in `pe`; each CE agent is enrolled through the server's enrol
operation and started with `--bootstrap`, in its CE's SP namespace with the
kernel data plane.  The driver acts as an OSS: it only ever talks NETCONF to
the server.  Results go to $WORK/report.json.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections import Counter
from contextlib import suppress
from pathlib import Path
from typing import Any

from lxml import etree
from ncclient import manager

from lab.agents import capture, ping, stop_capture
from lab.processes import start, stop, wait_port
from lab.topology import INTERNET_HOST, Site
from lab.waiting import wait_until
from nc_core.journal import stored_running
from tests.lab.ike_scenarios import grep_secrets, peer_statuses

ROOT = Path(__file__).resolve().parents[2]
BIN = ROOT / ".venv" / "bin"
WORK = Path(os.environ.get("WORK", "/tmp"))
SVC = "urn:cevpn:yang:cevpn-service"
NC = "urn:ietf:params:xml:ns:netconf:base:1.0"
PASSWORD = "lab-operator-password"
SERVER_ADDRESS = "198.51.100.1"  # pe's address on its link to ce1: reachable from every CE


def site_xml(s: Site) -> str:
    return (
        f"<site><id>site-{s.n}</id><ce-address>{s.sp_address}</ce-address>"
        f"<local-prefix>{s.lan_prefix}</local-prefix></site>"
    )


class Lab:
    """The VPN server (in pe, or in ``netns`` at ``address``), an OSS session to it, and
    the agents it enrolled."""

    def __init__(
        self, netns: str | None = None, address: str = SERVER_ADDRESS, *extra: str
    ) -> None:
        self.address = address
        self.state = WORK / "vpn-server"
        pw = WORK / "operator.pw"
        pw.write_text(PASSWORD + "\n")
        subprocess.run([str(BIN / "cevpn-server"), "adduser", "--state-dir", str(self.state),
                        "oss", "--password-file", str(pw), "--group", "operators"],
                       check=True, capture_output=True)  # fmt: skip
        self.server = start(
            [str(BIN / "cevpn-server"), "--state-dir", str(self.state), "--listen", ":830", *extra],
            "vpn-server.log",
            netns,
        )
        self.agents: dict[int, subprocess.Popen[bytes]] = {}
        wait_port(address, 830, self.server, "the VPN server")
        host_key = (self.state / "ssh_host_ed25519_key.pub").read_text().split()[1]
        self.m = manager.connect(host=address, port=830, username="oss",
                                 password=PASSWORD, hostkey_verify=True, hostkey_b64=host_key,
                                 allow_agent=False, look_for_keys=False, timeout=120)  # fmt: skip

    def edit(self, body: str) -> None:
        self.m.edit_config(target="running", config=(
            f'<config xmlns="{NC}"><vpn-service xmlns="{SVC}">{body}</vpn-service></config>'
        ))  # fmt: skip

    def enrol_and_start(self, s: Site, *extra: str) -> None:
        # Imported here: the server's application costs seconds to import in the guest,
        # and the demo shares this module's small helpers without needing it.
        from nc_server.enrolment import bundle_document_from_xml

        request = etree.fromstring(
            f'<enrol xmlns="{SVC}"><vpn>lab</vpn><site>site-{s.n}</site></enrol>'
        )
        reply = etree.fromstring(self.m.dispatch(request).xml.encode())
        bundle = reply.find(f".//{{{SVC}}}bundle")
        assert bundle is not None
        path = WORK / f"{s.ce}.bundle.json"
        path.write_text(json.dumps(bundle_document_from_xml(bundle)))
        path.chmod(0o600)
        agent = start([str(BIN / "cevpn-agent"), "--state-dir", str(WORK / s.ce),
                       "--bootstrap", str(path), "--vpn-netns", s.vpn, *extra],
                      f"{s.ce}.log", s.ce)  # fmt: skip
        self.agents[s.n] = agent
        wait_port(s.sp_address, 830, agent, f"agent {s.ce}")

    def statuses(self, leaf: str = "status") -> dict[str, str]:
        """Each site's provisioning ``leaf`` (its status, or another leaf)."""
        data = self.m.get(filter=("subtree", f'<vpn-service xmlns="{SVC}"/>')).data_ele
        return {
            site.findtext(f"{{{SVC}}}id") or "": site.findtext(
                f"{{{SVC}}}provisioning/{{{SVC}}}{leaf}"
            )
            or ""
            for site in data.iter(f"{{{SVC}}}site")
        }

    def wait_in_sync(self, count: int, timeout: float = 180) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        statuses: dict[str, str] = {}
        while time.monotonic() < deadline:
            statuses = self.statuses()
            if len(statuses) == count and all(v == "in-sync" for v in statuses.values()):
                break
            time.sleep(1)
        return statuses

    def dump_logs(self) -> None:
        for log in sorted(WORK.glob("*.log")):
            print(f"--- {log.name}\n{log.read_text()[-3000:]}", file=sys.stderr)

    def close(self) -> None:
        with suppress(Exception):
            self.m.close_session()
        for agent in self.agents.values():
            stop(agent)
        stop(self.server)


SERVER_SETTINGS = (
    f"<server><endpoint><address>{SERVER_ADDRESS}</address></endpoint>"
    "<confirm-timeout>60</confirm-timeout><unreachable-retry-limit>2</unreachable-retry-limit>"
    "</server>"
)


def provision_mesh(
    count: int, encapsulation: str, authentication: str | None = None
) -> dict[str, Any]:
    """A full mesh provisioned by the server: IKE-less (``authentication`` None), or IKE
    with pre-shared keys or certificates and charon on every CE."""
    sites = [Site(n) for n in range(1, count + 1)]
    lab = Lab()
    report: dict[str, Any] = {}
    if authentication is None:
        vpn = "<keying>ikeless</keying>"
        timers = ""
    else:
        vpn = (
            "<keying>ike</keying><security-profile>"
            f"<authentication>{authentication}</authentication></security-profile>"
        )
        timers = "<dpd><delay>2</delay><timeout>6</timeout></dpd>"
    try:
        lab.edit(
            f"{SERVER_SETTINGS}<vpn><id>lab</id><customer>lab</customer>{vpn}"
            f"<tunnel-defaults><encapsulation>{encapsulation}</encapsulation>{timers}"
            "</tunnel-defaults>" + "".join(site_xml(s) for s in sites) + "</vpn>"
        )
        started = time.monotonic()
        for s in sites:
            lab.enrol_and_start(s)
        report["statuses"] = lab.wait_in_sync(count)
        if authentication is not None:
            report["tunnels"] = wait_all_up(sites)
            report["all_up_after_s"] = time.monotonic() - started
        cap = capture("server-mesh")
        report["pings"] = {f"{a.n}->{b.n}": ping(a, b) for a in sites for b in sites if a != b}
        report["pe_ipv4"] = stop_capture(cap, "server-mesh")
        report["xfrm_states"] = {
            s.ce: subprocess.run(
                ["ip", "-n", s.ce, "xfrm", "state", "count"], capture_output=True, text=True
            ).stdout
            for s in sites
        }
        if authentication is not None:
            report.update(ike_facts(sites))
    except Exception:
        lab.dump_logs()
        raise
    finally:
        lab.close()
    return report


def wait_all_up(sites: list[Site], timeout: float = 90) -> dict[str, dict[str, str]]:
    """Each CE's charon, until every CE has all its peers up (or the timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        tunnels = {s.ce: peer_statuses(s) for s in sites}
        done = all(len(v) == len(sites) - 1 and set(v.values()) == {"up"} for v in tunnels.values())
        if done or time.monotonic() > deadline:
            return tunnels
        time.sleep(1)


def ike_facts(sites: list[Site]) -> dict[str, Any]:
    """What charon holds on each CE, whether a PSK reached any log, key file modes."""
    psks = sorted(
        {
            e.text or ""
            for s in sites
            for e in etree.fromstring(stored_running(WORK / s.ce)).iter(
                "{urn:cevpn:yang:cevpn-ce}pre-shared-key"
            )
        }
    )
    return {
        "charon_conns": {s.ce: charon_view(s) for s in sites},
        "psk_count": len(psks),
        "secrets_in_logs": grep_secrets(sites, psks),
        "key_files": {
            str(p.relative_to(WORK)): oct(p.stat().st_mode & 0o777)
            for s in sites
            for p in [WORK / s.ce / "ike_own_key.pem", WORK / s.ce / "ike" / "strongswan.conf"]
            if p.exists()
        },
    }


def charon_view(s: Site) -> dict[str, Any]:
    """Which connections and authentication each CE's charon holds (never the secrets)."""
    from nc_agent.ike.charon import Charon, text

    charon = Charon(WORK / s.ce, None)
    conns = charon.streamed("list-conns", "list-conn", {})
    view: dict[str, Any] = {}
    for entry in conns:
        for name, conn in entry.items():
            local = next(
                (v for k, v in conn.items() if text(k).startswith("local") and isinstance(v, dict)),
                {},
            )
            remote = next(
                (
                    v
                    for k, v in conn.items()
                    if text(k).startswith("remote") and isinstance(v, dict)
                ),
                {},
            )
            view[text(name)] = {
                "auth": text(local.get("class", "")),
                "remote-id": text(remote.get("id", "")),
            }
    return view


def unknown_peer(count: int) -> dict[str, Any]:
    """Pull model with a long interval: a new site's first packets make its peers fetch."""
    sites = [Site(n) for n in range(1, count + 1)]
    old, new = sites[:-1], sites[-1]
    lab = Lab()
    report: dict[str, Any] = {}
    try:
        lab.edit(
            SERVER_SETTINGS + "<vpn><id>lab</id><customer>lab</customer><keying>ikeless</keying>"
            "<autodiscovery>pull</autodiscovery><pull-interval>3600</pull-interval>"
            + "".join(site_xml(s) for s in old)
            + "</vpn>"
        )
        for s in old:
            lab.enrol_and_start(s)
        report["before"] = lab.wait_in_sync(len(old))
        lab.edit(f"<vpn><id>lab</id>{site_xml(new)}</vpn>")
        lab.enrol_and_start(new)  # it fetches at start-up and knows everyone
        report["first_ping_after_s"] = {}
        for s in old:
            started = time.monotonic()
            reached = False
            while time.monotonic() - started < 30 and not reached:
                reached = ping(new, s, count=1)
            report["first_ping_after_s"][s.ce] = time.monotonic() - started if reached else None
        report["pings"] = {f"{new.n}->{s.n}": ping(new, s) for s in old}
        report["old_logs"] = {
            s.ce: (WORK / f"{s.ce}.log")
            .read_text()
            .count("fetching the configuration: ESP arrived for an SA this CE does not have")
            for s in old
        }
    except Exception:
        lab.dump_logs()
        raise
    finally:
        lab.close()
    return report


def hub_and_spoke(count: int) -> dict[str, Any]:
    """Site 1 is the hub, the others spokes, static routing: a spoke has a tunnel to the
    hub only, and spoke-to-spoke traffic goes through the hub (its two tunnels carry it)."""
    sites = [Site(n) for n in range(1, count + 1)]
    hub, spokes = sites[0], sites[1:]
    lab = Lab()
    report: dict[str, Any] = {}

    def with_role(s: Site) -> str:
        role = "hub" if s == hub else "spoke"
        return site_xml(s).replace("</ce-address>", f"</ce-address><role>{role}</role>")

    try:
        lab.edit(
            SERVER_SETTINGS + "<vpn><id>lab</id><customer>lab</customer><keying>ikeless</keying>"
            "<topology><type>hub-and-spoke</type></topology>"
            + "".join(with_role(s) for s in sites)
            + "</vpn>"
        )
        for s in sites:
            lab.enrol_and_start(s)
        report["statuses"] = lab.wait_in_sync(count)
        report["devices"] = {s.ce: _tunnel_devices(s) for s in sites}
        a, b = spokes[0], spokes[1]
        report["route_get"] = subprocess.run(
            ["ip", "-n", a.vpn, "route", "get", b.host_address],
            capture_output=True, text=True,
        ).stdout.strip()  # fmt: skip
        cap = capture("hub-and-spoke")
        report["spoke_to_spoke"] = ping(a, b, count=3)
        report["spoke_to_hub"] = ping(a, hub)
        lines = stop_capture(cap, "hub-and-spoke")
        pairs = Counter(
            tuple(sorted((m.group(1), m.group(2))))
            for line in lines
            if "ESP(spi=" in line and (m := re.search(r"IP (\S+) > (\S+?):", line))
        )
        report["esp_pairs"] = {f"{x}<->{y}": n for (x, y), n in pairs.items()}
        report["pe_ipv4"] = lines
    except Exception:
        lab.dump_logs()
        raise
    finally:
        lab.close()
    return report


METRICS_PORT = 9100


def scrape(address: str, netns: str | None = None) -> dict[str, float]:
    """A daemon's Prometheus metrics (scraped from ``netns``): sample name with its labels
    -> value.  A CE's ingress policy admits nothing but IKE, ESP and management on its SP
    address, so its agent serves metrics on the namespace's loopback, scraped from there."""
    from prometheus_client.parser import text_string_to_metric_families

    fetch = (
        "import sys, urllib.request\n"
        f"url = 'http://{address}:{METRICS_PORT}/metrics'\n"
        "sys.stdout.write(urllib.request.urlopen(url, timeout=10).read().decode())\n"
    )
    prefix = ["ip", "netns", "exec", netns] if netns else []
    text = subprocess.run(
        [*prefix, str(BIN / "python"), "-c", fetch], capture_output=True, text=True, check=True
    ).stdout
    return {
        sample.name + json.dumps(sample.labels, sort_keys=True): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def server_alarms(lab: Lab) -> dict[tuple[str, str, str], tuple[str, str]]:
    """The server's RFC 8632 alarms: (resource, type, qualifier) -> (is-cleared, text)."""
    al = "urn:ietf:params:xml:ns:yang:ietf-alarms"
    data = lab.m.get(filter=("subtree", f'<alarms xmlns="{al}"/>')).data_ele
    return {
        (
            alarm.findtext(f"{{{al}}}resource") or "",
            (alarm.findtext(f"{{{al}}}alarm-type-id") or "").split(":")[-1],
            alarm.findtext(f"{{{al}}}alarm-type-qualifier") or "",
        ): (
            alarm.findtext(f"{{{al}}}is-cleared") or "",
            alarm.findtext(f"{{{al}}}alarm-text") or "",
        )
        for alarm in data.iter(f"{{{al}}}alarm")
    }


def tunnel_failure_alarm(count: int) -> dict[str, Any]:
    """An IKE mesh of two sites, the server and the agents serving metrics.  Site 2's CE
    drops off the network: site 1's CE notices by dead peer detection and says so to the
    server over its watcher session, and the server raises a tunnel-down alarm; when site 2
    returns and the tunnel is up again, the alarm clears.  Both daemons' metrics say the
    same at each step."""
    sites = [Site(n) for n in range(1, count + 1)]
    a, b = sites[0], sites[1]
    lab = Lab(None, SERVER_ADDRESS, "--metrics-listen", f":{METRICS_PORT}")
    report: dict[str, Any] = {}
    resource = "/svc:vpn-service/svc:vpn[svc:id='lab']/svc:site[svc:id='site-1']"
    key = (resource, "tunnel-down", "site-2")
    server_metric = 'cevpn_server_alarms{"severity": "major", "type": "tunnel-down"}'
    agent_metric = 'cevpn_agent_tunnel_up{"peer": "site-2"}'

    def alarm_is(cleared: str) -> bool:
        return server_alarms(lab).get(key, ("", ""))[0] == cleared

    try:
        lab.edit(
            SERVER_SETTINGS + "<vpn><id>lab</id><customer>lab</customer><keying>ike</keying>"
            "<security-profile><authentication>pre-shared-key</authentication>"
            "</security-profile><tunnel-defaults><encapsulation>transport-ipip</encapsulation>"
            "<dpd><delay>2</delay><timeout>6</timeout></dpd></tunnel-defaults>"
            + "".join(site_xml(s) for s in sites)
            + "</vpn>"
        )
        for s in sites:
            lab.enrol_and_start(s, "--metrics-listen", f"127.0.0.1:{METRICS_PORT}")
        report["statuses"] = lab.wait_in_sync(count)
        report["tunnels_before"] = wait_all_up(sites)
        report["alarm_before"] = server_alarms(lab).get(key, (None, ""))[0]
        report["agent_up_before"] = scrape("127.0.0.1", a.ce).get(agent_metric)

        subprocess.run(["ip", "-n", b.ce, "link", "set", "sp0", "down"], check=True)
        cut_at = time.monotonic()
        report["raised_after_s"] = wait_until(lambda: alarm_is("false"), 60)
        report["raised_s_from_cut"] = time.monotonic() - cut_at
        report["server_metric_raised"] = scrape(SERVER_ADDRESS).get(server_metric)
        report["agent_up_while_cut"] = scrape("127.0.0.1", a.ce).get(agent_metric)
        report["alarm_text"] = server_alarms(lab)[key][1]

        subprocess.run(["ip", "-n", b.ce, "link", "set", "sp0", "up"], check=True)
        subprocess.run(
            ["ip", "-n", b.ce, "route", "replace", "default", "via", b.pe_address], check=True
        )
        report["cleared_after_s"] = wait_until(lambda: alarm_is("true"), 120)
        report["server_metric_cleared"] = scrape(SERVER_ADDRESS).get(server_metric)
        report["agent_up_after"] = scrape("127.0.0.1", a.ce).get(agent_metric)
        report["ping_after"] = ping(a, b)
        after = scrape("127.0.0.1", a.ce)
        report["agent_sa"] = {
            f"{kind}_{direction}": after.get(
                f"cevpn_agent_sa_{kind}_total"
                + json.dumps({"direction": direction, "peer": "site-2"}, sort_keys=True)
            )
            for kind in ("bytes", "packets")
            for direction in ("in", "out")
        }
        report["agent_ike_failures"] = after.get('cevpn_agent_ike_failures_total{"peer": "site-2"}')
    except Exception:
        lab.dump_logs()
        raise
    finally:
        lab.close()
    return report


def nat_in_front_of(s: Site) -> None:
    """pe as the NAT in front of one CE: nothing from the VPN server's side (pe-inet) may
    open a connection to it, and its connections to the server leave masqueraded with
    pe's address.  ESP between CEs is routed as before (IKE-less SAs need fixed outer
    addresses).  iptables-legacy: this UML kernel's nf_tables has no address family
    (lab/uml.py), and the MASQUERADE target is the same netfilter NAT."""
    for rule in (
        f"-A FORWARD -i pe-inet -o pe-{s.ce} -m conntrack --ctstate NEW -j DROP",
        f"-t nat -A POSTROUTING -s {s.sp_address} -o pe-inet -j MASQUERADE",
    ):
        subprocess.run(["iptables-legacy", *rule.split()], check=True)


def call_home_behind_nat(count: int) -> dict[str, Any]:
    """The VPN server sits behind pe (in `inet`); the last CE is behind a NAT (pe
    masquerades it) and can only be managed through Call Home (RFC 8071); the others are
    dialled.  Every site pings every other through ESP."""
    sites = [Site(n) for n in range(1, count + 1)]
    natted = sites[-1]
    nat_in_front_of(natted)
    lab = Lab(netns="inet", address=INTERNET_HOST)
    report: dict[str, Any] = {}

    def with_call_home(s: Site) -> str:
        if s != natted:
            return site_xml(s)
        return site_xml(s).replace(
            "</ce-address>",
            "</ce-address><management><connection>call-home</connection></management>",
        )

    try:
        lab.edit(
            f"<server><endpoint><address>{INTERNET_HOST}</address></endpoint>"
            "<confirm-timeout>60</confirm-timeout>"
            "<unreachable-retry-limit>2</unreachable-retry-limit>"
            "<call-home><port>4334</port></call-home></server>"
            "<vpn><id>lab</id><customer>lab</customer><keying>ikeless</keying>"
            "<tunnel-defaults><encapsulation>transport-ipip</encapsulation></tunnel-defaults>"
            + "".join(with_call_home(s) for s in sites)
            + "</vpn>"
        )
        for s in sites:
            lab.enrol_and_start(s)
        report["statuses"] = lab.wait_in_sync(count)
        report["called_from"] = lab.statuses("called-from")
        report["server_dials_natted_ce"] = subprocess.run(
            ["ip", "netns", "exec", "inet", str(BIN / "python"), "-c",
             "import socket, sys\n"
             "try:\n"
             f"    socket.create_connection(('{natted.sp_address}', 830), 3)\n"
             "except OSError as exc:\n"
             "    sys.exit(f'refused: {exc}')\n"],
            capture_output=True, text=True,
        ).returncode == 0  # fmt: skip
        cap = capture("call-home")
        report["pings"] = {f"{a.n}->{b.n}": ping(a, b) for a in sites for b in sites if a != b}
        lines = stop_capture(cap, "call-home")
        report["esp_with_natted_ce"] = sum(
            1 for line in lines if "ESP(spi=" in line and f" {natted.sp_address}" in line
        )
        report["cleartext_lan"] = [line for line in lines if " 10." in line][:5]
        report["nat_counters"] = subprocess.run(
            ["iptables-legacy", "-t", "nat", "-L", "POSTROUTING", "-v", "-n"],
            capture_output=True, text=True,
        ).stdout  # fmt: skip
    except Exception:
        lab.dump_logs()
        raise
    finally:
        lab.close()
    return report


def _tunnel_devices(s: Site) -> list[str]:
    out = subprocess.run(
        ["ip", "-n", s.vpn, "-o", "link", "show"], capture_output=True, text=True, check=True
    ).stdout
    names = (line.split(":")[1].strip().split("@")[0] for line in out.splitlines())
    return sorted(n for n in names if n.startswith(("cvi", "cvt")))


def main() -> None:
    scenario, count = sys.argv[1], int(sys.argv[2])
    if scenario == "mesh-transport":
        report = provision_mesh(count, "transport-ipip")
    elif scenario == "mesh-tunnel":
        report = provision_mesh(count, "tunnel-mode")
    elif scenario in (
        "ike-psk-transport",
        "ike-psk-tunnel",
        "ike-cert-transport",
        "ike-cert-tunnel",
    ):
        _, auth, encap = scenario.split("-")
        report = provision_mesh(
            count,
            "transport-ipip" if encap == "transport" else "tunnel-mode",
            "pre-shared-key" if auth == "psk" else "certificate",
        )
    elif scenario == "hub-and-spoke":
        report = hub_and_spoke(count)
    elif scenario == "unknown-peer":
        report = unknown_peer(count)
    elif scenario == "call-home-nat":
        report = call_home_behind_nat(count)
    elif scenario == "tunnel-failure-alarm":
        report = tunnel_failure_alarm(count)
    else:
        raise SystemExit(f"unknown scenario {scenario}")
    (WORK / "report.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
