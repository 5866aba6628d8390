"""The YANG schema a server serves, loaded into libyang, and validation against it.

libyang is used because it is the only Python-reachable validator that checks
everything RFC 7950 asks of a datastore (types, patterns, ranges, mandatory,
unique, min/max-elements, leafref, must, when) at the speed a NETCONF server
needs (../shared/NETCONF-NOTES.md: 10,000 list entries in 0.16 s).

The IETF modules we import are the ones pyang installs under
``<prefix>/share/yang/modules``; they are found there instead of being copied
into this repository.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import libyang
from _libyang import ffi, lib


def _cevpn_yang_dir() -> Path:
    """The cevpn modules: packaged next to this file in a wheel (setup.py copies them),
    or ``yang/`` at the top of a checkout."""
    here = Path(__file__).resolve().parent
    packaged = here / "yang"
    return packaged if packaged.is_dir() else here.parent / "yang"


CEVPN_YANG_DIR = _cevpn_yang_dir()

CE_MODULES = ("ietf-alarms", "cevpn-types", "cevpn-alarms", "cevpn-ce")
SERVICE_MODULES = ("ietf-alarms", "cevpn-types", "cevpn-alarms", "cevpn-service")
"""What each daemon serves beyond nc_core.server.BASE_MODULES: ietf-alarms is the RFC 8632
alarm list both keep (nc_core.alarms), cevpn-alarms its alarm types."""

_LOCATION = re.compile(r'(?:Data|Schema) location "(?P<path>[^"]*)"')
_LINE = re.compile(r"[Ll]ine number (?P<line>\d+)")


def _pyang_prefix() -> Path | None:
    """The prefix pyang was installed into (PREFIX/lib/pythonX.Y/site-packages/pyang)."""
    import importlib.util

    spec = importlib.util.find_spec("pyang")
    if spec is None or spec.origin is None:
        return None
    parents = Path(spec.origin).resolve().parents
    return parents[4] if len(parents) > 4 else None


def ietf_module_dirs() -> list[Path]:
    """Directories holding the IETF and IANA modules that pyang ships."""
    roots = [Path(sys.prefix), Path(sys.base_prefix), Path("/usr/local"), Path("/usr")]
    pyang_prefix = _pyang_prefix()
    if pyang_prefix is not None and pyang_prefix not in roots:
        roots.insert(0, pyang_prefix)  # pyang installed in another prefix (user, venv)
    dirs: list[Path] = []
    for root in roots:
        base = root / "share" / "yang" / "modules"
        for sub in ("ietf", "iana"):
            if (base / sub).is_dir() and base / sub not in dirs:
                dirs.append(base / sub)
    if not dirs:
        raise FileNotFoundError(
            "the IETF YANG modules that pyang installs were not found under "
            f"{', '.join(str(r / 'share/yang/modules') for r in roots)}; install pyang"
        )
    return dirs


def _silence_libyang_logger() -> None:
    # libyang only records the data path of an error when its log callback is
    # on (LY_LOLOG).  Messages can quote rejected values, and a rejected value
    # may be a key, so the Python logger they go to is muted: errors are
    # reported to the client that sent the data, never written to a log.
    libyang.configure_logging(True, logging.ERROR)
    ly_logger = logging.getLogger("libyang")
    ly_logger.propagate = False
    ly_logger.handlers[:] = [logging.NullHandler()]
    ly_logger.setLevel(logging.CRITICAL + 10)  # never enabled: records are not even made
    ly_logger.disabled = True


_silence_libyang_logger()


@dataclass(frozen=True)
class SchemaIssue:
    """One problem libyang found, as a client should see it."""

    message: str
    path: str | None = None
    """The data path in libyang's JSON notation, e.g. ``/cevpn-ce:ce/peer[name='b']/sp-address``."""
    app_tag: str | None = None
    """libyang's error-app-tag, e.g. ``must-violation``, ``too-few-elements``."""
    line: int | None = None

    def __str__(self) -> str:
        where = f" (at {self.path})" if self.path else ""
        return f"{self.message}{where}"


class ValidationFailed(Exception):
    """Data does not conform to the schema; ``issues`` says where and why."""

    def __init__(self, issues: Sequence[SchemaIssue]) -> None:
        self.issues = list(issues) or [SchemaIssue("invalid data")]
        super().__init__("; ".join(str(i) for i in self.issues))


