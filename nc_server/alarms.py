"""The VPN server's own alarms, in its RFC 8632 alarm list (nc_core.alarms).

- ``ce-unreachable``: a site whose CE cannot be reached (provisioning status
  ``unreachable``; for a CE not reached since the server started, after
  :data:`NEW_SITE_RETRIES` attempts); cleared by any other status but ``pending`` (a new
  configuration to push says nothing of the CE);
- ``provisioning-failure``: a site whose provisioning failed (status ``failed``);
  cleared likewise;
- ``tunnel-down`` (qualifier: the peer): a CE reported the tunnel to a peer down, in
  its ``tunnel-down`` notification or as status ``failed`` when the server started
  watching it (nc_server.southbound's watcher session); cleared by ``tunnel-up``, or a
  status up (or waiting for traffic, or without data plane), or the peer leaving the CE;
- ``certificate-expiry``: a VPN's CA certificate, or a site's certificate, that expires
  within 30 days (or its last fifth) or has expired.  Checked at start-up, after each
  commit, and again when the next one is due (:func:`next_certificate_check`).

Resources are instance-identifiers into cevpn-service: ``/vpn-service/vpn[id]/site[id]``
for a site and its certificate, ``/vpn-service/vpn[id]`` for a VPN's CA.  Removing a site
clears its alarms.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from datetime import datetime

from nc_core.alarms import (
    AlarmList,
    AlarmType,
    Resource,
    certificate_expiry,
    certificate_moments,
    instance,
)
from nc_server.keystore import TABLE_CA, TABLE_CERT
from nc_server.storage import Storage

SVC_NS = "urn:cevpn:yang:cevpn-service"

CE_UNREACHABLE = "cevpn-alarms:ce-unreachable"
PROVISIONING_FAILURE = "cevpn-alarms:provisioning-failure"
CERTIFICATE_EXPIRY = "cevpn-alarms:certificate-expiry"
TUNNEL_DOWN = "cevpn-alarms:tunnel-down"

INVENTORY = (
    AlarmType(
        CE_UNREACHABLE,
        "A CE could not be reached to provision it; the server keeps retrying "
        "(site/provisioning/next-attempt).  Check the CE, its management address and the "
        "path to it.  Clears when the CE is reached.",
        ("major",),
    ),
    AlarmType(
        PROVISIONING_FAILURE,
        "Provisioning a CE failed for a reason a retry does not cure: the CE refused the "
        "configuration, did not confirm the commit, or the server failed "
        "(site/provisioning/last-error).  Clears when a later provisioning succeeds.",
        ("major",),
    ),
    AlarmType(
        TUNNEL_DOWN,
        "A CE reports its tunnel to a peer (the alarm-type-qualifier) down: no VPN "
        "traffic flows between the two sites.  Check the CE's peer state and IKE log.  "
        "Clears when the CE reports the tunnel up.",
        ("major",),
    ),
    AlarmType(
        CERTIFICATE_EXPIRY,
        "A VPN's CA certificate, or a site's certificate, expires soon (warning) or has "
        "expired (critical).  Clears when it is renewed.",
        ("warning", "critical"),
    ),
)


def site_resource(vpn: str, site: str) -> Resource:
    return instance(
        "svc", SVC_NS, ("vpn-service", {}), ("vpn", {"id": vpn}), ("site", {"id": site})
    )


def vpn_resource(vpn: str) -> Resource:
    return instance("svc", SVC_NS, ("vpn-service", {}), ("vpn", {"id": vpn}))


NEW_SITE_RETRIES = 5
"""A CE this server has not reached yet (a site just added, its CE not installed yet, or
the server just restarted) is alarmed as unreachable only after this many failed attempts
(1 + 2 + 4 + 8 s of back-off at least), not at the first."""


def provisioning_status(
    alarms: AlarmList,
    vpn: str,
    site: str,
    status: str,
    error: str | None,
    *,
    reached_before: bool = True,
    retries: int = 0,
) -> None:
    """Raise or clear a site's provisioning alarms for its new provisioning status.
    ``reached_before``: the server has reached this CE since it started; ``retries``: the
    failed attempts in a row."""
    resource = site_resource(vpn, site)
    why = f": {error}" if error else ""
    if status == "unreachable" and (reached_before or retries >= NEW_SITE_RETRIES):
        alarms.raise_alarm(
            resource, CE_UNREACHABLE, "major", f"The CE of site {site} (VPN {vpn}) "
            f"cannot be reached{why}"
        )  # fmt: skip
    elif status == "failed":
        alarms.raise_alarm(
            resource, PROVISIONING_FAILURE, "major",
            f"Provisioning the CE of site {site} (VPN {vpn}) failed{why}",
        )  # fmt: skip
    if status not in ("unreachable", "pending"):
        alarms.clear(resource, CE_UNREACHABLE)
    if status not in ("failed", "pending"):
        alarms.clear(resource, PROVISIONING_FAILURE)


TUNNEL_FINE = frozenset({"up", "waiting-for-traffic", "no-data-plane"})
"""Tunnel statuses (cevpn-types tunnel-status) that clear a tunnel-down alarm; 'down',
'connecting' and 'retrying' leave it as it is (a tunnel being set up is not down)."""


def tunnel_statuses(alarms: AlarmList, vpn: str, site: str, statuses: Mapping[str, str]) -> None:
    """A CE's tunnels as it reports them when the server starts watching it."""
    resource = site_resource(vpn, site)
    for peer, status in statuses.items():
        if status == "failed":
            _tunnel_down(alarms, resource, site, peer, "it gave up establishing it")
        elif status in TUNNEL_FINE:
            alarms.clear(resource, TUNNEL_DOWN, peer)
    for alarm in alarms.active():
        if (
            alarm.type_id == TUNNEL_DOWN
            and alarm.resource.path == resource.path
            and alarm.qualifier not in statuses
        ):
            alarms.clear(alarm.resource, TUNNEL_DOWN, alarm.qualifier)


