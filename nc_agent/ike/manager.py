"""The agent's IKE side: charon supervised, connections in step with running, seed 3.4 kept.

What it does, and why here:
- **Connections** (seed 3.3): every peer keyed by IKE is one charon connection
  (nc_agent.ike.connections); `apply` loads new and changed ones with their
  credentials and, for removed peers, first deletes the IKE_SA with a proper
  delete exchange and then unloads the connection, so nothing re-establishes
  it (seed 3.6).  A charon refusal undoes the call's own loads and raises
  `IkeRefused`, so the agent can roll the kernel back too.
- **Establishment** (seed 3.4): permanent peers are initiated by the agent as
  soon as they are configured and again whenever they go down; to avoid both
  ends negotiating at once, the end with the lower SP address goes first and
  the other only after a short delay, and either only if charon holds no IKE_SA
  for the peer by then, not even a half-open one the peer started (the peer may
  have been trying for a while when this end is provisioned).  Peers due at the
  same moment are looked at with one list-sas and initiated in one go.  Two
  IKE_SA_INITs that crossed on the wire still make two IKE_SAs: once both carry
  traffic, each end deletes those it initiated that the shared rule of
  nc_agent.ike.duplicates does not keep, so one tunnel is one IKE_SA.
  Traffic-driven peers are traps (the first packet starts the negotiation);
  after their idle time charon deletes the CHILD_SA and the agent deletes the
  IKE_SA too.
- **Failures** (seed 3.4): an IKE_SA this CE initiated that goes down while
  still connecting is a failed attempt; the next one follows the retry
  policy (nc_agent.ike.retry) and the alarm is raised when the back-off
  reaches its limit; a peer that refuses this CE as unknown is retried after
  minimum-wait instead (it is usually being provisioned).  Traffic-driven
  peers have their trap removed until the next attempt is due, so traffic
  cannot retrigger negotiations early.
- **Monitoring** (seed 5): charon's up/down events (DPD included) update the
  tunnel status at once, with a notification on every change.
- **Supervision**: if charon dies the peers are reported down, what it left
  in the kernel is flushed (the CE stays fail-closed: the IP-in-IP guard
  policy drops tunnel traffic, a VTI without policy sends nothing), and a new
  charon is started and given every connection again.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import time
from collections import Counter
from collections.abc import Callable, Mapping
from datetime import timedelta
from typing import Any

from nc_agent.alarms import AlarmList
from nc_agent.ike.charon import Charon, CharonError, CharonSettings, EventListener, text
from nc_agent.ike.connections import Credentials, IkePeer
from nc_agent.ike.duplicates import to_delete
from nc_agent.ike.health import ALARM_TYPE, TunnelHealth
from nc_agent.ike.reasons import NOT_PROVISIONED, failure_reason
from nc_agent.ike.retry import RetryPolicy
from nc_core.notifications import date_and_time
from nc_core.notifications import now as utc_now

log = logging.getLogger("cevpn.ike")

FOLLOWER_DELAY = 1.0
"""The higher-addressed end waits this long before initiating (the lower one goes first)."""
RECHECK = 2.0
"""While the peer's own attempt is in progress, look again after this long."""
CHILD_GRACE = 5.0
"""An IKE_SA this CE initiated must have its CHILD_SA this soon after coming up."""
LOG_SETTLE = 0.3
"""charon's events and its log lines come from different threads: wait this long for
the log lines of a failed IKE_SA before naming the reason."""

PEER_RESTARTED = "the peer restarted its IKE daemon (INITIAL_CONTACT): its old SAs were deleted"

Notify = Callable[..., None]
"""notify(notification-name, **leaves): a cevpn-ce notification."""


class IkeRefused(Exception):
    """charon refused a connection or a credential; ``peer`` names the peer."""

    def __init__(self, message: str, peer: str | None = None) -> None:
        super().__init__(message)
        self.peer = peer


RESET_REASON = "reset by an operator (reset-tunnel)"


def _flag(value: Any) -> bool:
    return text(value) == "yes"


