"""One log line per change of running: who, which session, from where, which paths.

Never a value: a path names the node (list entries by their keys, as the
netconf-config-change notification does) but not what it was set to, and a
leaf-list entry, whose identity is its value, is named by its leaf-list only.
Logged at INFO by ``cevpn.commit``; the JSON format carries the same as fields
(``user``, ``session_id``, ``source``, ``reason``, ``paths``).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

from nc_core.edit import Change, instance_path
from nc_core.notifications import _top_changes

if TYPE_CHECKING:
    from nc_core.schema import SchemaIndex
    from nc_core.session import Session

log = logging.getLogger("cevpn.commit")

MAX_PATHS_IN_LINE = 20
"""Paths written in the text of one line (the JSON ``paths`` field has them all)."""

_LEAF_LIST_VALUE = re.compile(r"\[\.=.*\]$", re.DOTALL)


def changed_paths(changes: Sequence[Change], index: SchemaIndex) -> list[str]:
    """'operation path' for the top of each change (as netconf-config-change reports)."""
    out = []
    for node, op in _top_changes(changes):
        path, _ = instance_path(node, index)
        out.append(f"{op} {_LEAF_LIST_VALUE.sub('', path)}")
    return out


def log_commit(
    session: Session | None, reason: str, changes: Sequence[Change], index: SchemaIndex
) -> None:
    if not log.isEnabledFor(logging.INFO):
        return
    paths = changed_paths(changes, index)
    if session is None:
        who, session_id, source = "the daemon itself", None, None
        where = ""
    else:
        who, session_id, source = session.user or "?", session.id, session.source_host
        where = f" (session {session.id} from {session.source_host or 'a local process'})"
    shown = "; ".join(paths[:MAX_PATHS_IN_LINE])
    if len(paths) > MAX_PATHS_IN_LINE:
        shown += f"; and {len(paths) - MAX_PATHS_IN_LINE} more"
    log.info(
        "running changed (%s) by %s%s: %s",
        reason,
        who,
        where,
        shown,
        extra={
            "user": None if session is None else session.user,
            "session_id": session_id,
            "source": source,
            "reason": reason,
            "datastore": "running",
            "paths": paths,
        },
    )