def take_errors(ctx: Any) -> list[SchemaIssue]:
    """Collect and clear libyang's stored errors for ``ctx``."""
    issues: list[SchemaIssue] = []
    err = lib.ly_err_first(ctx.cdata)
    while err:
        text = ffi.string(err.msg).decode() if err.msg else "invalid data"
        raw_path = ffi.string(err.path).decode() if err.path else ""
        app_tag = ffi.string(err.apptag).decode() if err.apptag else None
        path_match = _LOCATION.search(raw_path)
        line_match = _LINE.search(raw_path)
        issues.append(
            SchemaIssue(
                message=text,
                path=path_match.group("path") if path_match else None,
                app_tag=app_tag,
                line=int(line_match.group("line")) if line_match else None,
            )
        )
        err = err.next
    lib.ly_err_clean(ctx.cdata, ffi.NULL)
    return issues


class _Context(libyang.Context):
    """A libyang context that keeps its errors structured.

    The binding's ``error()`` flattens libyang's error list into one string
    and clears it; ours stores the list first, so a caller can report
    error-path and error-app-tag.
    """

    last_issues: list[SchemaIssue]

    def error(self, msg: str, *args: Any) -> Any:
        self.last_issues = take_errors(self)
        text = msg % args if args else msg
        details = "; ".join(str(i) for i in self.last_issues)
        return libyang.LibyangError(f"{text}: {details}" if details else text)

    def take_issues(self, fallback: str) -> list[SchemaIssue]:
        issues = getattr(self, "last_issues", None) or take_errors(self)
        self.last_issues = []
        return issues or [SchemaIssue(fallback)]


class Schema:
    """A libyang context holding a server's modules, implemented and ready to validate."""

    def __init__(
        self,
        modules: Iterable[str],
        *,
        features: dict[str, Sequence[str]] | None = None,
        search_dirs: Sequence[Path] = (),
    ) -> None:
        dirs = [CEVPN_YANG_DIR, *search_dirs, *ietf_module_dirs()]
        self.search_dirs = dirs
        self.ctx = _Context(":".join(str(d) for d in dirs))
        self.modules: dict[str, Any] = {}
        self._defaults_json: dict[str, Any] | None = None
        features = features or {}
        for name in modules:
            self.modules[name] = self._load(name, features.get(name, ()))

    def _load(self, name: str, features: Sequence[str]) -> Any:
        # The binding's feature_enable() replaces the feature set on each call,
        # so features that depend on each other (if-feature) must be enabled
        # together, when the module is loaded.
        keep = [ffi.new("char[]", f.encode()) for f in features]
        array = ffi.new("char *[]", [*keep, ffi.NULL]) if features else ffi.NULL
        cmod = lib.ly_ctx_load_module(self.ctx.cdata, name.encode(), ffi.NULL, array)
        if not cmod:
            raise ValidationFailed(self.ctx.take_issues(f"cannot load YANG module {name}"))
        return self.ctx.get_module(name)

    def defaults_json(self) -> dict[str, Any]:
        """An empty datastore as RFC 7951 JSON with every default of every module.

        Validation adds defaults only for the modules that have data
        (``validate_present``: a module with mandatory nodes must not make an empty
        datastore invalid), so a configuration that never touched a module has none of
        its defaults.  Readers of the configuration take those from here instead
        (``nc_core.transaction.tree_json``).  Printed once per schema; callers must not
        modify it."""
        if self._defaults_json is None:
            node_p = ffi.new("struct lyd_node **")
            if lib.lyd_new_implicit_all(node_p, self.ctx.cdata, 0, ffi.NULL) != lib.LY_SUCCESS:
                raise ValidationFailed(self.ctx.take_issues("cannot create default nodes"))
            if node_p[0] == ffi.NULL:
                self._defaults_json = {}
            else:
                tree = libyang.DNode.new(self.ctx, node_p[0])
                try:
                    text = tree.print_mem(
                        "json", with_siblings=True, include_implicit_defaults=True
                    )
                finally:
                    tree.free(with_siblings=True)
                self._defaults_json = json.loads(text) if text else {}
        return self._defaults_json

    def parse_config(self, text: str | bytes, fmt: str) -> Any:
        """Parse a complete configuration document and validate it as a datastore.

        ``fmt`` is ``"xml"`` or ``"json"`` (RFC 7951).  State data is refused.
        Returns the libyang data tree (possibly ``None`` for an empty document).
        """
        try:
            return self.ctx.parse_data_mem(
                text, fmt, no_state=True, strict=True, validate_present=True
            )
        except libyang.LibyangError as exc:
            raise ValidationFailed(self.ctx.take_issues(str(exc))) from exc

    def parse_config_file(self, path: Path) -> Any:
        """Parse and validate an instance document; the format follows the suffix."""
        fmt = {".xml": "xml", ".json": "json"}.get(path.suffix)
        if fmt is None:
            raise ValueError(f"{path}: instance documents end in .xml or .json")
        return self.parse_config(path.read_bytes(), fmt)


