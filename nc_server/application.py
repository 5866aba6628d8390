"""The SP VPN server (seed 2.3, 3): the VPN database and the controller behind it.

The database is the cevpn-service datastore, served by nc_core and kept in
SQLite (nc_server.storage).  Every commit is a transaction:
- validate: every VPN that changed is compiled (nc_server.compiler); a VPN
  that cannot be realised (one security strength, seed 7) is refused with a
  precise rpc-error and nothing changes;
- apply: the compiled configurations become the CEs' targets; the CEs whose
  configuration changed are provisioned afterwards, according to the VPN's
  autodiscovery mode (seed 3.5): push (the server edits the CE), pull (the
  CE fetches, nothing to do here) or notify-then-pull (a notification to
  that CE's account only, which then fetches).
Sites deleted from the database are removed from their CE first
(``deprovision``) or only from the database (``database-only``, seed 3.6):
the CE is then told at its next fetch that it is no longer part of a VPN.

Key material (PSKs, the VPN's CA and CE certificates, IKE-less SAs) lives in
the server's key store, never in a datastore: nobody but the server reads it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lxml import etree

from nc_core import faults
from nc_core.endpoint import Endpoint
from nc_core.errors import RpcError, RpcErrors
from nc_core.notifications import data_node
from nc_core.transaction import Transaction
from nc_core.transport_ssh import host_key_line
from nc_core.users import replace_user
from nc_core.xmlutil import NACM_NS, default_ns_element, qn
from nc_server.applied import AppliedLedger
from nc_server.ce_config import (
    CeCodec,
    InvalidCompiledConfig,
    add_management_port,
    deprovision_document,
    differences,
    edit_document,
    full_edit,
    incremental_edit,
    touches_management_path,
)
from nc_server.compiler import CeConfig, CompileError, VpnCompiler, diff_configs
from nc_server.enrolment import (
    CE_GROUP,
    Bundle,
    ce_username,
    make_bundle,
    southbound_key,
)
from nc_server.keystore import KeyStore
from nc_server.provisioner import CeRecord, Provisioner, now_text
from nc_server.rekey import RekeyPlan, RekeyScheduler
from nc_server.service_datastore import LISTENING_FILE, ServiceDatastore
from nc_server.service_rules import (
    MAX_REPORTED,
    check_sites_unique,
    check_vpn,
    site_path,
    vpn_path,
)
from nc_server.southbound import CeRefused, CeUnreachable, Southbound

if TYPE_CHECKING:
    from nc_core.session import Session

log = logging.getLogger("cevpn.server")

SVC_NS = "urn:cevpn:yang:cevpn-service"
SVC = "cevpn-service:vpn-service"
STRENGTH_BITS = {
    "cevpn-types:strength-80": 80,
    "cevpn-types:strength-112": 112,
    "cevpn-types:strength-128": 128,
    "cevpn-types:strength-192": 192,
    "cevpn-types:strength-256": 256,
}
CE_SECTIONS = (
    "configuration-version",
    "minimum-strength",
    "sa-defaults",
    "retry-policy",
    "certificates",
    "routing",
    "internet-access",
    "ingress-policy",
)
"""Everything under /ce the server owns (all but pre-configuration)."""
REMOVED = "removed-site"
REMOVALS = "pending-removal"


def _q(name: str) -> str:
    return qn(SVC_NS, name)


@dataclass
class SiteView:
    """What the server needs of a site outside the compiler: where its CE is."""

    vpn: str
    site: str
    ce_address: str
    management_address: str
    management_port: int
    host_keys: list[str]
    autodiscovery: str
    removal: str


@dataclass
class VpnState:
    vpn: dict[str, Any]
    compiled: dict[str, CeConfig] = field(default_factory=dict)


class ServiceApplication(ServiceDatastore):
    def __init__(self, state_dir: Path, *, provisioning: bool = True) -> None:
        super().__init__(state_dir)
        self.state_dir = state_dir
        self.provisioning = provisioning
        self.keys = KeyStore(self.storage)
        self.codec = CeCodec()
        self.compilers: dict[str, VpnCompiler] = {}
        self.vpns: dict[str, VpnState] = {}
        self.sites: dict[str, SiteView] = {}
        self.server_settings: dict[str, Any] = {}
        self.removal_override: dict[str, str] = {}
        self.provisioner: Provisioner | None = None
        self.southbound_key, self.southbound_public = southbound_key(state_dir)
        self._rekey_task: asyncio.Task[None] | None = None
        self.rekeys = RekeyScheduler(self.keys, self._rekey_plans, self._begin_rekey)
        self.compile_seconds = 0.0
        self._removing: dict[str, SiteView] = {}
        """Sites deleted in 'deprovision' mode whose CE has not been cleaned yet."""
        self.southbound = Southbound()
        """Standing management links to the CEs, reused by every push and audit."""
        self.applied = AppliedLedger(self.storage)
        """What each CE confirmed last."""
        self._tasks: set[asyncio.Task[Any]] = set()

    # -- transaction -------------------------------------------------------------

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

    async def validate(self, txn: Transaction) -> None:
        """Service rules, then compilation, of every VPN that changed: what a commit, a
        <validate>, a test-only edit and `cevpn-server validate` are all refused for."""
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
                and _compiled_part(old_vpns.get(vid)) == _compiled_part(vpn)
            ):
                # Only where CEs are managed changed (enrolment, a new port): same configs.
                compiled[vid] = VpnState(vpn, known.compiled)
                continue
            violations = check_vpn(vpn)
            if violations:
                errors.extend(v.rpc_error() for v in violations)
                continue
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
        txn.scratch["vpns"] = compiled
        txn.scratch["server"] = new.get("server", {})

    async def apply(self, txn: Transaction) -> None:
        new_vpns: dict[str, VpnState] = txn.scratch["vpns"]
        old_vpns = self.vpns
        old_sites = self.sites
        self.vpns = new_vpns
        self.server_settings = txn.scratch["server"]
        self.sites = {}
        for vid, state in new_vpns.items():
            vpn = state.vpn
            for site in vpn.get("site", []):
                mgmt = site.get("management", {})
                self.sites[site["id"]] = SiteView(
                    vpn=vid,
                    site=site["id"],
                    ce_address=site["ce-address"],
                    management_address=mgmt.get("address", site["ce-address"]),
                    management_port=int(mgmt["port"]),
                    host_keys=list(mgmt.get("host-key", [])),
                    autodiscovery=str(vpn["autodiscovery"]),
                    removal=str(vpn["site-removal"]),
                )
        for vid in set(old_vpns) - set(new_vpns):
            self.compilers.pop(vid, None)
        loop = asyncio.get_running_loop()
        loop.call_soon(self._after_commit, old_vpns, old_sites, txn.reason == "startup")

    def _after_commit(
        self, old_vpns: Mapping[str, VpnState], old_sites: Mapping[str, SiteView], startup: bool
    ) -> None:
        """The database changed: start provisioning what must follow."""
        self.rekeys.changed()  # VPNs, their keying or their rekey intervals may differ
        prov = self._provisioner()
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
                    rec.applied_version = self.applied.get(site).version
                moved = old_sites.get(site) != self.sites[site]  # enrolled, new address...
                if site in changed or startup or moved:
                    self._target_changed(self.sites[site], rec)
        if startup:
            for key, _ in self.storage.scan(REMOVALS):
                removal = json.loads(self.storage.get(REMOVALS, key) or b"{}")
                self._schedule_removal(SiteView(**removal))

    def _target_changed(self, view: SiteView, rec: CeRecord) -> None:
        prov = self._provisioner()
        if not view.host_keys:
            prov.set_status(rec, "not-enrolled")
            return
        applied_port = self.applied.get(view.site).port or view.management_port
        if rec.applied_version == rec.target_version and applied_port == view.management_port:
            prov.set_status(rec, "in-sync")
            return
        prov.set_status(rec, "pending")
        if view.autodiscovery == "push":
            prov.want(view.site)
        elif view.autodiscovery == "notify-then-pull":
            self._configuration_available(view, rec)

    # -- provisioning ------------------------------------------------------------

    def _provisioner(self) -> Provisioner:
        if self.provisioner is None:
            settings = self.server_settings
            self.provisioner = Provisioner(
                self._job,
                self._status_changed,
                max_concurrent=int(settings["max-concurrent-provisioning"]),
                retry_limit=float(settings["unreachable-retry-limit"]),
            )
        else:
            settings = self.server_settings
            self.provisioner.configure(
                int(settings["max-concurrent-provisioning"]),
                float(settings["unreachable-retry-limit"]),
            )
        return self.provisioner

    def endpoint(self, view: SiteView, port: int | None = None) -> Endpoint:
        return Endpoint(
            host=view.management_address,
            port=port or view.management_port,
            host_keys=view.host_keys,
            username="cevpn-server",
            key_file=self.southbound_key,
            timeout=10.0,
        )

    async def _job(self, rec: CeRecord) -> str:
        if not self.provisioning:
            return rec.status
        if rec.site in self._removing:  # also when retried after 'unreachable'
            return await self._deprovision_job(rec)
        view = self.sites.get(rec.site)
        state = self.vpns.get(rec.vpn)
        if view is None or state is None or rec.site not in state.compiled:
            return rec.status
        target = state.compiled[rec.site]
        applied = self.applied.get(rec.site)
        # The management port is the one part of the pre-configuration the server changes
        # after enrolment (the CE listens where the database says).
        now_port = applied.port or view.management_port
        if applied.version == target.version and now_port == view.management_port:
            rec.applied_version = target.version
            return "in-sync"
        known = applied.config
        if known is None:
            target_xml = self.codec.to_xml(target.config, rec.site)
            touches_management = True  # what the CE holds is unknown
        else:
            incremental = incremental_edit(known, target.config)
            target_xml = self.codec.parts_to_xml(target.config, incremental, rec.site)
            touches_management = touches_management_path(incremental)

        def make(present: list[str] | None) -> etree._Element:
            if known is None or present is not None:
                edit = full_edit(target.config, present or [])
            else:
                edit = incremental
            document = edit_document(target_xml, edit)
            if now_port != view.management_port:
                add_management_port(document, view.management_port)
            return document

        confirm_timeout = int(self.server_settings["confirm-timeout"])
        try:
            timings = await self.southbound.push(
                rec.site,
                self.endpoint(view, port=now_port),
                make,
                confirm_timeout,
                needs_peer_list=known is None,
                touches_management=touches_management,
                confirm_endpoint=self.endpoint(view),
            )
        except Exception:
            # We no longer know what the CE holds: resynchronise fully next time.  If a
            # commit was not confirmed the CE rolls back, so it listens where it did.
            self.applied.record(rec.site, None, None, now_port)
            raise
        rec.timings.add(timings)
        self.applied.record(rec.site, target.version, target.config, view.management_port)
        rec.applied_version = target.version
        rec.last_contact = now_text()
        self._receiver_applied(rec, target)
        return "in-sync"

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

    def _recompile(self, vid: str) -> None:
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
        prov = self._provisioner()
        for site in changed:
            if site in configs and site in self.sites:
                rec = prov.record(vid, site)
                rec.target_version = configs[site].version
                self._target_changed(self.sites[site], rec)

    def _status_changed(self, rec: CeRecord, previous: str, error: str | None) -> None:
        event = default_ns_element(SVC_NS, "provisioning-status-changed")
        for name, value in (
            ("vpn", rec.vpn),
            ("site", rec.site),
            ("status", rec.status),
            ("previous-status", previous),
            ("error", error if rec.status in ("failed", "unreachable") else None),
        ):
            if value:
                etree.SubElement(event, _q(name)).text = value
        server = getattr(self, "server", None)
        if server is not None:
            # Only to those who may read the site (a customer hears of its own sites only).
            site = data_node(
                (_q("vpn-service"), ()),
                (_q("vpn"), [(_q("id"), rec.vpn)]),
                (_q("site"), [(_q("id"), rec.site)]),
            )
            server.notifications.emit(event, about=[site])

    def _configuration_available(self, view: SiteView, rec: CeRecord) -> None:
        event = default_ns_element(SVC_NS, "configuration-available")
        etree.SubElement(event, _q("vpn")).text = view.vpn
        etree.SubElement(event, _q("site")).text = view.site
        etree.SubElement(event, _q("version")).text = rec.target_version or ""
        self.server.notifications.emit(event, audience=frozenset({ce_username(view.site)}))

    # -- site removal (seed 3.6) -------------------------------------------------

    def _background(self, work: Coroutine[Any, Any, Any]) -> None:
        """Run ``work`` without waiting for it (the task is kept until it ends)."""
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _site_removed(self, view: SiteView) -> None:
        mode = self.removal_override.pop(view.site, view.removal)
        prov = self._provisioner()
        prov.forget(view.site)
        if mode != "deprovision":  # else the deprovisioning push uses the link, then drops it
            self._background(self.southbound.drop(view.site))
        self.applied.forget(view.site)
        self.storage.put(
            REMOVED,
            ce_username(view.site),
            json.dumps({"vpn": view.vpn, "site": view.site, "at": now_text()}).encode(),
        )
        if mode == "deprovision" and view.host_keys:
            self.storage.put(REMOVALS, view.site, json.dumps(view.__dict__).encode())
            self._schedule_removal(view)
        else:
            self.keys.forget_site(view.vpn, view.site)

    def _schedule_removal(self, view: SiteView) -> None:
        prov = self._provisioner()
        rec = prov.record(view.vpn, view.site)
        rec.status = "removing"
        self._removing[view.site] = view
        prov.want(view.site)

    async def _deprovision_job(self, rec: CeRecord) -> str:
        view = self._removing.get(rec.site)
        if view is None:
            return "removing"
        confirm_timeout = int(self.server_settings["confirm-timeout"])
        endpoint = self.endpoint(view)

        def make(present: list[str] | None) -> etree._Element:
            return deprovision_document(present or [], CE_SECTIONS)

        assert self.provisioner is not None
        await self.southbound.push(
            rec.site, endpoint, make, confirm_timeout, needs_peer_list=True, touches_management=True
        )
        await self.southbound.drop(rec.site)
        self._removing.pop(rec.site, None)
        self.storage.delete(REMOVALS, rec.site)
        self.keys.forget_site(view.vpn, view.site)
        self.provisioner.forget(rec.site)
        log.info("site %s deprovisioned from its CE", rec.site)
        return "not-enrolled"

    # -- operational state -------------------------------------------------------

    async def operational(self, session: Session | None) -> list[etree._Element]:
        top = default_ns_element(SVC_NS, "vpn-service")
        if self.provisioner is None:
            return [top]
        by_vpn: dict[str, list[CeRecord]] = {}
        for rec in self.provisioner.records.values():
            if rec.site in self.sites:
                by_vpn.setdefault(rec.vpn, []).append(rec)
        for vid in sorted(by_vpn):
            vpn = etree.SubElement(top, _q("vpn"))
            etree.SubElement(vpn, _q("id")).text = vid
            for rec in sorted(by_vpn[vid], key=lambda r: r.site):
                site = etree.SubElement(vpn, _q("site"))
                etree.SubElement(site, _q("id")).text = rec.site
                prov = etree.SubElement(site, _q("provisioning"))
                for name, value in (
                    ("status", rec.status),
                    ("status-since", rec.since),
                    ("target-version", rec.target_version),
                    ("applied-version", rec.applied_version),
                    ("last-contact", rec.last_contact),
                    ("last-error", rec.last_error),
                    ("retry-count", str(rec.retry_count)),
                    ("next-attempt", rec.next_attempt),
                    ("peer-count", str(rec.peer_count)),
                ):
                    if value is not None:
                        etree.SubElement(prov, _q(name)).text = value
        return [top]

    # -- lifecycle -----------------------------------------------------------------

    async def started(self) -> None:
        listener = self.server.listener
        if listener is not None:
            # `cevpn-server enrol` finds a running server here.
            (self.state_dir / LISTENING_FILE).write_text(f"{listener.host} {listener.port}\n")
        self._rekey_task = asyncio.get_running_loop().create_task(self.rekeys.run())

    async def stopping(self) -> None:
        if self._rekey_task is not None:
            self._rekey_task.cancel()
        if self.provisioner is not None:
            await self.provisioner.close()
        await self.southbound.close()
        self.applied.flush()
        (self.state_dir / LISTENING_FILE).unlink(missing_ok=True)
        self.storage.close()

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

    # -- operations ----------------------------------------------------------------

    def rpc_names(self) -> set[tuple[str, str]]:
        return {
            (SVC_NS, name)
            for name in (
                "enrol",
                "fetch-ce-configuration",
                "resynchronise",
                "audit",
                "rotate-keys",
                "remove-site",
            )
        }

    async def rpc(self, session: Session, rpc: etree._Element) -> list[etree._Element]:
        name = etree.QName(rpc).localname
        args = {
            etree.QName(c).localname: (c.text or "").strip() for c in rpc if isinstance(c.tag, str)
        }
        if name == "enrol":
            bundle = await self.enrol(args["vpn"], args["site"], session)
            return [_bundle_xml(bundle)]
        if name == "fetch-ce-configuration":
            return self.fetch(
                session.user,
                args.get("site"),
                args.get("applied-version"),
                args.get("certificate-request"),
            )
        if name == "resynchronise":
            self.resynchronise(args.get("vpn"), args.get("site"))
            return []
        if name == "audit":
            return await self.audit(args.get("vpn"), args.get("site"), args.get("repair") == "true")
        if name == "rotate-keys":
            what = args.get("what") or self._input_default("rotate-keys", "what")
            self.rotate_keys(args["vpn"], args.get("site"), what)
            return []
        if name == "remove-site":
            await self.remove_site(
                args["vpn"],
                args["site"],
                str(
                    args.get("deprovision") or self._input_default("remove-site", "deprovision")
                ).lower()
                == "true",
                session,
            )
            return []
        return await super().rpc(session, rpc)

    def _input_default(self, rpc: str, leaf: str) -> str:
        """The YANG default of an operation's input leaf (cevpn-service is its one source)."""
        return str(self.server.index.default(f"/cevpn-service:{rpc}/{leaf}"))

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
        try:
            bundle = make_bundle(
                vpn=vpn,
                site=site,
                sp_address=view.ce_address,
                management_port=view.management_port,
                server_endpoints=list(settings.get("endpoint", [])),
                server_host_key=host_key_line(self.state_dir),
                southbound_public=self.southbound_public,
                ca_certificate=self.keys.ca_certificate(vpn),
                # In push mode the VPN has no pull-interval (YANG 'when'): the CE's safety-net
                # fetch then runs at the model's default.
                pull_interval=int(
                    state.vpn.get("pull-interval")
                    or self.server.index.default(f"/{SVC}/vpn/pull-interval")
                ),
                orphan_after=int(settings["ce-orphan-after"]),
            )
        except ValueError as exc:
            raise RpcError("operation-failed", str(exc)) from None

        def pin_and_authorise(root: etree._Element) -> None:
            _set_host_key(root, vpn, site, bundle.host_public)
            replace_user(root, ce_username(site), [bundle.client_public], [CE_GROUP])

        await self.server.edit_running(pin_and_authorise, reason="enrol", on_behalf_of=session)
        self.storage.delete(REMOVED, ce_username(site))
        log.info("site %s of VPN %s enrolled", site, vpn)
        return bundle

    def fetch(
        self,
        user: str,
        site: str | None,
        applied_version: str | None = None,
        certificate_request: str | None = None,
    ) -> list[etree._Element]:
        """Seed 3.5 'pull': a CE fetches its own configuration; seed 3.6: a removed CE
        learns it is removed."""
        own = self._site_of_user(user)
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
        prov = self._provisioner()
        rec = prov.record(view.vpn, site)
        rec.last_contact = now_text()
        if own is not None and applied_version is not None:
            rec.applied_version = applied_version or None
            in_sync = applied_version == config.version
            was = rec.status
            prov.set_status(rec, "in-sync" if in_sync else "pending")
            if in_sync:
                rec.retry_count, rec.next_attempt = 0, None
                self._receiver_applied(rec, config)
            elif was in ("unreachable", "failed") and view.autodiscovery == "push":
                prov.want(site)  # it answers: push now, not at the next back-off retry
        version = etree.Element(_q("version"))
        version.text = config.version
        holder = etree.Element(_q("configuration"))
        ce = self.codec.to_xml(config.config, site)
        if own is None:
            _redact(ce)
        holder.append(ce)
        return [version, holder]

    def session_started(self, session: Session) -> None:
        """A CE's account logged in: the CE is reachable again, whatever its record said.

        Its status is made true at once rather than at the next back-off retry
        (up to unreachable-retry-limit away): a push is started now if the CE
        is behind and the VPN pushes; otherwise its fetch will say where it is.
        """
        site = self._site_of_user(session.user)
        if site is None or self.provisioner is None or site not in self.sites:
            return
        view = self.sites[site]
        rec = self.provisioner.record(view.vpn, site)
        rec.last_contact = now_text()
        if rec.status in ("unreachable", "failed") or rec.next_attempt is not None:
            log.info("CE %s is back (logged in from %s)", site, session.source_host)
            self._target_changed(view, rec)

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

    def _site_of_user(self, user: str) -> str | None:
        """The site whose CE this account is: an enrolled CE's account (`ce-<site>`, made by
        enrolment in group cevpn-ce-agents), never an operator's that happens to look alike."""
        if not user.startswith("ce-") or CE_GROUP not in self.server.nacm.groups_of(user):
            return None
        site = user[3:]
        if site in self.sites or self.storage.get(REMOVED, user) is not None:
            return site
        return None

    def resynchronise(self, vpn: str | None, site: str | None) -> None:
        prov = self._provisioner()
        for view in list(self.sites.values()):
            if (vpn and view.vpn != vpn) or (site and view.site != site):
                continue
            self.applied.forget(view.site)
            rec = prov.record(view.vpn, view.site)
            rec.applied_version = None
            self._target_changed(view, rec)

    async def audit(self, vpn: str | None, site: str | None, repair: bool) -> list[etree._Element]:
        results: list[etree._Element] = []
        views = [
            v
            for v in self.sites.values()
            if (not vpn or v.vpn == vpn) and (not site or v.site == site) and v.host_keys
        ]

        async def one(view: SiteView) -> etree._Element:
            entry = etree.Element(_q("result"))
            etree.SubElement(entry, _q("vpn")).text = view.vpn
            etree.SubElement(entry, _q("site")).text = view.site
            want = self.codec.normalise(self.vpns[view.vpn].compiled[view.site].config, view.site)
            try:
                ce, _ = await self.southbound.read_ce(view.site, self.endpoint(view))
            except (CeUnreachable, CeRefused):
                etree.SubElement(entry, _q("outcome")).text = "unreachable"
                return entry
            have = {} if ce is None else self.codec.to_json(ce)
            diffs = differences(want, have)
            outcome = "in-sync"
            if diffs:
                outcome = "repaired" if repair else "differs"
                if repair:
                    self.resynchronise(view.vpn, view.site)
            etree.SubElement(entry, _q("outcome")).text = outcome
            for path in diffs:
                etree.SubElement(entry, _q("difference")).text = path
            return entry

        results = list(await asyncio.gather(*(one(v) for v in sorted(views, key=lambda v: v.site))))
        return results

    def rotate_keys(self, vpn: str, site: str | None, what: str) -> None:
        if vpn not in self.vpns:
            raise RpcError("invalid-value", f"There is no VPN {vpn!r}.", app_tag="unknown-vpn")
        if site is not None:
            self._site_or_error(vpn, site)
        self.keys.rotate(vpn, site, what)  # type: ignore[arg-type]
        self._recompile(vpn)

    async def remove_site(
        self, vpn: str, site: str, deprovision: bool, session: Session | None = None
    ) -> None:
        self._site_or_error(vpn, site)

        def delete(root: etree._Element) -> None:
            _delete_site(root, vpn, site)
            self.removal_override[site] = "deprovision" if deprovision else "database-only"

        try:
            await self.server.edit_running(delete, reason="remove-site", on_behalf_of=session)
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


