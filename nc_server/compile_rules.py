"""The compiler's rules: what one VPN of the VPN database means for each of its CEs.

This module holds the pure half of :mod:`nc_server.compiler`: reading a
``cevpn-service`` ``vpn`` entry (RFC 7951 JSON as libyang prints it, implicit
defaults included) into named records, and the rules that turn those records
into one peer entry or one site's top-level sections of a ``cevpn-ce``
configuration.  It remembers nothing from one compile to the next, so every
rule can be read, tested and changed without thinking about caching; the
incremental engine (:mod:`nc_server.compile_cache`) decides which rules to
apply again.  It does no I/O except reading the ``cevpn-types`` identities
once per process (see :func:`identity_ancestors`); key material comes from a
:class:`KeySource`.

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

Canonical JSON
    A site's version is computed over the digests of the canonical JSON of
    its configuration's parts (:func:`canonical_json`, :func:`section_digest`;
    how, in :mod:`nc_server.compile_cache`).  A peer entry is written in that
    form here, as it is built, and only its digest is kept
    (:class:`PeerEntry`): the encoded tunnel container is shared between
    entries exactly like the container itself, and encoding it once per
    distinct tunnel instead of once per entry is what keeps a 1,000-site
    mesh affordable.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import ipaddress
import json
from collections.abc import Callable, Hashable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from json.encoder import encode_basestring_ascii
from typing import Any, Generic, Literal, Protocol, TypeVar

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
_sha256 = hashlib.sha256


def _digest(canonical: str) -> bytes:
    """sha256 of canonical JSON text: the one digest versions are made of."""
    return _sha256(canonical.encode()).digest()


def canonical_json(value: Any) -> str:
    """The canonical form versions are computed over: sorted keys, no blanks, ASCII."""
    return _encode(value)


def section_digest(value: Any) -> bytes:
    """sha256 of ``value``'s canonical JSON: what a site's version is made of."""
    return _digest(_encode(value))


# --------------------------------------------------------------------------
# Vocabulary shared with the engine and the callers
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

    Calls must be cheap look-ups.  A compile asks for the material of every
    entry it builds, and of every pair :meth:`changed_pairs` names; the
    material of any other pair is taken to be what the last compile got.
    """

    def material_mark(self, vpn: str) -> Hashable:
        """A token for the VPN's key material as it is now, to give :meth:`changed_pairs`."""
        ...

    def changed_pairs(self, vpn: str, mark: Hashable) -> AbstractSet[tuple[str, str]] | None:
        """Pairs (smaller id first) whose entry material changed since ``mark`` was taken:
        a pre-shared key, an IKE-less SA either way, or an identity of either end.

        None when the source cannot tell (it lost track, or ``mark`` is too old): then
        every pair is asked again.  Material a call made (get-or-create) may be named
        too: it is asked again, which is harmless.
        """
        ...

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
# The VPN entry as named records, read once per compile
# --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Site:
    """One ``site`` entry: what the rules read of it."""

    id: str
    ce_address: str
    role: str
    prefixes: tuple[str, ...]
    router_id: str | None
    establishment: str | None
    """Override, None when the site has none (likewise the next two)."""
    idle_timeout: int | None
    encapsulation: str | None
    dpd: dict[str, Any]
    """Overridden DPD leaves only."""
    retry: dict[str, Any]
    """Overridden retry-policy leaves only."""

    @property
    def overrides_tunnel(self) -> bool:
        """True when the site overrides a parameter both ends of its tunnels negotiate."""
        return (
            self.establishment is not None
            or self.idle_timeout is not None
            or self.encapsulation is not None
        )


@dataclass(frozen=True, slots=True)
class Link:
    """One ``topology/link`` entry of an explicit topology."""

    site_a: str
    site_b: str


