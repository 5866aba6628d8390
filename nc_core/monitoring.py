"""NETCONF monitoring (RFC 6022), <get-schema>, and the YANG library (RFC 8525, RFC 7895).

A client learns here what the server implements and how it is doing: the
capabilities, datastores and their locks, the schemas (fetchable with
<get-schema>, so yangcli and other clients can download our modules),
sessions and statistics.  The YANG library, produced by libyang from the very
context that validates our data, lists every module with its revision,
features and deviations, in both the RFC 8525 form (/yang-library) and the
deprecated RFC 7895 form (/modules-state) older clients read.  The hello
advertises the same modules, so clients that only read capabilities work too.
"""

from __future__ import annotations

import hashlib
import os
import platform
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from _libyang import ffi, lib
from lxml import etree

from nc_core.errors import RpcError, missing_element
from nc_core.notifications import date_and_time
from nc_core.with_defaults import as_datastore_tree
from nc_core.xmlutil import DS_NS, MON_NS, SYS_NS, YANGLIB_NS, default_ns_element, qn

if TYPE_CHECKING:
    from nc_core.server import NetconfServer, RpcContext

BOOT_TIME = datetime.now(UTC)

NMDA_DATASTORES = ("running", "candidate", "startup", "operational")
"""The datastores of RFC 8342 the servers implement (nc_core.nmda reads them all)."""


