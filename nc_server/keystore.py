"""Key material of the customer VPNs, generated and kept by the SP VPN server.

Seed 7 asks that "the IPsec credential must be generated, provisioned,
updated, and stored securely".  The VPN server generates every secret here
from the operating system's CSPRNG (:mod:`secrets`) and keeps it in its own
:class:`~nc_server.storage.Storage` (a 0600 SQLite file by default), never in
a NETCONF datastore, so that no NETCONF user can read it; a secret leaves the
server only inside the compiled configuration of the CE that needs it.

What is kept, per VPN:

* a pre-shared key per unordered pair of sites (seed 3.3 (i));
* the VPN's certificate authority and each site's certificate, and the
  site's private key when the server made it (seed 3.3 (ii), :mod:`nc_server.ca`);
* for IKE-less keying (RFC 9061), an SA per direction between two sites, with
  a ``current`` SA and, while a rekey is under way, a ``next`` one.

Storage layout (values are JSON, so a PostgreSQL storage can replace SQLite):
table ``keystore/psk`` key ``<vpn>/<site-a>/<site-b>`` (site-a < site-b),
``keystore/ikeless-sa`` ``<vpn>/<from>/<to>``, ``keystore/certificate``
``<vpn>/<site>``, ``keystore/ca`` and ``keystore/profile`` ``<vpn>``.  cevpn
names never contain "/", so a ``<vpn>/`` prefix scan returns exactly one VPN.

Speed: a first compile asks for every peer of every site, up to a 1,000-site
full mesh (about 500,000 pairs), so each VPN is read from storage once into
dictionaries and every later read is a dictionary lookup; writes go through
to storage at once, or at the end of a :meth:`KeyStore.batch` in one
transaction.  Later compiles ask only for new pairs and for those whose
material changed since: every change of a PSK or an SA is written in the
VPN's :class:`ChangeLog`, which the compiler reads through
:meth:`KeyStore.changed_pairs` (adding a site to that mesh then asks 1,000
pairs, not 500,000).  The class is not thread-safe: the server uses it from
its event loop only.

No secret is ever logged or put in an exception message or a ``repr()``.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import secrets
import sys
from collections.abc import Callable, Container, Hashable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

from cryptography import x509

from nc_server.ca import (
    CertificateAuthority,
    IssuedCertificate,
    ca_curve,
    ce_identity,
    check_name,
    check_strength,
    curve_strength,
    key_strength,
    required_key_strength,
)
from nc_server.compiler import SaSuite
from nc_server.storage import Storage

if TYPE_CHECKING:
    from nc_server.compiler import KeySource

Direction = Literal["outbound", "inbound"]
RotateWhat = Literal["all", "pre-shared-keys", "certificates", "ikeless-sas"]

TABLE_PSK = "keystore/psk"
TABLE_SA = "keystore/ikeless-sa"
TABLE_CERT = "keystore/certificate"
TABLE_CA = "keystore/ca"
TABLE_PROFILE = "keystore/profile"

DEFAULT_STRENGTH = 128
DEFAULT_CERTIFICATE_LIFETIME = 365  # days, cevpn-service security-profile default
PSK_MAX_LENGTH = 1024  # cevpn-types pre-shared-key
SPI_MIN = 256  # 1..255 are reserved by IANA (RFC 4303, Section 2.1)
SPI_MAX = 2**32 - 1

# Key octets per algorithm (cevpn-types grouping ikeless-sa; the 'must'
# statements there give 3 * octets - 1 characters).  AES-GCM and AES-CTR keys
# carry 4 octets of salt / nonce, AES-CCM 3 (RFC 4106, 3686, 4309); the
# ChaCha20-Poly1305 key is 32 octets plus 4 of salt (RFC 7634).
ENCRYPTION_KEY_OCTETS: dict[str, int] = {
    "encr-aes-cbc-128": 16,
    "encr-aes-cbc-192": 24,
    "encr-aes-cbc-256": 32,
    "encr-3des": 24,
    "encr-aes-ctr-128": 16 + 4,
    "encr-aes-ctr-256": 32 + 4,
    "encr-aes-gcm-16-128": 16 + 4,
    "encr-aes-gcm-16-192": 24 + 4,
    "encr-aes-gcm-16-256": 32 + 4,
    "encr-aes-ccm-16-128": 16 + 3,
    "encr-aes-ccm-16-256": 32 + 3,
    "encr-chacha20-poly1305": 32 + 4,
}
AEAD_ALGORITHMS = frozenset(
    {
        "encr-aes-gcm-16-128",
        "encr-aes-gcm-16-192",
        "encr-aes-gcm-16-256",
        "encr-aes-ccm-16-128",
        "encr-aes-ccm-16-256",
        "encr-chacha20-poly1305",
    }
)
INTEGRITY_KEY_OCTETS: dict[str, int] = {
    "auth-hmac-sha1-96": 20,
    "auth-aes-xcbc-96": 16,
    "auth-hmac-sha2-256-128": 32,
    "auth-hmac-sha2-384-192": 48,
    "auth-hmac-sha2-512-256": 64,
}


class CsrRequired(LookupError):
    """A site whose CE keeps its own key has no valid certificate: it must send a new CSR."""


@dataclass(frozen=True, slots=True)
class VpnProfile:
    """The per-VPN settings the key material depends on (cevpn-service security-profile)."""

    strength_bits: int = DEFAULT_STRENGTH
    certificate_lifetime_days: int = DEFAULT_CERTIFICATE_LIFETIME

    @property
    def psk_floor(self) -> int:
        """Shortest PSK carrying the VPN's strength: each URL-safe character holds 6 bits."""
        return math.ceil(self.strength_bits / 6)


@dataclass(slots=True)  # not frozen: a frozen dataclass is slower to make, and 500,000 are
class PskRecord:
    key: str = field(repr=False)
    created: float
    """Seconds since the epoch."""


