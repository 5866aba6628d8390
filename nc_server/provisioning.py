"""The provisioning jobs: what the server does to one CE over the southbound.

The controller decides *that* a CE must follow its target (nc_server.controller);
the Provisioner (nc_server.provisioner) decides *when* and how many at once;
this module is *what* a job does, over the CE's standing management link
(nc_server.southbound):

- push: edit the CE's candidate with what changed since the configuration the
  CE last confirmed (nc_server.applied), commit confirmed, confirm;
- deprovision (seed 3.6): remove every VPN part of a removed site's CE, then
  drop its link and forget it;
- read a CE's running configuration for an audit.

It knows nothing of the NETCONF engine or of the service datastore's XML: the
controller hands it targets (:class:`Target`) and hears back through
callbacks what a CE now runs.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lxml import etree

from nc_core.endpoint import Endpoint
from nc_server.applied import AppliedLedger
from nc_server.ce_config import (
    CeCodec,
    CeEdit,
    add_management_port,
    deprovision_document,
    edit_document,
    edit_of_changes,
    full_edit,
    incremental_edit,
    touches_management_path,
)
from nc_server.compiler import CeConfig
from nc_server.enrolment import SERVER_USERNAME_ON_CE, southbound_key
from nc_server.leases import Fenced
from nc_server.ownership import Ownership, SoleOwnership
from nc_server.provisioner import CeRecord, Provisioner, StatusListener, now_text
from nc_server.service_tree import SiteView
from nc_server.southbound import CeUnreachable, Southbound, TunnelWatch
from nc_server.storage import Storage

log = logging.getLogger("cevpn.server")

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
REMOVALS = "pending-removal"
"""Storage table of sites deleted in 'deprovision' mode whose CE is not cleaned yet: a
restarted server resumes them."""


def describe_edit(edit: CeEdit) -> str:
    """The parts of a CE's configuration an edit replaces or removes (names, not values)."""
    parts = [f"replace {name}" for name in edit.sections]
    parts += [f"replace peer[{name}]" for name in edit.peers]
    parts += [f"remove {name}" for name in edit.removed_sections]
    parts += [f"remove peer[{name}]" for name in edit.removed_peers]
    return ", ".join(parts) or "nothing (the management port only)"


class Superseded(Exception):
    """The CE's target changed while its push was on the way (a commit, a rekey): what the
    push was made from is stale and is not sent.  A CE that pulls may already run the newer
    version; a stale push would take it back, if only until the next push."""


@dataclass(frozen=True)
class Target:
    """What a CE should run: where it is and its compiled configuration."""

    view: SiteView
    config: CeConfig


TargetOf = Callable[[CeRecord], "Target | None"]
"""The current target of a record's CE; None: the site or its VPN is gone."""
Applied = Callable[[CeRecord, CeConfig], None]
"""A CE confirmed running this configuration."""
Deprovisioned = Callable[[SiteView], None]
"""A removed site's CE was cleaned: what the server kept for it may go."""
JobDone = Callable[[str, str, float], None]
"""A job ended: its kind ('push' or 'deprovision'), outcome (the CE's new provisioning
status: 'in-sync', 'unreachable', 'failed' ...) and duration in seconds."""


