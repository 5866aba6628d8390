"""Run inside a lab guest: the VPN server in the provider core provisions real CE agents.

    python -m tests.lab.server_scenarios SCENARIO N     (after `tests.lab.topology build N`)

The server runs in `pe`; each CE agent is enrolled through the server's enrol
operation and started with `--bootstrap`, in its CE's SP namespace with the
kernel data plane.  The driver acts as an OSS: it only ever talks NETCONF to
the server.  Results go to $WORK/report.json.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import suppress
from pathlib import Path
from typing import Any

from lxml import etree
from ncclient import manager

from nc_server.application import bundle_document_from_xml
from tests.lab.agent_scenarios import capture, ping, stop_capture
from tests.lab.topology import Site

ROOT = Path(__file__).resolve().parents[2]
BIN = ROOT / ".venv" / "bin"
WORK = Path(os.environ.get("WORK", "/tmp"))
SVC = "urn:cevpn:yang:cevpn-service"
NC = "urn:ietf:params:xml:ns:netconf:base:1.0"
PASSWORD = "lab-operator-password"
SERVER_ADDRESS = "198.51.100.1"  # pe's address on its link to ce1: reachable from every CE


def start(argv: list[str], log: str, netns: str | None = None) -> subprocess.Popen[bytes]:
    prefix = ["ip", "netns", "exec", netns] if netns else []
    out = (WORK / log).open("ab")
    return subprocess.Popen([*prefix, *argv], stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True)  # fmt: skip


def wait_port(host: str, port: int, proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with status {proc.returncode}")
        with suppress(OSError), socket.create_connection((host, port), 0.5):
            return
        time.sleep(0.2)
    raise RuntimeError(f"{what} did not listen on {host} port {port}")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)


def provision_mesh(count: int, encapsulation: str) -> dict[str, Any]:
    sites = [Site(n) for n in range(1, count + 1)]
    state = WORK / "vpn-server"
    pw = WORK / "operator.pw"
    pw.write_text(PASSWORD + "\n")
    subprocess.run([str(BIN / "cevpn-server"), "adduser", "--state-dir", str(state), "oss",
                    "--password-file", str(pw), "--group", "operators"],
                   check=True, capture_output=True)  # fmt: skip
    server = start([str(BIN / "cevpn-server"), "--state-dir", str(state), "--listen", ":830"],
                   "vpn-server.log")  # fmt: skip
    agents: list[subprocess.Popen[bytes]] = []
    report: dict[str, Any] = {}
    try:
        wait_port(SERVER_ADDRESS, 830, server, "the VPN server")
        host_key = (state / "ssh_host_ed25519_key.pub").read_text().split()[1]
        m = manager.connect(host=SERVER_ADDRESS, port=830, username="oss", password=PASSWORD,
                            hostkey_verify=True, hostkey_b64=host_key, allow_agent=False,
                            look_for_keys=False, timeout=120)  # fmt: skip
        site_xml = "".join(
            f"<site><id>site-{s.n}</id><ce-address>{s.sp_address}</ce-address>"
            f"<local-prefix>{s.lan_prefix}</local-prefix></site>"
            for s in sites
        )
        m.edit_config(target="running", config=(
            f'<config xmlns="{NC}"><vpn-service xmlns="{SVC}"><server><endpoint>'
            f"<address>{SERVER_ADDRESS}</address></endpoint><confirm-timeout>60</confirm-timeout>"
            "<unreachable-retry-limit>2</unreachable-retry-limit></server>"
            "<vpn><id>lab</id><customer>lab</customer><keying>ikeless</keying>"
            f"<tunnel-defaults><encapsulation>{encapsulation}</encapsulation></tunnel-defaults>"
            f"{site_xml}</vpn></vpn-service></config>"
        ))  # fmt: skip
        for s in sites:
            request = etree.fromstring(
                f'<enrol xmlns="{SVC}"><vpn>lab</vpn><site>site-{s.n}</site></enrol>'
            )
            reply = etree.fromstring(m.dispatch(request).xml.encode())
            bundle = reply.find(f".//{{{SVC}}}bundle")
            assert bundle is not None
            path = WORK / f"{s.ce}.bundle.json"
            path.write_text(json.dumps(bundle_document_from_xml(bundle)))
            path.chmod(0o600)
            agent = start([str(BIN / "cevpn-agent"), "--state-dir", str(WORK / s.ce),
                           "--bootstrap", str(path), "--vpn-netns", s.vpn],
                          f"{s.ce}.log", s.ce)  # fmt: skip
            agents.append(agent)
            wait_port(s.sp_address, 830, agent, f"agent {s.ce}")
        deadline = time.monotonic() + 180
        statuses: dict[str, str] = {}
        while time.monotonic() < deadline:
            data = m.get(filter=("subtree", f'<vpn-service xmlns="{SVC}"/>')).data_ele
            statuses = {
                site.findtext(f"{{{SVC}}}id") or "": site.findtext(
                    f"{{{SVC}}}provisioning/{{{SVC}}}status"
                )
                or ""
                for site in data.iter(f"{{{SVC}}}site")
            }
            if len(statuses) == count and all(v == "in-sync" for v in statuses.values()):
                break
            time.sleep(1)
        report["statuses"] = statuses
        cap = capture("server-mesh")
        report["pings"] = {f"{a.n}->{b.n}": ping(a, b) for a in sites for b in sites if a != b}
        report["pe_ipv4"] = stop_capture(cap, "server-mesh")
        report["xfrm_states"] = {
            s.ce: subprocess.run(
                ["ip", "-n", s.ce, "xfrm", "state", "count"], capture_output=True, text=True
            ).stdout
            for s in sites
        }
        m.close_session()
    except Exception:
        for s in sites:
            log = WORK / f"{s.ce}.log"
            if log.exists():
                print(f"--- {s.ce}\n{log.read_text()[-3000:]}", file=sys.stderr)
        print(f"--- server\n{(WORK / 'vpn-server.log').read_text()[-3000:]}", file=sys.stderr)
        raise
    finally:
        for agent in agents:
            stop(agent)
        stop(server)
    return report


def main() -> None:
    scenario, count = sys.argv[1], int(sys.argv[2])
    if scenario == "mesh-transport":
        report = provision_mesh(count, "transport-ipip")
    elif scenario == "mesh-tunnel":
        report = provision_mesh(count, "tunnel-mode")
    else:
        raise SystemExit(f"unknown scenario {scenario}")
    (WORK / "report.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
