"""Who may do what on the VPN server (RFC 8341, docs/security.md): a real cevpn-server over
real SSH, driven by ncclient as operators' scripts drive it.

Accounts: ``admin`` (group admin), ``operator`` (operators), ``viewer`` (no
group), ``stranger`` (a group no rule list names) and ``acme-noc``, a
customer given access with the rule list docs/server.md prints.
"""

from __future__ import annotations

import re
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from lxml import etree
from ncclient.operations.rpc import RPCError
from ncclient.xml_ import to_ele

from tests.netconf_server import (
    ADMIN,
    BIN,
    OPERATOR,
    VIEWER,
    ServerProcess,
    free_port,
    ncclient_connect,
)

ROOT = Path(__file__).resolve().parent.parent
NC = "urn:ietf:params:xml:ns:netconf:base:1.0"
SVC = "urn:cevpn:yang:cevpn-service"
SYS = "urn:ietf:params:xml:ns:yang:ietf-system"
NACM = "urn:ietf:params:xml:ns:yang:ietf-netconf-acm"
NCN = "urn:ietf:params:xml:ns:yang:ietf-netconf-notifications"
STRANGER = ("stranger", "stranger-secret-1")
CUSTOMER = ("acme-noc", "acme-secret-1")
OPERATIONS = ("enrol", "resynchronise", "audit", "rotate-keys", "remove-site")


def vpn(vpn_id: str, sites: list[tuple[str, str, str]], psk: str | None = None) -> str:
    body = "".join(
        f"<site><id>{s}</id><ce-address>{addr}</ce-address><local-prefix>{prefix}</local-prefix>"
        "</site>"
        for s, addr, prefix in sites
    )
    keys = ""
    if psk is not None:
        a, b = sites[0][0], sites[1][0]
        keys = (
            f"<keys><pre-shared-key><site-a>{a}</site-a><site-b>{b}</site-b><key>{psk}</key>"
            "</pre-shared-key></keys>"
        )
    return (
        f"<vpn><id>{vpn_id}</id><customer>{vpn_id}</customer><topology><type>full-mesh</type>"
        "</topology><security-profile><psk-min-length>16</psk-min-length></security-profile>"
        f"{body}{keys}</vpn>"
    )


DATABASE = (
    f'<config xmlns="{NC}"><vpn-service xmlns="{SVC}">'
    "<server><endpoint><address>127.0.0.1</address></endpoint></server>"
    + vpn(
        "acme-vpn",
        [("acme-1", "192.0.2.1", "10.1.0.0/24"), ("acme-2", "192.0.2.2", "10.2.0.0/24")],
        psk="an-explicit-key-of-21",
    )
    + vpn(
        "other-vpn",
        [("other-1", "192.0.2.11", "10.11.0.0/24"), ("other-2", "192.0.2.12", "10.12.0.0/24")],
    )
    + "</vpn-service></config>"
)


def customer_template() -> str:
    """The customer configuration exactly as docs/server.md shows it."""
    text = (ROOT / "docs" / "server.md").read_text()
    match = re.search(r"### A customer's access.*?```xml\n(.*?)```", text, re.DOTALL)
    assert match, "docs/server.md lost its customer template"
    return match.group(1)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    tmp = tmp_path_factory.mktemp("access")
    srv = ServerProcess("cevpn-server", tmp / "state", free_port())
    srv.adduser(ADMIN[0], ADMIN[1], ("admin",))
    srv.adduser(OPERATOR[0], OPERATOR[1], ("operators",))
    srv.adduser(VIEWER[0], VIEWER[1])
    srv.adduser(STRANGER[0], STRANGER[1], ("nobody-names-this-group",))
    srv.adduser(CUSTOMER[0], CUSTOMER[1])
    srv.start()
    try:
        with ncclient_connect(srv) as m:
            m.edit_config(target="running", config=DATABASE)
            m.edit_config(target="running", config=customer_template())
        yield srv
    finally:
        srv.stop()


def error_of(excinfo: pytest.ExceptionInfo[RPCError]) -> RPCError:
    return excinfo.value