class IkeManager:
    def __init__(
        self,
        charon: Charon,
        *,
        notify: Notify,
        flush_kernel: Callable[[set[int]], int],
        alarms: AlarmList | None = None,
    ) -> None:
        self.charon = charon
        self.notify = notify
        self.alarms = alarms if alarms is not None else AlarmList(notify)
        """The CE's alarm list (shared with the other alarm sources of the agent)."""
        self.flush_kernel = flush_kernel
        """Deletes the SAs and policies of these reqids (blocking; run in a thread)."""
        self.peers: dict[str, IkePeer] = {}
        self.credentials = Credentials()
        self.policy = RetryPolicy()
        self.health: dict[str, TunnelHealth] = {}
        self.failures_total: Counter[str] = Counter()
        """Failed IKE attempts this CE initiated, per peer, since the agent started (never
        reset when the tunnel comes up, unlike TunnelHealth.failures): the metrics'
        cevpn_agent_ike_failures_total."""
        self.loaded: dict[str, IkePeer] = {}
        self.loaded_credentials = Credentials()
        self.enabled = False
        self._lock = asyncio.Lock()
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._listener: EventListener | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._crashes = 0
        self._stopping = False
        self._untrapped: set[str] = set()
        self._resetting: set[str] = set()
        """Peers whose SAs reset-tunnel is deleting: their going down is not a failure."""
        self._ike_up: dict[str, set[str]] = {}
        """Unique ids of each peer's established IKE_SAs, from charon's events: more than
        one means a duplicate to resolve (nc_agent.ike.duplicates)."""
        self._deduping: set[str] = set()
        self._due: dict[str, None] = {}
        """Peers whose attempt is due now: looked at together (one list-sas)."""

    # -- lifecycle -------------------------------------------------------------

    async def start(self) -> None:
        """The agent has started: start charon now, so that the first commit with an IKE
        peer (IKE is the seed's default keying) does not wait for it."""
        self._loop = asyncio.get_running_loop()
        self.enabled = True
        async with self._lock:
            if not self.charon.running:
                await self._start_charon()

    async def stop(self) -> None:
        """Stop charon and remove what it installed: a stopped agent keeps no IKE state."""
        self._stopping = True
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        for task in list(self._tasks):
            task.cancel()
        if self._watcher is not None:
            self._watcher.cancel()
        if self._listener is not None:
            self._listener.stop()
        was_running = self.charon.running
        await self.charon.stop()
        if was_running:
            await asyncio.to_thread(self.flush_kernel, self._reqids())

    def _reqids(self) -> set[int]:
        return {p.reqid for p in self.peers.values()} | {p.reqid for p in self.loaded.values()}

    def settings(self) -> CharonSettings:
        timeouts = [p.dpd_timeout for p in self.peers.values() if p.dpd_delay > 0]
        return CharonSettings.for_dpd_timeout(min(timeouts)) if timeouts else CharonSettings()

    async def _start_charon(self) -> None:
        """Flush leftovers of an earlier daemon, start a new one, load everything."""
        assert self._loop is not None
        flushed = await asyncio.to_thread(self.flush_kernel, self._reqids())
        if flushed:
            log.warning("removed %d SAs and policies an earlier IKE daemon left behind", flushed)
        self.loaded = {}
        self.loaded_credentials = Credentials()
        self._untrapped.clear()
        self._ike_up.clear()
        await self.charon.start(self.settings())
        self._listener = EventListener(self.charon, self._deliver)
        await asyncio.to_thread(self._listener.start)
        self._watcher = self._loop.create_task(self._watch())
        log.info("charon started for %d IKE peers", len(self.peers))
        await self._sync(set())

    async def _watch(self) -> None:
        proc = self.charon.proc
        if proc is None:
            return
        status = await proc.wait()
        if self._stopping:
            return
        if self._listener is not None:
            self._listener.stop()
        uptime = time.monotonic() - self.charon.started_at
        self._crashes = self._crashes + 1 if uptime < 30 else 1
        delay = min(2 ** (self._crashes - 1), 30) if self._crashes > 1 else 0
        reason = f"the IKE daemon exited (status {status}); the agent restarts it"
        log.warning("%s in %.0f s", reason, delay)
        now = utc_now()
        for name in self.peers:
            self._cancel(name)
            if self.health[name].down(now, reason):
                self._announce_down(name, reason)
        await self._restart_after(delay)

    async def _restart_after(self, delay: float) -> None:
        """Start charon again after ``delay``, backing off while it cannot start."""
        while True:
            await asyncio.sleep(delay)
            async with self._lock:
                if self._stopping or self.charon.running or not self.peers:
                    return
                try:
                    await self._start_charon()
                    return
                except (CharonError, OSError) as exc:
                    log.error("restarting charon failed: %s", exc)
            self._crashes += 1
            delay = min(2**self._crashes, 30)

    # -- configuration ---------------------------------------------------------

    async def apply(
        self, peers: Mapping[str, IkePeer], credentials: Credentials, policy: RetryPolicy
    ) -> None:
        """Make charon hold exactly these peers (IkeRefused: nothing changed)."""
        self._loop = asyncio.get_running_loop()
        async with self._lock:
            previous = (dict(self.peers), self.credentials, self.policy)
            self.peers, self.credentials, self.policy = dict(peers), credentials, policy
            now = utc_now()
            added = [name for name in self.peers if name not in self.health]
            for name, peer in self.peers.items():
                if name in added:
                    self.health[name] = TunnelHealth(peer.permanent, policy)
                    self.health[name].idle(now)
                else:
                    self.health[name].permanent = peer.permanent
                    self.health[name].policy = policy
            try:
                if self.enabled and not self.charon.running and self.peers:
                    await self._start_charon()
                elif self.enabled and self.charon.running:
                    await self._sync(set(previous[0]))
            except IkeRefused:
                self.peers, self.credentials, self.policy = previous
                for name in added:
                    del self.health[name]
                with contextlib.suppress(IkeRefused, CharonError, OSError):
                    await self._sync(set())
                raise
            except (CharonError, OSError) as exc:
                # charon is gone or restarting: the supervisor loads everything again.
                log.warning("charon not reachable while applying (%s); left to the restart", exc)
            for name in [n for n in self.health if n not in self.peers]:
                del self.health[name]
                self._cancel(name)
                self._clear_alarm(name)

    async def _sync(self, before: set[str]) -> None:
        """Bring charon from ``self.loaded`` to ``self.peers`` (lock held)."""
        if self.charon.settings != self.settings() and self.charon.running:
            await asyncio.to_thread(self.charon.reconfigure, self.settings())
        if self.credentials != self.loaded_credentials:
            await asyncio.to_thread(self._load_credentials)
        changed = [p for n, p in self.peers.items() if self.loaded.get(n) != p]
        removed = [n for n in self.loaded if n not in self.peers]
        loaded_now: list[str] = []
        try:
            await asyncio.to_thread(self._load_peers, changed, loaded_now)
        except IkeRefused:
            for name in loaded_now:
                old = self.loaded.get(name)
                with contextlib.suppress(CharonError, OSError, IkeRefused):
                    if old is None:
                        await asyncio.to_thread(self._unload_peers, {name: None})
                    else:
                        await asyncio.to_thread(self._load_peer, old)
            raise
        for name in loaded_now:
            self.loaded[name] = self.peers[name]
        gone = {name: self.loaded.pop(name) for name in removed}
        for name in gone:
            self._cancel(name)
        if gone:
            await asyncio.to_thread(self._unload_peers, gone)
        for name in loaded_now:
            if name in before and self.health[name].status == "up":
                continue  # a changed connection keeps its SAs until they rekey
            self._untrapped.discard(name)
            self._arm(name)

    def _load_credentials(self) -> None:
        creds = self.credentials
        if creds.private_key and creds.private_key != self.loaded_credentials.private_key:
            try:
                self.charon.request("load-key", {"type": "any", "data": creds.private_key})
            except CharonError as exc:
                raise IkeRefused(f"charon refused this CE's private key: {exc}") from None
        for ca in creds.ca_certificates:
            if ca not in self.loaded_credentials.ca_certificates:
                try:
                    self.charon.request("load-cert", {"type": "X509", "flag": "CA", "data": ca})
                except CharonError as exc:
                    raise IkeRefused(f"charon refused a CA certificate: {exc}") from None
        self.loaded_credentials = creds

    def _load_peers(self, peers: list[IkePeer], loaded: list[str]) -> None:
        """Load these peers in one go (one thread hop, the requests pipelined), noting
        each that got loaded; IkeRefused names the first peer charon refused."""
        requests: list[tuple[str, Mapping[str, Any]]] = []
        owner: list[IkePeer] = []
        for peer in peers:
            secret = peer.vici_shared_key()
            if secret is not None:
                requests.append(("load-shared", secret))
                owner.append(peer)
            requests.append(("load-conn", peer.vici_connection()))
            owner.append(peer)
        refused: dict[str, str] = {}
        for peer, error in zip(owner, self.charon.pipelined(requests), strict=True):
            if error is not None:
                refused.setdefault(peer.name, error)
        loaded += [peer.name for peer in peers if peer.name not in refused]
        for peer in peers:
            if peer.name in refused:
                message = f"charon refused the connection to peer {peer.name}: {refused[peer.name]}"
                raise IkeRefused(message, peer.name)

    def _load_peer(self, peer: IkePeer) -> None:
        secret = peer.vici_shared_key()
        try:
            if secret is not None:
                self.charon.request("load-shared", secret)
            self.charon.request("load-conn", peer.vici_connection())
        except CharonError as exc:
            message = f"charon refused the connection to peer {peer.name}: {exc}"
            raise IkeRefused(message, peer.name) from None

    def _unload_peers(self, peers: Mapping[str, IkePeer | None]) -> None:
        """Delete the IKE_SAs with a delete exchange (seed 3.6), then forget the peers.

        The deletes are started for all peers first and not waited for (a silent
        peer would hold the others up); charon completes them on its own, and an
        unloaded connection has no trap left that could bring the tunnel back."""
        for name in peers:
            with contextlib.suppress(CharonError):
                self.charon.terminate(ike=name)
        for name, old in peers.items():
            with contextlib.suppress(CharonError):
                self.charon.request("unload-conn", {"name": name})
            if old is not None and old.psk is not None:
                with contextlib.suppress(CharonError):
                    self.charon.request("unload-shared", {"id": f"cevpn-{name}"})

    # -- establishment ---------------------------------------------------------

    async def reset(self, name: str) -> None:
        """reset-tunnel: delete the peer's IKE_SA with its CHILD_SAs and negotiate new ones
        at once, from this end (whatever end usually leads: an operator asked here)."""
        peer = self.peers.get(name)
        if peer is None:
            raise IkeRefused(f"peer {name} is not keyed by IKE on this CE", name)
        if not self.charon.running:
            raise IkeRefused("the IKE daemon is not running: it is being restarted", name)
        self._cancel(name)
        self._resetting.add(name)
        try:
            await asyncio.to_thread(self.charon.terminate, ike=name)
        except CharonError as exc:
            if "no matching" not in str(exc).lower():  # nothing to delete is fine
                self._resetting.discard(name)
                raise IkeRefused(f"charon could not delete the SAs: {exc}", name) from None
        except OSError as exc:
            self._resetting.discard(name)
            raise IkeRefused(f"charon is unreachable: {exc}", name) from None
        health = self.health[name]
        if health.status == "up" and health.down(utc_now(), RESET_REASON):
            self._announce_down(name, RESET_REASON)
        await self._initiate(name)

    def _leader(self, peer: IkePeer) -> bool:
        local, remote = ipaddress.ip_address(peer.local), ipaddress.ip_address(peer.remote)
        return (local.version, int(local)) < (remote.version, int(remote))

    def _arm(self, name: str) -> None:
        """Start (or wait for) establishment of a just loaded peer.  Even the leader looks
        before it initiates: the peer may have been negotiating with this CE for a while
        (its attempts refused until now), and its next IKE_SA_INIT may be under way."""
        peer = self.peers.get(name)
        if peer is None:
            return
        self.health[name].idle(utc_now())
        if peer.permanent:
            self._later(name, self._first_delay(peer), self._queue_attempt)

    def _first_delay(self, peer: IkePeer) -> float:
        return 0.0 if self._leader(peer) else FOLLOWER_DELAY

    def _later(self, name: str, delay: float, action: Callable[[str], Any]) -> None:
        self._cancel(name)
        assert self._loop is not None

        def fire() -> None:
            self._timers.pop(name, None)
            self._spawn(action(name))

        self._timers[name] = self._loop.call_later(delay, fire)

    def _cancel(self, name: str) -> None:
        timer = self._timers.pop(name, None)
        if timer is not None:
            timer.cancel()

    def _spawn(self, coro: Any) -> None:
        if not asyncio.iscoroutine(coro):
            return
        assert self._loop is not None
        task = self._loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _queue_attempt(self, name: str) -> None:
        """An attempt of this peer is due: gathered with the others due in this turn of
        the event loop, so 50 peers loaded at once cost one list-sas, not 50."""
        if not self._due:
            assert self._loop is not None
            self._loop.call_soon(self._attempt_due)
        self._due[name] = None

    def _attempt_due(self) -> None:
        names, self._due = list(self._due), {}
        self._spawn(self._attempt_many(names))

    async def _attempt_many(self, names: list[str]) -> None:
        """One establishment attempt of each of these permanent peers, unless its tunnel
        is up or a negotiation with the peer is already under way (the peer's, even one
        still half-open, which charon lists unnamed, by address only)."""
        names = [name for name in names if name in self.peers]
        if not names or not self.charon.running:
            return
        try:
            sas = await asyncio.to_thread(self.charon.list_sas)
        except (CharonError, OSError) as exc:
            log.debug("listing the SAs: %s", exc)
            return
        half_open = {
            text(sa.get("remote-host"))
            for conn, entries in sas.items()
            if conn not in self.peers
            for sa in entries
            if text(sa.get("state")) in ("CREATED", "CONNECTING")
        }
        due = []
        for name in names:
            peer = self.peers.get(name)
            if peer is None:
                continue
            entries = sas.get(name, [])
            if any(_installed_child(sa) for sa in entries):
                self._came_up(name, entries)
            elif peer.remote in half_open or any(
                text(sa.get("state")) == "CONNECTING" for sa in entries
            ):
                self._later(name, RECHECK, self._queue_attempt)  # one is under way
            else:
                due.append(name)
        await self._initiate_many(due)

    async def _initiate(self, name: str) -> None:
        """Ask charon to negotiate now (its outcome arrives as events)."""
        await self._initiate_many([name])

    async def _initiate_many(self, names: list[str]) -> None:
        """Ask charon to negotiate with each of these peers now, in one thread hop (each
        initiate returns at once; the outcomes arrive as events)."""
        names = [name for name in names if name in self.peers]
        due = []
        for name in names:
            if self.health[name].status == "up":
                continue  # the peer's negotiation completed while this one was being decided
            if self.health[name].attempt(utc_now()):
                self._log_status(name)
            due.append(name)
        if not due or not self.charon.running:
            return
        refused = await asyncio.to_thread(self._initiate_blocking, due)
        for name, message in refused.items():
            self._failed(name, f"charon refused to initiate: {message}")

    def _initiate_blocking(self, names: list[str]) -> dict[str, str]:
        """Plain requests, pipelined: no control-log subscription (three round trips per
        peer instead of one, or none), as the outcome comes as events anyway."""
        requests: list[tuple[str, Mapping[str, Any]]] = [
            ("initiate", {"child": name, "ike": name, "timeout": "-1", "loglevel": "-1"})
            for name in names
        ]
        try:
            answers = self.charon.pipelined(requests)
        except (CharonError, OSError) as exc:
            log.debug("initiating: charon unreachable (%s)", exc)
            return {}
        return {name: error for name, error in zip(names, answers, strict=True) if error}

    async def _rearm_trap(self, name: str) -> None:
        """A traffic-driven peer's back-off ended: put its trap back."""
        peer = self.peers.get(name)
        if peer is None or not self.charon.running:
            return
        with contextlib.suppress(CharonError, OSError):
            await asyncio.to_thread(self.charon.request, "install", {"child": name, "ike": name})
            self._untrapped.discard(name)
        if self.health[name].idle(utc_now()):
            self._log_status(name)

    def _failed(self, name: str, reason: str, late: float = 0.0) -> None:
        """An attempt failed ``late`` seconds ago: the schedule counts from the failure."""
        peer = self.peers.get(name)
        if peer is None:
            return
        health = self.health[name]
        self.failures_total[name] += 1
        now = utc_now() - timedelta(seconds=late)
        outcome = health.failed(now, reason, unprovisioned=reason == NOT_PROVISIONED)
        if outcome is None:
            log.info("IKE with peer %s failed again during the back-off: %s", name, reason)
            return
        next_at = health.next_attempt
        log.warning(
            "IKE with peer %s failed (%d in a row): %s; next attempt in %.0f s",
            name, health.failures, reason, outcome.delay,
        )  # fmt: skip
        self.notify(
            "tunnel-establishment-failed",
            peer=name,
            **{
                "peer-address": peer.remote,
                "reason": reason,
                "retry-count": str(health.failures),
                **({"next-attempt": date_and_time(next_at, "seconds")} if next_at else {}),
            },
        )
        if outcome.raise_alarm:
            self._raise_alarm(name, peer, reason)
        delay = max(0.0, outcome.delay - late)
        if peer.permanent:
            self._later(name, delay, self._queue_attempt)
        else:
            if name not in self._untrapped:
                self._untrapped.add(name)
                self._spawn(self._uninstall_trap(name))
            self._later(name, delay, self._rearm_trap)

    async def _uninstall_trap(self, name: str) -> None:
        with contextlib.suppress(CharonError, OSError):
            await asyncio.to_thread(self.charon.request, "uninstall", {"child": name})

    def _came_up(self, name: str, sas: list[Any]) -> None:
        peer = self.peers.get(name)
        if peer is None:
            return
        self._cancel(name)
        self._resetting.discard(name)
        changed, clear = self.health[name].up(utc_now())
        if changed:
            children = [c for sa in sas for c in _children(sa)]
            child = next((c for c in children if _installed(c)), children[0] if children else {})
            leaves = {"peer-address": peer.remote}
            if "spi-out" in child and "spi-in" in child:
                leaves["outbound-spi"] = str(int(text(child["spi-out"]), 16))
                leaves["inbound-spi"] = str(int(text(child["spi-in"]), 16))
            self.notify("tunnel-up", peer=name, **leaves)
        if clear:
            self._clear_alarm(name)

    async def _check(self, name: str, gone: Any, *, child_only: bool = False) -> None:
        """Something of this peer went down (``gone``: the IKE_SA charon reported, with
        only a CHILD_SA gone if ``child_only``): is any CHILD_SA still installed?"""
        await asyncio.sleep(LOG_SETTLE)  # the log lines that say why may still come
        peer = self.peers.get(name)
        if peer is None or not self.charon.running:
            return
        lines = await asyncio.to_thread(self.charon.lines_of, text(gone.get("uniqueid")))
        reason = self._down_reason(name, gone, child_only, lines)
        try:
            sas = (await asyncio.to_thread(self.charon.list_sas, name)).get(name, [])
        except (CharonError, OSError):
            return
        health = self.health[name]
        if any(_installed_child(sa) for sa in sas):
            if reason == PEER_RESTARTED and health.status == "up":
                # A restarted peer replaced its SAs before DPD could notice: still an
                # outage, reported as one (down, then up with the new SAs).
                health.down(utc_now(), reason)
                self._announce_down(name, reason)
                self._came_up(name, sas)
            return
        if health.status == "up" and health.down(utc_now(), reason):
            self._announce_down(name, reason)
        if peer.permanent:
            if name not in self._timers:
                self._later(name, self._first_delay(peer), self._queue_attempt)
            return
        if any(text(sa.get("state")) == "ESTABLISHED" for sa in sas):
            # A traffic-driven tunnel went idle: delete the IKE_SA too (seed 3.4).
            with contextlib.suppress(CharonError, OSError):
                await asyncio.to_thread(self.charon.terminate, ike=name)
        if name not in self._untrapped and health.idle(utc_now()):
            self._log_status(name)

    async def _expect_child(self, name: str, unique_id: str) -> None:
        """The IKE_SA ``unique_id`` this CE initiated came up: without a CHILD_SA soon,
        the attempt failed after all.  Only that IKE_SA is judged: by then the peer may
        have been removed and configured again, with a new attempt of its own under way."""
        await asyncio.sleep(CHILD_GRACE)
        peer = self.peers.get(name)
        if peer is None or not self.charon.running or self.health[name].status == "up":
            return
        try:
            sas = (await asyncio.to_thread(self.charon.list_sas, name)).get(name, [])
        except (CharonError, OSError):
            return
        if any(_installed_child(sa) for sa in sas):
            self._came_up(name, sas)
            return
        mine = [
            sa
            for sa in sas
            if text(sa.get("uniqueid")) == unique_id and text(sa.get("state")) == "ESTABLISHED"
        ]
        if not mine:
            return
        messages = await asyncio.to_thread(self.charon.lines_of, unique_id)
        reason = failure_reason(messages)
        if reason.startswith("the negotiation failed"):
            reason = "the IKE_SA came up but the CHILD_SA was not established"
        with contextlib.suppress(CharonError, OSError):
            await asyncio.to_thread(self.charon.terminate, ike_id=unique_id)
        self._failed(name, reason)

    # -- events ------------------------------------------------------------------

    def _deliver(self, kind: str, message: Any) -> None:
        """From the event thread: hand over to the event loop."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._on_event, kind, message)

    def _on_event(self, kind: str, message: Any) -> None:
        if kind == "ike-rekey":
            self._ike_rekeyed(message)
            return
        if kind not in ("ike-updown", "child-updown"):
            return
        up = _flag(message.get("up"))
        for conn, sa in message.items():
            name = text(conn)
            if name == "up" or name not in self.peers:
                continue
            ids = self._ike_up.setdefault(name, set())
            if kind == "child-updown":
                if up:
                    self._came_up(name, [sa])
                    if len(ids) > 1:
                        self._dedupe_soon(name)
                else:
                    self._spawn(self._check(name, sa, child_only=True))
            elif up:
                ids.add(text(sa.get("uniqueid")))
                if _flag(sa.get("initiator")):
                    self._spawn(self._expect_child(name, text(sa.get("uniqueid"))))
            else:
                ids.discard(text(sa.get("uniqueid")))
                if text(sa.get("state")) == "CONNECTING":
                    self._spawn(self._attempt_failed(name, sa))
                else:
                    self._spawn(self._check(name, sa))

    def _ike_rekeyed(self, message: Any) -> None:
        """An IKE_SA rekey replaces the IKE_SA without up/down events: follow its id."""
        for conn, entry in message.items():
            name = text(conn)
            if name not in self.peers or not isinstance(entry, Mapping):
                continue
            ids = self._ike_up.setdefault(name, set())
            old, new = entry.get("old"), entry.get("new")
            if isinstance(old, Mapping):
                ids.discard(text(old.get("uniqueid")))
            if isinstance(new, Mapping):
                ids.add(text(new.get("uniqueid")))

    def _dedupe_soon(self, name: str) -> None:
        if name not in self._deduping:
            self._deduping.add(name)
            self._spawn(self._dedupe(name))

    async def _dedupe(self, name: str) -> None:
        """The peer has two IKE_SAs up: delete those of them this end must delete."""
        try:
            peer = self.peers.get(name)
            if peer is None or not self.charon.running:
                return
            try:
                sas = (await asyncio.to_thread(self.charon.list_sas, name)).get(name, [])
            except (CharonError, OSError):
                return
            self._ike_up[name] = {
                text(sa.get("uniqueid")) for sa in sas if text(sa.get("state")) == "ESTABLISHED"
            }
            for unique_id in to_delete(sas, self._leader(peer)):
                log.info(
                    "peer %s: both ends negotiated at once; deleting the duplicate IKE_SA %s "
                    "this CE initiated (one tunnel, one IKE_SA)",
                    name, unique_id,
                )  # fmt: skip
                with contextlib.suppress(CharonError, OSError):
                    await asyncio.to_thread(self.charon.terminate, ike_id=unique_id)
        finally:
            self._deduping.discard(name)

    async def _attempt_failed(self, name: str, sa: Any) -> None:
        await asyncio.sleep(LOG_SETTLE)  # charon's log lines for it may still come
        if name not in self.peers:
            return
        lines = await asyncio.to_thread(self.charon.lines_of, text(sa.get("uniqueid")))
        reason = failure_reason(lines)
        if name not in self.peers:
            return
        if _flag(sa.get("initiator")):
            self._failed(name, reason, late=LOG_SETTLE)
        else:
            self.health[name].peer_failed(utc_now(), f"the peer's attempt failed: {reason}")

    def _down_reason(self, name: str, sa: Any, child_only: bool, messages: list[str]) -> str:
        if name in self._resetting:
            self._resetting.discard(name)
            return RESET_REASON
        joined = " ".join(messages[-4:]).lower()
        peer = self.peers[name]
        if "initial_contact" in joined:
            return PEER_RESTARTED
        if not peer.permanent and child_only and text(sa.get("state")) == "ESTABLISHED":
            # Only the CHILD_SA of a live IKE_SA went: the idle timer of one end or the
            # other (both have the same), since nothing else deletes it alone.
            return f"idle for {peer.idle_timeout} s (traffic-driven)"
        if "retransmit" in joined or "giving up" in joined:
            return "dead peer detection: the peer stopped answering"
        if "received delete" in joined:
            return "the peer deleted the SAs"
        return "the SAs were deleted"

    # -- alarms and notifications ----------------------------------------------

    def _raise_alarm(self, name: str, peer: IkePeer, reason: str) -> None:
        words = (
            f"IKE with peer {name} ({peer.remote}) has failed {self.health[name].failures} "
            f"times and the retries reached their limit of {self.policy.limit:.0f} s: "
            f"{reason}.  Retries go on every {self.policy.limit:.0f} s; human action is "
            "needed (seed 3.4)."
        )
        self.alarms.raise_alarm(ALARM_TYPE, name, "major", words)

    def _clear_alarm(self, name: str) -> None:
        """The tunnel came up, or the peer was removed: the alarm has no object any more."""
        self.alarms.clear(ALARM_TYPE, name)

    def _announce_down(self, name: str, reason: str) -> None:
        peer = self.peers.get(name) or self.loaded.get(name)
        if peer is None:
            return
        self.notify("tunnel-down", peer=name, **{"peer-address": peer.remote, "reason": reason})

    def _log_status(self, name: str) -> None:
        """Status changes without an SA event (armed, retrying) are visible in <get> only."""
        log.debug("peer %s: %s", name, self.health[name].status)


def _children(sa: Mapping[Any, Any]) -> list[Mapping[Any, Any]]:
    children = sa.get("child-sas", {})
    return list(children.values()) if isinstance(children, Mapping) else []


def _installed(child: Mapping[Any, Any]) -> bool:
    return text(child.get("state")) == "INSTALLED"


def _installed_child(sa: Mapping[Any, Any]) -> bool:
    return text(sa.get("state")) == "ESTABLISHED" and any(_installed(c) for c in _children(sa))