def _compiled_part(vpn: Mapping[str, Any] | None) -> Any:
    """A VPN entry without what the compiler does not read (sites' management endpoints)."""
    if vpn is None:
        return None
    return {
        **vpn,
        "site": [
            {k: v for k, v in site.items() if k != "management"} for site in vpn.get("site", [])
        ],
    }


# --------------------------------------------------------------------------
# Datastore edits the server makes as itself
# --------------------------------------------------------------------------


def _vpn_elem(root: etree._Element, vpn: str) -> etree._Element | None:
    for elem in root.iterfind(f"{_q('vpn-service')}/{_q('vpn')}"):
        if elem.findtext(_q("id")) == vpn:
            return elem
    return None


def _site_elem(root: etree._Element, vpn: str, site: str) -> etree._Element | None:
    vpn_elem = _vpn_elem(root, vpn)
    if vpn_elem is None:
        return None
    for elem in vpn_elem.iterfind(_q("site")):
        if elem.findtext(_q("id")) == site:
            return elem
    return None


def _set_host_key(root: etree._Element, vpn: str, site: str, public: str) -> None:
    elem = _site_elem(root, vpn, site)
    assert elem is not None
    mgmt = elem.find(_q("management"))
    if mgmt is None:
        mgmt = etree.SubElement(elem, _q("management"))
    for old in mgmt.findall(_q("host-key")):
        mgmt.remove(old)
    etree.SubElement(mgmt, _q("host-key")).text = public


