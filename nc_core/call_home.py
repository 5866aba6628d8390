"""NETCONF Call Home over SSH (RFC 8071), the NETCONF server's side: dial the client, then serve.

A CE behind a NAT or a firewall on customer premises admits no incoming
connection, so its VPN server cannot reach it.  With Call Home the CE opens
the TCP connection to the server's call-home port and then acts as the SSH
*server* on it (RFC 8071 Section 3.1): the roles of SSH are unchanged, only
who dials is.  Everything a connection accepted on the listening port gets
applies here too: the same host key, the same authentication of users
(nc_core.ssh_auth via nc_core.transport_ssh), the same limits.

The connection is persistent (RFC 8071 Section 4.1, "persistent
connection"): the dialer keeps one connection open to the first endpoint
that answers, tried in configured order.  When it closes, it dials again at
once, starting with the endpoint it was connected to, then the others in
order (ietf-netconf-server's "start-with last-connected"): the server may
have closed it on purpose, to confirm a change over a new connection, and
waits for that call; a first-listed server that stopped answering without
refusing (a host gone, a frozen process) would hold the call up for
:data:`CONNECT_TIMEOUT` every time.  With several servers on one database the
CE thus stays with the server it called, which owns it, until that one fails.
While no endpoint answers, rounds are spaced by a back-off doubling from
:data:`FIRST_WAIT` up to ``max_wait``.
"""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nc_core.asyncssh_import import asyncssh
from nc_core.netconf_client import ENCRYPTION_PREFERENCE
from nc_core.tasks import stop_tasks

log = logging.getLogger("cevpn.netconf.call-home")

FIRST_WAIT = 1.0
"""Seconds before the second round of attempts; doubled each round up to max-wait."""
CONNECT_TIMEOUT = 10.0
"""Seconds one TCP connect plus SSH handshake to one endpoint may take."""
KEEPALIVE_INTERVAL = 5.0
"""Seconds between the dialling side's SSH keepalive requests on an idle call-home
connection: a server host that vanished (no TCP reset) is noticed, and the next endpoint
dialled, after :data:`KEEPALIVE_COUNT_MAX` of them go unanswered (15 s)."""
KEEPALIVE_COUNT_MAX = 3


@dataclass(frozen=True)
class CallHomeEndpoint:
    """One of the NETCONF client's call-home endpoints."""

    address: str
    port: int

    def __str__(self) -> str:
        return f"{self.address} port {self.port}"


Dial = Callable[[CallHomeEndpoint], Awaitable[asyncssh.SSHServerConnection]]
"""Open one call-home connection (TCP + SSH, this side serving); raises OSError or
asyncssh.Error when it cannot."""
Sleep = Callable[[float], Awaitable[None]]


class CallHomeDialer:
    """Keeps one call-home connection open to the first endpoint that answers.

    ``dial`` is nc_core.transport_ssh.call_home for a running NETCONF server;
    ``sleep`` is the clock the back-off waits on (tests pass one they drive).
    """

    def __init__(self, dial: Dial, *, sleep: Sleep = asyncio.sleep) -> None:
        self.dial = dial
        self.sleep = sleep
        self.endpoints: tuple[CallHomeEndpoint, ...] = ()
        self.max_wait = 60.0
        self.connected_to: CallHomeEndpoint | None = None
        """The endpoint of the open connection, None while there is none."""
        self.connections = 0
        """Connections opened since the dialer started (a NOC's flap counter)."""
        self.last_error: str | None = None
        self.last_connected: CallHomeEndpoint | None = None
        """The endpoint of the last connection opened: the next round starts with it."""
        self._conn: asyncssh.SSHServerConnection | None = None
        self._task: asyncio.Task[None] | None = None

    def configure(self, endpoints: Sequence[CallHomeEndpoint], max_wait: float) -> None:
        """Dial these endpoints from now on; an empty list stops dialling.

        A change of endpoints closes the open connection (it may go to a server no
        longer listed) and starts over with the first one; the same list changes
        nothing.
        """
        endpoints = tuple(endpoints)
        self.max_wait = max(float(max_wait), FIRST_WAIT)
        if endpoints == self.endpoints and (self._task is not None or not endpoints):
            return
        self.endpoints = endpoints
        self.last_connected = None
        self._stop_task()
        if endpoints:
            log.info("calling home to %s", ", then ".join(map(str, endpoints)))
            self._task = asyncio.get_running_loop().create_task(self._run())
        else:
            log.info("call home off")

    async def close(self) -> None:
        """Stop dialling and close the connection."""
        self.endpoints = ()
        task = self._stop_task()
        if task is not None:
            await stop_tasks([task])  # cancelled again if a cancellation was lost

    def _stop_task(self) -> asyncio.Task[None] | None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
        if self._conn is not None:
            self._conn.abort()
            self._conn = None
        self.connected_to = None
        return task

    async def _run(self) -> None:
        wait = FIRST_WAIT
        while True:
            conn = await self._first_answering()
            if conn is None:
                await self.sleep(wait)
                wait = min(wait * 2, self.max_wait)
                continue
            wait = FIRST_WAIT
            try:
                await conn.wait_closed()
            finally:
                self._conn = None
                self.connected_to = None
            log.info("call-home connection closed: dialling again")

    async def _first_answering(self) -> asyncssh.SSHServerConnection | None:
        """One round: the endpoints in order, the last connected one first, until one
        answers."""
        last = self.last_connected
        first = [last] if last is not None and last in self.endpoints else []
        for endpoint in first + [e for e in self.endpoints if e not in first]:
            try:
                conn = await asyncio.wait_for(self.dial(endpoint), CONNECT_TIMEOUT)
            except (TimeoutError, OSError, asyncssh.Error) as exc:
                reason = str(exc) or type(exc).__name__
                if self.last_error != reason:
                    log.warning("call home to %s failed: %s", endpoint, reason)
                self.last_error = reason
                continue
            self._conn = conn
            self.connected_to = self.last_connected = endpoint
            self.connections += 1
            self.last_error = None
            log.info("call-home connection to %s open", endpoint)
            return conn
        return None


