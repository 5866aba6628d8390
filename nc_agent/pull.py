"""The CE fetches its own configuration from the VPN server (seed 3.5 'pull', 3.6).

Whatever the VPN's autodiscovery mode, an enrolled agent:
- fetches every ``timers/pull-interval`` seconds (in the push model this is
  the safety net for changes the server could not push);
- keeps a NETCONF notification subscription to the server and fetches when
  told ``configuration-available`` (notify-then-pull);
- fetches when an unknown peer tries to reach it: ESP arriving for an SA
  the kernel does not have (XfrmInNoStates grows) usually means a new site
  already has its SAs and this CE has not heard of it yet;
- fetches on the ``refresh-configuration`` operation.
A fetched configuration whose version differs from the running one is
committed as one transaction, exactly like an edit from the server.  When
the server answers ``site-removed`` for ``timers/orphan-after`` seconds, the
agent deletes its VPN state (seed 3.6, second way); it never does so merely
because the server cannot be reached.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from copy import deepcopy
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lxml import etree

from nc_agent.alarms import CONFIGURATION_FETCH_FAILURE, AlarmList
from nc_agent.own_key import certificate_request, certifies_own_key
from nc_core.endpoint import Endpoint
from nc_core.errors import RpcError
from nc_core.netconf_client import (
    NetconfSession,
    RpcFailed,
    SessionLost,
    connect_ssh,
)
from nc_core.notifications import date_and_time, now
from nc_core.tasks import stop_tasks
from nc_core.xmlutil import default_ns_element, qn

if TYPE_CHECKING:
    from nc_core.schema import SchemaIndex
    from nc_core.server import NetconfServer

log = logging.getLogger("cevpn.agent.pull")

CE_NS = "urn:cevpn:yang:cevpn-ce"
SVC_NS = "urn:cevpn:yang:cevpn-service"
ORPHAN_FILE = "orphan-since"
PUSH_RECHECK = 30.0
"""Seconds after which a CE that the server told a push was under way fetches again, if
that push has not brought the version by then (its pull-interval, if shorter)."""
FETCH_TIMEOUT = 120.0
"""Seconds a fetch may wait for the server's answer (a 1,000-peer configuration is ~1 MB,
compiled on demand when the server has not kept it)."""
LINK_KEEPALIVE = 60.0
"""Seconds between SSH keepalives on the notification session's connection: a server that
vanished is noticed within 3 of them, and the server, which holds one such connection per
CE, answers a keepalive per CE a minute rather than four."""
LINK_KEEPALIVE_COUNT = 3
STEADY = 30.0
"""A notification session that lasted less than this did not stay up: the next one waits
the back-off (a server that ends every session at once is not dialled in a loop)."""


@dataclass(frozen=True)
class FetchReply:
    """What fetch-ce-configuration answered."""

    version: str
    ce: etree._Element | None
    """The configuration; None when the CE runs the version already or it is being pushed."""
    being_pushed: bool = False
    """The server is pushing ``version`` to this CE now (the request said defer-to-push)."""


@dataclass
class PullSettings:
    endpoints: list[Endpoint]
    pull_interval: float
    orphan_after: float
    fetch_alarm_after: float


PRE = "/cevpn-ce:ce/pre-configuration"


def settings_from(
    running: etree._Element, state_dir: Path, key_file: Path, index: SchemaIndex
) -> PullSettings | None:
    """The pull settings in the pre-configuration, or None if the CE has no VPN server.
    Leaves left out take their YANG defaults (read from the schema, not repeated here)."""
    pre = running.find(f"{qn(CE_NS, 'ce')}/{qn(CE_NS, 'pre-configuration')}")
    if pre is None or not key_file.exists():
        return None
    server = pre.find(qn(CE_NS, "vpn-server"))
    if server is None:
        return None
    username = server.findtext(qn(CE_NS, "username")) or ""
    timers = pre.find(qn(CE_NS, "timers"))

    def timer(name: str) -> float:
        text = timers.findtext(qn(CE_NS, name)) if timers is not None else None
        return float(text if text else index.default(f"{PRE}/timers/{name}"))

    default_port = int(index.default(f"{PRE}/vpn-server/endpoint/port"))
    endpoints = [
        Endpoint(
            host=e.findtext(qn(CE_NS, "address")) or "",
            port=int(e.findtext(qn(CE_NS, "port")) or default_port),
            host_keys=[k.text or "" for k in e.iterfind(qn(CE_NS, "host-key"))],
            username=username,
            key_file=key_file,
            timeout=timer("connect-timeout"),
        )
        for e in server.iterfind(qn(CE_NS, "endpoint"))
    ]
    if not endpoints:
        return None
    return PullSettings(
        endpoints, timer("pull-interval"), timer("orphan-after"), timer("fetch-alarm-after")
    )


class SiteRemoved(Exception):
    pass


class FetchWatch:
    """The configuration-fetch-failure alarm: raised when no fetch succeeded for
    ``timers/fetch-alarm-after`` (since the last success, or since the agent started),
    cleared by the next fetch that does."""

    RESOURCE = "vpn-server"

    def __init__(self, alarms: AlarmList, clock: Callable[[], float] = time.monotonic) -> None:
        self.alarms = alarms
        self.clock = clock
        self.ok_since = clock()

    def succeeded(self) -> None:
        self.ok_since = self.clock()
        self.alarms.clear(CONFIGURATION_FETCH_FAILURE, self.RESOURCE)

    def failed(self, reason: str, limit: float) -> None:
        failing = self.clock() - self.ok_since
        if failing >= limit:
            self.alarms.raise_alarm(
                CONFIGURATION_FETCH_FAILURE,
                self.RESOURCE,
                "major",
                f"No configuration could be fetched from the VPN server for {failing:.0f} s "
                f"(the limit is {limit:.0f} s); the last attempt: {reason}.  This CE keeps its "
                "configuration and tries again every pull-interval; check the server and the "
                "path to it (seed 3.5).",
            )


class Puller:
    def __init__(
        self,
        server: NetconfServer,
        state_dir: Path,
        key_file: Path,
        *,
        alarms: AlarmList | None = None,
    ) -> None:
        self.server = server
        self.state_dir = state_dir
        self.key_file = key_file
        self.watch = FetchWatch(alarms if alarms is not None else AlarmList(lambda *a, **k: None))
        self.last_fetch: str | None = None
        self.last_error: str | None = None
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.fetches = 0
        self._listening: _ServerLink | None = None
        """The notification session while it is up: fetches go over it rather than over a
        new SSH connection each (at 1,000 CEs fetching every 300 s, 3.3 handshakes a
        second for the server)."""
        self.fetch_connections = 0
        """SSH connections opened for fetches (tests look)."""
        self._server_defers = True
        """Does the VPN server know defer-to-push (one older than it refuses the leaf)?"""
        self.awaiting_push: str | None = None
        """The version the server said it was pushing at the last fetch (None: it did not):
        the next fetch comes after PUSH_RECHECK, not a whole pull-interval."""

    def settings(self) -> PullSettings | None:
        return settings_from(
            self.server.datastores["running"].root, self.state_dir, self.key_file, self.server.index
        )

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self._periodic()))
        self._tasks.append(loop.create_task(self._listen()))

    async def stop(self) -> None:
        await stop_tasks(self._tasks)  # cancelled again if a cancellation was lost

    def trigger(self, why: str) -> None:
        log.info("fetching the configuration: %s", why)
        self._wake.set()

    async def _periodic(self) -> None:
        while True:
            settings = self.settings()
            interval = settings.pull_interval if settings else 60.0
            if self.awaiting_push is not None:
                interval = min(interval, PUSH_RECHECK)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=interval)
            self._wake.clear()
            if settings is None:
                continue
            try:
                await self.fetch_and_apply()
            except Exception as exc:
                log.warning("configuration fetch failed: %s", exc)

    async def fetch_and_apply(self) -> bool:
        """One fetch; True if the running configuration changed."""
        settings = self.settings()
        if settings is None:
            raise RuntimeError("this CE has no VPN server in its pre-configuration")
        changed = False
        self.awaiting_push = None
        # A fetch reports the version running here; after applying a new one the agent
        # fetches again at once, so the server learns it (and may answer a certificate
        # issued for the request just sent).  Three rounds at most, on one SSH connection:
        # a handshake costs both ends far more than the RPC.
        session = _ServerSession(settings.endpoints, self._listening, self._server_defers)
        try:
            for _ in range(3):
                running = self.server.datastores["running"].root
                current = running.findtext(
                    f"{qn(CE_NS, 'ce')}/{qn(CE_NS, 'configuration-version')}"
                )
                csr = self._certificate_request(running)
                try:
                    reply = await session.fetch(current, csr)
                except SiteRemoved as exc:
                    self.last_error = str(exc)
                    self.watch.succeeded()  # the server answered, for this site
                    return await self._removed(settings)
                except Exception as exc:
                    self.last_error = str(exc)
                    self.watch.failed(str(exc), settings.fetch_alarm_after)
                    raise
                self.watch.succeeded()
                self.fetches += 1
                self.last_fetch = date_and_time(now(), "seconds")
                self.last_error = None
                (self.state_dir / ORPHAN_FILE).unlink(missing_ok=True)
                if reply.version == current:
                    break
                if reply.being_pushed:
                    # The server's push of this version is on its way (this fetch raced
                    # it): applying the whole configuration here would be the same change
                    # made twice, and at 1,000 peers several times the pushed edit's work.
                    log.info(
                        "version %s is being pushed by the VPN server: left to the push "
                        "(fetching again in %.0f s if it does not arrive)",
                        reply.version, min(settings.pull_interval, PUSH_RECHECK),
                    )  # fmt: skip
                    self.awaiting_push = reply.version
                    break
                if reply.ce is None:
                    log.warning(
                        "the VPN server answered version %s without its configuration",
                        reply.version,
                    )
                    break
                if not await self._commit(reply.ce):
                    break
                changed = True
        finally:
            self.fetch_connections += session.opened
            self._server_defers = session.defer
            await session.close()
        return changed

    def _certificate_request(self, running: etree._Element) -> str | None:
        """A CSR for the CE's own key when the VPN uses certificates and the configured one
        is not for that key (seed 3.3 (ii))."""
        certs = running.find(f"{qn(CE_NS, 'ce')}/{qn(CE_NS, 'certificates')}")
        if certs is None or certs.find(qn(CE_NS, "certificate")) is None:
            return None
        certificate = certs.findtext(qn(CE_NS, "certificate")) or ""
        if certs.findtext(qn(CE_NS, "key-origin")) == "ce" and certifies_own_key(
            self.state_dir, certificate
        ):
            return None
        site = running.findtext(
            f"{qn(CE_NS, 'ce')}/{qn(CE_NS, 'pre-configuration')}/{qn(CE_NS, 'site-id')}"
        )
        return certificate_request(self.state_dir, site or "ce")

    async def _commit(self, fetched: etree._Element | None) -> bool:
        """Make the fetched configuration (None: no VPN configuration at all) running,
        keeping the pre-configuration; False if nothing changed or it must wait."""

        def replace_vpn_part(root: etree._Element) -> None:
            ce = root.find(qn(CE_NS, "ce"))
            if ce is None:
                ce = default_ns_element(CE_NS, "ce")
                root.append(ce)
            for child in list(ce):
                if child.tag != qn(CE_NS, "pre-configuration"):
                    ce.remove(child)
            if fetched is not None:
                for child in fetched:
                    if isinstance(child.tag, str) and child.tag != qn(CE_NS, "pre-configuration"):
                        ce.append(deepcopy(child))

        try:
            changes = await self.server.edit_running(replace_vpn_part, reason="pull")
        except RpcError as exc:
            if exc.tag != "in-use":
                raise
            # A session locked running or has a confirmed commit pending (the VPN server
            # pushing): the fetched configuration waits for the next round.
            log.info("the fetched configuration waits: %s", exc.message)
            return False
        return bool(changes)

    async def _removed(self, settings: PullSettings) -> bool:
        marker = self.state_dir / ORPHAN_FILE
        if not marker.exists():
            marker.write_text(str(time.time()))
        since = float(marker.read_text() or time.time())
        waited = time.time() - since
        if waited < settings.orphan_after:
            log.warning(
                "the VPN server says this site was removed; VPN state goes in %.0f s",
                settings.orphan_after - waited,
            )
            return False
        log.warning("removed from the VPN (seed 3.6): deleting the VPN state")
        return await self._commit(None)

    # -- notify-then-pull ---------------------------------------------------------

    async def _listen(self) -> None:
        """A subscription to the server's configuration-available notifications, kept up
        on the event loop (one SSH connection, no thread)."""
        delay = 1.0
        while True:
            settings = self.settings()
            if settings is None:
                await asyncio.sleep(5.0)
                continue
            began = time.monotonic()
            try:
                link = await _ServerLink.open(
                    settings.endpoints, LINK_KEEPALIVE, LINK_KEEPALIVE_COUNT
                )
            except SessionLost as exc:
                log.debug("notification session: %s", exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 60.0)
                continue
            try:
                link.session.on_notification = self._notified
                await link.session.rpc(_SUBSCRIPTION, FETCH_TIMEOUT)
                self._listening = link
                await link.session.wait_closed()
                log.debug("notification session ended")
            except (SessionLost, RpcFailed) as exc:
                log.debug("notification session: %s", exc)
            finally:
                self._listening = None
                await link.close()
            if time.monotonic() - began >= STEADY:
                delay = 1.0
            else:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 60.0)

    def _notified(self, notification: etree._Element) -> None:
        self.trigger("configuration-available")


_SUBSCRIPTION = (
    '<create-subscription xmlns="urn:ietf:params:xml:ns:netconf:notification:1.0">'
    f'<filter type="subtree"><configuration-available xmlns="{SVC_NS}"/></filter>'
    "</create-subscription>"
)
INTERLEAVE = "urn:ietf:params:netconf:capability:interleave:1.0"


class _ServerLink:
    """One NETCONF session to the VPN server on an SSH connection of its own
    (nc_core.netconf_client: asyncio, the server's host key pinned, replies bounded)."""

    def __init__(self, conn: Any, session: NetconfSession) -> None:
        self.conn = conn
        self.session = session

    @classmethod
    async def open(
        cls,
        endpoints: list[Endpoint],
        keepalive_interval: float = LINK_KEEPALIVE,
        keepalive_count: int = LINK_KEEPALIVE_COUNT,
    ) -> _ServerLink:
        """The first of ``endpoints`` (in order) that answers."""
        last: SessionLost | None = None
        for endpoint in endpoints:
            try:
                conn = await connect_ssh(
                    endpoint,
                    keepalive_interval=keepalive_interval,
                    keepalive_count_max=keepalive_count,
                )
            except (SessionLost, OSError, ValueError) as exc:
                last = exc if isinstance(exc, SessionLost) else SessionLost(str(exc))
                continue
            try:
                session = await NetconfSession.open(
                    conn, f"VPN server {endpoint.host}", timeout=endpoint.timeout
                )
            except SessionLost as exc:
                conn.close()
                last = exc
                continue
            return cls(conn, session)
        raise last or SessionLost("no VPN server endpoint")

    @property
    def alive(self) -> bool:
        return self.session.alive

    @property
    def interleaves(self) -> bool:
        """Does the server take RPCs on a session with a subscription (RFC 5277)?"""
        return INTERLEAVE in self.session.capabilities

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.session.close()
        self.conn.close()


class _ServerSession:
    """The NETCONF session to the VPN server for the rounds of one fetch: the
    notification session if it is up (the server interleaves RPCs with notifications),
    else one of its own, opened once for all the rounds."""

    def __init__(
        self, endpoints: list[Endpoint], shared: _ServerLink | None = None, defer: bool = True
    ) -> None:
        self.endpoints = endpoints
        self.shared = shared
        self.link: _ServerLink | None = None
        self.opened = 0
        self.defer = defer
        """Ask with defer-to-push (False once a server that does not know it refused it)."""

    async def fetch(self, applied: str | None, csr: str | None = None) -> FetchReply:
        shared = self.shared
        if self.link is None and shared is not None and shared.alive and shared.interleaves:
            try:
                return await self._ask(shared.session, applied, csr)
            except (SiteRemoved, RpcFailed):
                raise  # the server's answer, whichever session carried it
            except SessionLost as exc:
                log.debug("fetch over the notification session: %s; over a new one", exc)
                self.shared = None
        if self.link is None or not self.link.alive:
            self.link = await _ServerLink.open(self.endpoints)
            self.opened += 1
        return await self._ask(self.link.session, applied, csr)

    async def _ask(
        self, session: NetconfSession, applied: str | None, csr: str | None
    ) -> FetchReply:
        try:
            return await _fetch(session, applied, csr, defer=self.defer)
        except RpcFailed as exc:
            said = f"{exc.message} {exc.path or ''} {exc.info}"
            if not (self.defer and exc.tag == "unknown-element" and "defer-to-push" in said):
                raise
        # A server older than defer-to-push: ask as before, from now on.
        log.info("the VPN server does not know defer-to-push: fetching without it")
        self.defer = False
        return await _fetch(session, applied, csr, defer=False)

    async def close(self) -> None:
        if self.link is not None:
            await self.link.close()
            self.link = None


async def _fetch(
    session: NetconfSession, applied: str | None, csr: str | None = None, *, defer: bool = True
) -> FetchReply:
    request = default_ns_element(SVC_NS, "fetch-ce-configuration")
    if applied:
        etree.SubElement(request, qn(SVC_NS, "applied-version")).text = applied
    if csr:
        etree.SubElement(request, qn(SVC_NS, "certificate-request")).text = csr
    if defer:
        etree.SubElement(request, qn(SVC_NS, "defer-to-push"))
    try:
        data = await session.rpc(request, FETCH_TIMEOUT)
    except RpcFailed as exc:
        if exc.app_tag == "site-removed":
            raise SiteRemoved(exc.message or str(exc)) from None
        raise
    return FetchReply(
        version=data.findtext(f".//{qn(SVC_NS, 'version')}") or "",
        ce=data.find(f".//{qn(SVC_NS, 'configuration')}/{qn(CE_NS, 'ce')}"),
        being_pushed=data.find(f".//{qn(SVC_NS, 'being-pushed')}") is not None,
    )


class UnknownPeerWatch:
    """Seed 3.5: 'when an unknown peer tries to reach it'.  ESP for which the kernel has
    no SA shows as a growing XfrmInNoStates (needs CONFIG_XFRM_STATISTICS)."""

    STAT = Path("/proc/self/net/xfrm_stat")

    def __init__(self, on_unknown: Any, period: float = 2.0, quiet: float = 10.0) -> None:
        self.on_unknown = on_unknown
        self.period = period
        self.quiet = quiet
        self.task: asyncio.Task[None] | None = None

    def available(self) -> bool:
        return self.STAT.exists()

    def read(self) -> int | None:
        try:
            for line in self.STAT.read_text().splitlines():
                fields = line.split()
                if len(fields) == 2 and fields[0] == "XfrmInNoStates":
                    return int(fields[1])
        except OSError:
            return None
        return None

    def start(self) -> None:
        if self.available():
            self.task = asyncio.get_running_loop().create_task(self._run())
        else:
            log.info("no %s: unknown peers are noticed at the next periodic fetch only", self.STAT)

    async def _run(self) -> None:
        last = self.read()
        fired = 0.0
        while True:
            await asyncio.sleep(self.period)
            value = self.read()
            if value is not None and last is not None and value > last:
                if time.monotonic() - fired > self.quiet:
                    fired = time.monotonic()
                    self.on_unknown("ESP arrived for an SA this CE does not have")
            last = value

    def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
