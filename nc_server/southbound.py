"""The VPN server's NETCONF operations on its CEs (southbound): standing sessions, pipelined.

Every CE has one standing management link (:class:`CeLink`): one SSH
connection carrying two NETCONF sessions, opened at the first need and kept
open with SSH keepalives (nc_core.netconf_client), so a push costs no
handshake and no thread:

- the *editor* session edits the candidate and commits;
- the *confirmer* session confirms (and serves audits' reads).

A change is pushed the way RFC 6241 makes safe for a change that might cut
the management path (seed 3.2: the SP manages the CE over the network it
configures):

1. on the editor, ``<discard-changes>`` and the ``<edit-config>`` of the
   candidate, pipelined (one write, one round trip), then
   ``<commit><confirmed/><confirm-timeout>T</confirm-timeout><persist>X</persist>``;
2. ``<commit><persist-id>X</persist-id>`` on the confirmer: a second session,
   open since before the change, whose answer proves the path from the
   server to the CE still carries NETCONF after it.  When the change touches
   the management path itself (where the CE listens, what its ingress policy
   admits, its Internet access) an established connection proves too little
   (a filter may refuse new connections and keep old ones), so the
   confirmation goes over a brand-new SSH connection instead, which then
   becomes the CE's link.

If step 2 fails the CE puts its previous configuration back by itself after
T seconds, and the link is cut at once: a confirmation still queued in TCP
must not arrive after the rollback has restored the path.  What happens next
depends on what the failure proves.  If the management path may be what the
change broke (a new connection found no TCP listener, or a call-home CE did
not call back), pushing it again would break it again: the CE is *failed*
(:class:`NotConfirmed`).  If the path demonstrably works (the change leaves
it alone, or the CE's port accepted the new connection, or the CE answered),
the CE was only slow or busy: the push is retried like one to an unreachable
CE (:class:`ConfirmLost`; 17 of 2,000 CEs in a scale run were failed for a
confirmation not made within 10 s under load).

Each link also carries a third session, the *watcher*, opened in the
background once the link is up: it subscribes to the CE's tunnel events and
reads its tunnels' status, so the server learns of tunnels going down from
the CEs themselves (:class:`TunnelWatch`; nc_server.alarms turns that into
alarms).  It never delays a push, and a CE that refuses it is managed as
before.

A CE behind a NAT calls home instead (RFC 8071, nc_core.call_home): its link
is the connection it opened, handed over by :meth:`Southbound.called`, and
everything above runs on it unchanged.  The server never dials such a CE: a
push waits for its call.  Where a dialled CE's change is confirmed over a
brand-new connection, a call-home CE's link is cut after the commit and the
confirmation goes over the next connection the CE opens, which proves the CE
still reaches the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Protocol

from lxml import etree

from nc_core import faults
from nc_core.asyncssh_import import asyncssh
from nc_core.confirmed_commit import PERSISTENT_COMMIT_PENDING
from nc_core.endpoint import Endpoint
from nc_core.netconf_client import NetconfSession, RpcFailed, SessionLost, connect_ssh
from nc_core.xmlutil import NC_NS, default_ns_element, qn
from nc_server.ce_config import CE_NS

log = logging.getLogger("cevpn.server.southbound")

RPC_TIMEOUT = 60.0
"""Seconds a CE may take to answer one request (a 1,000-peer commit in the lab is seconds)."""


@dataclass
class Timings:
    """Where the time of one provisioning went (bench and `<get>`)."""

    ssh: float = 0.0
    """TCP + SSH handshake + authentication + NETCONF hellos."""
    netconf: float = 0.0
    """Request/reply exchanges."""
    rpcs: int = 0
    sessions: int = 0
    """SSH connections opened."""

    def add(self, other: Timings) -> None:
        self.ssh += other.ssh
        self.netconf += other.netconf
        self.rpcs += other.rpcs
        self.sessions += other.sessions

    @contextlib.contextmanager
    def exchange(self, rpcs: int) -> Iterator[None]:
        """Count ``rpcs`` requests and the time until their last reply."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.netconf += time.perf_counter() - started
            self.rpcs += rpcs


