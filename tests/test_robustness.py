"""What a hostile or broken client can do to a cevpn server: only ever end its own session.

Each test attacks a real cevpn-server over real SSH, then checks that a fresh
client still gets answers and that the server is idle again (CPU time stops
growing), so no thread spins and no task loops.
"""

from __future__ import annotations

import base64
import concurrent.futures
import socket
import time
from collections.abc import Iterator

import paramiko
import pytest

from tests.netconf_server import ADMIN, ServerProcess, ncclient_connect, running_server
from tests.waiting import wait_for

NC = "urn:ietf:params:xml:ns:netconf:base:1.0"
HELLO_11 = (
    f'<hello xmlns="{NC}"><capabilities><capability>urn:ietf:params:netconf:base:1.1'
    "</capability></capabilities></hello>]]>]]>"
).encode()
HELLO_10 = HELLO_11.replace(b"base:1.1", b"base:1.0")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    # A 16 MiB limit keeps the oversized-message test quick; the default is 64 MiB.
    with running_server(
        tmp_path_factory.mktemp("robust"), "cevpn-server", "--max-message-size", str(16 << 20)
    ) as srv:
        yield srv


class RawSession:
    """A NETCONF channel we can feed arbitrary bytes, with the host key pinned."""

    def __init__(self, server: ServerProcess, hello: bytes = HELLO_11) -> None:
        self.transport = paramiko.Transport((server.host, server.port))
        self.transport.start_client(timeout=10)
        key = self.transport.get_remote_server_key()
        if base64.b64encode(key.asbytes()).decode() != server.host_key_b64:
            raise AssertionError("server host key does not match the pinned key")
        self.transport.auth_password(ADMIN[0], ADMIN[1])
        self.chan = self.transport.open_session(timeout=10)
        self.chan.invoke_subsystem("netconf")
        self.chan.settimeout(20)
        self.server_hello = self.read_until(b"]]>]]>")
        self.chan.sendall(hello)

    def read_until(self, marker: bytes, limit: int = 10 << 20) -> bytes:
        data = b""
        while marker not in data:
            chunk = self.chan.recv(65536)
            if not chunk:
                break
            data += chunk
            assert len(data) < limit
        return data

    def read_all(self) -> bytes:
        data = b""
        try:
            while chunk := self.chan.recv(65536):
                data += chunk
        except TimeoutError:
            pass
        return data

    def send_chunked(self, message: bytes) -> None:
        self.chan.sendall(b"\n#%d\n" % len(message) + message + b"\n##\n")

    def close(self) -> None:
        self.transport.close()


def assert_server_healthy(server: ServerProcess) -> None:
    with ncclient_connect(server) as m:
        assert m.get_config("running").ok
    before = server.cpu_seconds()
    time.sleep(2.0)  # a measurement window: CPU the idle server spends in it (a busy loop)
    used = server.cpu_seconds() - before
    assert used < 0.2, f"server used {used:.2f} s of CPU while idle"


def test_entity_bomb_is_refused_with_malformed_message(server):
    raw = RawSession(server)
    bomb = (
        b'<?xml version="1.0"?><!DOCTYPE rpc [<!ENTITY a "aaaaaaaaaa">'
        + b"".join(
            f'<!ENTITY {c} "{f"&{p};" * 10}">'.encode()
            for p, c in zip("abcdefg", "bcdefgh", strict=True)
        )
        + f']><rpc message-id="1" xmlns="{NC}"><get-config><source><running/></source>'.encode()
        + b"<filter>&h;</filter></get-config></rpc>"
    )
    raw.send_chunked(bomb)
    reply = raw.read_until(b"</rpc-reply>")
    assert b"<error-tag>malformed-message</error-tag>" in reply
    assert b"DOCTYPE" in reply
    raw.close()
    assert_server_healthy(server)


def test_external_entity_is_never_resolved(server):
    raw = RawSession(server)
    xxe = (
        b'<?xml version="1.0"?><!DOCTYPE rpc [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
        + f'<rpc message-id="1" xmlns="{NC}"><get-config><source><running/></source>'.encode()
        + b"<filter>&x;</filter></get-config></rpc>"
    )
    raw.send_chunked(xxe)
    reply = raw.read_until(b"</rpc-reply>")
    assert b"malformed-message" in reply
    assert b"root:" not in reply
    raw.close()
    assert_server_healthy(server)


def test_malformed_xml_on_base_10_closes_only_that_session(server):
    raw = RawSession(server, HELLO_10)
    raw.chan.sendall(b"<rpc message-id='1'><unclosed>]]>]]>")
    assert raw.read_all() == b""  # closed without a reply: base:1.0 has no malformed-message
    raw.close()
    assert_server_healthy(server)


