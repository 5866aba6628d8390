"""The base protocol operations of RFC 6241 Section 7, and <validate> (8.6) and
<discard-changes> (8.3.4.2).

<commit>, <cancel-commit> and confirmed commit are in confirmed_commit; this
module is the rest of what ietf-netconf defines.
"""

from __future__ import annotations

from collections.abc import Mapping
from copy import deepcopy
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from lxml import etree

from nc_core.datastore import free, subtree_tags
from nc_core.edit import DEFAULT_OPERATIONS, Editor, diff, new_datastore
from nc_core.errors import (
    RpcError,
    RpcErrors,
    bad_element,
    missing_element,
    operation_not_supported,
    unknown_element,
)
from nc_core.users import hash_clear_text_passwords
from nc_core.with_defaults import requested_mode
from nc_core.xmlutil import NC_NS, NMDA_NS, local, namespace, qn

if TYPE_CHECKING:
    from nc_core.server import Handler, NetconfServer, RpcContext
    from nc_core.session import Session


MODULE = "ietf-netconf"


def register(server: NetconfServer) -> None:
    for name, handler in [
        ("get", get),
        ("get-config", get_config),
        ("edit-config", edit_config),
        ("copy-config", copy_config),
        ("delete-config", delete_config),
        ("lock", lock),
        ("unlock", unlock),
        ("close-session", close_session),
        ("kill-session", kill_session),
        ("validate", validate),
        ("discard-changes", discard_changes),
    ]:
        server.register(NC_NS, name, MODULE, checked(handler))


# -- parameters ------------------------------------------------------------------

PARAMETERS: Mapping[str, frozenset[str]] = {
    "get": frozenset({"filter"}),
    "get-config": frozenset({"source", "filter"}),
    "edit-config": frozenset(
        {"target", "default-operation", "test-option", "error-option", "config", "url"}
    ),
    "copy-config": frozenset({"target", "source"}),
    "delete-config": frozenset({"target"}),
    "lock": frozenset({"target"}),
    "unlock": frozenset({"target"}),
    "close-session": frozenset(),
    "kill-session": frozenset({"session-id"}),
    "validate": frozenset({"source"}),
    "discard-changes": frozenset(),
    "commit": frozenset({"confirmed", "confirm-timeout", "persist", "persist-id"}),
    "cancel-commit": frozenset({"persist-id"}),
}
"""The input parameters of each operation of the ietf-netconf module (RFC 6241 Sections 7
and 8), by local name.  Parameters other modules add (RFC 6243's with-defaults) are in their
own namespace and are read by those modules."""


def is_base(elem: etree._Element) -> bool:
    """Whether ``elem`` is in the base namespace or in no namespace at all.

    Both are read as RFC 6241's own elements.  ncclient sends a <config> or <filter> given
    as a string exactly as written, so the idiom of its documentation and of the vendor
    examples built on it (``<config xmlns:xc="urn:ietf:params:xml:ns:netconf:base:1.0">``,
    with xc only for xc:operation) arrives in no namespace; netconfd and Netopeer2 accept
    it.  No YANG module can own elements in no namespace, so the reading takes nothing from
    anyone.
    """
    return isinstance(elem.tag, str) and namespace(elem.tag) in (NC_NS, None)


