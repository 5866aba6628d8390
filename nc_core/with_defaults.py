"""With-defaults capability (RFC 6243) and printing libyang trees.

The server's basic mode is 'explicit' (RFC 6243 Section 3.3): datastore trees
are kept exactly as configured, so an explicit read needs no libyang at all.
The other modes are produced by libyang from the validated tree, which knows
every default: 'report-all' (3.1), 'trim' (3.2) and 'report-all-tagged' (3.4,
default nodes carry wd:default="true").
"""

from __future__ import annotations

from typing import Any

from _libyang import ffi, lib
from lxml import etree

from nc_core.errors import RpcError, bad_element
from nc_core.xmlutil import NC_NS, WD_ATTR_NS, WD_NS, XmlRejected, parse_message, qn

MODES = ("report-all", "trim", "explicit", "report-all-tagged")
BASIC_MODE = "explicit"
CAPABILITY = (
    "urn:ietf:params:netconf:capability:with-defaults:1.0"
    "?basic-mode=explicit&also-supported=report-all,report-all-tagged,trim"
)

_FLAGS = {
    "report-all": lib.LYD_PRINT_WD_ALL,
    "trim": lib.LYD_PRINT_WD_TRIM,
    "explicit": lib.LYD_PRINT_WD_EXPLICIT,
    "report-all-tagged": lib.LYD_PRINT_WD_ALL_TAG,
}


def requested_mode(operation: etree._Element) -> str:
    """The <with-defaults> parameter of get, get-config or copy-config (RFC 6243 4.5).

    Given twice it is refused, as the base operations' own parameters are
    (nc_core.base_ops.parameters): which one was meant cannot be known.
    """
    found = operation.findall(qn(WD_NS, "with-defaults"))
    if not found:
        return BASIC_MODE
    if len(found) > 1:
        raise bad_element("with-defaults", "The <with-defaults> parameter is given twice.")
    elem = found[0]
    mode = (elem.text or "").strip()
    if mode not in MODES:
        raise RpcError(
            "invalid-value",
            f"with-defaults {mode!r} is not one of {', '.join(MODES)}.",
            type="protocol",
            info=[("bad-element", "with-defaults")],
        )
    return mode


def print_xml(tree: Any, mode: str = BASIC_MODE) -> str:
    """All sibling trees of ``tree`` as XML text, defaults per ``mode``."""
    if tree is None:
        return ""
    out = ffi.new("char **")
    flags = lib.LYD_PRINT_WITHSIBLINGS | lib.LYD_PRINT_SHRINK | _FLAGS[mode]
    ret = lib.lyd_print_mem(out, tree.cdata, lib.LYD_XML, flags)
    if ret != lib.LY_SUCCESS:
        raise RuntimeError("libyang could not print the data tree")
    if out[0] == ffi.NULL:
        return ""
    try:
        return str(ffi.string(out[0]).decode())
    finally:
        lib.free(out[0])


def as_datastore_tree(text: str) -> etree._Element:
    """Wrap printed top-level nodes in a <data> element.

    libyang tags defaults with the ietf-netconf-with-defaults module's
    namespace; NETCONF's attribute is in urn:ietf:params:xml:ns:netconf:default:1.0
    (RFC 6243 Section 6), so tags are moved there.
    """
    try:
        root = parse_message(f'<data xmlns="{NC_NS}">{text}</data>'.encode())
    except XmlRejected as exc:  # pragma: no cover - libyang prints well-formed XML
        raise RuntimeError(f"libyang printed unparsable XML: {exc}") from exc
    yang_tag, netconf_tag = qn(WD_NS, "default"), qn(WD_ATTR_NS, "default")
    if WD_NS in text:
        for elem in root.iter():
            value = elem.get(yang_tag)
            if value is not None:
                del elem.attrib[yang_tag]
                elem.set(netconf_tag, value)
    return root


def add_implicit_defaults(tree: Any) -> None:
    """Create every default node a parse-only tree lacks (validation does this itself)."""
    if tree is None:
        return
    node_p = ffi.new("struct lyd_node **", tree.cdata)
    lib.lyd_new_implicit_all(node_p, ffi.NULL, 0, ffi.NULL)
