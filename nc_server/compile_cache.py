"""The compiler's incremental engine: apply the rules again only where an input changed.

:mod:`nc_server.compile_rules` says what a peer entry or a site's top level
is; this module decides which of them to build again at a compile and
assembles every site's :class:`CeConfig`.  Kept apart so that the rules stay
pure functions of their inputs, and so that the one question this module
answers, "which inputs does an entry depend on?", is written in one place
(:class:`Fingerprints`) and can be checked against a fresh compile
(tests/test_compiler_incremental.py).

Incremental compilation and key material
========================================

Adding a site to an n-site full mesh changes 2n peer entries but the output
holds n^2.  :class:`CompileCache` keeps every peer entry with the inputs it
was built from and rebuilds only those whose inputs changed.  The inputs
are compact fingerprints computed once per site and per compile: VPN-level
parameters, the roles and overrides of both ends, the peer's address and
prefixes, the spoke-prefix aggregate (only in a spoke's entry for the
primary hub), whether the entry carries the default route, and the key
material itself.  What is common to many entries is compared once: a
changed VPN fingerprint drops the whole cache, a changed role or override
of a site drops that site's own entries.

A compile after a small change must not even *visit* the n^2 entries (half
a million in a 1,000-site mesh: seconds of Python), so it works from what
changed (:meth:`CompileCache._incremental`): the sites added, removed, or
whose fingerprint changed make every pair they are part of checked again;
a site's changed extra routes, the entries concerned.  Key material has no
fingerprint (rotation happens at any time), so the KeySource says which
pairs' material changed since the mark it gave after the last compile
(``KeySource.changed_pairs``); those pairs are asked again and compared.
When it cannot tell, when the VPN fingerprint changed, for an explicit
topology (its links are checked as they are paired) or when the change is
large anyway, every pair is visited as in a first compile
(:meth:`CompileCache._every_entry`), reusing what compares equal.

A site's version is a hash of hashes: sha256 over the digest of its
configuration's other sections followed by every peer entry's digest (each
the sha256 of the entry's canonical JSON, made once when the entry is
built, :class:`~nc_server.compile_rules.PeerEntry`).  Adding a site to a
1,000-site mesh then hashes 32 KB per site, wherever the new site sorts,
instead of the part of its 0.8 MB of JSON that sorts after it, and the
cache keeps 32 bytes per entry rather than its JSON.  A site whose entries
and other sections did not change keeps its previous
:class:`CeConfig` object, and a changed one records what changed
(:class:`PeerChanges`), so that comparing two compiles costs what changed.
The cache's own lists and records are edited in place, but only once
everything that can fail has been done: a CompileError still leaves the
previous state.

Output configurations share sub-trees with each other and with the cache
(a peer's tunnel container, for instance): treat them as read-only.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import gc
import hashlib
import logging
import operator
import time
from collections.abc import Hashable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from nc_server.compile_rules import (
    PeerEntry,
    SaSuite,
    VpnRules,
    paired,
    partners,
    section_digest,
)

log = logging.getLogger("cevpn.compiler")

# --------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PeerChanges:
    """What changed in a configuration since the one it was derived from: what
    :func:`nc_server.compiler.diff_configs` would find, known without comparing."""

    since: str
    """The version of the configuration these changes are relative to."""
    added_peers: tuple[str, ...]
    changed_peers: tuple[str, ...]
    removed_peers: tuple[str, ...]
    changed_sections: tuple[str, ...]


@dataclass(frozen=True)
class CeConfig:
    """One CE's compiled configuration."""

    site: str
    config: dict[str, Any]
    """Content of the "cevpn-ce:ce" object, without "pre-configuration",
    with "configuration-version".  Read-only: shares sub-trees."""
    version: str
    """== config["configuration-version"]: "v" + 16 hex digits of sha256."""
    changes: PeerChanges | None = field(default=None, compare=False, repr=False)
    """Since the configuration of the previous compile, when the engine knows it."""


