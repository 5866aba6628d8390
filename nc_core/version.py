"""What ``--version`` prints: the package version and the commit it was built from.

A wheel records its commit at build time (``nc_core/_build_info.py``, written by
setup.py); an editable checkout has no such file and asks git for its HEAD.
"""

from __future__ import annotations

import importlib
import subprocess
from importlib import metadata
from pathlib import Path


def package_version() -> str:
    try:
        return metadata.version("cevpn")
    except metadata.PackageNotFoundError:  # run from a checkout never installed
        return "unknown"


def build_commit() -> str:
    """The commit the package was built from, HEAD of a checkout, or 'unknown'."""
    try:
        info = importlib.import_module("nc_core._build_info")
    except ImportError:
        pass
    else:
        return str(info.COMMIT)
    checkout = Path(__file__).resolve().parent.parent
    try:
        return subprocess.run(
            ["git", "-C", str(checkout), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def version_text(prog: str) -> str:
    """``cevpn-server 0.1.0 (commit 4e30f40...)``."""
    return f"{prog} {package_version()} (commit {build_commit()})"
