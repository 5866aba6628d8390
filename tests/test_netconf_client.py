"""The asyncio NETCONF client (nc_core.netconf_client) against a real cevpn server over real SSH.

It is the VPN server's southbound: one SSH connection per CE carrying
standing sessions, pipelined requests, the host key pinned, every byte from
the CE bounded.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from lxml import etree

from nc_core.asyncssh_import import asyncssh
from nc_core.endpoint import Endpoint
from nc_core.netconf_client import NetconfSession, RpcFailed, SessionLost, connect_ssh
from nc_core.transport_ssh import host_key_line
from nc_core.xmlutil import NC_NS
from tests.in_process import InProcessServer

pytestmark = pytest.mark.timeout(120)

GET_CONFIG = f'<get-config xmlns="{NC_NS}"><source><running/></source></get-config>'
LOCK = f'<lock xmlns="{NC_NS}"><target><running/></target></lock>'
UNLOCK = f'<unlock xmlns="{NC_NS}"><target><running/></target></unlock>'


@dataclass
class Setup:
    server: InProcessServer
    endpoint: Endpoint


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    key = asyncssh.generate_private_key("ssh-ed25519")
    key_file = tmp_path / "client_key"
    key_file.write_bytes(key.export_private_key())
    key_file.chmod(0o600)
    public = key.export_public_key().decode().strip()
    server = InProcessServer(
        tmp_path / "state", users={}, public_keys={"southbound": ([public], ("admin",))}
    )
    endpoint = Endpoint(
        host="127.0.0.1",
        port=server.port,
        host_keys=[host_key_line(tmp_path / "state")],
        username="southbound",
        key_file=key_file,
    )
    try:
        yield Setup(server, endpoint)
    finally:
        server.close()


async def _session(
    endpoint: Endpoint, **kw: object
) -> tuple[asyncssh.SSHClientConnection, NetconfSession]:
    conn = await connect_ssh(endpoint)
    return conn, await NetconfSession.open(conn, "test", **kw)  # type: ignore[arg-type]


def test_the_hello_gives_a_session_id_and_chunked_framing(setup: Setup) -> None:
    async def run() -> None:
        conn, session = await _session(setup.endpoint)
        assert session.session_id and session.session_id.isdigit()
        assert session.framer.chunked  # both sides speak base:1.1
        await session.close()
        conn.close()

    asyncio.run(run())


def test_requests_sent_together_get_their_own_replies(setup: Setup) -> None:
    """Ten requests in flight at once, one of them failing: each future gets its own reply."""

    async def run() -> None:
        conn, first = await _session(setup.endpoint)
        second = await NetconfSession.open(conn, "other")
        await second.rpc(LOCK)  # so that the first session's lock, in the middle, is refused
        futures = [first.send(LOCK if i == 5 else GET_CONFIG) for i in range(10)]
        outcomes = []
        for future in futures:
            try:
                reply = await first.wait(future)
                outcomes.append(etree.QName(reply[0]).localname)
            except RpcFailed as exc:
                outcomes.append(exc.tag)
        assert outcomes == ["data"] * 5 + ["lock-denied"] + ["data"] * 4
        await second.rpc(UNLOCK)
        conn.close()

    asyncio.run(run())


def test_requests_sent_in_one_write_get_their_own_replies_in_order(setup: Setup) -> None:
    """send_all: an element, a string and pre-serialised bytes, one channel write."""

    async def run() -> None:
        conn, session = await _session(setup.endpoint)
        assert session.channel is not None
        writes: list[bytes] = []
        write = session.channel.write

        def counted(data: bytes) -> None:
            writes.append(data)
            write(data)

        session.channel.write = counted  # type: ignore[method-assign]
        futures = session.send_all([etree.fromstring(GET_CONFIG), LOCK, UNLOCK.encode()])
        replies = [await session.wait(future) for future in futures]
        assert len(writes) == 1
        assert [etree.QName(reply[0]).localname for reply in replies] == ["data", "ok", "ok"]
        conn.close()

    asyncio.run(run())


def test_the_southbound_connection_is_encrypted_with_aes_gcm(setup: Setup) -> None:
    """asyncssh's ChaCha20-Poly1305 is Python and costs the server ~7x AES-GCM per packet."""

    async def run() -> None:
        conn = await connect_ssh(setup.endpoint)
        names = (getattr(conn, "_enc_alg_cs", None), getattr(conn, "_enc_alg_sc", None))
        assert names == (b"aes256-gcm@openssh.com", b"aes256-gcm@openssh.com")
        conn.close()

    asyncio.run(run())


def test_an_rpc_error_keeps_its_tag_and_message_and_the_session_stays_usable(setup: Setup) -> None:
    async def run() -> None:
        conn, session = await _session(setup.endpoint)
        with pytest.raises(RpcFailed) as failed:
            await session.rpc(UNLOCK)  # nobody holds the lock
        assert failed.value.tag == "operation-failed"
        assert failed.value.message
        assert session.alive
        reply = await session.rpc(GET_CONFIG)
        assert reply.find(f"{{{NC_NS}}}data") is not None
        conn.close()

    asyncio.run(run())


