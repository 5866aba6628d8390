"""Compile one VPN of the VPN database into the cevpn-ce configuration of each of its CEs.

The VPN server keeps the VPN database in ``cevpn-service`` (seed 3.1); each CE
agent serves ``cevpn-ce``.  This module is the pure function between the two:
one ``vpn`` entry (RFC 7951 JSON as libyang prints it, implicit defaults
included) in, one ``cevpn-ce:ce`` object per site out.  It does no I/O except
reading the ``cevpn-types`` identities once per process (see
:func:`identity_ancestors`); key material comes from a :class:`KeySource`.

Mapping rules, and why
======================

Tunnels (seed 3.4, last paragraph: a site's role decides its peers)
    full-mesh: every pair of sites.  hub-and-spoke: every pair with at least
    one hub, so hubs mesh among themselves and spokes reach every hub but no
    other spoke.  explicit: exactly the ``topology/link`` entries.  A peer
    entry is named after the peer's site id and points at its ``ce-address``.

CE top level
    ``minimum-strength`` is the profile's, so the CE's own ``must`` statements
    refuse anything weaker than the VPN allows (seed 7).  ``sa-defaults`` is the
    profile's ``sa-information`` (ike and esp as given, empty containers left
    out) with ``ike/dpd`` replaced by the tunnel timers: the site's DPD override
    where the profile lets sites override DPD, else ``tunnel-defaults/dpd``.
    The timers are the operational knob of ``tunnel-defaults``; the profile's
    own ``ike/dpd`` always carries YANG defaults, so it cannot say "not set"
    and the timers win.  ``retry-policy`` is ``tunnel-defaults/retry-policy``
    with the site's overrides on top, value by value (seed 3.4).

Per-peer tunnel parameters must agree at both ends
    establishment, idle-timeout (only when traffic-driven) and encapsulation
    are negotiated by both CEs, and a mismatch means no tunnel (tunnel mode at
    one end, transport at the other, never agree).  So a pair's value is
    chosen by a rule both ends evaluate identically, leaf by leaf: the
    override of a hub end first (the hub is the shared resource), else the
    override of the end with the smaller site id, else the other end's, else
    the VPN default.  ``dynamic-routing`` is true exactly when the VPN runs
    OSPF; then no ``remote-prefix`` is configured because routes are learnt
    (seed 4.3).

Static routes (routing protocol ``none``, seed 4)
    ``remote-prefix`` lists what is reachable through the peer: normally the
    peer's ``local-prefix``.  In hub-and-spoke a spoke has no tunnel to other
    spokes, so spoke-to-spoke traffic goes through a hub: the spoke's entry
    for the hub with the smallest id also carries every other spoke's
    prefixes (one hub only, so that a prefix is never routed into two
    tunnels); its entries for other hubs carry those hubs' prefixes.  Hubs
    route each spoke's and each other hub's prefixes straight to it.
    Prefix lists keep the sites' order and drop repeats (a leaf-list cannot
    hold a value twice).

Internet access (seed 6.1)
    Sites in ``internet-gateway`` are integrated gateways: NAT on, and
    ``originate-default`` on exactly when routing is dynamic, since that leaf
    announces the default through the routing protocol; with static routing
    the compiler installs the default on the other sites itself.  Every other
    site with a tunnel to a gateway reaches the Internet through the one with
    the smallest id (``via-gateway-site``, ``gateway-peer``); with static
    routing "0.0.0.0/0" is appended to that peer's ``remote-prefix`` (the CE
    model lets a default point only at ``gateway-peer``).  Sites without a
    gateway in reach get role ``none``: they never get a default route.

Keying (seed 3.3, RFC 9061)
    ``ike`` with ``pre-shared-key`` authentication: one key per unordered pair,
    from ``keys/pre-shared-key`` or the KeySource.  ``certificate``: the peer's
    identity from the KeySource as ``peer-identity``, and the CE gets its own
    certificate and key plus the VPN CA as ``ca-certificate`` "vpn-ca"
    (``keys/site-certificate`` and ``keys/ca`` override the KeySource).
    ``ikeless``: ``outbound`` is the SA the CE sends with, ``inbound`` the SA
    it receives with (``keys/ikeless-sa`` overrides both).  The profile's ESP
    ``replay-window``, if set, becomes the IKE-less replay window.

Routing
    ``local-prefix`` as in the database.  ``router-id``: the site's, else the
    first IPv4 prefix's network address + 1 (the address of a /32), else none.
    OSPF VPNs get ``dynamic/protocol`` "ospf" and the VPN's area.

One security strength (seed 7: "a single weak link degrades the whole VPN")
    :class:`CompileError` is raised when a profile proposal, the IKE-less
    suite, an explicit or generated IKE-less SA, or a pre-shared key is weaker
    than the VPN's ``minimum-strength`` (or ``psk-min-length``), and for input
    the CE could not accept: a hub-and-spoke VPN without hub, a site without
    ``ce-address``, an override the profile does not allow, traffic-driven
    tunnels with OSPF or IKE-less keying.  Strength follows the identities of
    ``cevpn-types`` exactly as its ``must`` statements do: a transform is
    strong enough when it is derived from the minimum-strength identity.

IKE-less SA suite (:func:`sa_suite`)
    The first ESP proposal of the profile (by id), else AES-GCM-16-256 without
    separate integrity.  Lifetimes: soft 2x and hard 3x
    ``ikeless-rekey-interval``: the server installs fresh SAs every interval,
    so an SA reaches its soft limit only when a rekey was missed, and traffic
    survives a server outage of two intervals before the hard limit.

Incremental compilation and key material
========================================

Adding a site to an n-site full mesh changes 2n peer entries but the output
holds n^2.  :class:`VpnCompiler` keeps every peer entry with the inputs it
was built from and rebuilds only those whose inputs changed.  The inputs
are compact fingerprints computed once per site and per compile: VPN-level
parameters, the roles and overrides of both ends, the peer's address and
prefixes, the spoke-prefix aggregate (only in a spoke's entry for the
primary hub), whether the entry carries the default route, and the key
material itself.  What is common to many entries is compared once: a
changed VPN fingerprint drops the whole cache, a changed role or override
of a site drops that site's own entries; per entry only (peer fingerprint,
special token, key material) is compared.

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
import copy
import functools
import gc
import hashlib
import ipaddress
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from json.encoder import encode_basestring_ascii
from typing import Any, Literal, Protocol, TypeVar

TYPES_MODULE = "cevpn-types"
DEFAULT_ESP_ENCRYPTION = "cevpn-types:encr-aes-gcm-16-256"
"""The IKE-less suite of a profile without ESP proposal (a choice here, not a YANG default)."""
CA_CERTIFICATE_NAME = "vpn-ca"
IPV4_DEFAULT_ROUTE = "0.0.0.0/0"

_UINT32_MAX = 2**32 - 1

RETRY_LEAVES = ("minimum-wait", "t1", "backoff-factor", "limit")
"""cevpn-types retry-policy, value by value (the site's override on top of the VPN's)."""
_SA_LEAVES = (
    "spi",
    "encryption-algorithm",
    "encryption-key",
    "integrity-algorithm",
    "integrity-key",
    "lifetime",
)

# json.dumps(sort_keys=True, separators=(",", ":")) without building an encoder per call.
_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"))
_encode = _ENCODER.encode


def canonical_json(value: Any) -> str:
    """The canonical form versions are computed over: sorted keys, no blanks, ASCII."""
    return _encode(value)


# --------------------------------------------------------------------------
# Public types
# --------------------------------------------------------------------------


class CompileError(Exception):
    """The VPN cannot be compiled into configurations its CEs would accept."""

    def __init__(self, message: str, vpn: str, site: str | None = None) -> None:
        self.message = message
        self.vpn = vpn
        self.site = site
        where = f"VPN {vpn!r}" + (f", site {site!r}" if site is not None else "")
        super().__init__(f"{where}: {message}")


@dataclass(frozen=True)
class SaSuite:
    """What an IKE-less SA must use: from the VPN's security profile."""

    encryption: str  # identity, e.g. "cevpn-types:encr-aes-gcm-16-256"
    integrity: str | None  # identity or None for AEAD
    soft_seconds: int
    hard_seconds: int


