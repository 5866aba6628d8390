"""The RFC 8632 alarm list (ietf-alarms) a server keeps: pure logic on a controllable clock.

Both daemons keep one :class:`AlarmList`: the CE agent for its own alarms (nc_agent.alarms
feeds it), the VPN server for its own (CE unreachable, provisioning failed, certificates
near expiry).  It produces what ietf-alarms says a server shows and sends:

- ``/alarms/alarm-list``: one entry per (resource, alarm-type-id, alarm-type-qualifier),
  created the first time the alarm is raised and kept when it clears (``is-cleared``)
  until purged; ``status-change`` holds its latest state changes, newest first
  (``alarm-history``), at most ``/alarms/control/max-alarm-status-changes`` (32);
- ``/alarms/alarm-inventory``: every alarm type the server may raise;
- ``/alarms/summary`` (``alarm-summary``): counts per severity;
- the ``alarm-notification`` of each state change, handed to ``notify``.

An alarm's state changes when it is raised, when its severity or text changes, and when
it clears; raising an active alarm again with the same severity and text changes nothing.
The list is not persisted: a restarted daemon raises again what still holds.

:meth:`AlarmList.active` is what other readers (metrics) count: the alarms not cleared,
each with ``type_id`` and ``severity``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from lxml import etree

from nc_core.xmlutil import default_ns_element

AL_NS = "urn:ietf:params:xml:ns:yang:ietf-alarms"
CEVPN_ALARMS_NS = "urn:cevpn:yang:cevpn-alarms"
MODULE = "ietf-alarms"
FEATURES = ("alarm-history", "alarm-summary")
"""The ietf-alarms features both daemons implement."""

SEVERITIES = ("indeterminate", "warning", "minor", "major", "critical")
MAX_STATUS_CHANGES = 32
"""ietf-alarms' default /alarms/control/max-alarm-status-changes."""

log = logging.getLogger("cevpn.alarms")


def _q(name: str) -> str:
    return f"{{{AL_NS}}}{name}"


def timestamp(moment: datetime) -> str:
    """yang:date-and-time in UTC, to the microsecond (status-change is keyed by time)."""
    return moment.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class AlarmType:
    """One entry of the alarm inventory: an identity derived from ``al:alarm-type-id``."""

    id: str
    """``module:identity``, e.g. ``cevpn-alarms:ce-unreachable``."""
    description: str
    severities: tuple[str, ...] = ()
    qualifier: str = ""
    will_clear: bool = True


@dataclass(frozen=True)
class Resource:
    """An alarming resource: an instance-identifier in XML notation (every node prefixed)
    with the namespaces of its prefixes, or a plain string when ``namespaces`` is empty."""

    path: str
    namespaces: Mapping[str, str] = field(default_factory=dict, compare=False, hash=False)

    def __str__(self) -> str:
        return self.path


def instance(prefix: str, ns: str, *steps: tuple[str, Mapping[str, str]]) -> Resource:
    """The instance-identifier of a data node of one module: ``steps`` are (node name,
    keys), e.g. ``instance("svc", NS, ("vpn-service", {}), ("vpn", {"id": "v1"}))`` is
    ``/svc:vpn-service/svc:vpn[svc:id='v1']``."""
    parts = []
    for name, keys in steps:
        predicates = "".join(f"[{prefix}:{k}={_quoted(v)}]" for k, v in keys.items())
        parts.append(f"/{prefix}:{name}{predicates}")
    return Resource("".join(parts), {prefix: ns})


def _quoted(value: str) -> str:
    return f'"{value}"' if "'" in value else f"'{value}'"


@dataclass(frozen=True)
class StatusChange:
    time: datetime
    severity: str
    """A severity, or ``cleared``."""
    text: str


