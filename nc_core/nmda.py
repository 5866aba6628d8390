"""NMDA: the datastores of RFC 8342 and the NETCONF operations of RFC 8526.

<get-data> reads any of the four datastores the servers implement --
running, candidate, startup and operational -- named by an identity of
ietf-datastores (``ds:running``).  <operational> is what <get> returns: the
configuration of running, which is also what is applied (a change of running
is applied by the application's transaction before it is acknowledged, and
rolled back if it cannot be), plus the state data.  The filters are those of
<get> and <get-config> (nc_core.filters, with the same cost budget), and NACM
read access is enforced the same way, on the whole tree before filtering.

<edit-data> edits running or candidate through the very path of <edit-config>
(nc_core.base_ops.edit): the nc:operation attribute of ietf-netconf, NACM write
checks, locks, confirmed commits, validation and the application's transaction.

Origin (RFC 8342 Section 5.3.4, ``<with-origin/>``) is given to configuration
nodes of <operational> only, as ietf-origin defines it; a node without the
annotation has its parent's origin:

- ``or:intended``: in running (which is also the intended configuration: there
  is no template or inactive configuration here);
- ``or:default``: not in running, but in use as a YANG default (reported only
  with ``with-defaults`` report-all or report-all-tagged);
- ``or:system``: any other configuration node the server itself reports.

State (config false) nodes have no origin and are not affected by origin
filters (RFC 8526 3.1.1).  Nothing is learned or dynamic here, so ``or:learned``
and ``or:dynamic`` are never given.
"""

from __future__ import annotations

from copy import deepcopy
from typing import TYPE_CHECKING, Any

from lxml import etree

from nc_core.base_ops import edit
from nc_core.edit import DEFAULT_OPERATIONS, Instances, instance_identity, schema_of
from nc_core.errors import RpcError, bad_element, missing_element, operation_not_supported
from nc_core.monitoring import NMDA_DATASTORES
from nc_core.schema import SchemaNode
from nc_core.with_defaults import requested_mode
from nc_core.xmlutil import DS_NS, NC_NS, NMDA_NS, OR_NS, WD_ATTR_NS, WD_NS, local, namespace, qn

if TYPE_CHECKING:
    from nc_core.server import NetconfServer, RpcContext

MODULE = "ietf-netconf-nmda"
FEATURES = ("origin", "with-defaults")
CAPABILITIES = (
    "urn:ietf:params:netconf:capability:with-operational-defaults:1.0"
    "?basic-mode=explicit&also-supported=report-all,report-all-tagged,trim",
)
"""RFC 8526 3.1.1.2: <with-defaults> applies to <operational> too, as to <get>."""

WRITABLE = ("running", "candidate")
ORIGINS = ("intended", "dynamic", "system", "learned", "default", "unknown")
ORIGIN_ATTR = qn(OR_NS, "origin")
DEFAULT_ATTR = qn(WD_ATTR_NS, "default")

GET_DATA = frozenset(
    {
        "datastore",
        "subtree-filter",
        "xpath-filter",
        "config-filter",
        "origin-filter",
        "negated-origin-filter",
        "max-depth",
        "with-origin",
    }
)
EDIT_DATA = frozenset({"datastore", "default-operation", "config", "url"})
REPEATABLE = frozenset({"origin-filter", "negated-origin-filter"})


def register(server: NetconfServer) -> None:
    server.register(NMDA_NS, "get-data", MODULE, get_data)
    server.register(NMDA_NS, "edit-data", MODULE, edit_data)


# -- parameters ------------------------------------------------------------------------


def _invalid(name: str, message: str) -> RpcError:
    return RpcError("invalid-value", message, type="protocol", info=[("bad-element", name)])


