"""The CE's own key pair for IKE certificates (seed 3.3 (ii): 'when the CE can').

The agent makes an ECDSA P-384 key pair once, keeps the private key 0600 in
its state directory (never in a datastore, never sent anywhere), and sends
the VPN server a PKCS#10 request for it with its configuration fetches; the
VPN's CA certifies it and the configuration then carries the certificate with
``certificates/key-origin ce`` and no private key.
"""

from __future__ import annotations

from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from nc_core.datastore import write_atomically

OWN_KEY_FILE = "ike_own_key.pem"


def own_key(state_dir: Path) -> ec.EllipticCurvePrivateKey:
    path = state_dir / OWN_KEY_FILE
    if not path.exists():
        key = ec.generate_private_key(ec.SECP384R1())
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        write_atomically(path, pem)
    loaded = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(loaded, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{path} is not an EC private key")
    return loaded


def certificate_request(state_dir: Path, site: str) -> str:
    """A CSR for the own key; the CA sets the subject it certifies, this one is a hint."""
    key = own_key(state_dir)
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, site)]))
        .sign(key, hashes.SHA384())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def certifies_own_key(state_dir: Path, certificate_pem: str) -> bool:
    """Is this certificate for the CE's own key?"""
    if not (state_dir / OWN_KEY_FILE).exists():
        return False
    cert = x509.load_pem_x509_certificate(certificate_pem.encode())
    mine = (
        own_key(state_dir)
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    theirs = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return mine == theirs
