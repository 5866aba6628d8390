"""Event notifications (RFC 5277) and the events of ietf-netconf-notifications (RFC 6470).

One stream, NETCONF, carries every event.  A bounded in-memory log keeps the
most recent notifications for replay (startTime/stopTime, RFC 5277 2.1.1);
after a replay a <replayComplete/> follows, and a subscription whose stopTime
passes ends with <notificationComplete/>.  The :interleave capability holds:
a subscribed session can still send RPCs.  Each notification is filtered
(subtree or XPath, as for <get>) and checked against NACM (RFC 8341 3.4.6)
for each subscriber.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Sequence
from copy import deepcopy
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from lxml import etree

from nc_core.base_ops import parameters
from nc_core.edit import Change, instance_path, schema_of
from nc_core.errors import RpcError
from nc_core.filters import apply_filter, costly_reason
from nc_core.xmlutil import (
    MON_NS,
    NC_NOTIF_NS,
    NC_NS,
    NCN_NS,
    NOTIF_NS,
    default_ns_element,
    local,
    namespace,
    qn,
)

if TYPE_CHECKING:
    from nc_core.schema import SchemaIndex, SchemaNode
    from nc_core.server import NetconfServer, RpcContext
    from nc_core.session import Session

STREAM = "NETCONF"
SUBSCRIPTION_PARAMETERS = frozenset({"stream", "filter", "startTime", "stopTime"})
"""<create-subscription>'s input (RFC 5277 Section 2.1.1), read in the notification
namespace, the base one or none (nc_core.base_ops.parameters)."""
EVENT_SIZE = 2_000
"""Size (nc_core.filters.data_size units) a subscription filter's cost is judged on: an
event with a few hundred edit records."""


def now() -> datetime:
    return datetime.now(UTC)


def date_and_time(moment: datetime, timespec: str = "microseconds") -> str:
    """A yang:date-and-time in UTC ('Z')."""
    return moment.isoformat(timespec=timespec).replace("+00:00", "Z")


def parse_date_and_time(text: str, name: str) -> datetime:
    try:
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise RpcError(
            "bad-element",
            f"<{name}> {text!r} is not a date-and-time (RFC 3339).",
            type="protocol",
            info=[("bad-element", name)],
        ) from None
    if moment.tzinfo is None:
        raise RpcError(
            "bad-element",
            f"<{name}> {text!r} needs a time zone (RFC 3339).",
            type="protocol",
            info=[("bad-element", name)],
        )
    return moment


@dataclass
class Logged:
    time: datetime
    content: etree._Element
    module: str
    name: str
    audience: frozenset[str] | None = None
    """Users this event is for (None: everyone NACM lets read it)."""
    about: tuple[etree._Element, ...] = ()
    """Data nodes (skeletons: ancestors and list keys only) the event reveals something
    about: a subscriber gets the event only if it may read every one of them."""
    owner: str | None = None
    """The user the event is about (its own session's events): always delivered to it."""
    edits: tuple[tuple[int, etree._Element], ...] = ()
    """netconf-config-change: (position of the <edit> in the content, skeleton of its
    target); a subscriber gets only the edits whose target it may read."""
    changer: etree._Element | None = None
    """netconf-config-change: the skeleton of the changing session, whose source-host a
    subscriber sees only if it may read that session."""


@dataclass
class Subscription:
    session: Session
    filter: etree._Element | None
    start: datetime | None
    stop: datetime | None
    replaying: bool = False
    queued: list[Logged] = field(default_factory=list)
    stop_timer: asyncio.TimerHandle | None = None


class NotificationCenter:
    def __init__(self, server: NetconfServer) -> None:
        self.server = server
        self.log: deque[Logged] = deque(maxlen=server.options.notification_log_size)
        self.created = now()
        self.subscriptions: dict[int, Subscription] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        # Per event type, the subscriptions NACM lets hear it and how many it does not:
        # the VPN server has a subscriber per CE and an event per CE status change, so
        # deciding anew for every pair would cost CEs x CEs.  Valid while neither the
        # subscriptions nor the NACM configuration change.
        self._receivers: dict[tuple[str, str], tuple[list[Subscription], int]] = {}
        self._receivers_stamp: tuple[int, int] = (-1, -1)
        self._subscription_changes = 0

    # -- subscribing -------------------------------------------------------------

    async def create_subscription(self, ctx: RpcContext, op: etree._Element) -> None:
        session = ctx.session
        if session.id in self.subscriptions:
            raise RpcError(
                "in-use",
                "This session already has a subscription (RFC 5277 2.1.1): open another "
                "session for a second one.",
                type="protocol",
            )
        params = parameters(op, SUBSCRIPTION_PARAMETERS, (NOTIF_NS, NC_NS, None))
        stream = _text(params.get("stream"))
        if stream is not None and stream.strip() != STREAM:
            raise RpcError(
                "invalid-value",
                f"There is no stream {stream.strip()!r}; the only stream is {STREAM!r}.",
                type="protocol",
                info=[("bad-element", "stream")],
            )
        start_text = _text(params.get("startTime"))
        stop_text = _text(params.get("stopTime"))
        start = parse_date_and_time(start_text, "startTime") if start_text is not None else None
        stop = parse_date_and_time(stop_text, "stopTime") if stop_text is not None else None
        if stop is not None and start is None:
            raise RpcError(
                "missing-element",
                "<stopTime> needs a <startTime> (RFC 5277 2.1.1).",
                type="protocol",
                info=[("bad-element", "startTime")],
            )
        if start is not None and start > now():
            raise RpcError(
                "bad-element",
                "<startTime> is in the future.",
                type="protocol",
                info=[("bad-element", "startTime")],
            )
        if start is not None and stop is not None and stop < start:
            raise RpcError(
                "bad-element",
                "<stopTime> is earlier than <startTime>.",
                type="protocol",
                info=[("bad-element", "stopTime")],
            )
        # RFC 5277 puts <filter> in the notification namespace; ncclient sends a filter
        # given as a tuple in the base namespace, as for <get>, and one given as a string
        # as written, often in no namespace: all three are read (parameters above).
        filter_elem = params.get("filter")
        if filter_elem is not None:
            # Same semantics as a <get> filter; validate it now, on an empty tree.
            filter_elem = _as_nc_filter(filter_elem)
            apply_filter(etree.Element(qn(NC_NS, "data")), filter_elem, self.server.keys_of)
            # It then runs for every event, on the event loop: only near-linear filters.
            costly = costly_reason(filter_elem, EVENT_SIZE)
            if costly is not None:
                raise RpcError(
                    "invalid-value",
                    f"This filter may be too costly to run for every event: {costly}.  On the "
                    "notification stream an XPath filter may not use '..' or axes other than "
                    "child, attribute and self, '//' inside predicates or more than twice, "
                    "absolute paths or variables inside predicates, predicates nested more than "
                    "twice, comparisons without a literal or number on one side, or more than "
                    "256 tokens; a subtree filter may not have more than a few dozen nodes.",
                    type="protocol",
                    info=[("bad-element", "filter")],
                )
        sub = Subscription(session, filter_elem, start, stop, replaying=start is not None)
        session.subscription = sub
        self.subscriptions[session.id] = sub
        self._subscription_changes += 1
        if start is not None:
            task = asyncio.get_running_loop().create_task(self._replay(sub))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _replay(self, sub: Subscription) -> None:
        await asyncio.sleep(0)  # let the <ok/> go out first
        assert sub.start is not None
        for entry in list(self.log):
            if entry.time < sub.start:
                continue
            if sub.stop is not None and entry.time > sub.stop:
                break
            self._deliver(sub, entry)
        self._send_marker(sub, "replayComplete")
        sub.replaying = False
        for entry in sub.queued:
            self._deliver(sub, entry)
        sub.queued.clear()
        if sub.stop is not None:
            delay = (sub.stop - now()).total_seconds()
            if delay <= 0:
                self._complete(sub)
            else:
                sub.stop_timer = asyncio.get_running_loop().call_later(delay, self._complete, sub)

    def _complete(self, sub: Subscription) -> None:
        self._send_marker(sub, "notificationComplete")
        self.unsubscribe(sub.session)

    def unsubscribe(self, session: Session) -> None:
        sub = self.subscriptions.pop(session.id, None)
        self._subscription_changes += 1
        if sub is not None and sub.stop_timer is not None:
            sub.stop_timer.cancel()
        session.subscription = None

    # -- emitting ------------------------------------------------------------------

    def emit(
        self,
        content: etree._Element,
        audience: frozenset[str] | None = None,
        *,
        about: Sequence[etree._Element] = (),
    ) -> None:
        """Publish an event: log it for replay, send it to every subscriber allowed to see it.

        ``audience`` narrows an event to some users beyond what NACM can say:
        NACM rules name notification types, not instances, so "a CE hears
        only about its own configuration" is said here.  ``about`` names the
        data nodes the event is about (see :func:`data_node`): a subscriber
        who may not read one of them does not get the event (RFC 8341 3.4.6
        reads the event type; this reads the instance, so one tenant does
        not learn of another's sites).
        """
        self._log(Logged(now(), content, *self._type_of(content), audience, tuple(about)))

    def _type_of(self, content: etree._Element) -> tuple[str, str]:
        ns = namespace(content.tag) or ""
        return self.server.index.namespaces.get(ns, ""), local(content.tag)

    def _log(self, entry: Logged) -> None:
        self.log.append(entry)
        receivers, denied = self._receivers_of(entry.module, entry.name)
        self.server.nacm.denied_notifications += denied
        for sub in receivers:
            if sub.session.id not in self.subscriptions:
                continue  # ended by an earlier delivery in this loop
            if sub.replaying:
                sub.queued.append(entry)
            elif sub.stop is None or entry.time <= sub.stop:
                self._deliver(sub, entry, type_permitted=True)

    def _receivers_of(self, module: str, name: str) -> tuple[list[Subscription], int]:
        """The subscriptions that may hear events of this type (RFC 8341 3.4.6), and the
        number that may not."""
        nacm = self.server.nacm
        stamp = (nacm.generation, self._subscription_changes)
        if stamp != self._receivers_stamp:
            self._receivers.clear()
            self._receivers_stamp = stamp
        known = self._receivers.get((module, name))
        if known is None:
            subs = list(self.subscriptions.values())
            allowed = [s for s in subs if nacm.notify_permitted(s.session.user, module, name)]
            known = (allowed, len(subs) - len(allowed))
            self._receivers[(module, name)] = known
        return known

    def _deliver(self, sub: Subscription, entry: Logged, *, type_permitted: bool = False) -> None:
        session = sub.session
        if entry.audience is not None and session.user not in entry.audience:
            return
        nacm = self.server.nacm
        if not type_permitted and not nacm.may_notify(session.user, entry.module, entry.name):
            return
        user = session.user
        if entry.owner != user and not all(nacm.may_read(user, node) for node in entry.about):
            return
        content = deepcopy(entry.content)
        if entry.edits and not nacm.permits_all(user, "read"):
            children = [c for c in content if isinstance(c.tag, str)]
            hidden = [children[i] for i, target in entry.edits if not nacm.may_read(user, target)]
            if len(hidden) == len(entry.edits):
                return  # every change was to data this user may not read
            for edit in hidden:
                content.remove(edit)
        if (
            entry.changer is not None
            and entry.owner != user
            and not nacm.may_read(user, entry.changer)
        ):
            for host in content.iter(qn(NCN_NS, "source-host")):
                host.getparent().remove(host)  # type: ignore[union-attr]
        data = etree.Element(qn(NC_NS, "data"))
        data.append(content)
        data = nacm.filter_read(user, data)
        if sub.filter is not None:
            data = apply_filter(data, sub.filter, self.server.keys_of)
        parts = [c for c in data if isinstance(c.tag, str)]
        if not parts:
            return
        session.send_notification(_envelope(entry.time, parts))

    def _send_marker(self, sub: Subscription, name: str) -> None:
        marker = default_ns_element(NC_NOTIF_NS, name)
        sub.session.send_notification(_envelope(now(), [marker]))

    # -- ietf-netconf-notifications (RFC 6470) ---------------------------------------

    def _changed_by(self, parent: etree._Element, session: Session | None) -> None:
        by = etree.SubElement(parent, qn(NCN_NS, "changed-by"))
        if session is None:
            etree.SubElement(by, qn(NCN_NS, "server"))
        else:
            _session_info(by, session)

    def _session_event(self, event: etree._Element, session: Session) -> None:
        """Who logs in or out is the session's business and of those who may read it in
        /netconf-state/sessions (RFC 6022): not of every subscriber."""
        self._log(
            Logged(
                now(),
                event,
                *self._type_of(event),
                about=(session_node(session.id, session.user, session.source_host),),
                owner=session.user,
            )
        )

    def session_start(self, session: Session) -> None:
        event = _event("netconf-session-start")
        _session_info(event, session)
        self._session_event(event, session)

    def session_end(self, session: Session) -> None:
        event = _event("netconf-session-end")
        _session_info(event, session)
        if session.killed_by is not None:
            etree.SubElement(event, qn(NCN_NS, "killed-by")).text = str(session.killed_by)
        reason = session.termination_reason
        if reason not in ("closed", "killed", "dropped", "timeout", "bad-hello", "other"):
            reason = "other"
        etree.SubElement(event, qn(NCN_NS, "termination-reason")).text = reason
        self._session_event(event, session)

    def config_change(
        self, session: Session | None, datastore: str, changes: Sequence[Change]
    ) -> None:
        event = _event("netconf-config-change")
        self._changed_by(event, session)
        etree.SubElement(event, qn(NCN_NS, "datastore")).text = datastore
        edits: list[tuple[int, etree._Element]] = []
        for node, op in _top_changes(changes):
            edits.append((len(event), skeleton(node, self.server.index)))
            edit = etree.SubElement(event, qn(NCN_NS, "edit"))
            path, nsmap = instance_path(node, self.server.index)
            target = etree.SubElement(edit, qn(NCN_NS, "target"), nsmap=nsmap)
            target.text = path
            etree.SubElement(edit, qn(NCN_NS, "operation")).text = op
        changer = (
            None if session is None else session_node(session.id, session.user, session.source_host)
        )
        self._log(
            Logged(
                now(),
                event,
                *self._type_of(event),
                owner=session.user if session is not None else None,
                edits=tuple(edits),
                changer=changer,
            )
        )

    def confirmed_commit(
        self,
        session: Session | None,
        event_name: str,
        timeout: int | None,
        pending: object | None = None,
    ) -> None:
        event = _event("netconf-confirmed-commit")
        about: tuple[etree._Element, ...] = ()
        owner: str | None = None
        if session is not None:
            _session_info(event, session)
            about = (session_node(session.id, session.user, session.source_host),)
            owner = session.user
        elif pending is not None:
            user = str(getattr(pending, "user", ""))
            session_id = int(getattr(pending, "session_id", 0))
            etree.SubElement(event, qn(NCN_NS, "username")).text = user
            etree.SubElement(event, qn(NCN_NS, "session-id")).text = str(session_id)
            about = (session_node(session_id, user, str(getattr(pending, "source_host", ""))),)
            owner = user
        etree.SubElement(event, qn(NCN_NS, "confirm-event")).text = event_name
        if timeout is not None:
            etree.SubElement(event, qn(NCN_NS, "timeout")).text = str(timeout)
        self._log(Logged(now(), event, *self._type_of(event), about=about, owner=owner))


def data_node(*steps: tuple[str, Sequence[tuple[str, str]]]) -> etree._Element:
    """A skeleton data node for :meth:`NotificationCenter.emit`'s ``about``: each step is
    (Clark tag, [(key leaf tag, value), ...]); returns the last node, in a datastore root."""
    parent = etree.Element(qn(NC_NS, "data"))
    for tag, keys in steps:
        parent = etree.SubElement(parent, tag)
        for key_tag, value in keys:
            etree.SubElement(parent, key_tag).text = value
    return parent


def session_node(session_id: int, user: str, source_host: str) -> etree._Element:
    """/netconf-state/sessions/session[session-id] (RFC 6022) as a skeleton, with the
    leaves a NACM rule may name (``[ncm:username=$USER]``)."""
    node = data_node(
        (qn(MON_NS, "netconf-state"), ()),
        (qn(MON_NS, "sessions"), ()),
        (qn(MON_NS, "session"), [(qn(MON_NS, "session-id"), str(session_id))]),
    )
    etree.SubElement(node, qn(MON_NS, "username")).text = user
    if source_host:
        etree.SubElement(node, qn(MON_NS, "source-host")).text = source_host
    return node


def skeleton(node: etree._Element, index: SchemaIndex) -> etree._Element:
    """``node`` of a datastore tree and its ancestors, each with its list keys only (or its
    value, for a leaf-list entry): enough for NACM to decide read access to it, kept in the
    replay log instead of the whole configuration it was part of."""
    chain: list[etree._Element] = []
    walk: etree._Element | None = node
    while walk is not None and walk.getparent() is not None:
        chain.append(walk)
        walk = walk.getparent()
    chain.reverse()
    steps: list[tuple[str, list[tuple[str, str]]]] = []
    snode: SchemaNode | None = None
    for elem in chain:
        snode = schema_of(index, snode, elem)
        keys: list[tuple[str, str]] = []
        if snode is not None and snode.kind == "list":
            for key in snode.keys:
                value = elem.findtext(qn(snode.namespace, key))
                if value is not None:
                    keys.append((qn(snode.namespace, key), value))
        steps.append((str(elem.tag), keys))
    last = data_node(*steps)
    if snode is not None and snode.kind == "leaf-list":
        last.text = node.text
    return last


def _event(name: str) -> etree._Element:
    return default_ns_element(NCN_NS, name)


def _session_info(parent: etree._Element, session: Session) -> None:
    etree.SubElement(parent, qn(NCN_NS, "username")).text = session.user
    etree.SubElement(parent, qn(NCN_NS, "session-id")).text = str(session.id)
    if session.source_host:
        etree.SubElement(parent, qn(NCN_NS, "source-host")).text = session.source_host


MAX_EDITS_PER_PARENT = 16
"""More changed children than this under one node are reported as one 'merge' of it."""


def _top_changes(changes: Sequence[Change]) -> list[tuple[etree._Element, str]]:
    """(node, operation) for the top of each created or deleted subtree and each update.

    A commit that creates 10,000 list entries yields one edit record for
    their parent, not 10,000: RFC 6470 leaves the granularity of edit
    records to the server, and a listener can read the data it needs.
    """
    tops = list(changes)  # created and deleted subtrees come as their top node
    # Keyed by the parent elements themselves, which the dict keeps alive: lxml makes a
    # new proxy object for a node nobody holds, so id() of a getparent() result is not
    # stable from one call to the next (a profiler's allocations were enough to make
    # this count miss, a KeyError at commit).
    per_parent: dict[etree._Element, int] = {}
    for change in tops:
        parent = change.element.getparent()
        if parent is not None:
            per_parent[parent] = per_parent.get(parent, 0) + 1
    out: list[tuple[etree._Element, str]] = []
    summarised: set[etree._Element] = set()
    names = {"create": "create", "delete": "delete", "update": "replace"}
    for change in tops:
        parent = change.element.getparent()
        if (
            parent is not None
            and parent.getparent() is not None
            and per_parent[parent] > MAX_EDITS_PER_PARENT
        ):
            if parent not in summarised:
                summarised.add(parent)
                out.append((parent, "merge"))
            continue
        out.append((change.element, names[change.op]))
    return out


def _envelope(moment: datetime, parts: list[etree._Element]) -> bytes:
    notification = default_ns_element(NOTIF_NS, "notification")
    etree.SubElement(notification, qn(NOTIF_NS, "eventTime")).text = date_and_time(moment)
    for part in parts:
        notification.append(part)
    return etree.tostring(notification, encoding="UTF-8", xml_declaration=True)


def _text(elem: etree._Element | None) -> str | None:
    """A parameter's text, "" for an empty element, None for an absent one (as findtext)."""
    return None if elem is None else (elem.text or "")


def _as_nc_filter(filter_elem: etree._Element) -> etree._Element:
    """RFC 5277's <filter> is in the notification namespace; reuse the <get> filter code."""
    nsmap: Any = filter_elem.nsmap
    copy = etree.Element(qn(NC_NS, "filter"), nsmap=nsmap)
    for name, value in filter_elem.attrib.items():
        copy.set(name, value)
    for child in filter_elem:
        copy.append(deepcopy(child))
    copy.text = filter_elem.text
    return copy


def register(server: NetconfServer) -> NotificationCenter:
    center = NotificationCenter(server)
    server.register(NOTIF_NS, "create-subscription", "notifications", center.create_subscription)
    return center