def rpc(op: str) -> etree._Element:
    args = {
        "enrol": "<vpn>acme-vpn</vpn><site>acme-1</site>",
        "resynchronise": "<vpn>acme-vpn</vpn>",
        "audit": "<vpn>acme-vpn</vpn>",
        "rotate-keys": "<vpn>acme-vpn</vpn>",
        "remove-site": "<vpn>acme-vpn</vpn><site>acme-2</site>",
        "fetch-ce-configuration": "<site>acme-1</site>",
    }[op]
    return to_ele(f'<{op} xmlns="{SVC}">{args}</{op}>')


# -- operations are default-deny-all -------------------------------------------------------


@pytest.mark.parametrize("op", [*OPERATIONS, "fetch-ce-configuration"])
def test_an_account_in_no_group_cannot_run_a_cevpn_service_operation(server, op):
    with ncclient_connect(server, VIEWER) as m, pytest.raises(RPCError) as exc:
        m.dispatch(rpc(op))
    assert error_of(exc).tag == "access-denied"


@pytest.mark.parametrize("op", ["enrol", "rotate-keys", "remove-site"])
def test_an_account_in_a_group_no_rule_list_names_cannot_run_them_either(server, op):
    with ncclient_connect(server, STRANGER) as m, pytest.raises(RPCError) as exc:
        m.dispatch(rpc(op))
    assert error_of(exc).tag == "access-denied"


def test_operators_still_enrol(server):
    with ncclient_connect(server, OPERATOR) as m:
        reply = m.dispatch(rpc("enrol"))
    assert "private-key" in reply.xml


# -- password hashes -----------------------------------------------------------------------


@pytest.mark.parametrize("user", [OPERATOR, VIEWER, STRANGER, CUSTOMER], ids=lambda u: u[0])
def test_password_hashes_are_read_by_nobody_without_a_rule(server, user):
    with ncclient_connect(server, user) as m:
        reply = m.get_config("running", filter=("subtree", f'<system xmlns="{SYS}"/>')).xml
        state = m.get(filter=("xpath", "//*[local-name()='password']")).xml
    assert "$6$" not in reply and "<password" not in reply
    assert "$6$" not in state


def test_an_administrator_reads_password_hashes(server):
    with ncclient_connect(server) as m:
        reply = m.get_config("running", filter=("subtree", f'<system xmlns="{SYS}"/>')).xml
    assert "$6$" in reply


# -- who may not write may not lock, discard, commit -----------------------------------------


@pytest.mark.parametrize("datastore", ["running", "candidate", "startup"])
@pytest.mark.parametrize("user", [VIEWER, CUSTOMER], ids=lambda u: u[0])
def test_an_account_that_may_not_write_cannot_lock(server, user, datastore):
    with ncclient_connect(server, user) as m, pytest.raises(RPCError) as exc:
        m.lock(datastore)
    assert error_of(exc).tag == "access-denied"
    with ncclient_connect(server, OPERATOR) as m:  # nothing is left locked
        m.lock(datastore)
        m.unlock(datastore)


def test_a_customer_cannot_discard_an_operators_pending_edit(server):
    edit = (
        f'<config xmlns="{NC}"><vpn-service xmlns="{SVC}"><vpn><id>other-vpn</id>'
        "<customer>pending</customer></vpn></vpn-service></config>"
    )
    with ncclient_connect(server, OPERATOR) as op:
        op.edit_config(target="candidate", config=edit)
        try:
            with ncclient_connect(server, CUSTOMER) as cust, pytest.raises(RPCError) as exc:
                cust.discard_changes()
            assert error_of(exc).tag == "access-denied"
            candidate = op.get_config("candidate").xml
            assert "<customer>pending</customer>" in candidate
        finally:
            op.discard_changes()


def test_a_customer_cannot_commit(server):
    with ncclient_connect(server, CUSTOMER) as m, pytest.raises(RPCError) as exc:
        m.commit()
    assert error_of(exc).tag == "access-denied"


