"""The application hook: what a server built on nc_core implements.

Modelled on FRR's northbound layer: every change of the running datastore is
one transaction, handed to the application in phases.

- ``validate``: refuse what the YANG cannot express (raise RpcError with a
  precise error-path); nothing has been touched yet.
- ``prepare``: allocate what apply will need (SPIs, device names, keys), so
  apply does not fail for lack of resources.
- ``apply``: change the world.  If it raises, nc_core calls ``abort`` and the
  datastore stays as it was: the application must leave the world as it was
  too (undo what it did).  The client gets the rpc-error.
- ``abort``: release what prepare allocated.

The application sees the old and the new configuration (lxml trees and
libyang trees) and the list of changed nodes.  It also produces operational
state for <get>, answers its own RPCs, and may emit notifications through the
server.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lxml import etree

from nc_core.edit import Change
from nc_core.shared_tree import has_node

if TYPE_CHECKING:
    from pathlib import Path

    from nc_core.persistence import DatastorePersistence
    from nc_core.server import NetconfServer
    from nc_core.session import Session


@dataclass
class Transaction:
    """One change of the running configuration."""

    old: etree._Element
    new: etree._Element
    old_tree: Any
    """libyang tree of the old configuration (with defaults), or None if it was empty."""
    new_tree: Any
    changes: Sequence[Change]
    user: str | None
    """Who made the change; None for the server itself (start-up, rollback)."""
    session_id: int
    reason: str = "edit"
    """'edit', 'commit', 'copy', 'rollback' (confirmed-commit timeout/cancel) or 'startup'."""
    dry_run: bool = False
    """Only validated (<validate>, test-only, an offline check): never prepared or applied,
    so the application must keep nothing of it (no key generated into storage)."""
    scratch: dict[str, Any] = field(default_factory=dict)
    """The application's own notes between phases (allocations made in prepare)."""

    defaults: Mapping[str, Any] = field(default_factory=dict, repr=False)
    """The schema's defaults for modules a configuration has no data of
    (``Schema.defaults_json``): ``new_json``/``old_json`` include them."""

    _json: dict[str, dict[str, Any]] = field(default_factory=dict, repr=False)

    def new_json(self) -> dict[str, Any]:
        """The new configuration as RFC 7951 JSON, defaults included (printed once per
        transaction: callers share it and must not modify it)."""
        if "new" not in self._json:
            self._json["new"] = tree_json(self.new_tree, self.defaults)
        return self._json["new"]

    def old_json(self) -> dict[str, Any]:
        if "old" not in self._json:
            self._json["old"] = tree_json(self.old_tree, self.defaults)
        return self._json["old"]

    def new_at(self, path: str) -> Any:
        """The RFC 7951 JSON value of one node of the new configuration, defaults
        included, or None if it has none there: ``path`` is a data path without list
        entries, the module prefix on its first step only (``/cevpn-ce:ce/certificates``).

        Only that subtree is printed: what a commit reads of a 1,000-peer configuration
        besides its peers costs as little as the configuration's other parts."""
        return self._at("new", self.new_tree, path)

    def old_at(self, path: str) -> Any:
        """:meth:`new_at` of the old configuration."""
        return self._at("old", self.old_tree, path)

    def _at(self, which: str, tree: Any, path: str) -> Any:
        steps = path.strip("/").split("/")
        if which not in self._json and tree is not None:
            node = tree.find_path(path)
            if node is not None:
                text = node.print_mem("json", with_siblings=False, include_implicit_defaults=True)
                return next(iter(json.loads(text).values()))
            if has_node(tree, f"/{steps[0]}"):
                return None  # the module has data, without this node
        value: Any = self.new_json() if which == "new" else self.old_json()
        for step in steps:
            value = value.get(step) if isinstance(value, dict) else None
        return value


def tree_json(tree: Any, defaults: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A libyang data tree as RFC 7951 JSON, implicit defaults included.

    libyang adds defaults only for modules with data, so a module never configured
    would have none: its top-level nodes are taken from ``defaults`` (the schema's
    ``defaults_json()``), so that readers find every default in every case."""
    data: dict[str, Any] = {}
    if tree is not None:
        text = tree.print_mem("json", with_siblings=True, include_implicit_defaults=True)
        data = json.loads(text) if text else {}
    for name, value in (defaults or {}).items():
        if name not in data:
            data[name] = copy.deepcopy(value)
    return data


class Application:
    """Base class: a server with no behaviour beyond storing its configuration."""

    modules: Sequence[str] = ()
    """YANG modules this application serves, loaded into the server's schema."""
    features: Mapping[str, Sequence[str]] = {}

    def persistence(self, state_dir: Path) -> DatastorePersistence:
        """Where the server keeps its datastores: a journal in the state directory by
        default (nc_core.journal)."""
        from nc_core.journal import Journal

        return Journal(state_dir)

    def initial_configuration(self, root: etree._Element) -> None:
        """Add to ``root`` what a fresh state directory starts with (rule lists, accounts).

        Called once, when the running datastore is first created: what an
        administrator later deletes stays deleted across restarts.
        """
        return None

    def state_dir_taken(self) -> None:
        """The server process now holds the state directory's lock, so whatever a previous
        process left there that claims it is running (a kill -9 skips clean-up) is stale."""
        return None

    def attach(self, server: NetconfServer) -> None:
        """Called once the server exists, before it loads its datastores."""
        self.server = server

    async def validate(self, txn: Transaction) -> None:
        return None

    async def prepare(self, txn: Transaction) -> None:
        return None

    async def apply(self, txn: Transaction) -> None:
        return None

    async def abort(self, txn: Transaction) -> None:
        return None

    async def operational(self, session: Session | None) -> list[etree._Element]:
        """State data for <get>: top-level elements, merged into the configuration."""
        return []

    def rpc_names(self) -> set[tuple[str, str]]:
        """(namespace, name) of the RPCs :meth:`rpc` answers."""
        return set()

    async def rpc(self, session: Session, rpc: etree._Element) -> list[etree._Element]:
        """Answer one of :meth:`rpc_names`; return the output nodes (empty list: <ok/>)."""
        from nc_core.errors import operation_not_supported

        raise operation_not_supported(f"The operation <{rpc.tag}> is not supported here.")

    def session_started(self, session: Session) -> None:
        """A client completed its hello: who is connected is news to some applications (a
        VPN server learns that a CE it could not reach is back)."""

    def session_quota(self, user: str) -> int | None:
        """Sessions ``user`` may hold outside ServerOptions.max_sessions; None (every
        account here): its sessions count against max_sessions.

        For accounts that are devices the application enrolled (the VPN server's
        CEs, one notification session each): the server then holds as many device
        sessions as there are devices, operators' sessions stay bounded by
        max_sessions, and one device's key never takes more than its quota."""
        return None

    async def started(self) -> None:
        """The server listens and its running configuration has been applied."""

    async def stopping(self) -> None:
        """The server is shutting down."""