def parameters(
    op: etree._Element,
    allowed: frozenset[str] | None = None,
    namespaces: tuple[str | None, ...] = (NC_NS, None),
) -> dict[str, etree._Element]:
    """The parameters of base operation ``op`` by name, each in the base namespace or none.

    Being lenient about the namespace must not make a request ambiguous, so the same
    parameter twice (with and without the namespace, or twice alike) is bad-element, and an
    element in the base namespace or none that is not a parameter of ``op`` is
    unknown-element: never is one of them silently ignored.

    Another module's operation whose parameters are read the same way gives its own
    ``allowed`` names and the ``namespaces`` they may be in (e.g. <create-subscription>,
    RFC 5277: its own namespace, the base one or none).
    """
    op_name = local(op.tag)
    if allowed is None:
        allowed = PARAMETERS[op_name]
    found: dict[str, etree._Element] = {}
    for child in op:
        if not isinstance(child.tag, str) or namespace(child.tag) not in namespaces:
            continue
        name = local(child.tag)
        if name not in allowed:
            takes = ", ".join(f"<{p}>" for p in sorted(allowed)) or "no parameters"
            raise unknown_element(
                name, f"<{name}> is not a parameter of <{op_name}>, which takes {takes}."
            )
        if name in found:
            where = "in the base namespace or in none"
            if namespaces != (NC_NS, None):
                where = "in " + " or ".join(ns or "no namespace" for ns in namespaces)
            raise bad_element(
                name, f"<{op_name}> has the <{name}> parameter twice; give it once, {where}."
            )
        found[name] = child
    return found


def checked(handler: Handler) -> Handler:
    """``handler``, run only once :func:`parameters` accepts the operation's parameters.

    Checked here rather than where a handler reads them, so that an operation reading
    none (close-session, discard-changes) refuses an unknown one all the same.
    """

    async def run(ctx: RpcContext, op: etree._Element) -> list[etree._Element] | None:
        parameters(op)
        return await handler(ctx, op)

    return run


def parameter(op: etree._Element, name: str, *, required: bool = True) -> etree._Element | None:
    """The ``name`` parameter of base operation ``op`` (see :func:`parameters`)."""
    elem = parameters(op).get(name)
    if elem is None and required:
        raise missing_element(name, f"<{local(op.tag)}> needs a <{name}> parameter.")
    return elem


NMDA_DATASTORE_OPERATIONS = ("lock", "unlock", "validate")
"""The operations whose <target>/<source> ietf-netconf-nmda augments with a <datastore>
identity (RFC 8526 Section 3.3)."""


def datastore_name(op: etree._Element, param: str, allowed: tuple[str, ...]) -> str:
    """The datastore named by <source>/<target> (e.g. <target><running/></target>).

    Its element may be in the base namespace or none, like the parameter (:func:`is_base`);
    for <lock>, <unlock> and <validate> it may also be RFC 8526's
    ``<datastore xmlns="urn:ietf:params:xml:ns:yang:ietf-netconf-nmda">ds:running</datastore>``.
    """
    elem = parameter(op, param)
    assert elem is not None
    choices = [c for c in elem if isinstance(c.tag, str)]
    if len(choices) != 1:
        raise missing_element(param, f"<{param}> must name exactly one datastore.")
    choice = choices[0]
    name = local(choice.tag)
    if choice.tag == qn(NMDA_NS, "datastore") and local(op.tag) in NMDA_DATASTORE_OPERATIONS:
        from nc_core.nmda import datastore_named

        return datastore_named(choice, allowed, f"the {param} of <{local(op.tag)}>")
    if is_base(choice):
        if name == "url":
            raise operation_not_supported("The :url capability is not supported.")
        if name in allowed:
            return name
        if name in ("running", "candidate", "startup", "config"):
            raise RpcError(
                "invalid-value",
                f"<{name}> cannot be the {param} of <{local(op.tag)}>; "
                f"allowed: {', '.join(allowed)}.",
                type="protocol",
                info=[("bad-element", name)],
            )
    raise bad_element(name, f"<{name}> is not a datastore.")


def inline_config(op: etree._Element, param: str) -> etree._Element:
    """The <config> that datastore_name() found as the only child of <source>."""
    elem = parameter(op, param)
    assert elem is not None
    return next(c for c in elem if is_base(c) and local(c.tag) == "config")


def _filter(op: etree._Element) -> etree._Element | None:
    return parameter(op, "filter", required=False)


def _data(root: etree._Element) -> list[etree._Element]:
    return [root]


# -- get, get-config (7.1, 7.7) ----------------------------------------------------