def test_hundred_megabyte_message_is_refused_as_too_big(server):
    raw = RawSession(server)
    payload = b"<rpc>" + b"x" * (1 << 20)
    raw.chan.sendall(b"\n#%d\n" % (100 << 20))
    reply = raw.read_all()
    assert b"<error-tag>too-big</error-tag>" in reply
    raw.close()
    # and streamed end-of-message framing, never delimited
    raw = RawSession(server, HELLO_10)
    sent = 0
    try:
        while sent < (100 << 20):
            raw.chan.sendall(payload)
            sent += len(payload)
    except (OSError, EOFError):
        pass  # the server closed the session part-way: what we want
    assert sent < (100 << 20) or raw.read_all().count(b"too-big")
    raw.close()
    assert_server_healthy(server)


def test_chunk_header_announcing_4_gib_closes_the_session(server):
    raw = RawSession(server)
    raw.chan.sendall(b"\n#4294967296\n")
    assert b"rpc-reply" not in raw.read_all()
    raw.close()
    assert_server_healthy(server)


def test_client_vanishing_mid_chunk_leaves_nothing_behind(server):
    raw = RawSession(server)
    raw.chan.sendall(b"\n#1000\n<rpc message-id='1' xmlns='" + NC.encode() + b"'><get")
    raw.transport.sock.close()  # no SSH goodbye, no NETCONF close
    with ncclient_connect(server) as m:

        def sessions() -> int:
            data = m.get(
                filter=(
                    "subtree",
                    '<netconf-state xmlns="urn:ietf:params:xml:ns:yang:ietf-netconf-monitoring">'
                    "<sessions/></netconf-state>",
                )
            ).data_xml
            return int(data.count("<session-id>"))

        wait_for(lambda: sessions() == 1, 30, "only our own session left")
    assert_server_healthy(server)


def test_silent_tcp_connection_does_not_delay_others(server):
    silent = socket.create_connection((server.host, server.port))
    try:
        started = time.monotonic()
        with ncclient_connect(server) as m:
            assert m.get_config("running").ok
        assert time.monotonic() - started < 10
    finally:
        silent.close()
    assert_server_healthy(server)


def test_fifty_concurrent_sessions_all_get_answers(server):
    def one(_: int) -> bool:
        with ncclient_connect(server) as m:
            return bool(m.get_config("running").ok and m.get_config("running").ok)

    with concurrent.futures.ThreadPoolExecutor(50) as pool:
        results = list(pool.map(one, range(50)))
    assert results == [True] * 50
    assert_server_healthy(server)


def test_rpc_without_message_id_gets_missing_attribute(server):
    raw = RawSession(server)
    raw.send_chunked(
        f'<rpc xmlns="{NC}"><get-config><source><running/></source></get-config></rpc>'.encode()
    )
    reply = raw.read_until(b"</rpc-reply>")
    assert b"<error-tag>missing-attribute</error-tag>" in reply
    assert b"<bad-attribute>message-id</bad-attribute>" in reply
    raw.close()


def test_unknown_operation_is_operation_not_supported_and_attributes_come_back(server):
    raw = RawSession(server)
    raw.send_chunked(
        f'<rpc message-id="7" xmlns="{NC}" xmlns:x="urn:x" x:tag="t"><frobnicate/></rpc>'.encode()
    )
    reply = raw.read_until(b"</rpc-reply>")
    assert b"operation-not-supported" in reply
    assert b'message-id="7"' in reply and b'x:tag="t"' in reply
    raw.close()


def exchange(server: ServerProcess, message: str) -> bytes:
    raw = RawSession(server)
    try:
        raw.send_chunked(message.encode())
        return raw.read_until(b"</rpc-reply>")
    finally:
        raw.close()


def test_an_rpc_with_two_operations_gets_bad_element_naming_the_second(server):
    reply = exchange(
        server,
        f'<rpc message-id="7" xmlns="{NC}"><get/><get-config><source><running/>'
        "</source></get-config></rpc>",
    )
    assert b"<error-type>protocol</error-type>" in reply
    assert b"<error-tag>bad-element</error-tag>" in reply
    assert b"<bad-element>get-config</bad-element>" in reply
    assert b'message-id="7"' in reply
    assert b"Internal server error" not in reply


def test_an_rpc_with_no_operation_gets_missing_element(server):
    reply = exchange(server, f'<rpc message-id="8" xmlns="{NC}"></rpc>')
    assert b"<error-tag>missing-element</error-tag>" in reply
    assert b"Internal server error" not in reply


@pytest.mark.parametrize(
    "root",
    [f'<foo message-id="9" xmlns="{NC}"/>', '<rpc message-id="9"><get/></rpc>'],
    ids=["another-element", "rpc-without-namespace"],
)
def test_a_root_other_than_rpc_gets_unknown_element(server, root):
    reply = exchange(server, root)
    assert b"<error-type>protocol</error-type>" in reply
    assert b"<error-tag>unknown-element</error-tag>" in reply
    assert b"Internal server error" not in reply
    assert_server_healthy(server)
