"""ncclient (0.7.1, unmodified) against a running cevpn-server, over real SSH.

Each test is one behaviour a user's ncclient script relies on, asserted on the
answers ncclient parses.  The server's host key is pinned (hostkey_b64).
"""

from __future__ import annotations

import contextlib
import time

import pytest
from lxml import etree
from ncclient.operations.rpc import RPCError

from tests.netconf_server import ADMIN, VIEWER, ServerProcess, ncclient_connect
from tests.waiting import wait_for

SVC = "urn:cevpn:yang:cevpn-service"
NC = "urn:ietf:params:xml:ns:netconf:base:1.0"
NS = {"s": SVC}


def vpn_config(vpn: str, customer: str = "ACME", extra: str = "", op: str = "") -> str:
    attr = f' xmlns:nc="{NC}" nc:operation="{op}"' if op else ""
    return (
        f'<config xmlns="{NC}"><vpn-service xmlns="{SVC}"><vpn{attr}><id>{vpn}</id>'
        f"<customer>{customer}</customer>{extra}</vpn></vpn-service></config>"
    )


@pytest.fixture
def m(server: ServerProcess):  # type: ignore[no-untyped-def]
    with ncclient_connect(server) as session:
        yield session
        # leave running empty of VPNs for the next test
        session.edit_config(
            target="running",
            config=f'<config xmlns="{NC}"><vpn-service xmlns="{SVC}" xmlns:nc="{NC}" '
            'nc:operation="remove"/></config>',
        )


def vpn_ids(reply_xml: str) -> list[str]:
    return etree.fromstring(reply_xml.encode()).xpath("//s:vpn/s:id/text()", namespaces=NS)


def test_capabilities_include_base_11_candidate_confirmed_commit_and_our_modules(m):
    caps = list(m.server_capabilities)
    for cap in (
        "urn:ietf:params:netconf:base:1.1",
        "urn:ietf:params:netconf:capability:candidate:1.0",
        "urn:ietf:params:netconf:capability:confirmed-commit:1.1",
        "urn:ietf:params:netconf:capability:xpath:1.0",
        "urn:ietf:params:netconf:capability:notification:1.0",
    ):
        assert cap in caps
    assert any(c.startswith(SVC + "?module=cevpn-service&revision=") for c in caps)
    assert any("with-defaults:1.0?basic-mode=explicit" in c for c in caps)


def test_get_schema_returns_the_yang_source(m):
    text = m.get_schema("cevpn-service").data
    assert text.startswith("module cevpn-service {")
    assert "container vpn-service" in text


def test_get_schema_of_an_unknown_module_is_invalid_value(m):
    with pytest.raises(RPCError) as err:
        m.get_schema("no-such-module")
    assert err.value.tag == "invalid-value"


def test_get_config_with_subtree_filter_returns_only_the_selected_entry(m):
    m.edit_config(target="running", config=vpn_config("acme"))
    m.edit_config(target="running", config=vpn_config("globex", "Globex"))
    reply = m.get_config(
        "running",
        filter=("subtree", f'<vpn-service xmlns="{SVC}"><vpn><id>globex</id></vpn></vpn-service>'),
    )
    assert vpn_ids(reply.data_xml) == ["globex"]


def test_get_config_with_xpath_filter_uses_the_filters_own_prefixes(m):
    m.edit_config(target="running", config=vpn_config("acme"))
    m.edit_config(target="running", config=vpn_config("globex", "Globex"))
    xpath = (
        f'<filter xmlns="{NC}" type="xpath" xmlns:x="{SVC}" '
        "select=\"/x:vpn-service/x:vpn[x:customer='Globex']\"/>"
    )
    reply = m.get_config("running", filter=xpath)
    assert vpn_ids(reply.data_xml) == ["globex"]


def test_get_returns_state_data_with_a_filter(m):
    reply = m.get(
        filter=(
            "subtree",
            '<netconf-state xmlns="urn:ietf:params:xml:ns:yang:ietf-netconf-monitoring">'
            "<statistics/></netconf-state>",
        )
    )
    tree = etree.fromstring(reply.data_xml.encode())
    ns = {"m": "urn:ietf:params:xml:ns:yang:ietf-netconf-monitoring"}
    assert int(tree.xpath("//m:statistics/m:in-sessions/text()", namespaces=ns)[0]) >= 1


