"""The per-VPN certificate authority (nc_server/ca.py, seed 3.3 (ii) and 7)."""

from __future__ import annotations

import shutil
import subprocess
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from nc_server.ca import (
    CA_VALIDITY,
    CLOCK_SKEW,
    CertificateAuthority,
    ChainError,
    CsrRefused,
    ce_identity,
    strongswan_dn,
    verify_chain,
)

NOW = datetime.now(UTC).replace(microsecond=0)


def make_csr(key: object, cn: str = "whatever-the-ce-wants") -> str:
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    )
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    csr = builder.sign(key, algorithm)
    return csr.public_bytes(serialization.Encoding.PEM).decode()


@pytest.fixture(scope="module")
def ca128() -> CertificateAuthority:
    return CertificateAuthority.create("vpn-a", 128, NOW)


@pytest.fixture(scope="module")
def ca192() -> CertificateAuthority:
    return CertificateAuthority.create("vpn-b", 192, NOW)


@pytest.mark.parametrize(
    ("strength", "curve", "hash_name"),
    [
        (80, "secp256r1", "sha256"),
        (112, "secp256r1", "sha256"),
        (128, "secp256r1", "sha256"),
        (192, "secp384r1", "sha384"),
        (256, "secp384r1", "sha384"),
    ],
)
def test_ca_curve_and_signature_hash_follow_the_vpn_strength(strength, curve, hash_name):
    ca = CertificateAuthority.create("v1", strength, NOW)
    public_key = ca.certificate.public_key()
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    assert public_key.curve.name == curve
    assert ca.certificate.signature_hash_algorithm.name == hash_name


def test_ca_refuses_a_strength_that_is_not_a_cevpn_level():
    with pytest.raises(ValueError, match="security strength"):
        CertificateAuthority.create("v1", 100, NOW)


def test_ca_is_self_signed(ca128):
    cert = ca128.certificate
    assert cert.issuer == cert.subject
    cert.verify_directly_issued_by(cert)


def test_ca_basic_constraints_are_ca_true_pathlen_0_critical(ca128):
    ext = ca128.certificate.extensions.get_extension_for_class(x509.BasicConstraints)
    assert ext.critical
    assert ext.value.ca is True
    assert ext.value.path_length == 0


def test_ca_key_usage_is_cert_sign_and_crl_sign_only(ca128):
    ext = ca128.certificate.extensions.get_extension_for_class(x509.KeyUsage)
    assert ext.critical
    assert ext.value.key_cert_sign and ext.value.crl_sign
    assert not ext.value.digital_signature and not ext.value.key_encipherment


def test_ca_subject_names_the_vpn(ca128):
    assert ca128.certificate.subject.rfc4514_string() == "CN=cevpn VPN vpn-a CA,O=cevpn"


def test_ca_is_valid_for_ten_years(ca128):
    cert = ca128.certificate
    assert cert.not_valid_after_utc - (cert.not_valid_before_utc + CLOCK_SKEW) == CA_VALIDITY
    assert CA_VALIDITY == timedelta(days=3650)


def test_ca_of_a_vpn_name_too_long_for_a_common_name_puts_it_in_ou():
    vpn = "v" * 60
    ca = CertificateAuthority.create(vpn, 128, NOW)
    assert ca.certificate.subject.rfc4514_string() == f"CN=cevpn VPN CA,OU={vpn},O=cevpn"


def test_ca_round_trips_through_pem(ca128):
    loaded = CertificateAuthority.from_pem("vpn-a", ca128.certificate_pem, ca128.private_key_pem())
    assert loaded.certificate == ca128.certificate
    issued = loaded.issue_with_generated_key("site-a", 30, NOW)
    verify_chain(issued.certificate, ca128.certificate, NOW)


def test_names_outside_the_cevpn_name_type_are_refused(ca128):
    with pytest.raises(ValueError, match="not a cevpn name"):
        ca128.issue_with_generated_key("a/b", 30, NOW)
    with pytest.raises(ValueError, match="not a cevpn name"):
        CertificateAuthority.create("x,CN=evil", 128, NOW)


# --- CE certificates: the profile -------------------------------------------


