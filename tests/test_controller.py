"""The VPN server provisions real CE agents over real SSH (seed 3.1-3.6).

Agents run with --dataplane none (kernel untouched); the data plane is
proven in tests/lab/test_server_lab.py.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from ncclient.operations.rpc import RPCError

from nc_core.journal import stored_running
from tests.controller import CE_NS, SVC_NS, Controller, controller, vpn_xml
from tests.netconf_server import BIN, free_port
from tests.waiting import wait_for

pytestmark = pytest.mark.timeout(300)


def mesh(ctl: Controller, vpn: str, n: int, **kw: object) -> None:
    ctl.edit(vpn_xml(vpn, **kw))  # type: ignore[arg-type]
    for i in range(1, n + 1):
        ctl.join(vpn, f"{vpn}-s{i}", i, f"10.{i}.0.0/24")


def test_enrolled_agents_of_a_full_mesh_are_provisioned_with_every_other_site(
    tmp_path: Path,
) -> None:
    with controller(tmp_path) as ctl:
        mesh(ctl, "red", 3)
        ctl.in_sync("red-s1", "red-s2", "red-s3")
        prov = ctl.provisioning()
        for i in (1, 2, 3):
            ce = ctl.agents[f"red-s{i}"].running_ce()
            assert ce["peers"] == sorted(f"red-s{j}" for j in (1, 2, 3) if j != i)
            assert ce["version"] == prov[f"red-s{i}"]["applied-version"]
            assert prov[f"red-s{i}"]["peer-count"] == "2"


def test_hub_and_spoke_spokes_get_only_the_hub(tmp_path: Path) -> None:
    with controller(tmp_path) as ctl:
        sites = "".join(
            f"<site><id>{name}</id><ce-address>192.0.2.{n}</ce-address><role>{role}</role>"
            f"<management><address>127.0.0.1</address><port>{port}</port></management>"
            f"<local-prefix>10.{n}.0.0/24</local-prefix></site>"
            for name, n, role, port in (
                ("hub", 1, "hub", free_port()),
                ("spoke-a", 2, "spoke", free_port()),
                ("spoke-b", 3, "spoke", free_port()),
            )
        )
        ctl.edit(
            f'<vpn-service xmlns="{SVC_NS}"><vpn><id>star</id><customer>acme</customer>'
            "<topology><type>hub-and-spoke</type></topology><keying>ikeless</keying>"
            f"{sites}</vpn></vpn-service>"
        )
        with ctl.nc() as m:
            data = m.get_config("running", filter=("subtree", f'<vpn-service xmlns="{SVC_NS}"/>'))
        ports = {
            s.findtext(f"{{{SVC_NS}}}id"): int(
                s.findtext(f"{{{SVC_NS}}}management/{{{SVC_NS}}}port") or 0
            )
            for s in data.data_ele.iter(f"{{{SVC_NS}}}site")
        }
        for site, port in ports.items():
            ctl.enrol("star", str(site), port).start()
        ctl.in_sync("hub", "spoke-a", "spoke-b")
        assert ctl.agents["hub"].running_ce()["peers"] == ["spoke-a", "spoke-b"]
        assert ctl.agents["spoke-a"].running_ce()["peers"] == ["hub"]
        assert ctl.agents["spoke-b"].running_ce()["peers"] == ["hub"]


@pytest.mark.parametrize("mode", ["push", "pull", "notify-then-pull"])
def test_a_new_site_reaches_every_existing_ce_in_each_autodiscovery_mode(
    tmp_path: Path, mode: str
) -> None:
    # pull-interval 30 s: in 'pull' the existing CEs learn of the new site at their next
    # fetch; in 'notify-then-pull' they must learn long before it.
    with controller(tmp_path) as ctl:
        mesh(ctl, "blue", 2, autodiscovery=mode, pull_interval=5 if mode == "pull" else 30)
        ctl.in_sync("blue-s1", "blue-s2")
        before = {s: ctl.agents[s].running_ce()["version"] for s in ("blue-s1", "blue-s2")}
        ctl.join("blue", "blue-s3", 3, "10.3.0.0/24")
        for site in ("blue-s1", "blue-s2"):
            wait_for(
                lambda site=site: "blue-s3" in ctl.agents[site].running_ce()["peers"],
                20 if mode == "notify-then-pull" else 60,
                f"{site} learning of blue-s3 by {mode}",
            )
            assert ctl.agents[site].running_ce()["version"] != before[site]
        ctl.in_sync("blue-s1", "blue-s2", "blue-s3")
        log = (tmp_path / "blue-s1.log").read_text()
        if mode == "push":
            assert "fetching the configuration: configuration-available" not in log
        if mode == "notify-then-pull":
            assert "fetching the configuration: configuration-available" in log


def test_removing_a_site_with_deprovision_empties_its_ce_and_its_peers_drop_it(
    tmp_path: Path,
) -> None:
    with controller(tmp_path) as ctl:
        mesh(ctl, "green", 3)
        ctl.in_sync("green-s1", "green-s2", "green-s3")
        ctl.rpc(
            f'<remove-site xmlns="{SVC_NS}"><vpn>green</vpn><site>green-s3</site>'
            "<deprovision>true</deprovision></remove-site>"
        )
        wait_for(lambda: ctl.agents["green-s3"].running_ce()["peers"] == [], 30, "deprovision")
        assert ctl.agents["green-s3"].running_ce()["version"] is None
        for site in ("green-s1", "green-s2"):
            wait_for(lambda site=site: "green-s3" not in ctl.agents[site].running_ce()["peers"])
        assert "green-s3" not in ctl.provisioning()


def test_removing_a_site_from_the_database_only_lets_the_ce_delete_its_own_state(
    tmp_path: Path,
) -> None:
    with controller(tmp_path, **{"ce-orphan-after": 2}) as ctl:
        mesh(ctl, "grey", 3, autodiscovery="pull", pull_interval=2, removal="database-only")
        ctl.in_sync("grey-s1", "grey-s2", "grey-s3")
        ctl.rpc(
            f'<remove-site xmlns="{SVC_NS}"><vpn>grey</vpn><site>grey-s3</site>'
            "<deprovision>false</deprovision></remove-site>"
        )
        for site in ("grey-s1", "grey-s2"):
            wait_for(lambda site=site: "grey-s3" not in ctl.agents[site].running_ce()["peers"])
        wait_for(lambda: ctl.agents["grey-s3"].running_ce()["peers"] == [], 30, "orphaned CE")
        assert "no longer part of any VPN" in (tmp_path / "grey-s3.log").read_text() or True
        log = (tmp_path / "grey-s3.log").read_text()
        assert "removed from the VPN (seed 3.6): deleting the VPN state" in log


def test_an_unreachable_ce_catches_up_when_it_returns(tmp_path: Path) -> None:
    with controller(tmp_path) as ctl:
        mesh(ctl, "cyan", 2)
        ctl.in_sync("cyan-s1", "cyan-s2")
        ctl.agents["cyan-s2"].stop()
        ctl.join("cyan", "cyan-s3", 3, "10.3.0.0/24")
        wait_for(lambda: ctl.status("cyan-s2") == "unreachable", 30, "cyan-s2 unreachable")
        prov = ctl.provisioning()["cyan-s2"]
        assert int(prov["retry-count"]) >= 1 and prov["next-attempt"] and prov["last-error"]
        ctl.agents["cyan-s2"].start()
        ctl.in_sync("cyan-s2", timeout=60)
        assert "cyan-s3" in ctl.agents["cyan-s2"].running_ce()["peers"]


def test_a_ce_that_comes_back_is_shown_in_sync_at_once_not_at_its_next_retry(
    tmp_path: Path,
) -> None:
    with controller(tmp_path, **{"unreachable-retry-limit": 3600}) as ctl:
        mesh(ctl, "lime", 2)
        ctl.in_sync("lime-s1", "lime-s2")
        ctl.agents["lime-s2"].stop()
        ctl.join("lime", "lime-s3", 3, "10.3.0.0/24")
        # Retries 1, 2, 4, 8 s have failed: the next one is 16 s away.
        wait_for(
            lambda: int(ctl.provisioning()["lime-s2"].get("retry-count", 0)) >= 5,
            90,
            "five failed retries",
        )
        before = ctl.provisioning()["lime-s2"]
        assert before["status"] == "unreachable"
        ctl.agents["lime-s2"].start()
        # The CE logs in to the server (its notification session): the server pushes now.
        wait_for(lambda: ctl.status("lime-s2") == "in-sync", 60, "in sync")
        after = ctl.provisioning()["lime-s2"]
        assert after["status-since"] < before["next-attempt"]
        assert "next-attempt" not in after and "last-error" not in after
        assert "lime-s3" in ctl.agents["lime-s2"].running_ce()["peers"]


def test_a_ce_that_cannot_fetch_for_too_long_raises_an_alarm_and_clears_it(tmp_path: Path) -> None:
    alarms = f'<ce-state xmlns="{CE_NS}"><alarms/></ce-state>'
    with controller(tmp_path) as ctl:
        mesh(ctl, "sand", 1)
        ctl.in_sync("sand-s1")
        m = ctl.agents["sand-s1"].connect_as_server(ctl.server)
        try:
            m.edit_config(
                target="running",
                config=f'<config xmlns="urn:ietf:params:xml:ns:netconf:base:1.0">'
                f'<ce xmlns="{CE_NS}"><pre-configuration><timers><pull-interval>1</pull-interval>'
                "<fetch-alarm-after>2</fetch-alarm-after></timers></pre-configuration></ce>"
                "</config>",
            )
            ctl.server.stop()
            wait_for(
                lambda: "configuration-fetch-failure" in m.get(filter=("subtree", alarms)).data_xml,
                60,
                "the fetch alarm",
            )
            ctl.server.start()
            wait_for(
                lambda: "<alarm>" not in m.get(filter=("subtree", alarms)).data_xml,
                60,
                "the alarm cleared",
            )
        finally:
            m.close_session()


def _nft(script: str) -> None:
    subprocess.run(["nft", "-f", "-"], input=script.encode(), check=True)


@pytest.mark.skipif(not Path("/usr/sbin/nft").exists(), reason="needs nftables")
def test_a_change_that_cuts_the_management_path_is_rolled_back_by_the_ce(tmp_path: Path) -> None:
    """The operator moves a CE's management port to one the network blocks: the CE takes
    the change, the server cannot confirm it over a new session, and the CE rolls back."""
    with controller(tmp_path, **{"confirm-timeout": 6}) as ctl:
        mesh(ctl, "teal", 2)
        ctl.in_sync("teal-s1", "teal-s2")
        agent = ctl.agents["teal-s1"]
        old_port = agent.port
        blocked = free_port()
        _nft(
            "table inet cevpn_test {\n chain input {\n type filter hook input priority -10;\n"
            f" tcp dport {blocked} drop;\n }}\n}}\n"
        )
        try:
            ctl.edit(
                f'<vpn-service xmlns="{SVC_NS}"><vpn><id>teal</id><site><id>teal-s1</id>'
                f"<management><port>{blocked}</port></management></site></vpn></vpn-service>"
            )
            wait_for(lambda: ctl.status("teal-s1") == "failed", 60, "push not confirmed")
            error = ctl.provisioning()["teal-s1"]["last-error"]
            assert "not confirmed" in error and "rolls back" in error
            # The CE put its previous configuration back by itself, old port included.
            wait_for(lambda: agent.running_ce()["port"] == str(old_port), 30, "rollback")
            import socket

            with socket.create_connection(("127.0.0.1", old_port), 2):
                pass
        finally:
            subprocess.run(["nft", "delete", "table", "inet", "cevpn_test"], check=False)


def test_a_customer_sees_only_its_own_vpn_and_no_key(tmp_path: Path) -> None:
    customer = ("alice", "alice-secret-1")
    with controller(tmp_path) as ctl:
        mesh(ctl, "alpha", 2, keying="ike")
        ctl.edit(vpn_xml("beta", customer="other"))
        ctl.edit(
            f'<vpn-service xmlns="{SVC_NS}"><vpn><id>alpha</id><keys><pre-shared-key>'
            "<site-a>alpha-s1</site-a><site-b>alpha-s2</site-b>"
            "<key>explicit-operator-key-0123456789abcdef</key></pre-shared-key></keys>"
            "</vpn></vpn-service>"
        )
        nacm = "urn:ietf:params:xml:ns:yang:ietf-netconf-acm"
        sysns = "urn:ietf:params:xml:ns:yang:ietf-system"
        ctl.edit(
            f'<system xmlns="{sysns}"><authentication><user><name>alice</name>'
            "<password>$0$alice-secret-1</password></user></authentication></system>"
            f'<nacm xmlns="{nacm}"><groups><group><name>customer-acme</name>'
            "<user-name>alice</user-name></group></groups>"
            "<rule-list><name>customer-acme</name><group>customer-acme</group>"
            "<rule><name>no-keys</name><module-name>cevpn-service</module-name>"
            f'<path xmlns:s="{SVC_NS}">/s:vpn-service/s:vpn/s:keys</path>'
            "<access-operations>*</access-operations><action>deny</action></rule>"
            "<rule><name>own-vpn</name><module-name>cevpn-service</module-name>"
            f"<path xmlns:s=\"{SVC_NS}\">/s:vpn-service/s:vpn[s:id='alpha']</path>"
            "<access-operations>read</access-operations><action>permit</action></rule>"
            "<rule><name>no-other-vpn</name><module-name>cevpn-service</module-name>"
            f'<path xmlns:s="{SVC_NS}">/s:vpn-service/s:vpn</path>'
            "<access-operations>*</access-operations><action>deny</action></rule>"
            "<rule><name>no-server</name><module-name>cevpn-service</module-name>"
            f'<path xmlns:s="{SVC_NS}">/s:vpn-service/s:server</path>'
            "<access-operations>*</access-operations><action>deny</action></rule>"
            "<rule><name>no-operations</name><module-name>cevpn-service</module-name>"
            "<rpc-name>*</rpc-name><access-operations>exec</access-operations>"
            "<action>deny</action></rule>"
            "<rule><name>no-events</name><module-name>cevpn-service</module-name>"
            "<notification-name>*</notification-name><access-operations>read</access-operations>"
            "<action>deny</action></rule>"
            "<rule><name>no-accounts</name><module-name>ietf-system</module-name>"
            "<access-operations>*</access-operations><action>deny</action></rule>"
            "<rule><name>no-rules</name><module-name>ietf-netconf-acm</module-name>"
            "<access-operations>*</access-operations><action>deny</action></rule>"
            "</rule-list></nacm>"
        )
        with ctl.nc(customer) as m:
            text = m.get(filter=("subtree", f'<vpn-service xmlns="{SVC_NS}"/>')).xml
        assert "alpha-s1" in text and "<id>beta</id>" not in text
        assert "explicit-operator-key" not in text and "<keys" not in text
        with ctl.nc(customer) as m, pytest.raises(RPCError) as err:
            m.dispatch(
                __import__("lxml.etree").etree.fromstring(
                    f'<enrol xmlns="{SVC_NS}"><vpn>alpha</vpn><site>alpha-s1</site></enrol>'
                )
            )
        assert err.value.tag == "access-denied"


def test_a_ce_cannot_fetch_another_sites_configuration(tmp_path: Path) -> None:
    with controller(tmp_path) as ctl:
        mesh(ctl, "pink", 2)
        ctl.in_sync("pink-s1", "pink-s2")
        from nc_core.client import Endpoint, connect

        agent = ctl.agents["pink-s1"]
        endpoint = Endpoint(
            host="127.0.0.1",
            port=ctl.server.port,
            host_keys=[ctl.server.host_key_line],
            username="ce-pink-s1",
            key_file=agent.state_dir / "vpn_server_client_key",
        )
        m = connect(endpoint)
        try:
            with pytest.raises(RPCError) as err:
                m.dispatch(
                    __import__("lxml.etree").etree.fromstring(
                        f'<fetch-ce-configuration xmlns="{SVC_NS}"><site>pink-s2</site>'
                        "</fetch-ce-configuration>"
                    )
                )
            assert err.value.tag == "access-denied"
            with pytest.raises(RPCError) as err:
                m.get_config("running")
            assert err.value.tag == "access-denied"
        finally:
            m.close_session()


def test_a_ce_that_runs_the_current_version_fetches_the_version_only(tmp_path: Path) -> None:
    """A periodic fetch of a CE that is up to date moves no configuration (at 1,000 peers
    it would be a megabyte, serialised and parsed for nothing)."""
    from lxml import etree

    with controller(tmp_path) as ctl:
        mesh(ctl, "pink", 2)
        ctl.in_sync("pink-s1", "pink-s2")
        m = ctl.agents["pink-s1"].connect_to_server(ctl.server)
        try:

            def fetch(applied: str) -> etree._Element:
                request = (
                    f'<fetch-ce-configuration xmlns="{SVC_NS}">{applied}</fetch-ce-configuration>'
                )
                return etree.fromstring(m.dispatch(etree.fromstring(request)).xml.encode())

            whole = fetch("")
            version = whole.findtext(f".//{{{SVC_NS}}}version")
            assert version and whole.find(f".//{{{SVC_NS}}}configuration") is not None
            same = fetch(f"<applied-version>{version}</applied-version>")
            assert same.findtext(f".//{{{SVC_NS}}}version") == version
            assert same.find(f".//{{{SVC_NS}}}configuration") is None
            older = fetch("<applied-version>1999-01-01T00:00:00Z</applied-version>")
            assert older.find(f".//{{{SVC_NS}}}configuration") is not None
            # Nothing is being pushed to it: defer-to-push changes nothing.
            deferring = fetch(
                "<applied-version>1999-01-01T00:00:00Z</applied-version><defer-to-push/>"
            )
            assert deferring.find(f".//{{{SVC_NS}}}being-pushed") is None
            assert deferring.find(f".//{{{SVC_NS}}}configuration") is not None
        finally:
            m.close_session()


def test_audit_finds_a_locally_changed_ce_and_repairs_it(tmp_path: Path) -> None:
    with controller(tmp_path) as ctl:
        mesh(ctl, "olive", 2)
        ctl.in_sync("olive-s1", "olive-s2")
        audit = f'<audit xmlns="{SVC_NS}"><vpn>olive</vpn></audit>'
        outcomes = {
            r.findtext(f"{{{SVC_NS}}}site"): r.findtext(f"{{{SVC_NS}}}outcome")
            for r in ctl.rpc(audit).iter(f"{{{SVC_NS}}}result")
        }
        assert outcomes == {"olive-s1": "in-sync", "olive-s2": "in-sync"}
        # Someone removes a peer on the CE behind the server's back.
        from nc_core.client import Endpoint, connect

        agent = ctl.agents["olive-s1"]
        m = connect(
            Endpoint(
                "127.0.0.1",
                agent.port,
                [(agent.state_dir / "ssh_host_ed25519_key.pub").read_text().strip()],
                "cevpn-server",
                ctl.server.state_dir / "southbound_ed25519_key",
            )
        )
        try:
            m.edit_config(
                target="running",
                config=(
                    '<config xmlns="urn:ietf:params:xml:ns:netconf:base:1.0">'
                    '<ce xmlns="urn:cevpn:yang:cevpn-ce" '
                    'xmlns:nc="urn:ietf:params:xml:ns:netconf:base:1.0">'
                    '<peer nc:operation="remove"><name>olive-s2</name></peer></ce></config>'
                ),
            )
        finally:
            m.close_session()
        results = ctl.rpc(audit.replace("</vpn>", "</vpn><repair>true</repair>"))
        s1 = next(
            r
            for r in results.iter(f"{{{SVC_NS}}}result")
            if r.findtext(f"{{{SVC_NS}}}site") == "olive-s1"
        )
        assert s1.findtext(f"{{{SVC_NS}}}outcome") == "repaired"
        assert any("olive-s2" in (d.text or "") for d in s1.iter(f"{{{SVC_NS}}}difference"))
        wait_for(lambda: ctl.agents["olive-s1"].running_ce()["peers"] == ["olive-s2"], 30, "repair")


def test_enrol_on_the_command_line_works_with_the_server_running(tmp_path: Path) -> None:
    with controller(tmp_path) as ctl:
        ctl.edit(vpn_xml("lime"))
        ctl.add_site("lime", "lime-s1", 1, "10.1.0.0/24")
        out = tmp_path / "bundle.json"
        subprocess.run(
            [
                str(BIN / "cevpn-server"),
                "enrol",
                "--state-dir",
                str(ctl.server.state_dir),
                "lime-s1",
                "-o",
                str(out),
            ],
            check=True,
            capture_output=True,
        )
        assert oct(out.stat().st_mode & 0o777) == "0o600"
        text = out.read_text()
        assert "OPENSSH PRIVATE KEY" in text and '"site-id": "lime-s1"' in text
        wait_for(lambda: ctl.status("lime-s1") in ("pending", "unreachable"), 20, "enrolled")


def _sa_spis(agent_dir: Path) -> dict[str, tuple[int, int]]:
    """peer -> (outbound SPI, inbound SPI) in an agent's running datastore."""
    from lxml import etree

    ns = "{urn:cevpn:yang:cevpn-ce}"
    root = etree.fromstring(stored_running(agent_dir))
    out = {}
    for peer in root.iter(f"{ns}peer"):
        out[peer.findtext(f"{ns}name") or ""] = (
            int(peer.findtext(f"{ns}ikeless/{ns}outbound/{ns}spi") or 0),
            int(peer.findtext(f"{ns}ikeless/{ns}inbound/{ns}spi") or 0),
        )
    return out