async def get(ctx: RpcContext, op: etree._Element) -> list[etree._Element]:
    mode = requested_mode(op)
    root = await ctx.server.full_tree(ctx.session, mode)
    root = ctx.server.readable(ctx.session, root)
    return _data(
        await ctx.server.filters.apply(root, _filter(op), ctx.server.keys_of, user=ctx.session.user)
    )


async def get_config(ctx: RpcContext, op: etree._Element) -> list[etree._Element]:
    name = datastore_name(op, "source", ("running", "candidate", "startup"))
    mode = requested_mode(op)
    root = ctx.server.readable_config(name, ctx.session, mode)
    return _data(
        await ctx.server.filters.apply(root, _filter(op), ctx.server.keys_of, user=ctx.session.user)
    )


# -- edit-config (7.2) ---------------------------------------------------------------


def _enum_param(
    op: etree._Element, name: str, allowed: frozenset[str] | set[str], default: str
) -> str:
    elem = parameter(op, name, required=False)
    if elem is None:
        return default
    value = (elem.text or "").strip()
    if value not in allowed:
        raise RpcError(
            "invalid-value",
            f"<{name}> {value!r} is not one of {', '.join(sorted(allowed))}.",
            type="protocol",
            info=[("bad-element", name)],
        )
    return value


async def edit_config(ctx: RpcContext, op: etree._Element) -> None:
    target = datastore_name(op, "target", ("running", "candidate"))
    default_op = _enum_param(op, "default-operation", DEFAULT_OPERATIONS, "merge")
    test_option = _enum_param(
        op, "test-option", {"test-then-set", "set", "test-only"}, "test-then-set"
    )
    error_option = _enum_param(
        op,
        "error-option",
        {"stop-on-error", "continue-on-error", "rollback-on-error"},
        "stop-on-error",
    )
    if parameter(op, "url", required=False) is not None:
        raise operation_not_supported("The :url capability is not supported.")
    config = parameter(op, "config")
    assert config is not None
    await edit(ctx, target, config, default_op, test_option, error_option, operation="edit-config")


async def edit(
    ctx: RpcContext,
    target: str,
    config: etree._Element,
    default_op: str,
    test_option: str = "test-then-set",
    error_option: str = "stop-on-error",
    *,
    operation: str,
) -> None:
    """Apply ``config`` (a <config> element: its children are the edit, with nc:operation
    attributes) to the running or candidate datastore.

    The one path of every client edit, <edit-config> (RFC 6241 7.2) and <edit-data>
    (RFC 8526 3.2, nc_core.nmda) alike: only writers, locks and a pending confirmed
    commit respected, NACM write checks, validation and, for running, the application's
    transaction (NetconfServer.change_running).
    """
    server, session = ctx.server, ctx.session
    server.require_writer(session, operation)
    async with server.config_lock:
        if target == "running" and test_option != "test-only":
            server.check_running_writable(session)
        else:
            server.check_not_locked(target, session)
        ds = server.datastores[target]
        work = server.private_copy(ds.root)
        editor = Editor(server.index, continue_on_error=error_option == "continue-on-error")
        editor.apply(work, config, default_op)
        tags = subtree_tags(config)
        if target == "running":
            if test_option == "test-only":
                await _test_only(server, session, ds.root, work, tags)
            else:
                await server.change_running(work, session, reason="edit", only=tags)
        else:
            hash_clear_text_passwords(work)
            if test_option == "test-only":
                await _test_only(server, session, ds.root, work, tags)
            else:
                canonical, changed = _checked_candidate(
                    server, session, work, tags, config, default_op
                )
                if changed:
                    server.replace_candidate(canonical)
                server.candidate_edited = True  # even to what it was: see running_rolled_back
        if editor.errors:
            raise RpcErrors(editor.errors)


async def _test_only(
    server: NetconfServer,
    session: Session,
    old: etree._Element,
    work: etree._Element,
    tags: set[str],
) -> None:
    tree = server.validator.parse_only(work)
    try:
        canonical = server.validator.canonical(tree)
    finally:
        free(tree)
    changes = diff(old, canonical, server.index, only=tags)
    server.nacm.check_write(session.user, changes)
    await server.check_as_seen(session, canonical)


