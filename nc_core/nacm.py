"""NETCONF Access Control Model (RFC 8341): who may read, write, execute and be notified.

Why this module exists: a NETCONF server that serves private keys and IPsec
pre-shared keys must decide, for every request, which data a user may see,
which changes a user may make, which RPCs a user may invoke and which
notifications a user may receive.  RFC 8341 defines those decisions; this
module implements them as pure logic over lxml trees, so the server calls it
at four points and the rules can be tested without a session:

* :meth:`Nacm.may_exec` -- RFC 8341 Section 3.4.4 (incoming RPC message validation);
* :meth:`Nacm.filter_read` -- Section 3.4.5 for the "read" access operation
  (and Section 3.2.4: unreadable nodes are silently omitted with their descendants);
* :meth:`Nacm.check_write` -- Section 3.4.5 for "create", "update" and "delete",
  raising the "access-denied" error of Section 3.4.3;
* :meth:`Nacm.may_notify` -- Section 3.4.6 (outgoing notification authorization).

The configuration is the ``/nacm`` container of the running datastore
(Section 3.5, module ietf-netconf-acm); :meth:`Nacm.load` compiles it once per
commit (rule paths are parsed into steps there), so that filtering a reply of
10,000 list entries is one linear walk with no XPath evaluation.

Corners decided here (each is marked "corner" where it is implemented):

* A user who is in no group gets only the defaults: RFC 8341 3.4.4 step 5,
  3.4.5 step 4 and 3.4.6 skip rule-list processing when no groups are found,
  so a rule-list for group ``*`` applies to every user *with* a group.
* Read filtering is strict (Section 3.2.4): a node the user may not read is
  omitted together with its descendants, even where a rule would permit a
  descendant.  Under ``read-default deny`` the ancestors of a permitted path
  must be permitted too (a module-name rule, or path rules for each level).
* create and delete cover the whole subtree: creating or deleting a node
  creates or deletes each descendant, and each needs the access right
  (Section 3.2.5; default-deny-all and default-deny-write apply "to the data
  node and all its descendants", Section 3.4.5).  update checks only the node
  named by the change: the server reports created children as creates.
* A path rule that cannot be compiled fails closed: a "deny" rule matches every
  data node (as ``/`` would), a "permit" rule matches nothing.  The reasons are
  in :attr:`Nacm.problems` for the server to log.
* error-path of a denied delete never names data the user may not read
  (in the spirit of Section 3.4.3, which forbids such data in error-info):
  the deleted node comes from the old tree, which the client may never have
  seen, so the path stops at the deepest readable ancestor.
* Rules are consulted before the extensions (3.4.5 steps 5-10): a rule with
  module-name ``cevpn-ce`` and no path permits reading the pre-shared keys.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

from lxml import etree

from nc_core.errors import RpcError
from nc_core.schema import SchemaIndex, SchemaNode
from nc_core.xmlutil import NACM_NS, local, namespace, qn

Operation = Literal["read", "create", "update", "delete", "exec"]
WriteOperation = Literal["create", "update", "delete"]
Action = Literal["permit", "deny"]
RuleType = Literal["any", "protocol-operation", "notification", "data-node"]

ALL_OPERATIONS: frozenset[str] = frozenset({"create", "read", "update", "delete", "exec"})
WRITE_OPERATIONS: tuple[WriteOperation, ...] = ("create", "update", "delete")
"""The bits of access-operations-type; ``*`` stands for all of them."""

NETCONF_MODULE = "ietf-netconf"
ALWAYS_DENIED_RPCS = frozenset({"kill-session", "delete-config"})
"""RFC 8341 3.4.4 step 11: denied unless a rule permits them, whatever exec-default says."""
ALWAYS_PERMITTED_NOTIFICATIONS = frozenset({"replayComplete", "notificationComplete"})
"""RFC 8341 3.4.6: the RFC 5277 end-of-replay/end-of-subscription events are always sent."""

_IDENT = r"[A-Za-z_][A-Za-z0-9_.\-]*"
_STEP = re.compile(rf"/\s*(?:({_IDENT}):)?({_IDENT})\s*")
_PREDICATE = re.compile(
    rf"\[\s*(?:(\.)|(?:({_IDENT}):)?({_IDENT}))\s*=\s*"
    rf"(?:'([^']*)'|\"([^\"]*)\"|(\$USER))\s*\]\s*"
)
_POSITION = re.compile(r"\[\s*\d+\s*\]")
_QNAME_VALUE = re.compile(rf"({_IDENT}):({_IDENT})")


class PathError(ValueError):
    """A rule's path is not a node-instance-identifier this module can evaluate."""