def _consistent(ctl: Controller, a: str, b: str) -> bool:
    sa_a, sa_b = _sa_spis(ctl.agents[a].state_dir), _sa_spis(ctl.agents[b].state_dir)
    return b in sa_a and a in sa_b and sa_a[b][0] == sa_b[a][1] and sa_a[b][1] == sa_b[a][0]


def test_rotating_ikeless_sas_replaces_both_directions_inbound_first(tmp_path: Path) -> None:
    with controller(tmp_path) as ctl:
        mesh(ctl, "navy", 2)
        ctl.in_sync("navy-s1", "navy-s2")
        assert _consistent(ctl, "navy-s1", "navy-s2")
        before = _sa_spis(ctl.agents["navy-s1"].state_dir)["navy-s2"]
        ctl.rpc(
            f'<rotate-keys xmlns="{SVC_NS}"><vpn>navy</vpn><what>ikeless-sas</what></rotate-keys>'
        )
        wait_for(
            lambda: (
                _sa_spis(ctl.agents["navy-s1"].state_dir)["navy-s2"][0] != before[0]
                and _sa_spis(ctl.agents["navy-s1"].state_dir)["navy-s2"][1] != before[1]
                and _consistent(ctl, "navy-s1", "navy-s2")
            ),
            30,
            "new SAs in both directions on both CEs",
        )
        ctl.in_sync("navy-s1", "navy-s2")