@dataclass
class Alarm:
    """One entry of the alarm list."""

    resource: Resource
    type_id: str
    qualifier: str
    time_created: datetime
    is_cleared: bool
    last_raised: datetime
    last_changed: datetime
    severity: str
    """perceived-severity: the last severity it was raised with (kept when it clears)."""
    text: str
    changes: list[StatusChange]
    """Newest first."""

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.resource.path, self.type_id, self.qualifier)


Notify = Callable[[etree._Element, Alarm], None]


class AlarmList:
    """/alarms of one server."""

    def __init__(
        self,
        inventory: Sequence[AlarmType],
        notify: Notify | None = None,
        *,
        clock: Callable[[], datetime] | None = None,
        namespaces: Mapping[str, str] | None = None,
        max_status_changes: int = MAX_STATUS_CHANGES,
        log_changes: bool = True,
    ) -> None:
        self.inventory = list(inventory)
        self.notify = notify
        self.clock = clock or (lambda: datetime.now(UTC))
        self.namespaces = {"cevpn-alarms": CEVPN_ALARMS_NS, **(namespaces or {})}
        """Module name -> namespace of the alarm type identities."""
        self.max_status_changes = max_status_changes
        self.log_changes = log_changes
        """Log each state change (False: the caller logs them its own way)."""
        self._alarms: dict[tuple[str, str, str], Alarm] = {}
        self.last_changed: datetime | None = None

    # -- reading ------------------------------------------------------------------------

    def __iter__(self) -> Iterator[Alarm]:
        """Every entry, cleared ones included, in a stable order."""
        return iter(sorted(self._alarms.values(), key=lambda a: a.key))

    def __len__(self) -> int:
        return len(self._alarms)

    def active(self) -> list[Alarm]:
        """The alarms not cleared (what metrics count)."""
        return [a for a in self if not a.is_cleared]

    def get(self, resource: Resource | str, type_id: str, qualifier: str = "") -> Alarm | None:
        return self._alarms.get((str(resource), type_id, qualifier))

    # -- changing -----------------------------------------------------------------------

    def raise_alarm(
        self,
        resource: Resource | str,
        type_id: str,
        severity: str,
        text: str,
        qualifier: str = "",
    ) -> bool:
        """Raise an alarm, or change its severity or text; True if its state changed."""
        if severity not in SEVERITIES:
            raise ValueError(f"not an ietf-alarms severity: {severity!r}")
        res = resource if isinstance(resource, Resource) else Resource(resource)
        key = (res.path, type_id, qualifier)
        alarm = self._alarms.get(key)
        if alarm is not None and not alarm.is_cleared:
            if alarm.severity == severity and alarm.text == text:
                return False
        moment = self._moment(alarm)
        if alarm is None:
            alarm = Alarm(
                res, type_id, qualifier, moment, False, moment, moment, severity, text, []
            )
            self._alarms[key] = alarm
        alarm.is_cleared = False
        alarm.last_raised = moment
        alarm.severity = severity
        alarm.text = text
        self._changed(alarm, StatusChange(moment, severity, text))
        return True

    def clear(self, resource: Resource | str, type_id: str, qualifier: str = "") -> bool:
        """Clear an active alarm; True if it was active.  The entry stays, cleared."""
        alarm = self._alarms.get((str(resource), type_id, qualifier))
        if alarm is None or alarm.is_cleared:
            return False
        moment = self._moment(alarm)
        alarm.is_cleared = True
        self._changed(alarm, StatusChange(moment, "cleared", alarm.text))
        return True

    def set_exactly(
        self, type_id: str, wanted: Mapping[Resource, tuple[str, str]], qualifier: str = ""
    ) -> None:
        """Make the active alarms of ``type_id`` exactly ``wanted`` (resource -> (severity,
        text)): raise the new, update the changed, clear the others."""
        paths = {r.path for r in wanted}
        for alarm in self.active():
            if alarm.type_id == type_id and alarm.qualifier == qualifier:
                if alarm.resource.path not in paths:
                    self.clear(alarm.resource, type_id, qualifier)
        for resource, (severity, text) in wanted.items():
            self.raise_alarm(resource, type_id, severity, text, qualifier)

    def purge(self, *, cleared_only: bool = True) -> int:
        """Remove entries from the list (purge-alarms): the cleared ones by default.
        Returns how many were purged."""
        gone = [k for k, a in self._alarms.items() if a.is_cleared or not cleared_only]
        for key in gone:
            del self._alarms[key]
        if gone:
            self.last_changed = self.clock()
        return len(gone)

    def _moment(self, alarm: Alarm | None) -> datetime:
        """Now, but later than the alarm's last change: status-change is keyed by time."""
        moment = self.clock()
        if alarm is not None and alarm.changes and moment <= alarm.changes[0].time:
            moment = alarm.changes[0].time + timedelta(microseconds=1)
        return moment

    def _changed(self, alarm: Alarm, change: StatusChange) -> None:
        alarm.last_changed = change.time
        alarm.changes.insert(0, change)
        del alarm.changes[self.max_status_changes :]
        self.last_changed = change.time
        if not self.log_changes:
            pass
        elif change.severity == "cleared":
            log.info("alarm cleared: %s %s", alarm.type_id, alarm.resource)
        else:
            log.warning(
                "alarm raised: %s %s (%s): %s",
                alarm.type_id,
                alarm.resource,
                change.severity,
                change.text,
            )
        if self.notify is not None:
            self.notify(self.notification(alarm), alarm)

    # -- XML ----------------------------------------------------------------------------

    def _type_id(self, parent: etree._Element, name: str, type_id: str) -> None:
        module, _, identity = type_id.partition(":")
        ns = self.namespaces.get(module)
        if ns is None:
            raise KeyError(f"no namespace known for the alarm types of {module!r}")
        elem = etree.SubElement(parent, _q(name), nsmap={module: ns})
        elem.text = f"{module}:{identity}"

    @staticmethod
    def _resource(parent: etree._Element, resource: Resource) -> None:
        elem = etree.SubElement(parent, _q("resource"), nsmap=dict(resource.namespaces))
        elem.text = resource.path

    def notification(self, alarm: Alarm) -> etree._Element:
        """The ``alarm-notification`` of the alarm's latest state change."""
        change = alarm.changes[0]
        note = default_ns_element(AL_NS, "alarm-notification")
        self._resource(note, alarm.resource)
        self._type_id(note, "alarm-type-id", alarm.type_id)
        etree.SubElement(note, _q("alarm-type-qualifier")).text = alarm.qualifier
        etree.SubElement(note, _q("time")).text = timestamp(change.time)
        etree.SubElement(note, _q("perceived-severity")).text = change.severity
        etree.SubElement(note, _q("alarm-text")).text = change.text
        return note

    def state(self) -> etree._Element:
        """``/alarms`` as operational state: alarm-list, alarm-inventory, summary."""
        top = default_ns_element(AL_NS, "alarms")
        alarm_list = etree.SubElement(top, _q("alarm-list"))
        etree.SubElement(alarm_list, _q("number-of-alarms")).text = str(len(self._alarms))
        if self.last_changed is not None:
            etree.SubElement(alarm_list, _q("last-changed")).text = timestamp(self.last_changed)
        for alarm in self:
            entry = etree.SubElement(alarm_list, _q("alarm"))
            self._resource(entry, alarm.resource)
            self._type_id(entry, "alarm-type-id", alarm.type_id)
            etree.SubElement(entry, _q("alarm-type-qualifier")).text = alarm.qualifier
            etree.SubElement(entry, _q("time-created")).text = timestamp(alarm.time_created)
            etree.SubElement(entry, _q("is-cleared")).text = str(alarm.is_cleared).lower()
            etree.SubElement(entry, _q("last-raised")).text = timestamp(alarm.last_raised)
            etree.SubElement(entry, _q("last-changed")).text = timestamp(alarm.last_changed)
            etree.SubElement(entry, _q("perceived-severity")).text = alarm.severity
            etree.SubElement(entry, _q("alarm-text")).text = alarm.text
            for change in alarm.changes:
                item = etree.SubElement(entry, _q("status-change"))
                etree.SubElement(item, _q("time")).text = timestamp(change.time)
                etree.SubElement(item, _q("perceived-severity")).text = change.severity
                etree.SubElement(item, _q("alarm-text")).text = change.text
        inventory = etree.SubElement(top, _q("alarm-inventory"))
        for kind in self.inventory:
            entry = etree.SubElement(inventory, _q("alarm-type"))
            self._type_id(entry, "alarm-type-id", kind.id)
            etree.SubElement(entry, _q("alarm-type-qualifier")).text = kind.qualifier
            etree.SubElement(entry, _q("will-clear")).text = str(kind.will_clear).lower()
            for severity in kind.severities:
                etree.SubElement(entry, _q("severity-level")).text = severity
            etree.SubElement(entry, _q("description")).text = kind.description
        summary = etree.SubElement(top, _q("summary"))
        for severity in SEVERITIES:
            of = [a for a in self._alarms.values() if a.severity == severity]
            if not of:
                continue
            cleared = sum(1 for a in of if a.is_cleared)
            entry = etree.SubElement(summary, _q("alarm-summary"))
            etree.SubElement(entry, _q("severity")).text = severity
            etree.SubElement(entry, _q("total")).text = str(len(of))
            etree.SubElement(entry, _q("not-cleared")).text = str(len(of) - cleared)
            etree.SubElement(entry, _q("cleared")).text = str(cleared)
        return top


