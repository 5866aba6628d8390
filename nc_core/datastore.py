"""Configuration datastores: running, candidate, startup (RFC 6241 Sections 5, 8.3, 8.7).

Each datastore is kept as a canonical lxml tree (see nc_core.edit) and, once
validated, as the libyang tree of the same data.  Running and startup are
persisted in the state directory: written to a temporary file, flushed to
disk, then renamed over the old file, so a kill -9 at any instant leaves
either the previous or the new complete configuration, never a torn one.
Files are 0600: configuration holds keys.

Validation maps libyang's findings to rpc-errors with the tags RFC 7950
Section 15 prescribes and an error-path in NETCONF's XPath form; validation itself
(the Validator) is nc_core.validation.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lxml import etree

from nc_core.edit import new_datastore
from nc_core.errors import RpcError, RpcErrors
from nc_core.redaction import is_secret, schema_chain, secret_message
from nc_core.schema import SchemaIndex, SchemaIssue, ValidationFailed

if TYPE_CHECKING:
    from nc_core.persistence import DatastorePersistence

CONFIG_DATASTORES = ("running", "candidate", "startup")


def write_staged(path: Path, data: bytes) -> Path:
    """Write ``data`` next to ``path`` and flush it to disk; :func:`commit_staged` publishes it."""
    staged = path.with_name(f".{path.name}.staged")
    fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    finally:
        os.close(fd)
    return staged


def commit_staged(staged: Path, path: Path) -> None:
    """Rename a staged file over ``path`` and make the rename durable."""
    os.replace(staged, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_atomically(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves the old or the new content."""
    commit_staged(write_staged(path, data), path)


# --------------------------------------------------------------------------
# libyang findings as rpc-errors
# --------------------------------------------------------------------------

_STEP = re.compile(r"/(?:(?P<prefix>[\w.-]+):)?(?P<name>[\w.-]+)(?P<preds>(?:\[[^\]]*\])*)")
_PRED = re.compile(r"\[(?:(?P<kp>[\w.-]+):)?(?P<key>[\w.-]+|\.)=(?P<val>'[^']*'|\"[^\"]*\")\]")


_MISSING_KEY = re.compile(r'missing its key "([^"]+)"')
_UNKNOWN_CHILD = re.compile(r'Node "([^"]+)" not found as a child')


def libyang_path_to_xpath(path: str) -> tuple[str, dict[str, str], str | None]:
    """Turn libyang's JSON-style path into an XPath whose every step is prefixed.

    Returns the XPath, the prefixes used (module names) and the last node name.
    Namespaces are filled in by the caller from the schema index.
    """
    out = []
    modules: dict[str, str] = {}
    module = ""
    last = None
    for step in _STEP.finditer(path):
        module = step.group("prefix") or module
        modules[module] = ""
        name = step.group("name")
        last = name
        preds = ""
        for pred in _PRED.finditer(step.group("preds") or ""):
            key = pred.group("key")
            key_text = "." if key == "." else f"{pred.group('kp') or module}:{key}"
            preds += f"[{key_text}={pred.group('val')}]"
        out.append(f"/{module}:{name}{preds}")
    return "".join(out), modules, last


def issue_to_error(issue: SchemaIssue, index: SchemaIndex) -> RpcError:
    """RFC 7950 Section 15 and RFC 6241 Appendix A for one libyang finding."""
    message = issue.message
    tag, app_tag = "invalid-value", issue.app_tag
    lowered = message.lower()
    if app_tag in ("must-violation", "too-many-elements", "too-few-elements", "data-not-unique"):
        tag = "operation-failed"
    elif app_tag in ("instance-required", "missing-choice"):
        tag = "data-missing"
    elif "missing its key" in lowered:
        tag = "missing-element"
    elif "mandatory node" in lowered:
        tag, app_tag = "data-missing", app_tag
    elif "not found as a child" in lowered or "node not found" in lowered:
        tag = "unknown-element"
    elif "unknown/non-implemented module" in lowered or "unknown xml prefix" in lowered:
        tag = "unknown-namespace"
    elif "invalid state data" in lowered or "state data" in lowered:
        tag = "invalid-value"
    xpath: str | None = None
    path_ns: dict[str, str] = {}
    last: str | None = None
    if issue.path:
        xpath, modules, last = libyang_path_to_xpath(issue.path)
        module_ns = {mod: ns for ns, mod in index.namespaces.items()}
        path_ns = {m: module_ns[m] for m in modules if m in module_ns}
        if len(path_ns) != len(modules):
            xpath, path_ns = None, {}
    if issue.path:
        # A secret's value is never echoed, not even to its owner (nc_core.redaction).
        chain = schema_chain(index, issue.path)
        if chain and is_secret(chain):
            message = secret_message(message, chain[-1], issue.app_tag)
    info = [("bad-element", last)] if last and tag in ("unknown-element", "invalid-value") else []
    key = _MISSING_KEY.search(message)
    if tag == "missing-element" and key:
        info = [("bad-element", key.group(1))]
    unknown = _UNKNOWN_CHILD.search(message)
    if tag == "unknown-element" and unknown:
        info = [("bad-element", unknown.group(1))]
    return RpcError(tag, message, path=xpath, path_ns=path_ns, app_tag=app_tag, info=info)


def validation_errors(exc: ValidationFailed, index: SchemaIndex) -> RpcErrors:
    return RpcErrors(issue_to_error(issue, index) for issue in exc.issues)


# --------------------------------------------------------------------------
# Datastores
# --------------------------------------------------------------------------


def free(tree: Any) -> None:
    """Release a libyang tree (None: nothing to release)."""
    if tree is not None:
        tree.free()


def serialize(root: etree._Element) -> bytes:
    """The top-level nodes, concatenated: what libyang parses as sibling data trees."""
    return b"".join(etree.tostring(child) for child in root if isinstance(child.tag, str))


@dataclass
class Datastore:
    name: str
    root: etree._Element = field(default_factory=new_datastore)
    tree: Any = None
    """libyang tree of ``root`` once fully validated; None when unknown."""
    persistence: DatastorePersistence | None = None
    """Where it is kept (running and startup); None: in memory only (candidate)."""

    def save(self) -> None:
        if self.persistence is not None:
            self.persistence.write(self.name, document_bytes(self.root))


def document_bytes(root: etree._Element) -> bytes:
    return etree.tostring(root, xml_declaration=True, encoding="UTF-8")


def subtree_tags(config: etree._Element) -> set[str]:
    return {child.tag for child in config if isinstance(child.tag, str)}
