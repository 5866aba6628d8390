"""RFC 8632 alarms (ietf-alarms) on both servers: the shared alarm list (nc_core.alarms) as pure
logic on a controllable clock, its XML validated by libyang against ietf-alarms, the VPN
server's own alarms (nc_server.alarms: certificates near expiry, the CA's included) on a key
store, and the real server raising and clearing ce-unreachable and provisioning-failure as
CEs go away and refuse, seen in ``<get>`` of ``/alarms`` and in ``alarm-notification``.
The CE agent's alarms in its alarm list: tests/test_alarms.py."""

from __future__ import annotations

import datetime as dt
import json
import time
from pathlib import Path
from typing import Any

from lxml import etree

from nc_core.alarms import AL_NS, AlarmList, AlarmType, instance
from nc_core.schema import SERVICE_MODULES, Schema
from nc_core.server import BASE_FEATURES, BASE_MODULES
from nc_server.alarms import (
    CE_UNREACHABLE,
    CERTIFICATE_EXPIRY,
    INVENTORY,
    NEW_SITE_RETRIES,
    PROVISIONING_FAILURE,
    certificate_alarms,
    check_certificates,
    provisioning_status,
    site_removed,
    site_resource,
    vpn_resource,
)
from nc_server.ca import CA_VALIDITY, CertificateAuthority
from nc_server.keystore import TABLE_CA
from nc_server.storage import SqliteStorage
from tests.controller import SVC_NS, Controller, controller, vpn_xml
from tests.netconf_server import ServerProcess, free_port, ncclient_connect
from tests.waiting import wait_for

NOW = dt.datetime(2026, 12, 6, 12, 0, tzinfo=dt.UTC)
A = f"{{{AL_NS}}}"


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> dt.datetime:
        return self.now


def server_list(clock: Clock, notes: list[etree._Element]) -> AlarmList:
    return AlarmList(INVENTORY, lambda event, alarm: notes.append(event), clock=clock)


# -- the list ------------------------------------------------------------------------------


def test_an_alarm_is_raised_changed_and_cleared_and_its_entry_stays():
    clock, notes = Clock(), []
    alarms = server_list(clock, notes)
    site = site_resource("v1", "s1")
    assert alarms.raise_alarm(site, CE_UNREACHABLE, "major", "gone")
    assert not alarms.raise_alarm(site, CE_UNREACHABLE, "major", "gone")  # no change
    clock.now += dt.timedelta(minutes=1)
    assert alarms.raise_alarm(site, CE_UNREACHABLE, "critical", "still gone")
    clock.now += dt.timedelta(minutes=1)
    assert alarms.clear(site, CE_UNREACHABLE)
    assert not alarms.clear(site, CE_UNREACHABLE)
    alarm = alarms.get(site, CE_UNREACHABLE)
    assert alarm is not None and alarm.is_cleared and alarm.time_created == NOW
    assert alarm.last_raised == NOW + dt.timedelta(minutes=1)
    assert [c.severity for c in alarm.changes] == ["cleared", "critical", "major"]
    assert alarms.active() == [] and len(alarms) == 1
    assert [n.findtext(f"{A}perceived-severity") for n in notes] == [
        "major",
        "critical",
        "cleared",
    ]
    # Raised again: the same entry, active.
    clock.now += dt.timedelta(minutes=1)
    alarms.raise_alarm(site, CE_UNREACHABLE, "major", "gone again")
    assert [a.type_id for a in alarms.active()] == [CE_UNREACHABLE]
    assert alarms.purge() == 0 and len(alarms) == 1


def test_changes_in_the_same_instant_get_distinct_times_and_history_is_bounded():
    clock = Clock()
    alarms = AlarmList(INVENTORY, clock=clock, max_status_changes=3)
    for i in range(5):
        alarms.raise_alarm("r", CE_UNREACHABLE, "major", f"text {i}")
    alarm = alarms.get("r", CE_UNREACHABLE)
    assert alarm is not None and len(alarm.changes) == 3
    assert len({c.time for c in alarm.changes}) == 3
    assert alarm.changes[0].text == "text 4"


def _schema(modules: tuple[str, ...]) -> Schema:
    return Schema([*BASE_MODULES, *modules], features=BASE_FEATURES)


