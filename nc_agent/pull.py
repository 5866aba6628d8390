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
import threading
import time
from collections.abc import Callable
from copy import deepcopy
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lxml import etree
from ncclient.operations.rpc import RPCError as NcRpcError

from nc_agent.alarms import CONFIGURATION_FETCH_FAILURE, AlarmList
from nc_agent.own_key import certificate_request, certifies_own_key
from nc_core.client import Endpoint, connect
from nc_core.errors import RpcError
from nc_core.notifications import date_and_time, now
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
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.fetches = 0
        self._listening: Any = None
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
        self._loop = asyncio.get_running_loop()
        self._tasks.append(self._loop.create_task(self._periodic()))
        self._thread = threading.Thread(target=self._listen, name="pull-notify", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        self._stop.set()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

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
                    reply = await asyncio.to_thread(session.fetch, current, csr)
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
            await asyncio.to_thread(session.close)
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

    def _listen(self) -> None:
        """A subscription to the server's configuration-available notifications (thread)."""
        delay = 1.0
        while not self._stop.is_set():
            settings = self.settings()
            if settings is None:
                self._stop.wait(5.0)
                continue
            try:
                manager = _connect_any(settings.endpoints)
            except Exception as exc:
                log.debug("notification session: %s", exc)
                self._stop.wait(delay)
                delay = min(delay * 2, 60.0)
                continue
            delay = 1.0
            try:
                manager.create_subscription(
                    filter=("subtree", f'<configuration-available xmlns="{SVC_NS}"/>')
                )
                self._listening = manager
                while not self._stop.is_set() and manager.connected:
                    note = manager.take_notification(block=True, timeout=1.0)
                    if note is not None and self._loop is not None:
                        self._loop.call_soon_threadsafe(self.trigger, "configuration-available")
            except Exception as exc:
                log.debug("notification session ended: %s", exc)
            finally:
                self._listening = None
                with contextlib.suppress(Exception):
                    manager.close_session()


def _connect_any(endpoints: list[Endpoint]) -> Any:
    last: Exception | None = None
    for endpoint in endpoints:
        try:
            return connect(endpoint)
        except Exception as exc:
            last = exc
    assert last is not None
    raise last


class _ServerSession:
    """The NETCONF session to the VPN server for the rounds of one fetch (a thread's): the
    notification session if it is up (ncclient lets one thread wait for notifications
    while another makes RPCs), else one of its own, opened once for all the rounds."""

    def __init__(self, endpoints: list[Endpoint], shared: Any = None, defer: bool = True) -> None:
        self.endpoints = endpoints
        self.shared = shared
        self.manager: Any = None
        self.opened = 0
        self.defer = defer
        """Ask with defer-to-push (False once a server that does not know it refused it)."""

    def fetch(self, applied: str | None, csr: str | None = None) -> FetchReply:
        shared = self.shared
        if (
            self.manager is None
            and shared is not None
            and shared.connected
            and _interleaves(shared)
        ):
            try:
                return self._ask(shared, applied, csr)
            except (SiteRemoved, NcRpcError):
                raise  # the server's answer, whichever session carried it
            except Exception as exc:
                log.debug("fetch over the notification session: %s; over a new one", exc)
                self.shared = None
        if self.manager is None or not self.manager.connected:
            self.manager = _connect_any(self.endpoints)
            self.opened += 1
        return self._ask(self.manager, applied, csr)

    def _ask(self, manager: Any, applied: str | None, csr: str | None) -> FetchReply:
        try:
            return _fetch(manager, applied, csr, defer=self.defer)
        except NcRpcError as exc:
            said = f"{exc.message or ''} {exc.info or ''}"
            if not (self.defer and exc.tag == "unknown-element" and "defer-to-push" in said):
                raise
        # A server older than defer-to-push: ask as before, from now on.
        log.info("the VPN server does not know defer-to-push: fetching without it")
        self.defer = False
        return _fetch(manager, applied, csr, defer=False)

    def close(self) -> None:
        if self.manager is not None:
            with contextlib.suppress(Exception):
                self.manager.close_session()
            self.manager = None


INTERLEAVE = "urn:ietf:params:netconf:capability:interleave:1.0"


def _interleaves(manager: Any) -> bool:
    """Does the server take RPCs on a session with a subscription (RFC 5277 :interleave)?"""
    return INTERLEAVE in manager.server_capabilities


def _fetch(
    manager: Any, applied: str | None, csr: str | None = None, *, defer: bool = True
) -> FetchReply:
    request = default_ns_element(SVC_NS, "fetch-ce-configuration")
    if applied:
        etree.SubElement(request, qn(SVC_NS, "applied-version")).text = applied
    if csr:
        etree.SubElement(request, qn(SVC_NS, "certificate-request")).text = csr
    if defer:
        etree.SubElement(request, qn(SVC_NS, "defer-to-push"))
    try:
        reply = manager.dispatch(request)
    except NcRpcError as exc:
        if getattr(exc, "_app_tag", None) == "site-removed":
            raise SiteRemoved(str(exc.message or exc)) from None
        raise
    data = etree.fromstring(reply.xml.encode())
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