def ce_schema() -> Schema:
    """The schema the CE agent serves (cevpn-ce and what it imports)."""
    return Schema(CE_MODULES)


def service_schema() -> Schema:
    """The schema the SP VPN server serves (cevpn-service and what it imports)."""
    return Schema(SERVICE_MODULES)


# --------------------------------------------------------------------------
# Schema index: what an XML element in a datastore is, in YANG terms.
# --------------------------------------------------------------------------

_KIND = {
    lib.LYS_CONTAINER: "container",
    lib.LYS_LIST: "list",
    lib.LYS_LEAF: "leaf",
    lib.LYS_LEAFLIST: "leaf-list",
    lib.LYS_ANYDATA: "anydata",
    lib.LYS_ANYXML: "anyxml",
    lib.LYS_RPC: "rpc",
    lib.LYS_ACTION: "action",
    lib.LYS_NOTIF: "notification",
}


def module_namespace(module: Any) -> str:
    return str(ffi.string(module.cdata.ns).decode())


DENY_ALL_PATHS: frozenset[str] = frozenset({"/ietf-system:system/authentication/user/password"})
"""Data nodes treated as if they carried nacm:default-deny-all, by schema path.

RFC 7317 marks a user's password (an iana-crypt-hash) only default-deny-write,
so RFC 8341's read-default would hand every account the hashes to guess
offline.  A deviation cannot add the extension (libyang ignores extension
statements inside ``deviate add``), so the rule lives here, next to the one
place the extensions are read: nobody reads a hash without a rule that permits it.
"""


@dataclass
class SchemaNode:
    """A data node of the schema, with what edit-config, filters and NACM need to know."""

    kind: str
    name: str
    module: str
    namespace: str
    config: bool
    presence: bool
    keys: tuple[str, ...]
    user_ordered: bool
    cases: tuple[tuple[str, str], ...]
    """(choice schema path, case name) pairs between the data parent and this node."""
    deny_all: bool
    deny_write: bool
    path: str
    """Schema path in JSON notation, e.g. ``/cevpn-ce:ce/peer/name``: for messages."""
    snode: Any = None
    _children: dict[tuple[str, str], SchemaNode] | None = None

    def children(self) -> dict[tuple[str, str], SchemaNode]:
        if self._children is None:
            # Built apart and published whole: a reader in another thread (the agent's
            # notification listener reads its settings) never sees it half filled.
            children: dict[tuple[str, str], SchemaNode] = {}
            if self.kind in ("container", "list", "rpc", "action", "notification"):
                for child in self.snode.children():
                    node = _make_node(child, self.snode, self.path, self.module)
                    if node is not None:
                        children[(node.namespace, node.name)] = node
            self._children = children
        return self._children

    def child(self, ns: str | None, name: str) -> SchemaNode | None:
        if ns is None:
            return None
        return self.children().get((ns, name))

    def child_by_tag(self, tag: str) -> SchemaNode | None:
        """:meth:`child` by an element's Clark-notation tag, remembered per tag: a list of
        10,000 entries asks the same question 10,000 times."""
        by_tag = self._by_tag
        if by_tag is None:
            by_tag = self._by_tag = {}
        if tag not in by_tag:
            ns, _, name = tag[1:].partition("}") if tag.startswith("{") else (None, "", tag)
            by_tag[tag] = self.child(ns, name)
        return by_tag[tag]

    @property
    def key_tags(self) -> tuple[str, ...]:
        """The list keys' Clark-notation tags, in key order."""
        tags = self._key_tags
        if tags is None:
            tags = self._key_tags = tuple(f"{{{self.namespace}}}{k}" for k in self.keys)
        return tags

    is_key: bool = False
    _by_tag: dict[str, SchemaNode | None] | None = field(default=None, repr=False, compare=False)
    _key_tags: tuple[str, ...] | None = field(default=None, repr=False, compare=False)


