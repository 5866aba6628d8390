"""The CE's active alarms (cevpn-ce ``ce-state/alarms``, notifications ``alarm-raised`` and
``alarm-cleared``): conditions that need a person (seed 3.4).

One list for every source, so each alarm type is raised and cleared the same
way and reported in one place:

- ``tunnel-establishment-failure`` (nc_agent.ike.manager): IKE with a peer
  kept failing until the retry back-off reached its limit;
- ``configuration-fetch-failure`` (nc_agent.pull): no fetch from the VPN server
  succeeded for ``timers/fetch-alarm-after``;
- ``certificate-expiry`` (:func:`certificate_alarms`): a certificate this CE
  uses expires soon, or has expired.

(The VPN server's view of a CE it cannot reach is its provisioning status,
not an alarm of the CE's.)

An alarm is raised once (a second raise only updates its text) and cleared
once; both are notified and logged.

Every alarm is also kept in the CE's RFC 8632 alarm list (:attr:`AlarmList.standard`,
nc_core.alarms: ``/alarms/alarm-list`` and ``alarm-notification``), its resource the
instance-identifier of what it is about (:func:`resource_of`): the peer, the certificate,
the pre-configuration that names the VPN server.  The cevpn-ce ``ce-state/alarms`` list
and its notifications stay: they show only the active alarms.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from nc_core import alarms as standard_alarms
from nc_core.alarms import AlarmType, Resource, instance

log = logging.getLogger("cevpn.agent.alarms")

TUNNEL_ESTABLISHMENT_FAILURE = "cevpn-types:tunnel-establishment-failure"
CONFIGURATION_FETCH_FAILURE = "cevpn-types:configuration-fetch-failure"
CERTIFICATE_EXPIRY = "cevpn-types:certificate-expiry"

Notify = Callable[..., None]

CE_NS = "urn:cevpn:yang:cevpn-ce"


def standard_type(type: str) -> str:
    """The ietf-alarms alarm type of a CE alarm type: the cevpn-alarms identity derived from
    the cevpn-types one (``cevpn-types:x`` -> ``cevpn-alarms:x``)."""
    return "cevpn-alarms:" + type.partition(":")[2]


INVENTORY = (
    AlarmType(
        standard_type(TUNNEL_ESTABLISHMENT_FAILURE),
        "IKE with a peer kept failing until the retry back-off reached its limit: check the "
        "peer's reachability, its pre-shared key or certificates and the proposals.  Clears "
        "when the tunnel comes up.",
        ("major",),
    ),
    AlarmType(
        standard_type(CONFIGURATION_FETCH_FAILURE),
        "No configuration fetch from the VPN server succeeded for timers/fetch-alarm-after.  "
        "Clears at the next successful fetch.",
        ("major",),
    ),
    AlarmType(
        standard_type(CERTIFICATE_EXPIRY),
        "A certificate this CE uses expires soon (warning) or has expired (critical).  "
        "Clears when it is renewed.",
        ("warning", "critical"),
    ),
)
"""The CE's alarm types, as /alarms/alarm-inventory shows them."""


def resource_of(type: str, resource: str) -> Resource:
    """The ietf-alarms resource of a CE alarm: an instance-identifier into cevpn-ce."""
    if resource == "certificate":
        return instance("ce", CE_NS, ("ce", {}), ("certificates", {}), ("certificate", {}))
    if resource.startswith("ca-certificate[") and resource.endswith("]"):
        name = resource[len("ca-certificate[") : -1]
        return instance(
            "ce", CE_NS, ("ce", {}), ("certificates", {}), ("ca-certificate", {"name": name})
        )
    if type == CONFIGURATION_FETCH_FAILURE:
        return instance("ce", CE_NS, ("ce", {}), ("pre-configuration", {}))
    if type == TUNNEL_ESTABLISHMENT_FAILURE:
        return instance("ce", CE_NS, ("ce", {}), ("peer", {"name": resource}))
    return Resource(resource)


@dataclass(frozen=True)
class Alarm:
    type: str
    resource: str
    severity: str
    raised_at: datetime
    text: str


