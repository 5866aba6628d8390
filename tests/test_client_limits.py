"""One client cannot exhaust the server: sessions per connection and per user, sessions kept
for administrators, output to a client that does not read, input held server-wide.

Servers run in-process (tests/in_process.py) with small limits so each bound
is reached quickly; clients are real SSH clients over TCP.  Every wait is on
a condition of the server's state, never on a clock.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paramiko
import pytest
from lxml import etree
from paramiko.ssh_exception import ChannelException

from nc_core.asyncssh_import import asyncssh
from nc_core.session import Session
from nc_core.transaction import Application
from tests.in_process import InProcessServer

NC = "urn:ietf:params:xml:ns:netconf:base:1.0"
NACM = "urn:ietf:params:xml:ns:yang:ietf-netconf-acm"
NOTIF = "urn:ietf:params:xml:ns:netconf:notification:1.0"
HELLO = (
    f'<hello xmlns="{NC}"><capabilities><capability>urn:ietf:params:netconf:base:1.0'
    "</capability></capabilities></hello>]]>]]>"
).encode()
USERS = {
    "admin": ("pw-admin-1", ("admin",)),
    "ce-site": ("pw-ce-1", ()),
    "viewer": ("pw-viewer-1", ()),
}


def until(condition: Callable[[], Any], what: str, timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.02)


@pytest.fixture
def make_server(tmp_path: Path) -> Iterator[Callable[..., InProcessServer]]:
    servers: list[InProcessServer] = []

    def make(app: Application | None = None, **options: Any) -> InProcessServer:
        srv = InProcessServer(tmp_path / f"state{len(servers)}", app, users=USERS, **options)
        servers.append(srv)
        return srv

    yield make
    for srv in servers:
        srv.close()


class Raw:
    """A NETCONF channel over paramiko that sends bytes and reads only when asked."""

    def __init__(self, srv: InProcessServer, user: str, window: int = 1 << 21) -> None:
        self.transport = paramiko.Transport(socket.create_connection(("127.0.0.1", srv.port)))
        self.transport.start_client(timeout=10)
        self.transport.auth_password(user, USERS[user][0])
        self.chan = self.transport.open_session(window_size=window, max_packet_size=16384)
        self.chan.invoke_subsystem("netconf")
        self.chan.settimeout(30)
        self.read_until(b"]]>]]>")
        self.chan.sendall(HELLO)

    def read_until(self, marker: bytes, count: int = 1) -> bytes:
        data = b""
        while data.count(marker) < count:
            chunk = self.chan.recv(1 << 16)
            if not chunk:
                break
            data += chunk
        return data

    def close(self) -> None:
        self.transport.close()


async def open_sessions(srv: InProcessServer, user: str, count: int) -> tuple[int, list[str]]:
    """Open ``count`` NETCONF channels on ONE SSH connection: (opened, refusal reasons)."""
    async with asyncssh.connect(
        "127.0.0.1",
        srv.port,
        username=user,
        password=USERS[user][0],
        known_hosts=None,
        client_keys=None,
        agent_path=None,
    ) as conn:
        opened, refused = 0, []
        channels = []
        for _ in range(count):
            try:
                chan, _ = await conn.create_session(asyncssh.SSHClientSession, subsystem="netconf")
            except asyncssh.ChannelOpenError as exc:
                refused.append(exc.reason)
                continue
            channels.append(chan)
            opened += 1
        for chan in channels:
            chan.close()
        return opened, refused


def sessions_of(srv: InProcessServer, user: str) -> list[Session]:
    return srv.run(lambda: [s for s in srv.server.sessions.values() if s.user == user])


def test_one_ssh_connection_opens_only_so_many_sessions(make_server):
    srv = make_server(max_sessions_per_connection=3)
    opened, refused = asyncio.run(open_sessions(srv, "viewer", 5))
    assert opened == 3
    assert len(refused) == 2 and "this SSH connection has 3 sessions" in refused[0]


def test_one_account_cannot_take_every_session(make_server):
    srv = make_server(max_sessions_per_user=2)
    first = srv.connect("ce-site")
    second = srv.connect("ce-site")
    try:
        with pytest.raises(ChannelException) as exc:
            srv.connect("ce-site")
        assert "Resource shortage" in str(exc.value)  # the reason itself is in the channel's
        with srv.connect("admin") as admin, srv.connect("viewer") as viewer:
            admin.get_config("running")
            viewer.get_config("running")
    finally:
        first.close_session()
        second.close_session()


def test_the_last_sessions_are_kept_for_administrators(make_server):
    srv = make_server(max_sessions=6, reserved_admin_sessions=2, max_sessions_per_user=10)
    viewers = [srv.connect("viewer") for _ in range(4)]
    try:
        with pytest.raises(ChannelException, match="Resource shortage"):
            srv.connect("viewer")
        with srv.connect("admin") as a1, srv.connect("admin") as a2:
            a1.get_config("running")
            a2.get_config("running")
    finally:
        for m in viewers:
            m.close_session()


def test_a_session_refused_for_its_limit_frees_nothing_it_did_not_take(make_server):
    srv = make_server(max_sessions_per_user=1)
    with srv.connect("ce-site"):
        with pytest.raises(ChannelException, match="Resource shortage"):
            srv.connect("ce-site")
    until(lambda: srv.run(lambda: srv.server.channels["ce-site"] == 0), "the channel is released")
    with srv.connect("ce-site") as again:
        again.get_config("running")


def get_request(n: int) -> bytes:
    # 4 KiB each, so that more than the server's SSH window (2 MiB) is sent in all.
    padding = " " * 4096
    return f'<rpc message-id="{n}" xmlns="{NC}"><get/>{padding}</rpc>]]>]]>'.encode()


def test_a_client_that_does_not_read_is_not_served_until_it_reads(make_server):
    high = 64 * 1024
    srv = make_server(output_high_water=high)
    raw = Raw(srv, "admin", window=32 * 1024)
    try:
        sent = threading.Event()
        total = 1000

        def send() -> None:
            for n in range(total):
                raw.chan.sendall(get_request(n))
            sent.set()

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        session = until(lambda: sessions_of(srv, "admin"), "the session exists")[0]
        # The server stops handling this client's requests once its output waits unread,
        # and stops reading from it once enough requests are queued.
        until(lambda: srv.run(lambda: not session.writable.is_set()), "output backs up")
        until(lambda: srv.run(lambda: session._reading_paused), "reading pauses")
        held = srv.run(session.output_buffered)
        reply_size = srv.run(lambda: len(etree.tostring(srv.server.datastores["running"].root)))
        assert held <= high + 4 * (reply_size + 4096)
        assert not sent.is_set()  # the client's requests wait in its own buffers
        replies = raw.read_until(b"</rpc-reply>", count=total)  # now it reads: all answered
        assert replies.count(b"</rpc-reply>") == total
        assert sent.wait(30)
    finally:
        raw.close()


def test_input_held_for_all_clients_is_bounded(make_server):
    srv = make_server(max_input_buffer=256 * 1024, max_message_size=1 << 20)
    first = Raw(srv, "admin")
    second = Raw(srv, "viewer")
    try:
        head = f'<rpc message-id="1" xmlns="{NC}"><get-config><source><running/></source>'
        first.chan.sendall(head.encode() + b" " * (150 * 1024))
        mine = until(lambda: sessions_of(srv, "admin"), "the session exists")[0]
        until(lambda: srv.run(mine.input_held) >= 150 * 1024, "the first message is held")
        second.chan.sendall(head.encode() + b" " * (150 * 1024))
        refused = second.read_until(b"]]>]]>")
        assert b"resource-denied" in refused
        until(lambda: not sessions_of(srv, "viewer"), "the second session is closed")
        first.chan.sendall(b"</get-config></rpc>]]>]]>")
        assert b"<data" in first.read_until(b"]]>]]>")
        until(lambda: srv.run(lambda: srv.server.input_held) == 0, "nothing is held")
    finally:
        first.close()
        second.close()


def group_edit(n: int) -> str:
    return (
        f'<config xmlns="{NC}"><nacm xmlns="{NACM}"><groups><group><name>g{n}</name>'
        "</group></groups></nacm></config>"
    )


def test_a_subscriber_that_never_reads_is_closed_not_buffered_without_end(make_server):
    srv = make_server(output_high_water=8 * 1024, notification_backlog=16 * 1024)
    raw = Raw(srv, "admin", window=8 * 1024)
    try:
        sub = f'<rpc message-id="1" xmlns="{NC}"><create-subscription xmlns="{NOTIF}"/></rpc>]]>]]>'
        raw.chan.sendall(sub.encode())
        raw.read_until(b"<ok/>")
        subscriber = until(lambda: sessions_of(srv, "admin"), "the session exists")[0]
        with srv.connect("admin") as editor:
            n = 0
            while srv.run(lambda: not subscriber.closed):
                editor.edit_config(target="running", config=group_edit(n))
                n += 1
                assert n < 5000, "the subscriber was never closed"
            editor.get_config("running")  # the others are served as ever
        assert srv.run(lambda: subscriber.id not in srv.server.sessions)
    finally:
        raw.close()


def test_connections_that_never_log_in_are_capped(make_server):
    srv = make_server(max_unauthenticated=2)
    idle = [socket.create_connection(("127.0.0.1", srv.port)) for _ in range(2)]
    try:
        until(lambda: srv.run(lambda: srv.server.unauthenticated) == 2, "two wait to log in")
        third = socket.create_connection(("127.0.0.1", srv.port))
        third.settimeout(30)
        while third.recv(65536):  # the server's greeting, then it closes: no login possible
            pass
        third.close()
        assert srv.run(lambda: srv.server.unauthenticated) == 2
    finally:
        for sock in idle:
            sock.close()
    until(lambda: srv.run(lambda: srv.server.unauthenticated) == 0, "the idle ones are gone")
    with srv.connect("admin") as m:
        m.get_config("running")


class DevicesApplication(Application):
    """An application whose 'ce-*' accounts are devices with a quota of their own."""

    def session_quota(self, user: str) -> int | None:
        return 2 if user.startswith("ce-") else None


def test_device_accounts_on_a_quota_of_their_own_do_not_count_against_max_sessions(
    make_server,
):
    srv = make_server(DevicesApplication(), max_sessions=3, reserved_admin_sessions=1)
    devices = [srv.connect("ce-site"), srv.connect("ce-site")]
    try:
        viewers = [srv.connect("viewer"), srv.connect("viewer")]  # the unreserved two
        try:
            with pytest.raises(ChannelException, match="Resource shortage"):
                srv.connect("viewer")
            with srv.connect("admin") as admin:  # the reserved one
                admin.get_config("running")
        finally:
            for m in viewers:
                m.close_session()
    finally:
        for m in devices:
            m.close_session()


def test_a_device_account_cannot_hold_more_than_its_quota(make_server):
    srv = make_server(DevicesApplication(), max_sessions_per_user=10)
    held = [srv.connect("ce-site"), srv.connect("ce-site")]
    try:
        before = srv.server.stats.refused_sessions
        with pytest.raises(ChannelException, match="Resource shortage"):
            srv.connect("ce-site")
        assert srv.server.stats.refused_sessions == before + 1
        with srv.connect("viewer") as viewer:
            viewer.get_config("running")
    finally:
        for m in held:
            m.close_session()
    until(
        lambda: srv.run(lambda: not srv.server.quota_channels and srv.server.limited_channels == 0),
        "every channel is given back to its own count",
    )
    with srv.connect("ce-site") as again:
        again.get_config("running")
