"""A CE's compiled configuration as NETCONF sees it: XML documents, edits, comparisons.

The compiler produces RFC 7951 JSON; CEs speak XML.  Every conversion goes
through libyang with the cevpn-ce schema, so a compiler mistake is caught
here, on the server, as a validation error, and never reaches a CE.

The server owns everything under ``/ce`` except ``pre-configuration`` (which
the CE received at enrolment and keeps).  An edit therefore replaces the
sections it changes, replaces changed peers one by one and removes the
peers that went away: adding one site to a 1,000-site mesh sends each CE one
``<peer>``, not its whole configuration.
"""

from __future__ import annotations

import bisect
import functools
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from lxml import etree

from nc_core.schema import Schema, SchemaIndex, SchemaNode, ValidationFailed, ce_schema
from nc_core.xmlutil import NC_NS, default_ns_element, qn
from nc_server.compile_cache import PeerChanges

CE_NS = "urn:cevpn:yang:cevpn-ce"
CE_MODULE = "cevpn-ce"
SERVER_OWNED_EXCEPT = ("pre-configuration",)


class InvalidCompiledConfig(Exception):
    """The compiler produced something the cevpn-ce schema refuses (a server bug)."""


def _q(name: str) -> str:
    return qn(CE_NS, name)


class CeCodec:
    """JSON <-> XML for cevpn-ce documents, validated by libyang."""

    def __init__(self, schema: Schema | None = None) -> None:
        self.schema = schema or ce_schema()

    def to_xml(self, config: Mapping[str, Any], site: str) -> etree._Element:
        """The ``<ce>`` element of a compiled configuration, validated."""
        document = {f"{CE_MODULE}:ce": config}
        try:
            tree = self.schema.parse_config(json.dumps(document), "json")
        except ValidationFailed as exc:
            raise InvalidCompiledConfig(f"compiled configuration of {site}: {exc}") from None
        try:
            text = tree.print_mem("xml", with_siblings=True, pretty=False)
        finally:
            tree.free()
        root = etree.fromstring(text.encode())
        if root.tag != _q("ce"):
            raise InvalidCompiledConfig(f"unexpected root {root.tag}")
        return root

    def incremental_document(
        self,
        config: Mapping[str, Any],
        edit: CeEdit,
        site: str,
        management_port: int | None = None,
    ) -> bytes:
        """The ``<config>`` of the edit-config carrying an incremental ``edit`` of ``config``,
        serialised: what :func:`edit_document` gives (and :func:`add_management_port`, when
        the CE's port moves), made for the one or few parts a one-peer change sends.

        The parts sent are checked node by node by libyang (types, patterns, ranges, a
        value the CE would refuse raises :class:`InvalidCompiledConfig` before anything is
        sent) but not as a whole: the whole was validated when this CE's configuration was
        first pushed, and the CE validates the result in full.  libyang's XML is parsed
        once, inside the ``<config>`` that declares the ``nc`` prefix, marked in place and
        serialised once: no copy of each part, no second tree for the ``<edit-config>``.
        """
        text = self._checked_parts(config, edit, site)
        root = etree.fromstring(b"".join((_CONFIG_OPEN, text or _EMPTY_CE, b"</config>")))
        ce = root[0]
        for child in ce:
            child.set(NC_OPERATION, "replace")
        _removals(ce, edit)
        if management_port is not None:
            add_management_port(root, management_port)
        return etree.tostring(root)

    def _checked_parts(self, config: Mapping[str, Any], edit: CeEdit, site: str) -> bytes:
        """The replaced sections and peers of ``edit`` as libyang prints a ``<ce>`` holding
        only them, every node's value checked (b"": the edit replaces nothing)."""
        import libyang

        part: dict[str, Any] = {k: config[k] for k in edit.sections if k in config}
        peers = _named_entries(config.get("peer", []), set(edit.peers))
        if peers:
            part["peer"] = peers
        if not part:
            return b""
        document = json.dumps({f"{CE_MODULE}:ce": part})
        try:
            tree = self.schema.ctx.parse_data_mem(
                document, "json", no_state=True, strict=True, parse_only=True
            )
        except libyang.LibyangError as exc:
            raise InvalidCompiledConfig(f"compiled configuration of {site}: {exc}") from None
        if tree is None:
            return b""
        try:
            return str(tree.print_mem("xml", with_siblings=True, pretty=False) or "").encode()
        finally:
            tree.free()

    def to_json(self, ce: etree._Element) -> dict[str, Any]:
        """A ``<ce>`` read from a CE as canonical JSON content (no defaults), without
        the parts the server does not own."""
        ce = _strip(ce)
        text = etree.tostring(ce)
        try:
            tree = self.schema.ctx.parse_data_mem(
                text, "xml", no_state=True, strict=False, parse_only=True
            )
        except Exception as exc:  # libyang.LibyangError: the CE sent something odd
            raise InvalidCompiledConfig(f"configuration read from the CE: {exc}") from None
        if tree is None:
            return {}
        try:
            printed = tree.print_mem("json", with_siblings=True, pretty=False)
        finally:
            tree.free()
        content: dict[str, Any] = json.loads(printed or "{}").get(f"{CE_MODULE}:ce", {})
        return content

    def normalise(self, config: Mapping[str, Any], site: str) -> dict[str, Any]:
        """A compiled configuration in the same canonical form :meth:`to_json` gives."""
        return self.to_json(self.to_xml(config, site))