def parameters(op: etree._Element, allowed: frozenset[str]) -> dict[str, list[etree._Element]]:
    """The parameters of an ietf-netconf-nmda operation by name, in its namespace.

    RFC 6243's <with-defaults> is read by nc_core.with_defaults; anything else not a
    parameter is unknown-element, a parameter given twice (other than a leaf-list) is
    bad-element: none is silently ignored.
    """
    op_name = local(op.tag)
    found: dict[str, list[etree._Element]] = {}
    for child in op:
        if not isinstance(child.tag, str) or child.tag == qn(WD_NS, "with-defaults"):
            continue
        name = local(child.tag)
        if namespace(child.tag) != NMDA_NS or name not in allowed:
            takes = ", ".join(f"<{p}>" for p in sorted(allowed))
            raise RpcError(
                "unknown-element",
                f"<{name}> (namespace {namespace(child.tag)!r}) is not a parameter of "
                f"<{op_name}>, which takes {takes} in namespace {NMDA_NS!r}.",
                type="protocol",
                info=[("bad-element", name)],
            )
        if name in found and name not in REPEATABLE:
            raise bad_element(name, f"<{op_name}> has the <{name}> parameter twice.")
        found.setdefault(name, []).append(child)
    return found


def _one(params: dict[str, list[etree._Element]], name: str) -> etree._Element | None:
    elems = params.get(name)
    return elems[0] if elems else None


def identity(elem: etree._Element, module_ns: str, what: str) -> str:
    """The local name of the identity ``elem``'s text names, if it is one of the module of
    ``module_ns``: the prefix is resolved in ``elem``'s in-scope namespaces (RFC 7950
    9.10.3; no prefix is the default namespace)."""
    text = (elem.text or "").strip()
    prefix, _, name = text.rpartition(":")
    uri = elem.nsmap.get(prefix or None)
    if name and uri == module_ns:
        return name
    tag = local(elem.tag)
    if not prefix:
        where = f"without a prefix it is in the default namespace, {uri!r}"
    elif uri is None:
        where = f"its prefix {prefix!r} is not declared"
    else:
        where = f"its prefix {prefix!r} is bound to {uri!r}"
    raise _invalid(
        tag,
        f"{text!r} is not {what} ({module_ns}): {where}.  Write e.g. "
        f'<{tag} xmlns:ds="{DS_NS}">ds:running</{tag}>.'
        if module_ns == DS_NS
        else f"{text!r} is not {what} ({module_ns}): {where}.",
    )


def datastore_named(elem: etree._Element, allowed: tuple[str, ...], role: str) -> str:
    """The datastore a <datastore> (ds:datastore-ref) names, one of ``allowed`` for
    ``role`` (else invalid-value, naming it and what is allowed)."""
    text = (elem.text or "").strip()
    name = identity(elem, DS_NS, "an identity of ietf-datastores")
    if name in allowed:
        return name
    choices = ", ".join("ds:" + a for a in allowed)
    if name not in NMDA_DATASTORES:
        message = f"Datastore {text!r} is not implemented by this server; {role} may be {choices}."
    else:
        message = f"Datastore {text!r} cannot be {role}; it may be {choices}."
    raise _invalid("datastore", message)


def _datastore(
    op: etree._Element,
    params: dict[str, list[etree._Element]],
    allowed: tuple[str, ...],
    role: str,
) -> str:
    elem = _one(params, "datastore")
    if elem is None:
        raise missing_element("datastore", f"<{local(op.tag)}> needs a <datastore> parameter.")
    return datastore_named(elem, allowed, role)


def _boolean(elem: etree._Element) -> bool:
    text = (elem.text or "").strip()
    if text not in ("true", "false"):
        raise _invalid(local(elem.tag), f"<{local(elem.tag)}> {text!r} is not true or false.")
    return text == "true"


def _max_depth(elem: etree._Element | None) -> int | None:
    if elem is None:
        return None
    text = (elem.text or "").strip()
    if text == "unbounded":
        return None
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise _invalid("max-depth", f"<max-depth> {text!r} is not 1..65535 or 'unbounded'.")
    return int(text)


def _content_filter(params: dict[str, list[etree._Element]]) -> etree._Element | None:
    """<subtree-filter> or <xpath-filter> as the <filter> nc_core.filters reads."""
    subtree, xpath = _one(params, "subtree-filter"), _one(params, "xpath-filter")
    if subtree is not None and xpath is not None:
        raise bad_element(
            "xpath-filter", "<get-data> takes <subtree-filter> or <xpath-filter>, not both."
        )
    if subtree is not None:
        filter_elem = etree.Element(qn(NC_NS, "filter"), type="subtree")
        for child in subtree:
            if isinstance(child.tag, str):
                filter_elem.append(deepcopy(child))
        return filter_elem
    if xpath is not None:
        # The expression's prefixes are those in scope on <xpath-filter> (RFC 8526).
        nsmap: Any = dict(xpath.nsmap)
        filter_elem = etree.Element(qn(NC_NS, "filter"), nsmap=nsmap)
        filter_elem.set("type", "xpath")
        filter_elem.set("select", (xpath.text or "").strip())
        return filter_elem
    return None


