"""XML as NETCONF uses it: namespaces, and a parser that cannot be turned against us.

Every byte a client sends goes through :func:`parse_message`: no DTD is loaded,
no entity is expanded, nothing is fetched from the network, and a document
carrying a DOCTYPE is refused outright (NETCONF never needs one; entity bombs
and external entities always arrive in one).  Depth is bounded by
libxml2's limit (256 levels without XML_PARSE_HUGE), size by the framer.
"""

from __future__ import annotations

from typing import Any

from lxml import etree

NC_NS = "urn:ietf:params:xml:ns:netconf:base:1.0"
NOTIF_NS = "urn:ietf:params:xml:ns:netconf:notification:1.0"
NC_NOTIF_NS = "urn:ietf:params:xml:ns:netmod:notification"
WD_NS = "urn:ietf:params:xml:ns:yang:ietf-netconf-with-defaults"
WD_ATTR_NS = "urn:ietf:params:xml:ns:netconf:default:1.0"
MON_NS = "urn:ietf:params:xml:ns:yang:ietf-netconf-monitoring"
YANGLIB_NS = "urn:ietf:params:xml:ns:yang:ietf-yang-library"
NACM_NS = "urn:ietf:params:xml:ns:yang:ietf-netconf-acm"
SYS_NS = "urn:ietf:params:xml:ns:yang:ietf-system"
NCN_NS = "urn:ietf:params:xml:ns:yang:ietf-netconf-notifications"
NMDA_NS = "urn:ietf:params:xml:ns:yang:ietf-netconf-nmda"
DS_NS = "urn:ietf:params:xml:ns:yang:ietf-datastores"
OR_NS = "urn:ietf:params:xml:ns:yang:ietf-origin"


class XmlRejected(ValueError):
    """The bytes are not a well-formed, acceptable XML document."""


def qn(ns: str, name: str) -> str:
    """Clark notation: ``{ns}name``."""
    return f"{{{ns}}}{name}"


def default_ns_element(ns: str, name: str) -> etree._Element:
    """A new top element in namespace ``ns``, declared as the default namespace.

    (lxml's stubs do not allow the None key of a default-namespace map.)
    """
    nsmap: Any = {None: ns}
    return etree.Element(qn(ns, name), nsmap=nsmap)


def local(tag: object) -> str:
    """Local part of an element's tag ('' for comments and processing instructions)."""
    if not isinstance(tag, str):
        return ""
    return tag.rpartition("}")[2]


def namespace(tag: object) -> str | None:
    if not isinstance(tag, str) or not tag.startswith("{"):
        return None
    return tag[1:].partition("}")[0]


class _RefuseEverything(etree.Resolver):
    """libxml2 may still try to open an external subset; never let it."""

    def resolve(  # type: ignore[override]  # lxml passes a context the stubs omit
        self, system_url: str, public_id: str, context: object
    ) -> None:
        raise XmlRejected("external resources are not allowed")


def _parser() -> etree.XMLParser:
    parser = etree.XMLParser(
        resolve_entities=False,
        no_network=True,
        load_dtd=False,
        dtd_validation=False,
        huge_tree=False,
        remove_comments=True,
        remove_pis=True,
        remove_blank_text=False,
        collect_ids=False,
    )
    parser.resolvers.add(_RefuseEverything())
    return parser


SAFE_PARSER = _parser()
"""The parser every message and stored document goes through (no DTD, no network, no entities)."""

XML_WHITESPACE = b" \t\r\n"
"""XML 1.0's S production: the only bytes a message may start with before its <?xml."""


def parse_message(data: bytes) -> etree._Element:
    """Parse one NETCONF message; raise :class:`XmlRejected` with a reason a person can read.

    Whitespace before the message is dropped: XML allows it before the root element but
    not before an XML declaration, and scrapli writes a newline first (its hello starts
    with one, and each base:1.0 message follows the newline it sends after the previous
    delimiter).  Anything else before the declaration is still not well-formed.
    """
    data = data.lstrip(XML_WHITESPACE)
    # Refuse before libxml2 sees it: a DOCTYPE can name a file (/dev/zero)
    # that the parser would open while reading the external subset.
    if b"<!DOCTYPE" in data or b"<!ENTITY" in data:
        raise XmlRejected("a DOCTYPE is not allowed in NETCONF messages")
    try:
        root = etree.fromstring(data, SAFE_PARSER)
    except etree.XMLSyntaxError as exc:
        raise XmlRejected(f"not well-formed XML: {exc.msg}") from None
    except ValueError as exc:  # e.g. an encoding declaration lxml refuses
        raise XmlRejected(f"not acceptable XML: {exc}") from None
    docinfo: Any = root.getroottree().docinfo
    if docinfo.doctype or docinfo.internalDTD is not None:
        raise XmlRejected("a DOCTYPE is not allowed in NETCONF messages")
    return root


def strip_text(elem: etree._Element) -> str:
    return (elem.text or "").strip()