def _named_entries(peers: list[dict[str, Any]], names: set[str]) -> list[dict[str, Any]]:
    """The entries of ``peers`` named in ``names``, in list order.  Found by binary search,
    since the compiler keeps a CE's peers sorted by name (a one-peer push then looks at a
    few entries, not all of them); by a scan of the list should one not be where the
    search looks."""
    found: dict[int, dict[str, Any]] = {}
    for name in names:
        i = bisect.bisect_left(peers, name, key=_peer_name)
        if i < len(peers) and peers[i]["name"] == name:
            found[i] = peers[i]
        else:
            return [p for p in peers if p["name"] in names]
    return [found[i] for i in sorted(found)]


def _peer_name(entry: Mapping[str, Any]) -> str:
    return str(entry["name"])


def _strip(ce: etree._Element) -> etree._Element:
    copy = etree.fromstring(etree.tostring(ce))
    for name in SERVER_OWNED_EXCEPT:
        for child in copy.findall(_q(name)):
            copy.remove(child)
    return copy


# --------------------------------------------------------------------------
# Edits
# --------------------------------------------------------------------------

NC_OPERATION = qn(NC_NS, "operation")
_CONFIG_OPEN = f'<config xmlns="{NC_NS}" xmlns:nc="{NC_NS}">'.encode()
_EMPTY_CE = f'<ce xmlns="{CE_NS}"/>'.encode()


@dataclass
class CeEdit:
    """What one edit-config sends to a CE: sections replaced, peers replaced and removed."""

    sections: list[str] = field(default_factory=list)
    peers: list[str] = field(default_factory=list)
    removed_peers: list[str] = field(default_factory=list)
    removed_sections: list[str] = field(default_factory=list)

    def empty(self) -> bool:
        return not (self.sections or self.peers or self.removed_peers or self.removed_sections)


MANAGEMENT_PATH_SECTIONS = frozenset({"ingress-policy", "internet-access"})
"""Sections of a CE's configuration that decide whether the server's NETCONF traffic still
reaches it: what the ingress policy admits (seed 6.2) and the integrated Internet gateway's
filtering and routes.  A change to them is confirmed over a brand-new connection
(nc_server.southbound), since an established one may outlive a filter that refuses new ones."""


def touches_management_path(edit: CeEdit) -> bool:
    """Whether ``edit`` replaces or removes a section in MANAGEMENT_PATH_SECTIONS."""
    return not MANAGEMENT_PATH_SECTIONS.isdisjoint([*edit.sections, *edit.removed_sections])


def full_edit(target: Mapping[str, Any], present_peers: Iterable[str]) -> CeEdit:
    """Everything, for a CE whose configuration is unknown: every section and peer replaced,
    peers the CE has that the target lacks removed."""
    peers = [p["name"] for p in target.get("peer", [])]
    wanted = set(peers)
    return CeEdit(
        sections=sorted(k for k in target if k != "peer"),
        peers=peers,
        removed_peers=sorted(p for p in present_peers if p not in wanted),
        removed_sections=[],
    )


def incremental_edit(old: Mapping[str, Any], new: Mapping[str, Any]) -> CeEdit:
    """The smallest edit that turns a CE holding ``old`` into ``new``."""
    edit = CeEdit()
    for key in sorted(set(old) | set(new)):
        if key == "peer":
            continue
        if key not in new:
            edit.removed_sections.append(key)
        elif old.get(key) != new[key]:
            edit.sections.append(key)
    old_list, new_list = old.get("peer", []), new.get("peer", [])
    if old_list is new_list:
        return edit
    old_peers = {p["name"]: p for p in old_list}
    # The compiler shares the entries of peers it did not change between its results
    # (nc_server.compile_cache): an entry that is the very same object is unchanged, and
    # comparing it key by key would cost every CE O(peers) on every push.
    edit.peers = [
        p["name"] for p in new_list if (was := old_peers.pop(p["name"], None)) is not p and was != p
    ]
    edit.removed_peers = sorted(old_peers)
    return edit


def edit_of_changes(new: Mapping[str, Any], changes: PeerChanges) -> CeEdit:
    """What :func:`incremental_edit` would find between the configuration ``changes`` is
    relative to and ``new``, read from what the compiler recorded instead of comparing
    the two peer by peer: O(what changed) per CE where the comparison is O(peers), that
    is O(sites^2) for a site added to a full mesh.  A peer entry the compiler rebuilt
    with the same content is sent again: same result on the CE."""
    return CeEdit(
        sections=sorted(
            {"configuration-version", *(k for k in changes.changed_sections if k in new)}
        ),
        peers=[*changes.added_peers, *changes.changed_peers],
        removed_peers=sorted(changes.removed_peers),
        removed_sections=sorted(k for k in changes.changed_sections if k not in new),
    )


