"""The SP's certificate authority: one CA per VPN, issuing the CE certificates.

Seed 3.3 (ii): with certificate authentication a CE receives "a <private key,
public key> pair, a certificate for the public key, a public key from the
Certificate Authority".  The VPN server is that authority.  Each VPN gets its
own CA so that a CE of one VPN can never authenticate to a CE of another (the
CE trusts its VPN's CA only), and so that a VPN can be removed with its CA.

Strength (seed 7, "every tunnel must use the same grade of security
strength"): the CA key is ECDSA P-256 for a VPN whose minimum strength is 128
bits or less and P-384 above.  P-384 for 256 bits is a project decision: it
caps the signature strength of a 256-bit VPN at 192 bits (P-521 would give
256); the CSR check below follows the same cap.  A CSR is refused when its key is
weaker than the key the CA would have generated for that VPN, so that no CE
is the weak link.

Certificates follow what strongSwan checks: a CE certificate has keyUsage
digitalSignature, both TLS extended key usages (strongSwan accepts either,
other IKE implementations want one or the other), a subjectAltName
``DNS:<site>.<vpn>.cevpn`` and subject and authority key identifiers (used to
find the issuer without comparing names).  Nothing here keeps state or
writes anything: :mod:`nc_server.keystore` stores what this module makes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

ORGANIZATION = "cevpn"
DNS_SUFFIX = "cevpn"
CA_VALIDITY = timedelta(days=3650)
CLOCK_SKEW = timedelta(minutes=5)
"""Certificates start this long before they are made: a CE whose clock is a
little behind the server's still accepts a certificate it just received."""

STRENGTHS = (80, 112, 128, 192, 256)
"""The security-strength identities of cevpn-types, in bits."""

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_CN_MAX = 64  # ub-common-name, RFC 5280 Appendix A

_Hash = hashes.SHA256 | hashes.SHA384 | hashes.SHA512

# NIST SP 800-57 Part 1 Rev. 5, Table 2: RSA modulus size -> security strength.
_RSA_STRENGTH = ((15360, 256), (7680, 192), (3072, 128), (2048, 112), (1024, 80))
_EC_CURVES: dict[str, tuple[int, ec.EllipticCurve, _Hash]] = {
    "secp256r1": (128, ec.SECP256R1(), hashes.SHA256()),
    "secp384r1": (192, ec.SECP384R1(), hashes.SHA384()),
    "secp521r1": (256, ec.SECP521R1(), hashes.SHA512()),
}

PublicKey = (
    ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey | ed448.Ed448PublicKey
)


class CsrRefused(ValueError):
    """A CSR was not accepted: unreadable, badly signed, or its key is too weak."""


class ChainError(ValueError):
    """A certificate does not chain to the expected CA."""


def check_name(kind: str, name: str) -> str:
    """Refuse anything but a cevpn-types ``name`` (it ends up in DNs and storage keys)."""
    if not _NAME.fullmatch(name):
        raise ValueError(f"{kind} {name!r} is not a cevpn name ([A-Za-z0-9][A-Za-z0-9._-]*)")
    return name


def check_strength(strength_bits: int) -> int:
    if strength_bits not in STRENGTHS:
        raise ValueError(f"security strength must be one of {STRENGTHS}, not {strength_bits}")
    return strength_bits


def ca_curve(strength_bits: int) -> ec.EllipticCurve:
    """The CA's (and server-generated CE keys') curve for a VPN's minimum strength."""
    check_strength(strength_bits)
    return ec.SECP256R1() if strength_bits <= 128 else ec.SECP384R1()


def curve_strength(curve: ec.EllipticCurve) -> int:
    """Security strength in bits of an ECDSA key on ``curve``; 0 for a curve not used here."""
    known = _EC_CURVES.get(curve.name)
    return known[0] if known else 0