@dataclass(frozen=True, slots=True)
class SaRecord:
    """One SA of one direction: what the CE's ``ikeless/outbound`` or ``inbound`` holds."""

    spi: int
    encryption: str
    encryption_key: str = field(repr=False)
    integrity: str | None
    integrity_key: str | None = field(repr=False)
    soft_seconds: int
    hard_seconds: int
    created: float

    def matches(self, suite: SaSuite) -> bool:
        return (
            _bare(self.encryption) == _bare(suite.encryption)
            and _bare(self.integrity) == _bare(suite.integrity)
            and self.soft_seconds == suite.soft_seconds
            and self.hard_seconds == suite.hard_seconds
        )

    def suite(self) -> SaSuite:
        return SaSuite(self.encryption, self.integrity, self.soft_seconds, self.hard_seconds)

    def to_yang(self) -> dict[str, Any]:
        """The cevpn-types ``ikeless-sa`` grouping in RFC 7951 JSON form (a new dict)."""
        sa: dict[str, Any] = {
            "spi": self.spi,
            "encryption-algorithm": self.encryption,
            "encryption-key": self.encryption_key,
        }
        if self.integrity is not None and self.integrity_key is not None:
            sa["integrity-algorithm"] = self.integrity
            sa["integrity-key"] = self.integrity_key
        sa["lifetime"] = {"soft-seconds": self.soft_seconds, "hard-seconds": self.hard_seconds}
        return sa

    def to_json(self) -> dict[str, Any]:
        return {**self.to_yang(), "created": _iso(self.created)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SaRecord:
        return cls(
            spi=int(data["spi"]),
            encryption=data["encryption-algorithm"],
            encryption_key=data["encryption-key"],
            integrity=data.get("integrity-algorithm"),
            integrity_key=data.get("integrity-key"),
            soft_seconds=int(data["lifetime"]["soft-seconds"]),
            hard_seconds=int(data["lifetime"]["hard-seconds"]),
            created=_epoch(data["created"]),
        )


@dataclass(slots=True)
class SaSlot:
    """The SAs of one direction: ``current`` carries traffic, ``next`` is being rolled out."""

    current: SaRecord
    next: SaRecord | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "current": self.current.to_json(),
            "next": None if self.next is None else self.next.to_json(),
        }


CertSource = Literal["server", "csr", "csr-required"]


@dataclass(frozen=True, slots=True)
class CertRecord:
    """A site's certificate; ``source`` says who holds the private key."""

    certificate_pem: str
    private_key_pem: str = field(repr=False)
    source: CertSource
    """"server": made here, private key kept here; "csr": the CE keeps its key;
    "csr-required": the old certificate was withdrawn and the CE must send a new CSR."""
    issued: float


@dataclass(frozen=True)
class RekeyStep:
    """Directions (from_site, to_site) whose SAs moved one step in an inbound-first rekey.

    After :meth:`KeyStore.begin_rekey` the :attr:`receivers` must get their
    configuration (it now has the new inbound SAs); after
    :meth:`KeyStore.receiver_applied` the :attr:`senders` must (their
    outbound SA changed).
    """

    directions: tuple[tuple[str, str], ...] = ()

    def __bool__(self) -> bool:
        """True when something moved, so ``if store.receiver_applied(...):`` reads right."""
        return bool(self.directions)

    @property
    def senders(self) -> frozenset[str]:
        return frozenset(source for source, _ in self.directions)

    @property
    def receivers(self) -> frozenset[str]:
        return frozenset(target for _, target in self.directions)


@dataclass(slots=True)
class _VpnState:
    """Everything of one VPN, loaded once from storage."""

    profile: VpnProfile = field(default_factory=VpnProfile)
    psks: dict[tuple[str, str], PskRecord] = field(default_factory=dict)
    sas: dict[tuple[str, str], SaSlot] = field(default_factory=dict)
    spis: dict[str, set[int]] = field(default_factory=dict)
    """to_site -> SPIs of the SAs (current and next) it receives."""
    rekeying: dict[str, set[str]] = field(default_factory=dict)
    """to_site -> from_sites of its directions that have a ``next`` SA: what
    receiver_applied() promotes, without walking a million directions."""
    certs: dict[str, CertRecord] = field(default_factory=dict)
    ca: CertificateAuthority | None = None
    ca_pem: str = ""
    oldest: float | None = None
    """The creation time of the oldest ``current`` SA of a direction not being rekeyed
    (``next`` is None), when :attr:`oldest_known`: when the next rekey is due.  Kept as
    slots change, so that a commit adding a site's 2,000 SAs to a million does not make
    the rekey scheduler look at every one (87 ms at 1,000 sites); found again by a scan
    only after the oldest one itself went (:meth:`oldest_waiting`)."""
    oldest_known: bool = True

    def put_slot(self, direction: tuple[str, str], slot: SaSlot) -> None:
        """A direction's SAs (read from storage, or new), with the receiver's SPIs and
        rekey."""
        source, target = direction
        self.waiting_gone(self.sas.get(direction))
        self.sas[direction] = slot
        used = self.spis.setdefault(target, set())
        used.add(slot.current.spi)
        if slot.next is not None:
            used.add(slot.next.spi)
            self.rekeying.setdefault(target, set()).add(source)
        else:
            self.waiting_added(slot)

    def drop_slot(self, direction: tuple[str, str]) -> SaSlot | None:
        """Forget a direction's SAs, their SPIs and rekey; what it held."""
        slot = self.sas.pop(direction, None)
        if slot is not None:
            self.waiting_gone(slot)
            source, target = direction
            used = self.spis.get(target, set())
            used.discard(slot.current.spi)
            if slot.next is not None:
                used.discard(slot.next.spi)
            self.rekeying.get(target, set()).discard(source)
        return slot

    def begin_next(self, direction: tuple[str, str], slot: SaSlot, sa: SaRecord) -> None:
        """``sa`` is the direction's ``next`` SA now: its rekey is under way."""
        self.waiting_gone(slot)
        slot.next = sa
        self.rekeying.setdefault(direction[1], set()).add(direction[0])

    def waiting_added(self, slot: SaSlot) -> None:
        """``slot`` waits for its rekey now (a new direction, or ``next`` promoted)."""
        if self.oldest_known and (self.oldest is None or slot.current.created < self.oldest):
            self.oldest = slot.current.created

    def waiting_gone(self, slot: SaSlot | None) -> None:
        """``slot`` no longer waits (dropped, replaced, or its ``next`` about to be set): call
        before the change.  Only the oldest one's going makes the oldest unknown."""
        if (
            slot is not None
            and slot.next is None
            and self.oldest is not None
            and slot.current.created <= self.oldest
        ):
            self.oldest_known = False

    def oldest_waiting(self) -> float | None:
        """:attr:`oldest`, found again by a scan when unknown."""
        if not self.oldest_known:
            self.oldest = self.scan_oldest()
            self.oldest_known = True
        return self.oldest

    def scan_oldest(self) -> float | None:
        """The oldest waiting SA's creation time, from every slot (what is kept otherwise)."""
        created = [slot.current.created for slot in self.sas.values() if slot.next is None]
        return min(created) if created else None