def test_the_state_and_the_notification_are_valid_ietf_alarms():
    clock, notes = Clock(), []
    alarms = server_list(clock, notes)
    alarms.raise_alarm(site_resource("v1", "s1"), CE_UNREACHABLE, "major", "gone")
    alarms.raise_alarm(vpn_resource("v1"), CERTIFICATE_EXPIRY, "warning", "soon")
    alarms.clear(vpn_resource("v1"), CERTIFICATE_EXPIRY)
    schema = _schema(SERVICE_MODULES)
    state = etree.tostring(alarms.state()).decode()
    tree = schema.ctx.parse_data_mem(state, "xml", strict=True, validate_present=True)
    try:
        data = json.loads(tree.print_mem("json", with_siblings=True))
    finally:
        tree.free(with_siblings=True)
    listed = data["ietf-alarms:alarms"]["alarm-list"]
    assert listed["number-of-alarms"] == 2
    by_type = {a["alarm-type-id"]: a for a in listed["alarm"]}
    # libyang understood the resource as an instance-identifier into cevpn-service.
    assert by_type["cevpn-alarms:ce-unreachable"]["resource"] == (
        "/cevpn-service:vpn-service/vpn[id='v1']/site[id='s1']"
    )
    assert by_type["cevpn-alarms:certificate-expiry"]["is-cleared"] is True
    inventory = data["ietf-alarms:alarms"]["alarm-inventory"]["alarm-type"]
    assert {t["alarm-type-id"] for t in inventory} == {
        "cevpn-alarms:ce-unreachable",
        "cevpn-alarms:provisioning-failure",
        "cevpn-alarms:tunnel-down",
        "cevpn-alarms:certificate-expiry",
    }
    summary = data["ietf-alarms:alarms"]["summary"]["alarm-summary"]
    assert {s["severity"]: s["not-cleared"] for s in summary} == {"major": 1, "warning": 0}
    note = etree.tostring(notes[0]).decode()
    from libyang.util import DataType

    parsed = schema.ctx.parse_op_mem("xml", note, DataType.NOTIF_YANG)
    assert parsed.name() == "alarm-notification"
    parsed.free()


# -- the server's own alarms -------------------------------------------------------------


def test_provisioning_statuses_raise_and_clear_the_site_alarms():
    alarms = AlarmList(INVENTORY, clock=Clock())
    provisioning_status(alarms, "v1", "s1", "unreachable", "connection refused")
    provisioning_status(alarms, "v1", "s1", "pending", None)  # says nothing of the CE
    [alarm] = alarms.active()
    assert alarm.type_id == CE_UNREACHABLE and "connection refused" in alarm.text
    provisioning_status(alarms, "v1", "s1", "failed", "the CE refused the configuration")
    assert [a.type_id for a in alarms.active()] == [PROVISIONING_FAILURE]
    provisioning_status(alarms, "v1", "s1", "in-sync", None)
    assert alarms.active() == []
    provisioning_status(alarms, "v1", "s2", "failed", "x")
    site_removed(alarms, "v1", "s2")
    assert alarms.active() == []


def test_a_ce_never_reached_is_alarmed_only_after_some_attempts():
    alarms = AlarmList(INVENTORY, clock=Clock())
    for retries in range(1, NEW_SITE_RETRIES):
        provisioning_status(alarms, "v1", "new", "unreachable", "refused", reached_before=False,
                            retries=retries)  # fmt: skip
        assert alarms.active() == []
    provisioning_status(alarms, "v1", "new", "unreachable", "refused", reached_before=False,
                        retries=NEW_SITE_RETRIES)  # fmt: skip
    assert [a.type_id for a in alarms.active()] == [CE_UNREACHABLE]


def _store_ca(storage: SqliteStorage, vpn: str, created: dt.datetime) -> CertificateAuthority:
    ca = CertificateAuthority.create(vpn, 128, now=created)
    record = {"certificate": ca.certificate_pem, "private-key": ca.private_key_pem()}
    storage.put(TABLE_CA, vpn, json.dumps(record).encode())
    return ca


def test_a_ca_near_its_end_raises_a_warning_then_a_critical_alarm(tmp_path: Path):
    storage = SqliteStorage(tmp_path / "db.sqlite")
    _store_ca(storage, "old", NOW - CA_VALIDITY + dt.timedelta(days=10))
    _store_ca(storage, "new", NOW)
    found = certificate_alarms(storage, NOW)
    assert list(found) == [vpn_resource("old")]
    severity, text = found[vpn_resource("old")]
    assert severity == "warning" and "The CA certificate of VPN old" in text
    assert "in 9 days" in text or "in 10 days" in text
    clock = Clock()
    alarms = AlarmList(INVENTORY, clock=clock)
    due = check_certificates(alarms, storage)
    assert due is not None and due > NOW
    clock.now = due
    check_certificates(alarms, storage)
    [alarm] = alarms.active()
    assert alarm.severity == "critical" and alarm.resource.path == vpn_resource("old").path
    storage.delete(TABLE_CA, "old")  # replaced
    check_certificates(alarms, storage)
    assert alarms.active() == []
    storage.close()


# -- through the real server ----------------------------------------------------------------


def alarm_list(m: Any) -> dict[tuple[str, str], dict[str, str]]:
    """(resource, alarm-type-id) -> leaves of each entry of /alarms/alarm-list."""
    data = m.get(filter=("subtree", f'<alarms xmlns="{AL_NS}"><alarm-list/></alarms>')).data_ele
    out = {}
    for alarm in data.iter(f"{A}alarm"):
        leaves = {etree.QName(c).localname: c.text or "" for c in alarm if len(c) == 0}
        out[(leaves["resource"], leaves["alarm-type-id"].split(":")[1])] = leaves
    return out


