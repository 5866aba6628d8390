"""The <filter> of <get> and <get-config>: subtree (RFC 6241 Section 6) and XPath (Section 8.9).

Both kinds of filter work in two steps.  First they *select*: they build a
:data:`Selection`, a sparse tree of references into the datastore saying, for
each chosen node, "all of it" or "only these children".  Then :func:`build`
copies what was selected, walking the datastore in document order.  Selecting
before copying is what makes the awkward parts simple: several filter nodes (or
XPath union branches) that reach the same data merge into one entry instead of
duplicating it, the reply keeps the datastore's order whatever order the filter
was written in, no subtree is deep-copied twice, and the datastore itself is
never touched.  :func:`build` is also the one place that adds the key leaves
of every list entry that appears only in part, so the reply stays a valid
instance of the data model whichever filter produced it.

The two steps are public (:func:`select`, :func:`build`) because the first may
be expensive: an XPath expression can cost polynomial time in the size of the
data (``//*[count(//*[count(//*) > 0]) > 0]`` is cubic).  :func:`cheap` says
whether a filter's cost is provably near-linear, so that it may run on the
server's event loop; the others are selected in a worker process under a time
budget (nc_core.filter_worker) and the selection is built here.

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
from collections.abc import Callable, Container, Iterable, Iterator, Sequence
from dataclasses import dataclass
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

    filter_elem is the client's <filter> element (in the base namespace or none, as
    nc_core.base_ops.parameters accepts it) or None (no filter: everything).
    type attribute absent or 'subtree' -> subtree; 'xpath' -> XPath using its 'select' attribute,
    with namespace prefixes resolved from the filter element's own in-scope namespace declarations
    (filter_elem.nsmap); anything else -> RpcError.  An empty subtree filter (<filter
    type='subtree'/> with no children) selects nothing (RFC 6241 6.4.2).
    """
    return build(data, select(data, filter_elem, keys_of), keys_of)


def select(
    data: etree._Element,
    filter_elem: etree._Element | None,
    keys_of: KeysOf,
    *,
    max_steps: int | None = None,
) -> Selection | None:
    """Validate the filter and choose what it selects of data: None for everything.

    The first half of :func:`apply_filter`, the half whose cost depends on the filter: it
    can run in another process on a copy of data (nc_core.filter_worker), the selection
    being mapped back onto data there.  keys_of is not needed to select (only to build);
    it is taken for symmetry with :func:`build`.  Raises the RpcErrors apply_filter raises.

    With ``max_steps``, a subtree filter that would look at more than that many data
    nodes stops and raises :class:`OverBudget` (see :func:`bounded_in_process`); an
    XPath filter, evaluated by libxml2 in one call, cannot be stopped and ignores it.
    """
    del keys_of  # list keys matter when copying, not when choosing
    if filter_elem is None:
        return None
    kind = _filter_kind(filter_elem)
    if kind == "subtree":
        steps = _Steps(max_steps)
        return _subtree_top(data, _element_children(filter_elem), steps)
    return _xpath_selection(data, filter_elem)


class OverBudget(Exception):
    """A subtree selection run with ``max_steps`` looked at more data nodes than allowed."""


def bounded_in_process(filter_elem: etree._Element | None) -> bool:
    """Can :func:`select` with ``max_steps`` stop this filter part-way?  Subtree filters only.

    The static bound of :func:`cheap` must assume the worst (every filter node matching
    every data node); a subtree filter's real cost is the data nodes it visits, which
    for the common shapes (a module, a list, entries picked by key) is a small part of
    that bound.  Such a filter is first tried on the event loop with a step budget and
    moved to a worker only when the budget runs out, so an ordinary ``<vpn><entry/></vpn>``
    on a large list is not serialised to another process.
    """
    if filter_elem is None:
        return False
    return (_filter_attr(filter_elem, "type") or "subtree") == "subtree"


class _Steps:
    """Data nodes a subtree selection may still look at (None: unbounded)."""

    __slots__ = ("left",)

    def __init__(self, limit: int | None) -> None:
        self.left = limit

    def spend(self, n: int) -> None:
        if self.left is not None:
            self.left -= n
            if self.left < 0:
                raise OverBudget