class CeRefused(Exception):
    """The CE answered with an rpc-error: its configuration was not changed."""

    def __init__(self, message: str, app_tag: str | None = None, path: str | None = None) -> None:
        super().__init__(message)
        self.app_tag = app_tag
        self.path = path


class CeUnreachable(Exception):
    """No NETCONF session could be opened, or it broke."""

    def __init__(self, message: str, *, reached: bool = False) -> None:
        super().__init__(message)
        self.reached = reached
        """The CE's management port accepted a TCP connection (what failed came after)."""


class CeBusy(Exception):
    """The CE holds another persistent confirmed commit (pushed by this server before it
    restarted, its token lost): it rolls back by itself at its confirm timeout, and the push
    can be retried then."""


class NotConfirmed(Exception):
    """The change was committed but could not be confirmed, and the failure says the change
    may have cut the CE's management path: the CE rolls back by itself when the confirm
    timeout expires, and pushing the same change again would cut it again."""


class ConfirmLost(CeUnreachable):
    """The change was committed but its confirmation was lost although the management path
    demonstrably works after it (the confirmation went over a session open since before a
    change that leaves the path alone, or a new connection reached the CE's port): a slow
    or busy CE, not a bad change.  The CE rolls back by itself; the push is retried like
    one to an unreachable CE (and waits as :class:`CeBusy` until that rollback)."""


def _refused(exc: RpcFailed) -> CeRefused:
    return CeRefused(exc.message or exc.tag, exc.app_tag, exc.path)


def _where(endpoint: Endpoint) -> tuple[str, int, tuple[str, ...], str]:
    """What identifies a management path: a link opened for another tuple is not reused.
    A call-home CE's path is its calls, from wherever they come."""
    if endpoint.call_home:
        return "call-home", 0, tuple(endpoint.host_keys), endpoint.username
    return endpoint.host, endpoint.port, tuple(endpoint.host_keys), endpoint.username


class TunnelWatch(Protocol):
    """Who hears what CEs say of their tunnels (over each link's watcher session)."""

    def tunnel_statuses(self, site: str, statuses: Mapping[str, str]) -> None:
        """The status of every tunnel of the CE (peer -> cevpn-types tunnel-status), read
        when the watcher session starts."""

    def tunnel_event(self, site: str, event: str, peer: str, reason: str | None) -> None:
        """The CE notified ``tunnel-up``, ``tunnel-down`` or
        ``tunnel-establishment-failed`` for ``peer``."""


TUNNEL_EVENTS = ("tunnel-up", "tunnel-down", "tunnel-establishment-failed")
TUNNEL_EVENTS_FILTER = "".join(f'<{e} xmlns="{CE_NS}"/>' for e in TUNNEL_EVENTS)
TUNNEL_STATUS_FILTER = f'<ce xmlns="{CE_NS}"><peer><name/><state><status/></state></peer></ce>'
NOTIFICATION_NS = "urn:ietf:params:xml:ns:netconf:notification:1.0"
WATCH_AGAIN_AFTER = 1.0
"""Seconds before a watcher session the CE ended alone is opened again."""


@dataclass
class CeLink:
    """One SSH connection to a CE and its standing NETCONF sessions."""

    endpoint: Endpoint
    conn: asyncssh.SSHClientConnection
    editor: NetconfSession
    confirmer: NetconfSession

    called_from: str | None = None
    """The address a call-home connection came from; None for a link the server opened."""
    watcher: NetconfSession | None = None
    """Subscribed to the CE's tunnel events (:meth:`Southbound._watch`), once it is open."""

    @classmethod
    async def open(cls, endpoint: Endpoint, timings: Timings) -> CeLink:
        """Dial the CE and open both sessions."""
        started = time.perf_counter()
        name = f"{endpoint.host} port {endpoint.port}"
        conn = None
        try:
            conn = await connect_ssh(endpoint)
            link = await cls.on(conn, endpoint, name)
        except SessionLost as exc:
            raise CeUnreachable(str(exc), reached=conn is not None or exc.reached) from None
        finally:
            timings.ssh += time.perf_counter() - started
        timings.sessions += 1
        return link

    @classmethod
    async def on(cls, conn: asyncssh.SSHClientConnection, endpoint: Endpoint, name: str) -> CeLink:
        """Both sessions on an authenticated connection (dialled, or a call-home one)."""
        try:
            editor, confirmer = await asyncio.gather(
                NetconfSession.open(conn, name, timeout=endpoint.timeout),
                NetconfSession.open(conn, name, timeout=endpoint.timeout),
            )
        except BaseException:
            conn.abort()
            raise
        return cls(endpoint, conn, editor, confirmer)

    @property
    def alive(self) -> bool:
        return self.editor.alive and self.confirmer.alive and not self.conn.is_closed()

    def abort(self) -> None:
        """Cut the connection now: nothing queued on it may still reach the CE."""
        self.editor.abort("link cut")
        self.confirmer.abort("link cut")
        if self.watcher is not None:
            self.watcher.abort("link cut")
        self.conn.abort()

    async def close(self) -> None:
        """Close the sessions politely (bounded), then the connection."""
        sessions = [self.editor, self.confirmer, *([self.watcher] if self.watcher else [])]
        with contextlib.suppress(Exception):
            await asyncio.gather(*(session.close() for session in sessions))
        self.conn.close()


