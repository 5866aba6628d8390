"""The command line cannot mislead an operator: no new host key printed for a mistyped
state directory, no log level silently taken for another."""

from __future__ import annotations

import subprocess

import pytest

from tests.netconf_server import BIN

COMMANDS = ["cevpn-server", "cevpn-agent"]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / args[0]), *args[1:]], capture_output=True, text=True)


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
    state = tmp_path / "state"
    key = tmp_path / "k.pub"
    key.write_text(
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAINNE7SiAB0dX9CNpmIAVxlfhKpncGUay/WKMnEVvJLOU x\n"
    )
    assert (
        run(command, "adduser", "--state-dir", str(state), "alice", "--key", str(key)).returncode
        == 0
    )
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