_LOG_KEEP = 65_536
"""Changed pairs a VPN's change log keeps at least: older marks get None (ask every pair)."""
_log_serials = itertools.count(1)


class ChangeLog:
    """The pairs whose material changed, in order, since the log was made.

    A compiler keeps the position after its compile (:meth:`KeyStore.material_mark`)
    and reads what came after it at the next one.  A fresh 1,000-site mesh
    logs its 500,000 new pairs: the log drops its older half whenever it holds
    twice :data:`_LOG_KEEP`, so it stays small while the marks in use are recent.
    """

    __slots__ = ("base", "pairs", "serial")

    def __init__(self) -> None:
        self.serial = next(_log_serials)
        self.base = 0
        """The position of pairs[0]."""
        self.pairs: list[tuple[str, str]] = []

    @property
    def position(self) -> int:
        return self.base + len(self.pairs)

    def add(self, pair: tuple[str, str]) -> None:
        self.pairs.append(pair)
        if len(self.pairs) >= 2 * _LOG_KEEP:
            self.base += len(self.pairs) - _LOG_KEEP
            del self.pairs[:-_LOG_KEEP]

    def since(self, position: int) -> frozenset[tuple[str, str]] | None:
        if position < self.base or position > self.position:
            return None
        return frozenset(self.pairs[position - self.base :])