@pytest.fixture(scope="module")
def issued(ca128):
    return ca128.issue_with_generated_key("site-a", 365, NOW)


def test_ce_certificate_subject_is_cn_site_ou_vpn_o_cevpn(issued):
    assert issued.certificate.subject.rfc4514_string() == "CN=site-a,OU=vpn-a,O=cevpn"


def test_ce_certificate_subject_alt_name_is_site_dot_vpn_dot_cevpn(issued):
    san = issued.certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.value.get_values_for_type(x509.DNSName) == ["site-a.vpn-a.cevpn"]


def test_ce_certificate_key_usage_is_digital_signature_only(issued):
    ext = issued.certificate.extensions.get_extension_for_class(x509.KeyUsage)
    assert ext.critical
    assert ext.value.digital_signature
    assert not (ext.value.key_cert_sign or ext.value.crl_sign or ext.value.key_encipherment)


def test_ce_certificate_extended_key_usage_is_server_and_client_auth(issued):
    ext = issued.certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage)
    assert set(ext.value) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}


def test_ce_certificate_is_not_a_ca(issued):
    ext = issued.certificate.extensions.get_extension_for_class(x509.BasicConstraints)
    assert ext.value.ca is False


def test_ce_certificate_validity_is_the_certificate_lifetime(ca128):
    cert = ca128.issue_with_generated_key("site-a", 90, NOW).certificate
    assert cert.not_valid_before_utc == NOW - CLOCK_SKEW
    assert cert.not_valid_after_utc == NOW + timedelta(days=90)


def test_ce_certificate_never_outlives_its_ca(ca128):
    later = NOW + timedelta(days=3600)
    cert = ca128.issue_with_generated_key("site-a", 365, later).certificate
    assert cert.not_valid_after_utc == ca128.certificate.not_valid_after_utc


def test_ce_certificate_serials_are_random_and_longer_than_64_bits(ca128):
    serials = {
        ca128.issue_with_generated_key("site-a", 30, NOW).certificate.serial_number
        for _ in range(5)
    }
    assert len(serials) == 5
    assert all(serial.bit_length() > 64 for serial in serials)


def test_certificate_lifetime_outside_1_to_3650_days_is_refused(ca128):
    with pytest.raises(ValueError, match="lifetime"):
        ca128.issue_with_generated_key("site-a", 0, NOW)


# --- identity ---------------------------------------------------------------


def test_rfc4514_string_lists_cn_first_while_strongswan_lists_o_first(issued):
    subject = issued.certificate.subject
    assert subject.rfc4514_string() == "CN=site-a,OU=vpn-a,O=cevpn"
    assert strongswan_dn(subject) == "O=cevpn, OU=vpn-a, CN=site-a"
    assert [a.oid for a in subject] == [
        NameOID.ORGANIZATION_NAME,
        NameOID.ORGANIZATIONAL_UNIT_NAME,
        NameOID.COMMON_NAME,
    ]


def test_identity_is_the_certificate_subject_as_strongswan_writes_it(issued):
    assert ce_identity("vpn-a", "site-a") == strongswan_dn(issued.certificate.subject)


# --- the server-generated key path ------------------------------------------