def edit_document(target_xml: etree._Element, edit: CeEdit) -> etree._Element:
    """The <config> element of the edit-config carrying ``edit``."""
    config = default_ns_element(NC_NS, "config")
    nsmap: Any = {None: CE_NS, "nc": NC_NS}
    ce = etree.SubElement(config, _q("ce"), nsmap=nsmap)
    wanted_sections = set(edit.sections)
    wanted_peers = set(edit.peers)
    for child in target_xml:
        if not isinstance(child.tag, str):
            continue
        name = etree.QName(child).localname
        if name == "peer":
            peer_name = child.findtext(_q("name"))
            if peer_name in wanted_peers:
                copy = _copy(child)
                copy.set(NC_OPERATION, "replace")
                ce.append(copy)
        elif name in wanted_sections:
            copy = _copy(child)
            copy.set(NC_OPERATION, "replace")
            ce.append(copy)
    _removals(ce, edit)
    return config


def _removals(ce: etree._Element, edit: CeEdit) -> None:
    """Append to ``ce`` the sections and peers ``edit`` removes."""
    for name in edit.removed_sections:
        gone = etree.SubElement(ce, _q(name))
        gone.set(NC_OPERATION, "remove")
    for peer in edit.removed_peers:
        gone = etree.SubElement(ce, _q("peer"))
        gone.set(NC_OPERATION, "remove")
        etree.SubElement(gone, _q("name")).text = peer


def add_management_port(config: etree._Element, port: int) -> None:
    """Move the CE's NETCONF listener: the one pre-configuration leaf the server edits."""
    ce = config.find(_q("ce"))
    assert ce is not None
    pre = etree.SubElement(ce, _q("pre-configuration"))
    management = etree.SubElement(pre, _q("management"))
    leaf = etree.SubElement(management, _q("port"))
    leaf.text = str(port)
    leaf.set(NC_OPERATION, "replace")


def deprovision_document(present_peers: Iterable[str], sections: Iterable[str]) -> etree._Element:
    """Remove every VPN part of a CE's configuration; its pre-configuration stays (seed 3.6)."""
    edit = CeEdit(removed_peers=sorted(present_peers), removed_sections=sorted(sections))
    return edit_document(etree.Element(_q("ce")), edit)


def _copy(elem: etree._Element) -> etree._Element:
    return etree.fromstring(etree.tostring(elem))


# --------------------------------------------------------------------------
# Comparison (audit)
# --------------------------------------------------------------------------


def differences(want: Any, have: Any, index: SchemaIndex | None = None) -> list[str]:
    """Paths where two canonical JSON configurations of a CE's ``ce`` container differ, list
    entries named by their keys (read from the cevpn-ce schema); values are never reported."""
    index = index or _ce_index()
    top = index.top_node(CE_NS, "ce")
    assert top is not None
    return _differences(want, have, "/cevpn-ce:ce", top)


@functools.cache
def _ce_index() -> SchemaIndex:
    return SchemaIndex(ce_schema())


def _differences(want: Any, have: Any, path: str, snode: SchemaNode | None) -> list[str]:
    if isinstance(want, dict) and isinstance(have, dict):
        out: list[str] = []
        for key in sorted(set(want) | set(have)):
            name = key.split(":", 1)[-1]
            child = snode.child(CE_NS, name) if snode is not None else None
            if key not in want or key not in have:
                present = want.get(key, have.get(key))
                if isinstance(present, list) and child is not None and child.keys:
                    # A list absent on one side: name the entries, not just the list.
                    out.extend(
                        _differences(want.get(key, []), have.get(key, []), f"{path}/{name}", child)
                    )
                else:
                    out.append(f"{path}/{name}")
            else:
                out.extend(_differences(want[key], have[key], f"{path}/{name}", child))
        return out
    if isinstance(want, list) and isinstance(have, list):
        keys = snode.keys if snode is not None else ()
        if keys and all(isinstance(e, dict) for e in [*want, *have]):
            w = {tuple(str(e.get(k)) for k in keys): e for e in want}
            h = {tuple(str(e.get(k)) for k in keys): e for e in have}
            out = []
            for ident in sorted(set(w) | set(h)):
                pred = "".join(f"[{k}='{v}']" for k, v in zip(keys, ident, strict=True))
                if ident not in w or ident not in h:
                    out.append(f"{path}{pred}")
                else:
                    out.extend(_differences(w[ident], h[ident], f"{path}{pred}", snode))
            return out
        return [] if sorted(map(str, want)) == sorted(map(str, have)) else [path]
    return [] if want == have else [path]