def test_edit_config_create_fails_with_data_exists_when_the_entry_exists(m):
    m.edit_config(target="running", config=vpn_config("acme", op="create"))
    with pytest.raises(RPCError) as err:
        m.edit_config(target="running", config=vpn_config("acme", op="create"))
    assert err.value.tag == "data-exists"
    assert "vpn[cevpn-service:id='acme']" in err.value.path


def test_edit_config_merge_replace_delete_and_remove(m):
    m.edit_config(
        target="running", config=vpn_config("acme", extra="<description>first</description>")
    )
    m.edit_config(target="running", config=vpn_config("acme", "ACME Corp", op="replace"))
    reply = m.get_config("running", filter=("subtree", f'<vpn-service xmlns="{SVC}"/>'))
    tree = etree.fromstring(reply.data_xml.encode())
    assert tree.xpath("//s:vpn/s:customer/text()", namespaces=NS) == ["ACME Corp"]
    assert tree.xpath("//s:vpn/s:description", namespaces=NS) == []  # replaced away
    m.edit_config(target="running", config=vpn_config("acme", op="delete"))
    with pytest.raises(RPCError) as err:
        m.edit_config(target="running", config=vpn_config("acme", op="delete"))
    assert err.value.tag == "data-missing"
    m.edit_config(target="running", config=vpn_config("acme", op="remove"))  # no error


def test_edit_config_default_operation_none_does_not_create(m):
    with pytest.raises(RPCError) as err:
        m.edit_config(target="running", config=vpn_config("acme"), default_operation="none")
    assert err.value.tag == "data-missing"


def test_test_only_validates_without_changing_anything(m):
    m.edit_config(target="running", config=vpn_config("acme"), test_option="test-only")
    assert vpn_ids(m.get_config("running").data_xml) == []


def test_invalid_edit_is_rejected_with_error_tag_and_error_path(m):
    bad = vpn_config("acme", extra="<topology><type>hub-and-spoke</type></topology>")
    with pytest.raises(RPCError) as err:
        m.edit_config(target="running", config=bad)
    assert err.value.tag == "operation-failed"
    assert err.value.path == (
        "/cevpn-service:vpn-service/cevpn-service:vpn[cevpn-service:id='acme']"
        "/cevpn-service:topology/cevpn-service:type"
    )
    assert "needs at least one site with role 'hub'" in err.value.message
    assert vpn_ids(m.get_config("running").data_xml) == []  # nothing half-applied


def test_a_lock_held_by_one_session_denies_the_other_with_the_holders_session_id(server, m):
    m.lock("running")
    try:
        with ncclient_connect(server) as other:
            with pytest.raises(RPCError) as err:
                other.lock("running")
            assert err.value.tag == "lock-denied"
            assert str(m.session_id) in err.value.info
            with pytest.raises(RPCError) as err:
                other.edit_config(target="running", config=vpn_config("acme"))
            assert err.value.tag == "in-use"
    finally:
        m.unlock("running")


def test_a_lock_is_released_when_its_session_ends(server, m):
    with ncclient_connect(server) as other:
        other.lock("running")
    m.lock("running")
    m.unlock("running")


def test_candidate_changes_reach_running_only_on_commit(m):
    m.discard_changes()
    m.edit_config(target="candidate", config=vpn_config("acme"))
    assert vpn_ids(m.get_config("running").data_xml) == []
    assert vpn_ids(m.get_config("candidate").data_xml) == ["acme"]
    m.commit()
    assert vpn_ids(m.get_config("running").data_xml) == ["acme"]


def test_confirmed_commit_rolls_back_when_not_confirmed_in_time(m):
    m.discard_changes()
    m.edit_config(target="candidate", config=vpn_config("acme"))
    m.commit(confirmed=True, timeout="2")
    assert vpn_ids(m.get_config("running").data_xml) == ["acme"]
    deadline = time.monotonic() + 10
    while vpn_ids(m.get_config("running").data_xml) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert vpn_ids(m.get_config("running").data_xml) == []


def test_confirmed_commit_is_kept_when_confirmed(m):
    m.discard_changes()
    m.edit_config(target="candidate", config=vpn_config("acme"))
    m.commit(confirmed=True, timeout="2")
    m.commit()
    time.sleep(2.5)
    assert vpn_ids(m.get_config("running").data_xml) == ["acme"]