def _checked_candidate(
    server: NetconfServer,
    session: Session,
    root: etree._Element,
    only: set[str] | None,
    edit: etree._Element | None = None,
    default_operation: str = "merge",
) -> tuple[etree._Element, bool]:
    """A new candidate in canonical form, checked node by node and against NACM, and
    whether it differs from the candidate.

    The candidate may stay incomplete until <validate> or <commit> (RFC 6241
    8.3), so only what each node says about itself is validated here.
    """
    hash_clear_text_passwords(root)
    old = server.datastores["candidate"].root
    # A candidate nobody changed is running's own tree (NetconfServer.reset_candidate).
    follows = None if server.candidate_modified else server.datastores["running"].root
    canonical, differs = server.validator.checked_nodes(
        old, root, edit, default_operation, copy_of=follows, owned=True
    )
    if server.nacm.permits_all_writes(session.user):
        # Nothing to check node by node: whether anything changed is all that matters
        # (a 10,000-entry edit: 4 ms to compare the documents instead of 45 to diff them).
        return canonical, differs
    changes = diff(old, canonical, server.index, only=only)
    server.nacm.check_write(session.user, changes)
    return canonical, bool(changes)


def _inline_config_tree(server: NetconfServer, op: etree._Element) -> etree._Element:
    """The datastore tree of a <source><config>...</config></source> parameter."""
    root = new_datastore()
    Editor(server.index).apply(root, inline_config(op, "source"), "merge")
    return root


# -- copy-config, delete-config (7.3, 7.4) --------------------------------------------


async def copy_config(ctx: RpcContext, op: etree._Element) -> None:
    server, session = ctx.server, ctx.session
    target = datastore_name(op, "target", ("running", "candidate", "startup"))
    source = datastore_name(op, "source", ("running", "candidate", "startup", "config"))
    requested_mode(op)  # validated; datastores always store explicit values
    if source == target:
        raise RpcError(
            "invalid-value",
            f"<copy-config> from {source} to itself does nothing.",
            type="protocol",
            info=[("bad-element", source)],
        )
    server.require_writer(session, "copy-config")
    async with server.config_lock:
        if target == "running":
            server.check_running_writable(session)
        else:
            server.check_not_locked(target, session)
        if source == "config":
            root = _inline_config_tree(server, op)
        elif source == "candidate" and target == "running":
            # A commit by another name: the candidate's own changes, onto running as it is
            # now, so what changed since the candidate was taken is not reverted.
            root = server.candidate_onto_running()
        else:
            root = deepcopy(server.datastores[source].root)
        if target == "running":
            await server.change_running(root, session, reason="copy")
            if source == "candidate":
                server.reset_candidate()
        elif target == "candidate":
            canonical, _ = _checked_candidate(server, session, root, None)
            server.replace_candidate(canonical)
        else:
            hash_clear_text_passwords(root)
            server.nacm.check_write(
                session.user, diff(server.datastores["startup"].root, root, server.index)
            )
            server.save_startup(root)


async def delete_config(ctx: RpcContext, op: etree._Element) -> None:
    server, session = ctx.server, ctx.session
    target = datastore_name(op, "target", ("startup",))
    async with server.config_lock:
        server.check_not_locked(target, session)
        startup = server.datastores["startup"]
        server.nacm.check_write(session.user, diff(startup.root, new_datastore(), server.index))
        startup.root = new_datastore()
        free(startup.tree)
        startup.tree = None
        startup.save()


# -- lock, unlock (7.5, 7.6) ---------------------------------------------------------