class AlarmList:
    """Active alarms by (type, resource)."""

    def __init__(
        self,
        notify: Notify,
        clock: Callable[[], datetime] | None = None,
        *,
        notify_standard: standard_alarms.Notify | None = None,
    ) -> None:
        self.notify = notify
        self.clock = clock or (lambda: datetime.now(UTC))
        self._active: dict[tuple[str, str], Alarm] = {}
        self.standard = standard_alarms.AlarmList(
            INVENTORY,
            notify_standard,
            clock=self.clock,
            log_changes=False,
        )
        """The same alarms as RFC 8632 has them (``/alarms``), cleared ones included."""

    def __iter__(self) -> Iterator[Alarm]:
        return iter(sorted(self._active.values(), key=lambda a: (a.type, a.resource)))

    def __len__(self) -> int:
        return len(self._active)

    def get(self, type: str, resource: str) -> Alarm | None:
        return self._active.get((type, resource))

    def raise_alarm(self, type: str, resource: str, severity: str, text: str) -> bool:
        """Raise (or update) an alarm; True if it was not active before."""
        old = self._active.get((type, resource))
        raised_at = old.raised_at if old is not None else self.clock()
        self._active[(type, resource)] = Alarm(type, resource, severity, raised_at, text)
        self.standard.raise_alarm(resource_of(type, resource), standard_type(type), severity, text)
        if old is not None and old.severity == severity:
            return False
        log.error("alarm raised: %s %s (%s): %s", type, resource, severity, text)
        self.notify("alarm-raised", type=type, resource=resource, severity=severity, text=text)
        return old is None

    def clear(self, type: str, resource: str) -> bool:
        """Clear an alarm; True if it was active."""
        if self._active.pop((type, resource), None) is None:
            return False
        self.standard.clear(resource_of(type, resource), standard_type(type))
        log.info("alarm cleared: %s %s", type, resource)
        self.notify("alarm-cleared", type=type, resource=resource)
        return True

    def set_exactly(self, type: str, wanted: Mapping[str, tuple[str, str]]) -> None:
        """Make the active alarms of ``type`` exactly ``wanted`` (resource -> (severity,
        text)): raise the new, update the changed, clear the others."""
        for kind, resource in list(self._active):
            if kind == type and resource not in wanted:
                self.clear(kind, resource)
        for resource, (severity, text) in wanted.items():
            self.raise_alarm(type, resource, severity, text)


# -- certificates ------------------------------------------------------------------------

WARN_BEFORE = standard_alarms.WARN_BEFORE
_RENEW = "Renew it on the VPN server (rotate-keys, what 'certificates')"


def certificate_alarms(config: Mapping[str, Any], now: datetime) -> dict[str, tuple[str, str]]:
    """The certificate-expiry alarms a CE configuration calls for at ``now``: resource ->
    (severity, text).  ``config`` is RFC 7951 JSON of ``cevpn-ce:ce``'s content."""
    certs = config.get("certificates", {})
    found: dict[str, tuple[str, str]] = {}
    candidates = []
    if "certificate" in certs:
        candidates.append(("certificate", str(certs["certificate"]), "this CE's certificate"))
    for ca in certs.get("ca-certificate", []):
        name = str(ca.get("name", ""))
        candidates.append(
            (f"ca-certificate[{name}]", str(ca.get("certificate", "")), f"CA certificate {name}")
        )
    for resource, pem, what in candidates:
        verdict = standard_alarms.certificate_expiry(
            pem,
            now,
            what,
            expired=f"IKE with it fails.  {_RENEW} and check that this CE gets it.",
            soon=f"{_RENEW} before then.",
        )
        if verdict is not None:
            found[resource] = verdict
    return found


def next_certificate_check(config: Mapping[str, Any], now: datetime) -> datetime | None:
    """When the certificate alarms change next by themselves (a warning starts, or a
    certificate expires): a timer checks again then."""
    certs = config.get("certificates", {})
    pems = [str(certs["certificate"])] if "certificate" in certs else []
    pems += [str(ca.get("certificate", "")) for ca in certs.get("ca-certificate", [])]
    moments = [m for pem in pems for m in standard_alarms.certificate_moments(pem) if m > now]
    return min(moments, default=None)