DISCARD = f'<discard-changes xmlns="{NC_NS}"/>'
DISCARD_BYTES = etree.tostring(etree.fromstring(DISCARD))
"""Parsed once here, so every push sends it as it is (NetconfSession.send_all)."""
PEER_NAMES_FILTER = f'<ce xmlns="{CE_NS}"><peer><name/></peer></ce>'
CE_FILTER = f'<ce xmlns="{CE_NS}"/>'


def get_config(subtree: str) -> etree._Element:
    op = default_ns_element(NC_NS, "get-config")
    etree.SubElement(etree.SubElement(op, qn(NC_NS, "source")), qn(NC_NS, "running"))
    flt = etree.SubElement(op, qn(NC_NS, "filter"), type="subtree")
    flt.append(etree.fromstring(subtree))
    return op


def get_state(subtree: str) -> etree._Element:
    """``<get>`` (configuration and state) with a subtree filter."""
    op = default_ns_element(NC_NS, "get")
    flt = etree.SubElement(op, qn(NC_NS, "filter"), type="subtree")
    flt.append(etree.fromstring(subtree))
    return op


def create_subscription(subtree: str) -> etree._Element:
    """RFC 5277 ``<create-subscription>`` to the NETCONF stream; ``subtree``: the events'
    filter (sibling elements: any of them)."""
    op = default_ns_element(NOTIFICATION_NS, "create-subscription")
    flt = etree.SubElement(op, qn(NOTIFICATION_NS, "filter"), type="subtree")
    for event in etree.fromstring(f"<events>{subtree}</events>"):
        flt.append(event)
    return op


def edit_candidate(config: etree._Element | bytes) -> etree._Element | bytes:
    """``<edit-config>`` of the candidate; ``config`` is its ``<config>`` element, or that
    element serialised (then so is the answer: the edit is not parsed again to be sent)."""
    if isinstance(config, bytes):
        return b"".join((_EDIT_CANDIDATE_OPEN, config, b"</edit-config>"))
    op = default_ns_element(NC_NS, "edit-config")
    etree.SubElement(etree.SubElement(op, qn(NC_NS, "target")), qn(NC_NS, "candidate"))
    op.append(config)
    return op


_EDIT_CANDIDATE_OPEN = f'<edit-config xmlns="{NC_NS}"><target><candidate/></target>'.encode()


def commit_confirmed(timeout: int, token: str) -> etree._Element:
    op = default_ns_element(NC_NS, "commit")
    etree.SubElement(op, qn(NC_NS, "confirmed"))
    etree.SubElement(op, qn(NC_NS, "confirm-timeout")).text = str(timeout)
    etree.SubElement(op, qn(NC_NS, "persist")).text = token
    return op


def confirming_commit(token: str) -> etree._Element:
    op = default_ns_element(NC_NS, "commit")
    etree.SubElement(op, qn(NC_NS, "persist-id")).text = token
    return op