class KeyStore:
    """The server's key material, behind the compiler's ``KeySource`` interface.

    Every getter is get-or-create: the first request for a pair, a direction
    or a site generates the material and stores it; later requests return
    the same material until it is rotated.  Call :meth:`set_vpn_profile`
    before compiling a VPN so that strength and certificate lifetime are
    right (defaults: 128 bits, 365 days).
    """

    def __init__(self, storage: Storage, clock: Callable[[], datetime] | None = None) -> None:
        self._storage = storage
        self._clock = clock or (lambda: datetime.now(UTC))
        self._vpns: dict[str, _VpnState] = {}
        self._batch_depth = 0
        self._pending: dict[tuple[str, str], bytes | None] = {}
        self._valid_sites: set[str] = set()
        self._epoch = 0
        """Raised whenever loaded material is dropped after a failure: marks before it are void."""
        self._changes: dict[str, ChangeLog] = {}
        self.written: Callable[[frozenset[tuple[str, str]]], None] | None = None
        """Told, inside the storage transaction that writes them, which rows (table, key)
        a write wrote: with several servers on one database, the others must read them
        again (nc_server.shared_keys)."""

    def __repr__(self) -> str:
        return f"<KeyStore vpns_loaded={len(self._vpns)} pending_writes={len(self._pending)}>"

    # ------------------------------------------------------------------
    # Batching and storage
    # ------------------------------------------------------------------

    @contextmanager
    def batch(self) -> Iterator[None]:
        """Defer writes and commit them in one storage transaction at the end.

        One transaction for a whole compile is what makes generating a large
        mesh affordable (a commit with synchronous=FULL costs an fsync).  If
        the block raises, nothing is written and the in-memory cache is
        dropped, so it never holds material that storage does not: it is
        reloaded on the next request.  Batches nest; the outermost commits.
        """
        self._batch_depth += 1
        try:
            yield
        except BaseException:
            self._batch_depth -= 1
            if self._batch_depth == 0:
                self._pending.clear()
                self._drop_loaded()
            raise
        self._batch_depth -= 1
        if self._batch_depth == 0:
            self._flush()

    @contextmanager
    def dry_run(self) -> Iterator[None]:
        """Answer every request inside as usual, generating what is missing, but keep
        nothing: for compiling a configuration that is only being validated.  At the end
        the writes are dropped and the cache with them (it is reloaded from storage).
        Marks stay valid: storage holds what was handed out before, and what was made
        inside is in the change log, so a compiler asks for those pairs again."""
        if self._batch_depth:
            raise RuntimeError("a dry run cannot be nested in a batch")
        self._batch_depth += 1
        try:
            yield
        finally:
            self._batch_depth -= 1
            self._pending.clear()
            self._vpns.clear()

    def _flush(self) -> None:
        pending, self._pending = self._pending, {}
        if not pending:
            return
        try:
            # cast: Storage.transaction() is annotated as returning an Iterator,
            # but every implementation returns a context manager (@contextmanager).
            with self._storage.transaction():
                self._storage.write_many(pending)
                if self.written is not None:
                    self.written(frozenset(pending))
        except BaseException:
            self._drop_loaded()
            raise

    def reload_vpn(self, vpn: str) -> bool:
        """Another server changed the VPN's material (a rekey, a rotation, a certified CE
        key): read it from storage again.  True if it differs from what was loaded.

        The pairs whose PSK or SAs differ go into the VPN's change log, so a compiler
        redoes only those; a different profile, CA or certificate voids the VPN's marks
        (its next compile is a whole one), as does a VPN that was not loaded at all.
        """
        if self._batch_depth:
            raise RuntimeError("material cannot be read again inside a batch")
        old = self._vpns.get(vpn)
        new = self._load(check_name("VPN", vpn))
        self._vpns[vpn] = new
        if old is None or _identity_material(old) != _identity_material(new):
            self._changes.pop(vpn, None)  # a new log: every mark of the VPN is void
            return True
        pairs: set[tuple[str, str]] = set()
        for pair in old.psks.keys() | new.psks.keys():
            was, now = old.psks.get(pair), new.psks.get(pair)
            if was is None or now is None or was.key != now.key:
                pairs.add(pair)
        for direction in old.sas.keys() | new.sas.keys():
            before, after = old.sas.get(direction), new.sas.get(direction)
            if before is None or after is None or _slot_differs(before, after):
                first, second = direction
                pairs.add((first, second) if first < second else (second, first))
        for pair in sorted(pairs):
            self._changed(vpn, pair)
        return bool(pairs)

    def reload_rows(self, vpn: str, rows: Iterable[tuple[str, str]]) -> bool:
        """Another server wrote these rows (table, key) of the VPN's material (the key
        material a commit's compile made, a rekey): read just those again, as
        :meth:`reload_vpn` reads the whole VPN.  True if anything differs.

        A VPN not loaded here is read whole when first needed; a row of its profile, CA
        or certificates reads it whole now (its marks are void either way).
        """
        if self._batch_depth:
            raise RuntimeError("material cannot be read again inside a batch")
        state = self._vpns.get(vpn)
        if state is None:
            return False
        wanted: dict[str, list[str]] = {}
        for table, key in rows:
            if table not in (TABLE_PSK, TABLE_SA) or not key.startswith(f"{vpn}/"):
                return self.reload_vpn(vpn)
            wanted.setdefault(table, []).append(key)
        pairs: set[tuple[str, str]] = set()
        intern = sys.intern
        keys = wanted.get(TABLE_PSK, [])
        found = self._storage.get_many(TABLE_PSK, keys) if keys else {}
        for key in keys:
            _, site_a, site_b = key.split("/")
            pair = (intern(site_a), intern(site_b))
            raw = found.get(key)
            was = state.psks.pop(pair, None)
            now = None if raw is None else _psk_record(raw)
            if now is not None:
                state.psks[pair] = now
            if (None if was is None else was.key) != (None if now is None else now.key):
                pairs.add(pair)
        keys = wanted.get(TABLE_SA, [])
        found = self._storage.get_many(TABLE_SA, keys) if keys else {}
        for key in keys:
            _, source, target = key.split("/")
            direction = (intern(source), intern(target))
            raw = found.get(key)
            before = state.drop_slot(direction)
            after = None if raw is None else _sa_slot(raw)
            if after is not None:
                state.put_slot(direction, after)
            if (before is None) != (after is None) or (
                before is not None and after is not None and _slot_differs(before, after)
            ):
                first, second = direction
                pairs.add((first, second) if first < second else (second, first))
        for pair in sorted(pairs):
            self._changed(vpn, pair)
        return bool(pairs)

    def _drop_loaded(self) -> None:
        """Forget what was loaded: storage may not hold what was handed out (a write
        failed), so no compiler may trust its mark either (see :meth:`changed_pairs`)."""
        self._vpns.clear()
        self._epoch += 1

    def _write(self, table: str, key: str, value: dict[str, Any] | None) -> None:
        data = None if value is None else json.dumps(value, separators=(",", ":")).encode()
        self._write_bytes(table, key, data)

    def _write_bytes(self, table: str, key: str, data: bytes | None) -> None:
        if self._batch_depth:
            self._pending[(table, key)] = data
            return
        try:
            with self._storage.transaction():
                self._storage.write_many({(table, key): data})
                if self.written is not None:
                    self.written(frozenset({(table, key)}))
        except BaseException:
            self._drop_loaded()  # the cache already changed: reload what storage has
            raise

    def _state(self, vpn: str) -> _VpnState:
        state = self._vpns.get(vpn)
        if state is None:
            state = self._vpns[vpn] = self._load(check_name("VPN", vpn))
        return state

    def _load(self, vpn: str) -> _VpnState:
        state = _VpnState()
        prefix = f"{vpn}/"
        raw = self._storage.get(TABLE_PROFILE, vpn)
        if raw is not None:
            data = json.loads(raw)
            state.profile = VpnProfile(
                int(data["strength-bits"]), int(data["certificate-lifetime-days"])
            )
        raw = self._storage.get(TABLE_CA, vpn)
        if raw is not None:
            data = json.loads(raw)
            state.ca = CertificateAuthority.from_pem(vpn, data["certificate"], data["private-key"])
            state.ca_pem = data["certificate"]
        intern = sys.intern  # one string object per site name, however many pairs
        for key, raw in self._storage.scan(TABLE_PSK, prefix):
            _, site_a, site_b = key.split("/")
            state.psks[(intern(site_a), intern(site_b))] = _psk_record(raw)
        for key, raw in self._storage.scan(TABLE_SA, prefix):
            _, source, target = key.split("/")
            state.put_slot((intern(source), intern(target)), _sa_slot(raw))
        for key, raw in self._storage.scan(TABLE_CERT, prefix):
            _, site = key.split("/")
            data = json.loads(raw)
            state.certs[intern(site)] = CertRecord(
                data["certificate"], data["private-key"], data["source"], _epoch(data["issued"])
            )
        return state

    def _check_site(self, site: str) -> None:
        """check_name() remembered: a mesh asks about each site a thousand times."""
        if site not in self._valid_sites:
            self._valid_sites.add(check_name("site", site))

    def _now(self) -> float:
        return self._clock().timestamp()

    # ------------------------------------------------------------------
    # Per-VPN settings
    # ------------------------------------------------------------------

    def set_vpn_profile(
        self,
        vpn: str,
        strength_bits: int = DEFAULT_STRENGTH,
        certificate_lifetime_days: int = DEFAULT_CERTIFICATE_LIFETIME,
    ) -> frozenset[str]:
        """Record the VPN's minimum strength and certificate lifetime (cheap when unchanged).

        When the strength rises above what the VPN's CA key gives, the CA is
        replaced and every site certificate with it (seed 7: no weak link):
        server-made keys are made again at once on the new curve, a CE key
        that is still strong enough is certified again, a weaker one is
        withdrawn and :meth:`site_certificate` raises :class:`CsrRequired`.
        Pre-shared keys shorter than the new strength needs are replaced at
        their next request.  Returns the sites whose certificate changed.
        """
        profile = VpnProfile(check_strength(strength_bits), certificate_lifetime_days)
        if not 1 <= certificate_lifetime_days <= 3650:
            raise ValueError(
                f"certificate lifetime must be 1..3650 days, not {certificate_lifetime_days}"
            )
        state = self._state(vpn)
        if state.profile == profile:
            return frozenset()
        changed: set[str] = set()
        with self.batch():
            state.profile = profile
            self._changes.pop(vpn, None)  # any key may be replaced at its next request
            self._write(
                TABLE_PROFILE,
                vpn,
                {
                    "strength-bits": profile.strength_bits,
                    "certificate-lifetime-days": profile.certificate_lifetime_days,
                },
            )
            if state.ca is not None and state.ca.strength_bits < curve_strength(
                ca_curve(strength_bits)
            ):
                changed = self._replace_ca(vpn, state)
        return frozenset(changed)

    def vpn_profile(self, vpn: str) -> VpnProfile:
        return self._state(vpn).profile

    # ------------------------------------------------------------------
    # What changed, for the compiler (KeySource.changed_pairs)
    # ------------------------------------------------------------------

    def _changed(self, vpn: str, pair: tuple[str, str]) -> None:
        log = self._changes.get(vpn)
        if log is None:
            log = self._changes[vpn] = ChangeLog()
        log.add(pair)

    def material_mark(self, vpn: str) -> tuple[int, int, int]:
        """Where the VPN's change log stands now (see :meth:`changed_pairs`)."""
        log = self._changes.get(vpn)
        if log is None:
            log = self._changes[vpn] = ChangeLog()
        return self._epoch, log.serial, log.position

    def changed_pairs(self, vpn: str, mark: Hashable) -> frozenset[tuple[str, str]] | None:
        """Pairs (smaller id first) whose PSK or an SA either way changed since ``mark``.

        Identities never change (they are made of the names).  None when the
        mark is void: material was dropped after a failed write, the VPN's
        profile or the VPN itself was replaced, or the log moved past it.
        """
        log = self._changes.get(vpn)
        if log is None or not isinstance(mark, tuple) or len(mark) != 3:
            return None
        epoch, serial, position = mark
        if epoch != self._epoch or serial != log.serial:
            return None
        return log.since(position)

    # ------------------------------------------------------------------
    # Pre-shared keys (seed 3.3 (i))
    # ------------------------------------------------------------------

    def pre_shared_key(self, vpn: str, site_a: str, site_b: str, min_length: int) -> str:
        """The IKE pre-shared key of the pair {site_a, site_b}, in either order.

        Made on first request from the CSPRNG in the URL-safe base64
        alphabet (no character a configuration syntax would need to quote),
        ``max(min_length, strength / 6)`` characters long; the same key is
        returned until :meth:`rotate`.  A stored key shorter than a later
        ``min_length`` or strength demands is replaced.
        """
        state = self._vpns.get(vpn) or self._state(vpn)
        pair = (site_a, site_b) if site_a < site_b else (site_b, site_a)
        record = state.psks.get(pair)
        if (
            record is not None
            and len(record.key) >= min_length
            and len(record.key) >= state.profile.psk_floor
        ):
            return record.key
        if site_a == site_b:
            raise ValueError(f"site {site_a}: a pre-shared key joins two different sites")
        if not 1 <= min_length <= PSK_MAX_LENGTH:
            raise ValueError(f"PSK minimum length must be 1..{PSK_MAX_LENGTH}, not {min_length}")
        self._check_site(site_a)
        self._check_site(site_b)
        return self._new_psk(vpn, state, pair, max(min_length, state.profile.psk_floor))

    def _new_psk(self, vpn: str, state: _VpnState, pair: tuple[str, str], length: int) -> str:
        key = secrets.token_urlsafe(math.ceil(length * 3 / 4))[:length]
        record = PskRecord(key, self._now())
        state.psks[pair] = record
        self._changed(vpn, pair)
        # JSON written by hand: this runs 500,000 times for a 1,000-site mesh
        # and json.dumps() is most of the cost.  Neither the URL-safe key nor
        # the timestamp has a character JSON would escape.
        data = f'{{"key":"{key}","created":"{_iso(record.created)}"}}'.encode()
        self._write_bytes(TABLE_PSK, f"{vpn}/{pair[0]}/{pair[1]}", data)
        return key

    def set_pre_shared_key(self, vpn: str, site_a: str, site_b: str, key: str) -> None:
        """Use a key an operator chose for a pair (cevpn-service allows setting one)."""
        if site_a == site_b:
            raise ValueError(f"site {site_a}: a pre-shared key joins two different sites")
        if not 16 <= len(key) <= PSK_MAX_LENGTH:
            raise ValueError(f"a pre-shared key has 16..{PSK_MAX_LENGTH} characters")
        state = self._state(vpn)
        pair = tuple(sorted((check_name("site", site_a), check_name("site", site_b))))
        record = PskRecord(key, self._now())
        state.psks[(pair[0], pair[1])] = record
        self._changed(vpn, (pair[0], pair[1]))
        self._write(
            TABLE_PSK, f"{vpn}/{pair[0]}/{pair[1]}", {"key": key, "created": _iso(record.created)}
        )

    def pre_shared_key_created(self, vpn: str, site_a: str, site_b: str) -> datetime | None:
        """When the pair's key was made or set (cevpn-service ``keys/pre-shared-key/created``)."""
        pair = (site_a, site_b) if site_a < site_b else (site_b, site_a)
        record = self._state(vpn).psks.get(pair)
        return None if record is None else datetime.fromtimestamp(record.created, UTC)

    # ------------------------------------------------------------------
    # IKE-less SAs (RFC 9061), rekeyed inbound first
    # ------------------------------------------------------------------

    def ikeless_sa(
        self, vpn: str, from_site: str, to_site: str, direction: Direction, suite: SaSuite
    ) -> dict[str, Any]:
        """The SA carrying traffic from ``from_site`` to ``to_site``, as one CE must see it.

        ``direction`` names the CE whose configuration is being compiled:
        "outbound" for ``from_site`` (its ``peer[to_site]/ikeless/outbound``),
        "inbound" for ``to_site`` (its ``peer[from_site]/ikeless/inbound``).
        The receiver is given the ``next`` SA as soon as there is one, the
        sender keeps the ``current`` one until :meth:`receiver_applied`: a
        sender never uses an SA its peer has not installed.

        When the newest SA of the direction was made for another suite (the
        VPN's profile changed), a ``next`` SA with the requested suite is
        made and rolled out the same way, so for a while the outbound view
        still has the old transforms.  Returns a new dict shaped like the
        cevpn-types ``ikeless-sa`` grouping (RFC 7951 member names).
        """
        if direction not in ("outbound", "inbound"):
            raise ValueError(f"direction must be 'outbound' or 'inbound', not {direction!r}")
        state = self._vpns.get(vpn) or self._state(vpn)
        slot = state.sas.get((from_site, to_site))
        if slot is None:
            self._check_site(from_site)
            self._check_site(to_site)
            if from_site == to_site:
                raise ValueError(f"site {from_site}: an SA joins two different sites")
            slot = SaSlot(self._new_sa(state, to_site, suite))
            state.put_slot((from_site, to_site), slot)
            self._write_slot(vpn, from_site, to_site, slot)
        elif not (slot.next or slot.current).matches(suite):
            if slot.next is not None:
                state.spis[to_site].discard(slot.next.spi)
            state.begin_next((from_site, to_site), slot, self._new_sa(state, to_site, suite))
            self._write_slot(vpn, from_site, to_site, slot)
        if direction == "inbound":
            return (slot.next or slot.current).to_yang()
        return slot.current.to_yang()

    def _new_sa(self, state: _VpnState, to_site: str, suite: SaSuite) -> SaRecord:
        encryption = _bare(suite.encryption)
        integrity = _bare(suite.integrity)
        encryption_octets = ENCRYPTION_KEY_OCTETS.get(encryption or "")
        if encryption_octets is None:
            raise ValueError(f"unknown encryption algorithm {suite.encryption!r}")
        if encryption in AEAD_ALGORITHMS:
            if integrity is not None:
                raise ValueError(f"{suite.encryption} is AEAD: it takes no integrity algorithm")
            integrity_octets = 0
        else:
            if integrity is None:
                raise ValueError(f"{suite.encryption} needs an integrity algorithm")
            if integrity not in INTEGRITY_KEY_OCTETS:
                raise ValueError(f"unknown integrity algorithm {suite.integrity!r}")
            integrity_octets = INTEGRITY_KEY_OCTETS[integrity]
        if not 1 <= suite.soft_seconds <= suite.hard_seconds:
            raise ValueError("SA lifetimes must satisfy 1 <= soft-seconds <= hard-seconds")
        used = state.spis.setdefault(to_site, set())
        while True:
            spi = SPI_MIN + secrets.randbelow(SPI_MAX - SPI_MIN + 1)
            if spi not in used:
                break
        used.add(spi)
        return SaRecord(
            spi=spi,
            encryption=suite.encryption,
            encryption_key=_hex_octets(encryption_octets),
            integrity=suite.integrity,
            integrity_key=_hex_octets(integrity_octets) if integrity_octets else None,
            soft_seconds=suite.soft_seconds,
            hard_seconds=suite.hard_seconds,
            created=self._now(),
        )

    def _write_slot(self, vpn: str, from_site: str, to_site: str, slot: SaSlot | None) -> None:
        """Store a direction's SAs: every change of an SA goes through here."""
        self._changed(vpn, (from_site, to_site) if from_site < to_site else (to_site, from_site))
        self._write(
            TABLE_SA, f"{vpn}/{from_site}/{to_site}", None if slot is None else slot.to_json()
        )

    def begin_rekey(
        self, vpn: str, directions: Iterable[tuple[str, str]] | None = None
    ) -> RekeyStep:
        """Make ``next`` SAs (same suite) for ``directions`` (default: every direction of the VPN).

        Directions that already have a ``next`` SA keep it; directions that
        have no SA yet are skipped (their first SA is made when compiled).
        Returns every requested direction that now has a ``next`` SA: push
        the configuration of its :attr:`RekeyStep.receivers`.
        """
        state = self._state(vpn)
        wanted = list(state.sas) if directions is None else list(directions)
        pending: list[tuple[str, str]] = []
        with self.batch():
            for from_site, to_site in wanted:
                slot = state.sas.get((from_site, to_site))
                if slot is None:
                    continue
                if slot.next is None:
                    next_sa = self._new_sa(state, to_site, slot.current.suite())
                    state.begin_next((from_site, to_site), slot, next_sa)
                    self._write_slot(vpn, from_site, to_site, slot)
                pending.append((from_site, to_site))
        return RekeyStep(tuple(sorted(pending)))

    def awaits_receiver(self, vpn: str, site: str) -> bool:
        """Whether ``site`` has new inbound SAs waiting for it to confirm them (so that
        :meth:`receiver_applied` has something to do): callers skip the work of
        listing the SPIs a configuration installs when it has not."""
        return bool(self._state(vpn).rekeying.get(site))

    def receiver_applied(
        self, vpn: str, site: str, installed_spis: Container[int] | None = None
    ) -> RekeyStep:
        """``site`` confirmed a configuration with its ``next`` inbound SAs: make them current.

        From now on the senders' outbound view is the new SA: push the
        configuration of the returned :attr:`RekeyStep.senders`.  Pass the
        inbound SPIs of the configuration the site confirmed as
        ``installed_spis`` when a rekey may have started after that
        configuration was compiled: only SAs the site really installed are
        promoted.
        """
        state = self._state(vpn)
        senders = state.rekeying.get(site, set())
        promoted: list[tuple[str, str]] = []
        with self.batch():
            for from_site in sorted(senders):
                slot = state.sas[(from_site, site)]
                assert slot.next is not None
                if installed_spis is not None and slot.next.spi not in installed_spis:
                    continue
                state.spis[site].discard(slot.current.spi)
                slot.current, slot.next = slot.next, None
                state.waiting_added(slot)
                self._write_slot(vpn, from_site, site, slot)
                promoted.append((from_site, site))
            senders.difference_update(source for source, _ in promoted)
        return RekeyStep(tuple(promoted))

    def next_rekey_at(self, vpn: str, interval_seconds: float) -> float | None:
        """When (epoch seconds) the VPN's oldest current SA is due for a rekey; None when it
        has none that is not already being replaced."""
        oldest = self._state(vpn).oldest_waiting()
        return None if oldest is None else oldest + interval_seconds

    def due_for_rekey(
        self, vpn: str, interval_seconds: float, now: datetime | None = None
    ) -> list[tuple[str, str]]:
        """Directions (from_site, to_site) whose current SA is at least ``interval_seconds`` old.

        Directions with a rekey under way (a ``next`` SA) are left out: they
        are waiting for :meth:`receiver_applied`, not for a new SA.
        """
        limit = (now or self._clock()).timestamp() - interval_seconds
        return sorted(
            direction
            for direction, slot in self._state(vpn).sas.items()
            if slot.next is None and slot.current.created <= limit
        )

    # ------------------------------------------------------------------
    # Certificates (seed 3.3 (ii))
    # ------------------------------------------------------------------

    def _ca(self, vpn: str, state: _VpnState) -> CertificateAuthority:
        if state.ca is None:
            ca = CertificateAuthority.create(vpn, state.profile.strength_bits, self._clock())
            state.ca, state.ca_pem = ca, ca.certificate_pem
            self._write(
                TABLE_CA,
                vpn,
                {
                    "certificate": state.ca_pem,
                    "private-key": ca.private_key_pem(),
                    "created": _iso(self._now()),
                },
            )
        return state.ca

    def ca_certificate(self, vpn: str) -> str:
        """The PEM certificate of the VPN's CA, made on first use for the VPN's strength."""
        state = self._vpns.get(vpn) or self._state(vpn)
        if state.ca is None:
            self._ca(vpn, state)
        return state.ca_pem

    def site_certificate(self, vpn: str, site: str) -> tuple[str, str]:
        """(certificate PEM, private key PEM) of ``site``'s CE.

        Without a CSR the server makes the key pair on first use and returns
        the private key, which reaches the CE inside the SSH channel only.
        After :meth:`issue_from_csr` the private key half is "": the CE made
        its key pair itself and keeps the private key; the configuration
        must then leave the CE's key as it is.
        """
        state = self._vpns.get(vpn) or self._state(vpn)
        record = state.certs.get(site)
        if record is None:
            record = self._store_cert(
                vpn,
                state,
                site,
                self._ca(vpn, state).issue_with_generated_key(
                    check_name("site", site),
                    state.profile.certificate_lifetime_days,
                    self._clock(),
                ),
                "server",
            )
        elif record.source == "csr-required":
            raise CsrRequired(
                f"VPN {vpn} site {site}: the certificate was withdrawn; the CE must send a new CSR"
            )
        return record.certificate_pem, record.private_key_pem

    def issue_from_csr(self, vpn: str, site: str, csr_pem: str | bytes) -> str:
        """Certify a key pair the CE made itself; returns the certificate PEM.

        Raises :class:`nc_server.ca.CsrRefused` for an unreadable, badly
        signed or too weak CSR.  Replaces any earlier certificate of the site.
        """
        state = self._state(vpn)
        issued = self._ca(vpn, state).issue_from_csr(
            check_name("site", site),
            csr_pem,
            state.profile.strength_bits,
            state.profile.certificate_lifetime_days,
            self._clock(),
        )
        return self._store_cert(vpn, state, site, issued, "csr").certificate_pem

    def _store_cert(
        self,
        vpn: str,
        state: _VpnState,
        site: str,
        issued: IssuedCertificate | None,
        source: CertSource,
    ) -> CertRecord:
        """Keep ``issued`` as ``site``'s certificate; None withdraws it ("csr-required")."""
        if issued is None:
            record = CertRecord("", "", source, self._now())
        else:
            record = CertRecord(issued.certificate_pem, issued.private_key_pem, source, self._now())
        state.certs[site] = record
        self._write(
            TABLE_CERT,
            f"{vpn}/{site}",
            {
                "certificate": record.certificate_pem,
                "private-key": record.private_key_pem,
                "source": record.source,
                "issued": _iso(record.issued),
            },
        )
        return record

    def _renew_cert(self, vpn: str, state: _VpnState, site: str) -> bool:
        """Replace ``site``'s certificate under the current CA; False when there is none.

        A server-made key is replaced with a new key pair; a CE's own key is
        certified again if still strong enough, else the certificate is
        withdrawn (:class:`CsrRequired`).
        """
        record = state.certs.get(site)
        if record is None or record.source == "csr-required":
            return False
        ca = self._ca(vpn, state)
        lifetime = state.profile.certificate_lifetime_days
        if record.source == "server":
            issued = ca.issue_with_generated_key(site, lifetime, self._clock())
            self._store_cert(vpn, state, site, issued, "server")
            return True
        old = x509.load_pem_x509_certificate(record.certificate_pem.encode())
        if key_strength(old.public_key()) >= required_key_strength(state.profile.strength_bits):
            self._store_cert(vpn, state, site, ca.reissue(old, lifetime, self._clock()), "csr")
        else:
            self._store_cert(vpn, state, site, None, "csr-required")
        return True

    def _replace_ca(self, vpn: str, state: _VpnState) -> set[str]:
        state.ca, state.ca_pem = None, ""
        self._ca(vpn, state)
        return {site for site in list(state.certs) if self._renew_cert(vpn, state, site)}

    def identity(self, vpn: str, site: str) -> str:
        """The IKE identity of ``site``'s CE, for strongSwan's ``remote.id`` on its peers.

        It is the certificate's subject DN written as strongSwan writes it,
        ``O=cevpn, OU=<vpn>, CN=<site>``: RDNs in their encoded order, which
        is the reverse of the RFC 4514 string ``CN=<site>,OU=<vpn>,O=cevpn``
        that ``x509.Name.rfc4514_string()`` returns.  strongSwan compares
        DNs RDN by RDN in order, so only this form matches the identity a CE
        sends by default (its certificate's subject); see
        :func:`nc_server.ca.ce_identity`.
        """
        return ce_identity(vpn, site)

    # ------------------------------------------------------------------
    # Rotation and removal
    # ------------------------------------------------------------------

    def rotate(self, vpn: str, site: str | None, what: RotateWhat) -> frozenset[str]:
        """Replace material now, for one site's pairs and directions or the whole VPN.

        * pre-shared-keys: new keys (same length) for every existing pair of
          the site (or of the VPN);
        * certificates: new certificates under the same CA (a new key pair
          when the server made it; a CE keeping its own key gets its key
          certified again, and needs :meth:`issue_from_csr` for a new key);
          the CA itself is kept: replacing a trust anchor needs an overlap
          period that this operation cannot give;
        * ikeless-sas: :meth:`begin_rekey` for every direction from or to
          the site (or all), so the usual inbound-first sequence follows.

        Returns the sites whose configuration must be pushed now.
        """
        if what not in ("all", "pre-shared-keys", "certificates", "ikeless-sas"):
            raise ValueError(f"cannot rotate {what!r}")
        state = self._state(vpn)
        affected: set[str] = set()
        with self.batch():
            if what in ("all", "pre-shared-keys"):
                for pair, record in list(state.psks.items()):
                    if site is None or site in pair:
                        self._new_psk(vpn, state, pair, len(record.key))
                        affected.update(pair)
            if what in ("all", "certificates"):
                for name in [site] if site is not None else list(state.certs):
                    if self._renew_cert(vpn, state, name):
                        affected.add(name)
            if what in ("all", "ikeless-sas"):
                directions = [d for d in state.sas if site is None or site in d]
                affected |= self.begin_rekey(vpn, directions).receivers
        return frozenset(affected)

    def forget_site(self, vpn: str, site: str) -> None:
        """Delete everything involving ``site``: its pairs' PSKs, SAs both ways, certificate.

        Called when a site leaves its VPN (seed 3.6); the peers stop using
        the material at their next configuration.
        """
        state = self._state(vpn)
        with self.batch():
            for pair in [p for p in state.psks if site in p]:
                del state.psks[pair]
                self._changed(vpn, pair)
                self._write(TABLE_PSK, f"{vpn}/{pair[0]}/{pair[1]}", None)
            for from_site, to_site in [d for d in state.sas if site in d]:
                state.drop_slot((from_site, to_site))
                self._write_slot(vpn, from_site, to_site, None)
            state.spis.pop(site, None)
            state.rekeying.pop(site, None)
            if state.certs.pop(site, None) is not None:
                self._write(TABLE_CERT, f"{vpn}/{site}", None)

    def forget_vpn(self, vpn: str) -> None:
        """Delete all material of ``vpn``, its CA and its profile included."""
        state = self._state(vpn)
        with self.batch():
            for site_a, site_b in state.psks:
                self._write(TABLE_PSK, f"{vpn}/{site_a}/{site_b}", None)
            for from_site, to_site in state.sas:
                self._write_slot(vpn, from_site, to_site, None)
            for site in state.certs:
                self._write(TABLE_CERT, f"{vpn}/{site}", None)
            self._write(TABLE_CA, vpn, None)
            self._write(TABLE_PROFILE, vpn, None)
            # An empty state, not a missing one: inside an outer batch the
            # deletions are not in storage yet, and a reload would see them.
            self._vpns[vpn] = _VpnState()
            self._changes.pop(vpn, None)  # marks of the VPN are void


