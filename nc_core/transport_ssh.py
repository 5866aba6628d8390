"""NETCONF over SSH (RFC 6242) with asyncssh.

The server answers only the 'netconf' subsystem (no shell, no exec, no port
forwarding), authenticates users from the running datastore (password as an
iana-crypt-hash, or an authorized public key; RFC 7317 accounts), and presents
an Ed25519 host key generated once into the state directory.  Ed25519 because
yangcli's libssh2 cannot verify a server that offers only rsa-sha2-* host keys
(../shared/NETCONF-NOTES.md).  Everything runs on one asyncio loop: a slow or
silent client costs a few objects, never a thread, and never delays others.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import Any

from nc_core.asyncssh_import import asyncssh
from nc_core.server import NetconfServer
from nc_core.session import Session
from nc_core.users import check_password

log = logging.getLogger("cevpn.netconf")

HOST_KEY_FILE = "ssh_host_ed25519_key"
LOGIN_TIMEOUT = 30.0
"""A TCP peer that has not authenticated after this long is disconnected."""


def host_key(state_dir: Path) -> asyncssh.SSHKey:
    """The server's Ed25519 host key, generated on first use and kept 0600."""
    path = state_dir / HOST_KEY_FILE
    if not path.exists():
        key = asyncssh.generate_private_key("ssh-ed25519", comment=f"cevpn@{os.uname().nodename}")
        tmp = path.with_name(f".{path.name}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(key.export_private_key())
        os.replace(tmp, path)
        pub = path.with_suffix(".pub")
        pub.write_bytes(key.export_public_key())
    return asyncssh.read_private_key(str(path))


def host_key_line(state_dir: Path) -> str:
    """The public host key in OpenSSH one-line form, for pinning by clients."""
    key = host_key(state_dir)
    return str(key.export_public_key().decode().strip())


class _NetconfSSHServer(asyncssh.SSHServer):
    def __init__(self, nc: NetconfServer) -> None:
        self.nc = nc
        self.conn: asyncssh.SSHServerConnection | None = None
        self.peer = ""

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self.conn = conn
        peer = conn.get_extra_info("peername")
        self.peer = str(peer[0]) if peer else ""

    def begin_auth(self, username: str) -> bool:
        return True  # every account needs authentication: nothing is anonymous

    def password_auth_supported(self) -> bool:
        return True

    def validate_password(self, username: str, password: str) -> bool:
        user = self.nc.users.get(username)
        ok = bool(user and user.password and check_password(password, user.password))
        if not ok:
            log.info("password authentication failed for %r from %s", username, self.peer)
        return ok

    def public_key_auth_supported(self) -> bool:
        return True

    def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        user = self.nc.users.get(username)
        if user is None:
            return False
        blob = key.public_data
        return any(k.key_data == blob for k in user.keys)

    def session_requested(self) -> asyncssh.SSHServerSession[bytes] | bool:
        if self.conn is None:
            return False
        if len(self.nc.sessions) >= self.nc.options.max_sessions:
            log.warning("session refused: %d sessions already", len(self.nc.sessions))
            return False
        return _NetconfChannel(self.nc, self.conn, self.peer)


class _NetconfChannel(asyncssh.SSHServerSession[bytes]):
    def __init__(self, nc: NetconfServer, conn: asyncssh.SSHServerConnection, peer: str) -> None:
        self.nc = nc
        self.conn = conn
        self.peer = peer
        self.chan: asyncssh.SSHServerChannel[bytes] | None = None
        self.session: Session | None = None
        self.subsystem_ok = False

    def connection_made(self, chan: asyncssh.SSHServerChannel[bytes]) -> None:
        self.chan = chan

    def pty_requested(self, term_type: str, term_size: Any, term_modes: Any) -> bool:
        return False

    def shell_requested(self) -> bool:
        return False

    def exec_requested(self, command: str) -> bool:
        return False

    def subsystem_requested(self, subsystem: str) -> bool:
        self.subsystem_ok = subsystem == "netconf"
        return self.subsystem_ok

    def session_started(self) -> None:
        chan = self.chan
        if chan is None or not self.subsystem_ok:
            return
        username = str(self.conn.get_extra_info("username") or "")
        self.session = self.nc.new_session(
            username,
            self.peer,
            write=chan.write,
            close_transport=self._close,
            pause_reading=chan.pause_reading,
            resume_reading=chan.resume_reading,
        )
        self.session.start()

    def data_received(self, data: bytes, datatype: Any) -> None:
        if self.session is not None:
            self.session.data_received(data)

    def eof_received(self) -> bool:
        if self.session is not None and not self.session.closed:
            self.session.close("dropped", transport_gone=True)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.session is not None:
            self.session.connection_lost()

    def _close(self) -> None:
        if self.chan is not None:
            self.chan.close()
        self.conn.close()


async def listen(nc: NetconfServer, host: str, port: int) -> asyncssh.SSHAcceptor:
    """Start accepting NETCONF over SSH connections."""
    key = host_key(nc.options.state_dir)
    return await asyncssh.create_server(
        lambda: _NetconfSSHServer(nc),
        None if host in ("", "::") else host,  # '::': every address, IPv4 too
        port,
        server_host_keys=[key],
        encoding=None,
        login_timeout=LOGIN_TIMEOUT,
        allow_pty=False,
        agent_forwarding=False,
        x11_forwarding=False,
        keepalive_interval=0,
        line_editor=False,
    )


class Listener:
    """The server's listening socket, which a configuration change may move to another port."""

    def __init__(self, nc: NetconfServer) -> None:
        self.nc = nc
        self.acceptor: asyncssh.SSHAcceptor | None = None
        self.host = nc.options.host
        self.port = nc.options.port

    async def start(self) -> None:
        self.acceptor = await listen(self.nc, self.host, self.port)
        log.info("listening on %s port %d", self.host, self.port)

    async def move(self, port: int) -> None:
        """Listen on ``port`` instead; sessions already open stay.  Raises OSError if it cannot."""
        if port == self.port and self.acceptor is not None:
            return
        acceptor = await listen(self.nc, self.host, port)
        if self.acceptor is not None:
            self.acceptor.close()
        self.acceptor, self.port = acceptor, port
        log.info("now listening on %s port %d", self.host, port)

    def close(self) -> None:
        if self.acceptor is not None:
            self.acceptor.close()
            self.acceptor = None


async def serve_forever(nc: NetconfServer, stop: asyncio.Event | None = None) -> None:
    """Load the datastores, listen, run until ``stop`` is set, then shut down cleanly."""
    await nc.load()
    listener = Listener(nc)
    nc.listener = listener
    await listener.start()
    await nc.app.started()
    try:
        await (stop or asyncio.Event()).wait()
    finally:
        listener.close()
        await nc.app.stopping()
        nc.close()
