"""The VPN server keeps standing NETCONF sessions to its CEs and proves each change over them.

A firewall rule on this machine drops *new* TCP connections (their SYN) to a CE's
management port while established ones keep flowing: a push that still
reaches the CE went over the sessions the server already had; a push whose
confirmation needs a brand-new connection cannot be confirmed, and the CE
rolls it back by itself (RFC 6241 confirmed commit, seed 3.2).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from lxml import etree

from tests.controller import SVC_NS, Controller, controller, vpn_xml
from tests.firewall import HAVE_NFT, new_connections_refused
from tests.waiting import wait_for

pytestmark = [
    pytest.mark.timeout(300),
    pytest.mark.skipif(not HAVE_NFT, reason="needs nftables"),
]


def mesh(ctl: Controller, vpn: str, n: int) -> None:
    ctl.edit(vpn_xml(vpn))
    for i in range(1, n + 1):
        ctl.join(vpn, f"{vpn}-s{i}", i, f"10.{i}.0.0/24")
    ctl.in_sync(*(f"{vpn}-s{i}" for i in range(1, n + 1)))


def test_a_new_peer_reaches_ces_over_the_sessions_the_server_already_holds(
    tmp_path: Path,
) -> None:
    with controller(tmp_path) as ctl:
        mesh(ctl, "jade", 2)
        s1, s2 = ctl.agents["jade-s1"], ctl.agents["jade-s2"]
        with new_connections_refused(s1.port, s2.port):
            ctl.join("jade", "jade-s3", 3, "10.3.0.0/24")
            ctl.in_sync("jade-s1", "jade-s2", "jade-s3")
        assert s1.running_ce()["peers"] == ["jade-s2", "jade-s3"]
        assert s2.running_ce()["peers"] == ["jade-s1", "jade-s3"]


def test_a_change_to_the_management_path_is_confirmed_only_over_a_new_connection(
    tmp_path: Path,
) -> None:
    """Making a site the VPN's Internet gateway changes every CE's Internet access, which
    may decide whether management traffic still arrives: an established session proves
    nothing then, the new connection is refused, and the CE rolls the change back."""
    with controller(tmp_path, **{"confirm-timeout": 6}) as ctl:
        mesh(ctl, "onyx", 2)
        s1 = ctl.agents["onyx-s1"]
        before = s1.running_ce()["version"]
        with new_connections_refused(s1.port):
            ctl.edit(
                f'<vpn-service xmlns="{SVC_NS}"><vpn><id>onyx</id>'
                "<internet-gateway>onyx-s2</internet-gateway></vpn></vpn-service>"
            )
            wait_for(lambda: ctl.status("onyx-s1") == "failed", 60, "push not confirmed")
            error = ctl.provisioning()["onyx-s1"]["last-error"]
            assert "not confirmed" in error and "rolls back" in error
            # The CE took the change, then put its previous configuration back by itself.
            wait_for(lambda: s1.running_ce()["version"] == before, 30, "rollback on the CE")
        ctl.in_sync("onyx-s2")


def test_a_restarted_ce_is_provisioned_over_a_new_link(tmp_path: Path) -> None:
    """The CE's process restarts: the standing sessions died with it, and the next push
    opens new ones by itself, the CE never reported unreachable."""
    with controller(tmp_path) as ctl:
        mesh(ctl, "ruby", 2)
        s1 = ctl.agents["ruby-s1"]
        s1.stop()
        s1.start()
        with ctl.nc() as m:
            m.create_subscription()
            ctl.join("ruby", "ruby-s3", 3, "10.3.0.0/24")
            ctl.in_sync("ruby-s1", "ruby-s2", "ruby-s3")
            statuses = []
            while (n := m.take_notification(block=False)) is not None:
                event = etree.fromstring(n.notification_xml.encode()).find(
                    f"{{{SVC_NS}}}provisioning-status-changed"
                )
                if event is not None and event.findtext(f"{{{SVC_NS}}}site") == "ruby-s1":
                    statuses.append(event.findtext(f"{{{SVC_NS}}}status"))
        assert "unreachable" not in statuses and statuses[-1:] == ["in-sync"]
        assert s1.running_ce()["peers"] == ["ruby-s2", "ruby-s3"]


def test_each_link_carries_a_watcher_session_subscribed_to_the_ces_tunnel_events(
    tmp_path: Path,
) -> None:
    """Editor, confirmer and watcher: three sessions of the server's account, from one
    address (one SSH connection).  What the watcher hears is the lab's to show."""
    mon = "urn:ietf:params:xml:ns:yang:ietf-netconf-monitoring"
    with controller(tmp_path) as ctl:
        mesh(ctl, "opal", 2)
        s1 = ctl.agents["opal-s1"]
        with s1.connect_as_server(ctl.server) as m:
            mine = m.session_id

            def server_sessions() -> list[etree._Element]:
                reply = m.get(
                    filter=("subtree", f'<netconf-state xmlns="{mon}"><sessions/></netconf-state>')
                )
                return [
                    s
                    for s in reply.data_ele.iter(f"{{{mon}}}session")
                    if s.findtext(f"{{{mon}}}username") == "cevpn-server"
                    and s.findtext(f"{{{mon}}}session-id") != str(mine)
                ]

            wait_for(lambda: len(server_sessions()) == 3, 30, "three sessions of the server")
            sessions = server_sessions()
        assert len({s.findtext(f"{{{mon}}}source-host") for s in sessions}) == 1