def _filter_kind(filter_elem: etree._Element) -> str:
    kind = _filter_attr(filter_elem, "type") or "subtree"
    if kind not in ("subtree", "xpath"):
        raise RpcError(
            "bad-attribute",
            f"Unknown filter type {kind!r}: expected 'subtree' or 'xpath'.",
            type="protocol",
            info=[("bad-attribute", "type"), ("bad-element", "filter")],
        )
    return kind


def _filter_attr(filter_elem: etree._Element, name: str) -> str | None:
    """The filter's ``type`` or ``select`` attribute, unqualified or in the base namespace.

    RFC 6241's schema has them unqualified; ncclient users and vendor examples often
    write ``xc:type`` with xc the base namespace.  Given both ways, which one was meant
    cannot be known, so the filter is refused rather than one of them ignored.
    """
    plain, qualified = filter_elem.get(name), filter_elem.get(qn(NC_NS, name))
    if plain is not None and qualified is not None:
        raise RpcError(
            "bad-attribute",
            f"The filter has the {name!r} attribute twice, unqualified and in the base "
            "namespace; give it once.",
            type="protocol",
            info=[("bad-attribute", name), ("bad-element", "filter")],
        )
    return plain if plain is not None else qualified


def _element_children(elem: etree._Element) -> list[etree._Element]:
    return list(elem.iterchildren(etree.Element))  # comments and PIs skipped in C


# -- building the reply ------------------------------------------------------------------------


def build(data: etree._Element, selection: Selection | None, keys_of: KeysOf) -> etree._Element:
    """A new <data> element with copies of the selected nodes of data, in document order.

    The second half of :func:`apply_filter`: its cost is linear in the size of the reply
    (and of the children lists it walks), whatever the filter, so it always runs in-process.
    """
    out = etree.Element(data.tag, nsmap=_declarations(data, None))
    if selection is None:
        for child in _element_children(data):
            out.append(_copy_whole(child))
    else:
        _copy_children(data, selection, out, keys_of, ())
    return out


def limit_depth(data: etree._Element, selection: Selection | None, depth: int) -> Selection:
    """``selection`` with each selected node cut ``depth`` levels down (RFC 8526 max-depth).

    The selected nodes are those a selection takes whole (None), or every top-level node
    of data when there is no filter; a selected node is level 1, so depth 1 keeps it with
    no children.  Ancestors of selected nodes are not counted, and a list entry always
    keeps its keys (:func:`build` adds them), so the reply stays a valid instance.
    """
    if selection is None:
        return {child: _within(child, depth) for child in _element_children(data)}
    return _limit(selection, depth)


def _limit(selection: Selection, depth: int) -> Selection:
    return {
        node: _within(node, depth) if sub is None else _limit(sub, depth)
        for node, sub in selection.items()
    }


def _within(node: etree._Element, depth: int) -> Selection | None:
    children = _element_children(node)
    if not children:
        return None  # a leaf (or an empty container): whole, with its value
    if depth <= 1:
        return {}
    return {child: _within(child, depth - 1) for child in children}


def _declarations(elem: etree._Element, parent: etree._Element | None) -> dict[Any, str]:
    """The namespace declarations elem needs under parent, to keep the datastore's prefixes."""
    # dict[Any, ...]: lxml-stubs say str keys, but None (the default namespace) is a valid key.
    inherited = parent.nsmap if parent is not None else {}
    return {p: uri for p, uri in elem.nsmap.items() if inherited.get(p) != uri}


def _copy_whole(elem: etree._Element) -> etree._Element:
    # For lxml, copy.copy copies the whole subtree in C as deepcopy does, without
    # deepcopy's memo bookkeeping (a third of a large reply's build time).
    clone = copy.copy(elem)
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
            if sub is None or _takes_all_whole(child, sub):
                out.append(_copy_whole(child))
            else:
                nsmap = _declarations(child, out)
                part = etree.SubElement(out, child.tag, nsmap=nsmap)
                for name, value in child.attrib.items():
                    part.set(name, value)
                _copy_children(child, sub, part, keys_of, keys_of(child))
        elif child.tag in keys:
            out.append(_copy_whole(child))