# -- the NETCONF client's side: accept the calls --------------------------------------

MAX_PENDING = 64
"""Call-home connections not yet authenticated at once; past that new ones are cut at
TCP accept (a flood of connections costs no handshakes)."""
LOGIN_TIMEOUT = 30.0
"""Seconds a caller has to complete the SSH handshake and accept our login."""

Identify = Callable[[str], str | None]
"""The name of the NETCONF server whose host key this is (base64 blob), None if unknown."""
Arrived = Callable[[str, asyncssh.SSHClientConnection], Awaitable[None]]
"""A known NETCONF server called and we are logged in: ``(name, connection)``."""


class _Caller(asyncssh.SSHClient):
    """One incoming call-home connection, on which this side is the SSH client."""

    def __init__(self, listener: CallHomeListener) -> None:
        self.listener = listener
        self.name: str | None = None
        self.peer = ""
        self.pending = False

    def connection_made(self, conn: asyncssh.SSHClientConnection) -> None:
        peer = conn.get_extra_info("peername")
        self.peer = str(peer[0]) if peer else ""
        if self.listener.pending >= self.listener.max_pending:
            log.warning(
                "call-home connection from %s refused: %d are not authenticated yet",
                self.peer,
                self.listener.pending,
            )
            conn.abort()
            return
        self.listener.pending += 1
        self.pending = True

    def validate_host_public_key(
        self, host: str, addr: str, port: int, key: asyncssh.SSHKey
    ) -> bool:
        """RFC 8071 Section 3.1 (C5): the caller is identified by its host key, never by the
        address it comes from (behind a NAT that is the NAT's)."""
        blob = base64.b64encode(key.public_data).decode()
        self.name = self.listener.identify(blob)
        if self.name is None:
            log.warning(
                "call-home connection from %s refused: its host key (%s) is not pinned for "
                "any call-home CE",
                self.peer,
                key.get_fingerprint(),
            )
        return self.name is not None

    def auth_completed(self) -> None:
        self._done()

    def connection_lost(self, exc: Exception | None) -> None:
        self._done()

    def _done(self) -> None:
        if self.pending:
            self.pending = False
            self.listener.pending -= 1


class CallHomeListener:
    """Accepts NETCONF Call Home connections (RFC 8071) and logs in on them.

    A connection is kept only when the caller presents a host key ``identify``
    knows; the listener then authenticates with ``username`` and the key in
    ``key_file`` (the same identity as when it dials) and hands the
    connection to ``arrived``, which opens the NETCONF sessions on it.
    """

    def __init__(
        self,
        *,
        username: str,
        key_file: Path,
        identify: Identify,
        arrived: Arrived,
        keepalive_interval: float,
        keepalive_count_max: int,
        max_pending: int = MAX_PENDING,
    ) -> None:
        self.username = username
        self.key_file = key_file
        self.identify = identify
        self.arrived = arrived
        self.keepalive_interval = keepalive_interval
        self.keepalive_count_max = keepalive_count_max
        self.max_pending = max_pending
        self.pending = 0
        self.host = ""
        self.port: int | None = None
        self.acceptor: asyncssh.SSHAcceptor | None = None

    async def listen(self, host: str, port: int) -> None:
        """Listen on ``port`` (again, if it moved); raises OSError if it cannot."""
        if self.acceptor is not None and (host, port) == (self.host, self.port):
            return
        acceptor = await asyncssh.listen_reverse(
            None if host in ("", "::") else host,
            port,
            client_factory=lambda: _Caller(self),
            acceptor=self._accepted,
            username=self.username,
            client_keys=[asyncssh.read_private_key(str(self.key_file))],
            known_hosts=([], [], []),  # nothing trusted up front: _Caller decides per key
            agent_path=None,
            password=None,
            kbdint_auth=False,
            preferred_auth="publickey",
            config=None,
            login_timeout=LOGIN_TIMEOUT,
            keepalive_interval=self.keepalive_interval,
            keepalive_count_max=self.keepalive_count_max,
            encryption_algs=list(ENCRYPTION_PREFERENCE),
        )
        self.close()
        self.acceptor, self.host, self.port = acceptor, host, port
        log.info("accepting call-home connections on %s port %d", host or "*", port)

    async def _accepted(self, conn: Any) -> None:
        assert isinstance(conn, asyncssh.SSHClientConnection)
        caller = conn.get_owner()
        name = caller.name if isinstance(caller, _Caller) else None
        if name is None:  # cannot happen: validate_host_public_key refused it
            conn.abort()
            return
        await self.arrived(name, conn)

    def close(self) -> None:
        if self.acceptor is not None:
            self.acceptor.close()
            self.acceptor = None
            self.port = None
