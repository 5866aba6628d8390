"""The NETCONF server engine: datastores, sessions, locks and the commit transaction.

Protocol operations live in their own modules (base_ops for RFC 6241 Section
7, confirmed_commit for 8.3/8.4, notifications for RFC 5277, monitoring for
RFC 6022 and the YANG library, nacm for RFC 8341); this module holds the state
they share and the one path by which the running configuration ever changes:
:meth:`NetconfServer.change_running` -- validate with libyang, check access,
hand the transaction to the application (validate, prepare, apply or abort),
persist atomically, then publish.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from copy import deepcopy
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lxml import etree

from nc_core.audit import log_commit
from nc_core.datastore import Datastore, document_bytes, free
from nc_core.document_splice import spliced_document
from nc_core.edit import (
    Change,
    Instances,
    diff,
    forget_patch,
    instance_identity,
    new_datastore,
    remembered_patch,
    schema_of,
)
from nc_core.errors import RpcError, RpcErrors, operation_not_supported
from nc_core.merge import MergeConflict, merge3
from nc_core.nacm import Nacm
from nc_core.nmda import CAPABILITIES as NMDA_CAPABILITIES
from nc_core.redaction import for_user
from nc_core.release import drop_later, free_later, trim_after_release
from nc_core.schema import Schema, SchemaIndex
from nc_core.session import BASE_10, BASE_11, Session
from nc_core.spare_tree import Spare, copy_from_spare
from nc_core.ssh_auth import PasswordGuard
from nc_core.transaction import Application, Transaction
from nc_core.users import (
    User,
    has_clear_text_passwords,
    hash_clear_text_passwords,
    initial_nacm,
    users_from,
)
from nc_core.validation import Validator
from nc_core.with_defaults import (
    BASIC_MODE,
    add_implicit_defaults,
    as_datastore_tree,
    print_xml,
)
from nc_core.with_defaults import (
    CAPABILITY as WITH_DEFAULTS_CAPABILITY,
)
from nc_core.xmlutil import NACM_NS, NC_NS, SYS_NS, default_ns_element, local, namespace, qn

if TYPE_CHECKING:
    from nc_core.shared_running import SharedRunning
    from nc_core.transport_ssh import Listener

log = logging.getLogger("cevpn.netconf")

TRIM_AFTER_BYTES = 256 * 1024
"""A running configuration this large (its document) gives the heap's free pages back to
the system when the configuration it replaced is let go (nc_core.release)."""

BASE_MODULES: tuple[str, ...] = (
    "ietf-netconf",
    "ietf-netconf-with-defaults",
    "ietf-netconf-monitoring",
    "ietf-netconf-notifications",
    "ietf-netconf-acm",
    "ietf-system",
    "cevpn-system-deviations",
    "ietf-origin",
    "ietf-netconf-nmda",
)
BASE_FEATURES: dict[str, tuple[str, ...]] = {
    "ietf-netconf": (
        "writable-running",
        "candidate",
        "confirmed-commit",
        "rollback-on-error",
        "validate",
        "startup",
        "xpath",
    ),
    "ietf-system": ("authentication", "local-users"),
    "ietf-netconf-nmda": ("origin", "with-defaults"),
    # The alarm list both daemons keep (nc_core.alarms).
    "ietf-alarms": ("alarm-history", "alarm-summary"),
}

CAP = "urn:ietf:params:netconf:capability:"
PROTOCOL_CAPABILITIES = (
    BASE_10,
    BASE_11,
    CAP + "writable-running:1.0",
    CAP + "candidate:1.0",
    CAP + "confirmed-commit:1.0",
    CAP + "confirmed-commit:1.1",
    CAP + "rollback-on-error:1.0",
    CAP + "validate:1.0",
    CAP + "validate:1.1",
    CAP + "startup:1.0",
    CAP + "xpath:1.0",
    CAP + "notification:1.0",
    CAP + "interleave:1.0",
    WITH_DEFAULTS_CAPABILITY,
)

Handler = Callable[["RpcContext", etree._Element], Awaitable[list[etree._Element] | None]]


@dataclass
class ServerOptions:
    state_dir: Path
    host: str = "::"
    port: int = 830
    max_message_size: int = 64 * 1024 * 1024
    """Largest message accepted, in octets (the bench's 10,000-entry edit is ~1 MB)."""
    max_input_buffer: int = 256 * 1024 * 1024
    """Input held server-wide for messages not yet handled (partial and queued), in octets:
    a session whose message would take the total past it is refused (resource-denied) and
    closed."""
    hello_timeout: float = 60.0
    max_sessions: int = 256
    max_sessions_per_user: int = 64
    """One account cannot take every session (a CE's key sits on customer premises)."""
    max_sessions_per_connection: int = 8
    """NETCONF channels one SSH connection may open."""
    reserved_admin_sessions: int = 16
    """Sessions of max_sessions only full-access accounts and the recovery user may take."""
    max_unauthenticated: int = 128
    """SSH connections that have not authenticated yet (OpenSSH's MaxStartups)."""
    output_high_water: int = 4 * 1024 * 1024
    """Octets a client may leave unread before the server stops handling its requests."""
    notification_backlog: int = 16 * 1024 * 1024
    """Octets of notifications kept for a subscriber that does not read; past it the
    session is closed."""
    filter_budget: float = 5.0
    """Seconds a costly filter may run (in a worker process) before it is refused."""
    filter_workers: int = 2
    """Worker processes evaluating costly filters, off the event loop."""
    recovery_user: str | None = None
    """A user for whom NACM is not enforced (RFC 8341 3.4 'recovery session')."""
    notification_log_size: int = 10_000
    name: str = "cevpn"
    yang_dirs: tuple[Path, ...] = ()
    """Extra directories searched for the application's YANG modules."""
    spare_keep_seconds: float = 5.0
    """Seconds the configuration a commit replaced is kept for the next edit's copy of
    running (nc_core.spare_tree), then let go, and the heap trimmed after a large commit
    (nc_core.release): a burst of edits is patched, and a server that has been idle for a
    while holds one copy of a large configuration, not two, and no holes."""
    metrics_listen: tuple[str, int] | None = None
    """Where to serve Prometheus metrics (nc_core.metrics); None: no metrics at all."""


@dataclass
class ServerStats:
    """RFC 6022 /netconf-state/statistics."""

    netconf_start_time: datetime = field(default_factory=lambda: datetime.now(UTC))
    in_bad_hellos: int = 0
    in_sessions: int = 0
    dropped_sessions: int = 0
    in_rpcs: int = 0
    in_bad_rpcs: int = 0
    out_rpc_errors: int = 0
    out_notifications: int = 0
    dropped_subscribers: int = 0
    """Sessions closed for leaving notifications unread (not in RFC 6022: metrics only)."""
    refused_sessions: int = 0
    """Sessions refused at their opening for a limit (admit_session; metrics only)."""


@dataclass
class RpcContext:
    server: NetconfServer
    session: Session


class StateDirLocked(RuntimeError):
    """Another process (a running server) holds the state directory."""


LOCK_FILE = "lock"
"""In the state directory: held (flock) by the process that uses it."""


def lock_state_dir(state_dir: Path) -> int:
    """Take the state directory's lock; raise StateDirLocked if a server holds it."""
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(state_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StateDirLocked(f"{state_dir} is in use by a running server") from None
    return fd


class NetconfServer:
    """Everything one NETCONF server holds; transports feed it sessions."""

    def __init__(self, options: ServerOptions, application: Application | None = None) -> None:
        from nc_core import base_ops, confirmed_commit, monitoring, nmda, notifications
        from nc_core.filter_worker import FilterRunner
        from nc_core.metrics import metrics_for

        self.options = options
        self.app = application or Application()
        features: dict[str, Sequence[str]] = dict(BASE_FEATURES)
        features.update(self.app.features)
        modules = list(dict.fromkeys([*BASE_MODULES, *self.app.modules]))
        self.schema = Schema(modules, features=features, search_dirs=options.yang_dirs)
        self.index = SchemaIndex(self.schema)
        self.validator = Validator(self.schema, self.index)
        self._running_document: tuple[etree._Element, bytes] | None = None
        """The running configuration's tree and ``document_bytes`` of it, as last staged
        and published (:meth:`_stage_running`)."""
        self._spare: Spare | None = None
        """The configuration the last commit replaced, for the next edit's copy of
        running (nc_core.spare_tree)."""
        self.spare_copies = 0
        """Edits whose copy of running was made from the spare (tests look)."""
        self._settle_timer: asyncio.TimerHandle | None = None
        self.persistence = self.app.persistence(options.state_dir)
        self.datastores = {
            "running": Datastore("running", persistence=self.persistence),
            "candidate": Datastore("candidate"),
            "startup": Datastore("startup", persistence=self.persistence),
        }
        self.locks: dict[str, int] = {}
        self.lock_times: dict[str, datetime] = {}
        self.candidate_modified = False
        self.candidate_base: etree._Element | None = None
        """Running as it was when the candidate stopped following it (replace_candidate)."""
        self.candidate_edited = False
        """A session edited the candidate since it last followed running, maybe to what it
        already was (candidate_modified stays False then)."""
        self.candidate_reverted: str | None = None
        """Why the running the candidate was edited on was rolled back since (a confirmed
        commit's rollback): such a candidate is not committed (candidate_onto_running)."""
        self.sessions: dict[int, Session] = {}
        self._next_session_id = 1
        self.config_lock = asyncio.Lock()
        self.shared: SharedRunning | None = None
        """Set by an application whose running is shared with other servers (one database):
        commits, the running lock and confirmed commits then hold for all of them
        (nc_core.shared_running)."""
        self._background: set[asyncio.Task[None]] = set()
        self.filters = FilterRunner(workers=options.filter_workers, budget=options.filter_budget)
        self.nacm = Nacm(self.index, options.recovery_user)
        self.users: dict[str, User] = {}
        self.password_guard = PasswordGuard()
        self.channels: Counter[str] = Counter()
        """NETCONF channels admitted per user (admit_session), open or opening."""
        self.quota_channels: Counter[str] = Counter()
        """Of those, the ones admitted on the user's own quota (Application.session_quota),
        which max_sessions does not count."""
        self.limited_channels = 0
        """The channels max_sessions counts (all but the quota ones)."""
        self.unauthenticated = 0
        """SSH connections not authenticated yet (the transport counts them)."""
        self.input_held = 0
        """Octets of client input not handled yet, all sessions together (bounded by
        ServerOptions.max_input_buffer)."""
        self.stats = ServerStats()
        self.metrics = metrics_for(self)
        """Prometheus metrics (nc_core.metrics): no-ops unless options.metrics_listen."""
        self.handlers: dict[tuple[str, str], tuple[str, Handler]] = {}
        base_ops.register(self)
        self.confirmed = confirmed_commit.register(self)
        self.notifications = notifications.register(self)
        self.monitoring = monitoring.register(self)
        nmda.register(self)
        for ns, name in self.app.rpc_names():
            self.handlers[(ns, name)] = (self.index.namespaces.get(ns, ""), self._app_rpc)
        self._lock_fd: int | None = None
        self.listener: Listener | None = None
        """Set by the transport once it listens."""
        self.app.attach(self)

    # -- lifecycle -----------------------------------------------------------

    async def load(self) -> None:
        """Read the persisted datastores (or create the initial ones) and apply running."""
        state = self.options.state_dir
        self._lock_fd = lock_state_dir(state)
        os.chmod(state, 0o700)
        self.app.state_dir_taken()
        running = self.datastores["running"]
        startup = self.datastores["startup"]
        store = self.persistence
        # A change staged but never committed (the process died during apply)
        # is discarded: the application reconciles the world to running below.
        store.discard("running")
        self.confirmed.recover_after_restart()
        stored_running, stored_startup = store.read("running"), store.read("startup")
        if stored_running is not None:
            running.root, running.tree = self.validator.load(stored_running, "running")
        elif stored_startup is not None:
            running.root, running.tree = self.validator.load(stored_startup, "startup")
            running.save()
        else:
            root = self.initial_running()
            running.tree = self.validator.validate(root)
            running.root = self.validator.canonical(running.tree)
            running.save()
        if stored_startup is not None:
            startup.root, startup.tree = self.validator.load(stored_startup, "startup")
        else:
            startup.root, startup.tree = deepcopy(running.root), None
            startup.save()
        self.reset_candidate()
        self._publish_running()
        txn = Transaction(
            old=new_datastore(),
            new=running.root,
            old_tree=None,
            new_tree=running.tree,
            changes=diff(new_datastore(), running.root, self.index),
            defaults=self.schema.defaults_json(),
            user=None,
            session_id=0,
            reason="startup",
        )
        await self.app.validate(txn)
        await self.app.prepare(txn)
        try:
            await self.app.apply(txn)
        except BaseException:
            await self.app.abort(txn)
            raise

    def add_user_offline(
        self, name: str, *, password: str | None, public_keys: list[str], groups: list[str]
    ) -> None:
        """Add an account to the persisted running datastore while no server runs (`adduser`)."""
        from nc_core.users import add_user

        fd = lock_state_dir(self.options.state_dir)
        try:
            self.app.state_dir_taken()
            with self.persistence.exclusive():
                root = self.stored_running()
                add_user(root, name, password=password, public_keys=public_keys, groups=groups)
                try:
                    self.store_running(root)
                except RpcErrors as exc:
                    raise ValueError(f"the account is not valid: {exc}") from None
        finally:
            os.close(fd)

    def stored_running(self) -> etree._Element:
        """The persisted running configuration, or a fresh one (admin rule list only), for
        changes made while no server runs; the caller holds the state directory's lock."""
        stored = self.persistence.read("running")
        if stored is None:
            return self.initial_running()
        root, tree = self.validator.load(stored, "running")
        free(tree)
        return root

    def initial_running(self) -> etree._Element:
        """A fresh state directory's running configuration: the admin rule list and what
        the application adds (Application.initial_configuration).  Made once: nothing
        here is added again at later starts."""
        root = new_datastore()
        root.append(initial_nacm())
        self.app.initial_configuration(root)
        return root

    def store_running(self, root: etree._Element) -> None:
        """Validate fully (RpcErrors) and persist a running configuration made offline."""
        tree = self.validator.validate(root)
        try:
            self.persistence.write("running", document_bytes(self.validator.canonical(tree)))
        finally:
            free(tree)

    def close(self) -> None:
        for session in list(self.sessions.values()):
            session.close("closed")
        self.confirmed.shutdown()
        self.filters.close()
        if self._settle_timer is not None:
            self._settle_timer.cancel()
            self._settle_timer = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- sessions --------------------------------------------------------------

    def new_session(
        self,
        user: str,
        source_host: str,
        write: Callable[[bytes], None],
        close_transport: Callable[[], None],
        **kw: Any,
    ) -> Session:
        session_id = self._next_session_id
        self._next_session_id += 1
        session = Session(self, session_id, user, source_host, write, close_transport, **kw)
        self.sessions[session_id] = session
        return session

    def session_started(self, session: Session) -> None:
        self.stats.in_sessions += 1
        self.notifications.session_start(session)
        self.app.session_started(session)

    def session_ended(self, session: Session) -> None:
        self.sessions.pop(session.id, None)
        # RFC 6022: sessions ended abnormally, not by close-session or kill-session.
        if session.hello_received and session.termination_reason not in ("closed", "killed"):
            self.stats.dropped_sessions += 1
        for name, holder in list(self.locks.items()):
            if holder == session.id:
                del self.locks[name]
                if self.shared is not None and name == "running":
                    self.shared_unlock(name)
                if name == "candidate":  # RFC 6241 8.3.5.2: changes of a dead lock holder go
                    self.reset_candidate()
        self.confirmed.session_ended(session)
        self.notifications.unsubscribe(session)
        if session.hello_received:
            self.notifications.session_end(session)

    def capabilities(self) -> list[str]:
        return [*PROTOCOL_CAPABILITIES, *NMDA_CAPABILITIES, *self.monitoring.capabilities()]

    def hello(self, session_id: int) -> bytes:
        hello = default_ns_element(NC_NS, "hello")
        caps = etree.SubElement(hello, qn(NC_NS, "capabilities"))
        for cap in self.capabilities():
            etree.SubElement(caps, qn(NC_NS, "capability")).text = cap
        etree.SubElement(hello, qn(NC_NS, "session-id")).text = str(session_id)
        return etree.tostring(hello, encoding="UTF-8", xml_declaration=True)

    # -- dispatch ----------------------------------------------------------------

    def register(self, ns: str, name: str, module: str, handler: Handler) -> None:
        self.handlers[(ns, name)] = (module, handler)

    def operation_name(self, rpc: etree._Element) -> str:
        """The operation of an <rpc> as the metrics name it: one the server answers, else
        'unsupported' (a client cannot grow the set of label values)."""
        for op in rpc:
            if isinstance(op.tag, str):
                key = (namespace(op.tag) or "", local(op.tag))
                return key[1] if key in self.handlers else "unsupported"
        return "unsupported"

    async def dispatch(self, session: Session, rpc: etree._Element) -> list[etree._Element] | None:
        operations = [c for c in rpc if isinstance(c.tag, str)]
        if not operations:
            raise RpcError(
                "missing-element",
                "The <rpc> carries no operation: it needs exactly one operation element.",
                type="protocol",
                info=[("bad-element", "rpc")],
            )
        if len(operations) > 1:
            # RFC 6241 Appendix A: bad-element is a protocol error naming the element.
            raise RpcError(
                "bad-element",
                f"An <rpc> carries exactly one operation element; <{local(operations[1].tag)}> "
                f"follows <{local(operations[0].tag)}>.",
                type="protocol",
                info=[("bad-element", local(operations[1].tag))],
            )
        op = operations[0]
        key = (namespace(op.tag) or "", local(op.tag))
        entry = self.handlers.get(key)
        if entry is None:
            if key[0] and key[0] not in self.index.namespaces:
                raise RpcError(
                    "unknown-namespace",
                    f"No module served here has the namespace {key[0]!r}.",
                    type="protocol",
                    info=[("bad-element", key[1]), ("bad-namespace", key[0])],
                )
            raise operation_not_supported(f"The operation <{key[1]}> is not supported here.")
        module, handler = entry
        snode = self.index.top_node(key[0], key[1])
        deny_all = bool(snode is not None and snode.deny_all)
        if key != (NC_NS, "close-session") and not self.nacm.may_exec(
            session.user, module, key[1], default_deny_all=deny_all
        ):
            raise RpcError(
                "access-denied",
                f"User {session.user!r} may not use the operation <{key[1]}> ({module}).",
                type="protocol",
            )
        try:
            return await handler(RpcContext(self, session), op)
        except RpcError as error:
            raise self._as_seen_by(session, [error])[0] from None
        except RpcErrors as errors:
            raise RpcErrors(self._as_seen_by(session, errors.errors)) from None

    def _as_seen_by(self, session: Session, errors: list[RpcError]) -> list[RpcError]:
        """Errors as the session's user may see them (nc_core.redaction): no path into, and
        no value from, data it may not read."""
        trees = [self.datastores["running"].root, self.datastores["candidate"].root]
        return for_user(errors, session.user, self.nacm, trees)

    async def _app_rpc(self, ctx: RpcContext, op: etree._Element) -> list[etree._Element] | None:
        self.monitoring.validate_rpc_input(op)
        return await self.app.rpc(ctx.session, op) or None

    def is_administrator(self, user: str) -> bool:
        """Full access by NACM (group admin's rule list, or NACM off) or the recovery user:
        such accounts may use the sessions kept back for them
        (ServerOptions.reserved_admin_sessions)."""
        return self.nacm.unrestricted(user) or (
            self.nacm.permits_all(user, "read") and self.nacm.permits_all(user, "update")
        )

    def admit_session(self, user: str, on_connection: int) -> str | None:
        """Why a new session of ``user`` must be refused (None: admit it).

        ``on_connection`` is how many sessions the same SSH connection has
        open already.  Caps per connection and per user keep one account (a
        CE's key sits on customer premises) from taking every session; the
        last ``reserved_admin_sessions`` are for administrators, so one of
        them can always get in to repair things.
        """
        options = self.options
        if on_connection >= options.max_sessions_per_connection:
            return f"this SSH connection has {on_connection} sessions already (the limit)"
        quota = self.app.session_quota(user)
        if quota is not None:
            held = self.quota_channels[user]
            if held >= quota:
                return f"user {user!r} has {held} sessions already (the limit of this account)"
            return None
        total = self.limited_channels
        if total >= options.max_sessions:
            return f"the server has {total} sessions (the limit)"
        mine = self.channels[user] - self.quota_channels[user]
        if mine >= options.max_sessions_per_user:
            return f"user {user!r} has {mine} sessions already (the limit per user)"
        if total >= options.max_sessions - options.reserved_admin_sessions:
            if not self.is_administrator(user):
                return "the remaining sessions are kept for administrators"
        return None

    def channel_opened(self, user: str) -> bool:
        """A channel admit_session admitted is open; True if it is on the user's quota
        (to be given back to channel_closed)."""
        self.channels[user] += 1
        quota = self.app.session_quota(user) is not None
        if quota:
            self.quota_channels[user] += 1
        else:
            self.limited_channels += 1
        return quota

    def channel_closed(self, user: str, quota: bool) -> None:
        self.channels[user] -= 1
        if self.channels[user] <= 0:
            del self.channels[user]
        if quota:
            self.quota_channels[user] -= 1
            if self.quota_channels[user] <= 0:
                del self.quota_channels[user]
        else:
            self.limited_channels -= 1

    # -- who may change things ------------------------------------------------------

    def require_writer(self, session: Session, operation: str) -> None:
        """Refuse ``operation`` to a user NACM lets change nothing (Nacm.may_write_any).

        Locking, discarding the shared candidate or committing it only make
        sense for a writer; for anyone else they are a way to stall or undo
        the work of those who may write.  Checked before anything else about
        the request, so a refused user learns nothing from validation either.
        """
        if not self.nacm.may_write_any(session.user):
            self.nacm.denied_operations += 1
            raise RpcError(
                "access-denied",
                f"User {session.user!r} may not change any configuration, so it may not use "
                f"<{operation}>.",
                type="protocol",
            )

    def check_running_writable(self, session: Session | None) -> None:
        """Refuse a change of running that another session's lock or pending confirmed
        commit would make unsafe (RFC 6241 7.5, 8.4).

        A confirmed commit rolls running back to what it was before; a change
        accepted from anyone else meanwhile would be silently lost then, so it
        is refused with in-use naming the holder.  ``session`` None is the
        server's application changing running for itself.
        """
        holder = self.locks.get("running")
        if holder is not None and (session is None or holder != session.id):
            raise RpcError(
                "in-use",
                f"The running datastore is locked by session {holder}; try again once it "
                "is unlocked.",
                type="protocol",
                info=[("session-id", str(holder))],
            )
        pending = self.confirmed.pending
        if pending is not None and (
            session is None or pending.session_id != session.id or pending.server is not None
        ):
            persist = (
                " (persistent: confirm or cancel it with its persist-id)" if pending.persist else ""
            )
            where = "" if pending.server is None else f" of server {pending.server}"
            raise RpcError(
                "in-use",
                f"Session {pending.session_id}{where} ({pending.user}) has a confirmed commit "
                f"pending{persist}; running cannot change until it is confirmed or rolled back.",
                type="protocol",
                info=[("session-id", str(pending.session_id))],
            )

    # -- locks ---------------------------------------------------------------------

    def shared_unlock(self, name: str) -> None:
        """Release this server's lock of ``name`` for the other servers too, in the background
        (a session ending cannot wait for the database)."""
        if self.shared is None:
            return
        task = asyncio.get_running_loop().create_task(self.shared.unlock(name))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def check_not_locked(self, name: str, session: Session) -> None:
        holder = self.locks.get(name)
        if holder is not None and holder != session.id:
            raise RpcError(
                "in-use",
                f"The {name} datastore is locked by session {holder}.",
                type="protocol",
                info=[("session-id", str(holder))],
            )

    # -- reading -----------------------------------------------------------------

    def keys_of(self, elem: etree._Element) -> tuple[str, ...]:
        """Clark tags of the key leaves if ``elem`` is a list entry of a data tree."""
        chain = []
        node: etree._Element | None = elem
        while node is not None and node.getparent() is not None:
            chain.append(node)
            node = node.getparent()
        snode = None
        for step in reversed(chain):
            snode = schema_of(self.index, snode, step)
            if snode is None:
                return ()
        if snode is None or snode.kind != "list":
            return ()
        return tuple(qn(snode.namespace, k) for k in snode.keys)

    def config_tree(self, name: str, mode: str = BASIC_MODE) -> etree._Element:
        """A copy of a configuration datastore, with defaults per RFC 6243 ``mode``."""
        ds = self.datastores[name]
        if mode == BASIC_MODE:
            return deepcopy(ds.root)
        tree = ds.tree
        owned = False
        if tree is None:
            tree = self.validator.parse_only(ds.root)
            add_implicit_defaults(tree)
            owned = True
        try:
            return as_datastore_tree(print_xml(tree, mode))
        finally:
            if owned:
                free(tree)

    async def full_tree(self, session: Session | None, mode: str = BASIC_MODE) -> etree._Element:
        """Running configuration plus state data (for <get>)."""
        root = deepcopy(self.datastores["running"].root)
        extra = [*self.monitoring.state(), *await self.app.operational(session)]
        merge_into(root, extra, self)
        if mode == BASIC_MODE:
            return root
        tree = self.validator.parse_only(root, state=True)
        add_implicit_defaults(tree)
        try:
            return as_datastore_tree(print_xml(tree, mode))
        finally:
            free(tree)

    def readable(self, session: Session, root: etree._Element) -> etree._Element:
        """``root`` with what the session's user may not read removed (in place)."""
        return self.nacm.filter_read(session.user, root)

    def readable_config(self, name: str, session: Session, mode: str) -> etree._Element:
        """A configuration datastore as the user may read it; the caller must not modify it.

        Filtering always copies, so for a user who may read everything the
        stored tree itself is handed to the filter instead of a copy of it.
        """
        if mode == BASIC_MODE and self.nacm.permits_all(session.user, "read"):
            return self.datastores[name].root
        return self.nacm.filter_read(session.user, self.config_tree(name, mode))

    # -- writing -------------------------------------------------------------------

    async def check_configuration(self, root: etree._Element, session: Session | None) -> None:
        """Everything a commit of ``root`` would be refused for, changing nothing: YANG
        validation, then the application's validate phase as a dry run (RpcErrors)."""
        running = self.datastores["running"]
        tree = self.validator.validate(root, full=True)
        try:
            canonical = self.validator.canonical(tree)
            txn = Transaction(
                old=running.root,
                new=canonical,
                old_tree=running.tree,
                new_tree=tree,
                changes=diff(running.root, canonical, self.index),
                defaults=self.schema.defaults_json(),
                user=session.user if session else None,
                session_id=session.id if session else 0,
                reason="validate",
                dry_run=True,
            )
            await self.app.validate(txn)
        finally:
            free(tree)

    async def check_as_seen(self, session: Session, root: etree._Element) -> None:
        """:meth:`check_configuration`, judged on what ``session``'s user may read.

        test-only and <validate> change nothing, so a user could ask them again
        and again about data it may not read (raise psk-min-length one by one
        until the hidden pre-shared key's must fails: its length).  For a user
        NACM does not let read everything they check the part it may read,
        and say nothing about the rest; a real commit still checks everything
        (docs/security.md).
        """
        if self.nacm.permits_all(session.user, "read"):
            await self.check_configuration(root, session)
            return
        view = self.nacm.filter_read(session.user, deepcopy(root))
        try:
            await self.check_configuration(view, session)
        except RpcError as error:
            if not _about_hidden(error, root, view):
                raise
        except RpcErrors as exc:
            kept = [e for e in exc.errors if not _about_hidden(e, root, view)]
            if kept:
                raise RpcErrors(kept) from None

    def replace_candidate(self, root: etree._Element) -> None:
        """A client changed the candidate: it no longer follows running.

        The running configuration it was taken from is kept (running's trees
        are replaced, never modified, so keeping the reference is enough):
        a commit applies the candidate's own changes onto running as it is
        then (:meth:`candidate_onto_running`).
        """
        candidate = self.datastores["candidate"]
        if not self.candidate_modified:
            self.candidate_base = self.datastores["running"].root
        drop_later(candidate.root)  # after the reply (nc_core.release)
        candidate.root, candidate.tree = root, None
        self.candidate_modified = True

    def reset_candidate(self) -> None:
        """The candidate follows running again: it *is* running's tree, not a copy.

        Sharing is safe because no datastore tree is ever changed in place: running's
        trees are replaced by change_running, never modified, and an edit of the
        candidate works on a copy of it and replaces it (nc_core.base_ops.edit,
        :meth:`replace_candidate`); change_running hashes clear-text passwords in a copy
        of the tree it is given (tests/test_shared_candidate.py).  Discarding changes on
        a CE holding 1,000 peers no longer copies them all."""
        running = self.datastores["running"]
        candidate = self.datastores["candidate"]
        drop_later(candidate.root)  # after the reply (nc_core.release)
        candidate.root, candidate.tree = running.root, None
        self.candidate_modified = False
        self.candidate_base = None
        self.candidate_edited = False
        self.candidate_reverted = None

    def running_rolled_back(self, why: str, *, edited: bool) -> None:
        """A confirmed commit was rolled back (``why``): an untouched candidate follows the
        running it went back to; an edited one is kept but may not be committed until it
        is discarded, because its edits were made on a configuration that no longer
        exists.  Merging them onto the older running instead would silently drop what
        they meant: a VPN server that pushed a CE's whole configuration again while the
        previous push's confirmed commit was timing out would see its edit merged to
        nothing and its commit succeed, the CE left without its configuration.

        ``edited``: the candidate was edited before the rollback changed running (which
        already made an unmodified candidate follow it), even to what it was."""
        if edited:
            self.candidate_reverted = why  # an edit to what running was is an edit too
        else:
            self.reset_candidate()

    def candidate_onto_running(self) -> etree._Element:
        """What committing the candidate makes running: the candidate itself if running did
        not change since it was taken, else the candidate's own changes merged onto the
        current running (nc_core.merge), so nothing acknowledged meanwhile is reverted.
        Raises the running-changed rpc-error where both changed the same node.

        The candidate itself is returned, not a copy (it may be running's own tree): the
        caller hands it to :meth:`change_running`, which does not change it."""
        if self.candidate_reverted is not None:
            raise RpcError(
                "operation-failed",
                "The candidate was edited on a running configuration that has since been "
                f"rolled back ({self.candidate_reverted}); nothing was committed. Use "
                "<discard-changes>, look at running as it is now, and make the edit again.",
                type="application",
                app_tag="running-changed",
            )
        candidate = self.datastores["candidate"].root
        running = self.datastores["running"].root
        base = self.candidate_base
        if base is None or base is running:
            return candidate
        try:
            return merge3(base, candidate, running, self.index)
        except MergeConflict as conflict:
            raise conflict.rpc_error() from None

    async def edit_running(
        self,
        mutate: Callable[[etree._Element], None],
        *,
        reason: str,
        on_behalf_of: Session | None = None,
    ) -> list[Change]:
        """The one way an application changes running (the VPN server's enrolment and site
        removal, the agent's fetched configuration).

        ``mutate`` edits a private copy of the current running configuration;
        the result goes through the same transaction as a client's commit
        (validation, the application's phases, atomic persistence,
        notifications).  Serialised with every session's edits and commits by
        the configuration lock, and refused with in-use, like a session's edit,
        while another session holds the running lock or has a confirmed commit
        pending: its rollback would otherwise silently undo this change.
        ``on_behalf_of`` is the session whose operation asked for it (NACM
        authorised the operation, not each node), None for the server itself.
        Returns the changes made (none: running stayed as it was).
        """
        async with self.config_lock:
            self.check_running_writable(on_behalf_of)
            root = deepcopy(self.datastores["running"].root)
            mutate(root)
            return await self.change_running(root, on_behalf_of, reason=reason, check_access=False)

    async def change_running(
        self,
        new_root: etree._Element,
        session: Session | None,
        *,
        reason: str,
        check_access: bool = True,
        only: set[str] | None = None,
    ) -> list[Change]:
        """The engine's own primitive behind every change of running (see
        :meth:`_change_running`), counted and timed for the metrics by ``reason``.

        With running shared by other servers (:attr:`shared`), the commit is
        serialised against theirs and redone onto a newer running one of them
        committed meanwhile, or refused (nc_core.shared_running)."""
        if self.shared is None:
            return await self._timed_change(new_root, session, reason, check_access, only)
        from nc_core.shared_running import rebase

        base = self.datastores["running"].root
        async with self.shared.committing() as newer:
            if newer is not None:
                theirs = self.datastores["running"].root
                new_root = rebase(base, new_root, theirs, self.index, newer)
            return await self._timed_change(new_root, session, reason, check_access, only)

    async def adopt_running(self, document: bytes) -> list[Change]:
        """Another server sharing running committed ``document``: make it this server's
        running through the same path as a commit (validation, the application's
        phases, notifications to subscribers, changed-by the server), without
        persisting it (it is stored already).  The caller holds config_lock.

        A candidate nobody changed follows running; a changed one stays, and its
        commit is judged against the running it was taken from (RFC 6241 8.3)."""
        root, tree = self.validator.load(document, "running of another server")
        free(tree)
        return await self._timed_change(root, None, "replicated", False, None, persist=False)

    async def _timed_change(
        self,
        new_root: etree._Element,
        session: Session | None,
        reason: str,
        check_access: bool,
        only: set[str] | None,
        *,
        persist: bool = True,
    ) -> list[Change]:
        started = time.perf_counter()
        outcome = "failed"
        try:
            changes = await self._change_running(
                new_root,
                session,
                reason=reason,
                check_access=check_access,
                only=only,
                persist=persist,
            )
            outcome = "ok" if changes else "unchanged"
            return changes
        finally:
            self.metrics.commit_done(reason, outcome, time.perf_counter() - started)

    async def _change_running(
        self,
        new_root: etree._Element,
        session: Session | None,
        *,
        reason: str,
        check_access: bool,
        only: set[str] | None,
        persist: bool = True,
    ) -> list[Change]:
        """The engine's own primitive behind every change of running; the caller holds
        config_lock and has checked locks and confirmed commits (applications use
        :meth:`edit_running`).

        Validates fully, checks NACM write access, runs the application's
        transaction and persists atomically; on any failure nothing changes.
        ``new_root`` is not changed (it may be the candidate's tree, or running's):
        clear-text passwords are hashed in a copy of it.
        """
        if not self.config_lock.locked():
            raise RuntimeError("change_running needs the configuration lock: use edit_running")
        running = self.datastores["running"]
        if has_clear_text_passwords(new_root):
            new_root = deepcopy(new_root)
            hash_clear_text_passwords(new_root)
        new_tree = self.validator.validate(new_root, full=True)
        try:
            canonical = self.validator.canonical(new_tree)
            changes = diff(running.root, canonical, self.index, only=only)
            if check_access and session is not None:
                self.nacm.check_write(session.user, changes)
            if not changes:
                free(new_tree)
                return []
            txn = Transaction(
                old=running.root,
                new=canonical,
                old_tree=running.tree,
                new_tree=new_tree,
                changes=changes,
                user=session.user if session else None,
                session_id=session.id if session else 0,
                reason=reason,
                defaults=self.schema.defaults_json(),
            )
            await self.app.validate(txn)
            await self.app.prepare(txn)
        except BaseException:
            free(new_tree)
            raise
        staged: bytes | None = None
        try:
            if persist:
                staged = self._stage_running(running.root, canonical)
            await self.app.apply(txn)
        except BaseException as exc:
            if persist:
                self.persistence.discard("running")
            try:
                await self.app.abort(txn)
            finally:
                free(new_tree)
            if isinstance(exc, (RpcError, RpcErrors)):
                raise
            if isinstance(exc, Exception):
                log.exception("apply failed")
                raise RpcError(
                    "operation-failed",
                    f"The change could not be applied and was rolled back: {exc}",
                ) from exc
            raise
        if persist:
            try:
                self.persistence.publish("running")
            except Exception as exc:
                await self._unapply(txn)
                free(new_tree)
                log.error("commit not stored: %s", exc)
                raise RpcError(
                    "operation-failed",
                    f"The change could not be stored ({exc}), so it was not made here. If "
                    "the database's connection broke while it committed, the database may "
                    "have it all the same: running shows what the database holds once it is "
                    "reached again.",
                ) from None
        # The stored bytes of running, which the next commit's document is spliced from (not
        # known for a running adopted from another server: the next one is serialised whole).
        self._running_document = None if staged is None else (canonical, staged)
        # The configuration replaced is kept for the next edit's copy of running when the
        # change is known entry by entry, else let go of after the reply (nc_core.release).
        drop_later(self._spare)
        patch = remembered_patch(running.root, canonical)
        self._spare = None if patch is None else Spare(patch)
        self._settle_later()
        drop_later(running.root)
        free_later(running.tree)
        running.root, running.tree = canonical, new_tree
        if _touches(changes, (qn(NACM_NS, "nacm"), qn(SYS_NS, "system"))):
            self._publish_running()
        if not self.candidate_modified:
            # An untouched candidate follows running, so a client that edits
            # running and then the candidate does not commit stale data.
            self.reset_candidate()
        self.notifications.config_change(session, "running", changes)
        log_commit(session, reason, changes, self.index)
        return changes

    async def _unapply(self, txn: Transaction) -> None:
        """The application had applied ``txn`` when its persistence failed: take it back to
        running as it still is (a transaction the other way)."""
        running = self.datastores["running"]
        back = Transaction(
            old=txn.new,
            new=running.root,
            old_tree=txn.new_tree,
            new_tree=running.tree,
            changes=diff(txn.new, running.root, self.index),
            user=None,
            session_id=0,
            reason="rollback",
            defaults=self.schema.defaults_json(),
        )
        try:
            await self.app.validate(back)
            await self.app.prepare(back)
            await self.app.apply(back)
        except Exception:
            log.exception(
                "the application could not be taken back to running after a failed commit"
            )
            await self.app.abort(back)

    def _settle_later(self) -> None:
        """After a commit: once no edit came for spare_keep_seconds, :meth:`_settle`."""
        if self._settle_timer is not None:
            self._settle_timer.cancel()
        self._settle_timer = asyncio.get_running_loop().call_later(
            self.options.spare_keep_seconds, self._settle, self._spare
        )

    def _settle(self, spare: Spare | None) -> None:
        """No edit came for a while: the replaced configuration is freed (with what still
        refers to it: the remembered patch, the validator's last check), and after a
        large configuration's commit the heap's free pages go back to the system."""
        self._settle_timer = None
        if spare is not None and self._spare is spare:
            self._spare = None
            self.validator.forget_check_of(spare.patch.old)
            forget_patch(spare.patch)
            drop_later(spare)
        known = self._running_document
        if known is not None and len(known[1]) >= TRIM_AFTER_BYTES:
            trim_after_release()  # freed nodes leave holes between live ones

    def private_copy(self, root: etree._Element) -> etree._Element:
        """A copy of a datastore tree for an edit to change: of running's, made from the
        configuration the last commit replaced when it can be (nc_core.spare_tree)."""
        spare, self._spare = self._spare, None
        if spare is not None and spare.patch.new is root:
            self.validator.forget_check_of(spare.patch.old)
            forget_patch(spare.patch)
            made = copy_from_spare(spare, root)
            if made is not None:
                self.spare_copies += 1
                return made
        drop_later(spare)
        return deepcopy(root)

    def _stage_running(self, old: etree._Element, new: etree._Element) -> bytes:
        """Stage ``new``'s document, made from ``old``'s by its changed entries when the
        validator's patch says which (nc_core.document_splice), else serialised whole."""
        known = self._running_document
        patch = remembered_patch(old, new)
        spliced = None
        if known is not None and known[0] is old and patch is not None:
            spliced = spliced_document(known[1], patch)
        if spliced is None:
            data = document_bytes(new)
            self.persistence.stage("running", data)
        else:
            data = spliced.data
            shared = (spliced.start, spliced.end)
            self.persistence.stage("running", data, base=known[1] if known else None, shared=shared)
        return data

    def _publish_running(self) -> None:
        root = self.datastores["running"].root
        self.nacm.load(root)
        self.users = users_from(root)

    def adopt_startup(self, document: bytes | None) -> None:
        """Another server sharing the datastores saved ``document`` as startup (None: it
        was never saved): serve it.  The caller holds config_lock."""
        startup = self.datastores["startup"]
        if document is None:
            root, tree = new_datastore(), None
        else:
            root, tree = self.validator.load(document, "startup of another server")
        free(startup.tree)
        startup.root, startup.tree = root, tree

    def save_startup(self, root: etree._Element) -> None:
        startup = self.datastores["startup"]
        tree = self.validator.validate(root, full=True)
        startup.root = self.validator.canonical(tree)
        free(startup.tree)
        startup.tree = tree
        startup.save()


def _about_hidden(error: RpcError, root: etree._Element, view: etree._Element) -> bool:
    """Does ``error`` name a node of ``root`` the readable ``view`` lacks (so it only arose
    because that node was left out)?"""
    if not error.path:
        return False
    ns = dict(error.path_ns)
    try:
        in_root = root.xpath("." + error.path, namespaces=ns)
        in_view = view.xpath("." + error.path, namespaces=ns)
    except etree.XPathError:
        return False
    return bool(in_root) and not in_view


def _touches(changes: Sequence[Change], tops: tuple[str, ...]) -> bool:
    """Does any change fall under one of these top-level nodes?"""
    for change in changes:
        node = change.element
        while node.getparent() is not None and node.getparent().getparent() is not None:  # type: ignore[union-attr]
            node = node.getparent()  # type: ignore[assignment]
        if node.tag in tops:
            return True
    return False


def merge_into(root: etree._Element, elems: list[etree._Element], server: NetconfServer) -> None:
    """Merge top-level state subtrees into a data tree, matching list entries by key."""
    instances = Instances()
    for elem in elems:
        _merge(root, elem, None, server.index, instances)


def _merge(
    parent: etree._Element,
    elem: etree._Element,
    parent_snode: Any,
    index: SchemaIndex,
    instances: Instances,
) -> None:
    snode = schema_of(index, parent_snode, elem)
    if snode is None:
        parent.append(deepcopy(elem))
        return
    existing = instances.find(parent, elem.tag, snode, instance_identity(elem, snode))
    if existing is None:
        node = deepcopy(elem)
        parent.append(node)
        instances.appended(parent, node, snode)
        return
    if snode.kind in ("leaf", "leaf-list", "anydata", "anyxml"):
        existing.text = elem.text
        return
    for child in elem:
        if isinstance(child.tag, str):
            _merge(existing, child, snode, index, instances)