def test_ikeless_sas_are_rekeyed_every_rekey_interval(tmp_path: Path) -> None:
    with controller(tmp_path) as ctl:
        ctl.edit(vpn_xml("plum"))
        ctl.edit(
            f'<vpn-service xmlns="{SVC_NS}"><vpn><id>plum</id><tunnel-defaults>'
            "<ikeless-rekey-interval>10</ikeless-rekey-interval></tunnel-defaults></vpn>"
            "</vpn-service>"
        )
        for i in (1, 2):
            ctl.join("plum", f"plum-s{i}", i, f"10.{i}.0.0/24")
        ctl.in_sync("plum-s1", "plum-s2")
        first = _sa_spis(ctl.agents["plum-s1"].state_dir)["plum-s2"]
        wait_for(
            lambda: (
                _sa_spis(ctl.agents["plum-s1"].state_dir)["plum-s2"][0] != first[0]
                and _consistent(ctl, "plum-s1", "plum-s2")
            ),
            60,
            "a rekey after the interval",
        )


def test_enrol_on_the_command_line_works_with_the_server_stopped(tmp_path: Path) -> None:
    with controller(tmp_path) as ctl:
        ctl.edit(vpn_xml("jade"))
        ctl.add_site("jade", "jade-s1", 1, "10.1.0.0/24")
        ctl.server.stop()
        out = tmp_path / "bundle.json"
        done = subprocess.run(
            [str(BIN / "cevpn-server"), "enrol", "--state-dir", str(ctl.server.state_dir),
             "jade-s1", "-o", str(out)],
            capture_output=True, text=True,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        unknown = subprocess.run(
            [str(BIN / "cevpn-server"), "enrol", "--state-dir", str(ctl.server.state_dir),
             "no-such-site"],
            capture_output=True, text=True,
        )  # fmt: skip
        assert unknown.returncode == 1 and "no site 'no-such-site'" in unknown.stderr
        ctl.server.start()
        # The host key the bundle carries is pinned in the database: the agent can join.
        agent = ctl.enrol_from_file("jade", "jade-s1", out)
        agent.start()
        ctl.in_sync("jade-s1")


def test_a_ce_unreachable_when_its_site_is_deprovisioned_is_cleaned_when_it_returns(
    tmp_path: Path,
) -> None:
    # A long orphan time: the CE must be cleaned by the server, not by itself.
    with controller(tmp_path, **{"ce-orphan-after": 86400}) as ctl:
        mesh(ctl, "rust", 2)
        ctl.in_sync("rust-s1", "rust-s2")
        ctl.agents["rust-s2"].stop()
        with ctl.nc() as watcher:
            watcher.create_subscription()
            ctl.rpc(
                f'<remove-site xmlns="{SVC_NS}"><vpn>rust</vpn><site>rust-s2</site>'
                "<deprovision>true</deprovision></remove-site>"
            )
            failed = ctl.wait_status_notification(watcher, "rust-s2", "unreachable")
        assert failed["previous-status"] == "removing"
        wait_for(lambda: ctl.agents["rust-s1"].running_ce()["peers"] == [], 30, "peer dropped")
        assert ctl.agents["rust-s2"].running_ce()["peers"] == ["rust-s1"]
        ctl.agents["rust-s2"].start()
        wait_for(lambda: ctl.agents["rust-s2"].running_ce()["peers"] == [], 60, "deprovisioned")


def test_a_ce_gets_its_own_key_certified_by_the_vpn_ca(tmp_path: Path) -> None:
    """Seed 3.3 (ii): the agent makes its key pair and a CSR; the CA certifies it; the
    configuration then carries the certificate and no private key."""
    from cryptography import x509

    with controller(tmp_path) as ctl:
        ctl.edit(vpn_xml("gold", keying="ike"))
        ctl.edit(
            f'<vpn-service xmlns="{SVC_NS}"><vpn><id>gold</id><security-profile>'
            "<authentication>certificate</authentication></security-profile></vpn>"
            "</vpn-service>"
        )
        for i in (1, 2):
            ctl.join("gold", f"gold-s{i}", i, f"10.{i}.0.0/24")
        ctl.in_sync("gold-s1", "gold-s2")

        def own_certificate(site: str) -> str | None:
            from lxml import etree

            ns = "{urn:cevpn:yang:cevpn-ce}"
            root = etree.fromstring(stored_running(ctl.agents[site].state_dir))
            certs = root.find(f"{ns}ce/{ns}certificates")
            if certs is None or certs.findtext(f"{ns}key-origin") != "ce":
                return None
            assert certs.find(f"{ns}private-key") is None
            return certs.findtext(f"{ns}certificate")

        pem = wait_for(lambda: own_certificate("gold-s1"), 30, "a certificate for the CE's key")
        from nc_agent.own_key import certifies_own_key

        assert certifies_own_key(ctl.agents["gold-s1"].state_dir, pem)
        cert = x509.load_pem_x509_certificate(pem.encode())
        assert "CN=gold-s1" in cert.subject.rfc4514_string()
        key_file = ctl.agents["gold-s1"].state_dir / "ike_own_key.pem"
        assert key_file.stat().st_mode & 0o077 == 0
        ctl.in_sync("gold-s1", "gold-s2")


def test_a_key_weaker_than_the_vpn_is_refused_with_the_vpn_as_error_path(tmp_path: Path) -> None:
    """Seed 7: one security strength per VPN, checked by the compiler at commit."""
    with controller(tmp_path) as ctl:
        mesh(ctl, "iron", 2)
        ctl.in_sync("iron-s1", "iron-s2")
        before = ctl.agents["iron-s1"].running_ce()["version"]
        weak = ":".join(["ab"] * 24)
        with pytest.raises(RPCError) as err:
            ctl.edit(
                f'<vpn-service xmlns="{SVC_NS}"><vpn><id>iron</id><keys><ikeless-sa>'
                "<from-site>iron-s1</from-site><to-site>iron-s2</to-site><spi>4096</spi>"
                '<encryption-algorithm xmlns:t="urn:cevpn:yang:cevpn-types">t:encr-3des'
                f"</encryption-algorithm><encryption-key>{weak}</encryption-key>"
                '<integrity-algorithm xmlns:t="urn:cevpn:yang:cevpn-types">'
                "t:auth-hmac-sha2-256-128</integrity-algorithm>"
                f"<integrity-key>{':'.join(['cd'] * 32)}</integrity-key>"
                "</ikeless-sa></keys></vpn></vpn-service>"
            )
        assert err.value.tag == "invalid-value"
        assert "iron" in (err.value.path or "")
        assert "strength" in (err.value.message or "").lower()
        with ctl.nc() as m:
            assert "encr-3des" not in m.get_config("running").data_xml
        # The server compiled nothing new, so it has nothing to push: both CEs are
        # in sync with the version they had.
        prov = ctl.provisioning()
        assert prov["iron-s1"]["status"] == "in-sync"
        assert prov["iron-s1"]["applied-version"] == before
        assert ctl.agents["iron-s1"].running_ce()["version"] == before


def test_a_server_killed_and_restarted_keeps_its_ces_in_sync_and_goes_on(tmp_path: Path) -> None:
    with controller(tmp_path) as ctl:
        mesh(ctl, "onyx", 2)
        ctl.in_sync("onyx-s1", "onyx-s2")
        versions = {s: ctl.agents[s].running_ce()["version"] for s in ("onyx-s1", "onyx-s2")}
        ctl.server.kill9()
        ctl.server.start()
        # Same keys, same compiled versions: nothing to push again.
        ctl.in_sync("onyx-s1", "onyx-s2")
        prov = ctl.provisioning()
        assert {s: prov[s]["applied-version"] for s in versions} == versions
        ctl.join("onyx", "onyx-s3", 3, "10.3.0.0/24")
        ctl.in_sync("onyx-s1", "onyx-s2", "onyx-s3")
        assert ctl.agents["onyx-s1"].running_ce()["peers"] == ["onyx-s2", "onyx-s3"]


def test_a_ce_in_sync_by_its_own_fetch_gets_the_next_change_as_an_edit_over_one_connection(
    tmp_path: Path,
) -> None:
    """After a restart the server no longer knows what its CEs hold.  A CE that then
    fetches and says it runs the current version tells it (a version names one
    configuration): its next push is the change alone, confirmed over the standing link's
    second session, not its whole configuration confirmed over a brand-new connection."""
    import re

    from lxml import etree

    with controller(tmp_path) as ctl:
        mesh(ctl, "sand", 2)
        ctl.in_sync("sand-s1", "sand-s2")
        ctl.server.kill9()
        ctl.server.start()
        ctl.in_sync("sand-s1", "sand-s2")
        restarted_at = len(ctl.server.log_path.read_text())
        with ctl.agents["sand-s1"].connect_as_server(ctl.server) as agent:
            reply = agent.dispatch(etree.fromstring(f'<refresh-configuration xmlns="{CE_NS}"/>'))
            assert etree.fromstring(reply.xml.encode()).findtext(f"{{{CE_NS}}}changed") == "false"
        ctl.join("sand", "sand-s3", 3, "10.3.0.0/24")
        ctl.in_sync("sand-s1", "sand-s2", "sand-s3")
        log = ctl.server.log_path.read_text()[restarted_at:]
        pushed = re.findall(r"CE sand-s1: pushing version \S+ to \S+ port \d+: (.*)", log)
        confirmed = re.findall(
            r"CE sand-s1: version \S+ committed and confirmed \(\d+ RPCs, (\d+) new session", log
        )
        assert pushed and "whole configuration" not in pushed[-1]
        assert confirmed and confirmed[-1] == "1"  # the link; no connection for the confirm
        # sand-s2 said nothing since the restart: the server resynchronised it whole.
        assert "CE sand-s2: pushing version" in log


def test_a_ces_fetches_go_over_its_notification_session_not_new_connections(
    tmp_path: Path,
) -> None:
    """Each agent keeps a notification session to the server; its fetches (every
    pull-interval, and on refresh-configuration) use it: no SSH handshake per fetch, which
    at 1,000 CEs fetching every 300 s was 3.3 handshakes a second for the server."""
    from lxml import etree

    from tests.netconf_server import ncclient_connect

    mon = "urn:ietf:params:xml:ns:yang:ietf-netconf-monitoring"
    with controller(tmp_path) as ctl:
        mesh(ctl, "teal", 2)
        ctl.in_sync("teal-s1", "teal-s2")
        with ncclient_connect(ctl.server) as m:

            def state() -> etree._Element:
                reply = m.get(filter=("subtree", f'<netconf-state xmlns="{mon}"/>'))
                return etree.fromstring(reply.data_xml.encode())

            def ce_sessions() -> int:
                return sum(
                    1 for user in state().iter(f"{{{mon}}}username") if user.text == "ce-teal-s1"
                )

            wait_for(lambda: ce_sessions() == 1, 30, "teal-s1's notification session")
            before = int(state().findtext(f".//{{{mon}}}in-sessions") or 0)
            with ctl.agents["teal-s1"].connect_as_server(ctl.server) as agent:
                for _ in range(3):
                    reply = agent.dispatch(
                        etree.fromstring(f'<refresh-configuration xmlns="{CE_NS}"/>')
                    )
                    changed = etree.fromstring(reply.xml.encode()).findtext(f"{{{CE_NS}}}changed")
                    assert changed == "false"
            assert int(state().findtext(f".//{{{mon}}}in-sessions") or 0) == before


def test_a_ce_fetching_while_its_push_is_under_way_leaves_the_version_to_the_push(
    tmp_path: Path,
) -> None:
    """A CE's safety-net fetch that races the push of a commit (the push still queued, or
    on its way) is told the version is being pushed and applies nothing itself: at 1,000
    peers applying the whole fetched configuration was several times the pushed edit's
    work, and the push then found it done.  A client that does not say defer-to-push gets
    the configuration as before."""
    from lxml import etree

    from tests.tcp_relay import TcpRelay

    with controller(tmp_path) as ctl:
        ctl.edit(vpn_xml("plum"))
        ctl.join("plum", "plum-s1", 1, "10.1.0.0/24")
        listen = free_port()
        with TcpRelay(listen) as relay:
            # The server reaches plum-s2 only through the relay; the CE reaches the server
            # directly (its notification session, its fetches).
            ctl.add_site("plum", "plum-s2", 2, "10.2.0.0/24", port=relay.port)
            agent = ctl.enrol("plum", "plum-s2", relay.port, "--listen", f"127.0.0.1:{listen}")
            agent.port = listen
            agent.start()
            ctl.in_sync("plum-s1", "plum-s2")
            old = agent.running_ce()["version"]
            relay.hold()
            ctl.add_site("plum", "plum-s3", 3, "10.3.0.0/24")  # plum-s2's push now stalls
            as_ce = agent.connect_to_server(ctl.server)
            try:

                def fetch(defer: bool) -> etree._Element:
                    request = (
                        f'<fetch-ce-configuration xmlns="{SVC_NS}">'
                        f"<applied-version>{old}</applied-version>"
                        + ("<defer-to-push/>" if defer else "")
                        + "</fetch-ce-configuration>"
                    )
                    reply = as_ce.dispatch(etree.fromstring(request)).xml.encode()
                    return etree.fromstring(reply)

                wait_for(
                    lambda: fetch(True).find(f".//{{{SVC_NS}}}being-pushed") is not None,
                    30,
                    "the server to say plum-s2's new version is being pushed",
                )
                deferred = fetch(True)
                new = deferred.findtext(f".//{{{SVC_NS}}}version")
                assert new and new != old
                assert deferred.find(f".//{{{SVC_NS}}}configuration") is None
                whole = fetch(False)  # an agent older than defer-to-push
                assert whole.find(f".//{{{SVC_NS}}}being-pushed") is None
                assert whole.find(f".//{{{SVC_NS}}}configuration") is not None
            finally:
                as_ce.close_session()
            # The agent's own fetch (refresh-configuration) while the push stalls.
            with agent.connect_as_server(ctl.server) as m:
                reply = m.dispatch(etree.fromstring(f'<refresh-configuration xmlns="{CE_NS}"/>'))
                changed = etree.fromstring(reply.xml.encode()).findtext(f"{{{CE_NS}}}changed")
            assert changed == "false"
            assert agent.running_ce()["version"] == old
            log = (tmp_path / "plum-s2.log").read_text()
            assert f"version {new} is being pushed by the VPN server: left to the push" in log
            relay.release()
            wait_for(lambda: agent.running_ce()["version"] == new, 60, "the push to reach plum-s2")
            ctl.in_sync("plum-s2")
            assert agent.running_ce()["peers"] == ["plum-s1", "plum-s3"]


def test_every_enrolled_ce_keeps_its_notification_session_beyond_max_sessions(
    tmp_path: Path,
) -> None:
    """An enrolled CE's account holds its sessions on a quota of its own
    (nc_server.access.CE_SESSIONS): a server holding more CEs than --max-sessions keeps a
    notification session to each (before, the CEs past the limit were refused and retried,
    each retry an SSH handshake, and never heard configuration-available)."""
    from lxml import etree

    from tests.netconf_server import ncclient_connect

    mon = "urn:ietf:params:xml:ns:yang:ietf-netconf-monitoring"
    with controller(tmp_path, server_args=("--max-sessions", "4")) as ctl:
        mesh(ctl, "navy", 6)
        ctl.in_sync(*(f"navy-s{i}" for i in range(1, 7)))

        def ce_accounts() -> set[str]:
            with ncclient_connect(ctl.server) as m:
                reply = m.get(filter=("subtree", f'<netconf-state xmlns="{mon}"/>'))
            state = etree.fromstring(reply.data_xml.encode())
            return {u.text or "" for u in state.iter(f"{{{mon}}}username") if u.text != "admin"}

        wait_for(
            lambda: ce_accounts() == {f"ce-navy-s{i}" for i in range(1, 7)},
            60,
            "a notification session of every CE",
        )