# -- certificates --------------------------------------------------------------------------

WARN_BEFORE = timedelta(days=30)
"""A certificate is reported this long before it expires at most (seed 7's lifetimes are a
year by default: a month to renew), or within its last fifth for shorter ones."""


def certificate_window(pem: str) -> tuple[datetime, datetime] | None:
    """(not before, not after) of a PEM certificate; None if it is not one."""
    from cryptography import x509

    try:
        cert = x509.load_pem_x509_certificate(pem.encode())
    except ValueError:
        return None
    return cert.not_valid_before_utc, cert.not_valid_after_utc


def _warn_from(starts: datetime, ends: datetime) -> datetime:
    return ends - min(WARN_BEFORE, (ends - starts) / 5)


def certificate_moments(pem: str) -> list[datetime]:
    """When the certificate's alarm changes by itself: its warning starts, it expires."""
    window = certificate_window(pem)
    if window is None:
        return []
    return [_warn_from(*window), window[1]]


def certificate_expiry(
    pem: str, now: datetime, what: str, *, expired: str, soon: str
) -> tuple[str, str] | None:
    """The certificate-expiry alarm ``pem`` calls for at ``now``: (severity, text), or None.
    ``what`` names the certificate; ``expired`` and ``soon`` say what to do."""
    window = certificate_window(pem)
    if window is None:
        return None
    starts, ends = window
    if now >= ends:
        return "critical", f"{what} expired at {ends.isoformat()}: {expired}"
    if now >= _warn_from(starts, ends):
        left = ends - now
        return "warning", f"{what} expires at {ends.isoformat()} (in {_days(left)}).  {soon}"
    return None


def _days(span: timedelta) -> str:
    if span >= timedelta(days=2):
        return f"{span.days} days"
    hours = span.total_seconds() / 3600
    return f"{hours:.0f} hours" if hours >= 2 else f"{span.total_seconds() / 60:.0f} minutes"


__all__ = [
    "AL_NS",
    "FEATURES",
    "MODULE",
    "SEVERITIES",
    "WARN_BEFORE",
    "Alarm",
    "AlarmList",
    "AlarmType",
    "Resource",
    "StatusChange",
    "certificate_expiry",
    "certificate_moments",
    "certificate_window",
    "instance",
    "timestamp",
]