# -- get-data (RFC 8526 3.1.1) ---------------------------------------------------------


async def get_data(ctx: RpcContext, op: etree._Element) -> list[etree._Element]:
    server, session = ctx.server, ctx.session
    params = parameters(op, GET_DATA)
    name = _datastore(op, params, NMDA_DATASTORES, "read by <get-data>")
    mode = requested_mode(op)
    with_origin = _one(params, "with-origin") is not None
    origin_filter = _origin_filter(params)
    if name != "operational":
        for given in ("with-origin", "origin-filter", "negated-origin-filter"):
            if given in params:
                raise _invalid(given, f"<{given}> applies to ds:operational only, not ds:{name}.")
    config_elem = _one(params, "config-filter")
    config_filter = _boolean(config_elem) if config_elem is not None else None
    depth = _max_depth(_one(params, "max-depth"))
    filter_elem = _content_filter(params)

    annotate = with_origin or origin_filter is not None
    if name == "operational":
        # Defaults must be told from the rest to be given or:default.
        tagged = "report-all-tagged" if annotate and mode == "report-all" else mode
        root = server.readable(session, await server.full_tree(session, tagged))
    else:
        tagged = mode
        root = server.readable_config(name, session, mode)  # not to be modified
    if config_filter is not None:
        root = _by_config(server, root, config_filter)
    selected = await server.filters.apply(
        root, filter_elem, server.keys_of, user=session.user, max_depth=depth
    )
    # The prefixes the copied tree declared at its top stay declared (values may use them).
    nsmap: Any = {p: uri for p, uri in selected.nsmap.items() if p}
    nsmap[None] = NMDA_NS
    if annotate:
        nsmap["or"] = OR_NS
    data = etree.Element(qn(NMDA_NS, "data"), nsmap=nsmap)
    for child in list(selected):
        data.append(child)
    if annotate:
        Origins(server, with_origin, origin_filter).apply(data)
    if tagged != mode:
        for elem in data.iter():
            if DEFAULT_ATTR in elem.attrib:
                del elem.attrib[DEFAULT_ATTR]
    return [data]


def _by_config(server: NetconfServer, root: etree._Element, config: bool) -> etree._Element:
    """A copy of ``root`` with only config true (``config``) or config false nodes, and
    the ancestors (with their list keys) of the nodes kept (RFC 8526 config-filter)."""
    nsmap: Any = root.nsmap
    out = etree.Element(root.tag, nsmap=nsmap)
    _copy_by_config(server, root, None, out, config)
    return out


def _copy_by_config(
    server: NetconfServer,
    src: etree._Element,
    snode: SchemaNode | None,
    out: etree._Element,
    config: bool,
) -> bool:
    """Copy into ``out`` the children of ``src`` that pass; whether any but keys did."""
    keys = set(server.keys_of(src)) if snode is not None and snode.kind == "list" else set()
    kept = False
    copied_keys = []
    for child in src:
        if not isinstance(child.tag, str):
            continue
        child_snode = schema_of(server.index, snode, child)
        if child_snode is None or not child_snode.config:  # state, and all beneath it
            if not config:
                out.append(deepcopy(child))
                kept = True
        elif child.tag in keys or (config and len(child) == 0):
            out.append(deepcopy(child))
            if child.tag in keys:
                copied_keys.append(out[-1])
            else:
                kept = True
        else:
            nsmap: Any = child.nsmap
            part = etree.SubElement(out, child.tag, nsmap=nsmap)
            for attr, value in child.attrib.items():
                part.set(attr, value)
            if _copy_by_config(server, child, child_snode, part, config) or config:
                kept = True
            else:
                out.remove(part)
    if not kept and not config:
        for key in copied_keys:
            out.remove(key)
    return kept