# --------------------------------------------------------------------------
# What an entry depends on
# --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class VpnInputs:
    """Everything a peer entry depends on at VPN level: when it changes, every entry is rebuilt."""

    id: str
    topology: str
    keying: str
    authentication: str
    psk_min_length: int
    minimum_strength: str
    establishment: str
    idle_timeout: int
    encapsulation: str
    protocol: str
    replay_window: int | None
    suite: SaSuite


@dataclass(frozen=True, slots=True)
class EndInputs:
    """What one end contributes to the parameters of all its tunnels (the pair rule)."""

    role: str
    establishment: str | None
    idle_timeout: int | None
    encapsulation: str | None


@dataclass(frozen=True, slots=True)
class PeerInputs:
    """What an entry shows of its peer, and the peer's end of the negotiation."""

    ce_address: str
    prefixes: tuple[str, ...]
    end: EndInputs


@dataclass(frozen=True, slots=True)
class ExtraRoutes:
    """What an entry carries beyond the peer's prefixes (a few entries per site at most)."""

    spoke_aggregate: bytes | None
    """Fingerprint of every spoke's prefixes: in a spoke's entry for the primary hub."""
    default_route: bool
    """The entry of a site's Internet gateway."""


def _fingerprint(value: object) -> bytes:
    """A short digest of a value whose repr is deterministic (str/int/None, tuples, records)."""
    return hashlib.blake2b(repr(value).encode(), digest_size=16).digest()


@dataclass(frozen=True, slots=True)
class Fingerprints:
    """The inputs of one compile, in the forms the engine compares.

    VPN and end inputs are compared once per VPN and per site, as records;
    a peer's inputs are compared once per entry, so they are digested into
    16 bytes that compare in one memcmp.
    """

    vpn: VpnInputs
    ends: dict[str, EndInputs]
    peers: dict[str, bytes]
    extra: dict[str, dict[str, ExtraRoutes]]
    """site -> peer -> what that entry carries beyond the peer's prefixes."""

    @classmethod
    def of(cls, rules: VpnRules) -> Fingerprints:
        m = rules.vpn
        vpn = VpnInputs(
            id=m.id,
            topology=m.topology,
            keying=m.keying,
            authentication=m.authentication,
            psk_min_length=m.psk_min_length,
            minimum_strength=m.minimum_strength,
            establishment=m.establishment,
            idle_timeout=m.idle_timeout,
            encapsulation=m.encapsulation,
            protocol=m.protocol,
            replay_window=rules.replay_window,
            suite=rules.suite,
        )
        ends = {
            s.id: EndInputs(s.role, s.establishment, s.idle_timeout, s.encapsulation)
            for s in m.sites.values()
        }
        peers = {
            s.id: _fingerprint(PeerInputs(s.ce_address, s.prefixes, ends[s.id]))
            for s in m.sites.values()
        }
        aggregate = _fingerprint(tuple(rules.spoke_prefixes.items())) if rules.primary_hub else None
        extra: dict[str, dict[str, ExtraRoutes]] = {}
        for site_id, peers_with_extra in rules.extra_routes.items():
            extra[site_id] = {
                peer: ExtraRoutes(
                    aggregate if rules.primary_hub.get(site_id) == peer else None,
                    rules.gateway_peer.get(site_id) == peer,
                )
                for peer in sorted(peers_with_extra)
            }
        return cls(vpn, ends, peers, extra)


# --------------------------------------------------------------------------
# What one compile leaves for the next
# --------------------------------------------------------------------------


@dataclass(slots=True)  # not frozen: one per peer entry, and a frozen one costs 3x to make
class PeerRecord:
    """A cached peer entry and the per-entry inputs it was built from.  Read-only."""

    peer: bytes
    """The peer's fingerprint (:class:`PeerInputs`)."""
    extra: ExtraRoutes | None
    material: object
    """The key material, as the KeySource or the ``keys`` container gave it."""
    built: PeerEntry