def _make_node(
    snode: Any, data_parent: Any, parent_path: str, parent_module: str
) -> SchemaNode | None:
    kind = _KIND.get(snode.nodetype())
    if kind is None:
        return None
    cases: list[tuple[str, str]] = []
    up = snode.parent()
    while up is not None and (data_parent is None or up.cdata != data_parent.cdata):
        if up.nodetype() == lib.LYS_CASE:
            choice = up.parent()
            cases.append((choice.schema_path(), up.name()))
        elif up.nodetype() not in (lib.LYS_CHOICE, lib.LYS_INPUT, lib.LYS_OUTPUT):
            break
        up = up.parent()
    module = snode.module()
    mod_name = module.name()
    prefix = f"{mod_name}:" if mod_name != parent_module else ""
    ext_names = {(e.module().name(), e.name()) for e in snode.extensions()}
    path = f"{parent_path}/{prefix}{snode.name()}"
    return SchemaNode(
        kind=kind,
        name=snode.name(),
        module=mod_name,
        namespace=module_namespace(module),
        config=not snode.config_false(),
        presence=kind == "container" and bool(snode.presence()),
        keys=tuple(k.name() for k in snode.keys()) if kind == "list" else (),
        user_ordered=bool(snode.ordered()) if kind in ("list", "leaf-list") else False,
        cases=tuple(reversed(cases)),
        deny_all=("ietf-netconf-acm", "default-deny-all") in ext_names or path in DENY_ALL_PATHS,
        deny_write=("ietf-netconf-acm", "default-deny-write") in ext_names,
        path=path,
        snode=snode,
        is_key=kind == "leaf" and bool(snode.is_key()),
    )


class SchemaIndex:
    """Top-level data nodes of every implemented module, by (namespace, name)."""

    def __init__(self, schema: Schema) -> None:
        self.schema = schema
        self.top: dict[tuple[str, str], SchemaNode] = {}
        self.namespaces: dict[str, str] = {}
        """namespace -> module name, for every implemented module."""
        for module in schema.ctx:
            ns = module_namespace(module)
            self.namespaces[ns] = module.name()
            for snode in module.children():
                node = _make_node(snode, None, "", "")
                if node is not None:
                    self.top[(node.namespace, node.name)] = node

    def top_node(self, ns: str | None, name: str) -> SchemaNode | None:
        if ns is None:
            return None
        return self.top.get((ns, name))

    def node(self, path: str) -> SchemaNode:
        """The schema node at a path in JSON notation, ``/module:top/child/leaf`` (a child's
        module prefix only where it changes, as in SchemaNode.path); KeyError if none."""
        by_module = {name: ns for ns, name in self.namespaces.items()}
        node: SchemaNode | None = None
        module = ""
        for step in path.strip("/").split("/"):
            prefix, _, name = step.rpartition(":")
            module = prefix or module
            ns = by_module.get(module)
            node = self.top_node(ns, name) if node is None else node.child(ns, name)
            if node is None:
                raise KeyError(f"no schema node {path}")
        if node is None:
            raise KeyError(f"no schema node {path}")
        return node

    def default(self, path: str) -> Any:
        """The YANG default of a leaf (typed as libyang gives it), or None if it has none:
        code reads defaults here instead of repeating them as literals."""
        value = self.node(path).snode.default()
        return value