def _takes_all_whole(node: etree._Element, sub: Selection) -> bool:
    """Does sub take every child of node whole?  Then node is copied in one piece (a whole
    list asked for by ``<vpn><entry/></vpn>``: one C-level copy instead of one per entry)."""
    return all(v is None for v in sub.values()) and len(sub) == len(_element_children(node))


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


def _subtree_top(data: etree._Element, filters: list[etree._Element], steps: _Steps) -> Selection:
    """Each top-level filter node is applied on its own and the results are united.

    The "content match nodes decide for the whole sibling set" rule of 6.2.5 is not applied
    to the top level: there it would turn one failing leaf match in one module into an empty
    reply for every module, or one successful match into the whole datastore.
    """
    selection: Selection = {}
    children = _Children(data, steps)
    for f in filters:
        content = _is_content_match(f)
        f_children = _element_children(f)
        for child in children.candidates(f):
            if not content or _same_text(f, child):
                _merge(selection, child, _select_node(f_children, child, steps))
    return selection


def _select_node(
    f_children: list[etree._Element], node: etree._Element, steps: _Steps
) -> Selection | None:
    """What a filter node with these children (already known to match node) selects of node."""
    if not f_children:
        return None  # selection node (or a content match node, a leaf): all of it
    return _select_children(node, f_children, steps)


def _select_children(
    parent: etree._Element, filters: list[etree._Element], steps: _Steps
) -> Selection | None:
    """Apply one sibling set of filter nodes to the children of one data instance (6.2.5)."""
    children = _Children(parent, steps)
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
        f_children = _element_children(f)
        for child in children.candidates(f):
            _merge(selection, child, _select_node(f_children, child, steps))
    return selection


def _is_content_match(f: etree._Element) -> bool:
    return not _element_children(f) and strip_text(f) != ""


def _same_text(f: etree._Element, node: etree._Element) -> bool:
    return strip_text(f) == strip_text(node)


class _Children:
    """The children of one data instance, indexed for the filter nodes applied to them.

    Every data node it reads is paid for in ``steps``: indexing the children, matching a
    filter node against them, indexing entries by a leaf's value.
    """

    def __init__(self, parent: etree._Element, steps: _Steps) -> None:
        self._steps = steps
        elements = _element_children(parent)
        steps.spend(len(elements))
        self._by_tag: dict[str, list[etree._Element]] = {}
        for child in elements:
            self._by_tag.setdefault(child.tag, []).append(child)
        self._by_name: dict[str, list[etree._Element]] = {}
        for tag, nodes in self._by_tag.items():
            self._by_name.setdefault(local(tag), []).extend(nodes)
        self._by_value: dict[tuple[str, str], dict[str, list[etree._Element]]] = {}

    def named(self, f: etree._Element) -> list[etree._Element]:
        """The children f matches."""
        if not f.attrib and namespace(f.tag) is not None:
            nodes = self._by_tag.get(f.tag, [])  # the common case: same name, no attributes
            self._steps.spend(len(nodes))
            return nodes
        nodes = self._by_name.get(local(f.tag), [])
        self._steps.spend(len(nodes))
        return _matching(f, nodes)

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
                self._steps.spend(len(leaves) + 1)
                for value in {strip_text(leaf) for leaf in leaves if local(leaf.tag) == key[1]}:
                    index.setdefault(value, []).append(entry)
        nodes = self._by_value[key].get(strip_text(probe), ())
        self._steps.spend(len(nodes))
        return _matching(f, nodes)


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


@dataclass(frozen=True)
class _Token:
    kind: str
    """The _TOKEN group: literal, number, name, op or other."""
    text: str
    start: int
    end: int
    operand: bool
    """Whether an operand may start here (XPath 1.0 Section 3.7): so a '/' or '//' here
    starts an absolute path, a '*' is a name test and 'and', 'or', 'div', 'mod' are names."""