def test_a_customer_cannot_kill_a_session(server):
    with ncclient_connect(server, OPERATOR) as victim, ncclient_connect(server, CUSTOMER) as m:
        with pytest.raises(RPCError) as exc:
            m.kill_session(victim.session_id)
        assert error_of(exc).tag == "access-denied"
        victim.get_config("running", filter=("subtree", f'<nacm xmlns="{NACM}"/>'))


# -- tenants -------------------------------------------------------------------------------


def test_the_customer_template_of_the_docs_applies_as_is(server):
    with ncclient_connect(server) as m:
        data = m.get_config("running", filter=("subtree", f'<nacm xmlns="{NACM}"/>')).xml
    assert "<name>customer-acme</name>" in data and "<user-name>acme-noc</user-name>" in data


def test_a_customer_reads_its_own_vpn_and_nothing_of_the_others(server):
    with ncclient_connect(server, CUSTOMER) as m:
        config = m.get_config("running").xml
        state = m.get().xml
    for reply in (config, state):
        assert "acme-1" in reply
        assert "other-vpn" not in reply and "other-1" not in reply
        assert "an-explicit-key-of-21" not in reply
        assert "<nacm" not in reply and "<system" not in reply
        assert OPERATOR[0] not in reply and ADMIN[0] not in reply
    assert "<sessions>" not in state


def test_a_customers_filter_cannot_probe_another_vpn(server):
    probe = "/s:vpn-service/s:vpn[s:id='other-vpn']/s:site[s:ce-address='192.0.2.11']"
    with ncclient_connect(server, CUSTOMER) as m:
        reply = m.get_config("running", filter=("xpath", ({"s": SVC}, probe))).xml
    assert "other" not in reply