# --------------------------------------------------------------------------
# Lists whose entries can be validated on their own (nc_core.validation's
# incremental validation)
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class EntryScopedList:
    """A list whose entries every YANG constraint judges alone: by the entry itself and by
    data outside the list, never by another entry (but for its ``uniques``, checked apart,
    and leafrefs from outside naming entries, which more entries cannot break).

    A change that adds, changes or removes entries of such a list, and nothing else,
    leaves every other entry exactly as valid as it was: validating the rest of the
    configuration with the changed entries only says whether the whole is valid."""

    tags: tuple[str, ...]
    """Clark tags from the top-level node down to the list."""
    keys: tuple[str, ...]
    """Clark tags of the key leaves."""
    uniques: tuple[tuple[tuple[str, ...], ...], ...]
    """Each ``unique`` statement: the Clark-tag paths of its leaves, from an entry."""
    plain: bool = False
    """Ordered by the system, and neither it nor a container above it in a choice: an
    edit that merges entries into the existing containers above changes nothing else."""
    free_leaves: frozenset[str] = frozenset()
    """Clark tags of the leaves beside the entries (children of the list's parent) that no
    constraint reads and that have none of their own but their type (no must, when,
    leafref or instance-identifier, not in a choice): a new value of one of them, the
    leaf present before and after, leaves every other node exactly as valid as it was,
    and a node-by-node check says whether it is valid.  The VPN server changes such a
    leaf, the configuration's version, with every peer it adds."""


_XPATH_TOKEN = re.compile(
    r"""\s*(?:
    (?P<literal>'[^']*'|"[^"]*")
    |(?P<number>\d+(?:\.\d*)?|\.\d+)
    |(?P<symbol>//|::|\.\.|!=|<=|>=|[/()\[\],.@|=<>+*$-])
    |(?P<name>[A-Za-z_][\w.-]*(?::[A-Za-z_][\w.-]*)?)
    )""",
    re.VERBOSE,
)
_OPERATOR_NAMES = frozenset({"and", "or", "div", "mod"})
_HARMLESS_FUNCTIONS = frozenset(
    {
        "not", "true", "false", "count", "string", "number", "boolean", "contains",
        "starts-with", "string-length", "concat", "substring", "substring-before",
        "substring-after", "normalize-space", "translate", "re-match", "derived-from",
        "derived-from-or-self", "enum-value", "bit-is-set", "sum", "floor", "ceiling",
        "round", "position", "last", "name", "local-name",
    }
)  # fmt: skip
"""XPath functions that read only their arguments (the paths in them are analysed)."""
_AXES = frozenset({"ancestor", "ancestor-or-self", "parent", "self", "child"})


class _Unsafe(Exception):
    """The expression may do something the analysis does not follow."""


