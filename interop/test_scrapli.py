"""scrapli-netconf (unmodified) against both cevpn servers, over real SSH.

Three ways scrapli reaches a NETCONF server: the sync NetconfDriver with its
'system' transport (the OpenSSH client in a pseudo-terminal) and with its
'paramiko' transport, and the AsyncNetconfDriver with 'asyncssh'.  Each one
pins the server's host key (auth_strict_key=True) from a known_hosts file
written exactly as an operator would: the output of
``cevpn-server host-key --known-hosts`` (docs/operator-guide.md, "Pin the host
key"), and authenticates with a password.  Each does what a script does:
open, get-config with a subtree filter, lock, edit-config to the candidate,
commit, unlock, get, close.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from pathlib import Path

import pytest
from lxml import etree
from scrapli.exceptions import ScrapliAuthenticationFailed
from scrapli.ssh_config import SSHKnownHosts
from scrapli_netconf.driver import AsyncNetconfDriver, NetconfDriver
from scrapli_netconf.response import NetconfResponse

from interop.documents import SYS, user_config
from tests.netconf_server import ADMIN, BIN, ServerProcess

MON = "urn:ietf:params:xml:ns:yang:ietf-netconf-monitoring"
NS = {"sys": SYS, "mon": MON}
USERS_FILTER = (
    f'<system xmlns="{SYS}"><authentication><user><name/></user></authentication></system>'
)
SESSIONS_FILTER = f'<netconf-state xmlns="{MON}"><sessions/></netconf-state>'

# A session the server cuts short leaves scrapli's paramiko transport spinning, not failing.
pytestmark = pytest.mark.timeout(120)

SYNC_TRANSPORTS = ["system", "paramiko"]
# OpenSSH's words, then scrapli's own (paramiko and asyncssh transports).
REFUSED = "Host key verification failed|in known_hosts but public key does not match"


def known_hosts(server: ServerProcess, directory: Path) -> Path:
    """A known_hosts file with the line ``host-key --known-hosts`` prints.

    scrapli's paramiko and asyncssh transports look the host up without its port; the
    OpenSSH client (scrapli's 'system' transport) looks up ``[host]:port``: one line
    names both.
    """
    result = subprocess.run(
        [
            str(BIN / server.command),
            "host-key",
            "--state-dir",
            str(server.state_dir),
            "--known-hosts",
            f"{server.host},{server.host}:{server.port}",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    path = directory / f"known_hosts-{server.command}"
    path.write_text(result.stdout)
    return path


def driver_args(server: ServerProcess, hosts: Path) -> dict[str, object]:
    return {
        "host": server.host,
        "port": server.port,
        "auth_username": ADMIN[0],
        "auth_password": ADMIN[1],
        "auth_strict_key": True,
        "ssh_known_hosts_file": str(hosts),
        "ssh_config_file": False,
        "timeout_socket": 30,
        "timeout_transport": 30,
        "timeout_ops": 30,
    }


def ok(response: NetconfResponse) -> etree._Element:
    assert not response.failed, response.result
    return etree.fromstring(response.result.encode())


def user_names(response: NetconfResponse) -> list[str]:
    tree = ok(response)
    assert tree.xpath("//sys:user/sys:name", namespaces=NS), response.result
    # The subtree filter selected the names only.
    assert not tree.xpath("//sys:user/*[local-name() != 'name']", namespaces=NS)
    return sorted(tree.xpath("//sys:user/sys:name/text()", namespaces=NS))


def session_count(response: NetconfResponse) -> int:
    return len(ok(response).xpath("//mon:sessions/mon:session", namespaces=NS))


def test_the_known_hosts_line_is_one_scrapli_parses(either: ServerProcess, tmp_path: Path):
    hosts = known_hosts(either, tmp_path)
    key = SSHKnownHosts(str(hosts)).lookup(either.host)
    assert key == {"key_type": "ssh-ed25519", "public_key": either.host_key_b64}


@pytest.mark.parametrize("transport", SYNC_TRANSPORTS)
def test_sync_driver_reads_edits_commits_and_locks(
    either: ServerProcess, transport: str, tmp_path: Path
):
    if transport == "system" and shutil.which("ssh") is None:
        pytest.fail("scrapli's system transport needs the OpenSSH client (ssh) on PATH")
    name = f"scrapli-{transport}"
    conn = NetconfDriver(transport=transport, **driver_args(either, known_hosts(either, tmp_path)))
    conn.open()
    try:
        assert "urn:ietf:params:netconf:capability:candidate:1.0" in conn.server_capabilities
        assert name not in user_names(conn.get_config(source="running", filter_=USERS_FILTER))
        ok(conn.lock(target="candidate"))
        ok(conn.edit_config(config=user_config(name), target="candidate"))
        ok(conn.commit())
        ok(conn.unlock(target="candidate"))
        assert name in user_names(conn.get_config(source="running", filter_=USERS_FILTER))
        assert session_count(conn.get(filter_=SESSIONS_FILTER)) >= 1
        ok(conn.edit_config(config=user_config(name, "delete"), target="candidate"))
        ok(conn.commit())
        assert name not in user_names(conn.get_config(source="running", filter_=USERS_FILTER))
    finally:
        conn.close()


def test_async_driver_reads_edits_commits_and_locks(either: ServerProcess, tmp_path: Path):
    hosts = known_hosts(either, tmp_path)

    async def script() -> None:
        name = "scrapli-asyncssh"
        conn = AsyncNetconfDriver(transport="asyncssh", **driver_args(either, hosts))
        await conn.open()
        try:
            got = await conn.get_config(source="running", filter_=USERS_FILTER)
            assert name not in user_names(got)
            ok(await conn.lock(target="candidate"))
            ok(await conn.edit_config(config=user_config(name), target="candidate"))
            ok(await conn.commit())
            ok(await conn.unlock(target="candidate"))
            got = await conn.get_config(source="running", filter_=USERS_FILTER)
            assert name in user_names(got)
            assert session_count(await conn.get(filter_=SESSIONS_FILTER)) >= 1
            ok(await conn.edit_config(config=user_config(name, "delete"), target="candidate"))
            ok(await conn.commit())
        finally:
            await conn.close()

    asyncio.run(script())


@pytest.mark.parametrize("transport", ["system", "paramiko", "asyncssh"])
def test_a_wrong_pinned_key_is_refused(server: ServerProcess, transport: str, tmp_path: Path):
    other = "AAAAC3NzaC1lZDI1NTE5AAAAINNE7SiAB0dX9CNpmIAVxlfhKpncGUay/WKMnEVvJLOU"
    hosts = tmp_path / "known_hosts"
    hosts.write_text(
        f"{server.host},[{server.host}]:{server.port} ssh-ed25519 {other}\n", encoding="utf-8"
    )
    args = driver_args(server, hosts)
    args["timeout_ops"] = 10
    if transport == "asyncssh":

        async def script() -> None:
            conn = AsyncNetconfDriver(transport="asyncssh", **args)
            await conn.open()
            await conn.close()

        with pytest.raises(ScrapliAuthenticationFailed, match=REFUSED):
            asyncio.run(script())
        return
    conn = NetconfDriver(transport=transport, **args)
    with pytest.raises(ScrapliAuthenticationFailed, match=REFUSED):
        conn.open()
    conn.close()