class Monitoring:
    def __init__(self, server: NetconfServer) -> None:
        self.server = server
        self._yanglib_text = self._yang_library()
        self.content_id = hashlib.sha256(self._yanglib_text.encode()).hexdigest()[:16]
        self._modules = self._module_list()

    # -- YANG library ------------------------------------------------------------

    def _yang_library(self) -> str:
        from libyang.data import DNode

        ctx = self.server.schema.ctx
        root = ffi.new("struct lyd_node **")
        token = ffi.new("char[]", b"0")
        if lib.ly_ctx_get_yanglib_data(ctx.cdata, root, b"%s", token) != lib.LY_SUCCESS:
            raise RuntimeError("libyang could not produce YANG library data")
        tree = DNode.new(ctx, root[0])
        try:
            text = str(tree.print_mem("xml", with_siblings=True, pretty=False))
        finally:
            tree.free()
        return text

    def _module_list(self) -> list[dict[str, Any]]:
        """Implemented modules (/modules-state): name, revision, namespace, features, deviations."""
        doc = as_datastore_tree(self._yanglib_text)
        modules = []
        state = doc.find(qn(YANGLIB_NS, "modules-state"))
        assert state is not None
        for module in state.iterfind(qn(YANGLIB_NS, "module")):
            if module.findtext(qn(YANGLIB_NS, "conformance-type")) != "implement":
                continue
            modules.append(
                {
                    "name": module.findtext(qn(YANGLIB_NS, "name")),
                    "revision": module.findtext(qn(YANGLIB_NS, "revision")) or "",
                    "namespace": module.findtext(qn(YANGLIB_NS, "namespace")),
                    "features": [f.text for f in module.iterfind(qn(YANGLIB_NS, "feature"))],
                    "deviations": [
                        d.findtext(qn(YANGLIB_NS, "name"))
                        for d in module.iterfind(qn(YANGLIB_NS, "deviation"))
                    ],
                }
            )
        return modules

    def capabilities(self) -> list[str]:
        caps = [
            "urn:ietf:params:netconf:capability:yang-library:1.0"
            f"?revision=2016-06-21&module-set-id={self.content_id}",
            "urn:ietf:params:netconf:capability:yang-library:1.1"
            f"?revision=2019-01-04&content-id={self.content_id}",
        ]
        for module in self._modules:
            cap = f"{module['namespace']}?module={module['name']}"
            if module["revision"]:
                cap += f"&revision={module['revision']}"
            if module["features"]:
                cap += "&features=" + ",".join(module["features"])
            if module["deviations"]:
                cap += "&deviations=" + ",".join(module["deviations"])
            caps.append(cap)
        return caps

    # -- state for <get> -------------------------------------------------------------

    def state(self) -> list[etree._Element]:
        library = as_datastore_tree(self._yanglib_text)
        # Local file paths (RFC 8525 location, RFC 7895 schema) mean nothing to a
        # client and reveal the server's layout: clients use <get-schema>.
        for elem in list(library.iter(qn(YANGLIB_NS, "location"), qn(YANGLIB_NS, "schema"))):
            if (elem.text or "").startswith("file:"):
                elem.getparent().remove(elem)  # type: ignore[union-attr]
        for content_id in library.iter(qn(YANGLIB_NS, "content-id")):
            content_id.text = self.content_id
            _add_datastores(content_id)
        for set_id in library.iter(qn(YANGLIB_NS, "module-set-id")):
            set_id.text = self.content_id
        return [self._netconf_state(), *list(library), self._system_state()]

    def _netconf_state(self) -> etree._Element:
        server = self.server
        # The identityref values below ("ncm:yang") use the prefix ncm, declared here at the
        # top: lxml drops a declaration on an inner element as redundant with the default
        # namespace when the tree is copied, and the values would lose their prefix.
        nsmap: Any = {None: MON_NS, "ncm": MON_NS}
        state = etree.Element(qn(MON_NS, "netconf-state"), nsmap=nsmap)
        caps = etree.SubElement(state, qn(MON_NS, "capabilities"))
        for cap in server.capabilities():
            etree.SubElement(caps, qn(MON_NS, "capability")).text = cap
        datastores = etree.SubElement(state, qn(MON_NS, "datastores"))
        for name in ("running", "candidate", "startup"):
            ds = etree.SubElement(datastores, qn(MON_NS, "datastore"))
            etree.SubElement(ds, qn(MON_NS, "name")).text = name
            holder = server.locks.get(name)
            if holder is not None:
                locks = etree.SubElement(ds, qn(MON_NS, "locks"))
                glock = etree.SubElement(locks, qn(MON_NS, "global-lock"))
                etree.SubElement(glock, qn(MON_NS, "locked-by-session")).text = str(holder)
                etree.SubElement(glock, qn(MON_NS, "locked-time")).text = date_and_time(
                    server.lock_times.get(name, BOOT_TIME)
                )
        schemas = etree.SubElement(state, qn(MON_NS, "schemas"))
        for module in self._schema_modules():
            schema = etree.SubElement(schemas, qn(MON_NS, "schema"))
            etree.SubElement(schema, qn(MON_NS, "identifier")).text = module.name()
            revisions = [r.date() for r in module.revisions()]
            etree.SubElement(schema, qn(MON_NS, "version")).text = revisions[0] if revisions else ""
            etree.SubElement(schema, qn(MON_NS, "format")).text = "ncm:yang"
            etree.SubElement(schema, qn(MON_NS, "namespace")).text = _module_ns(module)
            etree.SubElement(schema, qn(MON_NS, "location")).text = "NETCONF"
        sessions = etree.SubElement(state, qn(MON_NS, "sessions"))
        for session in list(server.sessions.values()):
            if not session.hello_received:
                continue
            entry = etree.SubElement(sessions, qn(MON_NS, "session"))
            etree.SubElement(entry, qn(MON_NS, "session-id")).text = str(session.id)
            etree.SubElement(entry, qn(MON_NS, "transport")).text = "ncm:netconf-ssh"
            etree.SubElement(entry, qn(MON_NS, "username")).text = session.user
            if session.source_host:
                etree.SubElement(entry, qn(MON_NS, "source-host")).text = session.source_host
            etree.SubElement(entry, qn(MON_NS, "login-time")).text = date_and_time(
                session.login_time
            )
            for name in ("in-rpcs", "in-bad-rpcs", "out-rpc-errors", "out-notifications"):
                value = getattr(session.counters, name.replace("-", "_"))
                etree.SubElement(entry, qn(MON_NS, name)).text = str(value)
        stats = etree.SubElement(state, qn(MON_NS, "statistics"))
        etree.SubElement(stats, qn(MON_NS, "netconf-start-time")).text = date_and_time(
            server.stats.netconf_start_time
        )
        for name in (
            "in-bad-hellos",
            "in-sessions",
            "dropped-sessions",
            "in-rpcs",
            "in-bad-rpcs",
            "out-rpc-errors",
            "out-notifications",
        ):
            etree.SubElement(stats, qn(MON_NS, name)).text = str(
                getattr(server.stats, name.replace("-", "_"))
            )
        return state

    def _system_state(self) -> etree._Element:
        state = default_ns_element(SYS_NS, "system-state")
        plat = etree.SubElement(state, qn(SYS_NS, "platform"))
        uname = os.uname()
        etree.SubElement(plat, qn(SYS_NS, "os-name")).text = uname.sysname
        etree.SubElement(plat, qn(SYS_NS, "os-release")).text = uname.release
        etree.SubElement(plat, qn(SYS_NS, "os-version")).text = uname.version
        etree.SubElement(plat, qn(SYS_NS, "machine")).text = platform.machine()
        clock = etree.SubElement(state, qn(SYS_NS, "clock"))
        etree.SubElement(clock, qn(SYS_NS, "current-datetime")).text = date_and_time(
            datetime.now(UTC)
        )
        etree.SubElement(clock, qn(SYS_NS, "boot-datetime")).text = date_and_time(BOOT_TIME)
        return state

    def _schema_modules(self) -> Iterable[Any]:
        seen: set[str] = set()
        for module in self.server.schema.ctx:
            if module.name() in seen:
                continue
            seen.add(module.name())
            yield module

    # -- get-schema (RFC 6022 3.1) ---------------------------------------------------------

    async def get_schema(self, ctx: RpcContext, op: etree._Element) -> list[etree._Element]:
        identifier = op.findtext(qn(MON_NS, "identifier"))
        if identifier is None or not identifier.strip():
            raise missing_element("identifier", "<get-schema> needs an <identifier>.")
        identifier = identifier.strip()
        version = (op.findtext(qn(MON_NS, "version")) or "").strip() or None
        fmt = (op.findtext(qn(MON_NS, "format")) or "").strip()
        if fmt and fmt.rpartition(":")[2] != "yang":
            raise RpcError(
                "invalid-value",
                f"Schemas are available in YANG format only, not {fmt!r}.",
                type="protocol",
                info=[("bad-element", "format")],
            )
        module = next((m for m in self._schema_modules() if m.name() == identifier), None)
        if module is None:
            raise RpcError(
                "invalid-value",
                f"There is no schema {identifier!r} here.",
                type="protocol",
                info=[("bad-element", "identifier")],
            )
        revisions = [r.date() for r in module.revisions()]
        if version is not None and (not revisions or version != revisions[0]):
            raise RpcError(
                "invalid-value",
                f"Schema {identifier!r} is available in version "
                f"{revisions[0] if revisions else '(none)'}, not {version!r}.",
                type="protocol",
                info=[("bad-element", "version")],
            )
        data = default_ns_element(MON_NS, "data")
        data.text = _module_text(module)
        return [data]

    def validate_rpc_input(self, op: etree._Element) -> None:
        """Check an application RPC's input against its YANG before the application sees it."""
        import libyang

        text = etree.tostring(op).decode()
        ctx = self.server.schema.ctx
        try:
            tree = ctx.parse_op_mem("xml", text, libyang.DataType.RPC_YANG)
        except libyang.LibyangError as exc:
            from nc_core.datastore import issue_to_error

            issues = ctx.take_issues(str(exc))
            raise issue_to_error(issues[0], self.server.index) from None
        if tree is not None:
            tree.free()


