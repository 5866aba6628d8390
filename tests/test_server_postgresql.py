"""A real cevpn-server on PostgreSQL (--database): its command line end to end.

What the server keeps across a kill -9 on PostgreSQL is in tests/test_persistence.py
(its tests marked BOTH_BACK_ENDS); here are the subcommands and the refusals.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from tests.controller import vpn_xml
from tests.netconf_server import ADMIN, BIN, ServerProcess, free_port, ncclient_connect
from tests.postgres import PASSWORD, PostgresCluster

SVC = "urn:cevpn:yang:cevpn-service"
NC = "urn:ietf:params:xml:ns:netconf:base:1.0"


def cevpn_server(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "cevpn-server"), *args], capture_output=True, text=True, timeout=120
    )


def test_enrol_with_the_server_stopped_reads_the_sites_from_postgresql(
    tmp_path: Path, postgres_url: str
) -> None:
    server = ServerProcess("cevpn-server", tmp_path / "state", free_port(), database=postgres_url)
    server.adduser(ADMIN[0], ADMIN[1], ("admin",))
    server.start()
    try:
        with ncclient_connect(server) as m:
            m.edit_config(
                target="running",
                config=(
                    f'<config xmlns="{NC}"><vpn-service xmlns="{SVC}"><server><endpoint>'
                    f"<address>127.0.0.1</address><port>{server.port}</port></endpoint>"
                    "</server></vpn-service></config>"
                ),
            )
            m.edit_config(
                target="running", config=f'<config xmlns="{NC}">{vpn_xml("jade")}</config>'
            )
            m.edit_config(
                target="running",
                config=(
                    f'<config xmlns="{NC}"><vpn-service xmlns="{SVC}"><vpn><id>jade</id><site>'
                    "<id>jade-s1</id><ce-address>192.0.2.1</ce-address><management>"
                    f"<address>127.0.0.1</address><port>{free_port()}</port></management>"
                    "<local-prefix>10.1.0.0/24</local-prefix></site></vpn></vpn-service></config>"
                ),
            )
    finally:
        server.stop()
    bundle = tmp_path / "bundle.json"
    done = cevpn_server(
        "enrol", "--database", postgres_url, "--state-dir", str(server.state_dir),
        "jade-s1", "-o", str(bundle),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert bundle.stat().st_mode & 0o077 == 0
    pre_configuration = json.loads(bundle.read_text())["cevpn-ce:ce"]["pre-configuration"]
    assert pre_configuration["site-id"] == "jade-s1"
    assert not (server.state_dir / "vpn-server.db").exists()
    unknown = cevpn_server(
        "enrol", "--database", postgres_url, "--state-dir", str(server.state_dir), "no-such-site"
    )  # fmt: skip
    assert unknown.returncode == 1
    assert unknown.stderr == "enrol: there is no site 'no-such-site' in the VPN database\n"


def test_the_configuration_file_names_the_database_for_every_subcommand(
    tmp_path: Path, postgres_url: str
) -> None:
    config = tmp_path / "cevpn-server.toml"
    config.write_text(f'database = "{postgres_url}"\n')
    config.chmod(0o600)
    state = tmp_path / "state"
    password = tmp_path / "pw"
    password.write_text("alice-secret-1\n")
    added = cevpn_server(
        "--config", str(config), "adduser", "--state-dir", str(state), "alice",
        "--password-file", str(password),
    )  # fmt: skip
    assert added.returncode == 0, added.stderr
    shown = cevpn_server("--config", str(config), "stored-config", "--state-dir", str(state))
    assert shown.returncode == 0, shown.stderr
    assert "<name>alice</name>" in shown.stdout
    assert not (state / "vpn-server.db").exists()
    # The same state directory on its default SQLite holds no such account.
    on_sqlite = cevpn_server("stored-config", "--state-dir", str(state))
    assert "<name>alice</name>" not in on_sqlite.stdout


def test_a_server_that_cannot_reach_its_database_says_so_without_the_password(
    tmp_path: Path, postgres: PostgresCluster
) -> None:
    url = postgres.url("no_such_database")
    done = subprocess.run(
        [str(BIN / "cevpn-server"), "--state-dir", str(tmp_path / "state"),
         "--listen", f"127.0.0.1:{free_port()}", "--database", url],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 1
    assert 'database "no_such_database" does not exist' in done.stderr
    assert "cevpn_test:***@127.0.0.1" in done.stderr
    assert PASSWORD not in done.stdout + done.stderr
