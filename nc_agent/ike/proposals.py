"""cevpn-types transform identities as strongSwan proposal strings (seed 3.3 SA information).

charon takes proposals as keyword strings ("aes256gcm16-prfsha256-curve25519");
the YANG names transforms with IANA-derived identities.  The mapping lives
here once, as tables, so the kernel-less IKE logic never spells a strongSwan
keyword by hand and an unknown identity is an error, not a silent default.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from nc_agent.dataplane.algorithms import AEAD

PREFIX = "cevpn-types:"

ENCRYPTION: Mapping[str, str] = {
    "encr-3des": "3des",
    "encr-aes-cbc-128": "aes128",
    "encr-aes-cbc-192": "aes192",
    "encr-aes-cbc-256": "aes256",
    "encr-aes-ctr-128": "aes128ctr",
    "encr-aes-ctr-256": "aes256ctr",
    "encr-aes-gcm-16-128": "aes128gcm16",
    "encr-aes-gcm-16-192": "aes192gcm16",
    "encr-aes-gcm-16-256": "aes256gcm16",
    "encr-aes-ccm-16-128": "aes128ccm16",
    "encr-aes-ccm-16-256": "aes256ccm16",
    "encr-chacha20-poly1305": "chacha20poly1305",
}
INTEGRITY: Mapping[str, str] = {
    "auth-hmac-sha1-96": "sha1",
    "auth-aes-xcbc-96": "aesxcbc",
    "auth-hmac-sha2-256-128": "sha256",
    "auth-hmac-sha2-384-192": "sha384",
    "auth-hmac-sha2-512-256": "sha512",
}
PRF: Mapping[str, str] = {
    "prf-hmac-sha1": "prfsha1",
    "prf-aes128-xcbc": "prfaesxcbc",
    "prf-hmac-sha2-256": "prfsha256",
    "prf-hmac-sha2-384": "prfsha384",
    "prf-hmac-sha2-512": "prfsha512",
}
DH_GROUP: Mapping[str, str] = {
    "modp-1024": "modp1024",
    "modp-2048": "modp2048",
    "modp-3072": "modp3072",
    "modp-4096": "modp4096",
    "modp-8192": "modp8192",
    "ecp-256": "ecp256",
    "ecp-384": "ecp384",
    "ecp-521": "ecp521",
    "curve25519": "curve25519",
    "curve448": "curve448",
}

DEFAULT_IKE = "aes256gcm16-prfsha256-curve25519"
"""cevpn-ce sa-defaults: AES-GCM-16-256, PRF-HMAC-SHA2-256, Curve25519."""
DEFAULT_ESP = "aes256gcm16-esn"
"""cevpn-ce sa-defaults: ESP AES-GCM-16-256 without PFS."""


class UnknownTransform(ValueError):
    """An identity this mapping does not know: refuse rather than guess."""


def _keyword(table: Mapping[str, str], identity: str, what: str) -> str:
    name = identity.split(":", 1)[-1] if identity.startswith(PREFIX) else identity
    try:
        return table[name]
    except KeyError:
        raise UnknownTransform(f"no strongSwan {what} for {identity!r}") from None


def _bare(identity: str) -> str:
    return identity.split(":", 1)[-1]


def _cipher(proposal: Mapping[str, Any]) -> list[str]:
    """Encryption, and integrity unless the encryption is AEAD (both proposal kinds)."""
    encryption = str(proposal["encryption"])
    parts = [_keyword(ENCRYPTION, encryption, "encryption algorithm")]
    if _bare(encryption) not in AEAD:
        if "integrity" not in proposal:
            raise UnknownTransform(f"{encryption} needs an integrity algorithm")
        parts.append(_keyword(INTEGRITY, str(proposal["integrity"]), "integrity algorithm"))
    return parts


def ike_proposal(proposal: Mapping[str, Any]) -> str:
    """One cevpn-types ike-proposal (encryption, prf, integrity, dh-group) as charon's string."""
    parts = _cipher(proposal)
    if "prf" in proposal:
        parts.append(_keyword(PRF, str(proposal["prf"]), "PRF"))
    parts.append(_keyword(DH_GROUP, str(proposal["dh-group"]), "DH group"))
    return "-".join(parts)


def esp_proposal(proposal: Mapping[str, Any]) -> str:
    """One cevpn-types esp-proposal (encryption, integrity, pfs-group, esn) as charon's string."""
    parts = _cipher(proposal)
    if "pfs-group" in proposal:
        parts.append(_keyword(DH_GROUP, str(proposal["pfs-group"]), "PFS group"))
    esn = proposal["esn"]
    parts.append("esn" if esn in (True, "true") else "noesn")
    return "-".join(parts)


def proposals(sa_information: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """IKE and ESP proposal lists of a peer's effective sa-information, in preference order
    (the YANG lists are ordered by user); the CE defaults where a list is absent."""
    ike = [ike_proposal(p) for p in sa_information.get("ike", {}).get("proposal", [])]
    esp = [esp_proposal(p) for p in sa_information.get("esp", {}).get("proposal", [])]
    return ike or [DEFAULT_IKE], esp or [DEFAULT_ESP]
