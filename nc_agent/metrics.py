"""The CE agent's Prometheus metrics (``cevpn_agent_*``), read at scrape time.

Next to the engine's (nc_core.metrics), per configured peer (the peer label
is bounded by the CE's configuration):

- ``cevpn_agent_tunnel_up{peer}``: 1 if the tunnel is up, by the rules the
  peer's ``state/status`` in ``<get>`` follows (IKE-less: both SAs and the
  tunnel device present and up; IKE: charon says up and the kernel agrees);
- ``cevpn_agent_tunnels{status}``: peers by that status (``no-data-plane``
  for an agent run with ``--dataplane none``);
- ``cevpn_agent_sa_bytes_total{peer,direction}``,
  ``cevpn_agent_sa_packets_total{peer,direction}``: the kernel's XFRM counters
  of the peer's SAs (IKE: every SA of its reqid in that direction, summed), as
  ``in-octets``/``out-octets`` in ``<get>``.  A rekey replaces the SAs, so the
  counters start again from zero: Prometheus' rate() takes that as a reset;
- ``cevpn_agent_sa_errors_total{peer}``: inbound packets dropped as replays or
  for failed integrity (``in-errors``);
- ``cevpn_agent_ike_failures_total{peer}``: IKE attempts this CE initiated that
  failed, since the agent started (IKE peers only);
- ``cevpn_agent_alarms{type,severity}``: active alarms (nc_core.metrics.alarm_metrics).

The kernel is read once per scrape (in a thread, as ``<get>`` does), before
the families are built.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterable
from typing import TYPE_CHECKING

from nc_core.metrics import Metrics, alarm_metrics

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from nc_agent.application import AgentApplication
    from nc_agent.desired import PeerObjects
    from nc_agent.kernel import Observed

PREFIX = "cevpn_agent"
CE_NS = "urn:cevpn:yang:cevpn-ce"


class AgentMetrics:
    """The collector of one agent."""

    def __init__(self, app: AgentApplication) -> None:
        self.app = app
        self.observed: Observed | None = None

    def register(self, metrics: Metrics) -> None:
        metrics.before_scrape(self.refresh)
        metrics.add_collector(self.collect)
        metrics.add_collector(lambda: alarm_metrics(PREFIX, self.app.alarms))

    async def refresh(self) -> None:
        """Read the kernel's SAs and devices for this scrape."""
        if self.app.has_kernel and self.app.kernel is not None:
            self.observed = await asyncio.to_thread(self.app.kernel.observe)
        else:
            self.observed = None

    def collect(self) -> Iterable[Metric]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        up = GaugeMetricFamily(
            f"{PREFIX}_tunnel_up", "1 if the tunnel to the peer is up, else 0", labels=("peer",)
        )
        by_status = GaugeMetricFamily(
            f"{PREFIX}_tunnels", "Configured peers by tunnel status", labels=("status",)
        )
        octets = CounterMetricFamily(
            f"{PREFIX}_sa_bytes",
            "Octets through the peer's current ESP SAs (kernel XFRM counters)",
            labels=("peer", "direction"),
        )
        packets = CounterMetricFamily(
            f"{PREFIX}_sa_packets",
            "Packets through the peer's current ESP SAs (kernel XFRM counters)",
            labels=("peer", "direction"),
        )
        errors = CounterMetricFamily(
            f"{PREFIX}_sa_errors",
            "Inbound packets of the peer's SAs dropped as replays or for failed integrity",
            labels=("peer",),
        )
        failures = CounterMetricFamily(
            f"{PREFIX}_ike_failures",
            "IKE attempts this CE initiated that failed, since the agent started",
            labels=("peer",),
        )
        statuses: Counter[str] = Counter()
        app = self.app
        if not app.has_kernel:
            for name in self._configured_peers():
                statuses["no-data-plane"] += 1
                up.add_metric((name,), 0)
        else:
            for name, peer in sorted(app.current.peers.items()):
                status, traffic = self._peer(peer)
                statuses[status] += 1
                up.add_metric((name,), 1 if status == "up" else 0)
                if traffic is not None:
                    in_octets, in_packets, out_octets, out_packets, in_errors = traffic
                    octets.add_metric((name, "in"), in_octets)
                    octets.add_metric((name, "out"), out_octets)
                    packets.add_metric((name, "in"), in_packets)
                    packets.add_metric((name, "out"), out_packets)
                    errors.add_metric((name,), in_errors)
            ike = app.ike
            for name, peer in sorted(app.current.peers.items()):
                if peer.ike is not None:
                    count = ike.failures_total.get(name, 0) if ike is not None else 0
                    failures.add_metric((name,), count)
        for status, count in sorted(statuses.items()):
            by_status.add_metric((status,), count)
        return [up, by_status, octets, packets, errors, failures]

    def _configured_peers(self) -> list[str]:
        running = self.app.server.datastores["running"].root
        return sorted(
            peer.findtext(f"{{{CE_NS}}}name") or ""
            for peer in running.iterfind(f"{{{CE_NS}}}ce/{{{CE_NS}}}peer")
        )

    def _peer(self, peer: PeerObjects) -> tuple[str, tuple[int, int, int, int, int] | None]:
        """The peer's status and (in octets, in packets, out octets, out packets, in
        errors) as AgentApplication.operational reports them."""
        from nc_agent.kernel import sa_key

        observed = self.observed
        if observed is None:
            return "down", None
        tunnel = observed.tunnels.get(peer.tunnel.name)
        if peer.ike is None and peer.outbound is not None and peer.inbound is not None:
            out_sa = observed.sas.get(sa_key(peer.outbound))
            in_sa = observed.sas.get(sa_key(peer.inbound))
            up = out_sa is not None and in_sa is not None and tunnel is not None and tunnel.up
            return "up" if up else "down", (
                in_sa.bytes if in_sa else 0,
                in_sa.packets if in_sa else 0,
                out_sa.bytes if out_sa else 0,
                out_sa.packets if out_sa else 0,
                in_sa.replay_failures + in_sa.integrity_failures if in_sa else 0,
            )
        local = self.app.current.sp_address
        mine = [sa for sa in observed.sas.values() if sa.reqid == peer.reqid]
        inbound = [sa for sa in mine if sa.dst == local]
        outbound = [sa for sa in mine if sa.src == local]
        ike = self.app.ike
        health = ike.health.get(peer.name) if ike is not None else None
        status = health.status if health is not None else "down"
        if status == "up" and (not outbound or not inbound or tunnel is None):
            status = "down"  # charon says up, the kernel disagrees: believe the kernel
        return status, (
            sum(sa.bytes for sa in inbound),
            sum(sa.packets for sa in inbound),
            sum(sa.bytes for sa in outbound),
            sum(sa.packets for sa in outbound),
            sum(sa.replay_failures + sa.integrity_failures for sa in inbound),
        )
