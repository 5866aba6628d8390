"""`--config FILE`: every daemon flag from TOML, flags winning, unknown keys refused."""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

import pytest

from nc_core.cli_common import build_parser
from nc_core.config_file import parse_args
from tests.netconf_server import BIN, free_port, wait_listening


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / args[0]), *args[1:]], capture_output=True, text=True)


def start(command: str, tmp_path: Path, *args: str) -> tuple[subprocess.Popen[bytes], Path]:
    log = tmp_path / f"{command}.log"
    proc = subprocess.Popen(
        [str(BIN / command), *args], stdout=log.open("ab"), stderr=subprocess.STDOUT
    )
    return proc, log


@pytest.mark.parametrize("command", ["cevpn-server", "cevpn-agent"])
def test_a_daemon_takes_its_flags_from_the_config_file(command: str, tmp_path: Path) -> None:
    port = free_port()
    config = tmp_path / "cevpn.toml"
    config.write_text(
        f'state-dir = "{tmp_path / "state"}"\nlisten = "127.0.0.1:{port}"\n'
        'log-format = "json"\nlog-level = "info"\nmax-sessions = 32\n'
        + ('dataplane = "none"\n' if command == "cevpn-agent" else "")
    )
    proc, log = start(command, tmp_path, "--config", str(config))
    try:
        wait_listening(proc, "127.0.0.1", port, command, log)
    finally:
        proc.terminate()
        proc.wait(15)
    lines = log.read_text().splitlines()
    assert lines and all(json.loads(line)["logger"] for line in lines)


def test_a_flag_overrides_the_config_file(tmp_path: Path) -> None:
    from_file, from_flag = free_port(), free_port()
    config = tmp_path / "server.toml"
    config.write_text(f'state-dir = "{tmp_path / "state"}"\nlisten = "127.0.0.1:{from_file}"\n')
    proc, log = start(
        "cevpn-server", tmp_path, "--config", str(config), "--listen", f"127.0.0.1:{from_flag}"
    )
    try:
        wait_listening(proc, "127.0.0.1", from_flag, "cevpn-server", log)
    finally:
        proc.terminate()
        proc.wait(15)


@pytest.mark.parametrize("command", ["cevpn-server", "cevpn-agent"])
def test_an_unknown_key_is_refused_naming_the_key_and_the_file(
    command: str, tmp_path: Path
) -> None:
    config = tmp_path / "cevpn.toml"
    config.write_text('listne = "127.0.0.1:830"\n')
    result = run(command, "--config", str(config), "--state-dir", str(tmp_path / "s"))
    assert result.returncode == 2
    assert result.stderr.startswith(f"{command}: {config}: unknown key 'listne': ")
    assert "listen" in result.stderr  # the keys it knows
    assert not (tmp_path / "s").exists()


def test_a_value_the_flag_would_refuse_is_refused_naming_the_key_and_the_file(
    tmp_path: Path,
) -> None:
    config = tmp_path / "agent.toml"
    config.write_text('log-level = "verbose"\n')
    result = run("cevpn-agent", "--config", str(config))
    assert result.returncode == 2
    assert result.stderr == (
        f"cevpn-agent: {config}: key 'log-level': invalid choice 'VERBOSE' "
        "(choose from DEBUG, INFO, WARNING, ERROR, CRITICAL)\n"
    )


def test_a_missing_config_file_is_refused(tmp_path: Path) -> None:
    result = run("cevpn-server", "--config", str(tmp_path / "none.toml"))
    assert result.returncode == 2
    assert "none.toml: cannot read the configuration file" in result.stderr


def test_a_file_that_is_not_toml_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "server.toml"
    config.write_text("--listen :830\n")
    result = run("cevpn-server", "--config", str(config))
    assert result.returncode == 2 and f"{config}: not TOML: " in result.stderr


def parser_with_a_later_flag() -> argparse.ArgumentParser:
    parser = build_parser("cevpn-server", "test")
    parser.add_argument("--trace-target", metavar="HOST:PORT")  # as a later change adds
    parser.add_argument("--verbose-things", action="store_true")
    return parser


def test_a_flag_added_later_is_configurable_without_code(tmp_path: Path) -> None:
    config = tmp_path / "server.toml"
    config.write_text('trace-target = "127.0.0.1:9100"\nverbose-things = true\n')
    args = parse_args(parser_with_a_later_flag(), ["--config", str(config)])
    assert args.trace_target == "127.0.0.1:9100" and args.verbose_things is True
    assert args.configured == {"trace_target", "verbose_things"}


def test_typed_values_are_converted_as_the_flag_converts_them(tmp_path: Path) -> None:
    config = tmp_path / "server.toml"
    config.write_text(
        'listen = "[2001:db8::1]:8300"\nmax-sessions = 9\nfilter-budget = 2\nstate-dir = "/x"\n'
    )
    args = parse_args(parser_with_a_later_flag(), ["--config", str(config)])
    assert args.listen == ("2001:db8::1", 8300)
    assert args.max_sessions == 9 and args.filter_budget == 2.0 and args.state_dir == Path("/x")


def test_the_metrics_endpoint_is_configurable_like_any_flag(tmp_path: Path) -> None:
    config = tmp_path / "server.toml"
    config.write_text('metrics-listen = "127.0.0.1:9100"\n')
    args = parse_args(build_parser("cevpn-server", "test"), ["--config", str(config)])
    assert args.metrics_listen == ("127.0.0.1", 9100)


def test_a_string_where_a_switch_is_expected_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "server.toml"
    config.write_text('debug-libraries = "yes"\n')
    with pytest.raises(SystemExit):
        parse_args(parser_with_a_later_flag(), ["--config", str(config)])
    assert "key 'debug-libraries': expects true or false, not 'yes'" in capsys.readouterr().err
