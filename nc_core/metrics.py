"""Prometheus metrics of one NETCONF server (prometheus-client), off unless asked for.

``--metrics-listen HOST:PORT`` serves ``GET /metrics`` in the Prometheus text
format (0.0.4) from the server's own event loop, so what a collector reads at
scrape time (sessions, provisioning records, alarms, tunnels) is read between
two steps of the daemon, never while one is half done.  Each server owns its
registry (never prometheus-client's global one: tests run several servers in
one process), and prometheus-client is imported only when metrics are on: a
daemon without them pays nothing at start-up or per request.

The engine's own metrics (``cevpn_netconf_*``, the same on both daemons):

- ``cevpn_netconf_sessions{transport}``: sessions open now;
- ``cevpn_netconf_sessions_started_total``, ``cevpn_netconf_sessions_dropped_total``
  (RFC 6022 in-sessions and dropped-sessions);
- ``cevpn_netconf_rpcs_total{operation,outcome}`` and
  ``cevpn_netconf_rpc_duration_seconds{operation}``: operations by name (only the
  operations the server answers, every other one is ``unsupported``), answered
  ``ok`` or with an rpc-``error``;
- ``cevpn_netconf_bad_rpcs_total``: messages that were no valid ``<rpc>``;
- ``cevpn_netconf_commits_total{reason,outcome}`` and
  ``cevpn_netconf_commit_duration_seconds{reason}``: every change of running
  (reason ``commit``, ``edit``, ``copy``, ``rollback`` or the application's own:
  ``enrol``, ``remove-site``, ``pull``), ``ok``, ``unchanged`` or ``failed``;
- ``cevpn_netconf_notifications_sent_total`` and
  ``cevpn_netconf_notification_subscribers_dropped_total`` (closed for leaving
  their notifications unread).

Applications add theirs with :meth:`Metrics.add_collector` (values read at
scrape time), :meth:`Metrics.histogram` and :meth:`Metrics.counter` (observed as
things happen), and :meth:`Metrics.before_scrape` for reads that must await.

Label values are bounded: operation and commit reasons come from code, never
a session id or a user name.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from prometheus_client.metrics_core import Metric

    from nc_core.server import NetconfServer

log = logging.getLogger("cevpn.metrics")

PREFIX = "cevpn_netconf"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
"""Seconds: an RPC or a commit takes a millisecond to seconds (a 1,000-peer commit)."""
MAX_CLIENTS = 8
"""Scrapes served at once; more connections are closed at once."""
MAX_REQUEST = 8192
"""Octets of request head read; a longer one is refused."""
REQUEST_TIMEOUT = 10.0
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
"""The text format every Prometheus reads (generate_latest writes it)."""

Collect = Callable[[], Iterable["Metric"]]


class CounterLike(Protocol):
    def labels(self, *values: str) -> CounterLike: ...
    def inc(self, amount: float = 1) -> None: ...


class HistogramLike(Protocol):
    def labels(self, *values: str) -> HistogramLike: ...
    def observe(self, amount: float) -> None: ...


class _Null:
    """A counter or histogram while metrics are off: every call does nothing."""

    def labels(self, *values: str) -> _Null:
        return self

    def inc(self, amount: float = 1) -> None:
        pass

    def observe(self, amount: float) -> None:
        pass


NULL = _Null()


class Metrics:
    """Metrics off: every method is a no-op (what a server without --metrics-listen has)."""

    enabled = False
    registry: CollectorRegistry | None = None

    def rpc_done(self, operation: str, ok: bool, seconds: float) -> None:
        pass

    def commit_done(self, reason: str, outcome: str, seconds: float) -> None:
        pass

    def counter(self, name: str, documentation: str, labels: Sequence[str] = ()) -> CounterLike:
        return NULL

    def histogram(
        self,
        name: str,
        documentation: str,
        labels: Sequence[str] = (),
        buckets: Sequence[float] = LATENCY_BUCKETS,
    ) -> HistogramLike:
        return NULL

    def add_collector(self, collect: Collect) -> None:
        pass

    def before_scrape(self, refresh: Callable[[], Awaitable[None]]) -> None:
        pass

    async def exposition(self) -> bytes:
        return b""


class PrometheusMetrics(Metrics):
    """Metrics on: a registry of this server's own."""

    enabled = True

    def __init__(self, server: NetconfServer) -> None:
        from prometheus_client import (
            CollectorRegistry,
            Counter,
            Histogram,
            disable_created_metrics,
        )

        # No <name>_created series next to every counter and histogram: they double what
        # is stored for a timestamp the scrapes already give (a process-wide setting, as
        # only a daemon with metrics on gets here).
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = CollectorRegistry(auto_describe=True)
        self._refreshers: list[Callable[[], Awaitable[None]]] = []
        self._rpcs = Counter(
            f"{PREFIX}_rpcs",
            "NETCONF operations answered, by operation and outcome (ok, error)",
            ("operation", "outcome"),
            registry=self.registry,
        )
        self._rpc_seconds = Histogram(
            f"{PREFIX}_rpc_duration_seconds",
            "Time from a NETCONF operation's request to its reply, by operation",
            ("operation",),
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._commits = Counter(
            f"{PREFIX}_commits",
            "Changes of the running datastore, by reason and outcome (ok, unchanged, failed)",
            ("reason", "outcome"),
            registry=self.registry,
        )
        self._commit_seconds = Histogram(
            f"{PREFIX}_commit_duration_seconds",
            "Time a change of running takes (validation, the application's phases, "
            "persistence), by reason",
            ("reason",),
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.add_collector(lambda: engine_metrics(server))

    def rpc_done(self, operation: str, ok: bool, seconds: float) -> None:
        self._rpcs.labels(operation, "ok" if ok else "error").inc()
        self._rpc_seconds.labels(operation).observe(seconds)

    def commit_done(self, reason: str, outcome: str, seconds: float) -> None:
        self._commits.labels(reason, outcome).inc()
        self._commit_seconds.labels(reason).observe(seconds)

    def counter(self, name: str, documentation: str, labels: Sequence[str] = ()) -> CounterLike:
        from prometheus_client import Counter

        return Counter(name, documentation, tuple(labels), registry=self.registry)

    def histogram(
        self,
        name: str,
        documentation: str,
        labels: Sequence[str] = (),
        buckets: Sequence[float] = LATENCY_BUCKETS,
    ) -> HistogramLike:
        from prometheus_client import Histogram

        return Histogram(
            name, documentation, tuple(labels), buckets=tuple(buckets), registry=self.registry
        )

    def add_collector(self, collect: Collect) -> None:
        assert self.registry is not None
        self.registry.register(CallbackCollector(collect))

    def before_scrape(self, refresh: Callable[[], Awaitable[None]]) -> None:
        self._refreshers.append(refresh)

    async def exposition(self) -> bytes:
        """The text a scrape gets: refreshed first, then every collector read."""
        from prometheus_client.exposition import generate_latest

        for refresh in self._refreshers:
            try:
                await refresh()
            except Exception:  # a failing source must not take every other metric away
                log.exception("metrics: refreshing %r failed", refresh)
        assert self.registry is not None
        return generate_latest(self.registry)


class CallbackCollector:
    """A prometheus-client collector around a function that yields metric families."""

    def __init__(self, collect: Collect) -> None:
        self._collect = collect

    def collect(self) -> Iterable[Metric]:
        return list(self._collect())

    def describe(self) -> Iterable[Metric]:
        return []  # read at scrape time only: nothing to check names against at register


def metrics_for(server: NetconfServer) -> Metrics:
    """The server's metrics: on if its options ask for a metrics endpoint."""
    if server.options.metrics_listen is None:
        return Metrics()
    return PrometheusMetrics(server)


def engine_metrics(server: NetconfServer) -> Iterable[Metric]:
    """The engine's state at scrape time: sessions and RFC 6022 counters."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    open_now = GaugeMetricFamily(
        f"{PREFIX}_sessions", "NETCONF sessions open now, by transport", labels=("transport",)
    )
    by_transport: dict[str, int] = {"netconf-ssh": 0}
    for session in list(server.sessions.values()):
        if session.hello_received and not session.closed:
            by_transport[session.transport] = by_transport.get(session.transport, 0) + 1
    for transport, count in sorted(by_transport.items()):
        open_now.add_metric((transport,), count)
    yield open_now
    stats = server.stats
    for name, documentation, value in (
        ("sessions_started", "NETCONF sessions started (hello exchanged)", stats.in_sessions),
        (
            "sessions_dropped",
            "NETCONF sessions ended otherwise than by close-session or kill-session",
            stats.dropped_sessions,
        ),
        (
            "sessions_refused",
            "NETCONF sessions refused at their opening for a limit (server, account, connection)",
            stats.refused_sessions,
        ),
        ("bad_rpcs", "Messages refused as no valid <rpc>", stats.in_bad_rpcs),
        ("notifications_sent", "Notifications sent to subscribers", stats.out_notifications),
        (
            "notification_subscribers_dropped",
            "Sessions closed for leaving their notifications unread past the backlog limit",
            stats.dropped_subscribers,
        ),
    ):
        yield CounterMetricFamily(f"{PREFIX}_{name}", documentation, value=value)


# -- the HTTP endpoint ----------------------------------------------------------------


class MetricsEndpoint:
    """``GET /metrics`` over HTTP/1.0-style exchanges (one request per connection)."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.server: asyncio.Server | None = None
        self._clients = 0
        self.host = ""
        self.port = 0

    async def start(self, host: str, port: int) -> None:
        try:
            # '::' (":PORT") is every address, IPv4 too, as for the NETCONF listener: one
            # socket per family, not an IPv6 socket that may be IPv6-only.
            self.server = await asyncio.start_server(
                self._serve, None if host in ("", "::") else host, port, limit=MAX_REQUEST
            )
        except OSError as exc:
            raise RuntimeError(f"cannot serve metrics on {host} port {port}: {exc}") from None
        sockname = self.server.sockets[0].getsockname()
        self.host, self.port = host, int(sockname[1])
        log.info("metrics at http://%s/metrics", _authority(host, self.port))

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._clients >= MAX_CLIENTS:
            writer.close()
            return
        self._clients += 1
        try:
            await asyncio.wait_for(self._exchange(reader, writer), REQUEST_TIMEOUT)
        except (TimeoutError, ConnectionError, asyncio.IncompleteReadError, ValueError):
            pass  # the client is gone, slow, or sent no HTTP: nothing to answer
        finally:
            self._clients -= 1
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _exchange(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")  # LimitOverrunError is a ValueError
        request = head.split(b"\r\n", 1)[0].decode("latin-1").split()
        if len(request) != 3 or not request[2].startswith("HTTP/"):
            status, body, content_type = "400 Bad Request", b"bad request\n", "text/plain"
        elif request[0] not in ("GET", "HEAD"):
            status, body, content_type = "405 Method Not Allowed", b"GET only\n", "text/plain"
        elif request[1].split("?", 1)[0] != "/metrics":
            status, body, content_type = "404 Not Found", b"see /metrics\n", "text/plain"
        else:
            status, content_type = "200 OK", CONTENT_TYPE
            body = await self.metrics.exposition()
        lines = [
            f"HTTP/1.1 {status}",
            f"Content-Type: {content_type}",
            f"Content-Length: {len(body)}",
            "Connection: close",
        ]
        if status.startswith("405"):
            lines.append("Allow: GET, HEAD")
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        if request and request[0] != "HEAD":
            writer.write(body)
        await writer.drain()


def _authority(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# -- alarms ------------------------------------------------------------------------------


class AlarmLike(Protocol):
    @property
    def type(self) -> str: ...
    @property
    def severity(self) -> str: ...


def alarm_metrics(prefix: str, alarms: Iterable[AlarmLike]) -> Iterable[Metric]:
    """``<prefix>_alarms{type,severity}``: the active alarms of whatever holds them (an
    iterable of objects with ``type`` and ``severity``), counted at scrape time."""
    from prometheus_client.core import GaugeMetricFamily

    counts: dict[tuple[str, str], int] = {}
    for alarm in list(alarms):
        key = (alarm.type, alarm.severity)
        counts[key] = counts.get(key, 0) + 1
    family = GaugeMetricFamily(
        f"{prefix}_alarms", "Active alarms by type and severity", labels=("type", "severity")
    )
    for key, count in sorted(counts.items()):
        family.add_metric(key, count)
    yield family
