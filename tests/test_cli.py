"""The command line cannot mislead an operator: no new host key printed for a mistyped
state directory, no log level silently taken for another."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.netconf_server import BIN

COMMANDS = ["cevpn-server", "cevpn-agent"]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / args[0]), *args[1:]], capture_output=True, text=True)


def state_with_alice(command: str, tmp_path: Path) -> Path:
    """A state directory ``adduser`` has used: account alice with a public key."""
    state = tmp_path / "state"
    key = tmp_path / "k.pub"
    key.write_text(
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAINNE7SiAB0dX9CNpmIAVxlfhKpncGUay/WKMnEVvJLOU x\n"
    )
    assert (
        run(command, "adduser", "--state-dir", str(state), "alice", "--key", str(key)).returncode
        == 0
    )
    return state


@pytest.mark.parametrize("command", COMMANDS)
def test_host_key_of_a_directory_without_server_state_is_refused(command, tmp_path):
    mistyped = tmp_path / "var-lib-cevpn-srever"
    result = run(command, "host-key", "--state-dir", str(mistyped))
    assert result.returncode == 1
    assert "holds no server state" in result.stderr
    assert result.stdout == ""
    assert not mistyped.exists()  # nothing made there either


@pytest.mark.parametrize("command", COMMANDS)
def test_host_key_of_a_used_state_directory_is_printed_and_stays_the_same(command, tmp_path):
    state = state_with_alice(command, tmp_path)
    first = run(command, "host-key", "--state-dir", str(state))
    second = run(command, "host-key", "--state-dir", str(state))
    assert first.returncode == 0 and first.stdout.startswith("ssh-ed25519 ")
    assert first.stdout == second.stdout
    assert (state / "ssh_host_ed25519_key.pub").read_text().split()[1] == first.stdout.split()[1]


@pytest.mark.parametrize("command", COMMANDS)
def test_an_unknown_log_level_is_refused(command, tmp_path):
    result = run(command, "--state-dir", str(tmp_path / "s"), "--log-level", "verbose")
    assert result.returncode == 2
    assert "invalid choice: 'VERBOSE'" in result.stderr and "DEBUG" in result.stderr
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("level", ["debug", "WARNING"])
def test_log_levels_are_taken_in_either_case(level):
    from nc_core.cli_common import build_parser

    args = build_parser("x", "x").parse_args(["--log-level", level])
    assert args.log_level == level.upper()


def used_state(command: str, tmp_path) -> Path:
    """A state directory an account was added to (so host-key prints its key)."""
    state, password = tmp_path / "state", tmp_path / "pw"
    password.write_text("alice-secret-1\n")
    add = run(
        command, "adduser", "--state-dir", str(state), "alice", "--password-file", str(password)
    )
    assert add.returncode == 0, add.stderr
    return state


@pytest.mark.parametrize("command", COMMANDS)
def test_host_key_as_a_known_hosts_line_names_the_hosts_and_drops_the_comment(command, tmp_path):
    # scrapli reads a known_hosts line as exactly HOSTS KEYTYPE KEY (no comment) and looks a
    # host up without its port; OpenSSH looks up [HOST]:PORT for a port other than 22.
    state = used_state(command, tmp_path)
    plain = run(command, "host-key", "--state-dir", str(state)).stdout.split()
    assert len(plain) == 3  # the documented form keeps its comment
    result = run(
        command,
        "host-key",
        "--state-dir",
        str(state),
        "--known-hosts",
        "192.0.2.10,192.0.2.10:830,ce1.example:22,[2001:db8::1]:830,2001:db8::2",
    )
    assert result.returncode == 0, result.stderr
    hosts = "192.0.2.10,[192.0.2.10]:830,ce1.example,[2001:db8::1]:830,2001:db8::2"
    assert result.stdout == f"{hosts} {plain[0]} {plain[1]}\n"


@pytest.mark.parametrize("value", ["192.0.2.10:", "192.0.2.10:99999", "[2001:db8::1]", "a b", ""])
def test_host_key_refuses_a_known_hosts_pattern_it_cannot_write(value, tmp_path):
    state = used_state("cevpn-server", tmp_path)
    result = run("cevpn-server", "host-key", "--state-dir", str(state), "--known-hosts", value)
    assert result.returncode == 2
    assert "--known-hosts" in result.stderr and result.stdout == ""


@pytest.mark.parametrize("command", COMMANDS)
def test_stored_config_prints_what_adduser_committed(command, tmp_path):
    state = state_with_alice(command, tmp_path)
    result = run(command, "stored-config", "--state-dir", str(state))
    assert result.returncode == 0, result.stderr
    assert "<name>alice</name>" in result.stdout and result.stdout.startswith("<?xml")


@pytest.mark.parametrize("command", COMMANDS)
def test_stored_config_of_a_directory_without_server_state_is_refused(command, tmp_path):
    mistyped = tmp_path / "var-lib-cevpn-srever"
    result = run(command, "stored-config", "--state-dir", str(mistyped))
    assert result.returncode == 1
    assert "holds no server state" in result.stderr and result.stdout == ""
    assert not mistyped.exists()
