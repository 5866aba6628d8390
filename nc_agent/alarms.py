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
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

log = logging.getLogger("cevpn.agent.alarms")

TUNNEL_ESTABLISHMENT_FAILURE = "cevpn-types:tunnel-establishment-failure"
CONFIGURATION_FETCH_FAILURE = "cevpn-types:configuration-fetch-failure"
CERTIFICATE_EXPIRY = "cevpn-types:certificate-expiry"

Notify = Callable[..., None]


@dataclass(frozen=True)
class Alarm:
    type: str
    resource: str
    severity: str
    raised_at: datetime
    text: str


class AlarmList:
    """Active alarms by (type, resource)."""

    def __init__(self, notify: Notify, clock: Callable[[], datetime] | None = None) -> None:
        self.notify = notify
        self.clock = clock or (lambda: datetime.now(UTC))
        self._active: dict[tuple[str, str], Alarm] = {}

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
        if old is not None and old.severity == severity:
            return False
        log.error("alarm raised: %s %s (%s): %s", type, resource, severity, text)
        self.notify("alarm-raised", type=type, resource=resource, severity=severity, text=text)
        return old is None

    def clear(self, type: str, resource: str) -> bool:
        """Clear an alarm; True if it was active."""
        if self._active.pop((type, resource), None) is None:
            return False
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

WARN_BEFORE = timedelta(days=30)
"""A certificate is reported this long before it expires at most (seed 7's lifetimes are a
year by default: a month to renew), or within its last fifth for shorter ones."""


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
        verdict = _expiry(pem, now, what)
        if verdict is not None:
            found[resource] = verdict
    return found


def next_certificate_check(config: Mapping[str, Any], now: datetime) -> datetime | None:
    """When the certificate alarms change next by themselves (a warning starts, or a
    certificate expires): a timer checks again then."""
    certs = config.get("certificates", {})
    pems = [str(certs["certificate"])] if "certificate" in certs else []
    pems += [str(ca.get("certificate", "")) for ca in certs.get("ca-certificate", [])]
    moments = []
    for pem in pems:
        window = _window(pem)
        if window is None:
            continue
        starts, ends = window
        moments += [m for m in (_warn_from(starts, ends), ends) if m > now]
    return min(moments, default=None)


def _window(pem: str) -> tuple[datetime, datetime] | None:
    from cryptography import x509

    try:
        cert = x509.load_pem_x509_certificate(pem.encode())
    except ValueError:
        return None
    return cert.not_valid_before_utc, cert.not_valid_after_utc


def _warn_from(starts: datetime, ends: datetime) -> datetime:
    return ends - min(WARN_BEFORE, (ends - starts) / 5)


def _expiry(pem: str, now: datetime, what: str) -> tuple[str, str] | None:
    window = _window(pem)
    if window is None:
        return None
    starts, ends = window
    if now >= ends:
        return "critical", (
            f"{what} expired at {ends.isoformat()}: IKE with it fails.  Renew it on the VPN "
            "server (rotate-keys, what 'certificates') and check that this CE gets it."
        )
    if now >= _warn_from(starts, ends):
        left = ends - now
        return "warning", (
            f"{what} expires at {ends.isoformat()} (in {_days(left)}).  Renew it on the VPN "
            "server (rotate-keys, what 'certificates') before then."
        )
    return None


def _days(span: timedelta) -> str:
    if span >= timedelta(days=2):
        return f"{span.days} days"
    hours = span.total_seconds() / 3600
    return f"{hours:.0f} hours" if hours >= 2 else f"{span.total_seconds() / 60:.0f} minutes"
