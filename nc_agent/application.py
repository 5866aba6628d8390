"""The CE agent: its cevpn-ce datastore, made real in the kernel and in strongSwan's charon.

Every commit of the running configuration is one transaction (nc_core):
- validate: the configuration must be realisable (known transforms, the
  certificate material an IKE peer needs, the CE's SP address);
- prepare: each new peer gets a reqid (its mark and device name follow);
- apply: the kernel moves from the old state to the new one, fail-closed and
  all-or-nothing, then the edge (ingress policy, Internet gateway, routing
  daemon: nc_agent.edge), then charon is given the IKE peers
  (nc_agent.ike.manager): three steps driven, and undone, by one loop
  (nc_agent.apply_steps); a refusal by any answers an rpc-error naming the
  peer and the reason, what was changed is moved back, and the datastore
  stays as it was;
- abort: new reqids are released.
At start-up the same code reconciles: whatever the kernel holds of ours is
compared with running, stale objects are removed and missing ones added, so
a kill -9 in the middle of an apply converges on restart.

A rekey of IKE-less SAs keeps the replaced inbound SA for the peer's
rekey-grace seconds, so packets the peer sent with it still arrive.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lxml import etree

from nc_agent.alarms import (
    CERTIFICATE_EXPIRY,
    AlarmList,
    certificate_alarms,
    next_certificate_check,
)
from nc_agent.allocations import Allocations
from nc_agent.apply_steps import EdgeStep, IkeStep, KernelStep, Step, StepRefused, move
from nc_agent.bootstrap import CLIENT_KEY_FILE
from nc_agent.call_home import CallHomeSettings, call_home_settings
from nc_agent.dataplane.xfrm import OWNED_REQIDS, SAKey, SAState, XfrmEvents
from nc_agent.desired import ConfigProblem, Desired, PeerObjects, compile_desired
from nc_agent.edge import Edge
from nc_agent.ike.charon import Charon, CharonError
from nc_agent.ike.manager import IkeManager, IkeRefused
from nc_agent.kernel import Kernel, Observed, sa_key
from nc_agent.own_key import OWN_KEY_FILE, certifies_own_key
from nc_agent.pull import Puller, UnknownPeerWatch
from nc_agent.routing.bird import RoutingError
from nc_core.call_home import CallHomeDialer
from nc_core.errors import RpcError
from nc_core.notifications import date_and_time, now
from nc_core.schema import CE_MODULES
from nc_core.transaction import Application, Transaction, tree_json
from nc_core.xmlutil import default_ns_element

if TYPE_CHECKING:
    from nc_core.server import NetconfServer
    from nc_core.session import Session

CERTIFICATE_RECHECK = 86400.0
"""Seconds between two looks at the certificates' dates at most (the clock may jump)."""

log = logging.getLogger("cevpn.agent")
CE_NS = "urn:cevpn:yang:cevpn-ce"
TYPES_NS = "urn:cevpn:yang:cevpn-types"
CERTIFICATES = "/cevpn-ce:ce/certificates"
PRE_CONFIGURATION = "/cevpn-ce:ce/pre-configuration"
CONFIGURATION_VERSION = "/cevpn-ce:ce/configuration-version"


def _q(name: str) -> str:
    return f"{{{CE_NS}}}{name}"


def _now() -> str:
    return date_and_time(now(), "seconds")


def _leaf(parent: etree._Element, name: str, value: str) -> etree._Element:
    """A cevpn-ce leaf; an identity value 'cevpn-types:x' gets its namespace declared."""
    if value.startswith("cevpn-types:"):
        element = etree.SubElement(parent, _q(name), nsmap={"cevpn-types": TYPES_NS})
    else:
        element = etree.SubElement(parent, _q(name))
    element.text = value
    return element


def _peer_path(peer: str | None) -> tuple[str | None, dict[str, str]]:
    if peer is None:
        return None, {}
    return f"/cevpn-ce:ce/cevpn-ce:peer[cevpn-ce:name='{peer}']", {"cevpn-ce": CE_NS}