class _Paths:
    """Where the location paths of one XPath expression (YANG's subset) can go.

    Positions are tuples of local names from the root; prefixes are dropped, so
    nodes of two modules with the same local names are taken for one another (the
    analysis errs on the side of 'may read it').  ``visit`` is called with every
    position a step reaches, and with whether that position was reached from the
    expression's own list entry without leaving it."""

    def __init__(
        self,
        text: str,
        context: tuple[str, ...],
        entry_depth: int,
        visit: Callable[[tuple[str, ...], bool], None],
    ) -> None:
        self.tokens: list[tuple[str, str]] = []
        pos = 0
        text = text.strip()
        while pos < len(text):
            m = _XPATH_TOKEN.match(text, pos)
            if m is None or m.end() == pos:
                raise _Unsafe(text[pos:])
            pos = m.end()
            kind = m.lastgroup
            assert kind is not None
            self.tokens.append((kind, m.group(kind)))
        self.i = 0
        self.context = context
        self.entry_depth = entry_depth
        """Length of the own entry's position (0: the context is in no entry)."""
        self.visit = visit

    def own(self, position: tuple[str, ...], own: bool) -> bool:
        """Still in the context's own entry (never above it since)."""
        return own and self.entry_depth > 0 and len(position) >= self.entry_depth

    def peek(self, offset: int = 0) -> tuple[str, str]:
        j = self.i + offset
        return self.tokens[j] if j < len(self.tokens) else ("end", "")

    def take(self) -> tuple[str, str]:
        token = self.peek()
        self.i += 1
        return token

    def run(self) -> None:
        self.expression({(self.context, self.own(self.context, True))})
        if self.peek()[0] != "end":
            raise _Unsafe("trailing tokens")

    def expression(self, here: set[tuple[tuple[str, ...], bool]]) -> None:
        """Operands separated by operators, until a closing bracket or the end."""
        while True:
            self.operand(here)
            kind, value = self.peek()
            if (kind == "name" and value in _OPERATOR_NAMES) or (
                kind == "symbol" and value in ("=", "!=", "<", "<=", ">", ">=", "+", "-", "*", "|")
            ):
                self.take()
                continue
            return

    def operand(self, here: set[tuple[tuple[str, ...], bool]]) -> None:
        kind, value = self.peek()
        if kind in ("literal", "number"):
            self.take()
            return
        if kind == "symbol" and value == "-":
            self.take()
            self.operand(here)
            return
        if kind == "symbol" and value == "(":
            self.take()
            self.expression(here)
            if self.take() != ("symbol", ")"):
                raise _Unsafe("(")
            if self.peek()[1] in ("/", "//", "["):
                raise _Unsafe("a path from a parenthesised expression")
            return
        if kind == "name" and self.peek(1) == ("symbol", "("):
            self.take()
            self.take()
            if value == "current":
                if self.take() != ("symbol", ")"):
                    raise _Unsafe("current(...)")
                start = {(self.context, self.own(self.context, True))}
                if self.peek() == ("symbol", "/"):
                    self.take()
                    self.steps(start)
                return
            if value not in _HARMLESS_FUNCTIONS:
                raise _Unsafe(f"{value}()")
            if self.peek() != ("symbol", ")"):
                while True:
                    self.expression(here)
                    if self.peek() != ("symbol", ","):
                        break
                    self.take()
            if self.take() != ("symbol", ")"):
                raise _Unsafe("arguments")
            if self.peek()[1] in ("/", "//", "["):
                raise _Unsafe("a path from a function's result")
            return
        if kind == "symbol" and value == "/":
            self.take()
            root: set[tuple[tuple[str, ...], bool]] = {((), False)}
            for position, _ in root:
                self.visit(position, False)
            if self.peek()[0] == "name" or self.peek()[1] in ("*", ".", ".."):
                self.steps(root)
            return
        if kind == "name" or (kind == "symbol" and value in (".", "..", "*", "@")):
            self.steps(here)
            return
        raise _Unsafe(f"unexpected {value!r}")

    def steps(self, here: set[tuple[tuple[str, ...], bool]]) -> None:
        while True:
            here = self.step(here)
            if self.peek() == ("symbol", "/"):
                self.take()
                continue
            if self.peek() == ("symbol", "//"):
                raise _Unsafe("//")
            return

    def step(self, here: set[tuple[tuple[str, ...], bool]]) -> set[tuple[tuple[str, ...], bool]]:
        kind, value = self.take()
        if (kind, value) == ("symbol", "."):
            reached = here
        elif (kind, value) == ("symbol", ".."):
            reached = {(p[:-1], self.own(p[:-1], own)) for p, own in here}
        elif kind == "symbol" and value == "@":
            raise _Unsafe("attributes")
        else:
            axis = "child"
            if kind == "name" and self.peek() == ("symbol", "::"):
                axis = value
                if axis not in _AXES:
                    raise _Unsafe(f"{axis}::")
                self.take()
                kind, value = self.take()
            if kind == "name" and self.peek() == ("symbol", "("):
                raise _Unsafe("a node-type test")
            if not (kind == "name" or (kind, value) == ("symbol", "*")):
                raise _Unsafe(f"unexpected {value!r}")
            name = value.rpartition(":")[2]
            reached = set()
            for position, own in here:
                if axis == "child":
                    candidates = [((*position, name), own)]
                elif axis == "self":
                    candidates = [(position, own)]
                elif axis == "parent":
                    candidates = [(position[:-1], self.own(position[:-1], own))]
                else:
                    first = len(position) if axis == "ancestor-or-self" else len(position) - 1
                    candidates = [
                        (position[:n], self.own(position[:n], own)) for n in range(first, -1, -1)
                    ]
                for found, was_own in candidates:
                    if axis != "child" and name != "*" and found[-1:] != (name,):
                        continue
                    reached.add((found, was_own))
        marked = set()
        for position, own in reached:
            self.visit(position, own)
            marked.add((position, own))
        while self.peek() == ("symbol", "["):
            self.take()
            self.expression(marked)
            if self.take() != ("symbol", "]"):
                raise _Unsafe("[")
        return marked