# --------------------------------------------------------------------------
# The compiled configuration (RFC 8341 Section 3.5)
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyPredicate:
    """One predicate of a path step: ``[p:key='value']``, ``[.='value']`` or ``[p:key=$USER]``."""

    tag: str | None
    """Clark name of the key leaf; None for ``.``, the leaf-list entry's own value."""
    value: str
    value_qname: tuple[str, str] | None = None
    """(namespace, name) when the value is ``prefix:name`` with a declared prefix (identityref)."""
    is_user: bool = False
    """The value is the variable ``$USER``: the session's user name (node-instance-identifier)."""

    def matches(self, elem: etree._Element, user: str) -> bool:
        target: etree._Element | None = elem if self.tag is None else elem.find(self.tag)
        if target is None:
            return False
        text = (target.text or "").strip()
        if text == (user if self.is_user else self.value):
            return True
        if self.value_qname is not None and ":" in text:
            prefix, _, name = text.partition(":")
            return (target.nsmap.get(prefix), name) == self.value_qname
        return False


@dataclass(frozen=True)
class PathStep:
    """One step of a compiled path: a node name and optional key predicates."""

    tag: str
    """Clark name ``{namespace}name``."""
    predicates: tuple[KeyPredicate, ...] = ()

    def matches(self, elem: etree._Element, user: str) -> bool:
        return elem.tag == self.tag and all(p.matches(elem, user) for p in self.predicates)


@dataclass(frozen=True)
class Rule:
    """One /nacm/rule-list/rule."""

    name: str
    action: Action
    module: str = "*"
    rule_type: RuleType = "any"
    """Which case of the rule-type choice is present; "any" when none is."""
    target: str = "*"
    """rpc-name or notification-name (``*`` matches every name)."""
    path: tuple[PathStep, ...] | None = None
    """data-node rules: the compiled path; ``()`` is ``/``, all data."""
    operations: frozenset[str] = ALL_OPERATIONS

    @property
    def permit(self) -> bool:
        return self.action == "permit"

    def covers_module(self, module: str | None) -> bool:
        return self.module == "*" or self.module == module


@dataclass(frozen=True)
class RuleList:
    """One /nacm/rule-list: rules for the users of some groups."""

    name: str
    groups: frozenset[str]
    rules: tuple[Rule, ...]

    def applies_to(self, groups: frozenset[str]) -> bool:
        # RFC 8341 3.4.5 step 5: the rule-list's "group" leaf-list must name
        # one of the user's groups; '*' names all groups.
        return "*" in self.groups or not self.groups.isdisjoint(groups)


@dataclass(frozen=True)
class NacmConfig:
    """The /nacm container; the defaults are those of the ietf-netconf-acm module."""

    enable_nacm: bool = True
    read_default: Action = "permit"
    write_default: Action = "deny"
    exec_default: Action = "permit"
    enable_external_groups: bool = True
    groups: Mapping[str, frozenset[str]] = field(default_factory=dict)
    """group name -> user names (/nacm/groups/group/user-name)."""
    rule_lists: tuple[RuleList, ...] = ()


def _nacm(tag: str) -> str:
    return qn(NACM_NS, tag)


def _leaf(parent: etree._Element, name: str) -> str | None:
    elem = parent.find(_nacm(name))
    return None if elem is None else (elem.text or "").strip()


def _action(value: str | None, default: Action) -> Action:
    # Anything but a literal "permit" denies: the data was validated by
    # libyang, and a value we do not understand must not open access.
    if value is None:
        return default
    return "permit" if value == "permit" else "deny"


def parse_path(text: str, nsmap: Mapping[str, str]) -> tuple[PathStep, ...]:
    """Compile a node-instance-identifier (RFC 8341 Section 3.5.2, typedef of that name).

    ``nsmap`` maps the prefixes in scope on the ``path`` leaf element to
    namespaces.  Key predicates are optional; a missing one matches every
    entry.  An unprefixed name takes the namespace of the step before it
    (a lenience for hand-written rules; the first step needs a prefix).
    """
    text = text.strip()
    if text == "/":
        return ()
    if not text.startswith("/"):
        raise PathError(f"path {text!r} is not absolute")
    steps: list[PathStep] = []
    pos = 0
    current_ns: str | None = None
    while pos < len(text):
        match = _STEP.match(text, pos)
        if match is None:
            raise PathError(f"path {text!r}: cannot read a step at offset {pos}")
        prefix, name = match.group(1), match.group(2)
        step_ns = _resolve(prefix, nsmap, current_ns, text)
        pos = match.end()
        predicates: list[KeyPredicate] = []
        while pos < len(text) and text[pos] == "[":
            pred = _PREDICATE.match(text, pos)
            if pred is None:
                what = "positional predicates" if _POSITION.match(text, pos) else "this predicate"
                raise PathError(f"path {text!r}: {what} at offset {pos} cannot be evaluated")
            predicates.append(_predicate(pred, nsmap, step_ns, text))
            pos = pred.end()
        steps.append(PathStep(qn(step_ns, name), tuple(predicates)))
        current_ns = step_ns
    return tuple(steps)