class Listener:
    """A subscription in its own session; keeps every notification it gets."""

    def __init__(self, server: ServerProcess, user: tuple[str, str]) -> None:
        self.m = ncclient_connect(server, user)
        self.m.create_subscription()
        self.events: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            note = self.m.take_notification(block=True, timeout=0.2)
            if note is not None:
                self.events.append(note.notification_xml)

    def wait_for(self, marker: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not any(marker in e for e in self.events):
            assert time.monotonic() < deadline, f"no notification with {marker!r}"
            time.sleep(0.05)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.m.close_session()


def edit_customer_field(m, vpn_id: str, value: str) -> None:  # type: ignore[no-untyped-def]
    m.edit_config(
        target="running",
        config=f'<config xmlns="{NC}"><vpn-service xmlns="{SVC}"><vpn><id>{vpn_id}</id>'
        f"<customer>{value}</customer></vpn></vpn-service></config>",
    )


def test_a_customer_hears_only_of_changes_to_its_own_vpn(server):
    customer = Listener(server, CUSTOMER)
    admin = Listener(server, ADMIN)
    try:
        with ncclient_connect(server, OPERATOR) as m:
            edit_customer_field(m, "other-vpn", "Other Corp renamed")
            edit_customer_field(m, "acme-vpn", "ACME renamed")
            # The admin hears both, in order: once it has the second, the customer has
            # been sent everything it will get of the two.
            admin.wait_for("acme-vpn")
        customer.wait_for("acme-vpn")
        changes = [e for e in customer.events if "netconf-config-change" in e]
        assert len(changes) == 1
        assert "other-vpn" not in changes[0]
        assert "<source-host>" not in changes[0]
        assert any("other-vpn" in e for e in admin.events)
    finally:
        customer.close()
        admin.close()


def test_a_customer_does_not_hear_other_users_log_in(server):
    customer = Listener(server, CUSTOMER)
    admin = Listener(server, ADMIN)
    try:
        with ncclient_connect(server, OPERATOR):
            admin.wait_for(f"<username>{OPERATOR[0]}</username>")
        with ncclient_connect(server, CUSTOMER) as m:  # its own sessions it may hear of
            admin.wait_for(f"<username>{CUSTOMER[0]}</username>")
            m.get_config("running", filter=("subtree", f'<vpn-service xmlns="{SVC}"/>'))
        customer.wait_for(f"<username>{CUSTOMER[0]}</username>")
        assert not any(f"<username>{OPERATOR[0]}</username>" in e for e in customer.events)
    finally:
        customer.close()
        admin.close()


# -- errors ----------------------------------------------------------------------------------


def test_a_short_pre_shared_key_is_not_echoed_in_the_error(server):
    short = "short-key-x"
    config = (
        f'<config xmlns="{NC}"><vpn-service xmlns="{SVC}"><vpn><id>other-vpn</id><keys>'
        "<pre-shared-key><site-a>other-1</site-a><site-b>other-2</site-b>"
        f"<key>{short}</key></pre-shared-key></keys></vpn></vpn-service></config>"
    )
    with ncclient_connect(server) as m, pytest.raises(RPCError) as exc:
        m.edit_config(target="running", config=config)
    error = error_of(exc)
    assert short not in error.message and short not in (error.xml if hasattr(error, "xml") else "")
    assert "16..1024" in error.message  # names the rule


@pytest.mark.parametrize("length", [20, 21, 22, 40])
def test_test_only_tells_an_operator_nothing_about_a_hidden_key(server, length):
    config = (
        f'<config xmlns="{NC}"><vpn-service xmlns="{SVC}"><vpn><id>acme-vpn</id>'
        f"<security-profile><psk-min-length>{length}</psk-min-length></security-profile>"
        "</vpn></vpn-service></config>"
    )
    with ncclient_connect(server, OPERATOR) as m:
        # The same answer whatever the hidden key's length (21): nothing to bisect.
        m.edit_config(target="running", config=config, test_option="test-only")


def test_a_real_commit_refused_by_a_hidden_key_names_no_key_data(server):
    config = (
        f'<config xmlns="{NC}"><vpn-service xmlns="{SVC}"><vpn><id>acme-vpn</id>'
        "<security-profile><psk-min-length>40</psk-min-length></security-profile>"
        "</vpn></vpn-service></config>"
    )
    with ncclient_connect(server, OPERATOR) as m, pytest.raises(RPCError) as exc:
        m.edit_config(target="running", config=config)
    error = error_of(exc)
    assert "keys" not in (error.path or "") and "acme-2" not in (error.path or "")
    assert "an-explicit-key-of-21" not in error.message
    assert "acme-vpn" in (error.path or "")


# -- defaults are made once ------------------------------------------------------------------


def test_deleted_default_rule_lists_and_the_local_account_stay_deleted(tmp_path):
    srv = ServerProcess("cevpn-server", tmp_path / "state", free_port())
    srv.adduser(ADMIN[0], ADMIN[1], ("admin",))
    srv.start()
    try:
        with ncclient_connect(srv) as m:
            m.edit_config(
                target="running",
                config=f'<config xmlns="{NC}" xmlns:nc="{NC}"><nacm xmlns="{NACM}">'
                '<rule-list nc:operation="delete"><name>operators</name></rule-list>'
                '<rule-list nc:operation="delete"><name>cevpn-ce-agents</name></rule-list>'
                "</nacm>"
                f'<system xmlns="{SYS}"><authentication><user nc:operation="delete">'
                "<name>cevpn-local</name></user></authentication></system></config>",
            )
        srv.stop()
        srv.start()
        with ncclient_connect(srv) as m:
            data = m.get_config("running").xml
        assert "<name>operators</name>" not in data
        assert "<name>cevpn-ce-agents</name>" not in data
        assert "<name>cevpn-local</name>" not in data
    finally:
        srv.stop()


def test_a_listening_file_left_by_kill_9_is_removed_when_the_state_directory_is_taken(tmp_path):
    srv = ServerProcess("cevpn-server", tmp_path / "state", free_port())
    srv.adduser(ADMIN[0], ADMIN[1], ("admin",))
    srv.start()
    listening = srv.state_dir / "listening"
    deadline = time.monotonic() + 30
    while not listening.exists():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    srv.kill9()
    assert listening.exists()
    subprocess.run(
        [
            str(BIN / "cevpn-server"),
            "adduser",
            "--state-dir",
            str(srv.state_dir),
            "late",
            "--key",
            str(srv.state_dir / "local_admin_ed25519_key.pub"),
        ],
        check=True,
        capture_output=True,
    )
    assert not listening.exists()