def required_key_strength(strength_bits: int) -> int:
    """The weakest CE key (in bits of strength) accepted for a VPN of ``strength_bits``.

    The bar is the key the CA would have generated itself (P-256 up to 128
    bits, P-384 above), so a CSR never makes a CE weaker than a generated key
    would; it never goes below 112 bits, so a legacy 80-bit profile cannot
    bring 1024-bit RSA back.
    """
    check_strength(strength_bits)
    return max(112, min(strength_bits, 192))


def key_strength(key: object) -> int:
    """Security strength in bits of a public key (NIST SP 800-57); 0 if not usable.

    Only keys that strongSwan's openssl plugin can verify IKE signatures
    with count: RSA, ECDSA on the NIST prime curves, Ed25519 and Ed448.
    """
    if isinstance(key, rsa.RSAPublicKey):
        return next((bits for size, bits in _RSA_STRENGTH if key.key_size >= size), 0)
    if isinstance(key, ec.EllipticCurvePublicKey):
        return curve_strength(key.curve)
    if isinstance(key, ed25519.Ed25519PublicKey):
        return 128
    if isinstance(key, ed448.Ed448PublicKey):
        return 224
    return 0


def ce_subject(vpn: str, site: str) -> x509.Name:
    """``CN=<site>,OU=<vpn>,O=cevpn`` as RFC 4514 writes it.

    The RDNs are encoded most significant first (O, OU, CN), the usual X.509
    order; RFC 4514 strings list them the other way round, which is what
    :meth:`x509.Name.rfc4514_string` returns.
    """
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, check_name("VPN", vpn)),
            x509.NameAttribute(NameOID.COMMON_NAME, check_name("site", site)),
        ]
    )


def ca_subject(vpn: str) -> x509.Name:
    """``CN=cevpn VPN <vpn> CA,O=cevpn``.

    A VPN name longer than 54 characters does not fit in a common name
    (64 characters at most); such a CA is named ``CN=cevpn VPN CA,OU=<vpn>,O=cevpn``
    instead, which keeps CA subjects distinct per VPN.
    """
    common_name = f"cevpn VPN {check_name('VPN', vpn)} CA"
    if len(common_name) <= _CN_MAX:
        return x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
                x509.NameAttribute(NameOID.COMMON_NAME, common_name),
            ]
        )
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, vpn),
            x509.NameAttribute(NameOID.COMMON_NAME, "cevpn VPN CA"),
        ]
    )


def strongswan_dn(name: x509.Name) -> str:
    """``name`` written the way strongSwan prints a DN and parses an ``id``.

    strongSwan writes the RDNs in their encoded order separated by ", "
    (``O=cevpn, OU=v1, CN=site-a``) and, when it parses such a string into
    an identity, encodes the RDNs in the order written.  It compares two DNs
    RDN by RDN in order (``charon.rdn_matching`` defaults to strict), so the
    RFC 4514 string ``CN=site-a,OU=v1,O=cevpn`` would be a *different* DN to
    it.  Values here are cevpn names (letters, digits, ``._-``) and fixed
    words, which need no escaping.
    """
    parts = []
    for rdn in name.rdns:
        for attribute in rdn:
            parts.append(f"{attribute.rfc4514_attribute_name}={attribute.value!s}")
    return ", ".join(parts)


def ce_identity(vpn: str, site: str) -> str:
    """The IKE identity of a site's CE: what a peer puts in strongSwan's ``remote.id``.

    A strongSwan CE with a certificate and no ``local.id`` sends its
    certificate's subject DN as its IKE identity; the peer accepts it when
    it equals ``remote.id`` and the certificate carries it.  So the identity
    is the subject DN in strongSwan's notation, ``O=cevpn, OU=<vpn>, CN=<site>``
    (see :func:`strongswan_dn`); the subjectAltName ``<site>.<vpn>.cevpn``
    would only match if the CE also set ``local.id`` to it.
    """
    # The same string strongswan_dn(ce_subject(vpn, site)) gives, without
    # building a Name: the compiler asks once per peer.
    return f"O={ORGANIZATION}, OU={check_name('VPN', vpn)}, CN={check_name('site', site)}"