def test_persistent_confirmed_commit_is_confirmed_from_another_session(server, m):
    m.discard_changes()
    m.edit_config(target="candidate", config=vpn_config("acme"))
    m.commit(confirmed=True, timeout="30", persist="token-1")
    with ncclient_connect(server) as other:
        other.commit(persist_id="token-1")
    assert vpn_ids(m.get_config("running").data_xml) == ["acme"]


def test_cancel_commit_rolls_back_at_once(m):
    m.discard_changes()
    m.edit_config(target="candidate", config=vpn_config("acme"))
    m.commit(confirmed=True, timeout="60")
    m.cancel_commit()
    assert vpn_ids(m.get_config("running").data_xml) == []


def test_notifications_report_a_configuration_change(server, m):
    with ncclient_connect(server) as listener:
        listener.create_subscription()
        m.edit_config(target="running", config=vpn_config("acme"))
        notif = listener.take_notification(timeout=10)
        assert notif is not None
        assert "netconf-config-change" in notif.notification_xml
        assert "/cevpn-service:vpn-service" in notif.notification_xml
        assert "<operation>create</operation>" in notif.notification_xml


def test_replay_delivers_past_notifications_then_replay_complete(server, m):
    m.edit_config(target="running", config=vpn_config("acme"))
    with ncclient_connect(server) as listener:
        listener.create_subscription(start_time="2000-01-01T00:00:00Z")
        seen = []
        while True:
            notif = listener.take_notification(timeout=10)
            assert notif is not None
            seen.append(notif.notification_xml)
            if "replayComplete" in notif.notification_xml:
                break
    assert any("netconf-config-change" in n for n in seen)


def test_user_without_group_cannot_write(server):
    with ncclient_connect(server, VIEWER) as viewer:
        with pytest.raises(RPCError) as err:
            viewer.edit_config(target="running", config=vpn_config("acme"))
        assert err.value.tag == "access-denied"


def test_kill_session_ends_the_other_session(server, m):
    other = ncclient_connect(server)
    try:
        m.kill_session(other.session_id)
        with pytest.raises(Exception):  # noqa: B017 - any transport error: the session is gone
            other.get_config("running")
        wait_for(lambda: not other.connected, 10, "the killed session's transport closed")
    finally:
        with contextlib.suppress(Exception):  # ncclient may notice the close only now
            other.close_session()


def test_wrong_password_is_refused(server):
    from ncclient.transport.errors import AuthenticationError

    with pytest.raises(AuthenticationError):
        ncclient_connect(server, (ADMIN[0], "wrong"))


def test_with_defaults_modes(m):
    m.edit_config(
        target="running",
        config=vpn_config("acme", extra="<keying>ike</keying><autodiscovery>pull</autodiscovery>"),
    )
    flt = ("subtree", f'<vpn-service xmlns="{SVC}"><vpn><id>acme</id></vpn></vpn-service>')
    explicit = m.get_config("running", filter=flt).data_xml
    assert "<keying>ike</keying>" in explicit  # set explicitly, even though it is the default
    assert "<site-removal>" not in explicit
    report_all = m.get_config("running", filter=flt, with_defaults="report-all").data_xml
    assert "<site-removal>deprovision</site-removal>" in report_all
    trim = m.get_config("running", filter=flt, with_defaults="trim").data_xml
    assert "<keying>" not in trim and "<autodiscovery>pull</autodiscovery>" in trim
    tagged = m.get_config("running", filter=flt, with_defaults="report-all-tagged").data_xml
    assert 'default="true"' in tagged and "urn:ietf:params:xml:ns:netconf:default:1.0" in tagged


def test_keys_are_invisible_to_a_user_without_an_explicit_rule(server, m):
    keys = (
        "<site><id>a</id><ce-address>192.0.2.1</ce-address></site>"
        "<site><id>b</id><ce-address>192.0.2.2</ce-address></site>"
        "<keys><pre-shared-key><site-a>a</site-a><site-b>b</site-b>"
        "<key>0123456789abcdef0123456789abcdef</key></pre-shared-key></keys>"
    )
    m.edit_config(target="running", config=vpn_config("acme", extra=keys))
    assert "0123456789abcdef0123456789abcdef" in m.get_config("running").data_xml
    with ncclient_connect(server, VIEWER) as viewer:
        data = viewer.get_config("running").data_xml
        assert "<id>acme</id>" in data  # readable by default
        assert "<keys>" not in data and "0123456789abcdef" not in data
        data = viewer.get().data_xml
        assert "0123456789abcdef" not in data


