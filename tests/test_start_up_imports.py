"""Start-up cost: asyncssh finds the same libraries, and importing a daemon starts no process."""

from __future__ import annotations

import ctypes.util
import subprocess
import sys
from pathlib import Path

import pytest

from nc_core import asyncssh_import


def test_an_installed_liboqs_is_found_by_its_file_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "liboqs.so.5").write_bytes(b"")
    (tmp_path / "liboqs.so.5.0.1").write_bytes(b"")
    monkeypatch.setattr(asyncssh_import, "LIBRARY_DIRS", (str(tmp_path),))
    (tmp_path / "liboqs.so").write_bytes(b"")
    assert asyncssh_import.find_in_linker_dirs("oqs") == str(tmp_path / "liboqs.so.5")
    assert asyncssh_import.find_in_linker_dirs("liboqs") == str(tmp_path / "liboqs.so.5")


def test_no_liboqs_is_none(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(asyncssh_import, "LIBRARY_DIRS", (str(tmp_path),))
    assert asyncssh_import.find_in_linker_dirs("oqs") is None


def test_nettle_is_found_where_ldconfig_finds_it() -> None:
    from ctypes.util import find_library

    expected = find_library("nettle")
    found = asyncssh_import.find_in_linker_dirs("nettle")
    assert (found is None) == (expected is None)
    if expected is not None and found is not None:
        assert Path(found).name == expected  # libnettle.so.8


def test_find_library_is_restored_after_the_import() -> None:
    assert ctypes.util.find_library.__module__ == "ctypes.util"


def processes_started_by(statement: str) -> str:
    """Every subprocess started while ``statement`` runs in a fresh interpreter."""
    code = (
        "import subprocess\n"
        "started = []\n"
        "real = subprocess.Popen.__init__\n"
        "def counting(self, *a, **k):\n"
        "    started.append(a[0] if a else k.get('args'))\n"
        "    real(self, *a, **k)\n"
        "subprocess.Popen.__init__ = counting\n"
        f"{statement}\n"
        "print(len(started), started)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True,
        cwd=Path(__file__).resolve().parent.parent,
    )  # fmt: skip
    return done.stdout


def test_importing_asyncssh_starts_no_process() -> None:
    started = processes_started_by("from nc_core.asyncssh_import import asyncssh")
    assert started.startswith("0 "), started


def test_importing_the_agent_or_the_server_starts_no_process() -> None:
    # Each process start is what makes a daemon slow to boot on a slow machine (the lab).
    started = processes_started_by("import nc_agent.application, nc_server.northbound")
    assert started.startswith("0 "), started


def test_importing_the_daemons_raises_no_warning() -> None:
    # asyncssh's import raised five CryptographyDeprecationWarnings (DSA) at every start.
    done = subprocess.run(
        [sys.executable, "-W", "error", "-c",
         "import nc_server.cli, nc_agent.cli, nc_server.northbound, nc_agent.application, "
         "nc_core.client, nc_agent.pull"],
        capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent,
    )  # fmt: skip
    assert done.returncode == 0 and done.stderr == "", done.stderr


def test_only_asyncssh_s_dsa_warning_is_ignored() -> None:
    code = (
        "import warnings\n"
        "from nc_core.asyncssh_import import asyncssh\n"
        "from cryptography.utils import CryptographyDeprecationWarning as W\n"
        "warnings.warn_explicit('DSA is deprecated', W, 'x.py', 1, module='mine')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True,
        cwd=Path(__file__).resolve().parent.parent,
    )  # fmt: skip
    assert "CryptographyDeprecationWarning: DSA is deprecated" in done.stderr
