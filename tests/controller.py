"""A VPN server and enrolled CE agents on this machine, over real SSH (integration tests).

The agents run with ``--dataplane none``: NETCONF, datastore, bootstrap and
pull are real; the kernel is left alone (the UML lab tests the data plane).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lxml import etree

from nc_core.journal import stored_running
from tests.netconf_server import (
    ADMIN,
    BIN,
    ServerProcess,
    free_port,
    ncclient_connect,
    wait_listening,
)
from tests.waiting import wait_for

SVC_NS = "urn:cevpn:yang:cevpn-service"
CE_NS = "urn:cevpn:yang:cevpn-ce"


@dataclass
class Agent:
    site: str
    state_dir: Path
    port: int
    bundle: Path
    proc: subprocess.Popen[bytes] | None = None
    extra: tuple[str, ...] = ()

    def start(self, *, wait: bool = True) -> None:
        """Start the agent; ``wait``: until it listens on its management port."""
        log = (self.state_dir.parent / f"{self.site}.log").open("ab")
        self.proc = subprocess.Popen(
            [
                str(BIN / "cevpn-agent"),
                "--state-dir",
                str(self.state_dir),
                "--bootstrap",
                str(self.bundle),
                "--dataplane",
                "none",
                *self.extra,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log_path = self.state_dir.parent / f"{self.site}.log"
        if wait:
            wait_listening(self.proc, "127.0.0.1", self.port, f"agent {self.site}", log_path)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(15)
        self.proc = None

    def connect_as_server(self, server: ServerProcess) -> Any:
        """A NETCONF session to this agent with the VPN server's own account and key."""
        from nc_core.client import Endpoint, connect

        host_key = (self.state_dir / "ssh_host_ed25519_key.pub").read_text().strip()
        return connect(
            Endpoint(
                host="127.0.0.1",
                port=self.port,
                host_keys=[host_key],
                username="cevpn-server",
                key_file=server.state_dir / "southbound_ed25519_key",
            )
        )

    def connect_to_server(self, server: ServerProcess) -> Any:
        """A NETCONF session to the VPN server with this CE's own account and key, as its
        fetches use."""
        from nc_core.client import Endpoint, connect

        return connect(
            Endpoint(
                host="127.0.0.1",
                port=server.port,
                host_keys=[server.host_key_line],
                username=f"ce-{self.site}",
                key_file=self.state_dir / "vpn_server_client_key",
            )
        )

    def running_ce(self) -> dict[str, Any]:
        """The agent's running /ce as a dict of peers and versions (read locally, as root)."""
        root = etree.fromstring(stored_running(self.state_dir))
        ce = root.find(f"{{{CE_NS}}}ce")
        if ce is None:
            return {"version": None, "peers": [], "port": None}
        return {
            "version": ce.findtext(f"{{{CE_NS}}}configuration-version"),
            "peers": sorted(
                p.findtext(f"{{{CE_NS}}}name") or "" for p in ce.iterfind(f"{{{CE_NS}}}peer")
            ),
            "port": ce.findtext(
                f"{{{CE_NS}}}pre-configuration/{{{CE_NS}}}management/{{{CE_NS}}}port"
            ),
        }