def _resolve(prefix: str | None, nsmap: Mapping[str, str], inherited: str | None, text: str) -> str:
    if prefix is None:
        if inherited is None:
            raise PathError(f"path {text!r}: the first node name needs a namespace prefix")
        return inherited
    ns = nsmap.get(prefix)
    if ns is None:
        raise PathError(f"path {text!r}: prefix {prefix!r} is not declared")
    return ns


def _predicate(
    match: re.Match[str], nsmap: Mapping[str, str], step_ns: str, text: str
) -> KeyPredicate:
    dot, prefix, key, single, double, user_var = match.groups()
    tag = None if dot else qn(_resolve(prefix, nsmap, step_ns, text), key)
    if user_var:
        return KeyPredicate(tag, "", is_user=True)
    value = single if single is not None else double
    qname = _QNAME_VALUE.fullmatch(value)
    value_qname = None
    if qname is not None and qname.group(1) in nsmap:
        value_qname = (nsmap[qname.group(1)], qname.group(2))
    return KeyPredicate(tag, value, value_qname)


def _parse_operations(value: str | None) -> frozenset[str]:
    if value is None or value.strip() == "*":
        return ALL_OPERATIONS
    return frozenset(value.split()) & ALL_OPERATIONS


def _parse_rule(elem: etree._Element, problems: list[str], list_name: str) -> Rule | None:
    name = _leaf(elem, "name") or ""
    action = _action(_leaf(elem, "action"), "deny")
    module = _leaf(elem, "module-name") or "*"
    operations = _parse_operations(_leaf(elem, "access-operations"))
    rpc_name = _leaf(elem, "rpc-name")
    notification_name = _leaf(elem, "notification-name")
    path_elem = elem.find(_nacm("path"))
    if rpc_name is not None:
        return Rule(name, action, module, "protocol-operation", rpc_name, None, operations)
    if notification_name is not None:
        return Rule(name, action, module, "notification", notification_name, None, operations)
    if path_elem is None:
        return Rule(name, action, module, "any", "*", None, operations)
    nsmap = {p: ns for p, ns in path_elem.nsmap.items() if p is not None}
    try:
        path = parse_path(path_elem.text or "", nsmap)
    except PathError as exc:
        # corner: fail closed -- a broken deny rule denies all data, a broken
        # permit rule permits nothing.
        effect = "denies all data" if action == "deny" else "is ignored"
        problems.append(f"rule-list {list_name!r}, rule {name!r}: {exc}; the rule {effect}")
        if action != "deny":
            return None
        path = ()
    return Rule(name, action, module, "data-node", "*", path, operations)


def parse_config(nacm: etree._Element | None) -> tuple[NacmConfig, list[str]]:
    """Compile a ``<nacm>`` element (None: all defaults); returns the config and any problems."""
    problems: list[str] = []
    if nacm is None:
        return NacmConfig(), problems
    groups: dict[str, frozenset[str]] = {}
    for group in nacm.iterfind(f"{_nacm('groups')}/{_nacm('group')}"):
        users = frozenset((u.text or "").strip() for u in group.iterfind(_nacm("user-name")))
        groups[_leaf(group, "name") or ""] = users
    rule_lists: list[RuleList] = []
    for rule_list in nacm.iterfind(_nacm("rule-list")):
        list_name = _leaf(rule_list, "name") or ""
        rules = [_parse_rule(r, problems, list_name) for r in rule_list.iterfind(_nacm("rule"))]
        rule_lists.append(
            RuleList(
                name=list_name,
                groups=frozenset(
                    (g.text or "").strip() for g in rule_list.iterfind(_nacm("group"))
                ),
                rules=tuple(r for r in rules if r is not None),
            )
        )
    config = NacmConfig(
        enable_nacm=_leaf(nacm, "enable-nacm") != "false",
        read_default=_action(_leaf(nacm, "read-default"), "permit"),
        write_default=_action(_leaf(nacm, "write-default"), "deny"),
        exec_default=_action(_leaf(nacm, "exec-default"), "permit"),
        enable_external_groups=_leaf(nacm, "enable-external-groups") != "false",
        groups=groups,
        rule_lists=tuple(rule_lists),
    )
    return config, problems


# --------------------------------------------------------------------------
# Decisions
# --------------------------------------------------------------------------


class WriteChange(Protocol):
    """What :meth:`Nacm.check_write` reads of a change (nc_core.edit.Change has this shape)."""

    @property
    def op(self) -> str: ...

    @property
    def element(self) -> etree._Element: ...


_DecisionKey = tuple[tuple[int, ...], str | None, bool, bool, bool]


@dataclass(frozen=True)
class _Plan:
    """The rules that can decide one access operation for one user, in order.

    Flattening the applicable rule-lists keeps RFC 8341 3.4.5 steps 5-6:
    rule-lists in order, rules in order, first match wins.
    """

    op: Operation
    rules: tuple[Rule, ...]
    start: tuple[int, ...]
    tracks_paths: bool
    """Some rule has a path with steps still to match at the top."""
    paths: tuple[tuple[int, tuple[PathStep, ...]], ...] = ()
    """(index in ``rules``, path) of each rule whose path has steps."""
    decisions: dict[_DecisionKey, bool] = field(default_factory=dict)
    """Memo of :meth:`Nacm._decide`: few distinct keys occur, however big the tree."""


