"""cevpn-types transform identities as the Linux kernel's XFRM algorithms.

One table per transform kind, used wherever the agent needs to know what an
identity is: the SAs it installs (nc_agent.desired), the tunnel MTU that
leaves room for their overhead, and which encryption algorithms are AEAD
and so take no integrity algorithm (nc_agent.ike.proposals).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

# cevpn-types identity -> (kind, kernel algorithm name, ICV or truncation bits)
ENCRYPTION: Mapping[str, tuple[Literal["aead", "enc"], str, int]] = {
    "encr-aes-gcm-16-128": ("aead", "rfc4106(gcm(aes))", 128),
    "encr-aes-gcm-16-192": ("aead", "rfc4106(gcm(aes))", 128),
    "encr-aes-gcm-16-256": ("aead", "rfc4106(gcm(aes))", 128),
    "encr-aes-ccm-16-128": ("aead", "rfc4309(ccm(aes))", 128),
    "encr-aes-ccm-16-256": ("aead", "rfc4309(ccm(aes))", 128),
    "encr-chacha20-poly1305": ("aead", "rfc7539esp(chacha20,poly1305)", 128),
    "encr-aes-cbc-128": ("enc", "cbc(aes)", 0),
    "encr-aes-cbc-192": ("enc", "cbc(aes)", 0),
    "encr-aes-cbc-256": ("enc", "cbc(aes)", 0),
    "encr-aes-ctr-128": ("enc", "rfc3686(ctr(aes))", 0),
    "encr-aes-ctr-256": ("enc", "rfc3686(ctr(aes))", 0),
    "encr-3des": ("enc", "cbc(des3_ede)", 0),
}
INTEGRITY: Mapping[str, tuple[str, int]] = {
    "auth-hmac-sha1-96": ("hmac(sha1)", 96),
    "auth-aes-xcbc-96": ("xcbc(aes)", 96),
    "auth-hmac-sha2-256-128": ("hmac(sha256)", 128),
    "auth-hmac-sha2-384-192": ("hmac(sha384)", 192),
    "auth-hmac-sha2-512-256": ("hmac(sha512)", 256),
}

AEAD = frozenset(name for name, (kind, _, _) in ENCRYPTION.items() if kind == "aead")