@dataclass(frozen=True, slots=True)
class SiteMemo:
    """A site's last result and what building the next one from it needs."""

    top: dict[str, Any]
    """Every top-level section but "peer" (:meth:`VpnRules.top`)."""
    top_digest: bytes
    """:func:`section_digest` of ``top``."""
    digests: list[bytes]
    """The peer entries' digests, in the configuration's order.  Owned by the cache: the
    next successful compile edits it in place."""
    result: CeConfig

    @property
    def entries(self) -> list[dict[str, Any]]:
        """The peer entries (shared with the result: never edited in place)."""
        entries: list[dict[str, Any]] = self.result.config.get("peer", [])
        return entries


@dataclass(frozen=True, slots=True)
class VpnCache:
    """What one compile of a VPN leaves for the next."""

    vpn: VpnInputs
    ends: dict[str, EndInputs]
    peers: dict[str, bytes]
    extra: dict[str, dict[str, ExtraRoutes]]
    explicit_psk: dict[tuple[str, str], str]
    explicit_sa: dict[tuple[str, str], dict[str, Any]]
    records: dict[str, dict[str, PeerRecord]]
    """site -> peer -> record.  Owned by the cache: the next successful compile edits it
    in place (a failed one leaves it as it was, see :meth:`CompileCache._incremental`)."""
    memos: dict[str, SiteMemo]
    """By site id, in sorted order."""
    mark: Hashable
    """The KeySource's mark of the key material the entries carry."""

    @property
    def configs(self) -> dict[str, CeConfig]:
        """The compile's result, by site id in sorted order."""
        return {site: memo.result for site, memo in self.memos.items()}


@dataclass(frozen=True, slots=True)
class Changes:
    """What differs from the last compile, for :meth:`CompileCache._incremental`."""

    added: tuple[str, ...]
    removed: tuple[str, ...]
    ends: frozenset[str]
    """Kept sites whose role or overrides changed: their own entries are all built again."""
    peers: frozenset[str]
    """Kept sites whose peer fingerprint changed (includes ``ends``)."""
    material: frozenset[tuple[str, str]]
    """Pairs of the VPN (smaller id first) whose key material may have changed."""


_INCREMENTAL_SHARE = 4
"""The incremental path is taken while fewer than a quarter of the sites changed (plus a few)."""
_INCREMENTAL_SLACK = 16


# --------------------------------------------------------------------------
# The engine
# --------------------------------------------------------------------------


