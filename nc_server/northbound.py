"""The VPN server's NETCONF adapter: what the nc_core engine sees of cevpn-server.

The engine hands every commit of the cevpn-service datastore to an
application in phases, as FRR's northbound does (validate, prepare, apply,
abort), asks it for operational state and for the operations it answers,
and tells it who logged in.  :class:`ServiceApplication` is that
application, and only a translator: transactions, RPCs and sessions become
calls of the controller (nc_server.controller), whose records become XML.

It is also the controller's one way back to the engine
(:class:`nc_server.controller.Engine`): running-datastore edits, YANG
defaults, NACM groups, the host key and notifications.  No other part of
the server touches nc_core's server object.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lxml import etree

from nc_core.alarms import Alarm, AlarmList
from nc_core.notifications import data_node
from nc_core.transaction import Transaction
from nc_core.transport_ssh import host_key_line
from nc_core.xmlutil import default_ns_element
from nc_server import alarms as server_alarms
from nc_server.access import CE_SESSIONS
from nc_server.controller import AuditResult, Controller, Fetched
from nc_server.enrolment import bundle_xml, ce_username
from nc_server.provisioner import CeRecord
from nc_server.service_datastore import LISTENING_FILE, ServiceDatastore
from nc_server.service_tree import SVC_NS, q

if TYPE_CHECKING:
    from nc_core.server import NetconfServer
    from nc_core.session import Session
    from nc_server.shared_running import PostgresSharedRunning

RPCS = (
    "enrol",
    "fetch-ce-configuration",
    "resynchronise",
    "audit",
    "rotate-keys",
    "remove-site",
)
"""The cevpn-service operations the server answers."""


class ServiceApplication(ServiceDatastore):
    """The VPN database's NETCONF application: the controller behind the datastore."""

    def __init__(
        self, state_dir: Path, *, provisioning: bool = True, database: str | None = None
    ) -> None:
        super().__init__(state_dir, database=database)
        if type(self.storage).__name__ == "PostgresStorage":
            # Every server on the database is the one service CEs know (nc_server.identity).
            from nc_server.identity import share_identity

            share_identity(self.storage, state_dir)
        self.controller = Controller(self.storage, state_dir, provisioning=provisioning)
        """Everything the server knows and decides; ``provisioning`` False: it touches no
        CE (offline validation and enrolment)."""
        self.alarms = AlarmList(server_alarms.INVENTORY, self._notify_alarm)
        """The server's own alarms (nc_server.alarms), served as ietf-alarms /alarms."""
        self._certificate_timer: asyncio.TimerHandle | None = None

    def attach(self, server: NetconfServer) -> None:
        super().attach(server)
        self.controller.engine = self
        self.shared: PostgresSharedRunning | None = None
        datastores = getattr(self, "datastores", None)
        if type(datastores).__name__ == "SharedDatastores":
            # One running for every server on the PostgreSQL database (seed 2.3).
            from nc_server.shared_running import PostgresSharedRunning, SharedDatastores

            assert isinstance(datastores, SharedDatastores)
            self.shared = PostgresSharedRunning(server, datastores)
            server.shared = self.shared
            # Each CE provisioned by one live server (nc_server.ownership).
            self.controller.share_ownership(datastores.postgres, datastores.name)
            datastores.key_journal = self.controller.key_journal
            # One key material (nc_server.shared_keys).
            self.shared.keys_changed = self.controller.keys_changed_elsewhere
            # A CE heard here, provisioned there (nc_server.shared_contacts).
            self.shared.ce_heard = self.controller.ce_heard_elsewhere
        if server.metrics.enabled:
            from nc_server import metrics

            metrics.register(server.metrics, self.controller, self.alarms)

    # -- alarms ----------------------------------------------------------------------

    def _notify_alarm(self, event: etree._Element, alarm: Alarm) -> None:
        server = getattr(self, "server", None)
        if server is not None:
            server.notifications.emit(event)

    def check_certificates(self) -> None:
        """Raise and clear certificate-expiry alarms now, and again when one is due."""
        if self._certificate_timer is not None:
            self._certificate_timer.cancel()
            self._certificate_timer = None
        due = server_alarms.check_certificates(self.alarms, self.storage)
        if due is None:
            return
        wait = (due - datetime.now(UTC)).total_seconds()
        # Bounded: a clock step, or a certificate changed outside a commit, is seen within a day.
        wait = min(max(wait, 1.0), 86400.0)
        self._certificate_timer = asyncio.get_running_loop().call_later(
            wait, self.check_certificates
        )

    # -- transaction -------------------------------------------------------------

    async def validate(self, txn: Transaction) -> None:
        """The controller's rules and compilation; what apply installs is kept in the
        transaction."""
        txn.scratch["validated"] = self.controller.validate(txn)

    async def apply(self, txn: Transaction) -> None:
        validated, startup = txn.scratch["validated"], txn.reason == "startup"
        await self.controller.listen_for_calls(validated, self.server.options.host, startup=startup)
        self.controller.apply(validated, startup=startup)
        if not startup:
            self.check_certificates()

    # -- operational state -------------------------------------------------------

    async def operational(self, session: Session | None) -> list[etree._Element]:
        """Every site's provisioning record, as cevpn-service site/provisioning."""
        top = default_ns_element(SVC_NS, "vpn-service")
        by_vpn: dict[str, list[CeRecord]] = {}
        for rec in self.controller.provisioning_records():
            by_vpn.setdefault(rec.vpn, []).append(rec)
        for vid in sorted(by_vpn):
            vpn = etree.SubElement(top, q("vpn"))
            etree.SubElement(vpn, q("id")).text = vid
            for rec in sorted(by_vpn[vid], key=lambda r: r.site):
                site = etree.SubElement(vpn, q("site"))
                etree.SubElement(site, q("id")).text = rec.site
                prov = etree.SubElement(site, q("provisioning"))
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
                    ("called-from", self.controller.called_from(rec.site)),
                    ("owner", self.controller.owner_of(rec.site)),
                ):
                    if value is not None:
                        etree.SubElement(prov, q(name)).text = value
        return [top, self.alarms.state()]

    # -- sessions and lifecycle ----------------------------------------------------

    def session_started(self, session: Session) -> None:
        """A CE's account logged in: the CE is reachable again (the controller decides
        what follows)."""
        site = self.controller.site_of_user(session.user)
        if site is not None:
            self.controller.ce_reachable(site, session.source_host)

    def session_quota(self, user: str) -> int | None:
        """An enrolled CE's account holds a few sessions of its own, outside max-sessions:
        a server holds as many CEs as it provisions, and operators keep theirs."""
        return CE_SESSIONS if self.controller.site_of_user(user) is not None else None

    async def started(self) -> None:
        listener = self.server.listener
        if listener is not None:
            # `cevpn-server enrol` finds a running server here.
            (self.state_dir / LISTENING_FILE).write_text(f"{listener.host} {listener.port}\n")
        self.controller.start()
        self.check_certificates()
        if self.shared is not None:
            await self.shared.start()
        await self.controller.jobs.ownership.start()

    async def stopping(self) -> None:
        if self._certificate_timer is not None:
            self._certificate_timer.cancel()
        if self.shared is not None:
            await self.shared.stop()
        await self.controller.stop()
        await self.controller.jobs.ownership.stop()
        (self.state_dir / LISTENING_FILE).unlink(missing_ok=True)
        self.storage.close()

    # -- operations ----------------------------------------------------------------

    def rpc_names(self) -> set[tuple[str, str]]:
        return {(SVC_NS, name) for name in RPCS}

    async def rpc(self, session: Session, rpc: etree._Element) -> list[etree._Element]:
        name = etree.QName(rpc).localname
        args = {
            etree.QName(c).localname: (c.text or "").strip() for c in rpc if isinstance(c.tag, str)
        }
        ctl = self.controller
        if name == "enrol":
            bundle = await ctl.enrol(args["vpn"], args["site"], session)
            return [bundle_xml(bundle)]
        if name == "fetch-ce-configuration":
            fetched = ctl.fetch(
                session.user,
                args.get("site"),
                args.get("applied-version"),
                args.get("certificate-request"),
                defer_to_push="defer-to-push" in args,
            )
            return self._fetched_xml(fetched)
        if name == "resynchronise":
            ctl.resynchronise(args.get("vpn"), args.get("site"))
            return []
        if name == "audit":
            results = await ctl.audit(
                args.get("vpn"), args.get("site"), args.get("repair") == "true"
            )
            return [_audit_xml(result) for result in results]
        if name == "rotate-keys":
            what = args.get("what") or self._input_default("rotate-keys", "what")
            ctl.rotate_keys(args["vpn"], args.get("site"), what)
            return []
        if name == "remove-site":
            await ctl.remove_site(
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
        return str(self.yang_default(f"/cevpn-service:{rpc}/{leaf}"))

    def _fetched_xml(self, fetched: Fetched) -> list[etree._Element]:
        version = etree.Element(q("version"))
        version.text = fetched.version
        if fetched.unchanged:
            return [version]
        if fetched.being_pushed:
            return [version, etree.Element(q("being-pushed"))]
        holder = etree.Element(q("configuration"))
        ce = self.controller.codec.to_xml(fetched.config, fetched.site)
        if not fetched.for_the_ce:
            _redact(ce)
        holder.append(ce)
        return [version, holder]

    # -- the controller's way to the engine (nc_server.controller.Engine) -----------

    async def edit_running(
        self,
        edit: Callable[[etree._Element], None],
        *,
        reason: str,
        on_behalf_of: Session | None,
    ) -> None:
        await self.server.edit_running(edit, reason=reason, on_behalf_of=on_behalf_of)

    def yang_default(self, path: str) -> Any:
        return self.server.index.default(path)

    def groups_of(self, user: str) -> frozenset[str]:
        return self.server.nacm.groups_of(user)

    def host_key(self) -> str:
        return host_key_line(self.state_dir)

    def provisioning_status_changed(self, rec: CeRecord, previous: str, error: str | None) -> None:
        event = default_ns_element(SVC_NS, "provisioning-status-changed")
        for name, value in (
            ("vpn", rec.vpn),
            ("site", rec.site),
            ("status", rec.status),
            ("previous-status", previous),
            ("error", error if rec.status in ("failed", "unreachable") else None),
        ):
            if value:
                etree.SubElement(event, q(name)).text = value
        # Only to those who may read the site (a customer hears of its own sites only).
        site = data_node(
            (q("vpn-service"), ()),
            (q("vpn"), [(q("id"), rec.vpn)]),
            (q("site"), [(q("id"), rec.site)]),
        )
        self.server.notifications.emit(event, about=[site])
        self._provisioning_alarms(rec, error)

    def still_unreachable(self, rec: CeRecord, error: str | None) -> None:
        self._provisioning_alarms(rec, error)

    def site_removed(self, vpn: str, site: str) -> None:
        server_alarms.site_removed(self.alarms, vpn, site)

    def tunnel_statuses(self, vpn: str, site: str, statuses: Mapping[str, str]) -> None:
        server_alarms.tunnel_statuses(self.alarms, vpn, site, statuses)

    def tunnel_event(self, vpn: str, site: str, event: str, peer: str, reason: str | None) -> None:
        server_alarms.tunnel_event(self.alarms, vpn, site, event, peer, reason)

    def _provisioning_alarms(self, rec: CeRecord, error: str | None) -> None:
        server_alarms.provisioning_status(
            self.alarms,
            rec.vpn,
            rec.site,
            rec.status,
            error,
            reached_before=rec.last_contact is not None,
            retries=rec.retry_count,
        )

    def configuration_available(self, vpn: str, site: str, version: str) -> None:
        event = default_ns_element(SVC_NS, "configuration-available")
        etree.SubElement(event, q("vpn")).text = vpn
        etree.SubElement(event, q("site")).text = site
        etree.SubElement(event, q("version")).text = version
        self.server.notifications.emit(event, audience=frozenset({ce_username(site)}))


def _audit_xml(result: AuditResult) -> etree._Element:
    entry = etree.Element(q("result"))
    etree.SubElement(entry, q("vpn")).text = result.vpn
    etree.SubElement(entry, q("site")).text = result.site
    etree.SubElement(entry, q("outcome")).text = result.outcome
    for path in result.differences:
        etree.SubElement(entry, q("difference")).text = path
    return entry


def _redact(ce: etree._Element) -> None:
    """Key material is for the CE only: an operator fetching a CE's configuration sees
    where keys are, not what they are."""
    secret = {"pre-shared-key", "encryption-key", "integrity-key", "private-key"}
    for elem in ce.iter():
        if isinstance(elem.tag, str) and etree.QName(elem).localname in secret:
            parent = elem.getparent()
            if parent is not None:
                parent.remove(elem)


__all__ = ["ServiceApplication"]