class KeySource(Protocol):
    """Where key material comes from when the VPN's ``keys`` container has none.

    Calls must be cheap look-ups: the compiler asks at every compile so that a
    rotation is always seen.
    """

    def pre_shared_key(self, vpn: str, site_a: str, site_b: str, min_length: int) -> str:
        """The key of the pair, the same whatever the order of a and b."""
        ...

    def ikeless_sa(
        self,
        vpn: str,
        from_site: str,
        to_site: str,
        direction: Literal["outbound", "inbound"],
        suite: SaSuite,
    ) -> dict[str, Any]:
        """The cevpn-types 'ikeless-sa' grouping (RFC 7951 JSON) of traffic from -> to.

        'outbound' is the SA as from_site installs it, 'inbound' as to_site
        installs it; they differ while a rekey is under way.
        """
        ...

    def site_certificate(self, vpn: str, site: str) -> tuple[str, str]:
        """(certificate PEM, private key PEM) of the site's CE."""
        ...

    def ca_certificate(self, vpn: str) -> str:
        """The certificate of the VPN's CA."""
        ...

    def identity(self, vpn: str, site: str) -> str:
        """The identity in the site's certificate, used by its peers as peer-identity."""
        ...


@dataclass(frozen=True)
class CeConfig:
    """One CE's compiled configuration."""

    site: str
    config: dict[str, Any]
    """Content of the "cevpn-ce:ce" object, without "pre-configuration",
    with "configuration-version".  Read-only: shares sub-trees."""
    version: str
    """== config["configuration-version"]: "v" + 16 hex digits of sha256."""


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
# Security strength, read from cevpn-types
# --------------------------------------------------------------------------


@functools.cache
def identity_ancestors() -> Mapping[str, frozenset[str]]:
    """Every cevpn-types identity -> itself and every identity it derives from.

    Keys and values are qualified as in RFC 7951: "cevpn-types:strength-128".
    The table is generated from ``yang/cevpn-types.yang`` with pyang by `make
    bindings` (``bindings/cevpn_identities.py``; tests/test_bindings.py fails
    when it is stale), so it never drifts from the ``must`` statements that use
    ``derived-from-or-self``.  Parsing the YANG at run time instead cost the
    server's first compile seconds of CPU (pyang builds its XPath parser tables).
    """
    from bindings.cevpn_identities import ANCESTORS

    return {name: frozenset(ancestors) for name, ancestors in ANCESTORS.items()}


