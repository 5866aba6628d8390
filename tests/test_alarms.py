"""Every alarm type a CE can raise is raised and cleared (nc_agent.alarms): the list itself,
certificate expiry and configuration fetch failure as pure logic on a controllable clock, and
each through a real agent over NETCONF (``<get>`` of ``ce-state/alarms`` and the
notifications).  tunnel-establishment-failure needs charon: tests/lab/test_ike_lab.py."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from lxml import etree

from nc_agent.alarms import (
    CERTIFICATE_EXPIRY,
    CONFIGURATION_FETCH_FAILURE,
    AlarmList,
    certificate_alarms,
    next_certificate_check,
)
from nc_agent.pull import FetchWatch
from tests.netconf_server import ServerProcess, ncclient_connect, running_server

NC = "urn:ietf:params:xml:ns:netconf:base:1.0"
CE = "urn:cevpn:yang:cevpn-ce"
NOW = dt.datetime(2026, 12, 6, 12, 0, tzinfo=dt.UTC)


def certificate(not_before: dt.datetime, not_after: dt.datetime) -> tuple[str, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "site-a")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .sign(key, hashes.SHA256())
    )
    pem = cert.public_bytes(serialization.Encoding.PEM).decode()
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    return pem, private


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, str]]] = []

    def __call__(self, name: str, **leaves: str) -> None:
        self.events.append((name, leaves))


# -- the list ---------------------------------------------------------------------------


def test_an_alarm_is_raised_once_updated_in_place_and_cleared_once():
    notes = Recorder()
    alarms = AlarmList(notes, clock=lambda: NOW)
    assert alarms.raise_alarm("cevpn-types:x", "r", "major", "first") is True
    assert alarms.raise_alarm("cevpn-types:x", "r", "major", "second") is False
    assert alarms.get("cevpn-types:x", "r").text == "second"  # type: ignore[union-attr]
    assert alarms.clear("cevpn-types:x", "r") is True
    assert alarms.clear("cevpn-types:x", "r") is False
    assert [name for name, _ in notes.events] == ["alarm-raised", "alarm-cleared"]


def test_a_new_severity_is_notified_again():
    notes = Recorder()
    alarms = AlarmList(notes)
    alarms.raise_alarm("cevpn-types:x", "r", "warning", "soon")
    alarms.raise_alarm("cevpn-types:x", "r", "critical", "now")
    assert [leaves["severity"] for _, leaves in notes.events] == ["warning", "critical"]
    assert len(alarms) == 1


# -- certificates -------------------------------------------------------------------------


def config_with(pem: str) -> dict[str, object]:
    return {"certificates": {"certificate": pem}}


def test_a_certificate_far_from_its_end_raises_nothing():
    pem, _ = certificate(NOW - dt.timedelta(days=10), NOW + dt.timedelta(days=355))
    assert certificate_alarms(config_with(pem), NOW) == {}


def test_a_certificate_within_thirty_days_of_its_end_is_a_warning():
    pem, _ = certificate(NOW - dt.timedelta(days=340), NOW + dt.timedelta(days=25))
    [(resource, (severity, text))] = certificate_alarms(config_with(pem), NOW).items()
    assert (resource, severity) == ("certificate", "warning")
    assert "in 25 days" in text and "rotate-keys" in text


def test_an_expired_certificate_is_critical():
    pem, _ = certificate(NOW - dt.timedelta(days=400), NOW - dt.timedelta(hours=1))
    assert certificate_alarms(config_with(pem), NOW)["certificate"][0] == "critical"


def test_a_short_lived_certificate_is_reported_in_its_last_fifth():
    pem, _ = certificate(NOW - dt.timedelta(hours=20), NOW + dt.timedelta(hours=5))
    assert certificate_alarms(config_with(pem), NOW)["certificate"][0] == "warning"
    assert certificate_alarms(config_with(pem), NOW - dt.timedelta(hours=2)) == {}


def test_ca_certificates_are_watched_too():
    pem, _ = certificate(NOW - dt.timedelta(days=340), NOW + dt.timedelta(days=1))
    config = {"certificates": {"ca-certificate": [{"name": "vpn-ca", "certificate": pem}]}}
    assert list(certificate_alarms(config, NOW)) == ["ca-certificate[vpn-ca]"]


def test_the_next_check_is_when_the_warning_starts_then_when_the_certificate_ends():
    ends = NOW + dt.timedelta(days=40)
    pem, _ = certificate(NOW - dt.timedelta(days=300), ends)
    assert next_certificate_check(config_with(pem), NOW) == ends - dt.timedelta(days=30)
    later = NOW + dt.timedelta(days=20)
    assert next_certificate_check(config_with(pem), later) == ends


# -- configuration fetch -------------------------------------------------------------------


def test_fetch_failures_raise_the_alarm_only_past_the_limit_and_a_success_clears_it():
    clock = [100.0]
    alarms = AlarmList(Recorder())
    watch = FetchWatch(alarms, clock=lambda: clock[0])
    clock[0] += 59
    watch.failed("connection refused", limit=60)
    assert alarms.get(CONFIGURATION_FETCH_FAILURE, "vpn-server") is None
    clock[0] += 1
    watch.failed("connection refused", limit=60)
    alarm = alarms.get(CONFIGURATION_FETCH_FAILURE, "vpn-server")
    assert alarm is not None and "connection refused" in alarm.text
    watch.succeeded()
    assert alarms.get(CONFIGURATION_FETCH_FAILURE, "vpn-server") is None


# -- through a real agent ---------------------------------------------------------------------


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[ServerProcess]:
    (tmp_path / "x").mkdir()
    with running_server(tmp_path / "x", "cevpn-agent", "--dataplane", "none") as srv:
        yield srv


def alarms_of(m) -> str:  # type: ignore[no-untyped-def]
    return m.get(filter=("subtree", f'<ce-state xmlns="{CE}"><alarms/></ce-state>')).data_xml


def set_certificate(m, pem: str, private: str) -> None:  # type: ignore[no-untyped-def]
    m.edit_config(
        target="running",
        config=f'<config xmlns="{NC}"><ce xmlns="{CE}"><certificates>'
        f"<private-key>{private}</private-key><certificate>{pem}</certificate>"
        "</certificates></ce></config>",
    )


def test_an_agent_raises_certificate_expiry_and_clears_it_when_the_certificate_is_renewed(agent):
    now = dt.datetime.now(dt.UTC)
    with ncclient_connect(agent) as m:
        m.create_subscription()
        old, old_key = certificate(now - dt.timedelta(days=340), now + dt.timedelta(days=3))
        set_certificate(m, old, old_key)
        assert "certificate-expiry" in alarms_of(m)
        new, new_key = certificate(now, now + dt.timedelta(days=365))
        set_certificate(m, new, new_key)
        assert "<alarm>" not in alarms_of(m)
        seen = []
        deadline = time.monotonic() + 30
        while not any("alarm-cleared" in n for n in seen):
            assert time.monotonic() < deadline, seen
            note = m.take_notification(block=True, timeout=1)
            if note is not None:
                seen.append(note.notification_xml)
    raised = [n for n in seen if "alarm-raised" in n]
    assert raised and CERTIFICATE_EXPIRY.split(":")[1] in raised[0]


AL = "urn:ietf:params:xml:ns:yang:ietf-alarms"


def standard_alarms_of(m) -> list[dict[str, str]]:  # type: ignore[no-untyped-def]
    data = m.get(filter=("subtree", f'<alarms xmlns="{AL}"><alarm-list/></alarms>')).data_ele
    return [
        {etree.QName(c).localname: c.text or "" for c in alarm if len(c) == 0}
        for alarm in data.iter(f"{{{AL}}}alarm")
    ]


def test_an_agent_keeps_its_alarms_in_the_ietf_alarms_list_too(agent):
    now = dt.datetime.now(dt.UTC)
    with ncclient_connect(agent) as m:
        m.create_subscription()
        old, old_key = certificate(now - dt.timedelta(days=340), now + dt.timedelta(days=3))
        set_certificate(m, old, old_key)
        [alarm] = standard_alarms_of(m)
        assert alarm["resource"] == "/ce:ce/ce:certificates/ce:certificate"
        assert alarm["alarm-type-id"].endswith(":certificate-expiry")
        assert (alarm["is-cleared"], alarm["perceived-severity"]) == ("false", "warning")
        new, new_key = certificate(now, now + dt.timedelta(days=365))
        set_certificate(m, new, new_key)
        [alarm] = standard_alarms_of(m)
        assert alarm["is-cleared"] == "true"
        severities = []
        deadline = time.monotonic() + 30
        while "cleared" not in severities:
            assert time.monotonic() < deadline, severities
            note = m.take_notification(block=True, timeout=1)
            if note is not None:
                event = etree.fromstring(note.notification_xml.encode()).find(
                    f"{{{AL}}}alarm-notification"
                )
                if event is not None:
                    severities.append(event.findtext(f"{{{AL}}}perceived-severity"))
        assert severities == ["warning", "cleared"]
        inventory = m.get(
            filter=("subtree", f'<alarms xmlns="{AL}"><alarm-inventory/></alarms>')
        ).data_xml
        assert "tunnel-establishment-failure" in inventory
        assert "configuration-fetch-failure" in inventory


def test_each_ce_alarm_has_an_instance_identifier_as_its_resource():
    from nc_agent.alarms import TUNNEL_ESTABLISHMENT_FAILURE, resource_of

    assert resource_of(TUNNEL_ESTABLISHMENT_FAILURE, "b").path == "/ce:ce/ce:peer[ce:name='b']"
    assert resource_of(CERTIFICATE_EXPIRY, "ca-certificate[vpn-ca]").path == (
        "/ce:ce/ce:certificates/ce:ca-certificate[ce:name='vpn-ca']"
    )
    assert resource_of(CONFIGURATION_FETCH_FAILURE, "vpn-server").path == (
        "/ce:ce/ce:pre-configuration"
    )
    alarms = AlarmList(Recorder(), clock=lambda: NOW)
    alarms.raise_alarm(TUNNEL_ESTABLISHMENT_FAILURE, "b", "major", "IKE keeps failing")
    [standard] = alarms.standard.active()
    assert (standard.type_id, standard.severity) == (
        "cevpn-alarms:tunnel-establishment-failure",
        "major",
    )
    alarms.clear(TUNNEL_ESTABLISHMENT_FAILURE, "b")
    assert alarms.standard.active() == [] and len(alarms.standard) == 1
