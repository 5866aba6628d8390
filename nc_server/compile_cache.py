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
of a site drops that site's own entries; per entry only (peer fingerprint,
extra routes, key material) is compared.

Key material is *asked of the KeySource at every compile* rather than
fingerprinted: rotation can happen at any time, the protocol has no change
counter, and the calls are look-ups of stored material, cheaper than
rebuilding an entry.  Comparing the returned material with the cached one is
what detects a rotation.  Each call is made once where it can be: a
pre-shared key once per pair (both ends share it), an identity or a site
certificate once per site, the CA once per VPN; an IKE-less SA twice (as its
sender installs it and as its receiver does, which differ during a rekey).

Each entry also keeps its canonical JSON, so a site's version (sha256 over
the canonical JSON of its whole configuration) is computed by joining cached
bytes instead of re-serialising a million entries; a site whose entries and
other sections did not change keeps its previous :class:`CeConfig` object.

Output configurations share sub-trees with each other and with the cache
(a peer's tunnel container, for instance): treat them as read-only.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from nc_server.compile_rules import (
    PeerEntry,
    SaSuite,
    VpnRules,
    canonical_json,
)

# --------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class CeConfig:
    """One CE's compiled configuration."""

    site: str
    config: dict[str, Any]
    """Content of the "cevpn-ce:ce" object, without "pre-configuration",
    with "configuration-version".  Read-only: shares sub-trees."""
    version: str
    """== config["configuration-version"]: "v" + 16 hex digits of sha256."""


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
class Frame:
    """The canonical JSON of a configuration around its peer list."""

    head: bytes
    """Up to and including ``"peer":[``."""
    tail: bytes
    """From the list's ``]`` to the end."""

    @classmethod
    def of(cls, top: Mapping[str, Any]) -> Frame:
        before = {k: v for k, v in top.items() if k < "peer"}
        after = {k: v for k, v in top.items() if k > "peer"}
        head = canonical_json(before)[:-1] + ("," if before else "") + '"peer":['
        tail = "]" + ("," if after else "") + canonical_json(after)[1:]
        return cls(head.encode(), tail.encode())


@dataclass(frozen=True, slots=True)
class SiteMemo:
    """A site's last result, reused when its frame and peer entries are unchanged."""

    frame: Frame
    datas: list[bytes]
    """The canonical JSON of its peer entries, in order."""
    result: CeConfig


@dataclass(frozen=True, slots=True)
class VpnCache:
    """What one compile of a VPN leaves for the next."""

    vpn: VpnInputs
    ends: dict[str, EndInputs]
    records: dict[str, dict[str, PeerRecord]]
    """site -> peer -> record, peers sorted."""
    memos: dict[str, SiteMemo]
    configs: dict[str, CeConfig]
    """The compile's result, by site id in sorted order."""


@dataclass(slots=True)
class _SiteState:
    """One site during the walk over the pairs."""

    old: dict[str, PeerRecord]
    """Its reusable records of the last compile, by peer."""
    new: dict[str, PeerRecord]
    """Its records of this compile, by peer (filled in sorted order)."""
    extra: dict[str, ExtraRoutes]


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
        old = self._vpns.get(rules.vpn.id)
        records = self._entries(rules, fingerprints, old)
        cache = _assemble_sites(rules, fingerprints, records, old)
        self._vpns[rules.vpn.id] = cache
        return cache.configs

    def _entries(
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
        old_records = old.records if old is not None and old.vpn == fingerprints.vpn else {}
        state: dict[str, _SiteState] = {}
        for site_id in rules.vpn.sites:
            mine = old_records.get(site_id, no_records)
            if old is None or old.ends.get(site_id) != fingerprints.ends[site_id]:
                mine = no_records
            state[site_id] = _SiteState(mine, {}, fingerprints.extra.get(site_id, no_extra))

        pairs = rules.pairs()
        builds = 0
        try:
            with _collector_paused(len(pairs)):
                for a, b in pairs:
                    for_a, for_b = material_of(a, b)
                    # Both directions written out: this runs n^2/2 times in a full mesh.
                    site = state[a]
                    record = site.old.get(b)
                    extra = site.extra.get(b)
                    if (
                        record is None
                        or record.peer != peer_fp[b]
                        or record.extra != extra
                        or record.material != for_a
                    ):
                        builds += 1
                        record = PeerRecord(peer_fp[b], extra, for_a, build(a, b, for_a))
                    site.new[b] = record
                    site = state[b]
                    record = site.old.get(a)
                    extra = site.extra.get(a)
                    if (
                        record is None
                        or record.peer != peer_fp[a]
                        or record.extra != extra
                        or record.material != for_b
                    ):
                        builds += 1
                        record = PeerRecord(peer_fp[a], extra, for_b, build(b, a, for_b))
                    site.new[a] = record
        finally:
            self.peer_builds += builds
        return {site_id: site.new for site_id, site in state.items()}


def _assemble_sites(
    rules: VpnRules,
    fingerprints: Fingerprints,
    records: dict[str, dict[str, PeerRecord]],
    old: VpnCache | None,
) -> VpnCache:
    """Every site's configuration, in sorted order, reusing a site's last one when unchanged."""
    sites = rules.vpn.sites
    configs: dict[str, CeConfig] = {}
    memos: dict[str, SiteMemo] = {}
    old_memos = old.memos if old is not None else {}
    ca = rules.ca_certificate()
    for site_id in sorted(sites):
        top = rules.top(sites[site_id], ca)
        frame = Frame.of(top)
        site_records = records[site_id].values()
        datas = [r.built.canonical for r in site_records]
        memo = old_memos.get(site_id)
        if memo is None or memo.frame != frame or memo.datas != datas:
            entries = [r.built.content for r in site_records]
            memo = SiteMemo(frame, datas, _assemble(site_id, top, entries, frame, datas))
        memos[site_id] = memo
        configs[site_id] = memo.result
    return VpnCache(fingerprints.vpn, fingerprints.ends, records, memos, configs)


def _assemble(
    site: str,
    top: dict[str, Any],
    peers: list[dict[str, Any]],
    frame: Frame,
    datas: list[bytes],
) -> CeConfig:
    """The site's configuration and its version: sha256 over the canonical JSON."""
    if datas:
        digest = hashlib.sha256(frame.head)
        digest.update(b",".join(datas))
        digest.update(frame.tail)
    else:
        digest = hashlib.sha256(canonical_json(top).encode())
    version = "v" + digest.hexdigest()[:16]
    config: dict[str, Any] = {"configuration-version": version}
    for key, value in top.items():
        if key == "routing" and peers:
            config["peer"] = peers
        config[key] = value
    if peers and "peer" not in config:
        config["peer"] = peers
    return CeConfig(site=site, config=config, version=version)


_PAUSE_COLLECTOR_FROM = 10_000
"""Tunnels from which the cyclic garbage collector is paused while entries are built."""


@contextlib.contextmanager
def _collector_paused(tunnels: int) -> Iterator[None]:
    """Pause the cyclic garbage collector while a large VPN's entries are built.

    A 1,000-site mesh allocates millions of containers that all survive; the
    collector would traverse the growing heap again and again (half the time
    of such a compile) without ever freeing one of them.  Nothing the compiler
    makes forms a cycle, reference counting still frees everything else, and
    the collector runs again as soon as the loop is over.
    """
    if tunnels < _PAUSE_COLLECTOR_FROM or not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
