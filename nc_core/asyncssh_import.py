"""asyncssh, imported without its library probes starting seven processes.

At import, asyncssh asks ``ctypes.util.find_library`` for liboqs ("oqs",
"liboqs": post-quantum key exchange) and for nettle (UMAC).  On Linux each
question runs ``ldconfig -p``, and a library it does not list then gcc and ld:
seven process starts, which in the lab guest (every process start is slow)
were 1.7 s of every agent's and the server's start-up (``python -X
importtime``), more than the rest of asyncssh together.

The same questions are answered here by looking for ``lib<name>.so*`` in the
dynamic linker's directories, so both libraries are still used when they are
installed; every other ``find_library`` call keeps its normal behaviour.
Import asyncssh through this module (``from nc_core.asyncssh_import import
asyncssh``).

It also drops one packet in two.  asyncssh sends an empty SSH_MSG_IGNORE
before every packet once the connection is encrypted, the countermeasure
RFC 4251 Section 9.3.1 describes for CBC mode, whose next IV an attacker can
predict.  asyncssh offers no CBC cipher by default and cevpn enables none, so
with the ciphers negotiated (ChaCha20-Poly1305, AES-GCM, AES-CTR) every
NETCONF reply cost an extra packet to encrypt, MAC and send, and the client
one more to receive, decrypt and verify: 10 % of a small request's round
trip.  The IGNORE packet is still sent if either direction uses a CBC cipher.

And it imports without warnings: asyncssh's type annotations name cryptography's DSA
classes, and every such name printed a CryptographyDeprecationWarning ("DSA is
deprecated") at each start, five lines on stderr an operator could do nothing about
(cevpn offers no DSA key, asyncssh enables none by default).  Only that warning, and
only when asyncssh's own modules raise it, is ignored.
"""

from __future__ import annotations

import ctypes.util
import glob
import os
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

LIBRARY_DIRS = (
    "/usr/local/lib",
    "/usr/lib",
    "/lib",
    f"/usr/lib/{os.uname().machine}-linux-gnu",
    f"/lib/{os.uname().machine}-linux-gnu",
    "/usr/lib64",
    "/lib64",
)
PROBED = ("oqs", "liboqs", "nettle", "libnettle", "libnettle-6")


def find_in_linker_dirs(name: str) -> str | None:
    """The path of an installed library, or None.

    The soname link (``libnettle.so.8``, as ldconfig would name it) is
    preferred over the development link and the fully versioned file; the
    path is absolute, which ``ctypes.cdll.LoadLibrary`` takes as it is.
    """
    stem = name if name.startswith("lib") else f"lib{name}"
    for directory in LIBRARY_DIRS:
        found = glob.glob(os.path.join(directory, f"{stem}.so*"))
        if found:
            return min(found, key=lambda path: (_soname_rank(path, stem), path))
    return None


def _soname_rank(path: str, stem: str) -> int:
    suffix = os.path.basename(path)[len(stem) + len(".so") :]
    if suffix.count(".") == 1:  # ".8": the soname
        return 0
    return 1 if suffix else 2  # the development link, then a fully versioned file


@contextmanager
def _probes_answered_locally() -> Iterator[None]:
    original = ctypes.util.find_library

    def find_library(name: str) -> str | None:
        return find_in_linker_dirs(name) if name in PROBED else original(name)

    ctypes.util.find_library = find_library
    try:
        yield
    finally:
        ctypes.util.find_library = original


def ignore_asyncssh_dsa_warnings() -> None:
    """Ignore cryptography's DSA deprecation where asyncssh raises it, and nothing else."""
    from cryptography.utils import CryptographyDeprecationWarning

    warnings.filterwarnings(
        "ignore",
        message=r"DSA is deprecated",
        category=CryptographyDeprecationWarning,
        module=r"asyncssh(\.|$)",
    )


ignore_asyncssh_dsa_warnings()

if "asyncssh" in sys.modules:
    import asyncssh
else:
    with _probes_answered_locally():
        import asyncssh


def _without_needless_ignore_packets() -> None:
    """Send asyncssh's per-packet SSH_MSG_IGNORE only where it protects something (CBC)."""
    from asyncssh.connection import SSHConnection
    from asyncssh.constants import MSG_IGNORE
    from asyncssh.packet import String

    original = SSHConnection.send_packet
    if getattr(original, "cevpn_skips_ignore", False):
        return
    empty = String(b"")

    def send_packet(
        self: SSHConnection, pkttype: int, *args: bytes, handler: object = None
    ) -> None:
        if pkttype == MSG_IGNORE and args == (empty,) and not uses_cbc(self):
            return
        original(self, pkttype, *args, handler=handler)  # type: ignore[arg-type]

    send_packet.cevpn_skips_ignore = True  # type: ignore[attr-defined]
    SSHConnection.send_packet = send_packet  # type: ignore[method-assign]


def uses_cbc(conn: object) -> bool:
    """Whether either direction of an asyncssh connection may use a CBC cipher.

    Read from asyncssh's negotiated algorithm names; should a later asyncssh rename
    them, the answer is yes, and the IGNORE packets come back (tests/test_ssh_packets.py
    then fails, instead of the countermeasure silently going away).
    """
    names = (getattr(conn, "_enc_alg_cs", None), getattr(conn, "_enc_alg_sc", None))
    return any(not isinstance(name, bytes) or name.endswith(b"-cbc") for name in names)


_without_needless_ignore_packets()

__all__ = ["asyncssh", "find_in_linker_dirs", "uses_cbc"]
