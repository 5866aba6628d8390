"""The ncclient-based client (nc_core.client) takes SSH handshakes one at a time.

paramiko verifies and signs Ed25519 keys with PyNaCl, whose cffi types are realized
lazily, and that is not thread-safe on a CPython with a GIL (python-cffi/cffi#271): an
agent whose notification listener and first fetch handshook at the same moment aborted
with a cffi assertion.  These tests run real handshakes against a real server, with an
Ed25519 host key and an Ed25519 client key, and watch PyNaCl being called.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nacl.signing
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from nc_core import client
from nc_core.client import Endpoint, connect
from tests.netconf_server import ServerProcess, free_port


@pytest.fixture
def server_and_key(tmp_path: Path) -> Iterator[tuple[ServerProcess, Path]]:
    key = Ed25519PrivateKey.generate()
    key_file = tmp_path / "id_ed25519"
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
    )
    key_file.chmod(0o600)
    public = tmp_path / "id_ed25519.pub"
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        + b" tester\n"
    )
    server = ServerProcess("cevpn-server", tmp_path / "state", free_port())
    server.adduser("tester", key=public, groups=("admin",))
    server.start()
    try:
        yield server, key_file
    finally:
        server.stop()


def endpoint_of(server: ServerProcess, key_file: Path) -> Endpoint:
    return Endpoint(
        host=server.host,
        port=server.port,
        host_keys=[server.host_key_line],
        username="tester",
        key_file=key_file,
    )


@pytest.fixture
def nacl_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, bool]]:
    """Every PyNaCl sign/verify paramiko makes: (which, was the handshake turn held)."""
    calls: list[tuple[str, bool]] = []
    sign, verify = nacl.signing.SigningKey.sign, nacl.signing.VerifyKey.verify

    def watched_sign(self: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(("sign", client.HANDSHAKE_TURN.locked()))
        return sign(self, *args, **kwargs)

    def watched_verify(self: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(("verify", client.HANDSHAKE_TURN.locked()))
        return verify(self, *args, **kwargs)

    monkeypatch.setattr(nacl.signing.SigningKey, "sign", watched_sign)
    monkeypatch.setattr(nacl.signing.VerifyKey, "verify", watched_verify)
    return calls


def test_pynacl_is_used_only_while_the_handshake_turn_is_held(
    server_and_key: tuple[ServerProcess, Path], nacl_calls: list[tuple[str, bool]]
) -> None:
    server, key_file = server_and_key
    manager = connect(endpoint_of(server, key_file))
    try:
        manager.get_config("running")
    finally:
        manager.close_session()
    assert {which for which, _ in nacl_calls} == {"sign", "verify"}  # both keys are Ed25519
    assert all(held for _, held in nacl_calls), nacl_calls
    assert not client.HANDSHAKE_TURN.locked()