class CompileCache:
    """Per-VPN caches, and the compile that uses and replaces them.

    A cache is replaced only when the whole VPN compiled, so a CompileError
    leaves the previous state for the next attempt.
    """

    def __init__(self) -> None:
        self._vpns: dict[str, VpnCache] = {}
        self.peer_builds = 0
        """Peer entries actually built (not reused), over the cache's life."""

    def forget(self, vpn_id: str) -> None:
        self._vpns.pop(vpn_id, None)

    def compile(self, rules: VpnRules) -> dict[str, CeConfig]:
        """Every site's configuration, building only the entries whose inputs changed."""
        fingerprints = Fingerprints.of(rules)
        vpn_id = rules.vpn.id
        old = self._vpns.get(vpn_id)
        sites = len(rules.vpn.sites)
        with _collector_paused(sites * sites):
            changes = None if old is None else what_changed(rules, fingerprints, old)
            if old is None or changes is None:
                records = self._every_entry(rules, fingerprints, old)
                memos = _assemble_sites(rules, records, old)
                if sites * sites >= _PAUSE_COLLECTOR_FROM:
                    _full_collection_soon()
            else:
                records, memos = self._incremental(rules, fingerprints, old, changes)
        cache = VpnCache(
            fingerprints.vpn,
            fingerprints.ends,
            fingerprints.peers,
            fingerprints.extra,
            rules.explicit.psk,
            rules.explicit.sa,
            records,
            memos,
            rules.keys.material_mark(vpn_id),
        )
        self._vpns[vpn_id] = cache
        return cache.configs

    def _every_entry(
        self, rules: VpnRules, fingerprints: Fingerprints, old: VpnCache | None
    ) -> dict[str, dict[str, PeerRecord]]:
        """Visit every pair once, reusing or building both directions' entries.

        What is common to a whole VPN or to one end is compared once: a
        changed VPN fingerprint drops the whole cache, a changed end drops
        that site's entries.  Per entry only (peer fingerprint, extra
        routes, key material) is compared.
        """
        plan = rules.keying_plan()
        material_of, build = plan.material, plan.build
        peer_fp = fingerprints.peers
        no_records: dict[str, PeerRecord] = {}
        no_extra: dict[str, ExtraRoutes] = {}
        reusable = old is not None and old.vpn == fingerprints.vpn
        state: dict[str, _SiteState] = {}
        for site_id in rules.vpn.sites:
            mine = no_records
            if old is not None and reusable and old.ends.get(site_id) == fingerprints.ends[site_id]:
                mine = old.records.get(site_id, no_records)
            state[site_id] = _SiteState(mine, {}, fingerprints.extra.get(site_id, no_extra))

        pairs = rules.pairs()
        builds = 0

        def entry(a: str, b: str, material: Any) -> None:
            """a's entry for peer b: reused when nothing it was built from changed."""
            nonlocal builds
            site = state[a]
            record = site.old.get(b)
            extra = site.extra.get(b)
            if record is None or not _still_valid(record, peer_fp[b], extra, material):
                builds += 1
                record = PeerRecord(peer_fp[b], extra, material, build(a, b, material))
            site.new[b] = record

        try:
            for a, b in pairs:
                for_a, for_b = material_of(a, b)
                entry(a, b, for_a)
                entry(b, a, for_b)
        finally:
            self.peer_builds += builds
        return {site_id: site.new for site_id, site in state.items()}

    def _incremental(
        self, rules: VpnRules, fingerprints: Fingerprints, old: VpnCache, changes: Changes
    ) -> tuple[dict[str, dict[str, PeerRecord]], dict[str, SiteMemo]]:
        """Check again only the pairs a change can have touched, and edit the other sites'
        lists instead of rebuilding them (see the module docstring).

        Everything that can fail (building entries, the sites' top levels) is done
        before the cache's records and lists are edited in place.
        """
        whole = {*changes.added, *changes.ends}
        edits = self._checked_entries(rules, fingerprints, old, changes, whole)
        for gone in (*changes.removed, *sorted(changes.ends)):
            for site_id in old.records[gone]:
                if site_id in rules.vpn.sites and site_id not in whole:
                    edits.setdefault(site_id, {}).setdefault(gone, None)
        sites = rules.vpn.sites
        ca = rules.ca_certificate()
        tops = {site_id: rules.top(sites[site_id], ca) for site_id in sorted(sites)}
        # Nothing below raises: the cache is now edited in place.
        records = old.records
        for gone in changes.removed:
            del records[gone]
        memos: dict[str, SiteMemo] = {}
        for site_id, top in tops.items():
            mine = edits.get(site_id, {})
            memo = old.memos.get(site_id)
            if memo is None or site_id in whole:
                fresh = {peer: r for peer, r in sorted(mine.items()) if r is not None}
                records[site_id] = fresh
                memos[site_id] = _new_memo(site_id, top, fresh, None)
                continue
            own = records[site_id]
            for peer, record in mine.items():
                if record is None:
                    own.pop(peer, None)
                else:
                    own[peer] = record
            memos[site_id] = _edited_memo(site_id, memo, top, mine)
        return records, memos

    def _checked_entries(
        self,
        rules: VpnRules,
        fingerprints: Fingerprints,
        old: VpnCache,
        changes: Changes,
        whole: set[str],
    ) -> dict[str, dict[str, PeerRecord | None]]:
        """site -> peer -> its entry's record, for every pair a change can have touched:
        reused where its inputs and material compare equal, else built."""
        plan = rules.keying_plan()
        material_of, build = plan.material, plan.build
        peer_fp, extras = fingerprints.peers, fingerprints.extra
        no_records: dict[str, PeerRecord] = {}
        edits: dict[str, dict[str, PeerRecord | None]] = {}
        builds = 0
        try:
            for a, b in sorted(_pairs_to_check(rules, fingerprints, old, changes)):
                materials = material_of(a, b)
                for me, peer, material in ((a, b, materials[0]), (b, a, materials[1])):
                    mine = no_records if me in whole else old.records.get(me, no_records)
                    record = mine.get(peer)
                    extra = extras.get(me, {}).get(peer)
                    if record is None or not _still_valid(record, peer_fp[peer], extra, material):
                        builds += 1
                        entry = build(me, peer, material)
                        record = PeerRecord(peer_fp[peer], extra, material, entry)
                    edits.setdefault(me, {})[peer] = record
        finally:
            self.peer_builds += builds
        return edits


