"""Compile one VPN of the VPN database into the cevpn-ce configuration of each of its CEs.

The VPN server keeps the VPN database in ``cevpn-service`` (seed 3.1); each CE
agent serves ``cevpn-ce``.  This module is the function between the two: one
``vpn`` entry (RFC 7951 JSON as libyang prints it, implicit defaults
included) in, one ``cevpn-ce:ce`` object per site out, and what changed
between two compiles.  It is the public face of two modules that each hold
one concern:

:mod:`nc_server.compile_rules`
    The mapping rules, pure: the VPN entry as named records, topology pairs,
    per-pair tunnel parameters, remote prefixes, one peer entry, a site's
    top-level sections, key material requests, strength checks, the IKE-less
    suite.  Its docstring says what each rule is and why.

:mod:`nc_server.compile_cache`
    The incremental engine: fingerprints of what entries depend on, the
    per-VPN cache of peer entries, which entries to build again, and the
    assembly of each :class:`CeConfig` with its version from the digests of
    its parts' canonical JSON, kept in the cache.  Its docstring says why a
    compile after a small change is cheap.

Callers import from here only; the names below are the whole interface.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from nc_server.compile_cache import CeConfig, CompileCache, PeerChanges
from nc_server.compile_rules import (
    CA_CERTIFICATE_NAME,
    DEFAULT_ESP_ENCRYPTION,
    IPV4_DEFAULT_ROUTE,
    RETRY_LEAVES,
    TYPES_MODULE,
    CompileError,
    KeySource,
    SaSuite,
    VpnRules,
    canonical_json,
    identity_ancestors,
    identity_ancestors_from_yang,
    meets_strength,
    parse_vpn,
    sa_suite,
    tunnel_pairs,
)

__all__ = [
    "CA_CERTIFICATE_NAME",
    "DEFAULT_ESP_ENCRYPTION",
    "IPV4_DEFAULT_ROUTE",
    "RETRY_LEAVES",
    "TYPES_MODULE",
    "CeConfig",
    "CompileError",
    "KeySource",
    "PeerChanges",
    "SaSuite",
    "SiteDelta",
    "VpnCompiler",
    "canonical_json",
    "compile_vpn",
    "diff_configs",
    "identity_ancestors",
    "identity_ancestors_from_yang",
    "meets_strength",
    "sa_suite",
    "tunnel_pairs",
]


@dataclass(frozen=True)
class SiteDelta:
    """What changed in one site's configuration between two compiles."""

    site: str
    added_peers: tuple[str, ...] = ()
    changed_peers: tuple[str, ...] = ()
    removed_peers: tuple[str, ...] = ()
    changed_sections: tuple[str, ...] = ()
    """Top-level keys other than "peer" and "configuration-version" whose value changed."""
    new_site: bool = False
    removed_site: bool = False


# --------------------------------------------------------------------------
# The compiler
# --------------------------------------------------------------------------


class VpnCompiler:
    """Compiles VPNs, reusing peer entries whose inputs did not change since the last compile.

    One instance serves any number of VPNs (each has its own cache, keyed by
    VPN id).  Not thread-safe: give each thread its own or serialise calls.
    """

    def __init__(self, keys: KeySource) -> None:
        self.keys = keys
        self._cache = CompileCache()

    @property
    def peer_builds(self) -> int:
        """Peer entries actually built (not reused), over the compiler's life."""
        return self._cache.peer_builds

    def forget(self, vpn_id: str) -> None:
        """Drop the cache of a VPN (when it is deleted)."""
        self._cache.forget(vpn_id)

    def compile(self, vpn: Mapping[str, Any]) -> dict[str, CeConfig]:
        """One CeConfig per site of ``vpn``, by site id in sorted order.

        The cache is replaced only when the whole VPN compiled, so a
        CompileError leaves the previous state for the next attempt.
        """
        return self._cache.compile(VpnRules(parse_vpn(vpn), self.keys))


def compile_vpn(vpn: Mapping[str, Any], keys: KeySource) -> dict[str, CeConfig]:
    """Compile once, without keeping a cache."""
    return VpnCompiler(keys).compile(vpn)


# --------------------------------------------------------------------------
# Differences between two compiles
# --------------------------------------------------------------------------


def _peer_map(config: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    return {p["name"]: p for p in config.get("peer", [])}


def _sections(config: Mapping[str, Any]) -> set[str]:
    return {k for k in config if k not in ("peer", "configuration-version")}


def diff_configs(old: Mapping[str, CeConfig], new: Mapping[str, CeConfig]) -> dict[str, SiteDelta]:
    """What changed per site; sites without any change are absent.

    A new site lists all its peers as added and all its sections as changed; a
    removed site lists all its peers as removed and all its sections as changed.
    A configuration the incremental engine derived from one with ``old``'s
    version carries what changed (``CeConfig.changes``): it is taken as is, so
    that adding a site to a large mesh is not a comparison of a million entries.
    """
    deltas: dict[str, SiteDelta] = {}
    for site in sorted(set(old) | set(new)):
        before, after = old.get(site), new.get(site)
        if before is None and after is not None:
            deltas[site] = SiteDelta(
                site,
                added_peers=tuple(sorted(_peer_map(after.config))),
                changed_sections=tuple(sorted(_sections(after.config))),
                new_site=True,
            )
            continue
        if after is None and before is not None:
            deltas[site] = SiteDelta(
                site,
                removed_peers=tuple(sorted(_peer_map(before.config))),
                changed_sections=tuple(sorted(_sections(before.config))),
                removed_site=True,
            )
            continue
        assert before is not None and after is not None
        if before is after or before.version == after.version:
            continue
        known = after.changes
        if known is not None and known.since == before.version:
            # The engine derived after from a configuration with before's content.
            deltas[site] = SiteDelta(
                site,
                added_peers=known.added_peers,
                changed_peers=known.changed_peers,
                removed_peers=known.removed_peers,
                changed_sections=known.changed_sections,
            )
            continue
        old_peers, new_peers = _peer_map(before.config), _peer_map(after.config)
        changed = tuple(
            sorted(
                name
                for name, entry in new_peers.items()
                if name in old_peers and old_peers[name] is not entry and old_peers[name] != entry
            )
        )
        sections = tuple(
            sorted(
                key
                for key in _sections(before.config) | _sections(after.config)
                if before.config.get(key) != after.config.get(key)
            )
        )
        delta = SiteDelta(
            site,
            added_peers=tuple(sorted(set(new_peers) - set(old_peers))),
            changed_peers=changed,
            removed_peers=tuple(sorted(set(old_peers) - set(new_peers))),
            changed_sections=sections,
        )
        if delta.added_peers or delta.changed_peers or delta.removed_peers or sections:
            deltas[site] = delta
    return deltas