@dataclass
class Controller:
    tmp: Path
    server: ServerProcess
    agents: dict[str, Agent] = field(default_factory=dict)

    def nc(self, user: tuple[str, str] = ADMIN) -> Any:
        return ncclient_connect(self.server, user)

    def edit(self, config: str, user: tuple[str, str] = ADMIN) -> None:
        with self.nc(user) as m:
            m.edit_config(
                target="running",
                config=f'<config xmlns="urn:ietf:params:xml:ns:netconf:base:1.0">{config}</config>',
            )

    def rpc(self, xml: str, user: tuple[str, str] = ADMIN) -> etree._Element:
        with self.nc(user) as m:
            return etree.fromstring(m.dispatch(etree.fromstring(xml)).xml.encode())

    def provisioning(self) -> dict[str, dict[str, str]]:
        with self.nc() as m:
            data = m.get(filter=("subtree", f'<vpn-service xmlns="{SVC_NS}"/>')).data_ele
        out: dict[str, dict[str, str]] = {}
        for site in data.iter(f"{{{SVC_NS}}}site"):
            prov = site.find(f"{{{SVC_NS}}}provisioning")
            if prov is None:
                continue
            out[site.findtext(f"{{{SVC_NS}}}id") or ""] = {
                etree.QName(c).localname: c.text or "" for c in prov
            }
        return out

    def wait_status_notification(
        self, m: Any, site: str, status: str, timeout: float = 60
    ) -> dict[str, str]:
        """The next provisioning-status-changed of ``site`` to ``status`` on the
        subscribed session ``m`` (ncclient, create_subscription done)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            n = m.take_notification(block=True, timeout=1)
            if n is None:
                continue
            event = etree.fromstring(n.notification_xml.encode()).find(
                f"{{{SVC_NS}}}provisioning-status-changed"
            )
            if event is None:
                continue
            leaves = {etree.QName(c).localname: c.text or "" for c in event}
            if leaves.get("site") == site and leaves.get("status") == status:
                return leaves
        raise AssertionError(f"no provisioning-status-changed of {site} to {status}")

    def status(self, site: str) -> str | None:
        return self.provisioning().get(site, {}).get("status")

    def enrol(self, vpn: str, site: str, port: int, *extra: str) -> Agent:
        from nc_server.enrolment import bundle_document_from_xml

        data = self.rpc(f'<enrol xmlns="{SVC_NS}"><vpn>{vpn}</vpn><site>{site}</site></enrol>')
        bundle = data.find(f".//{{{SVC_NS}}}bundle")
        assert bundle is not None
        path = self.tmp / f"{site}.bundle.json"
        path.write_text(json.dumps(bundle_document_from_xml(bundle)))
        path.chmod(0o600)
        agent = Agent(site, self.tmp / f"agent-{site}", port, path, extra=extra)
        self.agents[site] = agent
        return agent

    def enrol_from_file(self, vpn: str, site: str, bundle: Path) -> Agent:
        """An agent for a bundle `cevpn-server enrol` wrote (the port is in the bundle)."""
        document = json.loads(bundle.read_text())
        port = document["cevpn-ce:ce"]["pre-configuration"]["management"]["port"]
        agent = Agent(site, self.tmp / f"agent-{site}", int(port), bundle)
        self.agents[site] = agent
        return agent

    def add_site(
        self,
        vpn: str,
        site: str,
        n: int,
        prefix: str,
        *,
        role: str | None = None,
        port: int | None = None,
    ) -> int:
        """Add a site whose CE is managed at 127.0.0.1:``port`` (a free port if None)."""
        port = port or free_port()
        role_xml = f"<role>{role}</role>" if role else ""
        self.edit(
            f'<vpn-service xmlns="{SVC_NS}"><vpn><id>{vpn}</id><site><id>{site}</id>'
            f"<ce-address>192.0.2.{n}</ce-address><management><address>127.0.0.1</address>"
            f"<port>{port}</port></management>{role_xml}<local-prefix>{prefix}</local-prefix>"
            "</site></vpn></vpn-service>"
        )
        return port

    def join(self, vpn: str, site: str, n: int, prefix: str, *, role: str | None = None) -> Agent:
        port = self.add_site(vpn, site, n, prefix, role=role)
        agent = self.enrol(vpn, site, port)
        agent.start()
        return agent

    def in_sync(self, *sites: str, timeout: float = 60.0) -> None:
        def check() -> bool:
            prov = self.provisioning()
            return all(prov.get(s, {}).get("status") == "in-sync" for s in sites)

        wait_for(check, timeout, f"{sites} in-sync (now {self.provisioning()})")


@contextlib.contextmanager
def controller(
    tmp: Path, *, server_args: tuple[str, ...] = (), **server_settings: Any
) -> Iterator[Controller]:
    server = ServerProcess("cevpn-server", tmp / "server", free_port())
    server.adduser(ADMIN[0], ADMIN[1], ("admin",))
    server.start(*server_args)
    ctl = Controller(tmp, server)
    settings = {
        "confirm-timeout": 8,
        "unreachable-retry-limit": 2,
        "ce-orphan-after": 2,
        **server_settings,
    }
    leaves = "".join(f"<{k}>{v}</{k}>" for k, v in settings.items())
    try:
        ctl.edit(
            f'<vpn-service xmlns="{SVC_NS}"><server><endpoint><address>127.0.0.1</address>'
            f"<port>{server.port}</port></endpoint>{leaves}</server></vpn-service>"
        )
        yield ctl
    finally:
        for agent in ctl.agents.values():
            agent.stop()
        server.stop()


def vpn_xml(
    vpn: str,
    *,
    topology: str = "full-mesh",
    keying: str = "ikeless",
    autodiscovery: str = "push",
    pull_interval: int = 2,
    customer: str = "acme",
    removal: str = "deprovision",
) -> str:
    pull = f"<pull-interval>{pull_interval}</pull-interval>" if autodiscovery != "push" else ""
    return (
        f'<vpn-service xmlns="{SVC_NS}"><vpn><id>{vpn}</id><customer>{customer}</customer>'
        f"<topology><type>{topology}</type></topology><keying>{keying}</keying>"
        f"<autodiscovery>{autodiscovery}</autodiscovery>{pull}"
        f"<site-removal>{removal}</site-removal></vpn></vpn-service>"
    )