def _still_valid(
    record: PeerRecord, peer_fp: bytes, extra: ExtraRoutes | None, material: object
) -> bool:
    """Whether a cached peer entry was built from exactly these inputs (the full walk and
    the incremental check reuse an entry by this one rule)."""
    return record.peer == peer_fp and record.extra == extra and record.material == material


def what_changed(rules: VpnRules, fingerprints: Fingerprints, old: VpnCache) -> Changes | None:
    """What differs from the last compile; None when every pair must be visited again."""
    m = rules.vpn
    sites = m.sites
    if old.vpn != fingerprints.vpn or not sites or partners(m, next(iter(sites))) is None:
        return None
    pairs = rules.keys.changed_pairs(m.id, old.mark)
    if pairs is None:
        return None
    material = {pair for pair in pairs if pair[0] in sites and pair[1] in sites}
    material.update(_changed_keys(old.explicit_psk, rules.explicit.psk, sites))
    material.update(_changed_keys(old.explicit_sa, rules.explicit.sa, sites))
    added = tuple(s for s in sites if s not in old.records)
    removed = tuple(s for s in old.records if s not in sites)
    ends = frozenset(s for s, end in fingerprints.ends.items() if old.ends.get(s, end) != end)
    peers = frozenset(s for s, fp in fingerprints.peers.items() if old.peers.get(s, fp) != fp)
    touched = len(added) + len(removed) + len(peers)
    if _INCREMENTAL_SHARE * touched > len(sites) + _INCREMENTAL_SLACK:
        return None
    if _INCREMENTAL_SHARE * len(material) > len(sites) * len(sites) + _INCREMENTAL_SLACK:
        return None
    return Changes(added, removed, ends, peers, frozenset(material))


def _changed_keys(
    before: Mapping[tuple[str, str], object],
    after: Mapping[tuple[str, str], object],
    sites: Mapping[str, object],
) -> Iterator[tuple[str, str]]:
    """The pairs (smaller id first) of the VPN's sites whose explicit key in ``keys`` changed."""
    for a, b in before.keys() | after.keys():
        if before.get((a, b)) != after.get((a, b)) and a in sites and b in sites and a != b:
            yield (a, b) if a < b else (b, a)


def _pairs_to_check(
    rules: VpnRules, fingerprints: Fingerprints, old: VpnCache, changes: Changes
) -> set[tuple[str, str]]:
    """Every pair (smaller id first) whose entries may differ from the last compile's:
    those of added or changed sites, those whose material changed, and those whose
    extra routes changed."""
    m = rules.vpn
    check: set[tuple[str, str]] = set()
    for site in (*changes.added, *changes.peers):
        mine = partners(m, site) or ()
        check.update((site, other) if site < other else (other, site) for other in mine)
    check.update(pair for pair in changes.material if paired(m, *pair))
    for site in m.sites:
        before, after = old.extra.get(site, {}), fingerprints.extra.get(site, {})
        if before != after:
            for peer in before.keys() | after.keys():
                if peer in m.sites and paired(m, site, peer):
                    check.add((site, peer) if site < peer else (peer, site))
    return check


