"""An asyncio NETCONF client over SSH (RFC 6241, RFC 6242) on asyncssh: the VPN server's southbound.

The blocking client (nc_core.client, on ncclient and paramiko) costs one
thread per session and a new SSH handshake per use; a server holding
thousands of CEs cannot afford either.  Here:

- one SSH connection to a CE carries several NETCONF sessions (channels),
  opened once and kept: :func:`connect_ssh` turns on SSH keepalives so a
  CE that vanished is noticed without a request timing out;
- requests are pipelined: :meth:`NetconfSession.send` returns at once with
  a future for the reply, matched by message-id, so several RPCs can be in
  flight on one session (RFC 6241 Section 4.1 lets a client send them);
- the host key is always pinned: only the OpenSSH lines given in the
  :class:`~nc_core.endpoint.Endpoint` are trusted, and there is no way to
  connect without one;
- everything a CE sends is bounded: a message larger than
  ``max_message_size`` closes the session (nc_core.framing).

Errors are two kinds, because the caller reacts to them differently:
:class:`RpcFailed` (the CE answered with an rpc-error: the session is fine)
and :class:`SessionLost` (no answer can come any more: reconnect).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable, Iterable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

from lxml import etree

from nc_core.asyncssh_import import asyncssh
from nc_core.endpoint import Endpoint, host_key_blob
from nc_core.framing import Framer, FramingError
from nc_core.xmlutil import NC_NS, XmlRejected, default_ns_element, local, parse_message, qn

log = logging.getLogger("cevpn.netconf.client")

BASE_10 = "urn:ietf:params:netconf:base:1.0"
BASE_11 = "urn:ietf:params:netconf:base:1.1"

KEEPALIVE_INTERVAL = 30.0
"""Seconds between SSH keepalive requests on an idle connection.  A VPN server holds one
such connection per CE: at 1,000 CEs, a keepalive every 15 s was 67 round trips a second
on its event loop with nothing under way."""
KEEPALIVE_COUNT_MAX = 1
"""Keepalives that may go unanswered: the connection is declared dead when the next
interval passes too (one minute without an answer, as before at four of 15 s)."""
MAX_MESSAGE_SIZE = 64 * 1024 * 1024
"""Largest message accepted from a server (a 1,000-peer CE configuration is ~1 MB)."""
ENCRYPTION_PREFERENCE = (
    "aes256-gcm@openssh.com",
    "aes128-gcm@openssh.com",
    "chacha20-poly1305@openssh.com",
    "aes256-ctr",
    "aes192-ctr",
    "aes128-ctr",
)
"""SSH ciphers offered to a CE, best first: asyncssh's own order with AES-GCM ahead of
ChaCha20-Poly1305.  Both are AEAD ciphers of OpenSSH's default set, but asyncssh does
ChaCha20-Poly1305 in Python, three cipher contexts per packet (~14 us a packet here, against
~2 us for AES-GCM, one call to OpenSSL): on a server that keeps a link to every CE, every
packet's encryption is the server's CPU.  The client's order decides (RFC 4253 7.1), and
a CE that lacks AES-GCM still gets ChaCha20-Poly1305."""


Operation = etree._Element | str | bytes
"""What :meth:`NetconfSession.send` takes: see :meth:`NetconfSession.send_all`."""
_RPC_OPEN = f'<rpc xmlns="{NC_NS}" message-id="'.encode()


def rpc_message(message_id: str, operation: Operation) -> bytes:
    """The ``<rpc>`` carrying ``operation``, serialised once: the envelope is written
    around the operation's bytes rather than built as a tree and serialised again (the
    operation keeps its own namespace declarations)."""
    if isinstance(operation, str):
        operation = etree.fromstring(operation)
    body = operation if isinstance(operation, bytes) else etree.tostring(operation)
    return b"".join((_RPC_OPEN, message_id.encode(), b'">', body, b"</rpc>"))


class SessionLost(Exception):
    """The session (or its SSH connection) is gone, or never came up: no reply can come."""

    def __init__(self, message: str, *, reached: bool = True) -> None:
        super().__init__(message)
        self.reached = reached
        """Did the peer's port accept the TCP connection?  False only for a connection that
        never got that far (refused, no route, no answer): then the path to the peer is in
        doubt, not just the peer."""


class _Dialled(asyncssh.SSHClient):
    """Notes that the TCP connection completed (asyncssh calls this before the SSH
    handshake), so a failure after it is told apart from an unreachable port."""

    def __init__(self) -> None:
        self.reached = False

    def connection_made(self, conn: asyncssh.SSHClientConnection) -> None:
        self.reached = True


class RpcFailed(Exception):
    """The server answered with an ``<rpc-error>`` (the first one is described)."""

    def __init__(
        self,
        tag: str,
        message: str,
        app_tag: str | None = None,
        path: str | None = None,
        severity: str = "error",
        info: str = "",
    ) -> None:
        super().__init__(message or tag)
        self.tag = tag
        self.message = message
        self.app_tag = app_tag
        self.path = path
        self.severity = severity
        self.info = info
        """The texts of ``<error-info>`` (a ``bad-element``'s name, for one), space-separated."""


@lru_cache(maxsize=16)
def _client_key(path: str, mtime_ns: int) -> asyncssh.SSHKey:
    """The client's private key, read once per file version (it is used for every CE)."""
    return asyncssh.read_private_key(path)


def _pinned(host_keys: Iterable[str]) -> tuple[list[asyncssh.SSHKey], list[Any], list[Any]]:
    keys = [asyncssh.import_public_key(line.strip()) for line in host_keys if line.strip()]
    for line in host_keys:
        host_key_blob(line)  # a malformed line is refused, never ignored
    return keys, [], []


async def connect_ssh(
    endpoint: Endpoint,
    *,
    keepalive_interval: float = KEEPALIVE_INTERVAL,
    keepalive_count_max: int = KEEPALIVE_COUNT_MAX,
) -> asyncssh.SSHClientConnection:
    """An authenticated SSH connection to ``endpoint``; the server must present one of its keys.

    Only the endpoint's key file is offered (no agent, no ~/.ssh, no
    password), so what the server logs in with is exactly what it was given.
    """
    if not endpoint.host_keys:
        raise ValueError(f"no pinned host key for {endpoint.host}: refusing to connect")
    key_path = Path(endpoint.key_file)
    dialled = _Dialled()
    try:
        key = _client_key(str(key_path), key_path.stat().st_mtime_ns)
        conn = await asyncio.wait_for(
            asyncssh.connect(
                endpoint.host,
                endpoint.port,
                username=endpoint.username,
                known_hosts=_pinned(endpoint.host_keys),
                client_keys=[key],
                agent_path=None,
                password=None,
                kbdint_auth=False,
                preferred_auth="publickey",
                config=None,
                keepalive_interval=keepalive_interval,
                keepalive_count_max=keepalive_count_max,
                encryption_algs=list(ENCRYPTION_PREFERENCE),
                client_factory=lambda: dialled,
                local_addr=(endpoint.local_address, 0) if endpoint.local_address else None,
            ),
            endpoint.timeout,
        )
    except TimeoutError:
        raise SessionLost(
            f"{endpoint.host} port {endpoint.port}: no SSH session within {endpoint.timeout:g} s",
            reached=dialled.reached,
        ) from None
    except (OSError, asyncssh.Error) as exc:
        raise SessionLost(
            f"{endpoint.host} port {endpoint.port}: {_reason(exc)}", reached=dialled.reached
        ) from None
    return conn


def _reason(exc: BaseException) -> str:
    if isinstance(exc, asyncssh.HostKeyNotVerifiable):
        return "the host key is not the one pinned for this CE"
    if isinstance(exc, asyncssh.PermissionDenied):
        return "the server's key was refused (permission denied)"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    text = getattr(exc, "reason", None) or str(exc)
    return text or type(exc).__name__


class _Channel(asyncssh.SSHClientSession[bytes]):
    """The asyncssh side of one NETCONF session: bytes in, messages out."""

    def __init__(self, owner: NetconfSession) -> None:
        self.owner = owner

    def data_received(self, data: bytes, datatype: Any) -> None:
        self.owner._received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.owner._lost(exc)


class NetconfSession:
    """One NETCONF session on an SSH channel: hello, pipelined RPCs, close.

    Create with :meth:`open`.  A notification that arrives (after a
    ``<create-subscription>`` on this session) goes to :attr:`on_notification`,
    or is dropped when that is None.
    """

    def __init__(self, name: str, max_message_size: int) -> None:
        self.name = name
        self.framer = Framer(max_message_size)
        self.session_id: str | None = None
        self.capabilities: frozenset[str] = frozenset()
        self.channel: asyncssh.SSHClientChannel[bytes] | None = None
        self._hello: asyncio.Future[etree._Element] = asyncio.get_running_loop().create_future()
        self._pending: dict[str, asyncio.Future[etree._Element]] = {}
        self._ids = itertools.count(1)
        self._lost_reason: str | None = None
        self._ended = asyncio.Event()
        self.on_notification: Callable[[etree._Element], None] | None = None
        """Called with each ``<notification>`` the server sends on this session."""

    @classmethod
    async def open(
        cls,
        conn: asyncssh.SSHClientConnection,
        name: str,
        *,
        timeout: float = 10.0,
        max_message_size: int = MAX_MESSAGE_SIZE,
    ) -> NetconfSession:
        """Open the ``netconf`` subsystem on ``conn`` and exchange hellos."""
        self = cls(name, max_message_size)
        try:
            channel, _ = await asyncio.wait_for(
                conn.create_session(lambda: _Channel(self), subsystem="netconf", encoding=None),
                timeout,
            )
        except TimeoutError:
            raise SessionLost(f"{name}: no NETCONF channel within {timeout:g} s") from None
        except (OSError, asyncssh.Error) as exc:
            raise SessionLost(f"{name}: NETCONF channel refused: {_reason(exc)}") from None
        self.channel = channel
        hello = default_ns_element(NC_NS, "hello")
        caps = etree.SubElement(hello, qn(NC_NS, "capabilities"))
        for uri in (BASE_10, BASE_11):
            etree.SubElement(caps, qn(NC_NS, "capability")).text = uri
        channel.write(self.framer.encode(etree.tostring(hello, xml_declaration=True)))
        try:
            theirs = await asyncio.wait_for(asyncio.shield(self._hello), timeout)
        except TimeoutError:
            self.abort()
            raise SessionLost(f"{name}: no NETCONF hello within {timeout:g} s") from None
        self.capabilities = frozenset(
            (e.text or "").strip() for e in theirs.iter(qn(NC_NS, "capability"))
        )
        self.session_id = theirs.findtext(qn(NC_NS, "session-id"))
        if BASE_11 in self.capabilities:
            self.framer.switch_to_chunked()
        elif BASE_10 not in self.capabilities:
            self.abort()
            raise SessionLost(f"{name}: the server speaks neither base:1.0 nor base:1.1")
        self._dispatch(self._feed(b""))  # anything sent right behind the hello
        return self

    # -- requests ------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        return self._lost_reason is None and self.channel is not None

    def send(self, operation: Operation) -> asyncio.Future[etree._Element]:
        """Send one RPC now; the future gets its ``<rpc-reply>`` (or :class:`SessionLost`).

        Several may be outstanding: the server answers them in order.
        """
        return self.send_all([operation])[0]

    def send_all(self, operations: Sequence[Operation]) -> list[asyncio.Future[etree._Element]]:
        """Send several RPCs now, in one write: one SSH packet (one encryption, one system
        call) for requests that fit in one, where a write each costs a packet each.  The
        futures, in order, get the replies as :meth:`send`'s does.

        An operation is an element, a string parsed here (a malformed one raises before
        anything is sent), or the bytes of one element already serialised by the caller,
        which vouches for them being one well-formed element: they are sent as they are.
        """
        if not self.alive or self.channel is None:
            raise SessionLost(f"{self.name}: {self._lost_reason or 'not open'}")
        loop = asyncio.get_running_loop()
        frames: list[bytes] = []
        futures: list[asyncio.Future[etree._Element]] = []
        for operation in operations:
            message_id = str(next(self._ids))
            frames.append(self.framer.encode(rpc_message(message_id, operation)))
            future: asyncio.Future[etree._Element] = loop.create_future()
            self._pending[message_id] = future
            futures.append(future)
        self.channel.write(b"".join(frames))
        return futures

    async def rpc(self, operation: Operation, timeout: float = 60.0) -> etree._Element:
        """Send one RPC and wait for its reply; an ``<rpc-error>`` raises :class:`RpcFailed`.

        A reply that does not come within ``timeout`` ends the session: a
        late reply must not be taken for the answer to a later request.
        """
        return await self.wait(self.send(operation), timeout)

    async def wait(
        self, future: asyncio.Future[etree._Element], timeout: float = 60.0
    ) -> etree._Element:
        """The reply behind ``future`` (from :meth:`send`), errors raised as in :meth:`rpc`."""
        try:
            reply = await asyncio.wait_for(future, timeout)
        except TimeoutError:
            self.abort(f"no reply within {timeout:g} s")
            raise SessionLost(f"{self.name}: no reply within {timeout:g} s") from None
        error = reply.find(qn(NC_NS, "rpc-error"))
        if error is not None:
            raise rpc_failed(error)
        return reply

    async def close(self, timeout: float = 5.0) -> None:
        """``<close-session>``, then the channel; a server that does not answer is cut off."""
        if self.alive:
            try:
                await self.rpc(etree.Element(qn(NC_NS, "close-session")), timeout)
            except (SessionLost, RpcFailed):
                pass
        self.abort("closed")

    async def wait_closed(self) -> None:
        """Until the session has ended, by either side."""
        await self._ended.wait()

    def abort(self, reason: str = "aborted") -> None:
        """Close the channel at once; every outstanding request fails with SessionLost."""
        if self.channel is not None:
            self.channel.close()
        self._lost(None, reason)

    # -- incoming ------------------------------------------------------------------

    def _feed(self, data: bytes) -> list[bytes]:
        try:
            return self.framer.feed(data)
        except FramingError as exc:
            self.abort(f"unreadable framing from the server: {exc}")
            return []

    def _received(self, data: bytes) -> None:
        self._dispatch(self._feed(data))

    def _dispatch(self, messages: list[bytes]) -> None:
        for raw in messages:
            try:
                message = parse_message(raw)
            except XmlRejected as exc:
                self.abort(f"the server sent {exc}")
                return
            kind = local(message.tag)
            if kind == "hello" and not self._hello.done():
                self._hello.set_result(message)
                return  # the framing of what follows is decided by open()
            if kind == "rpc-reply":
                future = self._pending.pop(message.get("message-id", ""), None)
                if future is not None and not future.done():
                    future.set_result(message)
                elif future is None:
                    log.debug("%s: reply to no outstanding request dropped", self.name)
            elif kind == "notification" and self.on_notification is not None:
                try:
                    self.on_notification(message)
                except Exception:  # the listener's fault must not end the session
                    log.exception("%s: handling a notification failed", self.name)

    def _lost(self, exc: Exception | None, reason: str | None = None) -> None:
        if self._lost_reason is not None:
            return
        self._lost_reason = reason or (f"connection lost: {exc}" if exc else "session closed")
        self._ended.set()
        error = SessionLost(f"{self.name}: {self._lost_reason}")
        for future in [self._hello, *self._pending.values()]:
            if not future.done():
                future.set_exception(error)
                future.exception()  # retrieved: nobody may be waiting on the hello any more
        self._pending.clear()


def rpc_failed(error: etree._Element) -> RpcFailed:
    """The :class:`RpcFailed` describing one ``<rpc-error>`` element."""
    return RpcFailed(
        tag=(error.findtext(qn(NC_NS, "error-tag")) or "").strip() or "operation-failed",
        message=(error.findtext(qn(NC_NS, "error-message")) or "").strip(),
        app_tag=(error.findtext(qn(NC_NS, "error-app-tag")) or "").strip() or None,
        path=(error.findtext(qn(NC_NS, "error-path")) or "").strip() or None,
        severity=(error.findtext(qn(NC_NS, "error-severity")) or "error").strip(),
        info=" ".join(
            (e.text or "").strip()
            for info in error.iterfind(qn(NC_NS, "error-info"))
            for e in info.iter()
            if isinstance(e.tag, str) and (e.text or "").strip()
        ),
    )
