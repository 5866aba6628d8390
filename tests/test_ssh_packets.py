"""What a NETCONF reply costs on the wire: one SSH packet, not two.

asyncssh precedes every packet with an empty SSH_MSG_IGNORE, a countermeasure for CBC
ciphers that none of the negotiated ciphers needs (nc_core.asyncssh_import).  The
client's paramiko counts the packets it receives; the count tells.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import paramiko
import pytest

from nc_core.asyncssh_import import uses_cbc
from tests.netconf_server import ADMIN, ServerProcess, running_server

EOM = b"]]>]]>"
HELLO = (
    b'<?xml version="1.0" encoding="UTF-8"?><hello xmlns="urn:ietf:params:xml:ns:netconf:'
    b'base:1.0"><capabilities><capability>urn:ietf:params:netconf:base:1.0</capability>'
    b"</capabilities></hello>" + EOM
)
GET_CONFIG = (
    b'<rpc xmlns="urn:ietf:params:xml:ns:netconf:base:1.0" message-id="1"><get-config>'
    b"<source><running/></source></get-config></rpc>" + EOM
)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with running_server(tmp_path_factory.mktemp("packets")) as srv:
        yield srv


def read_message(chan: paramiko.Channel) -> bytes:
    data = b""
    while EOM not in data:
        chunk = chan.recv(65536)
        assert chunk, "the server closed the session"
        data += chunk
    return data


def packets_received(transport: paramiko.Transport) -> int:
    """SSH packets paramiko has received (its inbound sequence number)."""
    return int(transport.packetizer._Packetizer__sequence_number_in)


def test_a_netconf_reply_arrives_as_one_ssh_packet(server: ServerProcess, tmp_path: Path) -> None:
    key_type, key_b64 = server.host_key_line.split()[:2]
    assert key_type == "ssh-ed25519"
    host_key = paramiko.Ed25519Key(data=base64.b64decode(key_b64))
    transport = paramiko.Transport((server.host, server.port))
    try:
        transport.connect(hostkey=host_key, username=ADMIN[0], password=ADMIN[1])
        chan = transport.open_session()
        chan.invoke_subsystem("netconf")
        read_message(chan)
        chan.sendall(HELLO)
        counts = []
        for _ in range(5):
            before = packets_received(transport)
            chan.sendall(GET_CONFIG)
            assert b"<data" in read_message(chan)
            counts.append(packets_received(transport) - before)
        assert counts == [1] * 5
    finally:
        transport.close()


@pytest.mark.parametrize(
    ("cs", "sc", "cbc"),
    [
        (b"aes128-ctr", b"chacha20-poly1305@openssh.com", False),
        (b"aes128-gcm@openssh.com", b"aes256-ctr", False),
        (b"aes128-cbc", b"aes128-ctr", True),
        (b"aes128-ctr", b"aes256-cbc", True),
        (None, b"aes128-ctr", True),  # renamed by a later asyncssh: keep the countermeasure
    ],
)
def test_the_ignore_packet_is_kept_whenever_a_cbc_cipher_may_be_in_use(
    cs: bytes | None, sc: bytes, cbc: bool
) -> None:
    conn = (
        SimpleNamespace(_enc_alg_sc=sc)
        if cs is None
        else SimpleNamespace(_enc_alg_cs=cs, _enc_alg_sc=sc)
    )
    assert uses_cbc(conn) is cbc