@dataclass(slots=True)
class _SiteState:
    """One site during the walk over every pair."""

    old: dict[str, PeerRecord]
    """Its reusable records of the last compile, by peer."""
    new: dict[str, PeerRecord]
    """Its records of this compile, by peer (filled in sorted order)."""
    extra: dict[str, ExtraRoutes]


# --------------------------------------------------------------------------
# Assembling the configurations
# --------------------------------------------------------------------------


def _assemble_sites(
    rules: VpnRules, records: dict[str, dict[str, PeerRecord]], old: VpnCache | None
) -> dict[str, SiteMemo]:
    """Every site's memo, in sorted order, keeping a site's last result when unchanged."""
    sites = rules.vpn.sites
    memos: dict[str, SiteMemo] = {}
    ca = rules.ca_certificate()
    for site_id in sorted(sites):
        top = rules.top(sites[site_id], ca)
        memos[site_id] = _new_memo(
            site_id, top, records[site_id], None if old is None else old.memos.get(site_id)
        )
    return memos


def _new_memo(
    site: str, top: dict[str, Any], records: dict[str, PeerRecord], old: SiteMemo | None
) -> SiteMemo:
    """A site's memo from all its records (sorted by peer); ``old``'s result is kept when
    the configuration is the same."""
    same_top = old is not None and old.top == top
    top_digest = old.top_digest if old is not None and same_top else section_digest(top)
    values = records.values()
    digests = [r.built.digest for r in values]
    if old is not None and same_top and old.digests == digests:
        return SiteMemo(top, top_digest, digests, old.result)
    version = _version(top_digest, digests)
    config = _config(top, [r.built.content for r in values], version)
    return SiteMemo(top, top_digest, digests, CeConfig(site, config, version))


_NAME = operator.itemgetter("name")


@dataclass(slots=True)
class _Splice:
    """A site's peer list after an edit, and what the edit changed."""

    entries: list[dict[str, Any]]
    first: int | None = None
    """Index of the first entry that differs (None: nothing did)."""
    added: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)


def _splice(memo: SiteMemo, edits: Mapping[str, PeerRecord | None]) -> _Splice:
    """``edits`` (peer -> record, None: removed) applied to a copy of the memo's entries
    and, in place, to its digests; from the last to the first, so indexes stay right."""
    entries, digests = memo.entries, memo.digests
    out = _Splice(entries)
    for name in sorted(edits, reverse=True):
        record = edits[name]
        i = bisect.bisect_left(out.entries, name, key=_NAME)
        present = i < len(out.entries) and out.entries[i]["name"] == name
        if record is None and not present:
            continue
        if record is not None and present and record.built.digest is digests[i]:
            continue
        if out.entries is entries:
            out.entries = entries.copy()
        if record is None:
            del out.entries[i], digests[i]
            out.removed.append(name)
        elif present:
            if record.built.content != out.entries[i]:
                out.changed.append(name)
            out.entries[i], digests[i] = record.built.content, record.built.digest
        else:
            out.entries.insert(i, record.built.content)
            digests.insert(i, record.built.digest)
            out.added.append(name)
        out.first = i
    out.added.reverse()
    out.changed.reverse()
    out.removed.reverse()
    return out


def _edited_memo(
    site: str, memo: SiteMemo, top: dict[str, Any], edits: Mapping[str, PeerRecord | None]
) -> SiteMemo:
    """The site's memo after ``edits``."""
    lists = _splice(memo, edits)
    same_top = memo.top == top
    if lists.first is None and same_top:
        return memo
    top_digest = memo.top_digest if same_top else section_digest(top)
    version = _version(top_digest, memo.digests)
    result = memo.result
    if version != result.version:
        changes = PeerChanges(
            result.version,
            tuple(lists.added),
            tuple(lists.changed),
            tuple(lists.removed),
            () if same_top else _changed_sections(memo.top, top),
        )
        result = CeConfig(site, _config(top, lists.entries, version), version, changes)
    return SiteMemo(top, top_digest, memo.digests, result)


