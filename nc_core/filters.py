"""The <filter> of <get> and <get-config>: subtree (RFC 6241 Section 6) and XPath (Section 8.9).

Both kinds of filter work in two steps.  First they *select*: they build a
:data:`Selection`, a sparse tree of references into the datastore saying, for
each chosen node, "all of it" or "only these children".  Then :func:`_build`
copies what was selected, walking the datastore in document order.  Selecting
before copying is what makes the awkward parts simple: several filter nodes (or
XPath union branches) that reach the same data merge into one entry instead of
duplicating it, the reply keeps the datastore's order whatever order the filter
was written in, no subtree is deep-copied twice, and the datastore itself is
never touched.  :func:`_build` is also the one place that adds the key leaves
of every list entry that appears only in part, so the reply stays a valid
instance of the data model whichever filter produced it.

XPath is evaluated by libxml2 (through lxml) with only the core function
library: lxml's EXSLT regular expressions are switched off, and variable
references are refused (RFC 6241 gives the expression no variable bindings).
An XPath filter's absolute paths start at the conceptual root whose children
are the top-level data nodes, while our datastore is one ``<data>`` element
inside its document, so absolute paths are re-anchored on ``<data>`` by a small
tokenizer (XPath 1.0 Section 3.7) before evaluation.  The same tokenizer
makes unprefixed element names match by local name: every data node has a
namespace, so such a name could never match, yet yangcli and others send them
(``/vpn-service/vpn``) and established servers accept them.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Container, Iterable, Sequence
from typing import Any

from lxml import etree

from nc_core.errors import RpcError
from nc_core.xmlutil import NC_NS, local, namespace, qn, strip_text

KeysOf = Callable[[etree._Element], Sequence[str]]
"""Given a data element, return the Clark-notation tags ('{ns}name') of its list keys if it is a
list entry, else ()."""

Selection = dict[etree._Element, "Selection | None"]
"""Data children chosen under one data node: None means the whole subtree, a Selection means only
those children (plus the node's list keys).  An empty Selection selects nothing."""


def apply_filter(
    data: etree._Element, filter_elem: etree._Element | None, keys_of: KeysOf
) -> etree._Element:
    """Return a NEW <data> element holding copies of what the filter selects (data is not modified).

    filter_elem is the client's <filter> element (namespace NC_NS) or None (no filter: everything).
    type attribute absent or 'subtree' -> subtree; 'xpath' -> XPath using its 'select' attribute,
    with namespace prefixes resolved from the filter element's own in-scope namespace declarations
    (filter_elem.nsmap); anything else -> RpcError.  An empty subtree filter (<filter
    type='subtree'/> with no children) selects nothing (RFC 6241 6.4.2).
    """
    if filter_elem is None:
        return _build(data, None, keys_of)
    kind = _filter_attr(filter_elem, "type") or "subtree"
    if kind == "subtree":
        return _build(data, _subtree_top(data, _element_children(filter_elem)), keys_of)
    if kind == "xpath":
        return _build(data, _xpath_selection(data, filter_elem), keys_of)
    raise RpcError(
        "bad-attribute",
        f"Unknown filter type {kind!r}: expected 'subtree' or 'xpath'.",
        type="protocol",
        info=[("bad-attribute", "type"), ("bad-element", "filter")],
    )


def _filter_attr(filter_elem: etree._Element, name: str) -> str | None:
    # RFC 6241's schema has unqualified attributes; some clients qualify them with nc:.
    return filter_elem.get(name, filter_elem.get(qn(NC_NS, name)))


def _element_children(elem: etree._Element) -> list[etree._Element]:
    return [child for child in elem if isinstance(child.tag, str)]


# -- building the reply ------------------------------------------------------------------------


def _build(data: etree._Element, selection: Selection | None, keys_of: KeysOf) -> etree._Element:
    out = etree.Element(data.tag, nsmap=_declarations(data, None))
    if selection is None:
        for child in _element_children(data):
            out.append(_copy_whole(child))
    else:
        _copy_children(data, selection, out, keys_of, ())
    return out


def _declarations(elem: etree._Element, parent: etree._Element | None) -> dict[Any, str]:
    """The namespace declarations elem needs under parent, to keep the datastore's prefixes."""
    # dict[Any, ...]: lxml-stubs say str keys, but None (the default namespace) is a valid key.
    inherited = parent.nsmap if parent is not None else {}
    return {p: uri for p, uri in elem.nsmap.items() if inherited.get(p) != uri}


def _copy_whole(elem: etree._Element) -> etree._Element:
    clone = copy.deepcopy(elem)
    clone.tail = None
    return clone


def _copy_children(
    src: etree._Element,
    selection: Selection,
    out: etree._Element,
    keys_of: KeysOf,
    keys: Sequence[str],
) -> None:
    """Copy src's selected children (and, src being a list entry, its keys) into out."""
    for child in _element_children(src):
        if child in selection:
            sub = selection[child]
            if sub is None:
                out.append(_copy_whole(child))
            else:
                nsmap = _declarations(child, out)
                part = etree.SubElement(out, child.tag, nsmap=nsmap)
                for name, value in child.attrib.items():
                    part.set(name, value)
                _copy_children(child, sub, part, keys_of, keys_of(child))
        elif child.tag in keys:
            out.append(_copy_whole(child))


def _merge(selection: Selection, node: etree._Element, sub: Selection | None) -> None:
    """Add node (whole if sub is None, else its sub-selection) to selection, as a union."""
    if sub == {}:
        return  # a containment node that matched nothing underneath
    if node not in selection:
        selection[node] = sub
        return
    have = selection[node]
    if have is None or sub is None:
        selection[node] = None
        return
    for child, child_sub in sub.items():
        _merge(have, child, child_sub)


# -- subtree filtering (RFC 6241 Section 6) ----------------------------------------------------


def _subtree_top(data: etree._Element, filters: list[etree._Element]) -> Selection:
    """Each top-level filter node is applied on its own and the results are united.

    The "content match nodes decide for the whole sibling set" rule of 6.2.5 is not applied
    to the top level: there it would turn one failing leaf match in one module into an empty
    reply for every module, or one successful match into the whole datastore.
    """
    selection: Selection = {}
    children = _Children(data)
    for f in filters:
        for child in children.candidates(f):
            if not _is_content_match(f) or _same_text(f, child):
                _merge(selection, child, _select_node(f, child))
    return selection


def _select_node(f: etree._Element, node: etree._Element) -> Selection | None:
    """What filter node f (already known to match node) selects of node."""
    f_children = _element_children(f)
    if not f_children:
        return None  # selection node (or a content match node, a leaf): all of it
    return _select_children(node, f_children)


def _select_children(parent: etree._Element, filters: list[etree._Element]) -> Selection | None:
    """Apply one sibling set of filter nodes to the children of one data instance (6.2.5)."""
    children = _Children(parent)
    content = [f for f in filters if _is_content_match(f)]
    others = [f for f in filters if not _is_content_match(f)]
    selection: Selection = {}
    for f in content:
        hits = [c for c in children.named(f) if _same_text(f, c)]
        if not hits:
            return {}  # one false content match: nothing of this instance is selected
        for hit in hits:
            selection[hit] = None
    if not others:
        return None  # only content match nodes, all true: the whole instance
    for f in others:
        for child in children.candidates(f):
            _merge(selection, child, _select_node(f, child))
    return selection


def _is_content_match(f: etree._Element) -> bool:
    return not _element_children(f) and strip_text(f) != ""


def _same_text(f: etree._Element, node: etree._Element) -> bool:
    return strip_text(f) == strip_text(node)


class _Children:
    """The children of one data instance, indexed for the filter nodes applied to them."""

    def __init__(self, parent: etree._Element) -> None:
        self._by_name: dict[str, list[etree._Element]] = {}
        for child in _element_children(parent):
            self._by_name.setdefault(local(child.tag), []).append(child)
        self._by_value: dict[tuple[str, str], dict[str, list[etree._Element]]] = {}

    def named(self, f: etree._Element) -> list[etree._Element]:
        """The children f matches."""
        return _matching(f, self._by_name.get(local(f.tag), ()))

    def candidates(self, f: etree._Element) -> list[etree._Element]:
        """The children f may select.

        If f tests a leaf's value (a list key, typically), only the entries having that value
        are candidates, and the entries are indexed by that leaf once: a filter picking many
        entries of a long list then takes linear, not quadratic, time.
        """
        probe = next((c for c in _element_children(f) if _is_content_match(c)), None)
        if probe is None:
            return self.named(f)
        key = (local(f.tag), local(probe.tag))
        if key not in self._by_value:
            index = self._by_value[key] = {}
            for entry in self._by_name.get(key[0], ()):
                leaves = _element_children(entry)
                for value in {strip_text(leaf) for leaf in leaves if local(leaf.tag) == key[1]}:
                    index.setdefault(value, []).append(entry)
        return _matching(f, self._by_value[key].get(strip_text(probe), ()))


def _matching(f: etree._Element, nodes: Iterable[etree._Element]) -> list[etree._Element]:
    """The nodes filter node f names (6.2.1) whose attributes it matches (6.2.2)."""
    f_ns = namespace(f.tag)  # None for xmlns="": then any namespace will do
    return [
        node
        for node in nodes
        if local(node.tag) == local(f.tag)
        and (f_ns is None or node.tag == f.tag)
        and all(node.get(name) == value for name, value in f.attrib.items())
    ]


# -- XPath filtering (RFC 6241 Section 8.9) ----------------------------------------------------

_ROOT_VAR = "root"
"""The variable bound to <data> that absolute paths are re-anchored on."""

_TOKEN = re.compile(
    r"""\s*(?:
        (?P<literal>"[^"]*"|'[^']*')
      | (?P<number>\d+(?:\.\d*)?|\.\d+)
      | (?P<name>[^\W\d][\w.\-]*(?::(?:[^\W\d][\w.\-]*|\*))?)
      | (?P<op>//|::|\.\.|!=|<=|>=|[/().\[\]@,|+\-=<>*$])
      | (?P<other>\S)
    )""",
    re.VERBOSE,
)
_OPERATOR_NAMES = frozenset({"and", "or", "mod", "div"})
_ENDS_OPERAND = frozenset({")", "]", ".", ".."})
_STARTS_STEP = frozenset({"*", ".", "..", "@"})


def _bad_select(message: str) -> RpcError:
    return RpcError(
        "invalid-value",
        message,
        type="protocol",
        info=[("bad-attribute", "select"), ("bad-element", "filter")],
    )


def _anchor_absolute_paths(select: str, prefixes: Container[str]) -> str:
    """Make every absolute location path in select start at $root instead of the document.

    A '/' or '//' starts an absolute path exactly where an operand may start: at the
    beginning, or after '(', '[', ',', '@', '::' or an operator (XPath 1.0 Section 3.7).
    Undeclared prefixes and variable references are refused here, by name.
    """
    edits: list[tuple[int, int, str]] = []
    operand_next = True
    lone_slash: int | None = None  # position of an absolute '/' that may be the whole path
    before, previous = "", ""  # the two tokens before this one
    for m in _TOKEN.finditer(select):
        kind = m.lastgroup or "other"
        tok, start = m[kind], m.start(kind)
        axis = f"{before}{previous}"
        if lone_slash is not None:
            if kind != "name" and tok not in _STARTS_STEP:
                edits.append((lone_slash, lone_slash + 1, ""))  # '/' alone: <data> itself
            lone_slash = None
        if kind == "name" and not operand_next and tok in _OPERATOR_NAMES:
            operand_next = True
        elif kind == "name":
            prefix, colon, _ = tok.partition(":")
            if colon and prefix not in prefixes and prefix != "xml":
                raise _bad_select(
                    f"The XPath prefix {prefix!r} is not declared on the <filter> element."
                )
            if not colon and _is_element_name_test(select, m.end(kind), previous, axis):
                # Every data node has a namespace, so an unprefixed name test could
                # never match; clients such as yangcli send /vpn-service/vpn all the
                # same, and servers (netconfd, ConfD) match such names by local name.
                edits.append((start, start + len(tok), f"*[local-name()='{tok}']"))
            operand_next = False
        elif kind == "op" and tok == "$":
            raise _bad_select("XPath variables are not available in a filter.")
        elif kind == "op" and tok in ("/", "//") and operand_next:
            edits.append((start, start, f"${_ROOT_VAR}"))
            lone_slash = start if tok == "/" else None
        elif kind == "op" and tok == "*":
            operand_next = not operand_next  # name test, or the multiplication operator
        elif kind == "op":
            operand_next = tok not in _ENDS_OPERAND
        else:  # literal, number, or something lxml will reject
            operand_next = False
        before, previous = previous, tok
    if lone_slash is not None:
        edits.append((lone_slash, lone_slash + 1, ""))
    pieces: list[str] = []
    pos = 0
    for begin, end, text in edits:
        pieces += [select[pos:begin], text]
        pos = end
    pieces.append(select[pos:])
    return "".join(pieces)


def _is_element_name_test(select: str, end: int, previous: str, axis: str) -> bool:
    """Is the unprefixed name ending at ``end`` a name test on elements?

    Not a function call or node-type test (followed by '('), not an axis name
    (followed by '::'), not an attribute (after '@' or 'attribute::').
    """
    rest = select[end:].lstrip()
    if rest.startswith(("(", "::")):
        return False
    return previous != "@" and axis != "attribute::"


def _xpath_selection(data: etree._Element, filter_elem: etree._Element) -> Selection | None:
    select = _filter_attr(filter_elem, "select")
    if select is None:
        raise RpcError(
            "missing-attribute",
            "An XPath filter needs a 'select' attribute.",
            type="protocol",
            info=[("bad-attribute", "select"), ("bad-element", "filter")],
        )
    prefixes = {p: uri for p, uri in filter_elem.nsmap.items() if p}
    expr = _anchor_absolute_paths(select, prefixes)
    try:
        xpath = etree.XPath(expr, namespaces=prefixes, regexp=False, smart_strings=True)
        variables: dict[str, Any] = {_ROOT_VAR: [data]}
        result = xpath(data, **variables)
    except etree.XPathError as exc:
        raise _bad_select(f"The XPath expression {select!r} is not valid: {exc}.") from None
    if not isinstance(result, list):
        raise _bad_select(
            f"The XPath expression {select!r} must select nodes, not compute a "
            f"{type(result).__name__} value."
        )
    selection: Selection = {}
    for item in result:
        node = _owner_element(item)
        if node is data:
            return None  # the root itself: everything
        if node is not None:
            _add_path(selection, data, node)
    return selection


def _owner_element(item: object) -> etree._Element | None:
    """The element a selected node stands for: itself, or the parent of a text or attribute."""
    if isinstance(item, etree._ElementUnicodeResult):
        item = item.getparent()
    if isinstance(item, etree._Element) and not isinstance(item.tag, str):
        item = item.getparent()  # a comment or processing instruction
    return item if isinstance(item, etree._Element) else None  # namespace nodes: nothing


def _add_path(selection: Selection, data: etree._Element, node: etree._Element) -> None:
    """Select node whole and its ancestors up to data in part (nothing if node is outside data)."""
    path = [node]
    for ancestor in node.iterancestors():
        if ancestor is data:
            break
        path.append(ancestor)
    else:
        return
    level = selection
    for ancestor in reversed(path[1:]):
        sub = level.setdefault(ancestor, {})
        if sub is None:
            return  # an ancestor is already selected whole
        level = sub
    level[node] = None
