"""yangcli (yuma123 2.13, Debian's package) against a running cevpn-server.

yangcli discovers our modules from the hello and the YANG library, downloads
them with <get-schema>, and then builds every request from them -- a strict
test that our schemas are usable by a client nobody here wrote.  It wants a
terminal even in batch mode (run under `script`) and a private --home.

yangcli has no option to verify a server's host key (libssh2 is used without
a known_hosts check); it only ever talks to 127.0.0.1 here.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.netconf_server import ADMIN, ServerProcess

pytestmark = pytest.mark.skipif(shutil.which("yangcli") is None, reason="Debian yangcli missing")


def yangcli(server: ServerProcess, home: Path, *commands: str) -> str:
    script = home / "script.txt"
    script.write_text("\n".join(commands) + "\n")
    command = (
        f"yangcli --server={server.host} --ncport={server.port} --user={ADMIN[0]} "
        f"--password={ADMIN[1]} --batch-mode --run-script={script} --home={home} "
        "--log-level=info"
    )
    proc = subprocess.run(
        ["script", "-qec", command, "/dev/null"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    return proc.stdout.replace("\r\n", "\n")


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path


def test_yangcli_loads_every_module_it_needs_through_get_schema(server, home):
    out = yangcli(server, home, "get-schema identifier=cevpn-service")
    assert "NETCONF session established" in out
    assert "Auto-load for module 'cevpn-service' failed" not in out
    assert "module cevpn-service {" in out


def test_create_commit_and_subtree_get(server, home):
    out = yangcli(
        server,
        home,
        "create /vpn-service/vpn -- id=acme customer=ACME",
        "commit",
        "sget-config /vpn-service source=running",
    )
    assert "RPC OK Reply" in out
    assert "vpn acme {" in out
    assert "customer ACME" in out


def test_xpath_get_with_an_unprefixed_path(server, home):
    yangcli(server, home, "create /vpn-service/vpn -- id=globex customer=Globex", "commit")
    out = yangcli(server, home, "xget-config /vpn-service/vpn[id='globex'] source=running")
    assert "vpn globex {" in out
    assert "vpn acme {" not in out


def test_a_rejected_commit_shows_the_error_and_changes_nothing(server, home):
    out = yangcli(
        server,
        home,
        "create /vpn-service/vpn -- id=nohub customer=N",
        "merge /vpn-service/vpn[id='nohub']/topology -- type=hub-and-spoke",
        "commit",
    )
    assert "operation-failed" in out
    assert "needs at least one site with role 'hub'" in out
    # yangcli stops a script at the first error: clean the shared candidate up apart.
    yangcli(server, home, "discard-changes")
    out = yangcli(server, home, "sget-config /vpn-service source=running")
    assert "vpn nohub" not in out


def test_lock_and_unlock_running(server, home):
    out = yangcli(server, home, "lock target=running", "unlock target=running")
    assert out.count("RPC OK Reply") == 2


def test_replace_and_delete(server, home):
    yangcli(
        server,
        home,
        "create /vpn-service/vpn -- id=rd customer=First description=old",
        "commit",
    )
    out = yangcli(
        server,
        home,
        "replace /vpn-service/vpn -- id=rd customer=Second",
        "commit",
        "sget-config /vpn-service/vpn[id='rd'] source=running",
    )
    assert "customer Second" in out and "description" not in out.split("RPC Data Reply")[-1]
    out = yangcli(
        server,
        home,
        "delete /vpn-service/vpn[id='rd']",
        "commit",
        "sget-config /vpn-service source=running",
    )
    assert "vpn rd" not in out.split("RPC Data Reply")[-1]


def test_persistent_confirmed_commit_times_out_and_rolls_back(server, home):
    out = yangcli(
        server,
        home,
        "create /vpn-service/vpn -- id=tmo customer=T",
        "commit confirmed confirm-timeout=2 persist=tok-1",
    )
    assert "RPC OK Reply" in out
    assert "vpn tmo {" in yangcli(server, home, "sget-config /vpn-service source=running")
    time.sleep(3.5)
    assert "vpn tmo {" not in yangcli(server, home, "sget-config /vpn-service source=running")


def test_persistent_confirmed_commit_confirmed_from_another_session(server, home):
    yangcli(
        server,
        home,
        "create /vpn-service/vpn -- id=conf customer=C",
        "commit confirmed confirm-timeout=30 persist=tok-2",
    )
    out = yangcli(server, home, "commit persist-id=tok-2")
    assert "RPC OK Reply" in out
    time.sleep(0.5)
    assert "vpn conf {" in yangcli(server, home, "sget-config /vpn-service source=running")


# -- the CE agent ----------------------------------------------------------------------------


def test_yangcli_loads_the_ce_model_from_the_agent(agent, home):
    out = yangcli(agent, home, "get-schema identifier=cevpn-ce")
    assert "NETCONF session established" in out
    assert "Auto-load for module 'cevpn-ce' failed" not in out
    assert "module cevpn-ce {" in out


def test_yangcli_creates_commits_and_reads_back_on_the_agent(agent, home):
    out = yangcli(
        agent,
        home,
        "create /system/authentication/user -- name=yangcli-op",
        "commit",
        "sget-config /system/authentication source=running",
    )
    assert "RPC OK Reply" in out
    assert "yangcli-op" in out