def _origin_filter(params: dict[str, list[etree._Element]]) -> tuple[set[str], bool] | None:
    """The origins asked for and whether the filter is negated (RFC 8526 origin-filters)."""
    plain, negated = params.get("origin-filter"), params.get("negated-origin-filter")
    if plain and negated:
        raise bad_element(
            "negated-origin-filter",
            "<get-data> takes <origin-filter> or <negated-origin-filter>, not both.",
        )
    elems = plain or negated
    if not elems:
        return None
    names = {identity(e, OR_NS, "an identity of ietf-origin") for e in elems}
    unknown = names - {*ORIGINS, "origin"}
    if unknown:
        raise _invalid(local(elems[0].tag), f"No origin {', '.join(sorted(unknown))}.")
    return names, bool(negated)


class Origins:
    """Gives configuration nodes of <operational> their origin, and applies origin filters
    (see the module's docstring for the mapping)."""

    def __init__(
        self,
        server: NetconfServer,
        annotate: bool,
        origin_filter: tuple[set[str], bool] | None,
    ) -> None:
        self.server = server
        self.annotate = annotate
        self.filter = origin_filter
        self.instances = Instances()

    def matches(self, origin: str) -> bool:
        if self.filter is None:
            return True
        names, negated = self.filter
        hit = origin in names or "origin" in names  # every origin derives from or:origin
        return hit != negated

    def apply(self, data: etree._Element) -> None:
        running = self.server.datastores["running"].root
        for child in list(data):
            if isinstance(child.tag, str) and not self._walk(child, None, running, None):
                data.remove(child)

    def _walk(
        self,
        node: etree._Element,
        parent_snode: SchemaNode | None,
        running_parent: etree._Element | None,
        inherited: str | None,
    ) -> bool:
        """Annotate ``node`` and what is under it; whether it stays (matches the origin
        filter, is state, or holds something that stays)."""
        snode = schema_of(self.server.index, parent_snode, node)
        if snode is None or not snode.config:
            return True  # state: no origin, not filtered
        match = None
        if running_parent is not None:
            match = self.instances.find(
                running_parent, node.tag, snode, instance_identity(node, snode)
            )
        if match is not None:
            origin = "intended"
        elif _all_default(node):
            origin = "default"
        else:
            origin = "system"
        if self.annotate and origin != inherited:
            node.set(ORIGIN_ATTR, f"or:{origin}")
        keys = set(self.server.keys_of(node)) if snode.kind == "list" else set()
        dropped = []
        holds = False  # something other than a key stays beneath
        for child in list(node):
            if not isinstance(child.tag, str):
                continue
            if self._walk(child, snode, match, origin):
                holds = holds or child.tag not in keys
            elif child.tag not in keys:
                dropped.append(child)
        stays = self.matches(origin) or holds
        if stays:
            for child in dropped:
                node.remove(child)
        return stays


def _all_default(node: etree._Element) -> bool:
    """Is ``node`` a default (wd:default="true"), or made only of defaults?"""
    if node.get(DEFAULT_ATTR) == "true":
        return True
    children = [c for c in node if isinstance(c.tag, str)]
    return bool(children) and all(_all_default(c) for c in children)


# -- edit-data (RFC 8526 3.1.2) ------------------------------------------------------------


async def edit_data(ctx: RpcContext, op: etree._Element) -> None:
    params = parameters(op, EDIT_DATA)
    name = _datastore(
        op,
        params,
        WRITABLE,
        "edited by <edit-data> (startup is written by <copy-config>, operational by "
        "editing running)",
    )
    default_op = "merge"
    default_elem = _one(params, "default-operation")
    if default_elem is not None:
        default_op = (default_elem.text or "").strip()
        if default_op not in DEFAULT_OPERATIONS:
            raise _invalid(
                "default-operation",
                f"<default-operation> {default_op!r} is not one of "
                f"{', '.join(sorted(DEFAULT_OPERATIONS))}.",
            )
    if "url" in params:
        raise operation_not_supported("The :url capability is not supported.")
    config = _one(params, "config")
    if config is None:
        raise missing_element("config", "<edit-data> needs a <config> parameter.")
    await edit(ctx, name, config, default_op, operation="edit-data")