def _changed_sections(before: Mapping[str, Any], after: Mapping[str, Any]) -> tuple[str, ...]:
    return tuple(sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k)))


def _version(top_digest: bytes, digests: list[bytes]) -> str:
    """ "v" + 16 hex digits of sha256 over the digests of the sections and of each entry."""
    return "v" + hashlib.sha256(top_digest + b"".join(digests)).hexdigest()[:16]


def _config(top: dict[str, Any], peers: list[dict[str, Any]], version: str) -> dict[str, Any]:
    """The configuration: its version first, then the sections in CE order, "peer" before
    "routing"."""
    config: dict[str, Any] = {"configuration-version": version}
    for key, value in top.items():
        if key == "routing" and peers:
            config["peer"] = peers
        config[key] = value
    if peers and "peer" not in config:
        config["peer"] = peers
    return config


_PAUSE_COLLECTOR_FROM = 10_000
"""Tunnels (sites squared) from which the cyclic garbage collector is paused for a compile."""


_full_collection_on: asyncio.AbstractEventLoop | None = None
"""The loop a full collection is due on (it is the process's: one is enough)."""


def _full_collection_soon() -> None:
    """One full collection at the event loop's next turn, after a large VPN was compiled
    whole (whatever the number of VPNs the same commit compiled).

    Why: the collector runs a full collection once the objects promoted to the oldest
    generation since the last one outnumber a quarter of those it found there then.
    After a server's start-up, or the commit that builds a large mesh, that quarter is
    small and the new configurations are many: the first full collection came soon, at
    a moment of its own choosing, and traversed all of them (at 1,000 sites, some 3 GB:
    6.4 s, the event loop stalled for all of it, in the middle of the next site's
    provisioning in bench/server_bench.py).  Made right after the commit that compiled
    them, it costs the same once, in a commit that took minutes anyway, and leaves the
    quarter large: the next full collection is far away.  Not without a running loop
    (tools, tests): nothing is stalled there."""
    global _full_collection_on
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return
    due_on = _full_collection_on
    if due_on is not None and not due_on.is_closed():
        return  # one is coming (a loop that closed before its turn makes none)
    _full_collection_on = loop
    loop.call_soon(_full_collection)


def _full_collection() -> None:
    global _full_collection_on
    _full_collection_on = None
    started = time.perf_counter()
    found = gc.collect()
    log.info(
        "full garbage collection after a large compile: %.2f s, %d unreachable objects",
        time.perf_counter() - started,
        found,
    )


@contextlib.contextmanager
def _collector_paused(tunnels: int) -> Iterator[None]:
    """Keep the cyclic garbage collector off a large VPN's compile and its survivors.

    A 1,000-site mesh allocates millions of containers that all survive; the
    collector would traverse the growing heap again and again (half the time
    of a first compile) without ever freeing one of them.  Nothing the
    compiler makes forms a cycle, and reference counting frees everything else.

    Afterwards what the compile allocated is moved straight to the oldest
    generation (``gc.freeze()`` then ``gc.unfreeze()``: two list splices).
    Else the next young collections would traverse it: after a site is added
    to a 1,000-site mesh, a thousand new peer lists through which a million
    cached entries are touched, twice (half a second), only to promote them.
    Cyclic garbage of others promoted with them waits for the next full
    collection.  Skipped when the process froze objects of its own, which
    unfreezing would release.
    """
    if tunnels < _PAUSE_COLLECTOR_FROM or not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        if gc.get_freeze_count() == 0:
            gc.freeze()
            gc.unfreeze()
        gc.enable()