def tunnel_event(
    alarms: AlarmList, vpn: str, site: str, event: str, peer: str, reason: str | None
) -> None:
    """A CE's tunnel-up or tunnel-down notification."""
    resource = site_resource(vpn, site)
    if event == "tunnel-up":
        alarms.clear(resource, TUNNEL_DOWN, peer)
    elif event == "tunnel-down":
        _tunnel_down(alarms, resource, site, peer, reason or "no reason given")


def _tunnel_down(alarms: AlarmList, resource: Resource, site: str, peer: str, why: str) -> None:
    alarms.raise_alarm(
        resource,
        TUNNEL_DOWN,
        "major",
        f"The CE of site {site} reports its tunnel to {peer} down: {why}",
        peer,
    )


def site_removed(alarms: AlarmList, vpn: str, site: str) -> None:
    """A site left the VPN database: nothing about it is alarming any more."""
    path = site_resource(vpn, site).path
    for alarm in alarms.active():
        if alarm.resource.path == path:
            alarms.clear(alarm.resource, alarm.type_id, alarm.qualifier)


def _certificates(storage: Storage) -> Iterable[tuple[Resource, str, str, bool]]:
    """(resource, PEM, what, is a CA) of every CA and site certificate the key store
    holds."""
    for vpn, raw in storage.scan(TABLE_CA):
        pem = json.loads(raw)["certificate"]
        yield vpn_resource(vpn), pem, f"The CA certificate of VPN {vpn}", True
    for key, raw in storage.scan(TABLE_CERT):
        vpn, _, site = key.partition("/")
        pem = json.loads(raw)["certificate"]
        yield site_resource(vpn, site), pem, f"The certificate of site {site} (VPN {vpn})", False


def certificate_alarms(storage: Storage, now: datetime) -> dict[Resource, tuple[str, str]]:
    """The certificate-expiry alarms the key store calls for at ``now``."""
    found: dict[Resource, tuple[str, str]] = {}
    for resource, pem, what, is_ca in _certificates(storage):
        if is_ca:
            expired = (
                "no CE certificate it issued is valid any more and IKE with certificates fails "
                "in the whole VPN.  A new CA is needed."
            )
            soon = "CE certificates it issues end with it: a new CA is needed before then."
        else:
            expired = "IKE with it fails.  Renew it (rotate-keys, what 'certificates')."
            soon = "Renew it (rotate-keys, what 'certificates') before then."
        verdict = certificate_expiry(pem, now, what, expired=expired, soon=soon)
        if verdict is not None:
            found[resource] = verdict
    return found


def next_certificate_check(storage: Storage, now: datetime) -> datetime | None:
    """When the certificate alarms change next by themselves."""
    moments = [m for _, pem, _, _ in _certificates(storage) for m in certificate_moments(pem)]
    return min((m for m in moments if m > now), default=None)


def check_certificates(alarms: AlarmList, storage: Storage) -> datetime | None:
    """Raise and clear the certificate-expiry alarms as of the list's clock; returns when
    to check again."""
    now = alarms.clock()
    alarms.set_exactly(CERTIFICATE_EXPIRY, certificate_alarms(storage, now))
    return next_certificate_check(storage, now)


__all__ = [
    "CERTIFICATE_EXPIRY",
    "CE_UNREACHABLE",
    "INVENTORY",
    "PROVISIONING_FAILURE",
    "TUNNEL_DOWN",
    "certificate_alarms",
    "check_certificates",
    "provisioning_status",
    "site_removed",
    "site_resource",
    "tunnel_event",
    "tunnel_statuses",
    "vpn_resource",
]
