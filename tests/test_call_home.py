"""NETCONF Call Home (RFC 8071): a CE the server cannot reach dials the server, and is
managed over that connection exactly like a CE the server dials.

Every CE here is a real agent (``--dataplane none``) and the server a real
process.  A call-home CE's management port is closed to new connections by
nftables for the whole test (what a NAT or a site firewall does), so every
push that reaches it went over a connection the CE opened.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from ncclient.operations.rpc import RPCError

from nc_core.asyncssh_import import asyncssh
from tests.controller import SVC_NS, Agent, Controller, controller, vpn_xml
from tests.firewall import HAVE_NFT, new_connections_refused
from tests.netconf_server import free_port
from tests.waiting import wait_for

pytestmark = [
    pytest.mark.timeout(300),
    pytest.mark.skipif(not HAVE_NFT, reason="needs nftables"),
]


def call_home_server(tmp: Path, port: int, **settings: object):  # type: ignore[no-untyped-def]
    return controller(tmp, **{"call-home": f"<port>{port}</port>"}, **settings)


def add_call_home_site(ctl: Controller, vpn: str, site: str, n: int) -> int:
    """A site whose CE calls home; returns the management port it would listen on."""
    port = free_port()
    ctl.edit(
        f'<vpn-service xmlns="{SVC_NS}"><vpn><id>{vpn}</id><site><id>{site}</id>'
        f"<ce-address>192.0.2.{n}</ce-address><management><address>127.0.0.1</address>"
        f"<port>{port}</port><connection>call-home</connection></management>"
        f"<local-prefix>10.{n}.0.0/24</local-prefix></site></vpn></vpn-service>"
    )
    return port


def enrol_call_home(ctl: Controller, vpn: str, site: str, n: int) -> Agent:
    port = add_call_home_site(ctl, vpn, site, n)
    return ctl.enrol(vpn, site, port)


def server_log(ctl: Controller) -> str:
    return ctl.server.log_path.read_text()


@contextmanager
def one_dialled_one_calling(ctl: Controller, vpn: str) -> Iterator[Agent]:
    """A VPN of two sites in sync: ``<vpn>-s1`` dialled by the server, ``<vpn>-s2`` (yielded)
    calling home with its management port closed to new connections while this lasts."""
    ctl.edit(vpn_xml(vpn))
    ctl.join(vpn, f"{vpn}-s1", 1, "10.1.0.0/24")
    s2 = enrol_call_home(ctl, vpn, f"{vpn}-s2", 2)
    with new_connections_refused(s2.port):
        s2.start(wait=False)
        ctl.in_sync(f"{vpn}-s1", f"{vpn}-s2")
        yield s2


def test_a_ce_reachable_only_by_its_own_calls_is_provisioned(tmp_path: Path) -> None:
    ch = free_port()
    with call_home_server(tmp_path, ch) as ctl:
        with one_dialled_one_calling(ctl, "amber") as s2:
            assert s2.running_ce()["peers"] == ["amber-s1"]
            assert ctl.provisioning()["amber-s2"]["called-from"] == "127.0.0.1"
            # A later change reaches it over the same call.
            ctl.join("amber", "amber-s3", 3, "10.3.0.0/24")
            ctl.in_sync("amber-s1", "amber-s2", "amber-s3")
            assert s2.running_ce()["peers"] == ["amber-s1", "amber-s3"]
        assert "called-from" not in ctl.provisioning()["amber-s1"]


def test_the_bundle_of_a_call_home_site_lists_the_servers_call_home_endpoints(
    tmp_path: Path,
) -> None:
    ch = free_port()
    with call_home_server(tmp_path, ch) as ctl:
        ctl.edit(vpn_xml("beryl"))
        agent = enrol_call_home(ctl, "beryl", "beryl-s1", 1)
        pre = json.loads(agent.bundle.read_text())["cevpn-ce:ce"]["pre-configuration"]
        assert pre["management"]["call-home"] == {
            "endpoint": [{"address": "127.0.0.1", "port": ch}]
        }
        dialled = ctl.enrol(
            "beryl", "beryl-s2", ctl.add_site("beryl", "beryl-s2", 2, "10.2.0.0/24")
        )
        pre = json.loads(dialled.bundle.read_text())["cevpn-ce:ce"]["pre-configuration"]
        assert "call-home" not in pre["management"]


def test_a_call_home_site_needs_the_servers_call_home_listener(tmp_path: Path) -> None:
    with controller(tmp_path) as ctl:
        ctl.edit(vpn_xml("coral"))
        with pytest.raises(Exception, match="needs the server's call-home listener"):
            add_call_home_site(ctl, "coral", "coral-s1", 1)


def test_a_caller_whose_host_key_is_not_pinned_is_refused(tmp_path: Path) -> None:
    """Behind a NAT the address says nothing: only the host key identifies a CE."""
    ch = free_port()
    with call_home_server(tmp_path, ch) as ctl:
        ctl.edit(vpn_xml("dune"))
        enrol_call_home(ctl, "dune", "dune-s1", 1)  # enrolled, but never started

        async def call_with_a_stranger_key() -> BaseException | None:
            key = asyncssh.generate_private_key("ssh-ed25519")
            try:
                conn = await asyncssh.connect_reverse(
                    "127.0.0.1", ch, server_host_keys=[key], encoding=None
                )
            except (OSError, asyncssh.Error) as exc:
                return exc
            await asyncio.wait_for(conn.wait_closed(), 30)
            return None

        outcome = asyncio.run(call_with_a_stranger_key())
        assert outcome is None or isinstance(outcome, (OSError, asyncssh.Error))
        wait_for(
            lambda: "is not pinned for any call-home CE" in server_log(ctl),
            30,
            "the refusal in the server's log",
        )
        assert "called-from" not in ctl.provisioning().get("dune-s1", {})


def test_a_ce_calls_again_after_the_server_restarts_and_gets_what_changed(
    tmp_path: Path,
) -> None:
    ch = free_port()
    with call_home_server(tmp_path, ch) as ctl:
        with one_dialled_one_calling(ctl, "ember") as s2:
            ctl.server.stop()
            ctl.server.start()
            ctl.join("ember", "ember-s3", 3, "10.3.0.0/24")
            ctl.in_sync("ember-s1", "ember-s2", "ember-s3")
            assert s2.running_ce()["peers"] == ["ember-s1", "ember-s3"]


def test_the_ce_tries_its_call_home_endpoints_in_order(tmp_path: Path) -> None:
    """The first endpoint refuses the connection; the CE goes on to the next one."""
    ch = free_port()
    with call_home_server(tmp_path, ch) as ctl:
        ctl.edit(vpn_xml("flint"))
        agent = enrol_call_home(ctl, "flint", "flint-s1", 1)
        document = json.loads(agent.bundle.read_text())
        management = document["cevpn-ce:ce"]["pre-configuration"]["management"]
        dead = {"address": "127.0.0.2", "port": ch}  # the server listens on 127.0.0.1 only
        management["call-home"]["endpoint"].insert(0, dead)
        agent.bundle.write_text(json.dumps(document))
        with new_connections_refused(agent.port):
            agent.start(wait=False)
            ctl.in_sync("flint-s1")
        log = (tmp_path / "flint-s1.log").read_text()
        assert f"call home to 127.0.0.2 port {ch} failed" in log


def test_a_change_to_a_call_home_ces_management_path_is_confirmed_over_its_next_call(
    tmp_path: Path,
) -> None:
    """The server cuts the call the change was committed over; the CE calls again, and
    that new connection confirms the change (it proves the CE still reaches the server)."""
    ch = free_port()
    with call_home_server(tmp_path, ch) as ctl:
        with one_dialled_one_calling(ctl, "garnet") as s2:
            calls = server_log(ctl).count("call-home CE garnet-s2 connected")
            before = s2.running_ce()["version"]
            ctl.edit(
                f'<vpn-service xmlns="{SVC_NS}"><vpn><id>garnet</id>'
                "<internet-gateway>garnet-s1</internet-gateway></vpn></vpn-service>"
            )
            wait_for(lambda: s2.running_ce()["version"] != before, 60, "the change on the CE")
            ctl.in_sync("garnet-s1", "garnet-s2")
        assert server_log(ctl).count("call-home CE garnet-s2 connected") > calls


def test_a_call_home_ce_that_cannot_call_back_rolls_the_change_back(tmp_path: Path) -> None:
    """The change is committed over the open call; the CE's next call is refused (the
    change cut its way to the server, as far as anyone can tell), so the change is
    never confirmed and the CE puts its previous configuration back by itself."""
    ch = free_port()
    with call_home_server(tmp_path, ch, **{"confirm-timeout": 6}) as ctl:
        with one_dialled_one_calling(ctl, "henna") as s2:
            before = s2.running_ce()["version"]
            with new_connections_refused(ch):
                ctl.edit(
                    f'<vpn-service xmlns="{SVC_NS}"><vpn><id>henna</id>'
                    "<internet-gateway>henna-s1</internet-gateway></vpn></vpn-service>"
                )
                wait_for(lambda: ctl.status("henna-s2") == "failed", 60, "push not confirmed")
                error = ctl.provisioning()["henna-s2"]["last-error"]
                assert "not confirmed" in error and "rolls back" in error
                wait_for(lambda: s2.running_ce()["version"] == before, 30, "rollback on the CE")
            # Its calls get through again: the change is pushed once more, and confirmed.
            ctl.in_sync("henna-s2")
            assert s2.running_ce()["version"] != before


def test_a_call_home_port_the_server_cannot_listen_on_refuses_the_commit(tmp_path: Path) -> None:
    with socket.socket() as taken, controller(tmp_path) as ctl:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(RPCError) as refused:
            ctl.edit(
                f'<vpn-service xmlns="{SVC_NS}"><server><call-home><port>{port}</port>'
                "</call-home></server></vpn-service>"
            )
        assert refused.value.tag == "operation-failed"
        assert f"Cannot accept call-home connections on port {port}" in refused.value.message
        assert refused.value.path.endswith("/cevpn-svc:call-home/cevpn-svc:port")
        with ctl.nc() as m:
            running = m.get_config(
                "running", filter=("subtree", f'<vpn-service xmlns="{SVC_NS}"/>')
            )
        assert "call-home" not in running.data_xml