def identity_ancestors_from_yang() -> dict[str, tuple[str, ...]]:
    """The same table, read from the YANG with pyang (the libyang binding does not
    expose identity derivation): what ``make bindings`` writes."""
    from pyang import context, repository  # type: ignore[import-untyped]

    from nc_core.schema import CEVPN_YANG_DIR, ietf_module_dirs

    path = ":".join(str(d) for d in [CEVPN_YANG_DIR, *ietf_module_dirs()])
    ctx = context.Context(repository.FileRepository(path, use_env=False))
    filename = f"{TYPES_MODULE}.yang"
    module = ctx.add_module(filename, (CEVPN_YANG_DIR / filename).read_text(encoding="utf-8"))
    if module is None:
        raise RuntimeError(f"pyang could not parse {filename}")
    ctx.validate()
    bases: dict[str, list[str]] = {}
    for stmt in module.search("identity"):
        resolved: list[str] = []
        for base in stmt.search("base"):
            ident = getattr(base, "i_identity", None)
            if ident is None:
                raise RuntimeError(f"{filename}: base {base.arg!r} of {stmt.arg!r} unresolved")
            resolved.append(f"{ident.i_module.arg}:{ident.arg}")
        bases[f"{module.arg}:{stmt.arg}"] = resolved

    ancestors: dict[str, frozenset[str]] = {}

    def closure(name: str) -> frozenset[str]:
        known = ancestors.get(name)
        if known is None:
            found = {name}
            for base_name in bases.get(name, ()):
                found |= closure(base_name)
            known = ancestors[name] = frozenset(found)
        return known

    for name in bases:
        closure(name)
    return {name: tuple(sorted(found)) for name, found in sorted(ancestors.items())}


def meets_strength(identity: str, minimum: str) -> bool:
    """True when the transform ``identity`` is at least as strong as ``minimum``.

    The same test as cevpn-types' must statements: derived-from-or-self.
    Raises KeyError for an identity cevpn-types does not define.
    """
    return minimum in identity_ancestors()[identity]


# --------------------------------------------------------------------------
# The VPN entry, read once per compile
# --------------------------------------------------------------------------


@dataclass(slots=True)
class _Site:
    id: str
    ce_address: str
    role: str
    prefixes: tuple[str, ...]
    router_id: str | None
    establishment: str | None
    idle_timeout: int | None
    encapsulation: str | None
    dpd: dict[str, Any]
    retry: dict[str, Any]


@dataclass(slots=True)
class _Vpn:
    id: str
    topology: str
    links: list[tuple[str, str]]
    minimum_strength: str
    authentication: str
    psk_min_length: int
    keying: str
    ike: dict[str, Any]
    esp: dict[str, Any]
    overridable: frozenset[str]
    establishment: str
    idle_timeout: int
    encapsulation: str
    dpd: dict[str, Any]
    retry: dict[str, Any]
    rekey_interval: int
    protocol: str
    ospf_area: str | None
    """The OSPF leaves exist (YANG 'when') only when protocol is ospf."""
    ospf_hello: int | None
    ospf_dead: int | None
    gateways: tuple[str, ...]
    sites: dict[str, _Site]  # by id, in the VPN's order
    keys: dict[str, Any]
    hubs: list[str] = field(default_factory=list)  # sorted


def _parse(vpn: Mapping[str, Any]) -> _Vpn:
    """Read what the compiler needs of a VPN entry as libyang prints it, implicit defaults
    included: cevpn-service is the one source of every default (none is repeated here), and
    a leaf missing where YANG gives it a default is a caller's bug (KeyError)."""
    vpn_id = str(vpn["id"])
    topology = vpn.get("topology", {})
    profile = vpn.get("security-profile", {})
    defaults = vpn.get("tunnel-defaults", {})
    routing = vpn.get("routing", {})

    sites: dict[str, _Site] = {}
    seen_addresses: dict[str, str] = {}
    for raw in vpn.get("site", []):
        site_id = str(raw["id"])
        address = raw.get("ce-address")
        if not address:
            raise CompileError("the site has no ce-address", vpn_id, site_id)
        if address in seen_addresses:
            raise CompileError(
                f"ce-address {address} is also the address of site {seen_addresses[address]!r}",
                vpn_id,
                site_id,
            )
        seen_addresses[address] = site_id
        overrides = raw.get("overrides", {})
        sites[site_id] = _Site(
            id=site_id,
            ce_address=str(address),
            role=str(raw["role"]),
            prefixes=tuple(raw.get("local-prefix", ())),
            router_id=raw.get("router-id"),
            establishment=overrides.get("establishment"),
            idle_timeout=overrides.get("idle-timeout"),
            encapsulation=overrides.get("encapsulation"),
            dpd=dict(overrides.get("dpd", {})),
            retry=dict(overrides.get("retry-policy", {})),
        )

    links: list[tuple[str, str]] = []
    for link in topology.get("link", []):
        links.append((str(link["site-a"]), str(link["site-b"])))

    model = _Vpn(
        id=vpn_id,
        topology=str(topology["type"]),
        links=links,
        minimum_strength=str(profile["minimum-strength"]),
        authentication=str(profile["authentication"]),
        psk_min_length=int(profile["psk-min-length"]),
        keying=str(vpn["keying"]),
        ike=copy.deepcopy(dict(profile.get("ike", {}))),
        esp=copy.deepcopy(dict(profile.get("esp", {}))),
        overridable=frozenset(profile.get("site-overridable", ())),
        establishment=str(defaults["establishment"]),
        idle_timeout=int(defaults["idle-timeout"]),
        encapsulation=str(defaults["encapsulation"]),
        dpd=dict(defaults["dpd"]),
        retry=dict(defaults["retry-policy"]),
        rekey_interval=int(defaults["ikeless-rekey-interval"]),
        protocol=str(routing["protocol"]),
        ospf_area=_optional(routing.get("ospf-area"), str),
        ospf_hello=_optional(routing.get("ospf-hello-interval"), int),
        ospf_dead=_optional(routing.get("ospf-dead-interval"), int),
        gateways=tuple(vpn.get("internet-gateway", ())),
        sites=sites,
        keys=dict(vpn.get("keys", {})),
    )
    model.hubs = sorted(s.id for s in sites.values() if s.role == "hub")
    if model.topology == "hub-and-spoke" and not model.hubs:
        raise CompileError("a hub-and-spoke VPN needs at least one site with role 'hub'", vpn_id)
    for gateway in model.gateways:
        if gateway not in sites:
            raise CompileError(f"internet-gateway {gateway!r} is not a site of the VPN", vpn_id)
    _check_overrides(model)
    return model