@dataclass(slots=True)
class _Ctx:
    """What the decision for one data node depends on, computed walking down from the top."""

    snode: SchemaNode | None
    module: str | None
    deny_all: bool
    """The node or an ancestor carries nacm:default-deny-all."""
    deny_write: bool
    """The node or an ancestor carries nacm:default-deny-write."""
    progress: tuple[int, ...]
    """Per plan rule: path steps matched so far (len(path): covers this node; -1: cannot)."""
    live: bool
    """Some path rule is matched part of the way: descendants must advance ``progress``."""
    in_event: bool = False
    """Content of a notification (or rpc/action) whose event type was authorized already."""


_WRITE_OPERATIONS: Mapping[str, WriteOperation] = {
    "create": "create",
    "update": "update",
    "delete": "delete",
}
_OPAQUE_KINDS = frozenset({"anydata", "anyxml", "leaf", "leaf-list"})
_EVENT_KINDS = frozenset({"notification", "rpc", "action"})


class Nacm:
    """RFC 8341 access control decisions for one server.

    Not thread-safe: the server calls it from its one event loop.  The
    counters are the ``denied-*`` leaves of /nacm (state since the server
    started); :meth:`load` keeps them.
    """

    def __init__(self, index: SchemaIndex, recovery_user: str | None = None) -> None:
        self.index = index
        self.recovery_user = recovery_user
        self.config = NacmConfig()
        self.problems: list[str] = []
        """Why rules were compiled as fail-closed, from the last :meth:`load`."""
        self.denied_operations = 0
        self.denied_data_writes = 0
        self.denied_notifications = 0
        self.generation = 0
        """Bumped by every :meth:`load`: decisions cached elsewhere are stale once it moves."""
        self._groups: dict[str, frozenset[str]] = {}
        self._plans: dict[tuple[str, str, str], _Plan] = {}
        self._schema_memo: dict[tuple[int, str], tuple[SchemaNode | None, str | None]] = {}

    # -- configuration ------------------------------------------------------

    def load(self, running: etree._Element) -> None:
        """(Re)read /nacm from a running datastore tree; call after every commit."""
        self.config, self.problems = parse_config(running.find(_nacm("nacm")))
        self.generation += 1
        self._groups.clear()
        self._plans.clear()

    def groups_of(self, user: str) -> frozenset[str]:
        """The /nacm/groups entries listing ``user`` (RFC 8341 3.4.5 step 3).

        External groups (enable-external-groups) would be added here; the SSH
        transport provides none.
        """
        groups = self._groups.get(user)
        if groups is None:
            groups = frozenset(g for g, users in self.config.groups.items() if user in users)
            self._groups[user] = groups
        return groups

    def unrestricted(self, user: str) -> bool:
        """RFC 8341 3.4.4-3.4.6 steps 1-2: NACM disabled, or a recovery session."""
        return not self.config.enable_nacm or (
            self.recovery_user is not None and user == self.recovery_user
        )

    def permits_all(self, user: str, op: Operation) -> bool:
        """Is every data node open to ``user`` for ``op``, whatever it is?

        True when the first rule that applies is a permit for every module
        with no path (the admin rule list of a fresh server): it matches every
        node before any default or extension is consulted (3.4.5), so reads
        and writes of administrators skip the per-node walk.
        """
        if self.unrestricted(user):
            return True
        plan = self._plan(user, "data-node", op)
        if not plan.rules:
            return False
        first = plan.rules[0]
        return first.permit and first.module == "*" and not first.path

    def permits_all_writes(self, user: str) -> bool:
        """:meth:`permits_all` for create, update and delete alike: no change ``user``
        makes to the data needs checking node by node."""
        return all(self.permits_all(user, op) for op in ("create", "update", "delete"))

    def may_write_any(self, user: str) -> bool:
        """Could ``user`` change any configuration at all?

        True when NACM does not restrict the user, write-default is permit, or
        a rule of the user's groups permits create, update or delete of some
        data.  The server refuses the operations that only make sense for a
        writer (lock, discard-changes, commit, edit-config, copy-config) to
        everyone else: RFC 8341 leaves them to exec-default, which would let a
        read-only customer lock an operator out of running or throw away the
        operator's pending candidate (docs/security.md).
        """
        if self.unrestricted(user) or self.config.write_default == "permit":
            return True
        return any(
            rule.permit
            for op in WRITE_OPERATIONS
            for rule in self._plan(user, "data-node", op).rules
        )

    def _plan(self, user: str, kind: RuleType, op: Operation) -> _Plan:
        key = (user, kind, op)
        plan = self._plans.get(key)
        if plan is None:
            groups = self.groups_of(user)
            rules: list[Rule] = []
            # corner: RFC 8341 3.4.4 step 5 / 3.4.5 step 4 / 3.4.6 -- if no
            # groups are found, no rule-list is processed, not even '*'.
            if groups:
                for rule_list in self.config.rule_lists:
                    if not rule_list.applies_to(groups):
                        continue
                    rules.extend(
                        r
                        for r in rule_list.rules
                        if r.rule_type in ("any", kind) and op in r.operations
                    )
            plan = _Plan(
                op=op,
                rules=tuple(rules),
                start=(0,) * len(rules),
                tracks_paths=any(r.path for r in rules),
                paths=tuple((i, r.path) for i, r in enumerate(rules) if r.path),
            )
            self._plans[key] = plan
        return plan

    # -- RFC 8341 3.4.4: incoming RPC messages --------------------------------

    def may_exec(self, user: str, module: str, rpc: str, *, default_deny_all: bool = False) -> bool:
        """May ``user`` invoke ``module``:``rpc``?  Counts denials in denied_operations.

        ``default_deny_all`` is true for an RPC whose statement carries
        nacm:default-deny-all.  kill-session and delete-config of ietf-netconf
        are denied by default in any case (3.4.4 step 11).
        """
        allowed = self._exec_decision(user, module, rpc, default_deny_all)
        if not allowed:
            self.denied_operations += 1
        return allowed

    def _exec_decision(self, user: str, module: str, rpc: str, default_deny_all: bool) -> bool:
        # 3.4.4 steps 1-2: NACM disabled or recovery session.
        if self.unrestricted(user):
            return True
        # 3.4.4 step 3: <close-session> is always permitted.
        if module == NETCONF_MODULE and rpc == "close-session":
            return True
        # 3.4.4 steps 4-9: the first rule matching module-name, rpc-name (or
        # no rule-type) and the "exec" bit decides.
        for rule in self._plan(user, "protocol-operation", "exec").rules:
            if rule.rule_type == "protocol-operation" and rule.target not in ("*", rpc):
                continue
            if rule.covers_module(module):
                return rule.permit
        # 3.4.4 step 10: nacm:default-deny-all on the rpc statement.
        if default_deny_all:
            return False
        # 3.4.4 step 11: <kill-session> and <delete-config>.
        if module == NETCONF_MODULE and rpc in ALWAYS_DENIED_RPCS:
            return False
        # 3.4.4 step 12: exec-default.
        return self.config.exec_default == "permit"

    # -- RFC 8341 3.4.6: outgoing notifications -------------------------------

    def may_notify(
        self, user: str, module: str, notification: str, *, default_deny_all: bool = False
    ) -> bool:
        """May ``user`` receive this event type?  Counts drops in denied_notifications."""
        allowed = self.notify_permitted(user, module, notification, default_deny_all)
        if not allowed:
            self.denied_notifications += 1
        return allowed

    def notify_permitted(
        self, user: str, module: str, notification: str, default_deny_all: bool = False
    ) -> bool:
        """:meth:`may_notify` without counting: for callers that cache the decision (it
        depends only on the configuration, see :attr:`generation`) and count drops
        themselves."""
        return self._notify_decision(user, module, notification, default_deny_all)

    def _notify_decision(
        self, user: str, module: str, notification: str, default_deny_all: bool
    ) -> bool:
        # 3.4.6: NACM disabled (or a recovery session) permits.
        if self.unrestricted(user):
            return True
        # 3.4.6: replayComplete and notificationComplete are always sent.
        if notification in ALWAYS_PERMITTED_NOTIFICATIONS:
            return True
        # 3.4.6: the first rule matching module-name, notification-name (or
        # no rule-type) and the "read" bit decides.
        for rule in self._plan(user, "notification", "read").rules:
            if rule.rule_type == "notification" and rule.target not in ("*", notification):
                continue
            if rule.covers_module(module):
                return rule.permit
        # 3.4.6: nacm:default-deny-all on the notification statement, then read-default.
        if default_deny_all:
            return False
        return self.config.read_default == "permit"

    # -- RFC 8341 3.4.5: data nodes --------------------------------------------

    def _schema_of(self, parent: _Ctx | None, tag: str) -> tuple[SchemaNode | None, str | None]:
        """(schema node, module name) of a child element; memoized by parent schema node and tag."""
        parent_snode = None if parent is None else parent.snode
        key = (-1 if parent is None else id(parent_snode), tag)
        found = self._schema_memo.get(key)
        if found is None:
            ns = namespace(tag)
            name = local(tag)
            snode: SchemaNode | None = None
            if parent is None:
                snode = self.index.top_node(ns, name)
            elif parent_snode is not None:
                snode = parent_snode.child(ns, name)
            if snode is not None:
                found = (snode, snode.module)
            else:
                found = (None, self.index.namespaces.get(ns) if ns is not None else None)
            self._schema_memo[key] = found
        return found

    def _child(self, parent: _Ctx | None, elem: etree._Element, plan: _Plan, user: str) -> _Ctx:
        snode, module = self._schema_of(parent, str(elem.tag))
        if parent is None:
            deny_all = deny_write = in_event = False
            progress, live = plan.start, plan.tracks_paths
        else:
            deny_all, deny_write = parent.deny_all, parent.deny_write
            progress, live = parent.progress, parent.live
            in_event = parent.in_event
        # 3.4.5 steps 9-10: the extensions apply "to the data node and all its
        # descendants", so they are inherited down the walk.
        if snode is not None:
            deny_all = deny_all or snode.deny_all
            deny_write = deny_write or snode.deny_write
        if live:
            progress, live = _advance(plan, progress, elem, user)
        return _Ctx(snode, module, deny_all, deny_write, progress, live, in_event)

    def _decide(self, ctx: _Ctx, plan: _Plan) -> bool:
        key = (ctx.progress, ctx.module, ctx.deny_all, ctx.deny_write, ctx.in_event)
        decision = plan.decisions.get(key)
        if decision is None:
            decision = self._decide_uncached(ctx, plan)
            plan.decisions[key] = decision
        return decision

    def _decide_uncached(self, ctx: _Ctx, plan: _Plan) -> bool:
        # 3.4.5 steps 5-8: the first rule whose module-name matches the
        # module of the node and whose path (if any) is the node or one of
        # its ancestors decides.  The plan holds only rules with the bit of
        # the requested operation set and with no rule-type or rule-type
        # data-node.
        for rule, matched in zip(plan.rules, ctx.progress, strict=True):
            if rule.path is not None and matched != len(rule.path):
                continue
            if rule.covers_module(ctx.module):
                return rule.permit
        # 3.4.5 steps 9-10: nacm:default-deny-all hides and protects the node.
        if ctx.deny_all:
            return False
        if plan.op == "read":
            # 3.4.5 step 11: read-default -- except in the content of an event
            # the user was already authorized to receive (3.4.6).
            return ctx.in_event or self.config.read_default == "permit"
        # 3.4.5 step 10: nacm:default-deny-write protects the node.
        if ctx.deny_write:
            return False
        # 3.4.5 step 12: write-default.
        return self.config.write_default == "permit"

    def _contexts(self, chain: Sequence[etree._Element], plan: _Plan, user: str) -> list[_Ctx]:
        ctxs: list[_Ctx] = []
        parent: _Ctx | None = None
        for elem in chain:
            parent = self._child(parent, elem, plan, user)
            ctxs.append(parent)
        return ctxs

    def allowed(self, user: str, op: Operation, element: etree._Element) -> bool:
        """The RFC 8341 3.4.5 decision for one data node alone (ancestors and descendants aside).

        ``element`` lies in a datastore tree (ancestors reachable up to the root).
        No counter changes.
        """
        if self.unrestricted(user):
            return True
        plan = self._plan(user, "data-node", op)
        return self._decide(self._contexts(_chain(element), plan, user)[-1], plan)

    def readable_depth(self, user: str, element: etree._Element) -> int:
        """How many nodes of ``element``'s chain (top-level node first) ``user`` may read.

        The read decision of :meth:`filter_read` for one node: a node is
        visible when it and every ancestor are readable and each list entry on
        the way has readable keys.  Equal to the chain's length when the node
        itself is visible.  ``element`` lies in a tree whose root is a
        datastore or notification root.
        """
        chain = _chain(element)
        if self.permits_all(user, "read"):
            return len(chain)
        plan = self._plan(user, "data-node", "read")
        depth = 0
        for elem, ctx in zip(chain, self._contexts(chain, plan, user), strict=True):
            if not self._decide(ctx, plan) or not self._keys_readable(elem, ctx, plan, user):
                break
            depth += 1
        return depth

    def may_read(self, user: str, element: etree._Element) -> bool:
        """Would ``user`` see ``element`` in a <get> of its datastore (RFC 8341 3.2.4, 3.4.5)?"""
        return self.readable_depth(user, element) == len(_chain(element))

    def filter_read(self, user: str, data: etree._Element) -> etree._Element:
        """Remove, IN PLACE, every node ``user`` may not read; returns ``data`` itself.

        ``data`` is a datastore root (``<data>``) whose children are top-level
        data nodes.  RFC 8341 3.2.4 and 3.4.5: an unreadable node is omitted
        with all its descendants; a readable node stays even if some of its
        descendants go; a list entry with an unreadable key leaf is omitted
        whole (its identity would be incomplete).  One walk over the tree.

        A top-level notification (or rpc/action) element is not a data node:
        :meth:`may_notify` (or :meth:`may_exec`) authorized it, so it stays, and
        its content is filtered by the rules and nacm:default-deny-all only,
        not by read-default.
        """
        if self.permits_all(user, "read"):
            return data
        plan = self._plan(user, "data-node", "read")
        self._filter_children(data, None, plan, user)
        return data

    def _filter_children(
        self, parent: etree._Element, ctx: _Ctx | None, plan: _Plan, user: str
    ) -> None:
        for child in list(parent):
            if not isinstance(child.tag, str):
                continue
            child_ctx = self._child(ctx, child, plan, user)
            if ctx is None and child_ctx.snode is not None and child_ctx.snode.kind in _EVENT_KINDS:
                child_ctx.in_event = True
                self._filter_children(child, child_ctx, plan, user)
                continue
            if not self._decide(child_ctx, plan):
                # corner: strict omission (3.2.4) -- the subtree goes too,
                # whatever a rule says about a descendant.
                parent.remove(child)
                continue
            snode = child_ctx.snode
            if snode is None:
                self._filter_children(child, child_ctx, plan, user)
            elif snode.kind == "list":
                if not self._keys_readable(child, child_ctx, plan, user):
                    parent.remove(child)
                    continue
                self._filter_children(child, child_ctx, plan, user)
            elif snode.kind not in _OPAQUE_KINDS:
                self._filter_children(child, child_ctx, plan, user)

    def _keys_readable(self, elem: etree._Element, ctx: _Ctx, plan: _Plan, user: str) -> bool:
        # 3.4.5: a list entry is identified by its keys; one the user may not
        # read makes the entry unreadable as a whole.
        snode = ctx.snode
        if snode is None or snode.kind != "list":
            return True
        for key in snode.keys:
            key_elem = elem.find(qn(snode.namespace, key))
            if key_elem is not None and not self._decide(
                self._child(ctx, key_elem, plan, user), plan
            ):
                return False
        return True

    def check_write(self, user: str, changes: Sequence[WriteChange]) -> None:
        """Raise access-denied (RFC 8341 3.4.3) for the first change ``user`` may not make.

        create and delete are checked for the node and every descendant (a
        node is created or deleted with its contents); update for the node.
        When the changes list subtrees node by node, parents first (as
        nc_core.edit.diff does), each node is still checked once.  Each
        refused request counts once in denied_data_writes.
        """
        if self.permits_all_writes(user):
            return
        # Per access operation: contexts computed so far, and nodes already
        # checked as part of an earlier change's subtree.
        known: dict[str, dict[etree._Element, _Ctx]] = {}
        checked: dict[str, set[etree._Element]] = {}
        for change in changes:
            op = _WRITE_OPERATIONS.get(change.op)
            if op is None:
                raise ValueError(f"not a write access operation: {change.op!r}")
            ctxs = known.setdefault(op, {})
            done = checked.setdefault(op, set())
            if change.element in done:
                continue
            plan = self._plan(user, "data-node", op)
            ctx = self._context(change.element, plan, user, ctxs)
            if op == "update":
                denied = None if self._decide(ctx, plan) else change.element
                done.add(change.element)
            else:
                # corner: creating or deleting a node creates or deletes its
                # descendants, each of which needs the right (3.2.5, 3.4.5).
                denied = None
                for node, node_ctx in self._walk(change.element, ctx, plan, user):
                    if not self._decide(node_ctx, plan):
                        denied = node
                        break
                    ctxs[node] = node_ctx
                    done.add(node)
            if denied is not None:
                self.denied_data_writes += 1
                raise self._write_error(user, op, denied)

    def _context(
        self,
        element: etree._Element,
        plan: _Plan,
        user: str,
        known: dict[etree._Element, _Ctx],
    ) -> _Ctx:
        """The context of ``element``, reusing those of ancestors computed before."""
        pending: list[etree._Element] = []
        node: etree._Element | None = element
        parent_ctx: _Ctx | None = None
        while node is not None and node.getparent() is not None:
            found = known.get(node)
            if found is not None:
                parent_ctx = found
                break
            pending.append(node)
            node = node.getparent()
        if not pending:
            if parent_ctx is None:
                raise ValueError("a data node is needed, not the datastore root")
            return parent_ctx
        top = pending.pop()
        ctx = known[top] = self._child(parent_ctx, top, plan, user)
        for elem in reversed(pending):
            ctx = known[elem] = self._child(ctx, elem, plan, user)
        return ctx

    def _walk(
        self, elem: etree._Element, ctx: _Ctx, plan: _Plan, user: str
    ) -> Iterator[tuple[etree._Element, _Ctx]]:
        stack = [(elem, ctx)]
        while stack:
            node, node_ctx = stack.pop()
            yield node, node_ctx
            if node_ctx.snode is not None and node_ctx.snode.kind in _OPAQUE_KINDS:
                continue
            children = [c for c in node if isinstance(c.tag, str)]
            stack.extend((c, self._child(node_ctx, c, plan, user)) for c in reversed(children))

    def _write_error(self, user: str, op: WriteOperation, denied: etree._Element) -> RpcError:
        chain = _chain(denied)
        shown = len(chain)
        if op == "delete":
            # corner, 3.4.3: the reply must not reveal data the user may not read; a
            # deleted node comes from the old tree, which the client may not
            # have seen, so error-path stops at the deepest readable ancestor.
            shown = self.readable_depth(user, denied)
        visible = chain[:shown]
        path, path_ns = self.instance_path(visible)
        name = local(denied.tag)
        if shown == len(chain):
            message = f"Access denied: {op} of {self.data_path(visible)} is not permitted."
        elif visible:
            message = (
                f"Access denied: {op} of a '{name}' node under {self.data_path(visible)} "
                "is not permitted."
            )
        else:
            message = f"Access denied: {op} of a '{name}' node is not permitted."
        return RpcError(
            "access-denied",
            message,
            type="application",
            path=path if visible else None,
            path_ns=path_ns if visible else {},
        )

    # -- paths for error reports --------------------------------------------

    def _steps(
        self, chain: Sequence[etree._Element]
    ) -> Iterator[tuple[etree._Element, str | None, str, list[tuple[str | None, str]]]]:
        """(element, namespace, name, [(key name or None for '.', value)]) per node."""
        snode: SchemaNode | None = None
        for depth, elem in enumerate(chain):
            ns = namespace(elem.tag)
            name = local(elem.tag)
            if depth == 0:
                snode = self.index.top_node(ns, name)
            elif snode is not None:
                snode = snode.child(ns, name)
            keys: list[tuple[str | None, str]] = []
            if snode is not None and snode.kind == "list":
                for key in snode.keys:
                    key_elem = elem.find(qn(snode.namespace, key))
                    if key_elem is not None:
                        keys.append((key, (key_elem.text or "").strip()))
            elif snode is not None and snode.kind == "leaf-list":
                keys.append((None, (elem.text or "").strip()))
            yield elem, ns, name, keys

    def instance_path(self, chain: Sequence[etree._Element]) -> tuple[str, dict[str, str]]:
        """Absolute XPath of the last node of ``chain`` and the prefixes it uses.

        Prefixes are module names (``/cevpn-ce:ce/cevpn-ce:peer[cevpn-ce:name='a']``),
        for RpcError.path and RpcError.path_ns.
        """
        prefixes: dict[str, str] = {}
        by_ns: dict[str, str] = {}

        def prefix(ns: str | None) -> str:
            if ns is None:
                return ""
            if ns not in by_ns:
                candidate = self.index.namespaces.get(ns) or f"ns{len(by_ns) + 1}"
                while candidate in prefixes:
                    candidate += "_"
                by_ns[ns] = candidate
                prefixes[candidate] = ns
            return by_ns[ns] + ":"

        parts: list[str] = []
        for _elem, ns, name, keys in self._steps(chain):
            pfx = prefix(ns)
            step = f"/{pfx}{name}"
            for key, value in keys:
                step += f"[{pfx}{key}={_literal(value)}]" if key else f"[.={_literal(value)}]"
            parts.append(step)
        return "".join(parts) or "/", prefixes

    def data_path(self, chain: Sequence[etree._Element]) -> str:
        """The same path in libyang's notation (module name where it changes): for messages."""
        parts: list[str] = []
        current: str | None = None
        for _elem, ns, name, keys in self._steps(chain):
            module = self.index.namespaces.get(ns) if ns is not None else None
            step = f"/{module}:{name}" if module and module != current else f"/{name}"
            current = module or current
            for key, value in keys:
                step += f"[{key or '.'}={_literal(value)}]"
            parts.append(step)
        return "".join(parts) or "/"