def entry_scoped_lists(index: SchemaIndex) -> dict[tuple[str, ...], EntryScopedList]:
    """The lists of the schema, outside any other list, whose entries are judged alone
    (:class:`EntryScopedList`), by their tags.  A constraint the analysis cannot follow
    (an XPath function or axis it does not know, a path into another entry, a must or
    when outside the list reading its entries, min- or max-elements, a unique leaf with
    a default) leaves its list out, as does a list at the top of the data tree: such a
    list is validated whole."""
    nodes: list[SchemaNode] = []

    def walk(node: SchemaNode) -> None:
        nodes.append(node)
        for child in node.children().values():
            walk(child)

    for top in index.top.values():
        walk(top)
    local = {id(n): tuple(_local_path(n.path)) for n in nodes}
    candidates = {id(n): n for n in nodes if n.kind == "list" and n.config and _outside_lists(n)}
    unsafe: set[int] = set()
    read: set[tuple[str, ...]] | None = set()
    """Every position a constraint's paths reach (None: one the analysis cannot follow)."""
    for node in nodes:
        constraints = [(e, False) for e in _musts(node)]
        constraints += [(e, False) for e in _whens(node)]
        constraints += [(e, True) for e in _leafrefs(node)]
        for expr, is_leafref in constraints:
            if read is not None and not _positions_read(expr, local[id(node)], read):
                read = None
            for list_id in candidates:
                if list_id in unsafe:
                    continue
                if not _judged_alone(expr, local[id(node)], local[list_id], is_leafref):
                    unsafe.add(list_id)
    found: dict[tuple[str, ...], EntryScopedList] = {}
    for list_id, lst in candidates.items():
        if list_id in unsafe:
            continue
        clist = ffi.cast("struct lysc_node_list *", lst.snode.cdata)
        if clist.min != 0 or clist.max != 0xFFFFFFFF:
            continue
        uniques = _uniques(clist, lst)
        if uniques is None:
            continue
        tags = tuple(_tag_path(index, lst))
        if len(tags) < 2:
            # A list at the top of the data tree: an entry removed may be the node a tree is
            # held by (nc_core.shared_tree patches trees in place).  Validated whole.
            continue
        plain = not lst.user_ordered and not _in_a_case(index, tags)
        free = _free_leaves(index, tags, read)
        found[tags] = EntryScopedList(tags, lst.key_tags, uniques, plain, free)
    return found


def _positions_read(expr: str, where: tuple[str, ...], read: set[tuple[str, ...]]) -> bool:
    """Add to ``read`` every position the paths of a constraint at ``where`` reach (with
    the contexts :func:`_judged_alone` follows); False if the analysis cannot follow it."""

    def visit(position: tuple[str, ...], own: bool) -> None:
        read.add(position)

    try:
        for context in [where] if not where else [where, where[:-1]]:
            _Paths(expr, context, 0, visit).run()
    except _Unsafe:
        return False
    return True


def _free_leaves(
    index: SchemaIndex, tags: tuple[str, ...], read: set[tuple[str, ...]] | None
) -> frozenset[str]:
    """The :attr:`EntryScopedList.free_leaves` beside the list at ``tags``."""
    if read is None:
        return frozenset()
    parent: SchemaNode | None = None
    for tag in tags[:-1]:
        ns, _, name = tag[1:].partition("}")
        parent = index.top_node(ns, name) if parent is None else parent.child(ns, name)
        if parent is None:
            return frozenset()
    if parent is None or parent.kind != "container" or _in_a_case(index, tags[:-1]):
        return frozenset()
    free = set()
    for leaf in parent.children().values():
        if leaf.kind != "leaf" or not leaf.config or leaf.cases or leaf.is_key:
            continue
        if _musts(leaf) or _whens(leaf) or _leafrefs(leaf) or _instance_identifier(leaf):
            continue
        if leaf.snode.parent() is None or leaf.snode.parent().nodetype() != lib.LYS_CONTAINER:
            continue  # in a choice: another case's nodes come and go with it
        position = tuple(_local_path(leaf.path))
        if any(p[: len(position)] == position for p in read):
            continue
        free.add(f"{{{leaf.namespace}}}{leaf.name}")
    return frozenset(free)