def _scan(select: str) -> Iterator[_Token]:
    """The tokens of select, each knowing whether it stands where an operand may start.

    An operand may start at the beginning, or after '(', '[', ',', '@', '::', '/' or an
    operator; not after a name, a literal, a number, ')', ']', '.' or '..'.
    """
    operand_next = True
    for m in _TOKEN.finditer(select):
        kind = m.lastgroup or "other"
        tok = m[kind]
        yield _Token(kind, tok, m.start(kind), m.end(kind), operand_next)
        if kind == "name":
            operand_next = not operand_next and tok in _OPERATOR_NAMES
        elif kind == "op" and tok == "*":
            operand_next = not operand_next  # name test, or the multiplication operator
        elif kind == "op":
            operand_next = tok not in _ENDS_OPERAND
        else:  # literal, number, or something lxml will reject
            operand_next = False


def _anchor_absolute_paths(select: str, prefixes: Container[str]) -> str:
    """Make every absolute location path in select start at $root instead of the document.

    A '/' or '//' starts an absolute path exactly where an operand may start (:func:`_scan`).
    Undeclared prefixes and variable references are refused here, by name.
    """
    edits: list[tuple[int, int, str]] = []
    lone_slash: int | None = None  # position of an absolute '/' that may be the whole path
    before, previous = "", ""  # the two tokens before this one
    for t in _scan(select):
        kind, tok, start = t.kind, t.text, t.start
        axis = f"{before}{previous}"
        if lone_slash is not None:
            if kind != "name" and tok not in _STARTS_STEP:
                edits.append((lone_slash, lone_slash + 1, ""))  # '/' alone: <data> itself
            lone_slash = None
        if kind == "name" and (t.operand or tok not in _OPERATOR_NAMES):
            prefix, colon, _ = tok.partition(":")
            if colon and prefix not in prefixes and prefix != "xml":
                raise _bad_select(
                    f"The XPath prefix {prefix!r} is not declared on the <filter> element."
                )
            if not colon and _is_element_name_test(select, t.end, previous, axis):
                # Every data node has a namespace, so an unprefixed name test could
                # never match; clients such as yangcli send /vpn-service/vpn all the
                # same, and servers (netconfd, ConfD) match such names by local name.
                edits.append((start, start + len(tok), f"*[local-name()='{tok}']"))
        elif kind == "op" and tok == "$":
            raise _bad_select("XPath variables are not available in a filter.")
        elif kind == "op" and tok in ("/", "//") and t.operand:
            edits.append((start, start, f"${_ROOT_VAR}"))
            lone_slash = start if tok == "/" else None
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


# -- cost: which filters may run on the event loop -----------------------------------------------
#
# A server answers every session from one event loop, so a filter evaluated there must cost
# about as much as copying the data it looks at.  :func:`cheap` admits a filter only when a
# bound on its cost, computed from the filter's text and the size of the data, is below a
# constant; everything else is evaluated in a worker process under a time budget
# (nc_core.filter_worker).  The bounds are deliberately crude: a cheap filter wrongly called
# costly costs a few milliseconds of serialising, a costly one wrongly called cheap stalls
# every session.

SUBTREE_COST_LIMIT = 150_000
"""Largest (filter weight) x (data size) of a subtree filter run on the event loop.  Measured
worst case (hundreds of copies of a filter branch matching every list entry): ~0.7 us per
unit, so at most ~0.1 s; real filters, which pick entries by key, take a small fraction."""

XPATH_COST_LIMIT = 500_000
"""Largest (tokens) x (data size) of an XPath filter run on the event loop.  Measured: an
expression of the cheap class visiting every node once per token costs ~0.2 us per unit."""

XPATH_MERGE_LIMIT = 25_000_000
"""Largest (node-set merges) x (data size)^2 of an XPath filter run on the event loop."""

TEXT_PER_UNIT = 32
"""Characters of text counted as one unit of data size (string comparisons and conversions
run at C speed: a few dozen characters cost about one node visit)."""

