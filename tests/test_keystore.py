"""The VPN server's key store (nc_server/keystore.py): PSKs, IKE-less SAs, certificates."""

from __future__ import annotations

import copy
import json
import logging
import re
import stat
from collections.abc import Collection, Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from nc_server import keystore as keystore_module
from nc_server.ca import ChainError, CsrRefused, verify_chain
from nc_server.compiler import SaSuite
from nc_server.keystore import TABLE_CERT, TABLE_PSK, TABLE_SA, CsrRequired, KeyStore
from nc_server.storage import SqliteStorage

EXAMPLE = Path(__file__).parent / "examples" / "valid" / "ce-site-b-ikeless.json"
HEX = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2})*")
URLSAFE = re.compile(r"[A-Za-z0-9_-]+")

GCM = SaSuite("cevpn-types:encr-aes-gcm-16-256", None, 3600, 4200)
CBC = SaSuite("cevpn-types:encr-aes-cbc-256", "cevpn-types:auth-hmac-sha2-256-128", 3600, 4200)

# Octets per algorithm, from the RFCs (key + salt/nonce where there is one).
ENCRYPTION_OCTETS = {
    "encr-aes-cbc-128": 16,
    "encr-aes-cbc-192": 24,
    "encr-aes-cbc-256": 32,
    "encr-3des": 24,
    "encr-aes-ctr-128": 20,
    "encr-aes-ctr-256": 36,
    "encr-aes-gcm-16-128": 20,
    "encr-aes-gcm-16-192": 28,
    "encr-aes-gcm-16-256": 36,
    "encr-aes-ccm-16-128": 19,
    "encr-aes-ccm-16-256": 35,
    "encr-chacha20-poly1305": 36,
}
AEAD = {"encr-aes-gcm-16-128", "encr-aes-gcm-16-192", "encr-aes-gcm-16-256"} | {
    "encr-aes-ccm-16-128",
    "encr-aes-ccm-16-256",
    "encr-chacha20-poly1305",
}
INTEGRITY_OCTETS = {
    "auth-hmac-sha1-96": 20,
    "auth-aes-xcbc-96": 16,
    "auth-hmac-sha2-256-128": 32,
    "auth-hmac-sha2-384-192": 48,
    "auth-hmac-sha2-512-256": 64,
}


def suite_for(encryption: str, integrity: str = "auth-hmac-sha2-256-128") -> SaSuite:
    return SaSuite(
        f"cevpn-types:{encryption}",
        None if encryption in AEAD else f"cevpn-types:{integrity}",
        3600,
        4200,
    )


def octets(hex_string: str) -> int:
    assert HEX.fullmatch(hex_string), "colon-separated lowercase hex"
    return len(hex_string.split(":"))


class Clock:
    def __init__(self) -> None:
        self.now = datetime.now(UTC).replace(microsecond=0)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