def test_subscription_filter_selects_which_events_arrive(server, m):
    ncn = "urn:ietf:params:xml:ns:yang:ietf-netconf-notifications"
    with ncclient_connect(server) as listener:
        listener.create_subscription(filter=("subtree", f'<netconf-session-start xmlns="{ncn}"/>'))
        m.edit_config(target="running", config=vpn_config("acme"))  # a config change: filtered out
        with ncclient_connect(server):
            pass
        notif = listener.take_notification(timeout=10)
        assert notif is not None
        assert "netconf-session-start" in notif.notification_xml
        assert "netconf-config-change" not in notif.notification_xml


def test_replay_with_stop_time_ends_with_notification_complete(server, m):
    m.edit_config(target="running", config=vpn_config("acme"))
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 1))
    with ncclient_connect(server) as listener:
        listener.create_subscription(start_time="2000-01-01T00:00:00Z", stop_time=now)
        kinds = []
        while True:
            notif = listener.take_notification(timeout=15)
            assert notif is not None
            kinds.append(notif.notification_xml)
            if "notificationComplete" in notif.notification_xml:
                break
    assert any("replayComplete" in k for k in kinds)


def test_confirmed_commit_events_are_notified(server, m):
    with ncclient_connect(server) as listener:
        listener.create_subscription()
        m.discard_changes()
        m.edit_config(target="candidate", config=vpn_config("acme"))
        m.commit(confirmed=True, timeout="60")
        m.commit()
        seen = ""
        while "<confirm-event>complete</confirm-event>" not in seen:
            notif = listener.take_notification(timeout=10)
            assert notif is not None
            seen += notif.notification_xml
        assert "<confirm-event>start</confirm-event>" in seen
        assert "<timeout>60</timeout>" in seen


def test_monitoring_shows_a_lock_and_the_schemas(server, m):
    mon = "urn:ietf:params:xml:ns:yang:ietf-netconf-monitoring"
    m.lock("candidate")
    try:
        data = m.get(
            filter=(
                "subtree",
                f'<netconf-state xmlns="{mon}"><datastores/><schemas/></netconf-state>',
            )
        ).data_xml
    finally:
        m.unlock("candidate")
    assert f"<locked-by-session>{m.session_id}</locked-by-session>" in data
    assert "<identifier>cevpn-service</identifier>" in data
    assert "<location>NETCONF</location>" in data


def test_yang_library_lists_modules_in_both_forms(m):
    lib = "urn:ietf:params:xml:ns:yang:ietf-yang-library"
    new = m.get(filter=("subtree", f'<yang-library xmlns="{lib}"/>')).data_xml
    old = m.get(filter=("subtree", f'<modules-state xmlns="{lib}"/>')).data_xml
    assert "<name>cevpn-service</name>" in new and "<content-id>" in new
    assert "<name>cevpn-service</name>" in old and "<module-set-id>" in old
    assert "<deviation>" in old and "cevpn-system-deviations" in old
    assert "file://" not in new + old  # no server paths leak


def test_public_key_authentication(server, tmp_path):
    import subprocess

    key = tmp_path / "id"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    with ncclient_connect(server) as admin:
        user = (
            '<system xmlns="urn:ietf:params:xml:ns:yang:ietf-system"><authentication><user>'
            "<name>keyed</name><authorized-key><name>k</name><algorithm>ssh-ed25519</algorithm>"
            f"<key-data>{key.with_suffix('.pub').read_text().split()[1]}</key-data>"
            "</authorized-key></user></authentication></system>"
        )
        admin.edit_config(target="running", config=f'<config xmlns="{NC}">{user}</config>')
    from ncclient import manager

    with manager.connect(
        host=server.host,
        port=server.port,
        username="keyed",
        key_filename=str(key),
        hostkey_verify=True,
        hostkey_b64=server.host_key_b64,
        allow_agent=False,
        look_for_keys=False,
        timeout=30,
    ) as keyed:
        assert keyed.get_config("running").ok