def _identity_material(state: _VpnState) -> tuple[Any, ...]:
    """What of a VPN is not per pair: its profile, CA and certificates (without the times
    of issue, kept in memory to the microsecond and stored to the second)."""
    certs = {
        site: (cert.certificate_pem, cert.private_key_pem, cert.source)
        for site, cert in state.certs.items()
    }
    return state.profile, state.ca_pem, certs


def _slot_differs(before: SaSlot, after: SaSlot) -> bool:
    """Whether a direction's SAs differ in anything a CE's configuration carries (the
    creation time is the key store's alone)."""
    if (before.next is None) != (after.next is None):
        return True
    if before.current.to_yang() != after.current.to_yang():
        return True
    return (
        before.next is not None
        and after.next is not None
        and (before.next.to_yang() != after.next.to_yang())
    )


def _bare(identity: str | None) -> str | None:
    """An identity without its module prefix: "cevpn-types:x", "cevpn-t:x" and "x" are one."""
    return None if identity is None else identity.rpartition(":")[2]


def _hex_octets(count: int) -> str:
    """``count`` random octets as colon-separated lowercase hex (yang:hex-string)."""
    return secrets.token_bytes(count).hex(":")


def _iso(epoch: float) -> str:
    """yang:date-and-time in UTC, to the second."""
    return _iso_second(int(epoch))


# Cached: a batch makes thousands of records within the same second, and a
# VPN loaded from storage has as many timestamps as records but few distinct.
@functools.lru_cache(maxsize=16)
def _iso_second(second: int) -> str:
    return datetime.fromtimestamp(second, UTC).isoformat().replace("+00:00", "Z")


@functools.lru_cache(maxsize=4096)
def _epoch(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


def _psk_record(raw: bytes) -> PskRecord:
    """A stored pre-shared key (table ``keystore/psk``)."""
    data = json.loads(raw)
    return PskRecord(data["key"], _epoch(data["created"]))


def _sa_slot(raw: bytes) -> SaSlot:
    """A stored direction's SAs (table ``keystore/ikeless-sa``)."""
    data = json.loads(raw)
    following = data.get("next")
    return SaSlot(
        SaRecord.from_json(data["current"]),
        None if following is None else SaRecord.from_json(following),
    )


if TYPE_CHECKING:

    def _is_a_key_source(store: KeyStore) -> KeySource:
        return store  # mypy proves here that KeyStore implements the compiler's protocol
