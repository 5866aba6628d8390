"""The CE's install step and the Debian package lists it reads."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LISTS = ROOT / "packaging" / "debian"


def packages(name: str) -> set[str]:
    lines = (LISTS / f"{name}.txt").read_text().splitlines()
    return {line.strip() for line in lines if line.strip() and not line.startswith("#")}


def dry_run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(ROOT / "tools" / "install-ce"), "--dry-run", *args],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_install_ce_disables_the_distributions_strongswan_and_bird() -> None:
    result = dry_run("cevpn-0.1.0-py3-none-any.whl")
    assert result.returncode == 0, result.stderr
    commands = result.stdout.splitlines()
    for unit in ("strongswan-starter.service", "strongswan.service", "bird.service"):
        assert f"+ systemctl disable --now {unit}" in commands


def test_install_ce_installs_the_runtime_packages_and_the_wheel_not_the_lab() -> None:
    commands = dry_run("--prefix", "/srv/cevpn", "x.whl").stdout.splitlines()
    assert commands[0].endswith("tools/install-debian-packages runtime-common runtime-ce pip-build")
    assert "+ /srv/cevpn/bin/pip install -q x.whl" in commands
    assert any("cevpn-agent@.service /etc/systemd/system/" in c for c in commands)


def test_the_runtime_lists_hold_no_development_or_lab_package() -> None:
    runtime = packages("runtime-common") | packages("runtime-ce")
    assert {"strongswan-charon", "bird2", "libyang2", "nftables"} <= runtime
    assert not runtime & (packages("development") | packages("lab") | packages("pip-build"))
    assert not runtime & {"user-mode-linux", "tcpdump", "yangcli", "gcc", "libyang2-dev"}


def test_an_unknown_package_list_is_refused() -> None:
    result = subprocess.run(
        [str(ROOT / "tools" / "install-debian-packages"), "runtime-cee"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2 and "runtime-cee.txt" in result.stderr
