"""The controller (seed 2.3, 3): the VPN database's meaning, and the decisions it implies.

It holds the service state between commits (every VPN with its compiled CE
configurations, every site and where its CE is) and decides what follows
from a change:

- a commit: every VPN that changed is checked and compiled
  (nc_server.compiler); a VPN that cannot be realised (one security strength,
  seed 7) is refused with a precise rpc-error and nothing changes.  Once
  applied, the compiled configurations become the CEs' targets; the CEs whose
  configuration changed are provisioned according to the VPN's
  autodiscovery mode (seed 3.5): push (nc_server.provisioning edits the CE),
  pull (the CE fetches, nothing to do here) or notify-then-pull (a
  notification to that CE's account only, which then fetches);
- sites deleted from the database are removed from their CE first
  (``deprovision``) or only from the database (``database-only``, seed 3.6):
  the CE is then told at its next fetch that it is no longer part of a VPN;
- the operations: enrolment, a CE's fetch, certification of a CE's own key,
  resynchronisation, audit, key rotation, site removal;
- IKE-less rekeys (nc_server.rekey says when; this says what).

It reaches the NETCONF engine only through :class:`Engine`, and speaks in
records, not XML: the northbound adapter (nc_server.northbound) translates.
Anything else that learns of a CE (a connection a CE opens by itself, for
instance) tells the controller through the same methods the adapter uses
(:meth:`Controller.ce_reachable`).

Key material (PSKs, the VPN's CA and CE certificates, IKE-less SAs) lives in
the server's key store, never in a datastore: nobody but the server reads it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from lxml import etree

from nc_core import faults
from nc_core.errors import RpcError, RpcErrors
from nc_core.transaction import Transaction
from nc_core.users import replace_user
from nc_server.call_home import CallHomeDesk
from nc_server.ce_config import CeCodec, differences
from nc_server.compiler import CeConfig, CompileError, VpnCompiler, diff_configs
from nc_server.enrolment import CE_GROUP, Bundle, ce_username, make_bundle
from nc_server.keystore import KeyStore
from nc_server.provisioner import CeRecord, Provisioner, now_text
from nc_server.provisioning import ProvisioningJobs, Target
from nc_server.rekey import RekeyPlan, RekeyScheduler
from nc_server.service_rules import (
    MAX_REPORTED,
    check_sites_unique,
    check_vpn,
    site_path,
    vpn_path,
)
from nc_server.service_tree import (
    SVC,
    SVC_NS,
    SiteView,
    VpnState,
    compiled_part,
    delete_site,
    set_host_key,
    site_views,
)
from nc_server.southbound import CeRefused, CeUnreachable
from nc_server.storage import Storage

if TYPE_CHECKING:
    from nc_core.session import Session
    from nc_server.shared_contacts import ContactTeller
    from nc_server.shared_keys import KeyJournal, Rows
    from nc_server.storage_postgresql import PostgresStorage

log = logging.getLogger("cevpn.server")

STRENGTH_BITS = {
    "cevpn-types:strength-80": 80,
    "cevpn-types:strength-112": 112,
    "cevpn-types:strength-128": 128,
    "cevpn-types:strength-192": 192,
    "cevpn-types:strength-256": 256,
}
REMOVED = "removed-site"
"""Storage table of the CE accounts whose site was removed: their fetch is answered
'site-removed' (seed 3.6) rather than 'unknown-site'."""


class Engine(Protocol):
    """What the controller needs of the NETCONF engine, and all it may use of it.

    The northbound adapter implements it over nc_core; a test may implement it
    with a few lines.  ``on_behalf_of`` is the engine's own session object,
    passed back untouched so that the engine checks the caller's access.
    """

    async def edit_running(
        self,
        edit: Callable[[etree._Element], None],
        *,
        reason: str,
        on_behalf_of: Session | None,
    ) -> None:
        """Change the running datastore as one commit (the controller's transaction
        hooks run on it like on any other)."""

    def yang_default(self, path: str) -> Any:
        """The YANG default of a schema node (None: it has none)."""

    def groups_of(self, user: str) -> frozenset[str]:
        """The NACM groups an account is in."""

    def host_key(self) -> str:
        """The server's SSH host key, one OpenSSH line, for a CE to pin."""

    def provisioning_status_changed(self, rec: CeRecord, previous: str, error: str | None) -> None:
        """Notify whoever may read the site."""

    def configuration_available(self, vpn: str, site: str, version: str) -> None:
        """Notify the site's CE (its account only) that it should fetch."""

    def site_removed(self, vpn: str, site: str) -> None:
        """A site left the VPN database (its alarms clear)."""

    def still_unreachable(self, rec: CeRecord, error: str | None) -> None:
        """Another attempt to reach an unreachable CE failed (alarms)."""

    def tunnel_statuses(self, vpn: str, site: str, statuses: Mapping[str, str]) -> None:
        """A CE's tunnels' status, as it reported them (alarms)."""

    def tunnel_event(self, vpn: str, site: str, event: str, peer: str, reason: str | None) -> None:
        """A CE notified a tunnel event (alarms)."""