T = TypeVar("T")


def _optional(value: Any, kind: Callable[[Any], T]) -> T | None:
    return None if value is None else kind(value)


def _check_overrides(m: _Vpn) -> None:
    """Refuse overrides the profile does not allow: they would silently change the profile."""
    for site in m.sites.values():
        wanted = {
            "establishment": site.establishment is not None or site.idle_timeout is not None,
            "encapsulation": site.encapsulation is not None,
            "dpd": bool(site.dpd),
            "retry-policy": bool(site.retry),
        }
        for what, present in wanted.items():
            if present and what not in m.overridable:
                raise CompileError(
                    f"the security profile does not let sites override {what!r}", m.id, site.id
                )


# --------------------------------------------------------------------------
# Topology
# --------------------------------------------------------------------------


def _sorted_pairs(m: _Vpn) -> list[tuple[str, str]]:
    """Every tunnel as (smaller id, larger id), in lexicographic order.

    Walking this list and appending each end to the other's peer list gives
    every site its peers already sorted by name.
    """
    ids = sorted(m.sites)
    if m.topology == "full-mesh":
        return [(a, b) for i, a in enumerate(ids) for b in ids[i + 1 :]]
    if m.topology == "hub-and-spoke":
        hubs = set(m.hubs)
        pairs: list[tuple[str, str]] = []
        for i, a in enumerate(ids):
            if a in hubs:
                pairs.extend((a, b) for b in ids[i + 1 :])
            else:
                pairs.extend((a, b) for b in ids[i + 1 :] if b in hubs)
        return pairs
    if m.topology == "explicit":
        unique: set[tuple[str, str]] = set()
        for a, b in m.links:
            for end in (a, b):
                if end not in m.sites:
                    raise CompileError(f"topology link names unknown site {end!r}", m.id)
            if a == b:
                raise CompileError(f"topology link joins site {a!r} to itself", m.id)
            unique.add((a, b) if a < b else (b, a))
        return sorted(unique)
    raise CompileError(f"unknown topology type {m.topology!r}", m.id)


def tunnel_pairs(vpn: Mapping[str, Any]) -> set[tuple[str, str]]:
    """The VPN's tunnels as (site, site) pairs, each pair sorted."""
    return set(_sorted_pairs(_parse(vpn)))


# --------------------------------------------------------------------------
# VPN-level checks and the IKE-less suite
# --------------------------------------------------------------------------


def _require_strength(m: _Vpn, identity: Any, what: str, site: str | None = None) -> None:
    table = identity_ancestors()
    ancestors = table.get(str(identity))
    if ancestors is None:
        raise CompileError(f"{what}: unknown algorithm {identity!r}", m.id, site)
    if m.minimum_strength not in ancestors:
        raise CompileError(
            f"{what}: {identity} is weaker than the VPN's minimum-strength "
            f"{m.minimum_strength} (every tunnel must have the same strength, seed 7)",
            m.id,
            site,
        )


_PROPOSAL_LEAVES = {
    "ike": ("encryption", "prf", "integrity", "dh-group"),
    "esp": ("encryption", "integrity", "pfs-group"),
}


def _check_vpn_strength(m: _Vpn) -> None:
    strength_root = f"{TYPES_MODULE}:security-strength"
    known = identity_ancestors().get(m.minimum_strength)
    if known is None or strength_root not in known:
        raise CompileError(f"unknown minimum-strength {m.minimum_strength!r}", m.id)
    for section, leaves in _PROPOSAL_LEAVES.items():
        source = m.ike if section == "ike" else m.esp
        for proposal in source.get("proposal", []):
            for leaf in leaves:
                value = proposal.get(leaf)
                if value is not None:
                    _require_strength(
                        m, value, f"security-profile {section} proposal {proposal.get('id')} {leaf}"
                    )


def _suite(m: _Vpn) -> SaSuite:
    proposals = sorted(m.esp.get("proposal", []), key=lambda p: int(p.get("id", 0)))
    if proposals:
        encryption = str(proposals[0]["encryption"])
        integrity = proposals[0].get("integrity")
    else:
        encryption, integrity = DEFAULT_ESP_ENCRYPTION, None
    soft = min(2 * m.rekey_interval, _UINT32_MAX - 1)
    hard = min(3 * m.rekey_interval, _UINT32_MAX)
    return SaSuite(encryption, None if integrity is None else str(integrity), soft, hard)


def sa_suite(vpn: Mapping[str, Any]) -> SaSuite:
    """The suite IKE-less SAs of this VPN must use (first ESP proposal, lifetimes 2x/3x)."""
    return _suite(_parse(vpn))


def _sa_leaves(sa: Mapping[str, Any]) -> dict[str, Any]:
    """Only the 'ikeless-sa' grouping's leaves, copied (keys/ikeless-sa also has 'created')."""
    out: dict[str, Any] = {}
    for leaf in _SA_LEAVES:
        value = sa.get(leaf)
        if value is not None:
            out[leaf] = dict(value) if leaf == "lifetime" else value
    return out