@dataclass(frozen=True, slots=True)
class Vpn:
    """One ``vpn`` entry: what the rules read of it."""

    id: str
    topology: str
    links: tuple[Link, ...]
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
    sites: dict[str, Site]
    """By id, in the VPN's order."""
    keys: dict[str, Any]
    hubs: tuple[str, ...]
    """Sorted."""


def parse_vpn(vpn: Mapping[str, Any]) -> Vpn:
    """Read what the compiler needs of a VPN entry as libyang prints it, implicit defaults
    included: cevpn-service is the one source of every default (none is repeated here), and
    a leaf missing where YANG gives it a default is a caller's bug (KeyError)."""
    vpn_id = str(vpn["id"])
    topology = vpn.get("topology", {})
    profile = vpn.get("security-profile", {})
    defaults = vpn.get("tunnel-defaults", {})
    routing = vpn.get("routing", {})

    sites = _parse_sites(vpn_id, vpn.get("site", []))
    hubs = tuple(sorted(s.id for s in sites.values() if s.role == "hub"))
    model = Vpn(
        id=vpn_id,
        topology=str(topology["type"]),
        links=tuple(Link(str(k["site-a"]), str(k["site-b"])) for k in topology.get("link", [])),
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
        hubs=hubs,
    )
    if model.topology == "hub-and-spoke" and not model.hubs:
        raise CompileError("a hub-and-spoke VPN needs at least one site with role 'hub'", vpn_id)
    for gateway in model.gateways:
        if gateway not in sites:
            raise CompileError(f"internet-gateway {gateway!r} is not a site of the VPN", vpn_id)
    _check_overrides(model)
    return model


