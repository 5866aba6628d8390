"""The VPN server's Prometheus metrics (``cevpn_server_*``), next to the engine's.

- ``cevpn_server_ces{status}``: CEs (sites of the database) by provisioning
  status, every status of cevpn-service's ``provisioning-status`` shown, 0 included;
- ``cevpn_server_vpns``, ``cevpn_server_sites``: what the VPN database holds;
- ``cevpn_server_provisioning_duration_seconds{kind,outcome}``: each provisioning
  job (``push`` or ``deprovision``) from its start on the CE's link to its end,
  by outcome (the CE's status after it: ``in-sync``, ``unreachable``, ``failed``
  ...); its ``_count`` is the pushes that succeeded or failed;
- ``cevpn_server_southbound_links{kind}``: live management links to CEs, ``dialled``
  by the server or opened by a ``call-home`` CE (RFC 8071).

Read at scrape time from the controller, except the job durations, observed as
each job ends.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, NamedTuple

from nc_core.alarms import AlarmList
from nc_core.metrics import Metrics, alarm_metrics

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from nc_server.controller import Controller

PREFIX = "cevpn_server"
PROVISIONING_STATUSES = ("in-sync", "pending", "unreachable", "failed", "not-enrolled", "removing")
"""cevpn-service's provisioning-status enumeration."""
JOB_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
"""Seconds: a push on a standing link is milliseconds, a first one with SSH and a 1,000-peer
configuration is seconds, one that waits for its confirmation up to the confirm-timeout."""


class _Counted(NamedTuple):
    """An active alarm as nc_core.metrics.alarm_metrics counts it."""

    type: str
    severity: str


def register(metrics: Metrics, controller: Controller, alarms: AlarmList) -> None:
    """Add the server's metrics to the engine's (``alarms``: its RFC 8632 list)."""
    if not metrics.enabled:
        return
    jobs = metrics.histogram(
        f"{PREFIX}_provisioning_duration_seconds",
        "Provisioning jobs by kind (push, deprovision) and outcome (the CE's provisioning "
        "status after the job), and how long they took",
        ("kind", "outcome"),
        buckets=JOB_BUCKETS,
    )
    controller.jobs.job_done = lambda kind, outcome, seconds: jobs.labels(kind, outcome).observe(
        seconds
    )
    metrics.add_collector(lambda: collect(controller))
    metrics.add_collector(
        lambda: alarm_metrics(
            PREFIX, (_Counted(a.type_id.split(":")[-1], a.severity) for a in alarms.active())
        )
    )


def collect(controller: Controller) -> Iterable[Metric]:
    from prometheus_client.core import GaugeMetricFamily

    by_status = dict.fromkeys(PROVISIONING_STATUSES, 0)
    for rec in controller.provisioning_records():
        by_status[rec.status] = by_status.get(rec.status, 0) + 1
    ces = GaugeMetricFamily(
        f"{PREFIX}_ces", "CEs (sites) by provisioning status", labels=("status",)
    )
    for status, count in by_status.items():
        ces.add_metric((status,), count)
    yield ces
    yield GaugeMetricFamily(
        f"{PREFIX}_vpns", "VPNs in the VPN database", value=len(controller.vpns)
    )
    yield GaugeMetricFamily(
        f"{PREFIX}_sites", "Sites in the VPN database", value=len(controller.sites)
    )
    links = GaugeMetricFamily(
        f"{PREFIX}_southbound_links",
        "Live management links to CEs: dialled by the server, or opened by a call-home CE",
        labels=("kind",),
    )
    counts = {"dialled": 0, "call-home": 0}
    for link in list(controller.jobs.southbound.links.values()):
        if link.alive:
            counts["call-home" if link.called_from is not None else "dialled"] += 1
    for kind, count in counts.items():
        links.add_metric((kind,), count)
    yield links