def _check_sa(m: _Vpn, sa: Mapping[str, Any], what: str, site: str | None = None) -> None:
    if "encryption-algorithm" not in sa:
        raise CompileError(f"{what}: no encryption-algorithm", m.id, site)
    _require_strength(m, sa["encryption-algorithm"], f"{what} encryption-algorithm", site)
    if sa.get("integrity-algorithm") is not None:
        _require_strength(m, sa["integrity-algorithm"], f"{what} integrity-algorithm", site)


# --------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------


def _fingerprint(value: Any) -> bytes:
    """A short digest of a value made of str/int/bool/None/tuples (repr is deterministic)."""
    return hashlib.blake2b(repr(value).encode(), digest_size=16).digest()


@functools.lru_cache(maxsize=65536)
def _derived_router_id(prefixes: tuple[str, ...]) -> str | None:
    for prefix in prefixes:
        network = ipaddress.ip_network(prefix, strict=False)
        if isinstance(network, ipaddress.IPv4Network):
            base = network.network_address
            if network.prefixlen == 32 or int(base) == 0xFFFFFFFF:
                return str(base)
            return str(base + 1)
    return None


def _unique(values: Sequence[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(values))


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


_Record = tuple[str, tuple[Any, ...], dict[str, Any], bytes]
"""A cached peer entry: (peer name, the inputs it was built from, entry, canonical JSON)."""


@dataclass(slots=True)
class _SiteMemo:
    """A site's last result, reused when its frame and peer entries are unchanged."""

    frame: tuple[bytes, bytes]
    datas: list[bytes]
    result: CeConfig


@dataclass(slots=True)
class _VpnCache:
    """What one compile of a VPN leaves for the next."""

    vpn_fp: bytes
    ends_fp: dict[str, bytes]
    records: dict[str, dict[str, _Record]]  # site -> peer -> record
    memos: dict[str, _SiteMemo]


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
        self.peer_builds = 0
        """Peer entries actually built (not reused), over the compiler's life."""
        self._cache: dict[str, _VpnCache] = {}

    def forget(self, vpn_id: str) -> None:
        """Drop the cache of a VPN (when it is deleted)."""
        self._cache.pop(vpn_id, None)

    def compile(self, vpn: Mapping[str, Any]) -> dict[str, CeConfig]:
        """One CeConfig per site of ``vpn``, by site id in sorted order.

        The cache is replaced only when the whole VPN compiled, so a
        CompileError leaves the previous state for the next attempt.
        """
        run = _Run(self, _parse(vpn))
        cache, results = run.execute(self._cache.get(run.m.id))
        self._cache[run.m.id] = cache
        return results


def compile_vpn(vpn: Mapping[str, Any], keys: KeySource) -> dict[str, CeConfig]:
    """Compile once, without keeping a cache."""
    return VpnCompiler(keys).compile(vpn)


class _Run:
    """One compile of one VPN: per-site fingerprints, then every pair, then every site."""

    def __init__(self, owner: VpnCompiler, m: _Vpn) -> None:
        self.owner = owner
        self.keys = owner.keys
        self.m = m
        _check_vpn_strength(m)
        self.suite = _suite(m)
        self.ospf = m.protocol == "ospf"
        self.replay_window = m.esp.get("replay-window")
        if m.keying == "ikeless":
            _check_sa(m, {"encryption-algorithm": self.suite.encryption}, "IKE-less suite")
            if self.suite.integrity is not None:
                _require_strength(m, self.suite.integrity, "IKE-less suite integrity")

        # Everything a peer entry depends on at VPN level.
        self.vpn_fp = _fingerprint(
            (
                m.id,
                m.topology,
                m.keying,
                m.authentication,
                m.psk_min_length,
                m.minimum_strength,
                m.establishment,
                m.idle_timeout,
                m.encapsulation,
                m.protocol,
                self.replay_window,
                self.suite,
            )
        )
        sites = m.sites
        # Per end: what decides the pair's tunnel parameters.
        self.ends_fp = {
            s.id: _fingerprint((s.role, s.establishment, s.idle_timeout, s.encapsulation))
            for s in sites.values()
        }
        # Per peer: what the entry shows of the peer, and its end of the negotiation.
        self.peer_fp = {
            s.id: _fingerprint(
                (s.ce_address, s.prefixes, s.role, s.establishment, s.idle_timeout, s.encapsulation)
            )
            for s in sites.values()
        }
        self.address = {s.id: s.ce_address for s in sites.values()}
        self.keying_leaf: str | None = None
        if m.keying != "ikeless":
            certificate = m.authentication == "certificate"
            self.keying_leaf = "peer-identity" if certificate else "pre-shared-key"
        self.keying_prefix = f'{{"ike":{{"{self.keying_leaf}":'

        # Hub-and-spoke static routing: the primary hub carries spoke-to-spoke traffic.
        self.primary_hub: dict[str, str] = {}
        self.spoke_prefixes: list[tuple[str, tuple[str, ...]]] = []
        self.agg_fp = b""
        if m.topology == "hub-and-spoke" and not self.ospf:
            primary = m.hubs[0]
            self.spoke_prefixes = [(s.id, s.prefixes) for s in sites.values() if s.role != "hub"]
            self.primary_hub = {sid: primary for sid, _ in self.spoke_prefixes}
            self.agg_fp = _fingerprint(tuple(self.spoke_prefixes))

        self.gateway_peer = self._gateway_choice()
        # site -> {peer: token} for the few entries that carry more than the peer's
        # prefixes: the primary hub's (the spoke aggregate) and the gateway's (default).
        self.special: dict[str, dict[str, tuple[bytes | None, bool]]] = {}
        for spoke, hub in self.primary_hub.items():
            self.special.setdefault(spoke, {})[hub] = (self.agg_fp, False)
        for site_id, gateway in self.gateway_peer.items():
            tokens = self.special.setdefault(site_id, {})
            tokens[gateway] = (tokens.get(gateway, (None, False))[0], True)

        self.own_prefixes = {s.id: _unique(s.prefixes) for s in sites.values()}
        self.overriding = {
            s.id
            for s in sites.values()
            if s.establishment is not None
            or s.idle_timeout is not None
            or s.encapsulation is not None
        }
        self.default_parameters: tuple[str, int | None, str] = (
            m.establishment,
            m.idle_timeout if m.establishment == "traffic-driven" else None,
            m.encapsulation,
        )
        self.tunnels: dict[tuple[Any, ...], tuple[dict[str, Any], str]] = {}
        self.plain_tunnels: dict[str, tuple[dict[str, Any], str]] = {}
        self._explicit_keys()

    # -- inputs ------------------------------------------------------------

    def _gateway_choice(self) -> dict[str, str]:
        """site -> the gateway it reaches the Internet through (smallest id in reach)."""
        m = self.m
        gateways = sorted(set(m.gateways))
        if not gateways:
            return {}
        choice: dict[str, str] = {}
        if m.topology == "explicit":
            linked: dict[str, set[str]] = {}
            for a, b in m.links:
                linked.setdefault(a, set()).add(b)
                linked.setdefault(b, set()).add(a)
        for site in m.sites.values():
            if site.id in m.gateways:
                continue
            for gateway in gateways:
                if m.topology == "full-mesh":
                    reachable = True
                elif m.topology == "hub-and-spoke":
                    reachable = site.role == "hub" or m.sites[gateway].role == "hub"
                else:
                    reachable = gateway in linked.get(site.id, set())
                if reachable:
                    choice[site.id] = gateway
                    break
        return choice

    def _explicit_keys(self) -> None:
        m = self.m
        self.explicit_psk: dict[tuple[str, str], str] = {}
        for item in m.keys.get("pre-shared-key", []):
            a, b = str(item["site-a"]), str(item["site-b"])
            key = str(item["key"])
            if len(key) < m.psk_min_length:
                raise CompileError(
                    f"keys/pre-shared-key of {a!r} and {b!r} is shorter than "
                    f"psk-min-length {m.psk_min_length}",
                    m.id,
                )
            self.explicit_psk[(a, b) if a < b else (b, a)] = key
        self.explicit_sa: dict[tuple[str, str], dict[str, Any]] = {}
        for item in m.keys.get("ikeless-sa", []):
            sa = _sa_leaves(item)
            pair = (str(item["from-site"]), str(item["to-site"]))
            _check_sa(m, sa, f"keys/ikeless-sa from {pair[0]!r} to {pair[1]!r}")
            self.explicit_sa[pair] = sa
        self.explicit_certs: dict[str, tuple[str, str | None]] = {
            str(item["site"]): (str(item["certificate"]), item.get("private-key"))
            for item in m.keys.get("site-certificate", [])
        }
        self.explicit_ca: str | None = m.keys.get("ca", {}).get("certificate")

    def _sa(self, src: str, dst: str, direction: Literal["outbound", "inbound"]) -> dict[str, Any]:
        explicit = self.explicit_sa.get((src, dst))
        if explicit is not None:
            return explicit
        return _sa_leaves(self.keys.ikeless_sa(self.m.id, src, dst, direction, self.suite))

    # -- one peer entry ----------------------------------------------------

    def _pair_parameters(self, a: _Site, b: _Site) -> tuple[str, int | None, str]:
        """(establishment, idle-timeout or None, encapsulation), the same at both ends."""
        if a.id not in self.overriding and b.id not in self.overriding:
            return self.default_parameters
        first, second = sorted((a, b), key=lambda s: (s.role != "hub", s.id))
        m = self.m
        establishment = first.establishment or second.establishment or m.establishment
        encapsulation = first.encapsulation or second.encapsulation or m.encapsulation
        idle: int | None = None
        if establishment == "traffic-driven":
            idle = first.idle_timeout or second.idle_timeout or m.idle_timeout
        return establishment, idle, encapsulation

    def _remote_prefixes(self, me: str, peer: str) -> tuple[str, ...]:
        if peer not in self.special.get(me, ()):
            return self.own_prefixes[peer]
        prefixes: list[str] = list(self.m.sites[peer].prefixes)
        if self.primary_hub.get(me) == peer:
            for spoke, own in self.spoke_prefixes:
                if spoke != me:
                    prefixes.extend(own)
        if self.gateway_peer.get(me) == peer:
            prefixes.append(IPV4_DEFAULT_ROUTE)
        return _unique(prefixes)

    def _tunnel(self, me: str, peer: str) -> tuple[dict[str, Any], str]:
        """me's tunnel container for peer and the canonical JSON of the rest of the entry.

        Identical containers are shared: in a full mesh without overrides every
        site sees the same container for a given peer.
        """
        plain = (
            me not in self.overriding
            and peer not in self.overriding
            and peer not in self.special.get(me, ())
        )
        if plain:
            known = self.plain_tunnels.get(peer)
            if known is not None:
                return known
        m = self.m
        establishment, idle, encapsulation = self._pair_parameters(m.sites[me], m.sites[peer])
        if self.ospf and (establishment != "permanent" or encapsulation != "transport-ipip"):
            raise CompileError(
                f"the tunnel to {peer!r} is {establishment} with {encapsulation}: OSPF through "
                "the tunnels needs permanent transport-ipip tunnels (seed 3.4, 4.3)",
                m.id,
                me,
            )
        if m.keying == "ikeless" and establishment != "permanent":
            raise CompileError(
                f"the tunnel to {peer!r} is traffic-driven: IKE-less SAs are always permanent",
                m.id,
                me,
            )
        remote = () if self.ospf else self._remote_prefixes(me, peer)
        key = (peer, establishment, idle, encapsulation, remote)
        known = self.tunnels.get(key)
        if known is None:
            tunnel: dict[str, Any] = {"establishment": establishment}
            if idle is not None:
                tunnel["idle-timeout"] = idle
            tunnel["encapsulation"] = encapsulation
            tunnel["dynamic-routing"] = self.ospf
            if remote:
                tunnel["remote-prefix"] = list(remote)
            # Entry keys sort as: ike|ikeless < name < sp-address < tunnel.
            tail = (
                f',"name":{encode_basestring_ascii(peer)}'
                f',"sp-address":{encode_basestring_ascii(m.sites[peer].ce_address)}'
                f',"tunnel":{_encode(tunnel)}}}'
            )
            known = self.tunnels[key] = (tunnel, tail)
        if plain:
            self.plain_tunnels[peer] = known
        return known

    def _build(self, me: str, peer: str, inputs: tuple[Any, ...]) -> _Record:
        """Build me's entry for peer; ``inputs`` ends with the key material."""
        self.owner.peer_builds += 1
        material = inputs[-1]
        tunnel, tail = self._tunnel(me, peer)
        keying: dict[str, Any]
        if self.keying_leaf is None:  # IKE-less
            outbound, inbound = material
            _check_sa(self.m, outbound, f"outbound SA to {peer!r}", me)
            _check_sa(self.m, inbound, f"inbound SA from {peer!r}", me)
            keying = {"outbound": outbound, "inbound": inbound}
            if self.replay_window is not None:
                keying["replay-window"] = self.replay_window
            entry = {"name": peer, "sp-address": self.address[peer], "tunnel": tunnel}
            entry["ikeless"] = keying
            data = f'{{"ikeless":{_encode(keying)}{tail}'
        else:
            keying = {self.keying_leaf: material}
            entry = {"name": peer, "sp-address": self.address[peer], "tunnel": tunnel}
            entry["ike"] = keying
            data = f"{self.keying_prefix}{encode_basestring_ascii(material)}}}{tail}"
        return peer, inputs, entry, data.encode()

    def _material(self) -> Callable[[str, str], tuple[Any, Any]]:
        """pair -> (material for a's entry of b, material for b's entry of a)."""
        m = self.m
        if m.keying == "ikeless":

            def ikeless(a: str, b: str) -> tuple[Any, Any]:
                return (
                    (self._sa(a, b, "outbound"), self._sa(b, a, "inbound")),
                    (self._sa(b, a, "outbound"), self._sa(a, b, "inbound")),
                )

            return ikeless
        if m.authentication == "certificate":
            identity = {s: self.keys.identity(m.id, s) for s in m.sites}

            def certificate(a: str, b: str) -> tuple[Any, Any]:
                return identity[b], identity[a]

            return certificate

        explicit, source = self.explicit_psk, self.keys.pre_shared_key
        vpn_id, min_length = m.id, m.psk_min_length

        def psk(a: str, b: str) -> tuple[Any, Any]:
            key = explicit.get((a, b)) if explicit else None
            if key is None:
                key = source(vpn_id, a, b, min_length)
                if len(key) < min_length:
                    raise CompileError(
                        f"the key source's pre-shared key of {a!r} and {b!r} is shorter "
                        f"than psk-min-length {min_length}",
                        vpn_id,
                    )
            return key, key

        return psk

    # -- the whole VPN -----------------------------------------------------

    def execute(self, old: _VpnCache | None) -> tuple[_VpnCache, dict[str, CeConfig]]:
        """Visit every pair once, reusing or building both directions' entries, then every site.

        An entry's per-entry inputs are (peer fingerprint, special token, key
        material); what is common to a whole VPN or to one end is compared
        once: a changed VPN fingerprint drops the whole cache, a changed end
        fingerprint drops that site's entries.
        """
        m = self.m
        material_of = self._material()
        peer_fp = self.peer_fp
        no_records: dict[str, _Record] = {}
        no_tokens: dict[str, tuple[bytes | None, bool]] = {}
        old_records = old.records if old is not None and old.vpn_fp == self.vpn_fp else {}
        records: dict[str, list[_Record]] = {}
        # site -> (its old records by peer, append to its new records, its special tokens)
        state: dict[str, tuple[dict[str, _Record], Callable[[_Record], None], dict[str, Any]]] = {}
        for site_id in m.sites:
            mine = old_records.get(site_id, no_records)
            if old is None or old.ends_fp.get(site_id) != self.ends_fp[site_id]:
                mine = no_records
            records[site_id] = []
            state[site_id] = (
                mine,
                records[site_id].append,
                self.special.get(site_id, no_tokens),
            )

        build = self._build
        pairs = _sorted_pairs(m)
        with _collector_paused(len(pairs)):
            for a, b in pairs:
                for_a, for_b = material_of(a, b)
                # Both directions written out: this runs n^2/2 times in a full mesh.
                mine, append, tokens = state[a]
                inputs = (peer_fp[b], tokens.get(b), for_a)
                record = mine.get(b)
                if record is None or record[1] != inputs:
                    record = build(a, b, inputs)
                append(record)
                mine, append, tokens = state[b]
                inputs = (peer_fp[a], tokens.get(a), for_b)
                record = mine.get(a)
                if record is None or record[1] != inputs:
                    record = build(b, a, inputs)
                append(record)

        results: dict[str, CeConfig] = {}
        memos: dict[str, _SiteMemo] = {}
        old_memos = old.memos if old is not None else {}
        ca = self._ca()
        for site_id in sorted(m.sites):
            top = self._top(m.sites[site_id], ca)
            frame = _frame(top)
            site_records = records[site_id]
            datas = [r[3] for r in site_records]
            memo = old_memos.get(site_id)
            if memo is None or memo.frame != frame or memo.datas != datas:
                entries = [r[2] for r in site_records]
                memo = _SiteMemo(frame, datas, _assemble(site_id, top, entries, frame, datas))
            memos[site_id] = memo
            results[site_id] = memo.result
        cache = _VpnCache(
            vpn_fp=self.vpn_fp,
            ends_fp=self.ends_fp,
            records={s: {r[0]: r for r in rs} for s, rs in records.items()},
            memos=memos,
        )
        return cache, results

    # -- CE top level ------------------------------------------------------

    def _ca(self) -> str | None:
        m = self.m
        if m.keying != "ike" or m.authentication != "certificate":
            return None
        return self.explicit_ca or self.keys.ca_certificate(m.id)

    def _top(self, site: _Site, ca: str | None) -> dict[str, Any]:
        """Every top-level section of the site's configuration except "peer"."""
        m = self.m
        top: dict[str, Any] = {"minimum-strength": m.minimum_strength}

        dpd = {
            "delay": site.dpd.get("delay", m.dpd["delay"]),
            "timeout": site.dpd.get("timeout", m.dpd["timeout"]),
        }
        sa_defaults: dict[str, Any] = {"ike": {**m.ike, "dpd": dpd}}
        if m.esp:
            sa_defaults["esp"] = m.esp
        top["sa-defaults"] = sa_defaults

        retry = {leaf: site.retry.get(leaf, m.retry[leaf]) for leaf in RETRY_LEAVES}
        if int(retry["t1"]) < int(retry["minimum-wait"]) or int(retry["limit"]) < int(retry["t1"]):
            raise CompileError(
                "retry-policy needs minimum-wait <= t1 <= limit "
                f"(got {retry['minimum-wait']}, {retry['t1']}, {retry['limit']})",
                m.id,
                site.id,
            )
        top["retry-policy"] = retry

        if ca is not None:
            certificate, private_key = self._site_certificate(site.id)
            certificates: dict[str, Any] = {
                "certificate": certificate,
                "ca-certificate": [{"name": CA_CERTIFICATE_NAME, "certificate": ca}],
            }
            if private_key:
                certificates["private-key"] = private_key
            else:
                # Certified from the CE's own request: its private key stays on the CE.
                certificates["key-origin"] = "ce"
            top["certificates"] = certificates

        routing: dict[str, Any] = {}
        router_id = site.router_id or _derived_router_id(site.prefixes)
        if router_id is not None:
            routing["router-id"] = router_id
        if site.prefixes:
            routing["local-prefix"] = list(site.prefixes)
        if self.ospf:
            # Given explicitly: the CE's defaults are its model's business, not the VPN's.
            ospf = {
                "area": m.ospf_area,
                "hello-interval": m.ospf_hello,
                "dead-interval": m.ospf_dead,
            }
            routing["dynamic"] = {"protocol": "ospf", "ospf": ospf}
        else:
            routing["dynamic"] = {"protocol": m.protocol}
        top["routing"] = routing

        if site.id in m.gateways:
            internet: dict[str, Any] = {
                "role": "integrated-gateway",
                "integrated-gateway": {"nat": True, "originate-default": self.ospf},
            }
        elif site.id in self.gateway_peer:
            internet = {"role": "via-gateway-site", "gateway-peer": self.gateway_peer[site.id]}
        else:
            internet = {"role": "none"}
        top["internet-access"] = internet
        return top

    def _site_certificate(self, site: str) -> tuple[str, str]:
        explicit = self.explicit_certs.get(site)
        if explicit is None:
            return self.keys.site_certificate(self.m.id, site)
        certificate, private_key = explicit
        if private_key is None:
            raise CompileError(
                "keys/site-certificate has no private-key: cevpn-ce needs the CE's key "
                "next to its certificate",
                self.m.id,
                site,
            )
        return certificate, str(private_key)


def _frame(top: Mapping[str, Any]) -> tuple[bytes, bytes]:
    """The canonical JSON of the configuration around the peer list: (head, tail)."""
    before = {k: v for k, v in top.items() if k < "peer"}
    after = {k: v for k, v in top.items() if k > "peer"}
    head = _encode(before)[:-1] + ("," if before else "") + '"peer":['
    tail = "]" + ("," if after else "") + _encode(after)[1:]
    return head.encode(), tail.encode()


def _assemble(
    site: str,
    top: dict[str, Any],
    peers: list[dict[str, Any]],
    frame: tuple[bytes, bytes],
    datas: list[bytes],
) -> CeConfig:
    """The site's configuration and its version: sha256 over the canonical JSON."""
    if datas:
        digest = hashlib.sha256(frame[0])
        digest.update(b",".join(datas))
        digest.update(frame[1])
    else:
        digest = hashlib.sha256(_encode(top).encode())
    version = "v" + digest.hexdigest()[:16]
    config: dict[str, Any] = {"configuration-version": version}
    for key, value in top.items():
        if key == "routing" and peers:
            config["peer"] = peers
        config[key] = value
    if peers and "peer" not in config:
        config["peer"] = peers
    return CeConfig(site=site, config=config, version=version)


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