MAX_XPATH_TOKENS = 256
MAX_PREDICATE_DEPTH = 2
MAX_DESCENDANT_STEPS = 2

_CHEAP_AXES = frozenset({"child", "attribute", "self"})
_NODE_TYPES = frozenset({"node", "text", "comment", "processing-instruction"})
_COMPARISONS = frozenset({"=", "!=", "<", "<=", ">", ">="})
_CORE_FUNCTIONS = frozenset(
    {
        *("last", "position", "count", "id", "local-name", "namespace-uri", "name"),
        *("string", "concat", "starts-with", "contains", "substring-before"),
        *("substring-after", "substring", "string-length", "normalize-space", "translate"),
        *("boolean", "not", "true", "false", "lang", "number", "sum", "floor", "ceiling"),
        "round",
    }
)
"""XPath 1.0's core function library (Section 4): each costs at most a pass over its
arguments' string values."""
_SCALAR_FUNCTIONS = _CORE_FUNCTIONS - {"id"}
"""The core functions that return a number, string or boolean: a node-set compared with
one of those is compared node by node, in linear time (only id() returns a node-set)."""


def cheap(data: etree._Element, filter_elem: etree._Element | None) -> bool:
    """May this filter run in-process, its cost being provably near-linear in data's size?

    No filter is cheap (a copy of data).  A filter select() will refuse (unknown type, no
    select attribute) is cheap too: refusing it costs nothing.  Otherwise see
    :func:`costly_reason`.
    """
    if filter_elem is None:
        return True
    return costly_reason(filter_elem, lambda: data_size(data)) is None


def data_size(data: etree._Element) -> int:
    """The size of a data tree in cost units: its elements, plus its text by TEXT_PER_UNIT."""
    # Both counted by libxml2 in one pass each, without a Python object per node.
    elements = data.xpath("count(descendant-or-self::*)")
    text = data.xpath("string-length(.)")
    assert isinstance(elements, float) and isinstance(text, float)
    return int(elements) + int(text) // TEXT_PER_UNIT


def costly_reason(filter_elem: etree._Element, size: int | Callable[[], int]) -> str | None:
    """Why the filter may cost more than linear time on data of this size; None if it cannot.

    size is the data's :func:`data_size`, or a function computing it (called only when needed).
    The reason is a sentence fragment a network engineer can act on.
    """
    kind = _filter_attr(filter_elem, "type") or "subtree"
    if kind == "subtree":
        return _subtree_cost(filter_elem, size)
    expression = _filter_attr(filter_elem, "select")
    if kind != "xpath" or expression is None:
        return None  # select() refuses it at once
    return _xpath_cost(expression, size)


def _size(size: int | Callable[[], int]) -> int:
    return size if isinstance(size, int) else size()


def _subtree_cost(filter_elem: etree._Element, size: int | Callable[[], int]) -> str | None:
    """A subtree filter costs at most (filter weight) x (data size).

    Each filter node f is tried only against the children of the data nodes its parent
    filter node matched (:func:`_select_children`), so a (filter node, data node) pair is
    reached only through the pair of their parents, and by induction every pair is
    visited at most once.  A visit of (f, d) indexes d's children once (:class:`_Children`,
    whose by-value index also reads each child's own children once per filter name) and
    looks f's children up in that index.  Summed over the data nodes d, children and
    grandchildren number at most twice the data's elements, so the visits of one filter
    node cost O(data size) and the whole filter O(filter nodes x data size), whatever it
    matches.  Matching a node costs f's attribute matches and one text comparison: a
    filter node weighs 1 + its attributes + its text by TEXT_PER_UNIT.
    """
    units = _size(size)
    weight = 0
    for f in filter_elem.iter():
        if isinstance(f.tag, str):
            weight += 1 + len(f.attrib) + len(f.text or "") // TEXT_PER_UNIT
            if weight * units > SUBTREE_COST_LIMIT:
                return (
                    f"a subtree filter of more than {weight} nodes on data of {units} units "
                    f"may take more than {SUBTREE_COST_LIMIT:,} steps"
                )
    return None