def _instance_identifier(node: SchemaNode) -> bool:
    return any(t.base() == libyang.Type.INST for t in _member_types(node))


def _in_a_case(index: SchemaIndex, tags: tuple[str, ...]) -> bool:
    node: SchemaNode | None = None
    for tag in tags:
        ns, _, name = tag[1:].partition("}")
        node = index.top_node(ns, name) if node is None else node.child(ns, name)
        if node is None or node.cases:
            return True
    return False


def _local_path(path: str) -> list[str]:
    return [step.rpartition(":")[2] for step in path.strip("/").split("/")]


def _outside_lists(node: SchemaNode) -> bool:
    up = node.snode.parent()
    while up is not None:
        if up.nodetype() == lib.LYS_LIST:
            return False
        up = up.parent()
    return True


def _tag_path(index: SchemaIndex, node: SchemaNode) -> list[str]:
    chain = []
    snode = node.snode
    while snode is not None:
        if snode.nodetype() in _KIND:
            chain.append(f"{{{module_namespace(snode.module())}}}{snode.name()}")
        snode = snode.parent()
    return list(reversed(chain))


def _musts(node: SchemaNode) -> list[str]:
    try:
        return list(node.snode.must_conditions())
    except AttributeError:
        return []


def _whens(node: SchemaNode) -> list[str]:
    try:
        return list(node.snode.when_conditions())
    except AttributeError:
        return []


def _member_types(node: SchemaNode) -> Iterator[Any]:
    """A leaf's or leaf-list's type, or each member type of its unions (none for others)."""
    if node.kind not in ("leaf", "leaf-list"):
        return

    def members(ytype: Any) -> Iterator[Any]:
        if ytype.base() == libyang.Type.UNION:
            for member in ytype.union_types():
                yield from members(member)
        else:
            yield ytype

    yield from members(node.snode.type())


def _leafrefs(node: SchemaNode) -> list[str]:
    paths = [t.leafref_path() for t in _member_types(node) if t.base() == libyang.Type.LEAFREF]
    return [p for p in paths if p]


def _judged_alone(
    expr: str, where: tuple[str, ...], lst: tuple[str, ...], is_leafref: bool
) -> bool:
    """Whether a constraint at schema position ``where`` keeps entries of the list at
    ``lst`` judged alone: from inside an entry, it reads no other entry; from outside,
    it reads no entry, or it is a leafref (an entry it names is there in every larger
    set of entries too)."""
    problem = False

    def visit(position: tuple[str, ...], own: bool) -> None:
        nonlocal problem
        if position[: len(lst)] == lst and not own and not is_leafref:
            problem = True  # another entry, or an entry reached from outside the list

    # A when inherited from a uses or an augment has the closest data ancestor for
    # context: both are followed.
    contexts = [where] if not where else [where, where[:-1]]
    try:
        for context in contexts:
            inside = context[: len(lst)] == lst
            _Paths(expr, context, len(lst) if inside else 0, visit).run()
    except _Unsafe:
        return False
    return not problem


def _uniques(clist: Any, lst: SchemaNode) -> tuple[tuple[tuple[str, ...], ...], ...] | None:
    """The list's unique statements as tag paths; None if one names a leaf with a default
    (whether it counts then depends on more than the entry's explicit data)."""
    out = []
    uniques = clist.uniques
    count = 0 if uniques == ffi.NULL else ffi.cast("uint64_t *", uniques)[-1]
    for u in range(count):
        leaves = uniques[u]
        n = 0 if leaves == ffi.NULL else ffi.cast("uint64_t *", leaves)[-1]
        paths = []
        for k in range(n):
            leaf = leaves[k]
            if leaf.dflt != ffi.NULL:
                return None
            chain = []
            node = ffi.cast("struct lysc_node *", leaf)
            while node != ffi.NULL and node != lst.snode.cdata:
                if node.nodetype & (lib.LYS_CHOICE | lib.LYS_CASE) == 0:
                    ns = ffi.string(node.module.ns).decode()
                    chain.append(f"{{{ns}}}{ffi.string(node.name).decode()}")
                node = node.parent
            paths.append(tuple(reversed(chain)))
        out.append(tuple(paths))
    return tuple(out)
