"""The server's tunnel-down alarms from what CEs report (nc_server.alarms): one alarm per
site and peer, raised by a tunnel-down notification or a 'failed' status, cleared by the
tunnel coming up or the peer leaving the CE.  The end to end path (a real tunnel failing
in the lab, its notification over the watcher session) is tests/lab/test_server_lab.py's."""

from __future__ import annotations

from nc_core.alarms import AlarmList
from nc_server.alarms import INVENTORY, TUNNEL_DOWN, site_resource, tunnel_event, tunnel_statuses


def alarms() -> AlarmList:
    return AlarmList(INVENTORY, log_changes=False)


def active(lst: AlarmList) -> set[tuple[str, str]]:
    return {(a.resource.path, a.qualifier) for a in lst.active() if a.type_id == TUNNEL_DOWN}


SITE = site_resource("v", "s1").path


def test_a_tunnel_down_notification_raises_an_alarm_qualified_by_the_peer() -> None:
    lst = alarms()
    tunnel_event(lst, "v", "s1", "tunnel-down", "s2", "dead peer detection")
    assert active(lst) == {(SITE, "s2")}
    alarm = lst.get(site_resource("v", "s1"), TUNNEL_DOWN, "s2")
    assert alarm is not None and alarm.severity == "major"
    assert alarm.text == "The CE of site s1 reports its tunnel to s2 down: dead peer detection"


def test_tunnel_up_clears_only_that_peers_alarm() -> None:
    lst = alarms()
    tunnel_event(lst, "v", "s1", "tunnel-down", "s2", None)
    tunnel_event(lst, "v", "s1", "tunnel-down", "s3", None)
    tunnel_event(lst, "v", "s1", "tunnel-up", "s2", None)
    assert active(lst) == {(SITE, "s3")}


def test_a_failed_attempt_alone_raises_nothing() -> None:
    """Each failed attempt is notified; a tunnel still being set up is not down."""
    lst = alarms()
    tunnel_event(lst, "v", "s1", "tunnel-establishment-failed", "s2", "timeout")
    assert active(lst) == set()


def test_statuses_read_at_watch_start_raise_failed_and_clear_what_is_up() -> None:
    lst = alarms()
    tunnel_event(lst, "v", "s1", "tunnel-down", "s2", None)
    tunnel_statuses(lst, "v", "s1", {"s2": "up", "s3": "failed", "s4": "connecting"})
    assert active(lst) == {(SITE, "s3")}


def test_statuses_leave_an_alarm_of_a_tunnel_still_being_set_up() -> None:
    lst = alarms()
    tunnel_event(lst, "v", "s1", "tunnel-down", "s2", None)
    tunnel_statuses(lst, "v", "s1", {"s2": "connecting"})
    assert active(lst) == {(SITE, "s2")}


def test_a_peer_no_longer_on_the_ce_clears_its_alarm() -> None:
    lst = alarms()
    tunnel_event(lst, "v", "s1", "tunnel-down", "s2", None)
    tunnel_statuses(lst, "v", "s1", {"s3": "up"})
    assert active(lst) == set()


def test_one_sites_statuses_do_not_touch_another_sites_alarms() -> None:
    lst = alarms()
    tunnel_event(lst, "v", "s2", "tunnel-down", "s1", None)
    tunnel_statuses(lst, "v", "s1", {})
    assert active(lst) == {(site_resource("v", "s2").path, "s1")}