def test_a_persistent_commit_left_by_a_server_that_restarted_is_waited_out_not_failed(
    tmp_path: Path,
) -> None:
    """A server killed between its commit and its confirmation leaves the CE a persistent
    confirmed commit whose token died with it.  The next push is refused for that; the
    server waits for the CE's rollback and pushes again, instead of calling the CE failed."""
    with controller(tmp_path) as ctl:
        mesh(ctl, "pearl", 2)
        s1 = ctl.agents["pearl-s1"]
        with s1.connect_as_server(ctl.server) as old_server:
            old_server.commit(confirmed=True, timeout="20", persist="token-of-a-dead-server")
            ctl.join("pearl", "pearl-s3", 3, "10.3.0.0/24")

            def waiting() -> bool:
                prov = ctl.provisioning()["pearl-s1"]
                return prov["status"] == "pending" and "rolls back" in prov.get("last-error", "")

            wait_for(waiting, 30, "pearl-s1 waiting for the CE's rollback")
        ctl.in_sync("pearl-s1", "pearl-s2", "pearl-s3")
        assert s1.running_ce()["peers"] == ["pearl-s2", "pearl-s3"]


def test_a_confirmation_lost_on_a_working_management_path_is_pushed_again_not_failed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CE takes a new peer but answers the confirmation with an error (a busy or
    failing CE, injected while a file exists).  The change leaves the management path alone
    and the CE answered over it: nothing says the change is bad, so the server retries as
    for an unreachable CE instead of calling it failed, and the CE ends with the peer."""
    armed = tmp_path / "confirmations-fail"
    monkeypatch.setenv("CEVPN_FAULTS", "confirming-commit=raise")
    monkeypatch.setenv("CEVPN_FAULTS_ARMED", str(armed))
    with controller(tmp_path, **{"confirm-timeout": 4}) as ctl:
        mesh(ctl, "amber", 2)
        s1 = ctl.agents["amber-s1"]
        armed.touch()
        ctl.join("amber", "amber-s3", 3, "10.3.0.0/24")

        def retried() -> bool:
            prov = ctl.provisioning()["amber-s1"]
            error = prov.get("last-error", "")
            return prov["status"] == "unreachable" and "not confirmed" in error

        wait_for(retried, 60, "amber-s1's lost confirmation reported as a retry")
        assert "is retried" in ctl.provisioning()["amber-s1"]["last-error"]
        assert ctl.status("amber-s1") != "failed"
        armed.unlink()
        ctl.in_sync("amber-s1", "amber-s2", "amber-s3", timeout=90)
        assert s1.running_ce()["peers"] == ["amber-s2", "amber-s3"]
