"""The systemd units: `systemd-analyze verify` finds nothing, and each sandbox grants only
what the daemon's work needs."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.netconf_server import BIN

ROOT = Path(__file__).resolve().parent.parent
UNITS = ROOT / "packaging" / "systemd"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze") or "/usr/bin/systemd-analyze"

needs_systemd_analyze = pytest.mark.skipif(
    not Path(SYSTEMD_ANALYZE).exists(), reason="systemd-analyze is not installed"
)


def installable_copy(unit: str, tmp_path: Path, name: str | None = None) -> Path:
    """The unit with ExecStart pointing at this venv's command (verify wants a real binary)."""
    text = (UNITS / unit).read_text().replace("/opt/cevpn/bin/", f"{BIN}/")
    copy = tmp_path / (name or unit)
    copy.write_text(text)
    return copy


def verify(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [SYSTEMD_ANALYZE, "verify", f"./{path.name}"],
        cwd=path.parent, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def service_section(unit: str) -> dict[str, list[str]]:
    values: dict[str, list[str]] = {}
    section = None
    for line in (UNITS / unit).read_text().splitlines():
        line = line.strip()
        if line.startswith("["):
            section = line
        elif section == "[Service]" and "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            values.setdefault(key, []).append(value)
    return values


@needs_systemd_analyze
@pytest.mark.parametrize(
    ("unit", "name"),
    [("cevpn-server.service", None), ("cevpn-agent@.service", "cevpn-agent@vpn.service")],
)
def test_systemd_analyze_verify_finds_nothing(unit: str, name: str | None, tmp_path: Path) -> None:
    result = verify(installable_copy(unit, tmp_path, name))
    assert result.returncode == 0 and result.stdout == "" and result.stderr == "", result.stderr


@needs_systemd_analyze
def test_verify_would_catch_a_misspelt_directive(tmp_path: Path) -> None:
    copy = installable_copy("cevpn-server.service", tmp_path)
    copy.write_text(copy.read_text().replace("NoNewPrivileges=", "NoNewPrivilege="))
    assert "Unknown key 'NoNewPrivilege'" in verify(copy).stderr


@pytest.mark.parametrize("unit", ["cevpn-server.service", "cevpn-agent@.service"])
def test_both_units_are_sandboxed(unit: str) -> None:
    service = service_section(unit)
    assert service["NoNewPrivileges"] == ["yes"]
    assert service["ProtectSystem"] == ["strict"]
    assert service["PrivateTmp"] == ["yes"] and service["ProtectHome"] == ["yes"]
    assert service["StateDirectory"] and "${STATE_DIRECTORY}" in service["ExecStart"][0]


def test_the_server_may_only_bind_a_low_port() -> None:
    service = service_section("cevpn-server.service")
    assert service["DynamicUser"] == ["yes"]
    assert service["CapabilityBoundingSet"] == ["CAP_NET_BIND_SERVICE"]


def test_the_agent_has_only_the_capabilities_of_its_kernel_and_namespace_work() -> None:
    service = service_section("cevpn-agent@.service")
    (caps,) = service["CapabilityBoundingSet"]
    assert set(caps.split()) == {
        "CAP_NET_ADMIN",  # XFRM, links, routes, nftables, net sysctls
        "CAP_SYS_ADMIN",  # setns(2), ip netns exec, unshare --mount around charon
        "CAP_NET_RAW",  # BIRD's OSPF and charon's raw sockets
        "CAP_NET_BIND_SERVICE",  # NETCONF 830, IKE 500/4500
        "CAP_KILL",  # a stale charon or BIRD of an earlier run
    }


def test_an_agent_instance_is_its_vpn_namespace() -> None:
    service = service_section("cevpn-agent@.service")
    assert service["StateDirectory"] == ["cevpn-agent/%i"]
    assert service["ExecStart"][0].endswith("--vpn-netns %i")
    assert "--config /etc/cevpn/agent-%i.toml" in service["ExecStart"][0]


@pytest.mark.parametrize(
    ("command", "example"), [("cevpn-server", "server.toml"), ("cevpn-agent", "agent.toml")]
)
def test_the_example_configuration_files_are_accepted(command: str, example: str) -> None:
    result = subprocess.run(
        [str(BIN / command), "--config", str(ROOT / "packaging" / "config" / example), "--help"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