class CountingStorage(SqliteStorage):
    """SqliteStorage that counts what reaches it."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.reads = 0
        self.writes = 0
        self.transactions = 0

    def get(self, table: str, key: str) -> bytes | None:
        self.reads += 1
        return super().get(table, key)

    def get_many(self, table: str, keys: Collection[str]) -> dict[str, bytes]:
        self.reads += 1
        return super().get_many(table, keys)

    def scan(self, table: str, prefix: str = "") -> list[tuple[str, bytes]]:
        self.reads += 1
        return super().scan(table, prefix)

    def put(self, table: str, key: str, value: bytes) -> None:
        self.writes += 1
        super().put(table, key, value)

    def delete(self, table: str, key: str) -> None:
        self.writes += 1
        super().delete(table, key)

    def write_many(self, rows: Mapping[tuple[str, str], bytes | None]) -> None:
        self.writes += len(rows)
        super().write_many(rows)

    @contextmanager
    def transaction(self) -> Iterator[None]:
        outermost = self._depth == 0
        with super().transaction():
            if outermost:
                self.transactions += 1
            yield


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "vpn-server.db"


@pytest.fixture
def storage(db: Path) -> Iterator[CountingStorage]:
    storage = CountingStorage(db)
    yield storage
    storage.close()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def ks(storage: CountingStorage, clock: Clock) -> KeyStore:
    return KeyStore(storage, clock)


def reopen(db: Path, clock: Clock | None = None) -> KeyStore:
    return KeyStore(SqliteStorage(db), clock)


def make_csr(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> str:
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ce")]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def public_key_of(pem: str) -> object:
    return x509.load_pem_x509_certificate(pem.encode()).public_key()


# --- pre-shared keys --------------------------------------------------------


def test_psk_is_the_same_on_every_call(ks):
    assert ks.pre_shared_key("v1", "a", "b", 32) == ks.pre_shared_key("v1", "a", "b", 32)


def test_psk_survives_a_new_keystore_on_the_same_storage_file(ks, db):
    key = ks.pre_shared_key("v1", "a", "b", 32)
    assert reopen(db).pre_shared_key("v1", "a", "b", 32) == key


def test_psk_does_not_depend_on_the_order_of_the_pair(ks):
    assert ks.pre_shared_key("v1", "b", "a", 32) == ks.pre_shared_key("v1", "a", "b", 32)


@pytest.mark.parametrize("min_length", [16, 32, 33, 64, 1024])
def test_psk_has_at_least_min_length_url_safe_characters(ks, min_length):
    key = ks.pre_shared_key("v1", "a", "b", min_length)
    assert len(key) >= min_length
    assert URLSAFE.fullmatch(key)


def test_psk_is_long_enough_for_the_vpn_strength_whatever_min_length_says(ks):
    ks.set_vpn_profile("v1", 256, 365)
    assert len(ks.pre_shared_key("v1", "a", "b", 16)) >= 43  # 43 * 6 bits >= 256


def test_psks_differ_between_pairs_and_between_vpns(ks):
    keys = {
        ks.pre_shared_key("v1", "a", "b", 32),
        ks.pre_shared_key("v1", "a", "c", 32),
        ks.pre_shared_key("v1", "b", "c", 32),
        ks.pre_shared_key("v2", "a", "b", 32),
    }
    assert len(keys) == 4


def test_psk_shorter_than_a_new_min_length_is_replaced(ks):
    short = ks.pre_shared_key("v1", "a", "b", 32)
    longer = ks.pre_shared_key("v1", "a", "b", 48)
    assert len(longer) >= 48
    assert longer != short


def test_psk_creation_time_is_stored(ks, db, clock):
    ks.pre_shared_key("v1", "a", "b", 32)
    assert ks.pre_shared_key_created("v1", "b", "a") == clock.now
    assert reopen(db).pre_shared_key_created("v1", "a", "b") == clock.now


def test_psk_of_a_site_with_itself_is_refused(ks):
    with pytest.raises(ValueError, match="two different sites"):
        ks.pre_shared_key("v1", "a", "a", 32)


def test_psk_set_by_an_operator_is_returned(ks, db):
    ks.set_pre_shared_key("v1", "b", "a", 'operator chose "this" one')
    assert ks.pre_shared_key("v1", "a", "b", 16) == 'operator chose "this" one'
    assert reopen(db).pre_shared_key("v1", "a", "b", 16) == 'operator chose "this" one'


def test_names_that_could_break_storage_keys_are_refused(ks):
    with pytest.raises(ValueError, match="not a cevpn name"):
        ks.pre_shared_key("v1", "a/b", "c", 32)
    with pytest.raises(ValueError, match="not a cevpn name"):
        ks.pre_shared_key("v/1", "a", "c", 32)


# --- IKE-less SAs: keys -----------------------------------------------------


@pytest.mark.parametrize("encryption", sorted(ENCRYPTION_OCTETS))
def test_encryption_key_has_the_length_the_algorithm_needs(ks, encryption):
    sa = ks.ikeless_sa("v1", "a", "b", "outbound", suite_for(encryption))
    assert octets(sa["encryption-key"]) == ENCRYPTION_OCTETS[encryption]
    assert sa["encryption-algorithm"] == f"cevpn-types:{encryption}"


@pytest.mark.parametrize("integrity", sorted(INTEGRITY_OCTETS))
def test_integrity_key_has_the_length_the_algorithm_needs(ks, integrity):
    sa = ks.ikeless_sa("v1", "a", "b", "outbound", suite_for("encr-aes-cbc-128", integrity))
    assert octets(sa["integrity-key"]) == INTEGRITY_OCTETS[integrity]
    assert sa["integrity-algorithm"] == f"cevpn-types:{integrity}"


def test_aead_sa_has_no_integrity_algorithm_or_key(ks):
    sa = ks.ikeless_sa("v1", "a", "b", "outbound", GCM)
    assert "integrity-algorithm" not in sa
    assert "integrity-key" not in sa


def test_sa_lifetime_comes_from_the_suite(ks):
    sa = ks.ikeless_sa("v1", "a", "b", "outbound", SaSuite(GCM.encryption, None, 100, 130))
    assert sa["lifetime"] == {"soft-seconds": 100, "hard-seconds": 130}


def ce_document(outbound: dict, inbound: dict) -> str:
    document = json.loads(EXAMPLE.read_text())
    peer = document["cevpn-ce:ce"]["peer"][0]
    peer["ikeless"]["outbound"] = outbound
    peer["ikeless"]["inbound"] = inbound
    return json.dumps(document)


@pytest.mark.parametrize(
    "suite",
    [suite_for(e) for e in sorted(ENCRYPTION_OCTETS)]
    + [suite_for("encr-aes-cbc-256", i) for i in sorted(INTEGRITY_OCTETS)],
    ids=lambda s: f"{s.encryption.split(':')[1]}/{(s.integrity or ':aead').split(':')[1]}",
)
def test_generated_sa_is_valid_in_a_cevpn_ce_document(ks, ce_schema, suite):
    outbound = ks.ikeless_sa("v1", "site-b", "site-a", "outbound", suite)
    inbound = ks.ikeless_sa("v1", "site-a", "site-b", "inbound", suite)
    ce_schema.parse_config(ce_document(outbound, inbound), "json")


def test_sa_of_an_aead_algorithm_with_an_integrity_algorithm_is_refused(ks):
    with pytest.raises(ValueError, match="AEAD"):
        ks.ikeless_sa("v1", "a", "b", "outbound", SaSuite(GCM.encryption, CBC.integrity, 1, 2))


def test_sa_of_a_non_aead_algorithm_without_integrity_is_refused(ks):
    with pytest.raises(ValueError, match="needs an integrity"):
        ks.ikeless_sa("v1", "a", "b", "outbound", SaSuite(CBC.encryption, None, 1, 2))


def test_sa_of_an_unknown_algorithm_is_refused(ks):
    with pytest.raises(ValueError, match="unknown encryption"):
        ks.ikeless_sa("v1", "a", "b", "outbound", SaSuite("cevpn-types:encr-des", None, 1, 2))


def test_sa_is_the_same_on_every_call_and_after_a_restart(ks, db):
    first = ks.ikeless_sa("v1", "a", "b", "outbound", CBC)
    assert ks.ikeless_sa("v1", "a", "b", "inbound", CBC) == first
    assert reopen(db).ikeless_sa("v1", "a", "b", "outbound", CBC) == first


def test_the_two_directions_of_a_pair_are_different_sas(ks):
    there = ks.ikeless_sa("v1", "a", "b", "outbound", GCM)
    back = ks.ikeless_sa("v1", "b", "a", "outbound", GCM)
    assert there["encryption-key"] != back["encryption-key"]


# --- IKE-less SAs: SPIs -----------------------------------------------------


def test_spis_are_in_the_valid_range_and_unique_among_what_a_site_receives(ks):
    spis = [ks.ikeless_sa("v1", f"s{i}", "hub", "inbound", GCM)["spi"] for i in range(300)]
    assert len(set(spis)) == 300
    assert all(256 <= spi <= 2**32 - 1 for spi in spis)


def test_an_spi_already_received_by_the_site_is_drawn_again(ks, monkeypatch):
    draws = iter([5, 5, 9])
    monkeypatch.setattr(keystore_module.secrets, "randbelow", lambda _: next(draws))
    first = ks.ikeless_sa("v1", "a", "hub", "inbound", GCM)
    second = ks.ikeless_sa("v1", "b", "hub", "inbound", GCM)
    assert (first["spi"], second["spi"]) == (256 + 5, 256 + 9)


def test_different_receivers_may_use_the_same_spi(ks, monkeypatch):
    monkeypatch.setattr(keystore_module.secrets, "randbelow", lambda _: 5)
    to_b = ks.ikeless_sa("v1", "a", "b", "inbound", GCM)
    to_c = ks.ikeless_sa("v1", "a", "c", "inbound", GCM)
    assert to_b["spi"] == to_c["spi"] == 261


def test_spis_of_pending_next_sas_stay_unique_after_a_restart(ks, db, monkeypatch):
    ks.ikeless_sa("v1", "a", "hub", "inbound", GCM)
    ks.begin_rekey("v1")
    taken = {ks.ikeless_sa("v1", "a", "hub", "outbound", GCM)["spi"]}
    taken.add(ks.ikeless_sa("v1", "a", "hub", "inbound", GCM)["spi"])
    draws = iter([spi - 256 for spi in sorted(taken)] + [77])
    monkeypatch.setattr(keystore_module.secrets, "randbelow", lambda _: next(draws))
    assert reopen(db).ikeless_sa("v1", "b", "hub", "inbound", GCM)["spi"] == 256 + 77


# --- IKE-less SAs: rekey, inbound first ---------------------------------------


def test_rekey_gives_the_receiver_the_new_sa_first(ks):
    old = ks.ikeless_sa("v1", "a", "b", "outbound", GCM)
    step = ks.begin_rekey("v1", [("a", "b")])
    assert step.directions == (("a", "b"),)
    assert step.receivers == {"b"}
    new = ks.ikeless_sa("v1", "a", "b", "inbound", GCM)
    assert new["spi"] != old["spi"]
    assert ks.ikeless_sa("v1", "a", "b", "outbound", GCM) == old


def test_rekey_moves_the_sender_once_the_receiver_applied(ks):
    ks.ikeless_sa("v1", "a", "b", "outbound", GCM)
    ks.begin_rekey("v1", [("a", "b")])
    new = ks.ikeless_sa("v1", "a", "b", "inbound", GCM)
    step = ks.receiver_applied("v1", "b")
    assert step.directions == (("a", "b"),)
    assert step.senders == {"a"}
    assert ks.ikeless_sa("v1", "a", "b", "outbound", GCM) == new
    assert ks.ikeless_sa("v1", "a", "b", "inbound", GCM) == new


def test_rekey_step_is_false_when_nothing_moved(ks):
    ks.ikeless_sa("v1", "a", "b", "outbound", GCM)
    assert not ks.receiver_applied("v1", "b")
    assert ks.begin_rekey("v1")
    assert ks.receiver_applied("v1", "b")
    assert not ks.receiver_applied("v1", "b")


def test_receiver_applied_promotes_only_directions_towards_that_site(ks):
    for direction in [("a", "b"), ("b", "a"), ("c", "b")]:
        ks.ikeless_sa("v1", *direction, "outbound", GCM)
    ks.begin_rekey("v1")
    assert ks.receiver_applied("v1", "b").directions == (("a", "b"), ("c", "b"))
    assert ks.due_for_rekey("v1", 0) == [("a", "b"), ("c", "b")]  # b->a is still pending


def test_receiver_applied_promotes_only_the_spis_the_site_installed(ks):
    ks.ikeless_sa("v1", "a", "b", "outbound", GCM)
    ks.ikeless_sa("v1", "c", "b", "outbound", GCM)
    ks.begin_rekey("v1")
    installed = {ks.ikeless_sa("v1", "a", "b", "inbound", GCM)["spi"]}
    assert ks.receiver_applied("v1", "b", installed).directions == (("a", "b"),)


def test_begin_rekey_twice_keeps_the_pending_sa(ks):
    ks.ikeless_sa("v1", "a", "b", "outbound", GCM)
    ks.begin_rekey("v1")
    pending = ks.ikeless_sa("v1", "a", "b", "inbound", GCM)
    assert ks.begin_rekey("v1").directions == (("a", "b"),)
    assert ks.ikeless_sa("v1", "a", "b", "inbound", GCM) == pending


def test_begin_rekey_skips_directions_without_an_sa(ks):
    assert ks.begin_rekey("v1", [("a", "b")]).directions == ()


def test_a_rekey_under_way_survives_a_restart(ks, db):
    old = ks.ikeless_sa("v1", "a", "b", "outbound", GCM)
    ks.begin_rekey("v1")
    new = ks.ikeless_sa("v1", "a", "b", "inbound", GCM)
    again = reopen(db)
    assert again.ikeless_sa("v1", "a", "b", "outbound", GCM) == old
    assert again.ikeless_sa("v1", "a", "b", "inbound", GCM) == new
    assert again.receiver_applied("v1", "b").directions == (("a", "b"),)
    assert again.ikeless_sa("v1", "a", "b", "outbound", GCM) == new


def test_a_changed_suite_is_rolled_out_inbound_first(ks):
    old = ks.ikeless_sa("v1", "a", "b", "outbound", GCM)
    new = ks.ikeless_sa("v1", "a", "b", "inbound", CBC)
    assert new["encryption-algorithm"] == CBC.encryption
    assert new["spi"] != old["spi"]
    assert ks.ikeless_sa("v1", "a", "b", "outbound", CBC) == old
    ks.receiver_applied("v1", "b")
    assert ks.ikeless_sa("v1", "a", "b", "outbound", CBC) == new


def test_a_changed_lifetime_makes_a_new_sa(ks):
    old = ks.ikeless_sa("v1", "a", "b", "inbound", GCM)
    new = ks.ikeless_sa("v1", "a", "b", "inbound", SaSuite(GCM.encryption, None, 60, 90))
    assert new["spi"] != old["spi"]
    assert new["lifetime"] == {"soft-seconds": 60, "hard-seconds": 90}


def test_due_for_rekey_lists_sas_older_than_the_interval(ks, clock):
    ks.ikeless_sa("v1", "a", "b", "outbound", GCM)
    clock.advance(1800)
    ks.ikeless_sa("v1", "b", "a", "outbound", GCM)
    assert ks.due_for_rekey("v1", 3600, clock.now) == []
    assert ks.due_for_rekey("v1", 3600, clock.now + timedelta(seconds=1800)) == [("a", "b")]
    assert ks.due_for_rekey("v1", 3600, clock.now + timedelta(seconds=3600)) == [
        ("a", "b"),
        ("b", "a"),
    ]


def test_due_for_rekey_leaves_out_directions_already_being_rekeyed(ks, clock):
    ks.ikeless_sa("v1", "a", "b", "outbound", GCM)
    ks.ikeless_sa("v1", "b", "a", "outbound", GCM)
    ks.begin_rekey("v1", [("a", "b")])
    assert ks.due_for_rekey("v1", 60, clock.now + timedelta(hours=1)) == [("b", "a")]


def test_due_for_rekey_counts_from_the_new_sa_after_promotion(ks, clock):
    ks.ikeless_sa("v1", "a", "b", "outbound", GCM)
    clock.advance(3600)
    ks.begin_rekey("v1")
    ks.receiver_applied("v1", "b")
    assert ks.due_for_rekey("v1", 3600, clock.now) == []


def test_the_next_rekey_follows_every_change_of_the_sas(ks, clock, db):
    """next_rekey_at is kept as SAs come, are rekeyed, promoted and dropped: at each step
    it is the oldest current SA not being rekeyed, plus the interval."""
    start = clock.now.timestamp()

    def due_at(seconds_after_start: float) -> float:
        return start + seconds_after_start + 100

    ks.ikeless_sa("v1", "a", "b", "outbound", GCM)  # created at +0
    assert ks.next_rekey_at("v1", 100) == due_at(0)
    clock.advance(10)
    ks.ikeless_sa("v1", "b", "a", "outbound", GCM)  # +10
    assert ks.next_rekey_at("v1", 100) == due_at(0)
    clock.advance(10)
    ks.begin_rekey("v1", [("a", "b")])  # a->b's next made at +20
    assert ks.next_rekey_at("v1", 100) == due_at(10)
    clock.advance(10)
    ks.ikeless_sa("v1", "c", "a", "outbound", GCM)  # +30
    ks.receiver_applied("v1", "b")  # a->b's current is the one made at +20
    assert ks.next_rekey_at("v1", 100) == due_at(10)
    ks.begin_rekey("v1", [("b", "a")])  # b->a's next made at +30
    assert ks.next_rekey_at("v1", 100) == due_at(20)
    clock.advance(10)
    ks.ikeless_sa("v1", "a", "b", "inbound", CBC)  # a changed suite: a->b is rekeyed
    assert ks.next_rekey_at("v1", 100) == due_at(30)
    ks.forget_site("v1", "c")
    assert ks.next_rekey_at("v1", 100) is None  # both others are being rekeyed
    other = reopen(db, clock)  # another server promotes b->a, this one reloads
    other.receiver_applied("v1", "a")
    ks.reload_rows("v1", [(TABLE_SA, "v1/b/a")])
    assert ks.next_rekey_at("v1", 100) == due_at(30)
    ks.forget_site("v1", "a")
    assert ks.next_rekey_at("v1", 100) is None
    assert reopen(db, clock).next_rekey_at("v1", 100) is None


def test_new_sas_keep_the_next_rekey_without_looking_at_every_sa(ks, clock, monkeypatch):
    """A commit adding a site adds SAs to a VPN that may hold a million: the next rekey
    is known without a scan of them (a scan only after the oldest one went)."""
    scans: list[int] = []
    scan = keystore_module._VpnState.scan_oldest
    monkeypatch.setattr(
        keystore_module._VpnState, "scan_oldest", lambda self: scans.append(1) or scan(self)
    )
    ks.ikeless_sa("v1", "a", "b", "outbound", GCM)
    first = ks.next_rekey_at("v1", 100)
    for site in "cdef":
        clock.advance(1)
        ks.ikeless_sa("v1", site, "a", "outbound", GCM)
        ks.ikeless_sa("v1", "a", site, "outbound", GCM)
        assert ks.next_rekey_at("v1", 100) == first
    assert scans == []
    ks.begin_rekey("v1", [("a", "b")])
    assert ks.next_rekey_at("v1", 100) == first + 1
    assert scans == [1]


# --- certificates ------------------------------------------------------------


def test_ca_is_made_on_first_use_for_the_vpn_strength(ks):
    ks.set_vpn_profile("v1", 192, 365)
    ca = x509.load_pem_x509_certificate(ks.ca_certificate("v1").encode())
    assert ca.public_key().curve.name == "secp384r1"


def test_ca_is_the_same_on_every_call_and_after_a_restart(ks, db):
    ca = ks.ca_certificate("v1")
    assert ks.ca_certificate("v1") == ca
    assert reopen(db).ca_certificate("v1") == ca


def test_site_certificate_without_csr_comes_with_a_server_made_key(ks, clock):
    certificate, private_key = ks.site_certificate("v1", "site-a")
    key = serialization.load_pem_private_key(private_key.encode(), password=None)
    assert key.public_key() == public_key_of(certificate)
    verify_chain(certificate, ks.ca_certificate("v1"), clock.now)


def test_site_certificate_is_the_same_on_every_call_and_after_a_restart(ks, db):
    issued = ks.site_certificate("v1", "site-a")
    assert ks.site_certificate("v1", "site-a") == issued
    assert reopen(db).site_certificate("v1", "site-a") == issued


def test_site_certificate_lifetime_follows_the_vpn_profile(ks, clock):
    ks.set_vpn_profile("v1", 128, 30)
    certificate = x509.load_pem_x509_certificate(ks.site_certificate("v1", "a")[0].encode())
    assert certificate.not_valid_after_utc == clock.now + timedelta(days=30)


def test_site_certificate_after_a_csr_has_no_private_key(ks, clock):
    key = ec.generate_private_key(ec.SECP256R1())
    issued = ks.issue_from_csr("v1", "site-a", make_csr(key))
    certificate, private_key = ks.site_certificate("v1", "site-a")
    assert (certificate, private_key) == (issued, "")
    assert public_key_of(certificate) == key.public_key()
    verify_chain(certificate, ks.ca_certificate("v1"), clock.now)


def test_csr_weaker_than_the_vpn_is_refused(ks):
    with pytest.raises(CsrRefused):
        ks.issue_from_csr("v1", "site-a", make_csr(rsa.generate_private_key(65537, 2048)))


def test_certificate_of_one_vpn_does_not_chain_to_another_vpns_ca(ks, clock):
    certificate, _ = ks.site_certificate("v1", "site-a")
    with pytest.raises(ChainError):
        verify_chain(certificate, ks.ca_certificate("v2"), clock.now)


def test_identity_is_the_certificate_subject_as_strongswan_writes_it(ks):
    certificate = x509.load_pem_x509_certificate(ks.site_certificate("v1", "site-a")[0].encode())
    assert certificate.subject.rfc4514_string() == "CN=site-a,OU=v1,O=cevpn"
    assert ks.identity("v1", "site-a") == "O=cevpn, OU=v1, CN=site-a"


def test_raising_the_strength_replaces_a_weaker_ca_and_its_certificates(ks, clock):
    old_ca = ks.ca_certificate("v1")
    old_certificate, _ = ks.site_certificate("v1", "a")
    assert ks.set_vpn_profile("v1", 192, 365) == {"a"}
    new_ca = ks.ca_certificate("v1")
    assert new_ca != old_ca
    certificate, _ = ks.site_certificate("v1", "a")
    assert certificate != old_certificate
    assert public_key_of(certificate).curve.name == "secp384r1"
    verify_chain(certificate, new_ca, clock.now)


def test_raising_the_strength_withdraws_a_csr_certificate_with_a_weak_key(ks):
    ks.issue_from_csr("v1", "a", make_csr(ec.generate_private_key(ec.SECP256R1())))
    ks.issue_from_csr("v1", "b", make_csr(ec.generate_private_key(ec.SECP384R1())))
    ks.set_vpn_profile("v1", 192, 365)
    with pytest.raises(CsrRequired):
        ks.site_certificate("v1", "a")
    certificate, key = ks.site_certificate("v1", "b")
    assert key == ""
    assert public_key_of(certificate).curve.name == "secp384r1"


def test_lowering_the_strength_keeps_the_stronger_ca(ks):
    ks.set_vpn_profile("v1", 192, 365)
    ca = ks.ca_certificate("v1")
    assert ks.set_vpn_profile("v1", 128, 365) == frozenset()
    assert ks.ca_certificate("v1") == ca


def test_vpn_profile_is_persisted(ks, db):
    ks.set_vpn_profile("v1", 256, 90)
    profile = reopen(db).vpn_profile("v1")
    assert (profile.strength_bits, profile.certificate_lifetime_days) == (256, 90)


# --- rotation -----------------------------------------------------------------


def test_rotate_psks_of_a_site_replaces_its_pairs_only(ks):
    before = {
        pair: ks.pre_shared_key("v1", *pair, 32) for pair in [("a", "b"), ("a", "c"), ("b", "c")]
    }
    assert ks.rotate("v1", "a", "pre-shared-keys") == {"a", "b", "c"}
    after = {pair: ks.pre_shared_key("v1", *pair, 32) for pair in before}
    assert after["a", "b"] != before["a", "b"]
    assert after["a", "c"] != before["a", "c"]
    assert after["b", "c"] == before["b", "c"]


def test_rotate_psks_of_the_vpn_replaces_every_pair(ks, db):
    before = {pair: ks.pre_shared_key("v1", *pair, 32) for pair in [("a", "b"), ("b", "c")]}
    ks.rotate("v1", None, "pre-shared-keys")
    after = reopen(db)
    assert all(after.pre_shared_key("v1", *pair, 32) != key for pair, key in before.items())


def test_rotate_certificates_makes_a_new_key_pair_under_the_same_ca(ks, clock):
    ca = ks.ca_certificate("v1")
    old_certificate, old_key = ks.site_certificate("v1", "a")
    assert ks.rotate("v1", "a", "certificates") == {"a"}
    certificate, key = ks.site_certificate("v1", "a")
    assert key != old_key and certificate != old_certificate
    assert ks.ca_certificate("v1") == ca
    verify_chain(certificate, ca, clock.now)


def test_rotate_certificates_of_a_ce_with_its_own_key_certifies_that_key_again(ks):
    key = ec.generate_private_key(ec.SECP256R1())
    old = ks.issue_from_csr("v1", "a", make_csr(key))
    ks.rotate("v1", None, "certificates")
    certificate, private_key = ks.site_certificate("v1", "a")
    assert certificate != old and private_key == ""
    assert public_key_of(certificate) == key.public_key()


def test_rotate_ikeless_sas_of_a_site_starts_a_rekey_of_its_directions(ks):
    for direction in [("a", "b"), ("b", "a"), ("b", "c"), ("c", "b")]:
        ks.ikeless_sa("v1", *direction, "outbound", GCM)
    assert ks.rotate("v1", "a", "ikeless-sas") == {"a", "b"}  # the receivers
    assert ks.receiver_applied("v1", "b").directions == (("a", "b"),)
    assert ks.receiver_applied("v1", "c").directions == ()


def test_rotate_all_replaces_psks_certificates_and_sas(ks):
    psk = ks.pre_shared_key("v1", "a", "b", 32)
    certificate, _ = ks.site_certificate("v1", "a")
    sa = ks.ikeless_sa("v1", "b", "a", "inbound", GCM)
    assert ks.rotate("v1", "a", "all") == {"a", "b"}
    assert ks.pre_shared_key("v1", "a", "b", 32) != psk
    assert ks.site_certificate("v1", "a")[0] != certificate
    assert ks.ikeless_sa("v1", "b", "a", "inbound", GCM) != sa


def test_rotate_refuses_an_unknown_kind_of_material(ks):
    with pytest.raises(ValueError, match="cannot rotate"):
        ks.rotate("v1", None, "passwords")  # type: ignore[arg-type]


# --- forgetting ---------------------------------------------------------------


def fill(ks: KeyStore) -> None:
    for pair in [("a", "b"), ("a", "c"), ("b", "c")]:
        ks.pre_shared_key("v1", *pair, 32)
        ks.ikeless_sa("v1", *pair, "outbound", GCM)
        ks.ikeless_sa("v1", *reversed(pair), "outbound", GCM)
    for site in "abc":
        ks.site_certificate("v1", site)


def test_forget_site_deletes_everything_involving_the_site(ks, storage):
    fill(ks)
    ks.forget_site("v1", "a")
    assert [k for k, _ in storage.scan(TABLE_PSK, "v1/")] == ["v1/b/c"]
    assert [k for k, _ in storage.scan(TABLE_SA, "v1/")] == ["v1/b/c", "v1/c/b"]
    assert [k for k, _ in storage.scan(TABLE_CERT, "v1/")] == ["v1/b", "v1/c"]


def test_forget_site_then_rejoin_makes_new_material(ks, db):
    psk = ks.pre_shared_key("v1", "a", "b", 32)
    ks.forget_site("v1", "a")
    assert reopen(db).pre_shared_key("v1", "a", "b", 32) != psk


def test_forget_vpn_deletes_all_its_material_and_no_other(ks, storage, db):
    fill(ks)
    ks.pre_shared_key("v10", "a", "b", 32)
    ca = ks.ca_certificate("v1")
    ks.forget_vpn("v1")
    tables = {table for (table,) in storage._db.execute("SELECT DISTINCT tbl FROM kv")}
    keys = [key for table in tables for key, _ in storage.scan(table)]
    assert keys == ["v10/a/b"]
    assert reopen(db).ca_certificate("v1") != ca


# --- cache and batching -------------------------------------------------------


def test_existing_material_is_served_without_touching_storage(ks, storage):
    fill(ks)
    storage.reads = storage.writes = 0
    ks.pre_shared_key("v1", "a", "b", 32)
    ks.ikeless_sa("v1", "a", "b", "outbound", GCM)
    ks.site_certificate("v1", "a")
    ks.ca_certificate("v1")
    ks.identity("v1", "a")
    assert (storage.reads, storage.writes) == (0, 0)


def test_a_vpn_is_read_from_storage_once(db, clock):
    KeyStore(SqliteStorage(db), clock).pre_shared_key("v1", "a", "b", 32)
    storage = CountingStorage(db)
    ks = KeyStore(storage, clock)
    ks.pre_shared_key("v1", "a", "b", 32)
    reads = storage.reads
    ks.pre_shared_key("v1", "a", "c", 32)
    ks.ikeless_sa("v1", "a", "c", "outbound", GCM)
    assert storage.reads == reads


def test_batch_commits_its_writes_in_one_transaction(ks, storage):
    with ks.batch():
        for site in ("b", "c", "d", "e"):
            ks.pre_shared_key("v1", "a", site, 32)
        assert storage.writes == 0
    assert storage.transactions == 1
    assert storage.writes == 4


def test_failed_batch_writes_nothing_and_is_forgotten(ks, storage, db):
    kept = ks.pre_shared_key("v1", "a", "b", 32)
    with pytest.raises(RuntimeError), ks.batch():
        ks.pre_shared_key("v1", "a", "c", 32)
        ks.rotate("v1", None, "pre-shared-keys")
        raise RuntimeError("compile failed")
    assert storage.scan(TABLE_PSK, "v1/a/c") == []
    assert ks.pre_shared_key("v1", "a", "b", 32) == kept


def test_forget_vpn_inside_a_batch_is_not_undone_by_a_reload(ks, storage):
    ks.pre_shared_key("v1", "a", "b", 32)
    with ks.batch():
        ks.forget_vpn("v1")
        assert ks.begin_rekey("v1").directions == ()
        assert ks.due_for_rekey("v1", 0) == []
    assert storage.scan(TABLE_PSK, "v1/") == []


# --- secrets ------------------------------------------------------------------


def test_storage_file_is_readable_by_its_owner_only(ks, db):
    fill(ks)
    for path in [db, *db.parent.glob(db.name + "-*")]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


def secrets_of(ks: KeyStore) -> list[str]:
    found = []
    for state in ks._vpns.values():
        found += [record.key for record in state.psks.values()]
        for slot in state.sas.values():
            for record in (slot.current, slot.next):
                if record is not None:
                    found += [record.encryption_key, record.integrity_key or record.encryption_key]
        found += [record.private_key_pem for record in state.certs.values()]
        if state.ca is not None:
            found.append(state.ca.private_key_pem())
    return [secret for secret in found if secret]


def test_no_key_appears_in_the_repr_of_any_object(ks):
    fill(ks)
    ks.ikeless_sa("v1", "a", "b", "inbound", CBC)
    ks.begin_rekey("v1")
    secrets = secrets_of(ks)
    assert len(secrets) > 20
    objects: list[object] = [ks]
    for state in ks._vpns.values():
        objects += [state, state.profile, state.ca]
        objects += list(state.psks.values()) + list(state.sas.values())
        objects += list(state.certs.values())
    for obj in objects:
        text = repr(obj)
        assert not any(secret in text for secret in secrets), type(obj).__name__
        assert "PRIVATE KEY" not in text


def test_no_key_is_logged(ks, caplog):
    caplog.set_level(logging.DEBUG)
    fill(ks)
    ks.rotate("v1", None, "all")
    ks.receiver_applied("v1", "b")
    secrets = secrets_of(ks)
    ks.forget_site("v1", "a")
    assert not any(secret in caplog.text for secret in secrets)


def test_returned_sa_is_a_copy_the_caller_may_change(ks):
    sa = ks.ikeless_sa("v1", "a", "b", "outbound", GCM)
    kept = copy.deepcopy(sa)
    sa["lifetime"]["soft-seconds"] = 1
    sa["encryption-key"] = "00"
    assert ks.ikeless_sa("v1", "a", "b", "outbound", GCM) == kept


# -- two servers on one database (nc_server.shared_keys) ---------------------------------


def test_a_rekey_made_by_another_store_is_read_again_and_only_its_pairs_are_logged(ks, db):
    for direction in [("a", "b"), ("b", "a"), ("a", "c"), ("c", "a")]:
        ks.ikeless_sa("v1", *direction, "outbound", GCM)
    other = reopen(db)
    other.ikeless_sa("v1", "a", "b", "outbound", GCM)  # loaded there too
    mark = other.material_mark("v1")
    ks.begin_rekey("v1", [("b", "a")])
    new = ks.ikeless_sa("v1", "b", "a", "inbound", GCM)
    assert other.reload_vpn("v1")
    assert other.changed_pairs("v1", mark) == {("a", "b")}
    assert other.ikeless_sa("v1", "b", "a", "inbound", GCM) == new
    # The receiver's promotion, heard by the other store: it is the sender's SA now.
    assert other.receiver_applied("v1", "a").directions == (("b", "a"),)
    assert ks.reload_vpn("v1")
    assert ks.ikeless_sa("v1", "b", "a", "outbound", GCM) == new


def test_reading_again_unchanged_material_changes_nothing_and_keeps_the_marks(ks, db):
    ks.ikeless_sa("v1", "a", "b", "outbound", GCM)
    ks.pre_shared_key("v1", "a", "b", 32)
    ks.site_certificate("v1", "a")
    mark = ks.material_mark("v1")
    assert not ks.reload_vpn("v1")
    assert ks.changed_pairs("v1", mark) == frozenset()


def test_a_certificate_made_by_another_store_voids_the_marks(ks, db):
    ks.ikeless_sa("v1", "a", "b", "outbound", GCM)
    other = reopen(db)
    other.ikeless_sa("v1", "a", "b", "outbound", GCM)
    mark = other.material_mark("v1")
    ks.site_certificate("v1", "a")
    assert other.reload_vpn("v1")
    assert other.changed_pairs("v1", mark) is None  # a whole compile
    assert other.site_certificate("v1", "a") == ks.site_certificate("v1", "a")


def test_every_flush_names_the_rows_it_wrote_inside_its_transaction(ks, db):
    told: list[tuple[frozenset[tuple[str, str]], bool]] = []
    outside = SqliteStorage(db)

    def written(rows: frozenset[tuple[str, str]]) -> None:
        # Told before the transaction commits: another connection does not see it yet.
        told.append((rows, bool(outside.scan(TABLE_SA, "v1/"))))

    ks.written = written
    with ks.batch():
        ks.ikeless_sa("v1", "a", "b", "outbound", GCM)
        ks.pre_shared_key("v2", "a", "b", 32)
    assert told == [(frozenset({(TABLE_SA, "v1/a/b"), (TABLE_PSK, "v2/a/b")}), False)]
    assert outside.scan(TABLE_SA, "v1/")
    with ks.dry_run():
        ks.ikeless_sa("v3", "a", "b", "outbound", GCM)
    assert len(told) == 1  # nothing written, nothing told
    ks.pre_shared_key("v4", "a", "b", 32)  # outside a batch: told all the same
    assert told[-1] == (frozenset({(TABLE_PSK, "v4/a/b")}), True)
    outside.close()


def written_rows(ks: KeyStore) -> list[tuple[str, str]]:
    """Record the rows ``ks`` writes from now on."""
    rows: list[tuple[str, str]] = []
    ks.written = rows.extend
    return rows


def test_reading_again_the_rows_another_store_wrote_gives_its_material_and_logs_their_pairs(ks, db):
    sites = ["a", "b", "c", "d"]
    for first, second in [("a", "b"), ("a", "c"), ("b", "c")]:
        ks.pre_shared_key("v1", first, second, 32)
        ks.ikeless_sa("v1", first, second, "outbound", GCM)
        ks.ikeless_sa("v1", second, first, "outbound", GCM)
    other = reopen(db)  # holds the mesh of a, b, c too
    other.pre_shared_key("v1", "a", "b", 32)
    mark = other.material_mark("v1")
    rows = written_rows(ks)
    with ks.batch():  # d joins; a <-> b is rekeyed
        for peer in ["a", "b", "c"]:
            ks.pre_shared_key("v1", peer, "d", 32)
            ks.ikeless_sa("v1", peer, "d", "outbound", GCM)
            ks.ikeless_sa("v1", "d", peer, "outbound", GCM)
        ks.begin_rekey("v1", [("a", "b")])
    assert other.reload_rows("v1", rows)
    assert other.changed_pairs("v1", mark) == {("a", "d"), ("b", "d"), ("c", "d"), ("a", "b")}
    for first in sites:
        for second in sites:
            if first != second:
                for direction in ("outbound", "inbound"):
                    assert other.ikeless_sa("v1", first, second, direction, GCM) == ks.ikeless_sa(
                        "v1", first, second, direction, GCM
                    )
                assert other.pre_shared_key("v1", first, second, 32) == ks.pre_shared_key(
                    "v1", first, second, 32
                )
    # The SPIs and the rekey under way were read with them: b's promotion works there.
    assert other.awaits_receiver("v1", "b")
    assert other.receiver_applied("v1", "b").directions == (("a", "b"),)
    assert not other.awaits_receiver("v1", "b")


def test_reading_rows_reads_only_those_rows(db, clock):
    ks = KeyStore(SqliteStorage(db), clock)
    counting = CountingStorage(db)
    other = KeyStore(counting, clock)
    for n in range(30):
        ks.pre_shared_key("v1", "a", f"s{n:02d}", 32)
    other.pre_shared_key("v1", "a", "s00", 32)  # loaded there
    rows = written_rows(ks)
    ks.pre_shared_key("v1", "a", "z", 32)
    counting.reads = 0
    assert other.reload_rows("v1", rows)
    assert counting.reads <= 1  # one get_many, never the VPN's scan
    assert other.pre_shared_key("v1", "a", "z", 32) == ks.pre_shared_key("v1", "a", "z", 32)


def test_a_certificate_row_read_again_reads_the_whole_vpn(ks, db):
    other = reopen(db)
    other.ikeless_sa("v1", "a", "b", "outbound", GCM)
    mark = other.material_mark("v1")
    rows = written_rows(ks)
    ks.site_certificate("v1", "a")
    assert other.reload_rows("v1", rows)
    assert other.changed_pairs("v1", mark) is None  # a whole compile
    assert other.site_certificate("v1", "a") == ks.site_certificate("v1", "a")


def test_rows_of_a_vpn_not_loaded_are_left_for_its_first_read(ks, db):
    other = reopen(db)
    rows = written_rows(ks)
    ks.pre_shared_key("v1", "a", "b", 32)
    assert not other.reload_rows("v1", rows)
    assert other.pre_shared_key("v1", "a", "b", 32) == ks.pre_shared_key("v1", "a", "b", 32)