def test_generated_key_is_unencrypted_pkcs8_on_the_cas_curve(ca192):
    issued = ca192.issue_with_generated_key("site-a", 30, NOW)
    assert issued.private_key_pem.startswith("-----BEGIN PRIVATE KEY-----")
    key = serialization.load_pem_private_key(issued.private_key_pem.encode(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert key.curve.name == "secp384r1"
    assert key.public_key() == issued.certificate.public_key()


# --- the CSR path -----------------------------------------------------------


def test_csr_with_a_strong_enough_key_is_certified_and_the_ce_keeps_its_key(ca128):
    key = ec.generate_private_key(ec.SECP256R1())
    issued = ca128.issue_from_csr("site-b", make_csr(key), 128, 30, NOW)
    assert issued.certificate.public_key() == key.public_key()
    assert issued.private_key_pem == ""
    verify_chain(issued.certificate, ca128.certificate, NOW)


def test_csr_subject_is_replaced_by_the_one_the_ca_sets(ca128):
    key = ec.generate_private_key(ec.SECP256R1())
    issued = ca128.issue_from_csr("site-b", make_csr(key, cn="site-a"), 128, 30, NOW)
    assert issued.certificate.subject.rfc4514_string() == "CN=site-b,OU=vpn-a,O=cevpn"


def test_csr_with_a_bad_signature_is_refused(ca128):
    key = ec.generate_private_key(ec.SECP256R1())
    der = bytearray(
        x509.load_pem_x509_csr(make_csr(key).encode()).public_bytes(serialization.Encoding.DER)
    )
    der[-1] ^= 0x01  # the last octet of the signature
    pem = x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM)
    with pytest.raises(CsrRefused, match="signature"):
        ca128.issue_from_csr("site-b", pem, 128, 30, NOW)


def test_text_that_is_not_a_csr_is_refused(ca128):
    with pytest.raises(CsrRefused, match="not a PEM"):
        ca128.issue_from_csr("site-b", "-----BEGIN CERTIFICATE REQUEST-----\n", 128, 30, NOW)


def test_rsa_2048_csr_is_refused_for_a_128_bit_vpn(ca128):
    key = rsa.generate_private_key(65537, 2048)
    with pytest.raises(CsrRefused, match="RSA 2048"):
        ca128.issue_from_csr("site-b", make_csr(key), 128, 30, NOW)


def test_rsa_3072_csr_is_accepted_for_a_128_bit_vpn(ca128):
    key = rsa.generate_private_key(65537, 3072)
    issued = ca128.issue_from_csr("site-b", make_csr(key), 128, 30, NOW)
    verify_chain(issued.certificate, ca128.certificate, NOW)


def test_p256_csr_is_refused_for_a_192_bit_vpn(ca192):
    key = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(CsrRefused, match="needs 192"):
        ca192.issue_from_csr("site-b", make_csr(key), 192, 30, NOW)


def test_p384_csr_is_accepted_for_a_256_bit_vpn_like_the_cas_own_key(ca192):
    key = ec.generate_private_key(ec.SECP384R1())
    ca192.issue_from_csr("site-b", make_csr(key), 256, 30, NOW)


def test_ed25519_csr_is_accepted_for_a_128_bit_vpn(ca128):
    key = ed25519.Ed25519PrivateKey.generate()
    issued = ca128.issue_from_csr("site-b", make_csr(key), 128, 30, NOW)
    verify_chain(issued.certificate, ca128.certificate, NOW)


# --- chain verification -----------------------------------------------------


def test_chain_verifies_for_a_certificate_the_ca_issued(ca128, issued):
    verify_chain(issued.certificate_pem, ca128.certificate_pem, NOW)


def test_chain_fails_for_a_certificate_from_another_vpns_ca(ca192, issued):
    with pytest.raises(ChainError):
        verify_chain(issued.certificate, ca192.certificate, NOW)


def test_chain_fails_for_an_expired_certificate(ca128):
    cert = ca128.issue_with_generated_key("site-a", 1, NOW).certificate
    with pytest.raises(ChainError):
        verify_chain(cert, ca128.certificate, NOW + timedelta(days=2))


@pytest.mark.skipif(shutil.which("openssl") is None, reason="no openssl command")
def test_openssl_verifies_the_chain_for_both_key_usages(ca128, issued, tmp_path):
    (tmp_path / "ca.pem").write_text(ca128.certificate_pem)
    (tmp_path / "ce.pem").write_text(issued.certificate_pem)
    for purpose in ("sslserver", "sslclient"):
        result = subprocess.run(
            ["openssl", "verify", "-purpose", purpose, "-CAfile", "ca.pem", "ce.pem"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            check=False,
        )
        assert result.returncode == 0, result.stdout + result.stderr


# --- secrets ----------------------------------------------------------------


def test_no_private_key_appears_in_repr(ca128, issued):
    key_pem = ca128.private_key_pem()
    for obj in (ca128, issued):
        text = repr(obj)
        assert "PRIVATE KEY" not in text
        assert key_pem not in text
        assert issued.private_key_pem not in text
