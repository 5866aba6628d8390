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
"""

from __future__ import annotations

import ctypes.util
import glob
import os
import sys
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


if "asyncssh" in sys.modules:
    import asyncssh
else:
    with _probes_answered_locally():
        import asyncssh

__all__ = ["asyncssh", "find_in_linker_dirs"]