def ce_dns_name(vpn: str, site: str) -> str:
    return f"{check_name('site', site)}.{check_name('VPN', vpn)}.{DNS_SUFFIX}"


def private_key_pem(key: ec.EllipticCurvePrivateKey) -> str:
    """PKCS#8 PEM, unencrypted: it is stored in the server's 0600 store or sent over SSH."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


def certificate_pem(certificate: x509.Certificate) -> str:
    return certificate.public_bytes(serialization.Encoding.PEM).decode()


def _hash_for(curve: ec.EllipticCurve) -> _Hash:
    return _EC_CURVES[curve.name][2]


@dataclass(frozen=True)
class IssuedCertificate:
    """A CE certificate and, when the server made the key pair, its private key."""

    certificate: x509.Certificate
    private_key_pem: str = field(default="", repr=False)
    """PKCS#8 PEM; "" when the CE made the key pair (CSR) and keeps the private half."""

    @property
    def certificate_pem(self) -> str:
        return certificate_pem(self.certificate)


@dataclass(frozen=True)
class CertificateAuthority:
    """One VPN's CA: its self-signed certificate and signing key."""

    vpn: str
    certificate: x509.Certificate
    private_key: ec.EllipticCurvePrivateKey = field(repr=False)

    @classmethod
    def create(
        cls, vpn: str, strength_bits: int, now: datetime | None = None
    ) -> CertificateAuthority:
        """A new self-signed CA for ``vpn``, valid ten years.

        pathlen 0: it signs CE certificates only, never another CA.
        """
        now = now or datetime.now(UTC)
        key = ec.generate_private_key(ca_curve(strength_bits))
        subject = ca_subject(vpn)
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        certificate = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(now + CA_VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(ski, critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
                critical=False,
            )
            .sign(key, _hash_for(key.curve))
        )
        return cls(vpn=check_name("VPN", vpn), certificate=certificate, private_key=key)

    @classmethod
    def from_pem(cls, vpn: str, cert_pem: str, key_pem: str) -> CertificateAuthority:
        """Load a CA saved with :attr:`certificate_pem` and :meth:`private_key_pem`."""
        key = serialization.load_pem_private_key(key_pem.encode(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"the CA key of VPN {vpn} is not an ECDSA key")
        return cls(
            vpn=vpn, certificate=x509.load_pem_x509_certificate(cert_pem.encode()), private_key=key
        )

    @property
    def certificate_pem(self) -> str:
        return certificate_pem(self.certificate)

    def private_key_pem(self) -> str:
        """The signing key as PKCS#8 PEM, for the server's own store only."""
        return private_key_pem(self.private_key)

    @property
    def curve(self) -> ec.EllipticCurve:
        return self.private_key.curve

    @property
    def strength_bits(self) -> int:
        """The strength of the CA's key (128 for P-256, 192 for P-384)."""
        return curve_strength(self.curve)

    def issue_from_csr(
        self,
        site: str,
        csr_pem: str | bytes,
        strength_bits: int,
        lifetime_days: int,
        now: datetime | None = None,
    ) -> IssuedCertificate:
        """Certify the public key of a CSR made on the CE; the CE keeps its private key.

        The CSR's signature proves the CE holds the private key.  Its subject
        and extensions are ignored: the CA decides what a CE may claim to be,
        so a CE cannot ask for another site's name.
        """
        data = csr_pem.encode() if isinstance(csr_pem, str) else csr_pem
        try:
            csr = x509.load_pem_x509_csr(data)
        except ValueError as exc:
            raise CsrRefused(f"site {site}: not a PEM certificate signing request") from exc
        try:
            public_key = csr.public_key()
            signature_ok = csr.is_signature_valid
        except (InvalidSignature, UnsupportedAlgorithm, ValueError, TypeError) as exc:
            raise CsrRefused(f"site {site}: the CSR's key or signature cannot be used") from exc
        if not signature_ok:
            raise CsrRefused(f"site {site}: the CSR's signature does not verify")
        strength = key_strength(public_key)
        needed = required_key_strength(strength_bits)
        if strength < needed:
            raise CsrRefused(
                f"site {site}: the CSR's key ({_describe(public_key)}) gives {strength} bits"
                f" of security; the VPN needs {needed}"
            )
        assert isinstance(public_key, PublicKey)  # key_strength() is 0 for any other type
        return IssuedCertificate(self._issue(site, public_key, lifetime_days, now))

    def issue_with_generated_key(
        self, site: str, lifetime_days: int, now: datetime | None = None
    ) -> IssuedCertificate:
        """Make the CE's key pair here (on the CA's curve) for a CE that cannot make a CSR.

        The private key is returned as unencrypted PKCS#8 PEM: it only ever
        travels inside the SSH channel to the CE.
        """
        key = ec.generate_private_key(self.curve)
        certificate = self._issue(site, key.public_key(), lifetime_days, now)
        return IssuedCertificate(certificate, private_key_pem(key))

    def reissue(
        self, certificate: x509.Certificate, lifetime_days: int, now: datetime | None = None
    ) -> IssuedCertificate:
        """A fresh certificate (new serial and validity) for the key of ``certificate``.

        Used to renew the certificate of a CE that keeps its own key: a new
        key needs a new CSR.
        """
        site = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
        public_key = certificate.public_key()
        if not isinstance(public_key, PublicKey):
            raise ValueError(f"site {site!s}: unsupported key type")
        return IssuedCertificate(self._issue(str(site), public_key, lifetime_days, now))

    def _issue(
        self, site: str, public_key: PublicKey, lifetime_days: int, now: datetime | None
    ) -> x509.Certificate:
        if not 1 <= lifetime_days <= 3650:
            raise ValueError(f"certificate lifetime must be 1..3650 days, not {lifetime_days}")
        now = now or datetime.now(UTC)
        # A CE certificate never outlives its CA: past that it could not be verified.
        not_after = min(now + timedelta(days=lifetime_days), self.certificate.not_valid_after_utc)
        ca_ski = self.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
        return (
            x509.CertificateBuilder()
            .subject_name(ce_subject(self.vpn, site))
            .issuer_name(self.certificate.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())  # 159 random bits
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(
                x509.SubjectAlternativeName([x509.DNSName(ce_dns_name(self.vpn, site))]),
                critical=False,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski.value),
                critical=False,
            )
            .sign(self.private_key, _hash_for(self.curve))
        )


