"""asyncssh, imported without its liboqs probe starting six processes.

At import, asyncssh.crypto.pq asks ``ctypes.util.find_library`` for "oqs" and
"liboqs" (post-quantum key exchange).  On Linux each question runs
``ldconfig -p`` and then gcc and ld: in the lab guest, where every process
start is slow, that was 1.7 s of every agent's and the server's start-up
(``python -X importtime``), more than the rest of asyncssh together.

The same question is answered here by looking for ``liboqs.so*`` in the
dynamic linker's directories, so liboqs is still used when it is installed;
every other ``find_library`` call keeps its normal behaviour.  Import asyncssh
through this module (``from nc_core.asyncssh_import import asyncssh``).
"""

from __future__ import annotations

import ctypes.util
import glob
import os
import sys
from collections.abc import Callable, Iterator
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
PROBED = ("oqs", "liboqs")


def find_oqs(name: str) -> str | None:
    """The file name of an installed liboqs (as find_library would give it), or None."""
    stem = name if name.startswith("lib") else f"lib{name}"
    for directory in LIBRARY_DIRS:
        found = sorted(glob.glob(os.path.join(directory, f"{stem}.so*")))
        if found:
            return os.path.basename(found[-1])
    return None


@contextmanager
def _oqs_probe_answered_locally() -> Iterator[None]:
    original: Callable[[str], str | None] = ctypes.util.find_library

    def find_library(name: str) -> str | None:
        return find_oqs(name) if name in PROBED else original(name)

    ctypes.util.find_library = find_library
    try:
        yield
    finally:
        ctypes.util.find_library = original


if "asyncssh" in sys.modules:
    import asyncssh
else:
    with _oqs_probe_answered_locally():
        import asyncssh

__all__ = ["asyncssh", "find_oqs"]
