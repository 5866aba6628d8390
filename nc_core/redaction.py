"""What an rpc-error may say: never a secret's value, never data the user may not read.

Two rules, applied to every error a client gets about data:

- **Secret values are never echoed** (to anyone, administrators included):
  libyang quotes a rejected value in its message (``Unsatisfied length -
  string "short" length is not allowed.``), and a rejected pre-shared key or
  password is still a key.  For a node that is ``nacm:default-deny-all`` or
  below one (nc_core.schema.DENY_ALL_PATHS included), the message names the
  leaf and the rule it broke (its length, pattern or range) instead.
- **Nothing the user may not read** (RFC 8341 3.4.3, in spirit: error-info
  must not carry data the user cannot read, and neither should the path or
  the message).  An error about a node the user may not read is reported at
  the deepest ancestor the user may read, with the values in its message
  removed; the schema's own error-message (a rule, not data) is kept so
  the user can act on it.

Whether a change is refused at all may still tell a user one bit about data
it may not read; docs/security.md says which checks avoid even that
(``test-only`` and ``<validate>`` judge only what the user may read).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

from lxml import etree

from nc_core.errors import RpcError

if TYPE_CHECKING:
    from nc_core.nacm import Nacm
    from nc_core.schema import SchemaIndex, SchemaNode

_QUOTED = re.compile(r'"[^"]*"')
_STEP = re.compile(r"/(?:(?P<prefix>[\w.-]+):)?(?P<name>[\w.-]+)(?:\[[^\]]*\])*")


def schema_chain(index: SchemaIndex, path: str) -> list[SchemaNode]:
    """The schema nodes along a libyang data path (``/mod:a/b[k='v']/c``), top first;
    shorter than the path where a step is unknown."""
    chain: list[SchemaNode] = []
    module = ""
    by_module = {name: ns for ns, name in index.namespaces.items()}
    for step in _STEP.finditer(path):
        module = step.group("prefix") or module
        ns = by_module.get(module)
        node = (
            index.top_node(ns, step.group("name"))
            if not chain
            else chain[-1].child(ns, step.group("name"))
        )
        if node is None:
            break
        chain.append(node)
    return chain


def is_secret(chain: Sequence[SchemaNode]) -> bool:
    """Is the last node of ``chain`` default-deny-all, or below such a node?"""
    return any(node.deny_all for node in chain)


def declared_length(node: SchemaNode) -> str | None:
    """The length restriction of a string leaf, as written in the YANG ("16..1024"), looked
    up on the leaf's own type and then on its typedef."""
    from _libyang import ffi

    try:
        leaf_type = node.snode.type()
    except AttributeError:
        return None
    parsed = leaf_type.cdata_parsed
    if parsed is not None and parsed.length:
        return str(ffi.string(parsed.length.arg.str).decode())
    typedef = leaf_type.typedef()
    if typedef is not None and typedef.cdata.type.length:
        return str(ffi.string(typedef.cdata.type.length.arg.str).decode())
    return None


def secret_message(message: str, node: SchemaNode, app_tag: str | None = None) -> str:
    """libyang's message about a secret leaf's value, with the value left out.

    A must or when condition's message is the schema's own text (a rule, not
    data): it is kept, with anything quoted in it removed.
    """
    lowered = message.lower()
    if app_tag in ("must-violation", "when-violation"):
        return _QUOTED.sub("(not shown)", message)
    if "length" in lowered:
        length = declared_length(node)
        rule = f"its length must be {length} characters" if length else "its length is not allowed"
    elif "pattern" in lowered:
        rule = "it does not match the pattern its type requires"
    elif "range" in lowered:
        rule = "it is out of the range its type allows"
    elif "must" in lowered or "condition" in lowered:
        return _QUOTED.sub("(not shown)", message)
    else:
        rule = "it is not a valid value of its type"
    return f"Invalid value of {node.name}: {rule} (the value is secret and not shown)."


def without_values(message: str) -> str:
    """A message with every quoted value replaced (libyang quotes the values it cites)."""
    return _QUOTED.sub('"…"', message)


def for_user(
    errors: Iterable[RpcError],
    user: str,
    nacm: Nacm,
    trees: Sequence[etree._Element],
) -> list[RpcError]:
    """``errors`` as ``user`` may see them.

    Each error-path is looked up in ``trees`` (the datastores the request
    involved, current running first): if it names a node the user may not
    read there, the path is cut back to the deepest readable ancestor and the
    values in the message are removed.  A path found in no tree names data
    the client sent itself (a node it tried to create), which it may see.
    """
    if nacm.permits_all(user, "read"):
        return list(errors)
    return [_for_user(error, user, nacm, trees) for error in errors]


def _for_user(error: RpcError, user: str, nacm: Nacm, trees: Sequence[etree._Element]) -> RpcError:
    if not error.path:
        return error
    for tree in trees:
        found = _locate(tree, error.path, dict(error.path_ns))
        if found is None:
            continue
        chain = [found, *found.iterancestors()][:-1]  # the datastore root is not a node
        chain.reverse()
        depth = nacm.readable_depth(user, found)
        if depth == len(chain):
            return error
        visible = chain[:depth]
        path, path_ns = nacm.instance_path(visible) if visible else (None, {})
        where = f" under {nacm.data_path(visible)}" if visible else ""
        return replace(
            error,
            path=path,
            path_ns=path_ns,
            info=[(k, v) for k, v in error.info if k != "bad-element"],
            message=f"The change conflicts with data you may not read{where}: "
            f"{without_values(error.message)}",
        )
    return error


def _locate(tree: etree._Element, path: str, path_ns: dict[str, str]) -> etree._Element | None:
    """The deepest node of ``tree`` on an absolute error-path (itself if it exists)."""
    steps = _split_steps(path)
    for end in range(len(steps), 0, -1):
        try:
            found = tree.xpath("." + "".join(steps[:end]), namespaces=path_ns)
        except etree.XPathError:
            return None
        if isinstance(found, list) and found and isinstance(found[0], etree._Element):
            return found[0]
    return None


def _split_steps(path: str) -> list[str]:
    """``/a:x[a:k='1/2']/a:y`` -> ["/a:x[a:k='1/2']", "/a:y"]: slashes inside predicates
    and quotes do not split."""
    steps: list[str] = []
    current = ""
    depth = 0
    quote = ""
    for char in path:
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
        elif char == "/" and depth == 0 and current:
            steps.append(current)
            current = ""
        current += char
    if current:
        steps.append(current)
    return steps