def _delete_site(root: etree._Element, vpn: str, site: str) -> None:
    """The site and everything in its VPN that names it (links, gateways, explicit keys)."""
    vpn_elem = _vpn_elem(root, vpn)
    assert vpn_elem is not None
    for elem in list(vpn_elem.iter()):
        parent = elem.getparent()
        if parent is None or not isinstance(elem.tag, str):
            continue
        local = etree.QName(elem).localname
        if local == "site" and parent is vpn_elem and elem.findtext(_q("id")) == site:
            parent.remove(elem)
        elif local == "internet-gateway" and (elem.text or "").strip() == site:
            parent.remove(elem)
        elif local in ("link", "pre-shared-key", "ikeless-sa", "site-certificate") and site in {
            (c.text or "").strip()
            for c in elem
            if isinstance(c.tag, str)
            and etree.QName(c).localname in ("site-a", "site-b", "from-site", "to-site", "site")
        }:
            parent.remove(elem)


def _redact(ce: etree._Element) -> None:
    """Key material is for the CE only: an operator fetching a CE's configuration sees
    where keys are, not what they are."""
    secret = {"pre-shared-key", "encryption-key", "integrity-key", "private-key"}
    for elem in ce.iter():
        if isinstance(elem.tag, str) and etree.QName(elem).localname in secret:
            parent = elem.getparent()
            if parent is not None:
                parent.remove(elem)