class ProvisioningJobs:
    """The jobs the Provisioner runs, and the southbound state they share."""

    def __init__(
        self,
        storage: Storage,
        state_dir: Path,
        codec: CeCodec,
        *,
        enabled: bool,
        target_of: TargetOf,
        on_applied: Applied,
        on_status: StatusListener,
        on_deprovisioned: Deprovisioned,
        on_retry_failed: StatusListener | None = None,
        tunnel_watch: TunnelWatch | None = None,
    ) -> None:
        self.storage = storage
        self.codec = codec
        self.enabled = enabled
        """False for a server that only validates or enrols offline: no CE is touched."""
        self.target_of = target_of
        self.on_applied = on_applied
        self.on_status = on_status
        self.on_retry_failed = on_retry_failed
        self.on_deprovisioned = on_deprovisioned
        self.settings: Mapping[str, Any] = {}
        """The database's /vpn-service/server container (limits and timeouts)."""
        self.southbound_key, self.southbound_public = southbound_key(state_dir)
        self.southbound = Southbound(tunnel_watch)
        """Standing management links to the CEs, reused by every push and audit."""
        self.ownership: Ownership = SoleOwnership()
        """Which CEs this server provisions (all of them, but with several servers on one
        database: nc_server.ownership)."""
        self.applied = AppliedLedger(storage, guard=self._writable)
        """What each CE confirmed last."""
        self.in_flight: set[str] = set()
        """The CEs a job of this server is working on now (never handed over meanwhile)."""
        self.source_address: str | None = None
        """The local address southbound connections leave from (None: the system's choice)."""
        self._provisioner: Provisioner | None = None
        self._removing: dict[str, SiteView] = {}
        """Sites deleted in 'deprovision' mode whose CE has not been cleaned yet."""
        self._tasks: set[asyncio.Task[Any]] = set()
        self.job_done: JobDone = lambda kind, outcome, seconds: None
        """Told of every job that ran to its end (the metrics, nc_server.metrics)."""

    def _writable(self, epochs: Mapping[str, int]) -> set[str]:
        return self.ownership.writable(epochs)

    # -- the Provisioner -----------------------------------------------------------

    def configure(self, settings: Mapping[str, Any]) -> None:
        """The server's settings changed (a commit): limits apply from now on."""
        self.settings = settings
        if self._provisioner is not None:
            self._provisioner.configure(
                int(settings["max-concurrent-provisioning"]),
                float(settings["unreachable-retry-limit"]),
            )

    @property
    def provisioner(self) -> Provisioner:
        """Made at the first need, when the server's settings are known."""
        if self._provisioner is None:
            self._provisioner = Provisioner(
                self._job,
                self.on_status,
                max_concurrent=int(self.settings["max-concurrent-provisioning"]),
                retry_limit=float(self.settings["unreachable-retry-limit"]),
                on_retry_failed=self.on_retry_failed,
            )
        return self._provisioner

    @property
    def started(self) -> bool:
        """Has any CE been looked at yet (no records to show otherwise)?"""
        return self._provisioner is not None

    def endpoint(self, view: SiteView, port: int | None = None) -> Endpoint:
        """How the server reaches a site's CE (its pinned host keys, the server's own key)."""
        return Endpoint(
            host=view.management_address,
            port=port or view.management_port,
            host_keys=view.host_keys,
            username=SERVER_USERNAME_ON_CE,
            key_file=self.southbound_key,
            timeout=10.0,
            call_home=view.call_home,
            local_address=self.source_address,
        )

    async def _job(self, rec: CeRecord) -> str:
        if not self.enabled:
            return rec.status
        epoch = self.ownership.epoch(rec.site)
        if epoch is None:
            # Another server's CE, or this server's lease is in doubt: looked at again after
            # the next renewal if it is still this server's.
            self.ownership.defer(rec.site)
            return rec.status
        kind = "deprovision" if rec.site in self._removing else "push"
        started = time.perf_counter()
        self.in_flight.add(rec.site)
        try:
            if kind == "deprovision":  # also when retried after 'unreachable'
                status = await self._deprovision_job(rec, epoch)
            else:
                status = await self._push_job(rec, epoch)
        except Fenced as exc:
            log.info(
                "CE %s: not pushed: %s", rec.site, exc,
                extra={"site": rec.site, "vpn": rec.vpn, "step": "fenced"},
            )  # fmt: skip
            self.ownership.defer(rec.site)
            return rec.status
        except CeUnreachable:
            self.job_done(kind, "unreachable", time.perf_counter() - started)
            raise
        except Exception:
            self.job_done(kind, "failed", time.perf_counter() - started)
            raise
        finally:
            self.in_flight.discard(rec.site)
        self.job_done(kind, status, time.perf_counter() - started)
        return status

    def pushing(self, site: str) -> bool:
        """Is a push to the CE under way here: its job queued or running on this server,
        which provisions it and holds a live standing link to it?  (A fetch by that CE
        may then leave the new version to the push.)"""
        return (
            self._provisioner is not None
            and self._provisioner.busy(site)
            and site not in self._removing
            and self.ownership.epoch(site) is not None
            and self.southbound.link_alive(site)
        )

    def release(self, site: str) -> None:
        """Another server provisions the CE now: no more jobs nor link here (quietly)."""
        self.provisioner.drop(site)
        if site in self.southbound.links:
            self.background(self.southbound.drop(site))

    # -- push ----------------------------------------------------------------------

    async def _push_job(self, rec: CeRecord, epoch: int = 0) -> str:
        """Bring the CE to its target: only what changed since what it confirmed last, or
        everything if that is unknown."""
        found = self.target_of(rec)
        if found is None:
            return rec.status
        view, target = found.view, found.config
        applied = self.applied.get(rec.site)
        # The management port is the one part of the pre-configuration the server changes
        # after enrolment (the CE listens where the database says).
        now_port = applied.port or view.management_port
        if applied.version == target.version and now_port == view.management_port:
            rec.applied_version = target.version
            return "in-sync"
        known = applied.config
        moved_to = view.management_port if now_port != view.management_port else None
        if known is None:
            incremental = None
            # The whole configuration, the edit made of it once the CE's peer list is read.
            prepared: etree._Element | bytes = self.codec.to_xml(target.config, rec.site)
            touches_management = True  # what the CE holds is unknown
        else:
            changes = target.changes
            if changes is not None and changes.since == applied.version:
                incremental = edit_of_changes(target.config, changes)  # the usual push
            else:
                incremental = incremental_edit(known, target.config)
            # Made (and checked) here, before anything goes out, and once: a push retried
            # on a new link sends the same bytes.
            prepared = self.codec.incremental_document(
                target.config, incremental, rec.site, moved_to
            )
            touches_management = touches_management_path(incremental)

        def make(present: list[str] | None) -> etree._Element | bytes:
            # Called just before the edit goes out, after any round trip to the CE.
            now = self.target_of(rec)
            if now is None or now.config.version != target.version or now.view != view:
                raise Superseded(target.version)
            self.ownership.check(rec.site, epoch)
            if isinstance(prepared, bytes):
                return prepared
            document = edit_document(prepared, full_edit(target.config, present or []))
            if moved_to is not None:
                add_management_port(document, moved_to)
            return document

        confirm_timeout = int(self.settings["confirm-timeout"])
        endpoint = self.endpoint(view, port=now_port)
        what = "its whole configuration" if incremental is None else describe_edit(incremental)
        log.info(
            "CE %s: pushing version %s to %s port %s: %s",
            rec.site, target.version, endpoint.host, endpoint.port, what,
            extra={"site": rec.site, "vpn": rec.vpn, "version": target.version, "step": "push"},
        )  # fmt: skip
        try:
            timings = await self.southbound.push(
                rec.site,
                endpoint,
                make,
                confirm_timeout,
                needs_peer_list=known is None,
                touches_management=touches_management,
                confirm_endpoint=self.endpoint(view),
                fence=lambda: self.ownership.check(rec.site, epoch),
            )
        except Superseded:
            log.info(
                "CE %s: version %s superseded before it was sent; pushing the newer one",
                rec.site, target.version,
                extra={"site": rec.site, "vpn": rec.vpn, "version": target.version,
                       "step": "superseded"},
            )  # fmt: skip
            self.provisioner.want(rec.site)  # runs again once this job has ended
            return "pending"
        except Fenced:
            raise
        except Exception:
            # We no longer know what the CE holds: resynchronise fully next time.  If a
            # commit was not confirmed the CE rolls back, so it listens where it did.
            self.applied.record(rec.site, None, None, now_port, epoch)
            raise
        rec.timings.add(timings)
        log.info(
            "CE %s: version %s committed and confirmed (%d RPCs, %d new session(s), %.2f s)",
            rec.site, target.version, timings.rpcs, timings.sessions,
            timings.ssh + timings.netconf,
            extra={"site": rec.site, "vpn": rec.vpn, "version": target.version,
                   "step": "confirmed"},
        )  # fmt: skip
        self.applied.record(rec.site, target.version, target.config, view.management_port, epoch)
        rec.applied_version = target.version
        rec.last_contact = now_text()
        self.on_applied(rec, target)
        return "in-sync"

    async def read_ce(self, view: SiteView) -> etree._Element | None:
        """The CE's running /ce (None: it has none); CeUnreachable or CeRefused."""
        ce, _ = await self.southbound.read_ce(view.site, self.endpoint(view))
        return ce

    # -- site removal (seed 3.6) ---------------------------------------------------

    def background(self, work: Coroutine[Any, Any, Any]) -> None:
        """Run ``work`` without waiting for it (the task is kept until it ends)."""
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def forget(self, site: str, *, keep_link: bool) -> None:
        """The site left the database: no more jobs for it, nothing confirmed kept.
        ``keep_link``: its CE is about to be deprovisioned over its standing link."""
        self.provisioner.forget(site)
        if not keep_link:
            self.background(self.southbound.drop(site))
        self.applied.forget(site)

    def deprovision(self, view: SiteView) -> None:
        """Clean the removed site's CE, now and, should the server stop first, after it
        restarts."""
        self.storage.put(REMOVALS, view.site, json.dumps(asdict(view)).encode())
        self._schedule_removal(view)

    def removals(self) -> set[str]:
        """The removed sites whose CE is still to be cleaned (by whichever server owns it)."""
        pending = {key for key, _ in self.storage.scan(REMOVALS)}
        for site in set(self._removing) - pending:
            self._removing.pop(site, None)  # another server cleaned it
            if self._provisioner is not None:
                self._provisioner.forget(site)
        return pending

    def resume_removals(self) -> None:
        """At start-up: the deprovisioning a previous run did not finish."""
        for key, _ in self.storage.scan(REMOVALS):
            removal = json.loads(self.storage.get(REMOVALS, key) or b"{}")
            self._schedule_removal(SiteView(**removal))

    def _schedule_removal(self, view: SiteView) -> None:
        prov = self.provisioner
        rec = prov.record(view.vpn, view.site)
        rec.status = "removing"
        self._removing[view.site] = view
        prov.want(view.site)

    async def _deprovision_job(self, rec: CeRecord, epoch: int = 0) -> str:
        view = self._removing.get(rec.site)
        if view is None:
            return "removing"
        confirm_timeout = int(self.settings["confirm-timeout"])
        endpoint = self.endpoint(view)

        def make(present: list[str] | None) -> etree._Element:
            self.ownership.check(rec.site, epoch)
            return deprovision_document(present or [], CE_SECTIONS)

        log.info(
            "CE %s: removing the site's configuration (%s port %s)",
            rec.site, endpoint.host, endpoint.port,
            extra={"site": rec.site, "vpn": rec.vpn, "step": "deprovision"},
        )  # fmt: skip
        await self.southbound.push(
            rec.site, endpoint, make, confirm_timeout, needs_peer_list=True,
            touches_management=True, fence=lambda: self.ownership.check(rec.site, epoch),
        )  # fmt: skip
        await self.southbound.drop(rec.site)
        self._removing.pop(rec.site, None)
        self.storage.delete(REMOVALS, rec.site)
        self.ownership.forget(rec.site)
        self.on_deprovisioned(view)
        self.provisioner.forget(rec.site)
        log.info("site %s deprovisioned from its CE", rec.site)
        return "not-enrolled"

    # -- lifecycle -------------------------------------------------------------------

    async def close(self) -> None:
        """Stop every job and close every link; what CEs confirmed is written out."""
        if self._provisioner is not None:
            await self._provisioner.close()
        await self.southbound.close()
        self.applied.flush()