def _add_datastores(content_id: etree._Element) -> None:
    """List the NMDA datastores (RFC 8525 /yang-library/datastore) before ``content-id``,
    each with the one schema libyang describes (every datastore holds the same modules).

    The identity's prefix is declared on the <name> element itself, so it survives the
    copies filtering and NACM make of the leaf.
    """
    library = content_id.getparent()
    assert library is not None
    schema = library.find(f"{qn(YANGLIB_NS, 'schema')}/{qn(YANGLIB_NS, 'name')}")
    schema_name = schema.text if schema is not None and schema.text else "complete"
    for name in NMDA_DATASTORES:
        entry = etree.Element(qn(YANGLIB_NS, "datastore"))
        etree.SubElement(entry, qn(YANGLIB_NS, "name"), nsmap={"ds": DS_NS}).text = f"ds:{name}"
        etree.SubElement(entry, qn(YANGLIB_NS, "schema")).text = schema_name
        content_id.addprevious(entry)


def _module_ns(module: Any) -> str:
    return str(ffi.string(module.cdata.ns).decode())


def _module_text(module: Any) -> str:
    path = module.filepath()
    if path and os.path.exists(path):
        with open(path, encoding="utf-8") as source:
            return source.read()
    out = ffi.new("char **")
    if lib.lys_print_mem(out, module.cdata, lib.LYS_OUT_YANG, 0) != lib.LY_SUCCESS:
        raise RpcError("operation-failed", f"Schema {module.name()!r} cannot be printed.")
    try:
        return str(ffi.string(out[0]).decode())
    finally:
        lib.free(out[0])


def register(server: NetconfServer) -> Monitoring:
    monitoring = Monitoring(server)
    server.register(MON_NS, "get-schema", "ietf-netconf-monitoring", monitoring.get_schema)
    return monitoring