def _describe(key: object) -> str:
    if isinstance(key, rsa.RSAPublicKey):
        return f"RSA {key.key_size}"
    if isinstance(key, ec.EllipticCurvePublicKey):
        return f"EC {key.curve.name}"
    return type(key).__name__


def verify_chain(
    certificate: x509.Certificate | str,
    ca_certificate: x509.Certificate | str,
    now: datetime | None = None,
) -> None:
    """Raise :class:`ChainError` unless ``certificate`` is a valid CE certificate of the CA.

    Path validation is cryptography's RFC 5280 verifier (signature, validity
    at ``now``, CA basicConstraints and keyUsage, the leaf's clientAuth
    usage), which is stricter than what strongSwan checks, so a certificate
    that passes here also passes there.
    """
    leaf = _load_certificate(certificate)
    anchor = _load_certificate(ca_certificate)
    builder = PolicyBuilder().store(Store([anchor])).max_chain_depth(0)
    if now is not None:
        builder = builder.time(now)
    try:
        builder.build_client_verifier().verify(leaf, [])
    except VerificationError as exc:
        raise ChainError(
            f"certificate does not chain to {anchor.subject.rfc4514_string()}: {exc}"
        ) from exc


def _load_certificate(value: x509.Certificate | str) -> x509.Certificate:
    if isinstance(value, x509.Certificate):
        return value
    return x509.load_pem_x509_certificate(value.encode())