def _xpath_cost(expression: str, size: int | Callable[[], int]) -> str | None:
    """An expression of the cheap class (:func:`_xpath_class`) costs about (weight) x (data
    size) for its steps and predicates, plus (merges) x (data size)^2 for its merges."""
    shape = _xpath_class(expression)
    if shape.problem is not None:
        return shape.problem
    units = _size(size)
    if shape.weight * units > XPATH_COST_LIMIT:
        return f"an expression of weight {shape.weight} is too long for data of {units} units"
    if shape.merges * units * units > XPATH_MERGE_LIMIT:
        return (
            f"its {shape.merges} unions, node() or text() tests, or '//' steps followed by "
            f"more steps merge node-sets of up to {units} nodes, in quadratic time"
        )
    return None


@dataclass
class _XPathShape:
    """What :func:`_xpath_class` found."""

    problem: str | None = None
    """Why the expression is outside the cheap class, or None."""
    weight: int = 0
    """Its tokens, a literal counting 1 per LITERAL_CHARS_PER_TOKEN characters besides."""
    merges: int = 0
    """Its node-set merges and sorts, each quadratic in the size of the sets."""


LITERAL_CHARS_PER_TOKEN = 4
"""A literal is searched for (contains(), translate()) in the string value of every node a
predicate filters, at a cost of its length times that string's length: it weighs as much
as a token per this many characters."""

MAX_CONCAT_ARGUMENTS = 8
"""libxml2's concat() appends each argument to all the previous ones (quadratic in their
number); nested concat() calls of at most this many arguments stay linear."""