class AgentApplication(Application):
    modules = CE_MODULES

    def __init__(
        self,
        state_dir: Path,
        vpn_netns: str | None,
        sp_netns: str | None = None,
        *,
        dataplane: str = "kernel",
        follow_management_port: bool = False,
    ) -> None:
        self.state_dir = state_dir
        self.vpn_netns = vpn_netns
        self.sp_netns = sp_netns
        self.dataplane = dataplane
        """'kernel', or 'none': NETCONF and datastore only, for controller scale tests."""
        self.follow_management_port = follow_management_port
        """Listen on pre-configuration/management/port (an enrolled CE), moving with it."""
        self.puller: Puller | None = None
        self.unknown_peers: UnknownPeerWatch | None = None
        self.kernel: Kernel | None = None
        self.allocations: Allocations | None = None
        self.current = Desired()
        self.lingering: dict[SAKey, asyncio.TimerHandle] = {}
        self.since: dict[str, str] = {}
        self.last_error: dict[str, str] = {}
        self.applied_version: str | None = None
        self.events: XfrmEvents | None = None
        self.ike: IkeManager | None = None
        self.edge: Edge | None = None
        self.alarms = AlarmList(self._notify, notify_standard=self._notify_alarm)
        """Every alarm of the CE: IKE's, the configuration fetch's, the certificates'."""
        self._certificate_timer: asyncio.TimerHandle | None = None
        self._dataplane = asyncio.Lock()
        """Held while the kernel and charon are changed: a commit's apply, a reset-tunnel."""
        self.call_home: CallHomeDialer | None = None
        """Dials the VPN server when the pre-configuration says so (RFC 8071)."""
        self._call_home_settings: CallHomeSettings = CallHomeSettings((), 0.0)

    # -- lifecycle -------------------------------------------------------------

    def attach(self, server: NetconfServer) -> None:
        super().attach(server)
        if server.metrics.enabled:
            from nc_agent.metrics import AgentMetrics

            AgentMetrics(self).register(server.metrics)

    def _kernel(self) -> Kernel:
        if self.kernel is None:
            assert self.vpn_netns is not None, "the kernel data plane needs a VPN namespace"
            self.kernel = Kernel(self.vpn_netns, self.sp_netns)
        return self.kernel

    def _ike(self) -> IkeManager:
        if self.ike is None:
            kernel = self._kernel()
            self.ike = IkeManager(
                Charon(self.state_dir, self.sp_netns),
                notify=self._notify,
                flush_kernel=kernel.flush_reqids,
                alarms=self.alarms,
            )
        return self.ike

    def _edge(self) -> Edge:
        if self.edge is None:
            assert self.vpn_netns is not None, "the edge needs a VPN namespace"
            self.edge = Edge(self.state_dir, self.vpn_netns, self.sp_netns)
        return self.edge

    def _listen_port(self) -> int | None:
        listener = getattr(getattr(self, "server", None), "listener", None)
        return None if listener is None else int(listener.port)

    def _own_key_pem(self) -> str | None:
        path = self.state_dir / OWN_KEY_FILE
        return path.read_text() if path.exists() else None

    def _allocations(self) -> Allocations:
        if self.allocations is None:
            self.allocations = Allocations(self.state_dir / "dataplane.json")
        return self.allocations

    @property
    def has_kernel(self) -> bool:
        return self.dataplane == "kernel"

    def _follow_call_home(self, txn: Transaction) -> None:
        """Dial the VPN server's call-home endpoints from now on, if the pre-configuration
        has any (after start-up: the first dial waits for :meth:`started`)."""
        self._call_home_settings = call_home_settings(txn.new_at(PRE_CONFIGURATION) or {})
        if self.call_home is not None:
            settings = self._call_home_settings
            self.call_home.configure(settings.endpoints, settings.max_wait)

    def _start_call_home(self) -> None:
        from nc_core.transport_ssh import call_home

        server = self.server
        self.call_home = CallHomeDialer(lambda endpoint: call_home(server, endpoint))
        settings = self._call_home_settings
        self.call_home.configure(settings.endpoints, settings.max_wait)

    async def started(self) -> None:
        self._start_call_home()
        self.puller = Puller(
            self.server, self.state_dir, self.state_dir / CLIENT_KEY_FILE, alarms=self.alarms
        )
        self.puller.start()
        if self.puller.settings() is not None:
            self.puller.trigger("start-up")
        if not self.has_kernel:
            return
        kernel = self._kernel()
        self.events = kernel.xfrm.events()
        asyncio.get_running_loop().add_reader(self.events.fileno(), self._on_kernel_events)
        self.unknown_peers = UnknownPeerWatch(self.puller.trigger)
        self.unknown_peers.start()
        try:
            await self._ike().start()
        except (CharonError, OSError) as exc:
            log.error("the IKE daemon could not be started: %s", exc)

    async def stopping(self) -> None:
        if self.call_home is not None:
            await self.call_home.close()
        if self.ike is not None:
            await self.ike.stop()
        if self.edge is not None:
            await self.edge.stop()
        if self.puller is not None:
            await self.puller.stop()
        if self.unknown_peers is not None:
            self.unknown_peers.stop()
        if self.events is not None:
            asyncio.get_running_loop().remove_reader(self.events.fileno())
            self.events.close()
        for timer in self.lingering.values():
            timer.cancel()
        if self._certificate_timer is not None:
            self._certificate_timer.cancel()
        if self.kernel is not None:
            self.kernel.close()

    # -- transaction -----------------------------------------------------------

    async def validate(self, txn: Transaction) -> None:
        certs = txn.new_at(CERTIFICATES) or {}
        if certs.get("key-origin") == "ce" and "certificate" in certs:
            if not certifies_own_key(self.state_dir, str(certs["certificate"])):
                raise RpcError(
                    "invalid-value",
                    "The certificate is not for this CE's own key (key-origin 'ce'): the "
                    "agent holds a different key pair, or none.",
                    path="/cevpn-ce:ce/cevpn-ce:certificates/cevpn-ce:certificate",
                    path_ns={"cevpn-ce": CE_NS},
                )
        if not self.has_kernel:
            return  # nothing is realised, so nothing needs to be realisable (_desired)
        config = txn.new_json()
        peers = [p["name"] for p in config.get("cevpn-ce:ce", {}).get("peer", [])]
        provisional = {name: OWNED_REQIDS[i] for i, name in enumerate(peers)}
        try:
            self._desired(config, provisional)
        except ConfigProblem as exc:
            path, ns = _peer_path(exc.peer)
            raise RpcError("invalid-value", str(exc), path=path, path_ns=ns) from None

    async def prepare(self, txn: Transaction) -> None:
        if not self.has_kernel:
            # No data plane: no reqid is ever used, and the whole configuration need not
            # even be printed (a one-peer commit costs the same with 10 or 1,000 peers).
            txn.scratch["fresh"], txn.scratch["desired"] = {}, Desired()
            return
        allocations = self._allocations()
        config = txn.new_json()
        peers = [p["name"] for p in config.get("cevpn-ce:ce", {}).get("peer", [])]
        txn.scratch["fresh"] = allocations.reserve(peers)
        txn.scratch["desired"] = self._desired(config, allocations.reqids)

    def _desired(self, config: Mapping[str, Any], reqids: Mapping[str, int]) -> Desired:
        """What the data plane is to hold.  Without one, nothing: nothing is realised,
        so nothing needs to be realisable (IKE peers' credentials included)."""
        if not self.has_kernel:
            return Desired()
        return compile_desired(config, reqids, own_key_pem=self._own_key_pem())

    async def _follow_port(self, txn: Transaction) -> int | None:
        """Move the listener to the configured management port; the old port, to undo."""
        if not self.follow_management_port:
            return None
        pre = txn.new_at(PRE_CONFIGURATION) or {}
        port = pre.get("management", {}).get("port")
        if port is None:
            return None
        listener = self.server.listener
        if txn.reason == "startup" or listener is None:
            self.server.options.port = int(port)
            return None
        old = listener.port
        if old == int(port):
            return None
        try:
            await listener.move(int(port))
        except OSError as exc:
            raise RpcError(
                "operation-failed",
                f"Cannot listen on management port {port}: {exc}; nothing was changed.",
                path="/cevpn-ce:ce/cevpn-ce:pre-configuration/cevpn-ce:management/cevpn-ce:port",
                path_ns={"cevpn-ce": CE_NS},
            ) from None
        return old

    async def apply(self, txn: Transaction) -> None:
        moved_from = await self._follow_port(txn)
        try:
            async with self._dataplane:
                await self._apply(txn)
        except BaseException:
            if moved_from is not None and self.server.listener is not None:
                await self.server.listener.move(moved_from)
            raise
        self._request_certificate_if_needed(txn)
        self._check_certificates({"certificates": txn.new_at(CERTIFICATES) or {}})
        self._follow_pre_configuration(txn)
        self._follow_call_home(txn)

    def _follow_pre_configuration(self, txn: Transaction) -> None:
        """New server endpoints or timers take effect now, not after the pull interval that
        was running (a fetch with the new settings also shows they work)."""
        if self.puller is None or txn.reason in ("startup", "pull"):
            return
        before = txn.old_at(PRE_CONFIGURATION)
        after = txn.new_at(PRE_CONFIGURATION)
        if before != after and after is not None:
            self.puller.trigger("the pre-configuration changed")

    def _check_certificates(self, config: Mapping[str, Any]) -> None:
        """certificate-expiry alarms for the certificates this configuration uses, now, and
        again when they next change by themselves (a warning starts, a certificate ends)."""
        now = datetime.now(UTC)
        self.alarms.set_exactly(CERTIFICATE_EXPIRY, certificate_alarms(config, now))
        if self._certificate_timer is not None:
            self._certificate_timer.cancel()
            self._certificate_timer = None
        later = next_certificate_check(config, now)
        if later is not None:
            delay = min((later - now).total_seconds() + 1, CERTIFICATE_RECHECK)
            self._certificate_timer = asyncio.get_running_loop().call_later(
                delay, self._recheck_certificates
            )

    def _recheck_certificates(self) -> None:
        self._certificate_timer = None
        running = getattr(self, "server", None)
        if running is None:
            return
        tree = running.datastores["running"].tree
        self._check_certificates(
            tree_json(tree, running.schema.defaults_json()).get("cevpn-ce:ce", {})
        )

    def _request_certificate_if_needed(self, txn: Transaction) -> None:
        """A certificate made for a server-generated key arrived: ask at once for one for
        the CE's own key (the request goes with the next fetch)."""
        certs = txn.new_at(CERTIFICATES) or {}
        if "certificate" not in certs or self.puller is None:
            return
        if certs.get("key-origin") != "ce" and txn.reason != "pull":
            self.puller.trigger("a certificate request for the CE's own key")

    def _steps(self, txn: Transaction, keep: Mapping[SAKey, int]) -> list[Step]:
        """The parts of the CE a commit moves, in order (nc_agent.apply_steps); none
        without a data plane."""
        if not self.has_kernel:
            return []
        startup = txn.reason == "startup"
        held = set(keep)
        return [
            KernelStep(self._kernel(), lambda: set(self.lingering) | held, startup=startup),
            EdgeStep(self._edge(), self._listen_port, startup=startup),
            IkeStep(self._ike()),
        ]

    async def _apply(self, txn: Transaction) -> None:
        new: Desired = txn.scratch["desired"]
        old = self.current
        keep = self._keep_for_grace(old, new)
        try:
            await move(self._steps(txn, keep), old, new, undo=txn.reason != "startup")
        except StepRefused as exc:
            path, ns = _peer_path(exc.peer)
            if exc.peer:
                self.last_error[exc.peer] = exc.reason
            who = f"peer {exc.peer}: " if exc.peer and exc.step == "kernel" else ""
            if exc.step == "edge":
                message = f"{exc.what}: {exc.reason}; nothing was changed."
            else:
                message = f"{exc.what} ({who}{exc.reason}); nothing was changed."
            raise RpcError("operation-failed", message, path=path, path_ns=ns) from None
        for key, grace in keep.items():
            self._linger(key, grace)
        self.current = new
        if self.has_kernel:
            allocations = self._allocations()
            allocations.keep_only(set(new.peers))
            allocations.save()
        self.applied_version = txn.new_at(CONFIGURATION_VERSION)
        self._announce(old, new, txn)

    async def abort(self, txn: Transaction) -> None:
        if self.allocations is not None:
            self.allocations.release(list(txn.scratch.get("fresh", {})))

    # -- rekey grace -----------------------------------------------------------

    def _keep_for_grace(self, old: Desired, new: Desired) -> dict[SAKey, int]:
        """Inbound SAs replaced by a rekey of a peer that stays: keep them a while."""
        keep: dict[SAKey, int] = {}
        for name, before in old.peers.items():
            after = new.peers.get(name)
            if after is None or after.inbound is None or before.inbound is None:
                continue
            if sa_key(after.inbound) != sa_key(before.inbound):
                keep[sa_key(before.inbound)] = after.rekey_grace
        return keep

    def _linger(self, key: SAKey, grace: int) -> None:
        loop = asyncio.get_running_loop()
        previous = self.lingering.pop(key, None)
        if previous is not None:
            previous.cancel()
        self.lingering[key] = loop.call_later(grace, self._expire_lingering, key)

    def _expire_lingering(self, key: SAKey) -> None:
        self.lingering.pop(key, None)
        if self.kernel is not None and key not in {sa_key(s) for s in self.current.sas()}:
            self.kernel.remove_sas([key])

    # -- state and notifications ----------------------------------------------

    def _announce(self, old: Desired, new: Desired, txn: Transaction) -> None:
        stamp = _now()
        for name, peer in new.peers.items():
            if peer.outbound is None or peer.inbound is None:
                continue  # IKE: charon's events say when it is up (nc_agent.ike.manager)
            before = old.peers.get(name)
            if before is None or before.outbound != peer.outbound or before.inbound != peer.inbound:
                self.since[name] = stamp
                self.last_error.pop(name, None)
                self._notify(
                    "tunnel-up",
                    peer=name,
                    **{
                        "peer-address": peer.tunnel.remote,
                        "outbound-spi": str(peer.outbound.spi),
                        "inbound-spi": str(peer.inbound.spi),
                    },
                )
        for name, peer in old.peers.items():
            if name not in new.peers:
                self.since.pop(name, None)
                self._notify(
                    "tunnel-down",
                    peer=name,
                    **{
                        "peer-address": peer.tunnel.remote,
                        "reason": "removed from the configuration",
                    },
                )
        if txn.reason != "startup":
            version = txn.new_at(CONFIGURATION_VERSION) or ""
            self._notify("configuration-updated", version=str(version), source=self._source(txn))

    @staticmethod
    def _source(txn: Transaction) -> str:
        """cevpn-ce configuration-updated/source: who made the change."""
        if txn.reason == "pull":
            return "pull"
        if txn.user == "cevpn-server":
            return "push"
        return "local"

    def _notify(self, name: str, **leaves: str) -> None:
        server = getattr(self, "server", None)
        if server is None:
            return
        event = default_ns_element(CE_NS, name)
        for leaf, value in leaves.items():
            _leaf(event, leaf, value)
        server.notifications.emit(event)

    def _notify_alarm(self, event: etree._Element, alarm: object) -> None:
        """An ietf-alarms alarm-notification (nc_core.alarms)."""
        server = getattr(self, "server", None)
        if server is not None:
            server.notifications.emit(event)

    def _on_kernel_events(self) -> None:
        if self.events is None:
            return
        from nc_agent.dataplane.xfrm import Expire

        try:
            events = self.events.read_events()
        except OSError as exc:
            log.warning("reading XFRM events: %s", exc)
            return
        by_key = {}
        for peer in self.current.peers.values():
            if peer.outbound is not None and peer.inbound is not None:
                by_key[sa_key(peer.outbound)] = (peer, "outbound")
                by_key[sa_key(peer.inbound)] = (peer, "inbound")
        for event in events:
            if not isinstance(event, Expire):
                continue
            found = by_key.get(SAKey(event.sa.dst, event.sa.spi, mark=event.sa.mark))
            if found is None:
                continue
            peer, direction = found
            self._notify(
                "sa-expired",
                peer=peer.name,
                **{
                    "peer-address": peer.tunnel.remote,
                    "spi": str(event.sa.spi),
                    "direction": direction,
                    "hard": "true" if event.hard else "false",
                },
            )
            if event.hard:
                why = f"{direction} SA {event.sa.spi:#x} reached its hard lifetime"
                self.last_error[peer.name] = why
                self.since[peer.name] = _now()
                self._notify(
                    "tunnel-down",
                    peer=peer.name,
                    **{"peer-address": peer.tunnel.remote, "reason": why},
                )

    def _no_data_plane_state(self) -> etree._Element:
        """Each configured peer's state says why there is no tunnel (--dataplane none)."""
        ce = default_ns_element(CE_NS, "ce")
        running = self.server.datastores["running"].root
        for peer in running.iterfind(f"{_q('ce')}/{_q('peer')}"):
            name = peer.findtext(_q("name")) or ""
            entry = etree.SubElement(ce, _q("peer"))
            etree.SubElement(entry, _q("name")).text = name
            state = etree.SubElement(entry, _q("state"))
            etree.SubElement(state, _q("status")).text = "no-data-plane"
            etree.SubElement(
                state, _q("last-error")
            ).text = "this agent runs without a data plane (--dataplane none): no tunnel is built"
        return ce

    def _ce_state(self, routing: etree._Element | None = None) -> etree._Element:
        ce_state = default_ns_element(CE_NS, "ce-state")
        if routing is not None:
            ce_state.append(routing)
        if self.applied_version:
            etree.SubElement(ce_state, _q("applied-version")).text = self.applied_version
        if self.puller is not None and self.puller.last_fetch:
            etree.SubElement(ce_state, _q("last-fetch")).text = self.puller.last_fetch
        if self.puller is not None and self.puller.last_error:
            etree.SubElement(ce_state, _q("last-fetch-error")).text = self.puller.last_error
        if self.alarms:
            alarms = etree.SubElement(ce_state, _q("alarms"))
            for alarm in self.alarms:
                entry = etree.SubElement(alarms, _q("alarm"))
                _leaf(entry, "type", alarm.type)
                _leaf(entry, "resource", alarm.resource)
                _leaf(entry, "severity", alarm.severity)
                _leaf(entry, "raised-at", date_and_time(alarm.raised_at, "seconds"))
                _leaf(entry, "text", alarm.text)
        return ce_state

    def rpc_names(self) -> set[tuple[str, str]]:
        return {(CE_NS, "refresh-configuration"), (CE_NS, "reset-tunnel")}

    async def rpc(self, session: Session, rpc: etree._Element) -> list[etree._Element]:
        if etree.QName(rpc).localname == "reset-tunnel":
            await self.reset_tunnel((rpc.findtext(_q("peer")) or "").strip())
            return []
        if etree.QName(rpc).localname != "refresh-configuration" or self.puller is None:
            return await super().rpc(session, rpc)
        try:
            changed = await self.puller.fetch_and_apply()
        except Exception as exc:
            raise RpcError(
                "operation-failed", f"The configuration could not be fetched: {exc}"
            ) from None
        applied = etree.Element(_q("applied-version"))
        applied.text = self.applied_version or ""
        flag = etree.Element(_q("changed"))
        flag.text = "true" if changed else "false"
        return [applied, flag]

    async def reset_tunnel(self, name: str) -> None:
        """reset-tunnel: the peer's tunnel set up again.

        With IKE, its IKE_SA and CHILD_SAs are deleted and negotiated anew.  Without,
        the inbound SA is installed afresh from the configuration, which resets its
        anti-replay state (what a peer that restarted, its sequence numbers beginning
        again, needs), and whatever of the peer's SAs, policies and device is missing is
        put back.  The outbound SA keeps its sequence numbers: the peer's replay window
        would drop packets numbered from 1 again.  The policies stay throughout, so
        nothing leaves in clear text: a packet that finds no SA is dropped.
        """
        path, ns = _peer_path(name)
        if not self.has_kernel:
            raise RpcError(
                "operation-failed",
                "This agent runs without a data plane (--dataplane none): there is no tunnel "
                "to reset.",
                path=path,
                path_ns=ns,
            )
        peer = self.current.peers.get(name)
        if peer is None:
            raise RpcError(
                "invalid-value", f"There is no peer {name!r} on this CE.", path=path, path_ns=ns
            )
        log.info("reset-tunnel: peer %s", name)
        async with self._dataplane:
            if peer.ike is not None:
                try:
                    await self._ike().reset(name)
                except IkeRefused as exc:
                    raise RpcError(
                        "operation-failed",
                        f"The tunnel could not be reset: {exc}",
                        path=path,
                        path_ns=ns,
                    ) from None
                return
            kernel = self._kernel()
            keys = [sa_key(peer.inbound)] if peer.inbound is not None else []
            await asyncio.to_thread(kernel.remove_sas, keys)
            self._notify("tunnel-down", peer=name, reason="reset by an operator (reset-tunnel)")
            try:
                await asyncio.to_thread(kernel.reconcile, self.current, set(self.lingering))
            except Exception as exc:
                raise RpcError(
                    "operation-failed",
                    f"The SAs were deleted but could not be installed again ({exc}); the next "
                    "commit or restart installs them.",
                    path=path,
                    path_ns=ns,
                ) from None
            self.since[name] = _now()
            spis = {}
            if peer.outbound is not None and peer.inbound is not None:
                spis = {
                    "outbound-spi": str(peer.outbound.spi),
                    "inbound-spi": str(peer.inbound.spi),
                }
            self._notify("tunnel-up", peer=name, **spis)

    async def _routing_state(self) -> tuple[dict[str, str], etree._Element | None]:
        """The OSPF adjacency on each tunnel device, and ce-state/routing (seed 4.3)."""
        if self.edge is None or self.current.routing is None:
            return {}, None
        bird = self.edge.bird
        element = etree.Element(_q("routing"))
        running = bird.running
        _leaf(element, "daemon", "running" if running else "not-running")
        adjacency: dict[str, str] = {}
        if not running:
            return adjacency, element
        try:
            neighbors = await bird.neighbors()
            learned = await bird.routes()
        except RoutingError as exc:
            log.warning("reading the routing daemon's state: %s", exc)
            return adjacency, element
        for neighbor in neighbors:
            adjacency[neighbor.interface] = neighbor.state
            entry = etree.SubElement(element, _q("neighbor"))
            _leaf(entry, "router-id", neighbor.router_id)
            _leaf(entry, "device", neighbor.interface)
            _leaf(entry, "state", neighbor.state)
        for prefix in sorted(set(learned)):
            _leaf(element, "learned-prefix", prefix)
        return adjacency, element

    async def operational(self, session: Session | None) -> list[etree._Element]:
        if not self.has_kernel:
            return [self._no_data_plane_state(), self._ce_state(), self.alarms.standard.state()]
        kernel = self._kernel()
        observed = await asyncio.to_thread(kernel.observe)
        adjacency, routing = await self._routing_state()
        ce = default_ns_element(CE_NS, "ce")
        by_reqid: dict[int, list[SAState]] = {}
        for sa in observed.sas.values():
            by_reqid.setdefault(sa.reqid, []).append(sa)
        for name, peer in self.current.peers.items():
            entry = etree.SubElement(ce, _q("peer"))
            etree.SubElement(entry, _q("name")).text = name
            state = etree.SubElement(entry, _q("state"))
            if peer.tunnel.name in adjacency:
                # Last in the state container, whatever the keying fills in before it.
                late = etree.Element(_q("routing-adjacency"))
                late.text = adjacency[peer.tunnel.name]
            else:
                late = None
            if peer.ike is not None or peer.outbound is None or peer.inbound is None:
                self._ike_state(state, peer, observed, by_reqid.get(peer.reqid, []))
                if late is not None:
                    state.append(late)
                continue
            out_state = observed.sas.get(sa_key(peer.outbound))
            in_state = observed.sas.get(sa_key(peer.inbound))
            tunnel = observed.tunnels.get(peer.tunnel.name)
            up = out_state is not None and in_state is not None and tunnel is not None and tunnel.up
            etree.SubElement(state, _q("status")).text = "up" if up else "down"
            if name in self.since:
                etree.SubElement(state, _q("status-since")).text = self.since[name]
            etree.SubElement(state, _q("device")).text = peer.tunnel.name
            etree.SubElement(state, _q("outbound-spi")).text = str(peer.outbound.spi)
            etree.SubElement(state, _q("inbound-spi")).text = str(peer.inbound.spi)
            if in_state is not None:
                etree.SubElement(state, _q("in-octets")).text = str(in_state.bytes)
                etree.SubElement(state, _q("in-packets")).text = str(in_state.packets)
            if out_state is not None:
                etree.SubElement(state, _q("out-octets")).text = str(out_state.bytes)
                etree.SubElement(state, _q("out-packets")).text = str(out_state.packets)
            if in_state is not None:
                errors = in_state.replay_failures + in_state.integrity_failures
                etree.SubElement(state, _q("in-errors")).text = str(errors)
                if in_state.add_time:
                    moment = datetime.fromtimestamp(in_state.add_time, UTC)
                    etree.SubElement(state, _q("established-at")).text = moment.isoformat(
                        timespec="seconds"
                    ).replace("+00:00", "Z")
            if name in self.last_error:
                etree.SubElement(state, _q("last-error")).text = self.last_error[name]
            if late is not None:
                state.append(late)
        return [ce, self._ce_state(routing), self.alarms.standard.state()]

    def _ike_state(
        self, state: etree._Element, peer: PeerObjects, observed: Observed, mine: list[SAState]
    ) -> None:
        """A peer keyed by IKE: status from charon's events, counters from its kernel SAs
        (``mine``: those with the peer's reqid)."""
        health = self.ike.health.get(peer.name) if self.ike is not None else None
        local = self.current.sp_address
        outbound = max((s for s in mine if s.src == local), key=_newest, default=None)
        inbound = max((s for s in mine if s.dst == local), key=_newest, default=None)
        tunnel = observed.tunnels.get(peer.tunnel.name)
        status = health.status if health is not None else "down"
        if status == "up" and (outbound is None or inbound is None or tunnel is None):
            status = "down"  # charon says up, the kernel disagrees: believe the kernel
        _leaf(state, "status", status)
        if health is not None and health.since is not None:
            _leaf(state, "status-since", date_and_time(health.since, "seconds"))
        _leaf(state, "device", peer.tunnel.name)
        if status == "up" and outbound is not None and inbound is not None:
            _leaf(state, "outbound-spi", str(outbound.spi))
            _leaf(state, "inbound-spi", str(inbound.spi))
            in_octets = sum(s.bytes for s in mine if s.dst == local)
            in_packets = sum(s.packets for s in mine if s.dst == local)
            out_octets = sum(s.bytes for s in mine if s.src == local)
            out_packets = sum(s.packets for s in mine if s.src == local)
            errors = sum(s.replay_failures + s.integrity_failures for s in mine if s.dst == local)
            _leaf(state, "in-octets", str(in_octets))
            _leaf(state, "in-packets", str(in_packets))
            _leaf(state, "out-octets", str(out_octets))
            _leaf(state, "out-packets", str(out_packets))
            _leaf(state, "in-errors", str(errors))
            if health is not None and health.established_at is not None:
                _leaf(state, "established-at", date_and_time(health.established_at, "seconds"))
        if health is None:
            return
        if health.last_error:
            _leaf(state, "last-error", health.last_error)
        if health.last_error_at is not None:
            _leaf(state, "last-error-at", date_and_time(health.last_error_at, "seconds"))
        _leaf(state, "retry-count", str(health.failures))
        if health.next_attempt is not None:
            _leaf(state, "next-attempt", date_and_time(health.next_attempt, "seconds"))


def _newest(sa: SAState) -> int:
    return sa.add_time
