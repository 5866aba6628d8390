"""Who hears an event (RFC 8341 3.4.6) is decided once per event type, and follows NACM at once.

The VPN server has a subscriber per CE and an event per CE status change;
NotificationCenter caches, per event type, the subscriptions NACM lets hear
it.  A rule change or a new subscription must take effect for the very
next event, and every drop is still counted in /nacm/denied-notifications.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from lxml import etree

from nc_core.xmlutil import NACM_NS
from tests.in_process import InProcessServer

USERS = {"admin": ("pw-admin-1", ("admin",)), "watcher": ("pw-watch-1", ("watchers",))}
NCN = "urn:ietf:params:xml:ns:yang:ietf-netconf-notifications"
RULES = (
    f'<config xmlns="urn:ietf:params:xml:ns:netconf:base:1.0"><nacm xmlns="{NACM_NS}">'
    "<read-default>permit</read-default>"
    "<groups><group><name>admin</name><user-name>admin</user-name></group>"
    "<group><name>edit-{serial}</name></group>"
    "<group><name>watchers</name><user-name>watcher</user-name></group></groups>"
    "<rule-list><name>admins</name><group>admin</group><rule><name>all</name>"
    "<module-name>*</module-name><access-operations>*</access-operations>"
    "<action>permit</action></rule></rule-list>"
    "<rule-list><name>watch</name><group>watchers</group><rule><name>config-changes</name>"
    "<module-name>ietf-netconf-notifications</module-name>"
    "<notification-name>netconf-config-change</notification-name>"
    "<access-operations>read</access-operations><action>{action}</action></rule>"
    # The events report edits of /nacm (nacm:default-deny-all): watchers may read it.
    "<rule><name>read-nacm</name><module-name>ietf-netconf-acm</module-name>"
    "<access-operations>read</access-operations><action>permit</action></rule>"
    "</rule-list></nacm></config>"
)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[InProcessServer]:
    srv = InProcessServer(tmp_path / "state", users=USERS)
    try:
        yield srv
    finally:
        srv.close()


SERIAL = iter(range(1_000_000))


def set_action(admin: object, action: str) -> None:
    """Commit the rules with ``action``; each commit also adds a group, so that every one
    changes something and is reported."""
    config = RULES.replace("{action}", action).replace("{serial}", str(next(SERIAL)))
    admin.edit_config(target="running", config=config)  # type: ignore[attr-defined]


def next_event(session: object) -> str | None:
    """The name of the next event the session hears within 10 s, None if none."""
    n = session.take_notification(block=True, timeout=10)  # type: ignore[attr-defined]
    if n is None:
        return None
    root = etree.fromstring(n.notification_xml.encode())
    return str(etree.QName(root[1]).localname)


def denied(srv: InProcessServer) -> int:
    return int(srv.run(lambda: srv.server.nacm.denied_notifications))


def test_a_rule_denying_an_event_type_applies_to_the_next_event(server: InProcessServer) -> None:
    with server.connect("admin") as admin, server.connect("watcher") as watcher:
        set_action(admin, "permit")
        watcher.create_subscription()
        set_action(admin, "deny")  # its own event is the first one decided under the new rule
        before = denied(server)
        set_action(admin, "deny")
        assert denied(server) > before
        set_action(admin, "permit")  # the change to permit is heard: decided after the commit
        assert next_event(watcher) == "netconf-config-change"


def test_a_subscription_made_after_an_event_type_was_decided_hears_it(
    server: InProcessServer,
) -> None:
    with server.connect("admin") as admin:
        set_action(admin, "permit")
        admin.create_subscription()
        set_action(admin, "permit")  # decided, with only the admin subscribed
        assert next_event(admin) == "netconf-config-change"
        with server.connect("watcher") as watcher:
            watcher.create_subscription()
            set_action(admin, "permit")
            assert next_event(watcher) == "netconf-config-change"