def _advance(
    plan: _Plan, progress: tuple[int, ...], elem: etree._Element, user: str
) -> tuple[tuple[int, ...], bool]:
    """Match ``elem`` against the next step of each path rule; also says if any is still live."""
    # A path rule applies to the node it identifies and all its descendants
    # (RFC 8341 3.4.5 step 6): once every step matched, it stays matched.
    out = list(progress)
    live = False
    tag = elem.tag
    for i, path in plan.paths:
        matched = out[i]
        if matched < 0 or matched == len(path):
            continue
        step = path[matched]
        if step.tag == tag and (not step.predicates or step.matches(elem, user)):
            out[i] = matched + 1
            live = live or matched + 1 < len(path)
        else:
            out[i] = -1
    return tuple(out), live


def _chain(element: etree._Element) -> list[etree._Element]:
    """``element`` and its ancestors, top-level data node first, the datastore root excluded."""
    chain: list[etree._Element] = []
    node: etree._Element | None = element
    while node is not None and node.getparent() is not None:
        chain.append(node)
        node = node.getparent()
    if not chain:
        raise ValueError("a data node is needed, not the datastore root")
    chain.reverse()
    return chain


def _literal(value: str) -> str:
    """An XPath 1.0 string literal for ``value``."""
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    return "concat(" + ', "\'", '.join(f"'{part}'" for part in value.split("'")) + ")"


def exec_denied(module: str, rpc: str) -> RpcError:
    """The rpc-level access-denied error for an RPC :meth:`Nacm.may_exec` refused (3.4.3)."""
    return RpcError(
        "access-denied",
        f"Access denied: execution of {module}:{rpc} is not permitted.",
        type="protocol",
    )