def test_an_rpc_error_keeps_its_error_info(setup: Setup) -> None:
    """The element a server did not know is named in error-info (bad-element): a client
    that sent an optional leaf an older server lacks tells that case from others."""

    async def run() -> None:
        conn, session = await _session(setup.endpoint)
        with pytest.raises(RpcFailed) as failed:
            await session.rpc(
                f'<get-config xmlns="{NC_NS}"><source><running/></source><no-such-leaf/>'
                "</get-config>"
            )
        assert failed.value.tag == "unknown-element"
        assert "no-such-leaf" in failed.value.info.split()
        conn.close()

    asyncio.run(run())


def test_two_sessions_share_one_ssh_connection(setup: Setup) -> None:
    async def run() -> None:
        conn, first = await _session(setup.endpoint)
        second = await NetconfSession.open(conn, "second")
        assert first.session_id != second.session_id
        peers = setup.server.run(
            lambda: sorted(s.id for s in setup.server.server.sessions.values())
        )
        assert [int(first.session_id or 0), int(second.session_id or 0)] == peers
        conn.close()

    asyncio.run(run())


def test_a_host_key_other_than_the_pinned_one_is_refused(setup: Setup) -> None:
    other = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode()
    wrong = Endpoint(**{**setup.endpoint.__dict__, "host_keys": [other]})

    async def run() -> None:
        with pytest.raises(SessionLost, match="host key is not the one pinned"):
            await connect_ssh(wrong)

    asyncio.run(run())


def test_a_port_that_refuses_the_connection_was_not_reached(setup: Setup) -> None:
    """The path to the peer is in doubt: a confirmation that fails so ends provisioning."""
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]  # bound, never listening: refused
        nowhere = Endpoint(**{**setup.endpoint.__dict__, "port": port})
        with pytest.raises(SessionLost, match="connection refused") as lost:
            asyncio.run(connect_ssh(nowhere))
    assert lost.value.reached is False


def test_a_port_that_accepts_but_never_speaks_ssh_was_reached(setup: Setup) -> None:
    """The kernel completes the TCP handshake of a CE too busy to answer: the path works,
    the peer is slow, and the failure says so."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)  # never accepted, never a banner
        port = silent.getsockname()[1]
        busy = Endpoint(**{**setup.endpoint.__dict__, "port": port, "timeout": 0.5})
        with pytest.raises(SessionLost, match="no SSH session within") as lost:
            asyncio.run(connect_ssh(busy))
    assert lost.value.reached is True


def test_an_endpoint_without_a_pinned_key_is_refused_before_connecting(setup: Setup) -> None:
    bare = Endpoint(**{**setup.endpoint.__dict__, "host_keys": []})
    with pytest.raises(ValueError, match="no pinned host key"):
        asyncio.run(connect_ssh(bare))


def test_a_killed_session_fails_its_next_request_and_is_no_longer_alive(setup: Setup) -> None:
    async def run() -> None:
        conn, victim = await _session(setup.endpoint)
        killer = await NetconfSession.open(conn, "killer")
        await killer.rpc(
            f'<kill-session xmlns="{NC_NS}"><session-id>{victim.session_id}</session-id>'
            "</kill-session>"
        )
        await asyncio.wait_for(victim.wait_closed(), 30)  # its close follows the kill's reply
        assert not victim.alive
        with pytest.raises(SessionLost):
            victim.send(GET_CONFIG)
        assert killer.alive  # the other session on the connection is untouched
        conn.close()

    asyncio.run(run())


def test_a_reply_larger_than_the_limit_ends_the_session(setup: Setup) -> None:
    async def run() -> None:
        conn, session = await _session(
            setup.endpoint, max_message_size=10_000
        )  # the hello is ~3.4 kB
        get = f'<get xmlns="{NC_NS}"/>'  # state data: the yang-library alone is far larger
        with pytest.raises(SessionLost, match="framing"):
            await session.rpc(get)
        assert not session.alive
        conn.close()

    asyncio.run(run())


def test_a_server_that_stops_answering_ends_the_session_after_the_timeout(
    setup: Setup,
) -> None:
    """The server's event loop is held until the client has given up: the reply cannot
    come in time whatever the machine's load, and the late one is never taken."""
    gate = threading.Event()

    async def run() -> None:
        conn, session = await _session(setup.endpoint)
        setup.server.loop.call_soon_threadsafe(gate.wait, 60)
        try:
            with pytest.raises(SessionLost, match="no reply within"):
                await session.rpc(GET_CONFIG, timeout=0.2)
        finally:
            gate.set()
        assert not session.alive
        with pytest.raises(SessionLost):
            session.send(GET_CONFIG)
        conn.close()

    asyncio.run(run())


def test_the_client_key_file_is_what_logs_in(setup: Setup, tmp_path: Path) -> None:
    stranger = tmp_path / "stranger_key"
    stranger.write_bytes(asyncssh.generate_private_key("ssh-ed25519").export_private_key())
    stranger.chmod(0o600)
    other = Endpoint(**{**setup.endpoint.__dict__, "key_file": stranger})

    async def run() -> None:
        with pytest.raises(SessionLost, match="refused"):
            await connect_ssh(other)

    asyncio.run(run())