def alarm_notification(
    m: Any, type_name: str, severity: str, timeout: float = 60
) -> etree._Element:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        n = m.take_notification(block=True, timeout=1)
        if n is None:
            continue
        event = etree.fromstring(n.notification_xml.encode()).find(f"{A}alarm-notification")
        if event is None:
            continue
        if (event.findtext(f"{A}alarm-type-id") or "").endswith(":" + type_name) and (
            event.findtext(f"{A}perceived-severity") == severity
        ):
            return event
    raise AssertionError(f"no alarm-notification {type_name} {severity}")


def site_path(vpn: str, site: str) -> str:
    return f"/svc:vpn-service/svc:vpn[svc:id='{vpn}']/svc:site[svc:id='{site}']"


def mesh(ctl: Controller, vpn: str, n: int) -> None:
    ctl.edit(vpn_xml(vpn))
    for i in range(1, n + 1):
        ctl.join(vpn, f"{vpn}-s{i}", i, f"10.{i}.0.0/24")


def test_the_server_raises_ce_unreachable_and_clears_it_when_the_ce_returns(tmp_path: Path):
    with controller(tmp_path) as ctl:
        mesh(ctl, "plum", 2)
        ctl.in_sync("plum-s1", "plum-s2")
        with ctl.nc() as watcher:
            watcher.create_subscription()
            ctl.agents["plum-s2"].stop()
            ctl.join("plum", "plum-s3", 3, "10.3.0.0/24")  # plum-s2 must learn of it
            raised = alarm_notification(watcher, "ce-unreachable", "major")
            assert raised.findtext(f"{A}resource") == site_path("plum", "plum-s2")
            with ctl.nc() as m:
                entry = alarm_list(m)[(site_path("plum", "plum-s2"), "ce-unreachable")]
            assert entry["is-cleared"] == "false" and entry["perceived-severity"] == "major"
            assert "plum-s2" in entry["alarm-text"]
            ctl.agents["plum-s2"].start()
            alarm_notification(watcher, "ce-unreachable", "cleared")
        ctl.in_sync("plum-s2")
        with ctl.nc() as m:
            entry = alarm_list(m)[(site_path("plum", "plum-s2"), "ce-unreachable")]
        assert entry["is-cleared"] == "true"


def test_the_server_raises_provisioning_failure_when_a_ce_refuses(tmp_path: Path):
    with controller(tmp_path) as ctl:
        mesh(ctl, "sand", 2)
        ctl.in_sync("sand-s1", "sand-s2")
        with ctl.nc() as watcher, ctl.agents["sand-s1"].connect_as_server(ctl.server) as ce:
            watcher.create_subscription()
            ce.lock(target="candidate")  # the server's push cannot edit it: refused
            ctl.join("sand", "sand-s3", 3, "10.3.0.0/24")
            raised = alarm_notification(watcher, "provisioning-failure", "major")
            assert raised.findtext(f"{A}resource") == site_path("sand", "sand-s1")
            ce.unlock(target="candidate")
            ctl.rpc(
                f'<resynchronise xmlns="{SVC_NS}"><vpn>sand</vpn><site>sand-s1</site>'
                "</resynchronise>"
            )
            alarm_notification(watcher, "provisioning-failure", "cleared")


def test_the_server_raises_an_alarm_for_a_ca_near_expiry_at_start_up(tmp_path: Path):
    state = tmp_path / "server"
    state.mkdir(mode=0o700)
    storage = SqliteStorage.in_state_dir(state)
    _store_ca(storage, "aged", dt.datetime.now(dt.UTC) - CA_VALIDITY + dt.timedelta(days=5))
    storage.close()
    server = ServerProcess("cevpn-server", state, free_port())
    server.adduser("admin", "secret-admin", ("admin",))
    server.start()
    try:
        with ncclient_connect(server, ("admin", "secret-admin")) as m:
            wait_for(lambda: bool(alarm_list(m)), 10, "the certificate alarm")
            [((resource, kind), entry)] = alarm_list(m).items()
    finally:
        server.stop()
    assert (resource, kind) == ("/svc:vpn-service/svc:vpn[svc:id='aged']", "certificate-expiry")
    assert entry["perceived-severity"] == "warning"
    assert "The CA certificate of VPN aged expires" in entry["alarm-text"]


def test_a_customer_reads_no_alarm_of_the_server():
    from nc_server.access import customer_rule_list

    rules = etree.tostring(customer_rule_list("acme", ["v1"])).decode()
    assert "<module-name>ietf-alarms</module-name>" in rules


def test_resources_are_instance_identifiers_with_their_prefixes():
    resource = instance("ce", "urn:x", ("ce", {}), ("peer", {"name": "b"}))
    assert resource.path == "/ce:ce/ce:peer[ce:name='b']"
    assert dict(resource.namespaces) == {"ce": "urn:x"}
    kinds = [AlarmType("cevpn-alarms:x", "d")]
    alarms = AlarmList(kinds, clock=Clock())
    alarms.raise_alarm(resource, "cevpn-alarms:x", "minor", "t")
    elem = alarms.state().find(f"{A}alarm-list/{A}alarm/{A}resource")
    assert elem is not None and elem.nsmap["ce"] == "urn:x"