async def lock(ctx: RpcContext, op: etree._Element) -> None:
    server, session = ctx.server, ctx.session
    target = datastore_name(op, "target", ("running", "candidate", "startup"))
    server.require_writer(session, "lock")
    holder = server.locks.get(target)
    if holder is not None:
        raise RpcError(
            "lock-denied",
            f"The {target} datastore is already locked by session {holder}.",
            type="protocol",
            info=[("session-id", str(holder))],
        )
    if target == "candidate" and server.candidate_modified:
        raise RpcError(
            "lock-denied",
            "The candidate has uncommitted changes: commit or discard them before locking it "
            "(RFC 6241 7.5).",
            type="protocol",
            info=[("session-id", "0")],
        )
    pending = server.confirmed.pending
    if (
        target == "running"
        and pending is not None
        and (pending.session_id != session.id or pending.server is not None)
    ):
        where = "" if pending.server is None else f" of server {pending.server}"
        raise RpcError(
            "lock-denied",
            f"Session {pending.session_id}{where} has a confirmed commit in progress "
            "(RFC 6241 7.5).",
            type="protocol",
            info=[("session-id", str(pending.session_id))],
        )
    if server.shared is not None and target == "running":
        await server.shared.lock(target, session.id)  # lock-denied: another server's session has it
        if server.locks.get(target) is not None:  # a session of ours took it meanwhile
            await server.shared.unlock(target)
            raise RpcError(
                "lock-denied",
                f"The {target} datastore is already locked by session {server.locks[target]}.",
                type="protocol",
                info=[("session-id", str(server.locks[target]))],
            )
    server.locks[target] = session.id
    server.lock_times[target] = datetime.now(UTC)


async def unlock(ctx: RpcContext, op: etree._Element) -> None:
    server, session = ctx.server, ctx.session
    target = datastore_name(op, "target", ("running", "candidate", "startup"))
    holder = server.locks.get(target)
    if holder != session.id:
        why = "is not locked" if holder is None else f"is locked by session {holder}, not by you"
        raise RpcError(
            "operation-failed",
            f"The {target} datastore {why}.",
            type="protocol",
            info=[("session-id", str(holder))] if holder is not None else [],
        )
    del server.locks[target]
    server.lock_times.pop(target, None)
    if server.shared is not None and target == "running":
        await server.shared.unlock(target)


# -- close-session, kill-session (7.8, 7.9) --------------------------------------------


async def close_session(ctx: RpcContext, op: etree._Element) -> None:
    ctx.session.close_after_reply("closed")


async def kill_session(ctx: RpcContext, op: etree._Element) -> None:
    elem = parameter(op, "session-id")
    assert elem is not None
    text = (elem.text or "").strip()
    if not text.isdigit():
        raise RpcError(
            "invalid-value",
            f"session-id {text!r} is not a number.",
            type="protocol",
            info=[("bad-element", "session-id")],
        )
    victim_id = int(text)
    if victim_id == ctx.session.id:
        raise RpcError(
            "invalid-value",
            "A session cannot kill itself: use <close-session>.",
            type="protocol",
            info=[("bad-element", "session-id")],
        )
    victim = ctx.server.sessions.get(victim_id)
    if victim is None:
        raise RpcError(
            "invalid-value",
            f"There is no session {victim_id}.",
            type="protocol",
            info=[("bad-element", "session-id")],
        )
    victim.killed_by = ctx.session.id
    victim.close("killed")


# -- validate (8.6), discard-changes (8.3.4.2) ------------------------------------------


async def validate(ctx: RpcContext, op: etree._Element) -> None:
    server = ctx.server
    source = datastore_name(op, "source", ("running", "candidate", "startup", "config"))
    if source == "config":  # the client's own data: all of it is checked
        await server.check_configuration(_inline_config_tree(server, op), ctx.session)
    else:
        await server.check_as_seen(ctx.session, server.datastores[source].root)


async def discard_changes(ctx: RpcContext, op: etree._Element) -> None:
    server, session = ctx.server, ctx.session
    server.require_writer(session, "discard-changes")
    async with server.config_lock:
        server.check_not_locked("candidate", session)
        server.reset_candidate()