@dataclass
class Validated:
    """A service configuration that passed the controller's validation: what apply
    installs."""

    vpns: dict[str, VpnState]
    server: dict[str, Any]
    """The /vpn-service/server container."""


@dataclass
class Fetched:
    """A CE's configuration as fetch-ce-configuration answers it."""

    site: str
    version: str
    config: dict[str, Any]
    for_the_ce: bool
    """False: an operator asked, who must not see key material."""
    unchanged: bool = False
    """The caller said it runs this version already: the configuration is not sent (a
    periodic fetch of a 1,000-peer CE would otherwise move a megabyte for nothing)."""
    being_pushed: bool = False
    """The caller lets a push bring it the version (defer-to-push) and this server is
    pushing it now: the configuration is not sent."""


@dataclass
class AuditResult:
    """One CE's running configuration compared with what the server would push."""

    vpn: str
    site: str
    outcome: str
    """'in-sync', 'differs', 'repaired' or 'unreachable'."""
    differences: list[str] = field(default_factory=list)
    """The paths that differ (never values)."""


class Controller:
    """The service state and every decision made on it (see the module's docstring)."""

    def __init__(self, storage: Storage, state_dir: Path, *, provisioning: bool = True) -> None:
        self.storage = storage
        self.engine: Engine | None = None
        """Set by the northbound adapter once the engine exists."""
        self.keys = KeyStore(storage)
        self.codec = CeCodec()
        self.compilers: dict[str, VpnCompiler] = {}
        self.vpns: dict[str, VpnState] = {}
        self.sites: dict[str, SiteView] = {}
        self.server_settings: dict[str, Any] = {}
        self.removal_override: dict[str, str] = {}
        """remove-site's mode for a site, until the commit deleting it is applied."""
        self.compile_seconds = 0.0
        self.jobs = ProvisioningJobs(
            storage,
            state_dir,
            self.codec,
            enabled=provisioning,
            target_of=self._target_of,
            on_applied=self._receiver_applied,
            on_status=self._status_changed,
            on_deprovisioned=self._deprovisioned,
            on_retry_failed=self._still_unreachable,
            tunnel_watch=self,
        )
        self.rekeys = RekeyScheduler(
            self.keys,
            self._rekey_plans,
            self._begin_rekey,
            leads=lambda: self.jobs.ownership.leads(),
        )
        self._contacts: ContactTeller | None = None
        """With several servers: how the owner of a CE that logged in here is told."""
        self._validating = False
        """A commit is being validated: the key material it makes reaches the other servers
        with the commit itself, not as news (nc_server.shared_keys)."""
        self.key_journal: KeyJournal | None = None
        """With several servers: the key material rows this server's commits made, and
        those of the commits it adopts (nc_server.shared_keys)."""
        self.call_home = CallHomeDesk(self.jobs, self.ce_reachable)
        """CEs behind a NAT that dial in (RFC 8071)."""

    def _engine(self) -> Engine:
        assert self.engine is not None, "the controller is not attached to an engine"
        return self.engine

    @property
    def provisioner(self) -> Provisioner:
        return self.jobs.provisioner

    # -- a commit ------------------------------------------------------------------

    def _compile(self, vpn: dict[str, Any], *, dry: bool = False) -> dict[str, CeConfig]:
        """The VPN's CE configurations.  ``dry``: for a configuration that is only being
        validated (<validate>, test-only, `cevpn-server validate`): key material it needs
        is made but not kept, and the incremental compiler's cache is left alone."""
        vid = str(vpn["id"])
        profile = vpn.get("security-profile", {})
        started = time.perf_counter()
        with self.keys.dry_run() if dry else self.keys.batch():
            try:
                self.keys.set_vpn_profile(
                    vid,
                    STRENGTH_BITS[str(profile["minimum-strength"])],
                    int(profile["certificate-lifetime"]),
                )
                if dry:
                    compiler = VpnCompiler(self.keys)
                else:
                    compiler = self.compilers.get(vid) or VpnCompiler(self.keys)
                    self.compilers[vid] = compiler
                faults.point("compile", vid)
                return compiler.compile(vpn)
            finally:
                self.compile_seconds += time.perf_counter() - started

    def validate(self, txn: Transaction) -> Validated:
        """Service rules, then compilation, of every VPN that changed: what a commit, a
        <validate>, a test-only edit and `cevpn-server validate` are all refused for
        (RpcErrors, at most MAX_REPORTED)."""
        self._validating = True
        try:
            return self._validate(txn)
        finally:
            self._validating = False

    def _validate(self, txn: Transaction) -> Validated:
        new = txn.new_json().get(SVC, {})
        old_vpns = {v["id"]: v for v in txn.old_json().get(SVC, {}).get("vpn", [])}
        compiled: dict[str, VpnState] = {}
        # Across VPNs, so over every VPN whatever changed: one pass over all sites.
        errors: list[RpcError] = [d.rpc_error() for d in check_sites_unique(new.get("vpn", []))]
        for vpn in new.get("vpn", []):
            vid = str(vpn["id"])
            known = self.vpns.get(vid)
            if (
                known is not None
                and txn.reason != "startup"
                and compiled_part(old_vpns.get(vid)) == compiled_part(vpn)
            ):
                # Only where CEs are managed changed (enrolment, a new port): same configs.
                compiled[vid] = VpnState(vpn, known.compiled)
                continue
            violations = check_vpn(vpn)
            if violations:
                errors.extend(v.rpc_error() for v in violations)
                continue
            if txn.reason == "replicated":
                # Another server committed and compiled this running, making any key
                # material it needed: compile with that material (read again: the rows its
                # commits wrote, or the whole VPN if they are not known; only the pairs
                # that differ are compiled again), never with new material of this
                # server's, or the two would push different keys to the CEs they own.
                rows = None if self.key_journal is None else self.key_journal.rows_for(vid)
                if rows is None:
                    self.keys.reload_vpn(vid)
                elif rows:
                    self.keys.reload_rows(vid, rows)
            try:
                configs = self._compile(vpn, dry=txn.dry_run)
            except CompileError as exc:
                path = vpn_path(vid) if not exc.site else site_path(vid, exc.site)
                errors.append(
                    RpcError("invalid-value", str(exc), path=path, path_ns={"cevpn-svc": SVC_NS})
                )
                continue
            except Exception as exc:
                # A fault of the compiler itself must never reach a CE: the commit is
                # refused and running stays as it was.
                log.exception("compiling VPN %s failed", vid)
                errors.append(
                    RpcError(
                        "operation-failed",
                        f"VPN {vid!r} could not be compiled into its CEs' configurations "
                        f"({type(exc).__name__}); nothing was changed.  The server log has "
                        "the details.",
                        path=vpn_path(vid),
                        path_ns={"cevpn-svc": SVC_NS},
                    )
                )
                continue
            compiled[vid] = VpnState(vpn, configs)
        if errors:
            raise RpcErrors(errors[:MAX_REPORTED])
        return Validated(compiled, new.get("server", {}))

    async def listen_for_calls(self, validated: Validated, host: str, *, startup: bool) -> None:
        """Accept call-home connections as the validated configuration says, on ``host``.
        Runs before :meth:`apply`, as the one step of a commit that can fail: a port that
        cannot be listened on refuses the commit (at start-up it is logged, the rest runs)."""
        settings = validated.server.get("call-home")
        try:
            await self.call_home.listen(settings, host)
        except OSError as exc:
            assert settings is not None
            message = f"Cannot accept call-home connections on port {settings['port']}: {exc}"
            if startup:
                log.error("%s", message)
                return
            raise RpcError(
                "operation-failed",
                f"{message}; nothing was changed.",
                path="/cevpn-svc:vpn-service/cevpn-svc:server/cevpn-svc:call-home/cevpn-svc:port",
                path_ns={"cevpn-svc": SVC_NS},
            ) from None

    def apply(self, validated: Validated, *, startup: bool) -> None:
        """The validated configuration is the database now; provisioning follows once the
        commit is done (the transaction must not wait on CEs)."""
        old_vpns = self.vpns
        old_sites = self.sites
        self.vpns = validated.vpns
        self.server_settings = validated.server
        self.jobs.configure(self.server_settings)
        self.sites = site_views(self.vpns)
        self.call_home.learn(self.sites)
        for vid in set(old_vpns) - set(self.vpns):
            self.compilers.pop(vid, None)
        loop = asyncio.get_running_loop()
        loop.call_soon(self._after_commit, old_vpns, old_sites, startup)

    def _after_commit(
        self, old_vpns: Mapping[str, VpnState], old_sites: Mapping[str, SiteView], startup: bool
    ) -> None:
        """The database changed: start provisioning what must follow."""
        self.rekeys.changed()  # VPNs, their keying or their rekey intervals may differ
        prov = self.jobs.provisioner
        for site, view in old_sites.items():
            if site not in self.sites or self.sites[site].vpn != view.vpn:
                self._site_removed(view)
        for vid, state in self.vpns.items():
            before = old_vpns.get(vid)
            changed = diff_configs(before.compiled if before else {}, state.compiled)
            for site, config in state.compiled.items():
                rec = prov.record(vid, site)
                rec.target_version = config.version
                rec.peer_count = len(config.config.get("peer", []))
                if startup:
                    rec.applied_version = self.jobs.applied.get(site).version
                moved = old_sites.get(site) != self.sites[site]  # enrolled, new address...
                if site in changed or startup or moved:
                    self._target_changed(self.sites[site], rec)
        if startup:
            self.jobs.resume_removals()

    def _target_changed(self, view: SiteView, rec: CeRecord) -> None:
        """The CE's target or where it is changed: say where it stands and, by the VPN's
        autodiscovery mode, push or tell it to fetch."""
        prov = self.jobs.provisioner
        if not view.host_keys:
            prov.set_status(rec, "not-enrolled")
            return
        ours = self.jobs.ownership.epoch(view.site) is not None
        if not ours and self.jobs.ownership.shared:
            # Another server provisions it: what it recorded is the best this one knows.
            rec.applied_version = self.jobs.applied.reread(view.site).version
        applied_port = self.jobs.applied.get(view.site).port or view.management_port
        if rec.applied_version == rec.target_version and applied_port == view.management_port:
            prov.set_status(rec, "in-sync")
            return
        prov.set_status(rec, "pending")
        if view.autodiscovery == "push":
            if ours:
                prov.want(view.site)
            else:
                self.jobs.ownership.defer(view.site)  # pushed if it proves this server's
        elif view.autodiscovery == "notify-then-pull":
            self._engine().configuration_available(view.vpn, view.site, rec.target_version or "")

    def _recompile(self, vid: str) -> None:
        """Key material of the VPN changed (rekey, rotation, a certified CE key): its CEs'
        configurations are compiled again and the ones that changed provisioned."""
        self.rekeys.changed()  # SAs may have been made, replaced or promoted
        state = self.vpns.get(vid)
        if state is None:
            return
        try:
            configs = self._compile(state.vpn)
        except CompileError as exc:
            log.error("recompiling VPN %s: %s", vid, exc)
            return
        changed = diff_configs(state.compiled, configs)
        state.compiled = configs
        prov = self.jobs.provisioner
        for site in changed:
            if site in configs and site in self.sites:
                rec = prov.record(vid, site)
                rec.target_version = configs[site].version
                self._target_changed(self.sites[site], rec)

    # -- what provisioning hears back ------------------------------------------------

    def _target_of(self, rec: CeRecord) -> Target | None:
        view = self.sites.get(rec.site)
        state = self.vpns.get(rec.vpn)
        if view is None or state is None or rec.site not in state.compiled:
            return None
        return Target(view, state.compiled[rec.site])

    def _receiver_applied(self, rec: CeRecord, applied: CeConfig) -> None:
        """A CE runs a configuration: the IKE-less SAs it now receives with may be used by
        their senders (inbound first, then outbound).  Only the inbound SPIs of that very
        configuration count, in case a rekey began after it was compiled."""
        if not self.keys.awaits_receiver(rec.vpn, rec.site):
            return  # the usual case: listing the SPIs costs O(peers) per CE, O(CEs^2) in all
        installed = {
            int(peer["ikeless"]["inbound"]["spi"])
            for peer in applied.config.get("peer", [])
            if "ikeless" in peer
        }
        if not installed:
            return
        promoted = self.keys.receiver_applied(rec.vpn, rec.site, installed)
        if promoted:
            asyncio.get_running_loop().call_soon(self._recompile, rec.vpn)

    # -- ownership of the CEs (several servers on one database) -------------------------

    def share_ownership(self, storage: PostgresStorage, name: str) -> None:
        """Several servers share the database: each CE is provisioned by one of them."""
        from nc_server.ownership import SharedOwnership

        if not self.jobs.enabled:
            return  # offline: no CE is touched, nothing to own
        from nc_server.shared_keys import KeyJournal

        self.key_journal = KeyJournal()
        self.keys.written = lambda rows: self._announce_keys(storage, name, rows)
        from nc_server.shared_contacts import ContactTeller

        self._contacts = ContactTeller(name, storage.notify)
        self.jobs.ownership = SharedOwnership(
            storage,
            name,
            known_sites=lambda: set(self.sites) | self.jobs.removals(),
            busy=lambda: set(self.jobs.in_flight),
            changed=self._ownership_changed,
            call_home=lambda: {site for site, view in self.sites.items() if view.call_home},
            holding=self.jobs.southbound.called_sites,
        )

    def _announce_keys(
        self, storage: PostgresStorage, name: str, rows: frozenset[tuple[str, str]]
    ) -> None:
        """Key material is being written (inside its transaction): the other servers hear
        of it when it commits, or, made by a commit's compile, read it when they adopt
        that commit (nc_server.shared_keys.KeyJournal)."""
        from nc_server.shared_keys import CHANNEL, KeyNews, vpn_of

        if self._validating:
            assert self.key_journal is not None
            self.key_journal.wrote(rows)
        else:
            vpns = frozenset(vpn_of(key) for _, key in rows)
            storage.notify(CHANNEL, KeyNews(name, vpns, rows).payload())

    def keys_changed_elsewhere(self, changes: Mapping[str, Rows] | None) -> None:
        """Another server changed key material between commits: these rows of these VPNs
        (None for a VPN: any row; None: any VPN may have changed).  Read it again, compile
        what differs and provision it to this server's CEs (nc_server.shared_keys)."""
        vids = self.vpns.keys() if changes is None else changes.keys() & self.vpns.keys()
        for vid in sorted(vids):
            rows = None if changes is None else changes[vid]
            if self.keys.reload_vpn(vid) if rows is None else self.keys.reload_rows(vid, rows):
                log.info("VPN %s: key material changed by another server", vid)
                self._recompile(vid)
        self.rekeys.changed()

    def _ownership_changed(self, gained: set[str], lost: set[str]) -> None:
        """CEs became this server's (taken over, handed over, new) or another's."""
        if not self.jobs.enabled:
            return
        prov = self.jobs.provisioner
        for site in sorted(lost):
            self.jobs.release(site)
        for site in sorted(gained):
            view = self.sites.get(site)
            if view is None:
                if site in self.jobs.removals():
                    prov.want(site)  # a removed site's CE still to clean
                continue
            state = self.vpns.get(view.vpn)
            if state is None or site not in state.compiled:
                continue
            rec = prov.record(view.vpn, site)
            rec.target_version = state.compiled[site].version
            # What the previous owner recorded (or nothing: then a full resynchronisation).
            rec.applied_version = self.jobs.applied.reread(site).version
            self._target_changed(view, rec)
        if gained or lost:
            log.info(
                "ownership: this server now provisions %d CE(s) (%d gained, %d lost)",
                sum(1 for s in self.sites if self.jobs.ownership.epoch(s) is not None),
                len(gained),
                len(lost),
                extra={"step": "ownership", "gained": len(gained), "lost": len(lost)},
            )

    def owner_of(self, site: str) -> str | None:
        """The server provisioning the CE (None with one server on its own database)."""
        return self.jobs.ownership.owner(site)

    def _status_changed(self, rec: CeRecord, previous: str, error: str | None) -> None:
        if self.engine is not None:  # an offline server notifies nobody
            self.engine.provisioning_status_changed(rec, previous, error)

    def _still_unreachable(self, rec: CeRecord, previous: str, error: str | None) -> None:
        if self.engine is not None:
            self.engine.still_unreachable(rec, error)

    def _deprovisioned(self, view: SiteView) -> None:
        self.keys.forget_site(view.vpn, view.site)

    def provisioning_records(self) -> list[CeRecord]:
        """Where provisioning stands for every site of the database (for <get>)."""
        if not self.jobs.started:
            return []
        prov = self.jobs.provisioner
        return [rec for rec in prov.records.values() if rec.site in self.sites]

    # -- site removal (seed 3.6) -----------------------------------------------------

    def _site_removed(self, view: SiteView) -> None:
        mode = self.removal_override.pop(view.site, view.removal)
        deprovision = mode == "deprovision"
        # A deprovisioning push uses the standing link, then drops it.
        self.jobs.forget(view.site, keep_link=deprovision)
        if self.engine is not None:
            self.engine.site_removed(view.vpn, view.site)
        self.storage.put(
            REMOVED,
            ce_username(view.site),
            json.dumps({"vpn": view.vpn, "site": view.site, "at": now_text()}).encode(),
        )
        if deprovision and view.host_keys:
            self.jobs.deprovision(view)  # its owner cleans it, then drops the row
        else:
            self.keys.forget_site(view.vpn, view.site)
            self.jobs.ownership.forget(view.site)

    # -- IKE-less rekeys ---------------------------------------------------------------

    def _rekey_plans(self) -> list[RekeyPlan]:
        """The IKE-less VPNs of the database now, with their rekey intervals."""
        return [
            RekeyPlan(vid, float(state.vpn["tunnel-defaults"]["ikeless-rekey-interval"]))
            for vid, state in self.vpns.items()
            if state.vpn.get("keying") == "ikeless"
        ]

    def _begin_rekey(self, vid: str, due: list[tuple[str, str]]) -> None:
        self.keys.begin_rekey(vid, due)
        self._recompile(vid)

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        """The server runs: rekeys may begin."""
        self.rekeys.start()

    async def stop(self) -> None:
        """The server stops: no more rekeys, jobs or links."""
        self.rekeys.stop()
        self.call_home.close()
        await self.jobs.close()

    # -- operations --------------------------------------------------------------------

    def _site_or_error(self, vpn: str | None, site: str) -> SiteView:
        view = self.sites.get(site)
        if view is None or (vpn is not None and view.vpn != vpn):
            where = f" in VPN {vpn!r}" if vpn else ""
            raise RpcError(
                "invalid-value",
                f"There is no site {site!r}{where} in the VPN database.",
                app_tag="unknown-site",
            )
        return view

    async def enrol(self, vpn: str, site: str, session: Session | None = None) -> Bundle:
        """Seed 3.2: the CE's pre-configuration; the server pins the CE's new host key."""
        view = self._site_or_error(vpn, site)
        state = self.vpns[vpn]
        settings = self.server_settings
        engine = self._engine()
        try:
            bundle = make_bundle(
                vpn=vpn,
                site=site,
                sp_address=view.ce_address,
                management_port=view.management_port,
                server_endpoints=list(settings.get("endpoint", [])),
                server_host_key=engine.host_key(),
                southbound_public=self.jobs.southbound_public,
                ca_certificate=self.keys.ca_certificate(vpn),
                # In push mode the VPN has no pull-interval (YANG 'when'): the CE's safety-net
                # fetch then runs at the model's default.
                pull_interval=int(
                    state.vpn.get("pull-interval")
                    or engine.yang_default(f"/{SVC}/vpn/pull-interval")
                ),
                orphan_after=int(settings["ce-orphan-after"]),
                call_home_port=(int(settings["call-home"]["port"]) if view.call_home else None),
            )
        except ValueError as exc:
            raise RpcError("operation-failed", str(exc)) from None

        def pin_and_authorise(root: etree._Element) -> None:
            set_host_key(root, vpn, site, bundle.host_public)
            replace_user(root, ce_username(site), [bundle.client_public], [CE_GROUP])

        await engine.edit_running(pin_and_authorise, reason="enrol", on_behalf_of=session)
        self.storage.delete(REMOVED, ce_username(site))
        log.info("site %s of VPN %s enrolled", site, vpn)
        return bundle

    def fetch(
        self,
        user: str,
        site: str | None,
        applied_version: str | None = None,
        certificate_request: str | None = None,
        *,
        defer_to_push: bool = False,
    ) -> Fetched:
        """Seed 3.5 'pull': a CE fetches its own configuration; seed 3.6: a removed CE
        learns it is removed.  ``defer_to_push``: the CE would rather wait for a push of
        this server under way than apply the configuration itself (its safety-net fetch
        racing the push of a commit)."""
        own = self.site_of_user(user)
        if site is None:
            if own is None:
                raise RpcError(
                    "invalid-value",
                    "Name the site: this account is not a CE's.",
                    app_tag="site-required",
                )
            site = own
        elif own is not None and site != own:
            raise RpcError(
                "access-denied",
                f"A CE may fetch only its own configuration ({own}), not {site}'s.",
            )
        removed = self.storage.get(REMOVED, ce_username(site))
        view = self.sites.get(site)
        if view is None:
            if removed is not None:
                raise RpcError(
                    "invalid-value",
                    f"Site {site} is no longer part of any VPN (seed 3.6): delete its VPN state.",
                    app_tag="site-removed",
                )
            raise RpcError("invalid-value", f"There is no site {site!r}.", app_tag="unknown-site")
        if own is not None and certificate_request:
            self._certify(view, certificate_request)
        config = self.vpns[view.vpn].compiled[site]
        prov = self.jobs.provisioner
        rec = prov.record(view.vpn, site)
        rec.last_contact = now_text()
        being_pushed = False
        if own is not None and applied_version is not None:
            rec.applied_version = applied_version or None
            in_sync = applied_version == config.version
            was = rec.status
            # Judged before the status changes: a CE that was unreachable or refused its
            # last push gets the configuration, whatever the server does next.
            being_pushed = (
                defer_to_push
                and not in_sync
                and was not in ("unreachable", "failed")
                and view.autodiscovery == "push"
                and self.jobs.pushing(site)
            )
            prov.set_status(rec, "in-sync" if in_sync else "pending")
            if in_sync:
                rec.retry_count, rec.next_attempt = 0, None
                self._receiver_applied(rec, config)
                self._fetched_in_sync(site, config)
            elif was in ("unreachable", "failed") and view.autodiscovery == "push":
                prov.want(site)  # it answers: push now, not at the next back-off retry
        return Fetched(
            site,
            config.version,
            config.config,
            for_the_ce=own is not None,
            unchanged=applied_version is not None and applied_version == config.version,
            being_pushed=being_pushed,
        )

    def _fetched_in_sync(self, site: str, config: CeConfig) -> None:
        """The CE says it runs the version it fetched: a version names one configuration,
        so the server now knows what the CE holds, as after a push of its own.  Its next
        push is then the change from it, confirmed over the standing link's second
        session, instead of a whole resynchronisation confirmed over a brand-new
        connection: what every CE that came up by fetching (its first start, a server
        restart) cost at the next change, a thousand new SSH connections at once when that
        change is a full mesh.  Only the CE's owner keeps such a record."""
        epoch = self.jobs.ownership.epoch(site)
        if epoch is None:
            return
        ledger = self.jobs.applied
        known = ledger.get(site)
        if known.version == config.version and known.config is not None:
            return
        ledger.record(site, config.version, config.config, known.port, epoch)

    # -- what CEs say of their tunnels (nc_server.southbound.TunnelWatch) -------------

    def tunnel_statuses(self, site: str, statuses: Mapping[str, str]) -> None:
        view = self.sites.get(site)
        if view is not None and self.engine is not None:
            self.engine.tunnel_statuses(view.vpn, site, statuses)

    def tunnel_event(self, site: str, event: str, peer: str, reason: str | None) -> None:
        view = self.sites.get(site)
        if view is not None and self.engine is not None:
            self.engine.tunnel_event(view.vpn, site, event, peer, reason)

    def called_from(self, site: str) -> str | None:
        """Where a call-home CE's open connection comes from (None: it has none)."""
        return self.jobs.southbound.called_from(site)

    def ce_reachable(self, site: str, source: str) -> None:
        """The site's CE reached the server (its account logged in from ``source``): it is
        reachable again, whatever its record said.

        Its status is made true at once rather than at the next back-off retry
        (up to unreachable-retry-limit away): a push is started now if the CE
        is behind and the VPN pushes; otherwise its fetch will say where it is.
        """
        if not self.jobs.started or site not in self.sites:
            return
        view = self.sites[site]
        rec = self.jobs.provisioner.record(view.vpn, site)
        rec.last_contact = now_text()
        owner = self.jobs.ownership.owner(site)
        if self._contacts is not None and owner is not None and owner != self._contacts.server:
            # Another server provisions it: that one decides (nc_server.shared_contacts).
            self._contacts.heard(site, source)
            return
        if rec.status in ("unreachable", "failed") or rec.next_attempt is not None:
            log.info("CE %s is back (logged in from %s)", site, source)
            self._target_changed(view, rec)

    def ce_heard_elsewhere(self, server: str, site: str, source: str) -> None:
        """Another server heard from a CE (nc_server.shared_contacts): if it is this
        server's, as if it had logged in here."""
        if self.jobs.ownership.epoch(site) is not None:
            self.ce_reachable(site, f"{source}, through server {server}")

    def _certify(self, view: SiteView, request: str) -> None:
        """Seed 3.3 (ii): certify the key pair the CE made, once per key."""
        from nc_server.ca import CsrRefused

        if _same_key(self.keys.site_certificate(view.vpn, view.site)[0], request):
            return
        try:
            self.keys.issue_from_csr(view.vpn, view.site, request)
        except CsrRefused as exc:
            raise RpcError(
                "invalid-value",
                f"The certificate request was refused: {exc}",
                app_tag="certificate-request-refused",
            ) from None
        log.info("site %s: certified the CE's own key", view.site)
        self._recompile(view.vpn)

    def site_of_user(self, user: str) -> str | None:
        """The site whose CE this account is: an enrolled CE's account (`ce-<site>`, made by
        enrolment in group cevpn-ce-agents), never an operator's that happens to look alike."""
        if not user.startswith("ce-") or CE_GROUP not in self._engine().groups_of(user):
            return None
        site = user[3:]
        if site in self.sites or self.storage.get(REMOVED, user) is not None:
            return site
        return None

    def resynchronise(self, vpn: str | None, site: str | None) -> None:
        """Forget what the CEs confirmed: their next push is a full one."""
        prov = self.jobs.provisioner
        for view in list(self.sites.values()):
            if (vpn and view.vpn != vpn) or (site and view.site != site):
                continue
            self.jobs.applied.forget(view.site)
            rec = prov.record(view.vpn, view.site)
            rec.applied_version = None
            self._target_changed(view, rec)

    async def audit(self, vpn: str | None, site: str | None, repair: bool) -> list[AuditResult]:
        """Read the enrolled CEs' running configurations and compare; ``repair``:
        resynchronise those that differ."""
        views = [
            v
            for v in self.sites.values()
            if (not vpn or v.vpn == vpn) and (not site or v.site == site) and v.host_keys
        ]

        async def one(view: SiteView) -> AuditResult:
            result = AuditResult(view.vpn, view.site, "in-sync")
            want = self.codec.normalise(self.vpns[view.vpn].compiled[view.site].config, view.site)
            try:
                ce = await self.jobs.read_ce(view)
            except (CeUnreachable, CeRefused):
                result.outcome = "unreachable"
                return result
            have = {} if ce is None else self.codec.to_json(ce)
            result.differences = differences(want, have)
            if result.differences:
                result.outcome = "repaired" if repair else "differs"
                if repair:
                    self.resynchronise(view.vpn, view.site)
            return result

        return list(await asyncio.gather(*(one(v) for v in sorted(views, key=lambda v: v.site))))

    def rotate_keys(self, vpn: str, site: str | None, what: str) -> None:
        """Replace PSKs, certificates or IKE-less SAs now."""
        if vpn not in self.vpns:
            raise RpcError("invalid-value", f"There is no VPN {vpn!r}.", app_tag="unknown-vpn")
        if site is not None:
            self._site_or_error(vpn, site)
        self.keys.rotate(vpn, site, what)  # type: ignore[arg-type]
        self._recompile(vpn)

    async def remove_site(
        self, vpn: str, site: str, deprovision: bool, session: Session | None = None
    ) -> None:
        """Delete the site from the database, in the mode asked rather than its VPN's."""
        self._site_or_error(vpn, site)

        def delete(root: etree._Element) -> None:
            delete_site(root, vpn, site)
            self.removal_override[site] = "deprovision" if deprovision else "database-only"

        try:
            await self._engine().edit_running(delete, reason="remove-site", on_behalf_of=session)
        except BaseException:
            self.removal_override.pop(site, None)
            raise


def _same_key(certificate_pem: str, request_pem: str) -> bool:
    """Does the certificate already certify the request's public key?"""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    if not certificate_pem:
        return False
    try:
        cert_key = x509.load_pem_x509_certificate(certificate_pem.encode()).public_key()
        csr_key = x509.load_pem_x509_csr(request_pem.encode()).public_key()
    except ValueError:
        return False
    der = serialization.Encoding.DER
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    return cert_key.public_bytes(der, spki) == csr_key.public_bytes(der, spki)