def _parse_sites(vpn_id: str, entries: Sequence[Mapping[str, Any]]) -> dict[str, Site]:
    """The ``site`` list by id, refusing what no CE could be given (no or a shared address)."""
    sites: dict[str, Site] = {}
    seen_addresses: dict[str, str] = {}
    for raw in entries:
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
        sites[site_id] = Site(
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
    return sites


T = TypeVar("T")


def _optional(value: Any, kind: Callable[[Any], T]) -> T | None:
    return None if value is None else kind(value)


def _check_overrides(m: Vpn) -> None:
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


def sorted_pairs(m: Vpn) -> list[tuple[str, str]]:
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
        for link in m.links:
            a, b = link.site_a, link.site_b
            for end in (a, b):
                if end not in m.sites:
                    raise CompileError(f"topology link names unknown site {end!r}", m.id)
            if a == b:
                raise CompileError(f"topology link joins site {a!r} to itself", m.id)
            unique.add((a, b) if a < b else (b, a))
        return sorted(unique)
    raise CompileError(f"unknown topology type {m.topology!r}", m.id)


def partners(m: Vpn, site: str) -> list[str] | None:
    """The sites ``site`` has a tunnel with, in the VPN's order, exactly as :func:`sorted_pairs`
    pairs them; None for an explicit topology, whose pairs only its links say (and check)."""
    if m.topology == "full-mesh":
        return [other for other in m.sites if other != site]
    if m.topology == "hub-and-spoke":
        if m.sites[site].role == "hub":
            return [other for other in m.sites if other != site]
        return [hub for hub in m.hubs if hub != site]
    return None


def paired(m: Vpn, a: str, b: str) -> bool:
    """Whether sites a and b have a tunnel, for the topologies :func:`partners` knows."""
    if a == b:
        return False
    if m.topology == "hub-and-spoke":
        return m.sites[a].role == "hub" or m.sites[b].role == "hub"
    return m.topology == "full-mesh"


def tunnel_pairs(vpn: Mapping[str, Any]) -> set[tuple[str, str]]:
    """The VPN's tunnels as (site, site) pairs, each pair sorted."""
    return set(sorted_pairs(parse_vpn(vpn)))


def gateway_choice(m: Vpn) -> dict[str, str]:
    """site -> the gateway it reaches the Internet through (smallest id in reach)."""
    gateways = sorted(set(m.gateways))
    if not gateways:
        return {}
    linked: dict[str, set[str]] = {}
    for link in m.links if m.topology == "explicit" else ():
        linked.setdefault(link.site_a, set()).add(link.site_b)
        linked.setdefault(link.site_b, set()).add(link.site_a)
    choice: dict[str, str] = {}
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


# --------------------------------------------------------------------------
# VPN-level checks and the IKE-less suite
# --------------------------------------------------------------------------


def require_strength(m: Vpn, identity: Any, what: str, site: str | None = None) -> None:
    """Refuse a transform weaker than the VPN's minimum-strength, or one cevpn-types lacks."""
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


def check_vpn_strength(m: Vpn) -> None:
    """The minimum-strength is a strength, and every profile proposal meets it."""
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
                    require_strength(
                        m, value, f"security-profile {section} proposal {proposal.get('id')} {leaf}"
                    )


def ikeless_suite(m: Vpn) -> SaSuite:
    """The suite of the VPN's IKE-less SAs: its first ESP proposal, lifetimes 2x/3x."""
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
    return ikeless_suite(parse_vpn(vpn))


def sa_leaves(sa: Mapping[str, Any]) -> dict[str, Any]:
    """Only the 'ikeless-sa' grouping's leaves, copied (keys/ikeless-sa also has 'created')."""
    out: dict[str, Any] = {}
    for leaf in _SA_LEAVES:
        value = sa.get(leaf)
        if value is not None:
            out[leaf] = dict(value) if leaf == "lifetime" else value
    return out


def check_sa(m: Vpn, sa: Mapping[str, Any], what: str, site: str | None = None) -> None:
    """Refuse an IKE-less SA without encryption or with a transform weaker than the VPN's."""
    if "encryption-algorithm" not in sa:
        raise CompileError(f"{what}: no encryption-algorithm", m.id, site)
    require_strength(m, sa["encryption-algorithm"], f"{what} encryption-algorithm", site)
    if sa.get("integrity-algorithm") is not None:
        require_strength(m, sa["integrity-algorithm"], f"{what} integrity-algorithm", site)


# --------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------


@functools.lru_cache(maxsize=65536)
def derived_router_id(prefixes: tuple[str, ...]) -> str | None:
    """The first IPv4 prefix's network address + 1 (the address itself for a /32)."""
    for prefix in prefixes:
        network = ipaddress.ip_network(prefix, strict=False)
        if isinstance(network, ipaddress.IPv4Network):
            base = network.network_address
            if network.prefixlen == 32 or int(base) == 0xFFFFFFFF:
                return str(base)
            return str(base + 1)
    return None


def unique(values: Sequence[str]) -> tuple[str, ...]:
    """The values in their order, each once (a leaf-list cannot hold a value twice)."""
    return tuple(dict.fromkeys(values))


# --------------------------------------------------------------------------
# Records the rules produce
# --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TunnelParameters:
    """What both ends of a tunnel negotiate, and so must agree on."""

    establishment: str
    idle_timeout: int | None
    """Only for traffic-driven tunnels."""
    encapsulation: str


@dataclass(frozen=True, slots=True)
class Tunnel:
    """A peer entry's tunnel container and the canonical JSON of the entry after its keying.

    Entry keys sort as ``ike|ikeless < name < sp-address < tunnel``, so
    ``tail`` is ``,"name":…,"sp-address":…,"tunnel":{…}}``: an entry's
    canonical JSON is its keying member followed by the tail.
    """

    container: dict[str, Any]
    tail: str


@dataclass(slots=True)  # not frozen: one per peer entry, and a frozen one costs 3x to make
class PeerEntry:
    """One ``peer`` list entry (RFC 7951 JSON) and its digest.  Read-only."""

    content: dict[str, Any]
    digest: bytes
    """sha256 of the entry's canonical JSON (== :func:`section_digest` of ``content``)."""


@dataclass(slots=True)  # not frozen: one per entry and compile in an IKE-less VPN
class IkelessMaterial:
    """The SAs of one IKE-less peer entry.  Read-only."""

    outbound: dict[str, Any]
    """The SA this CE sends to the peer with."""
    inbound: dict[str, Any]
    """The SA this CE receives from the peer with."""


@dataclass(frozen=True, slots=True)
class SiteCertificate:
    """A ``keys/site-certificate`` entry."""

    certificate: str
    private_key: str | None


@dataclass(frozen=True, slots=True)
class ExplicitKeys:
    """The VPN's ``keys`` container: material that overrides the KeySource."""

    psk: dict[tuple[str, str], str]
    """By pair, smaller id first."""
    sa: dict[tuple[str, str], dict[str, Any]]
    """By (from-site, to-site)."""
    certificates: dict[str, SiteCertificate]
    ca: str | None

    @classmethod
    def of(cls, m: Vpn) -> ExplicitKeys:
        """Read and check the VPN's explicit keys: they obey the same strength as generated ones."""
        psk: dict[tuple[str, str], str] = {}
        for item in m.keys.get("pre-shared-key", []):
            a, b = str(item["site-a"]), str(item["site-b"])
            key = str(item["key"])
            if len(key) < m.psk_min_length:
                raise CompileError(
                    f"keys/pre-shared-key of {a!r} and {b!r} is shorter than "
                    f"psk-min-length {m.psk_min_length}",
                    m.id,
                )
            psk[(a, b) if a < b else (b, a)] = key
        sas: dict[tuple[str, str], dict[str, Any]] = {}
        for item in m.keys.get("ikeless-sa", []):
            sa = sa_leaves(item)
            source, target = str(item["from-site"]), str(item["to-site"])
            check_sa(m, sa, f"keys/ikeless-sa from {source!r} to {target!r}")
            sas[(source, target)] = sa
        certificates = {
            str(item["site"]): SiteCertificate(str(item["certificate"]), item.get("private-key"))
            for item in m.keys.get("site-certificate", [])
        }
        return cls(psk, sas, certificates, m.keys.get("ca", {}).get("certificate"))


M = TypeVar("M")


@dataclass(frozen=True, slots=True)
class KeyingPlan(Generic[M]):
    """How a VPN's peer entries get their key material (M), and how it is written into them.

    ``material(a, b)`` is (material of a's entry for b, material of b's entry
    for a): what both ends share is asked once per pair.
    """

    material: Callable[[str, str], tuple[M, M]]
    build: Callable[[str, str, M], PeerEntry]
    """``build(me, peer, material)``: me's entry for peer."""


# --------------------------------------------------------------------------
# The rules applied to one VPN
# --------------------------------------------------------------------------


class VpnRules:
    """The rules applied to one parsed VPN with one key source, for one compile.

    It derives once what many entries share (the pair parameters when no site
    overrides them, the hub carrying spoke-to-spoke traffic, each site's
    Internet gateway, the explicit keys), then builds any peer entry or a
    site's top level on request.  Identical tunnel containers are shared
    within the compile; nothing is kept for the next one.
    """

    def __init__(self, vpn: Vpn, keys: KeySource) -> None:
        self.vpn = m = vpn
        self.keys = keys
        check_vpn_strength(m)
        self.suite = ikeless_suite(m)
        self.ospf = m.protocol == "ospf"
        self.replay_window: int | None = m.esp.get("replay-window")
        self._lifetimes: dict[tuple[Any, Any], dict[str, Any]] = {}
        """One ``lifetime`` container per distinct value (every SA of a VPN has the same)."""
        if m.keying == "ikeless":
            check_sa(m, {"encryption-algorithm": self.suite.encryption}, "IKE-less suite")
            if self.suite.integrity is not None:
                require_strength(m, self.suite.integrity, "IKE-less suite integrity")
        sites = m.sites
        self.address = {s.id: s.ce_address for s in sites.values()}

        # Hub-and-spoke static routing: the primary hub carries spoke-to-spoke traffic.
        self.primary_hub: dict[str, str] = {}
        """spoke -> the hub whose entry also carries the other spokes' prefixes."""
        self.spoke_prefixes: dict[str, tuple[str, ...]] = {}
        """spoke -> its prefixes, in the VPN's order (what the primary hub's entries carry)."""
        if m.topology == "hub-and-spoke" and not self.ospf:
            primary = m.hubs[0]
            self.spoke_prefixes = {s.id: s.prefixes for s in sites.values() if s.role != "hub"}
            self.primary_hub = dict.fromkeys(self.spoke_prefixes, primary)
        self.gateway_peer = gateway_choice(m)
        """site -> the gateway whose entry carries the default route (static routing)."""
        self.extra_routes: dict[str, set[str]] = {}
        """site -> the peers whose entry carries more than the peer's own prefixes."""
        for site_id, peer in [*self.primary_hub.items(), *self.gateway_peer.items()]:
            self.extra_routes.setdefault(site_id, set()).add(peer)

        self.own_prefixes = {s.id: unique(s.prefixes) for s in sites.values()}
        self.overriding = {s.id for s in sites.values() if s.overrides_tunnel}
        self.default_parameters = TunnelParameters(
            m.establishment,
            m.idle_timeout if m.establishment == "traffic-driven" else None,
            m.encapsulation,
        )
        self._tunnels: dict[tuple[str, TunnelParameters, tuple[str, ...]], Tunnel] = {}
        self._plain_tunnels: dict[str, Tunnel] = {}
        self.explicit = ExplicitKeys.of(m)

    def pairs(self) -> list[tuple[str, str]]:
        """Every tunnel of the VPN, (smaller id, larger id), sorted."""
        return sorted_pairs(self.vpn)

    # -- one peer entry ----------------------------------------------------

    def pair_parameters(self, a: Site, b: Site) -> TunnelParameters:
        """The parameters of the tunnel between a and b, the same evaluated at either end."""
        if a.id not in self.overriding and b.id not in self.overriding:
            return self.default_parameters
        first, second = sorted((a, b), key=lambda s: (s.role != "hub", s.id))
        m = self.vpn
        establishment = first.establishment or second.establishment or m.establishment
        encapsulation = first.encapsulation or second.encapsulation or m.encapsulation
        idle: int | None = None
        if establishment == "traffic-driven":
            idle = first.idle_timeout or second.idle_timeout or m.idle_timeout
        return TunnelParameters(establishment, idle, encapsulation)

    def remote_prefixes(self, me: str, peer: str) -> tuple[str, ...]:
        """What me routes into the tunnel to peer (static routing)."""
        if peer not in self.extra_routes.get(me, ()):
            return self.own_prefixes[peer]
        prefixes: list[str] = list(self.vpn.sites[peer].prefixes)
        if self.primary_hub.get(me) == peer:
            for spoke, own in self.spoke_prefixes.items():
                if spoke != me:
                    prefixes.extend(own)
        if self.gateway_peer.get(me) == peer:
            prefixes.append(IPV4_DEFAULT_ROUTE)
        return unique(prefixes)

    def tunnel(self, me: str, peer: str) -> Tunnel:
        """me's tunnel container for peer, shared with every entry that has the same one.

        In a full mesh without overrides every site sees the same container
        for a given peer.
        """
        plain = (
            me not in self.overriding
            and peer not in self.overriding
            and peer not in self.extra_routes.get(me, ())
        )
        if plain:
            known = self._plain_tunnels.get(peer)
            if known is not None:
                return known
        m = self.vpn
        parameters = self.pair_parameters(m.sites[me], m.sites[peer])
        self._check_tunnel(me, peer, parameters)
        remote = () if self.ospf else self.remote_prefixes(me, peer)
        key = (peer, parameters, remote)
        known = self._tunnels.get(key)
        if known is None:
            container: dict[str, Any] = {"establishment": parameters.establishment}
            if parameters.idle_timeout is not None:
                container["idle-timeout"] = parameters.idle_timeout
            container["encapsulation"] = parameters.encapsulation
            container["dynamic-routing"] = self.ospf
            if remote:
                container["remote-prefix"] = list(remote)
            tail = (
                f',"name":{encode_basestring_ascii(peer)}'
                f',"sp-address":{encode_basestring_ascii(self.address[peer])}'
                f',"tunnel":{_encode(container)}}}'
            )
            known = self._tunnels[key] = Tunnel(container, tail)
        if plain:
            self._plain_tunnels[peer] = known
        return known

    def _check_tunnel(self, me: str, peer: str, parameters: TunnelParameters) -> None:
        """Refuse parameters the CEs could not run (the YANG refuses them for defaults too)."""
        m = self.vpn
        establishment, encapsulation = parameters.establishment, parameters.encapsulation
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

    # -- key material ------------------------------------------------------

    def keying_plan(self) -> KeyingPlan[Any]:
        """Where this VPN's key material comes from and how an entry carries it.

        The KeySource is asked whenever an entry is built or checked (never
        remembered here): a pre-shared key once per pair, an identity once per
        site, an IKE-less SA once per direction and end (sender and receiver
        differ during a rekey).
        """
        m = self.vpn
        if m.keying == "ikeless":
            return KeyingPlan(self._ikeless_material, self._ikeless_entry)
        if m.authentication == "certificate":
            identity = {s: self.keys.identity(m.id, s) for s in m.sites}

            def certificate(a: str, b: str) -> tuple[str, str]:
                return identity[b], identity[a]

            return KeyingPlan(certificate, self._ike_builder("peer-identity"))
        return KeyingPlan(self._psk_source(), self._ike_builder("pre-shared-key"))

    def _psk_source(self) -> Callable[[str, str], tuple[str, str]]:
        explicit, source = self.explicit.psk, self.keys.pre_shared_key
        vpn_id, min_length = self.vpn.id, self.vpn.psk_min_length

        def psk(a: str, b: str) -> tuple[str, str]:
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

    def _ikeless_material(self, a: str, b: str) -> tuple[IkelessMaterial, IkelessMaterial]:
        """Both ends' SAs.  A direction's SA is its sender's outbound and its receiver's
        inbound: one dict for both unless a rekey is rolling out (the receiver has the
        next SA already), which halves what a million IKE-less entries hold."""
        a_to_b, b_to_a = self._sa(a, b, "outbound"), self._sa(b, a, "outbound")
        into_b, into_a = self._sa(a, b, "inbound"), self._sa(b, a, "inbound")
        return (
            IkelessMaterial(a_to_b, b_to_a if into_a == b_to_a else into_a),
            IkelessMaterial(b_to_a, a_to_b if into_b == a_to_b else into_b),
        )

    def _sa(self, src: str, dst: str, direction: Literal["outbound", "inbound"]) -> dict[str, Any]:
        explicit = self.explicit.sa.get((src, dst))
        if explicit is not None:
            return explicit
        sa = sa_leaves(self.keys.ikeless_sa(self.vpn.id, src, dst, direction, self.suite))
        lifetime = sa.get("lifetime")
        if lifetime is not None:
            key = (lifetime.get("soft-seconds"), lifetime.get("hard-seconds"))
            sa["lifetime"] = self._lifetimes.setdefault(key, lifetime)
        return sa

    def _ike_builder(self, leaf: str) -> Callable[[str, str, str], PeerEntry]:
        """Entries whose keying is ``ike/<leaf>``: a string, written straight into the JSON."""
        tunnel, address = self.tunnel, self.address
        prefix = f'{{"ike":{{"{leaf}":'

        def build(me: str, peer: str, material: str) -> PeerEntry:
            shared = tunnel(me, peer)
            entry = {"name": peer, "sp-address": address[peer], "tunnel": shared.container}
            entry["ike"] = {leaf: material}
            data = f"{prefix}{encode_basestring_ascii(material)}}}{shared.tail}"
            return PeerEntry(entry, _digest(data))

        return build

    def _ikeless_entry(self, me: str, peer: str, material: IkelessMaterial) -> PeerEntry:
        shared = self.tunnel(me, peer)
        check_sa(self.vpn, material.outbound, f"outbound SA to {peer!r}", me)
        check_sa(self.vpn, material.inbound, f"inbound SA from {peer!r}", me)
        keying: dict[str, Any] = {"outbound": material.outbound, "inbound": material.inbound}
        if self.replay_window is not None:
            keying["replay-window"] = self.replay_window
        entry = {"name": peer, "sp-address": self.address[peer], "tunnel": shared.container}
        entry["ikeless"] = keying
        data = f'{{"ikeless":{_encode(keying)}{shared.tail}'
        return PeerEntry(entry, _digest(data))

    # -- CE top level ------------------------------------------------------

    def ca_certificate(self) -> str | None:
        """The VPN CA's certificate when its CEs authenticate with certificates, else None."""
        m = self.vpn
        if m.keying != "ike" or m.authentication != "certificate":
            return None
        return self.explicit.ca or self.keys.ca_certificate(m.id)

    def top(self, site: Site, ca: str | None) -> dict[str, Any]:
        """Every top-level section of the site's configuration except "peer", in CE order."""
        m = self.vpn
        top: dict[str, Any] = {"minimum-strength": m.minimum_strength}
        top["sa-defaults"] = self._sa_defaults(site)
        top["retry-policy"] = self._retry_policy(site)
        if ca is not None:
            top["certificates"] = self._certificates(site, ca)
        top["routing"] = self._routing(site)
        top["internet-access"] = self._internet_access(site)
        return top

    def _sa_defaults(self, site: Site) -> dict[str, Any]:
        m = self.vpn
        dpd = {
            "delay": site.dpd.get("delay", m.dpd["delay"]),
            "timeout": site.dpd.get("timeout", m.dpd["timeout"]),
        }
        sa_defaults: dict[str, Any] = {"ike": {**m.ike, "dpd": dpd}}
        if m.esp:
            sa_defaults["esp"] = m.esp
        return sa_defaults

    def _retry_policy(self, site: Site) -> dict[str, Any]:
        m = self.vpn
        retry = {leaf: site.retry.get(leaf, m.retry[leaf]) for leaf in RETRY_LEAVES}
        if int(retry["t1"]) < int(retry["minimum-wait"]) or int(retry["limit"]) < int(retry["t1"]):
            raise CompileError(
                "retry-policy needs minimum-wait <= t1 <= limit "
                f"(got {retry['minimum-wait']}, {retry['t1']}, {retry['limit']})",
                m.id,
                site.id,
            )
        return retry

    def _certificates(self, site: Site, ca: str) -> dict[str, Any]:
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
        return certificates

    def _site_certificate(self, site: str) -> tuple[str, str]:
        explicit = self.explicit.certificates.get(site)
        if explicit is None:
            return self.keys.site_certificate(self.vpn.id, site)
        if explicit.private_key is None:
            raise CompileError(
                "keys/site-certificate has no private-key: cevpn-ce needs the CE's key "
                "next to its certificate",
                self.vpn.id,
                site,
            )
        return explicit.certificate, str(explicit.private_key)

    def _routing(self, site: Site) -> dict[str, Any]:
        m = self.vpn
        routing: dict[str, Any] = {}
        router_id = site.router_id or derived_router_id(site.prefixes)
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
        return routing

    def _internet_access(self, site: Site) -> dict[str, Any]:
        if site.id in self.vpn.gateways:
            return {
                "role": "integrated-gateway",
                "integrated-gateway": {"nat": True, "originate-default": self.ospf},
            }
        if site.id in self.gateway_peer:
            return {"role": "via-gateway-site", "gateway-peer": self.gateway_peer[site.id]}
        return {"role": "none"}
