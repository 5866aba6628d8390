"""NETCONF over SSH (RFC 6242) with asyncssh.

The server answers only the 'netconf' subsystem (no shell, no exec, no port
forwarding; a pseudo-terminal may be requested, and is ignored), authenticates
users from the running datastore (password as an iana-crypt-hash, or an
authorized public key; RFC 7317 accounts), and presents an Ed25519 host key
generated once into the state directory.  Ed25519 because yangcli's libssh2
cannot verify a server that offers only rsa-sha2-* host keys
(../shared/NETCONF-NOTES.md).  Everything runs on one asyncio loop: a slow or
silent client costs a few objects, never a thread, and never delays others.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nc_core.asyncssh_import import asyncssh
from nc_core.call_home import KEEPALIVE_COUNT_MAX as CALL_HOME_KEEPALIVE_COUNT_MAX
from nc_core.call_home import KEEPALIVE_INTERVAL as CALL_HOME_KEEPALIVE_INTERVAL
from nc_core.call_home import CallHomeEndpoint
from nc_core.server import NetconfServer
from nc_core.session import Session

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
    """One SSH connection: authentication (nc_core.ssh_auth) and admission of its sessions."""

    def __init__(self, nc: NetconfServer) -> None:
        self.nc = nc
        self.conn: asyncssh.SSHServerConnection | None = None
        self.peer = ""
        self.authenticated = False
        self.counted = False
        self.password_failures = 0
        self.keys_refused = 0
        self.username = ""
        self.channels = 0

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self.conn = conn
        peer = conn.get_extra_info("peername")
        self.peer = str(peer[0]) if peer else ""
        if self.nc.unauthenticated >= self.nc.options.max_unauthenticated:
            # OpenSSH's MaxStartups: connections that never log in cost nothing else.
            log.warning(
                "connection from %s refused: %d connections are not authenticated yet",
                self.peer,
                self.nc.unauthenticated,
            )
            conn.close()
            return
        self.nc.unauthenticated += 1
        self.counted = True

    def connection_lost(self, exc: Exception | None) -> None:
        if self.counted and not self.authenticated:
            self.nc.unauthenticated -= 1
            if self.password_failures or self.keys_refused:
                log.info(
                    "connection from %s closed before authenticating as %r "
                    "(%d passwords, %d public keys refused)",
                    self.peer,
                    self.username,
                    self.password_failures,
                    self.keys_refused,
                )
        self.counted = False

    def begin_auth(self, username: str) -> bool:
        self.username = username
        return True  # every account needs authentication: nothing is anonymous

    def auth_completed(self) -> None:
        self.authenticated = True
        if self.counted:
            self.nc.unauthenticated -= 1
            self.counted = False

    def password_auth_supported(self) -> bool:
        return True

    async def validate_password(self, username: str, password: str) -> bool:
        guard = self.nc.password_guard
        ok = await guard.check(self.nc.users.get(username), password, self.peer)
        if ok:
            log.info("user %r authenticated from %s (password)", username, self.peer)
            return True
        self.password_failures += 1
        log.warning(
            "authentication failed: user %r from %s (password; %d failures from this address "
            "in the last %.0f s)",
            username,
            self.peer,
            guard.recent_failures(self.peer),
            guard.policy.window,
        )
        if self.password_failures >= guard.policy.per_connection and self.conn is not None:
            conn = self.conn
            # After the failure is sent: the client reads it, then the disconnect.
            asyncio.get_running_loop().call_soon(
                conn.disconnect,
                asyncssh.DISC_NO_MORE_AUTH_METHODS_AVAILABLE,
                "Too many authentication failures",
            )
        return False

    def public_key_auth_supported(self) -> bool:
        return True

    def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        user = self.nc.users.get(username)
        blob = key.public_data
        ok = user is not None and any(k.key_data == blob for k in user.keys)
        if not ok:
            self.keys_refused += 1
            log.debug("public key refused for user %r from %s", username, self.peer)
        return ok

    def session_requested(self) -> asyncssh.SSHServerSession[bytes] | bool:
        if self.conn is None:
            return False
        username = str(self.conn.get_extra_info("username") or "")
        why = self.nc.admit_session(username, self.channels)
        if why is not None:
            self.nc.stats.refused_sessions += 1
            log.warning("session of %r from %s refused: %s", username, self.peer, why)
            raise asyncssh.ChannelOpenError(
                asyncssh.OPEN_RESOURCE_SHORTAGE, f"NETCONF session refused: {why}"
            )
        self.channels += 1
        quota = self.nc.channel_opened(username)
        return _NetconfChannel(
            self.nc,
            self.conn,
            self.peer,
            username,
            lambda user: self._channel_closed(user, quota),
            self._others_open,
        )

    def _others_open(self) -> bool:
        """Whether a channel other than the one asking is still open on this connection."""
        return self.channels > 1

    def _channel_closed(self, username: str, quota: bool) -> None:
        self.channels -= 1
        self.nc.channel_closed(username, quota)


class _NetconfChannel(asyncssh.SSHServerSession[bytes]):
    def __init__(
        self,
        nc: NetconfServer,
        conn: asyncssh.SSHServerConnection,
        peer: str,
        username: str,
        on_closed: Callable[[str], None],
        others_open: Callable[[], bool],
    ) -> None:
        self.nc = nc
        self.others_open = others_open
        self.conn = conn
        self.peer = peer
        self.username = username
        self.on_closed: Callable[[str], None] | None = on_closed
        self.chan: asyncssh.SSHServerChannel[bytes] | None = None
        self.session: Session | None = None
        self.subsystem_ok = False

    def connection_made(self, chan: asyncssh.SSHServerChannel[bytes]) -> None:
        self.chan = chan
        # Past the high-water mark asyncssh calls pause_writing: the session then stops
        # handling this client's requests until it reads (nc_core.session).
        high = self.nc.options.output_high_water
        chan.set_write_buffer_limits(high=high, low=high // 4)

    def pty_requested(self, term_type: str, term_size: Any, term_modes: Any) -> bool:
        """Grant a pseudo-terminal, and ignore it.

        scrapli's 'system' transport runs ``ssh -tt ... -s netconf``, which requests a
        pty before the subsystem; granting it lets such clients work as they do with
        other NETCONF servers.  Nothing here is a terminal: asyncssh echoes, edits lines
        and turns LF into CR LF only in its line editor, which exists only on a text
        channel with line_editor on, and listen() makes bytes channels (encoding=None)
        with it off; so the NETCONF byte stream stays exact, and the channel still runs
        only the netconf subsystem (no shell, no exec).
        """
        log.debug(
            "pty %r requested by %r from %s: granted, ignored", term_type, self.username, self.peer
        )
        return True

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
        self.session = self.nc.new_session(
            self.username,
            self.peer,
            write=chan.write,
            close_transport=self._close,
            pause_reading=chan.pause_reading,
            resume_reading=chan.resume_reading,
            transport_buffered=chan.get_write_buffer_size,
        )
        self.session.start()

    def data_received(self, data: bytes, datatype: Any) -> None:
        if self.session is not None:
            self.session.data_received(data)

    def eof_received(self) -> bool:
        if self.session is not None and not self.session.closed:
            self.session.close("dropped", transport_gone=True)
        return False

    def pause_writing(self) -> None:
        if self.session is not None:
            self.session.pause_writing()

    def resume_writing(self) -> None:
        if self.session is not None:
            self.session.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.session is not None:
            self.session.connection_lost()
        if self.on_closed is not None:
            self.on_closed(self.username)
            self.on_closed = None

    def _close(self) -> None:
        """The session ended (close-session, kill-session, an error): close its channel.
        Other NETCONF sessions on the same SSH connection (RFC 6242 lets a client open
        several: the VPN server keeps two per CE) carry on; the connection goes with
        its last channel."""
        if self.chan is not None:
            self.chan.close()
        if not self.others_open():
            self.conn.close()


def _server_options(nc: NetconfServer) -> dict[str, Any]:
    """The SSH server's settings, the same for a connection accepted and one dialled."""
    return {
        "server_host_keys": [host_key(nc.options.state_dir)],
        "encoding": None,
        "login_timeout": LOGIN_TIMEOUT,
        "allow_pty": True,  # granted and ignored (_NetconfChannel.pty_requested)
        "agent_forwarding": False,
        "x11_forwarding": False,
        "keepalive_interval": 0,
        "line_editor": False,  # never: on a pty it would echo and rewrite LF as CR LF
    }