def _bundle_xml(bundle: Bundle) -> etree._Element:
    elem = etree.Element(_q("bundle"))
    _fill(elem, bundle.content)
    return elem


def _fill(parent: etree._Element, content: Mapping[str, Any]) -> None:
    for key, value in content.items():
        if isinstance(value, dict):
            _fill(etree.SubElement(parent, _q(key)), value)
        elif isinstance(value, list):
            for item in value:
                if isinstance(item, dict):
                    _fill(etree.SubElement(parent, _q(key)), item)
                else:
                    etree.SubElement(parent, _q(key)).text = str(item)
        else:
            etree.SubElement(parent, _q(key)).text = str(value)


def bundle_document_from_xml(bundle: etree._Element) -> dict[str, Any]:
    """The enrol RPC's <bundle> as the JSON document `cevpn-agent --bootstrap` reads."""
    lists = {"endpoint", "host-key", "server-authorized-key", "url-host-key"}
    ints = {"port", "pull-interval", "connect-timeout", "fetch-alarm-after", "orphan-after"}

    def walk(elem: etree._Element) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for child in elem:
            if not isinstance(child.tag, str):
                continue
            name = etree.QName(child).localname
            value: Any = walk(child) if len(child) else (child.text or "")
            if name in ints and isinstance(value, str):
                value = int(value)
            if name in lists:
                out.setdefault(name, []).append(value)
            else:
                out[name] = value
        return out

    return {"cevpn-ce:ce": {"pre-configuration": walk(bundle)}}


__all__ = ["NACM_NS", "InvalidCompiledConfig", "ServiceApplication", "bundle_document_from_xml"]