class Southbound:
    """The server's standing management links to its CEs, one per site, kept and reused.

    The provisioner runs at most one job per CE at a time; an audit may read
    a CE while a push runs on it (its sessions answer in order).
    """

    def __init__(self, watch: TunnelWatch | None = None) -> None:
        self.links: dict[str, CeLink] = {}
        self._opening: dict[str, asyncio.Lock] = {}
        self._calls: dict[str, asyncio.Event] = {}
        """Set when a call-home CE's new link is in ``links``."""
        self.watch = watch
        """Hears the CEs' tunnel events; None: no watcher sessions are opened."""
        self._watching: set[asyncio.Task[None]] = set()

    def _adopt(self, site: str, link: CeLink) -> None:
        """``link`` is the site's link from now on; its watcher opens in the background."""
        self.links[site] = link
        self._start_watch(site, link)

    def _start_watch(self, site: str, link: CeLink) -> None:
        if self.watch is not None:
            task = asyncio.get_running_loop().create_task(self._watch(site, link))
            self._watching.add(task)
            task.add_done_callback(self._watching.discard)

    async def _watch(self, site: str, link: CeLink) -> None:
        """Open the link's watcher session: subscribe to tunnel events first, then read every
        tunnel's status (what changed in between arrives after, in order)."""
        watch = self.watch
        assert watch is not None
        try:
            watcher = await NetconfSession.open(
                link.conn, f"{site} (watcher)", timeout=link.endpoint.timeout
            )
        except SessionLost as exc:
            log.debug("CE %s: no watcher session: %s", site, exc)
            return
        link.watcher = watcher
        if not link.alive:
            watcher.abort("link cut")
            return

        def heard(message: etree._Element) -> None:
            for child in message:
                event = etree.QName(child).localname
                if etree.QName(child).namespace == CE_NS and event in TUNNEL_EVENTS:
                    peer = child.findtext(f"{{{CE_NS}}}peer")
                    if peer:
                        watch.tunnel_event(site, event, peer, child.findtext(f"{{{CE_NS}}}reason"))

        watcher.on_notification = heard
        try:
            await watcher.rpc(create_subscription(TUNNEL_EVENTS_FILTER), RPC_TIMEOUT)
            reply = await watcher.rpc(get_state(TUNNEL_STATUS_FILTER), RPC_TIMEOUT)
        except (RpcFailed, SessionLost) as exc:
            if self.links.get(site) is link and link.alive:  # not merely a link replaced
                log.warning("CE %s: its tunnel events cannot be watched: %s", site, exc)
            return
        statuses = {
            peer.findtext(f"{{{CE_NS}}}name") or "": peer.findtext(
                f"{{{CE_NS}}}state/{{{CE_NS}}}status"
            )
            or ""
            for peer in reply.iter(f"{{{CE_NS}}}peer")
        }
        watch.tunnel_statuses(site, statuses)
        await watcher.wait_closed()
        if self.links.get(site) is link and link.alive:
            # The CE ended the watcher alone (it drops a subscriber that falls behind):
            # watch again, once a second at most, while the link itself lives.
            log.warning("CE %s: the watcher session ended; watching again", site)
            await asyncio.sleep(WATCH_AGAIN_AFTER)
            if self.links.get(site) is link and link.alive:
                link.watcher = None
                self._start_watch(site, link)

    async def called(
        self, site: str, endpoint: Endpoint, conn: asyncssh.SSHClientConnection
    ) -> None:
        """A call-home CE connected and the server is logged in (nc_core.call_home): its
        sessions become the site's link, replacing an older one (the CE called again
        because that one is gone, or was cut on purpose)."""
        peer = conn.get_extra_info("peername")
        address = str(peer[0]) if peer else "?"
        try:
            link = await CeLink.on(conn, endpoint, f"{site} (call home from {address})")
        except SessionLost as exc:
            log.warning("call-home CE %s: no NETCONF session: %s", site, exc)
            return
        link.called_from = address
        old = self.links.get(site)
        self._adopt(site, link)
        if old is not None:
            old.abort()
        self._calls.setdefault(site, asyncio.Event()).set()
        log.info("call-home CE %s connected from %s", site, address)

    async def _await_call(
        self, site: str, endpoint: Endpoint, timings: Timings, wait: float
    ) -> CeLink:
        """The call-home CE's live link, waiting up to ``wait`` seconds for its call."""
        started = time.perf_counter()
        deadline = asyncio.get_running_loop().time() + wait
        waited = False
        try:
            while True:
                link = self.links.get(site)
                if link is not None and link.alive and _where(link.endpoint) == _where(endpoint):
                    if waited:
                        timings.sessions += 1
                    return link
                left = deadline - asyncio.get_running_loop().time()
                if left <= 0:
                    within = f" within {wait:g} s" if wait else ""
                    raise CeUnreachable(
                        f"the CE has not called home (RFC 8071){within}: it is down, or "
                        "cannot reach this server's call-home port"
                    )
                event = self._calls.setdefault(site, asyncio.Event())
                event.clear()
                waited = True
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(event.wait(), left)
        finally:
            timings.ssh += time.perf_counter() - started

    def called_sites(self) -> set[str]:
        """The sites whose call-home CE's live link this server holds."""
        return {
            site for site, link in self.links.items() if link.called_from is not None and link.alive
        }

    def link_alive(self, site: str) -> bool:
        """Does the CE have a live standing link (its sessions open, its keepalives
        answered)?"""
        link = self.links.get(site)
        return link is not None and link.alive

    def called_from(self, site: str) -> str | None:
        """Where the call-home CE's live link comes from, if it has one."""
        link = self.links.get(site)
        return link.called_from if link is not None and link.alive else None

    async def _link(self, site: str, endpoint: Endpoint, timings: Timings) -> CeLink:
        if endpoint.call_home:
            # No wait: a call that arrives later starts the push by itself (the provisioning
            # slot is not held for a CE that may be off for days).
            return await self._await_call(site, endpoint, timings, 0)
        lock = self._opening.setdefault(site, asyncio.Lock())
        async with lock:
            link = self.links.get(site)
            if link is not None and link.alive and _where(link.endpoint) == _where(endpoint):
                return link
            if link is not None:
                self.links.pop(site, None)
                link.abort()
            link = await CeLink.open(endpoint, timings)
            self._adopt(site, link)
            return link

    def _cut(self, site: str, link: CeLink) -> None:
        if self.links.get(site) is link:
            del self.links[site]
        link.abort()

    async def push(
        self,
        site: str,
        endpoint: Endpoint,
        make_config: Callable[[list[str] | None], etree._Element | bytes],
        confirm_timeout: int,
        *,
        needs_peer_list: bool,
        touches_management: bool = False,
        confirm_endpoint: Endpoint | None = None,
        fence: Callable[[], None] = lambda: None,
    ) -> Timings:
        """Edit, commit confirmed, confirm.  ``make_config`` gets the CE's current peer
        names when ``needs_peer_list`` (a full resynchronisation), else None, and gives the
        edit-config's ``<config>``, as an element or serialised.

        The confirmation goes over a brand-new connection, at
        ``confirm_endpoint`` if given, when ``touches_management`` or when
        that endpoint differs from ``endpoint`` (the change moves the CE's
        management port).

        ``fence`` raises (nc_server.leases.Fenced) when this server may no longer push
        to the CE: it is called just before the edit, the commit and the confirmation
        go out, and what it raises propagates (the CE rolls back an unconfirmed commit).
        """
        timings = Timings()
        token = secrets.token_hex(16)
        timeout = max(endpoint.timeout, RPC_TIMEOUT)
        retried = False
        while True:
            opened = timings.sessions
            link = await self._link(site, endpoint, timings)
            try:
                await self._edit_and_commit(
                    link, make_config, needs_peer_list, confirm_timeout, token, timeout, timings,
                    fence,
                )  # fmt: skip
                break
            except RpcFailed as exc:
                if exc.app_tag == PERSISTENT_COMMIT_PENDING:
                    raise CeBusy(
                        "the CE holds a confirmed commit this server no longer knows the token "
                        "of (the server restarted during a push): it rolls back by itself at "
                        "its confirm timeout, then the push is retried"
                    ) from None
                if exc.app_tag == "running-changed":
                    # The CE changed its own running meanwhile (its start-up fetch, say):
                    # not a refusal of the configuration; pushed again, in full.
                    raise CeBusy(
                        "the CE's running configuration changed while the push was made (its "
                        "own fetch): the push is retried"
                    ) from None
                raise _refused(exc) from None
            except SessionLost as exc:
                self._cut(site, link)
                if timings.sessions > opened or retried:
                    raise CeUnreachable(str(exc)) from None
                # The standing link had died unnoticed (the CE restarted between
                # keepalives): once more, on a new link, which is not retried again.
                retried = True
        faults.point("push-committed", site)  # tests: a server stopped mid-push
        confirm_at = confirm_endpoint or endpoint
        fresh = touches_management or _where(confirm_at) != _where(endpoint)
        try:
            if fresh:
                # The old link was opened before the change: only a new one proves the path.
                self._cut(site, link)
                if confirm_at.call_home:
                    # The CE dials again at once when its connection closes.
                    link = await self._await_call(site, confirm_at, timings, confirm_at.timeout)
                else:
                    link = await CeLink.open(confirm_at, timings)
                    self._adopt(site, link)
            fence()
            with timings.exchange(1):
                await link.confirmer.rpc(confirming_commit(token), min(timeout, confirm_timeout))
        except (CeUnreachable, SessionLost, RpcFailed) as exc:
            self._cut(site, link)
            # Whether the change may have cut the path: a session open since before it
            # proves nothing only when the change touches the path (then it is ``fresh``);
            # an answer, or a TCP connection accepted, over a new one proves the path works.
            path_works = (
                not fresh
                or isinstance(exc, (SessionLost, RpcFailed))  # on the new link, once opened
                or exc.reached
            )
            if path_works:
                raise ConfirmLost(
                    f"committed but not confirmed ({exc}): the CE rolls back by itself within "
                    f"{confirm_timeout} s; its management path works, so the push is retried",
                    reached=True,
                ) from None
            raise NotConfirmed(
                f"committed but not confirmed ({exc}): the CE rolls back by itself within "
                f"{confirm_timeout} s"
            ) from None
        return timings

    async def _edit_and_commit(
        self,
        link: CeLink,
        make_config: Callable[[list[str] | None], etree._Element | bytes],
        needs_peer_list: bool,
        confirm_timeout: int,
        token: str,
        timeout: float,
        timings: Timings,
        fence: Callable[[], None],
    ) -> None:
        """Steps 1: the edit (discard and edit-config pipelined), then the confirmed commit."""
        peers = await self._present_peers(link, timings) if needs_peer_list else None
        edit = edit_candidate(make_config(peers))
        fence()
        with timings.exchange(3):
            # One write, one SSH packet: the CE answers the two in order.
            discarded, edited = link.editor.send_all([DISCARD_BYTES, edit])
            await link.editor.wait(discarded, timeout)
            await link.editor.wait(edited, timeout)
            fence()
            await link.editor.rpc(commit_confirmed(confirm_timeout, token), timeout)

    async def _present_peers(self, link: CeLink, timings: Timings) -> list[str]:
        with timings.exchange(1):
            reply = await link.editor.rpc(get_config(PEER_NAMES_FILTER), RPC_TIMEOUT)
        return [str(e.text) for e in reply.iterfind(f".//{{{CE_NS}}}peer/{{{CE_NS}}}name")]

    async def read_ce(self, site: str, endpoint: Endpoint) -> tuple[etree._Element | None, Timings]:
        """The CE's running ``<ce>`` (None if it has none)."""
        timings = Timings()
        link = await self._link(site, endpoint, timings)
        try:
            with timings.exchange(1):
                reply = await link.confirmer.rpc(get_config(CE_FILTER), RPC_TIMEOUT)
        except RpcFailed as exc:
            raise _refused(exc) from None
        except SessionLost as exc:
            self._cut(site, link)
            raise CeUnreachable(str(exc)) from None
        data = reply.find(qn(NC_NS, "data"))
        ce = None if data is None else data.find(f"{{{CE_NS}}}ce")
        return ce, timings

    async def drop(self, site: str) -> None:
        """Close the link to ``site`` (the site was removed or deprovisioned)."""
        self._opening.pop(site, None)
        self._calls.pop(site, None)
        link = self.links.pop(site, None)
        if link is not None:
            await link.close()

    def open_links(self) -> int:
        return sum(1 for link in self.links.values() if link.alive)

    async def close(self) -> None:
        for task in list(self._watching):
            task.cancel()
        links, self.links = list(self.links.values()), {}
        self._opening.clear()
        await asyncio.gather(*(link.close() for link in links), return_exceptions=True)