async def listen(nc: NetconfServer, host: str, port: int) -> asyncssh.SSHAcceptor:
    """Start accepting NETCONF over SSH connections."""
    return await asyncssh.create_server(
        lambda: _NetconfSSHServer(nc),
        None if host in ("", "::") else host,  # '::': every address, IPv4 too
        port,
        **_server_options(nc),
    )


async def call_home(nc: NetconfServer, endpoint: CallHomeEndpoint) -> asyncssh.SSHServerConnection:
    """Dial a NETCONF client's call-home port and serve NETCONF over SSH on that connection
    (RFC 8071 Section 3.1: the connecting side is the SSH server).  Returns once the SSH
    handshake is done; the client then authenticates as on any connection."""
    options = _server_options(nc)
    # A server that vanished without a TCP reset is noticed by keepalives: the dialler then
    # calls the next endpoint (with several servers on one database, the one that owns the
    # CE from then on).
    options["keepalive_interval"] = CALL_HOME_KEEPALIVE_INTERVAL
    options["keepalive_count_max"] = CALL_HOME_KEEPALIVE_COUNT_MAX
    return await asyncssh.connect_reverse(
        endpoint.address,
        endpoint.port,
        server_factory=lambda: _NetconfSSHServer(nc),
        **options,
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
    from nc_core.metrics import MetricsEndpoint

    endpoint = MetricsEndpoint(nc.metrics)
    if nc.options.metrics_listen is not None:
        # First: a port taken fails the start before anything else is done.
        await endpoint.start(*nc.options.metrics_listen)
    try:
        await nc.load()
        listener = Listener(nc)
        nc.listener = listener
        await listener.start()
    except BaseException:
        endpoint.close()
        raise
    await nc.app.started()
    try:
        await (stop or asyncio.Event()).wait()
    finally:
        endpoint.close()
        listener.close()
        await nc.app.stopping()
        nc.close()