def _xpath_class(expression: str) -> _XPathShape:
    """Classify an expression; in the cheap class its cost is linear in the data's size.

    In libxml2 a location path costs one visit per node of each step's result, a predicate
    runs its expression once per node it filters, and a node-set built from several context
    nodes is merged (looking for duplicates) and sorted into document order, which is
    quadratic in the worst case: it compares nodes by walking sibling lists (measured: with
    whitespace between elements, //*/*/* takes 0.6 s on 24,000 elements, four times as long
    for twice as many).  The class keeps the rest linear, rule by rule:

    * at most MAX_XPATH_TOKENS tokens: every factor below is bounded by the length.
    * axes child, attribute and self only (and '@', '.'): each step goes down or stays, so
      a relative path from a node only visits that node's subtree, and its results come in
      document order.  '..' and parent::, ancestor:: climb back, the sibling, following::
      and preceding:: axes run sideways: from inside a predicate they revisit the whole
      tree from every node, and their results need the quadratic merge (measured: //*/..
      takes 0.5 s on 60,000 elements).
    * '//' only outside predicates, at most MAX_DESCENDANT_STEPS times: inside a predicate
      it scans a subtree (or, absolute, the whole tree) once per node.  A leading '//'
      followed by one name test is a single scan from the root (libxml2 rewrites it to
      descendant::name); any other '//' (after a step, or followed by a predicate or more
      steps) yields nodes of several levels in the wrong order: it counts as a merge.
    * no absolute path and no variable inside a predicate: an absolute path there
      re-scans the tree for every node (//*[count(//*) > 0] is quadratic, and nested once
      more, cubic); variables are refused anyway (RFC 6241 binds none).
    * predicates nested at most MAX_PREDICATE_DEPTH deep: a predicate's relative paths go
      down only, so each node is visited from at most depth-of-tree ancestors per level.
    * each comparison has a literal, a number or a call of a scalar function (count(),
      string(), last()...) directly on one side: comparing two node-sets compares every
      pair of their nodes (|A| x |B|).
    * only the core function library, unprefixed (extension functions have unknown cost),
      and concat() with at most MAX_CONCAT_ARGUMENTS arguments.
    * unions and the node() and text() tests (sets of text nodes sort by sibling walks)
      count as merges, paid for by the square of the data size.
    """
    tokens: list[_Token] = []
    for t in _scan(expression):
        tokens.append(t)
        if len(tokens) > MAX_XPATH_TOKENS:
            return _XPathShape(f"it is longer than {MAX_XPATH_TOKENS} tokens")
    shape = _XPathShape()
    depth = 0
    descendant_steps = 0
    calls: list[_Call] = []  # the open parentheses
    scalar_closed = False  # the previous token closed a call of a scalar function
    for i, t in enumerate(tokens):
        scalar_before, scalar_closed = scalar_closed, False
        before = tokens[i - 1] if i > 0 else None
        after = tokens[i + 1] if i + 1 < len(tokens) else None
        then = tokens[i + 2].text if i + 2 < len(tokens) else ""
        tok = t.text
        problem: str | None = None
        shape.weight += 1
        if t.kind == "literal":
            shape.weight += len(tok) // LITERAL_CHARS_PER_TOKEN
        elif t.kind == "other" or tok == "$":
            problem = f"it uses {tok!r}"
        elif tok == "..":
            problem = "it uses '..' (the parent axis)"
        elif t.kind == "name" and not t.operand and tok not in _OPERATOR_NAMES:
            problem = f"{tok!r} stands where an operator is expected"
        elif t.kind == "name" and after is not None and after.text == "::":
            if tok not in _CHEAP_AXES:
                problem = f"it uses the {tok} axis"
        elif t.kind == "name" and t.operand and after is not None and after.text == "(":
            if tok in _NODE_TYPES:
                shape.merges += 1
            elif tok not in _CORE_FUNCTIONS:
                problem = f"it calls {tok}(), which is not an XPath 1.0 core function"
        elif tok == "(":
            name = before.text if before is not None and before.kind == "name" else ""
            calls.append(_Call(name))
        elif tok == ",":
            if calls:
                calls[-1].commas += 1
        elif tok == ")":
            if calls:
                scalar_closed = calls.pop().function in _SCALAR_FUNCTIONS
        elif tok == "[":
            depth += 1
            if depth > MAX_PREDICATE_DEPTH:
                problem = f"its predicates are nested more than {MAX_PREDICATE_DEPTH} deep"
        elif tok == "]":
            depth -= 1
        elif tok == "//":
            descendant_steps += 1
            if depth > 0:
                problem = "it uses '//' inside a predicate"
            elif descendant_steps > MAX_DESCENDANT_STEPS:
                problem = f"it uses '//' more than {MAX_DESCENDANT_STEPS} times"
            elif not (t.operand and _single_name_test(after, then)):
                shape.merges += 1
        elif tok == "/" and t.operand and depth > 0:
            problem = "it uses an absolute path inside a predicate"
        elif tok == "|":
            shape.merges += 1
        elif tok in _COMPARISONS and t.kind == "op":
            scalar_after = after is not None and _starts_scalar_call(after, then)
            if not (scalar_before or scalar_after):
                problem = _comparison_problem(tok, before, after)
        if problem is None and calls and calls[-1].function == "concat":
            if calls[-1].commas >= MAX_CONCAT_ARGUMENTS:
                problem = f"it calls concat() with more than {MAX_CONCAT_ARGUMENTS} arguments"
        if problem is not None:
            shape.problem = problem
            return shape
    return shape


@dataclass
class _Call:
    """An open parenthesis: a function call's (its name) or a grouping one ("")."""

    function: str
    commas: int = 0


def _single_name_test(after: _Token | None, then: str) -> bool:
    """Is the step after a '//' one name test (or '*') ending the path?"""
    if after is None or not (after.kind == "name" or after.text == "*"):
        return False
    return then not in ("/", "//", "[", "(", "::")


def _starts_scalar_call(token: _Token, then: str) -> bool:
    """Does a call of a function returning a number, string or boolean start at token?"""
    return (
        token.kind == "name" and token.operand and then == "(" and token.text in _SCALAR_FUNCTIONS
    )


def _comparison_problem(op: str, before: _Token | None, after: _Token | None) -> str | None:
    """A comparison needs a literal, number, or scalar function call on one side."""
    values = ("literal", "number")
    if (before is not None and before.kind in values) or (
        after is not None and after.kind in values
    ):
        return None
    return f"it compares two node-sets with {op!r} (compare a node-set with a literal)"
