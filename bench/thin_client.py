"""A thin, synchronous NETCONF-over-SSH client for benchmarks (paramiko).

It does as little as a NETCONF client can, so that a benchmark measures the
server and not the client:

* connects with a private key and VERIFIES the server's host key against a
  pinned public key line (``"ssh-ed25519 AAAA... comment"``) before it
  authenticates; a mismatch raises :class:`HostKeyMismatchError`.  There is
  no "accept any key" mode;
* opens the ``netconf`` subsystem and exchanges hellos, advertising
  base:1.0 and base:1.1, and switches to chunked framing (RFC 6242) when the
  server advertises base:1.1 too;
* :meth:`ThinNetconfClient.rpc` wraps a body in ``<rpc message-id=...>``,
  sends it and returns the raw ``<rpc-reply>`` bytes after checking that its
  message-id matches;
* receives in 256 KiB reads with linear-time framing (no re-scanning or
  re-copying of the whole buffer per read), and caps the size of a message.

Usage::

    with ThinNetconfClient.connect(host, port, username, key_path, host_key_line) as nc:
        reply = nc.rpc("<get-config><source><running/></source></get-config>")
"""

from __future__ import annotations

import base64
import contextlib
import hmac
import re
import socket
import time
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType
from typing import Self

import paramiko
from lxml import etree

BASE_NS = "urn:ietf:params:xml:ns:netconf:base:1.0"
CAP_BASE_10 = "urn:ietf:params:netconf:base:1.0"
CAP_BASE_11 = "urn:ietf:params:netconf:base:1.1"
CAP_CANDIDATE = "urn:ietf:params:netconf:capability:candidate:1.0"
CAP_WRITABLE_RUNNING = "urn:ietf:params:netconf:capability:writable-running:1.0"

EOM = b"]]>]]>"
DEFAULT_MAX_MESSAGE = 256 * 1024 * 1024
_RECV_SIZE = 256 * 1024
# "\n#" + at most 10 digits (4294967295) + "\n"
_MAX_CHUNK_HEADER = 13
_MAX_CHUNK_SIZE = 4294967295

_REPLY_START = re.compile(rb"<(?:[A-Za-z_][\w.-]*:)?rpc-reply\b[^>]*>")
_MESSAGE_ID = re.compile(rb"""\bmessage-id\s*=\s*(["'])(.*?)\1""", re.DOTALL)
_RPC_ERROR = re.compile(rb"<(?:[A-Za-z_][\w.-]*:)?rpc-error[\s/>]")
_OK = re.compile(rb"<(?:[A-Za-z_][\w.-]*:)?ok\s*/>")


class NetconfError(Exception):
    """Transport, framing or protocol failure."""


class HostKeyMismatchError(NetconfError):
    """The server's host key is not the pinned one."""


class RpcError(NetconfError):
    """The server answered with <rpc-error> where <ok/> or data was expected."""

    def __init__(self, reply: bytes) -> None:
        super().__init__(reply[:2000].decode("utf-8", "replace"))
        self.reply = reply


def reply_is_ok(reply: bytes) -> bool:
    """True for an rpc-reply that carries <ok/> and no <rpc-error>."""
    return _OK.search(reply) is not None and not reply_has_error(reply)


def reply_has_error(reply: bytes) -> bool:
    """True if the reply carries an <rpc-error> (substring pre-check: fast on 1 MB)."""
    return b"rpc-error" in reply and _RPC_ERROR.search(reply) is not None


def parse_host_key_line(line: str) -> tuple[str, bytes]:
    """Split ``"TYPE BASE64 [comment]"`` (a .pub file or known_hosts entry
    without its host field) into the key type and the raw key blob."""
    fields = line.split()
    if len(fields) < 2:
        raise ValueError(f"not an OpenSSH public key line: {line!r}")
    key_type, blob_b64 = fields[0], fields[1]
    try:
        blob = base64.b64decode(blob_b64, validate=True)
    except ValueError as exc:
        raise ValueError(f"bad base64 in public key line: {line!r}") from exc
    return key_type, blob


def _safe_parser() -> etree.XMLParser:
    return etree.XMLParser(
        resolve_entities=False,
        no_network=True,
        load_dtd=False,
        dtd_validation=False,
        huge_tree=False,
        remove_blank_text=True,
    )


class _Framer:
    """Incremental RFC 6242 de-framer, linear in the bytes received.

    End-of-message framing scans only the bytes not scanned yet (plus five
    bytes of overlap); chunked framing copies each chunk's payload once.
    Consumed bytes are removed from the front of a ``bytearray``, which
    CPython does in amortised O(1).
    """

    def __init__(self, max_message: int) -> None:
        self.chunked = False
        self._max = max_message
        self._buf = bytearray()
        self._scan_from = 0  # EOM: where the next search starts
        self._parts: list[bytes] = []  # chunked: payloads of the current message
        self._size = 0  # chunked: bytes in _parts
        self._chunk_left = 0  # chunked: payload bytes still to come in this chunk

    def feed(self, data: bytes) -> list[bytes]:
        """Add received bytes; return the messages completed so far."""
        if data:
            self._buf += data
        out: list[bytes] = []
        while (msg := self._next_chunked() if self.chunked else self._next_eom()) is not None:
            out.append(msg)
        return out

    def _next_eom(self) -> bytes | None:
        idx = self._buf.find(EOM, self._scan_from)
        if idx < 0:
            if len(self._buf) > self._max:
                raise NetconfError(f"message larger than {self._max} bytes")
            self._scan_from = max(0, len(self._buf) - (len(EOM) - 1))
            return None
        msg = bytes(self._buf[:idx])
        del self._buf[: idx + len(EOM)]
        self._scan_from = 0
        return msg

    def _next_chunked(self) -> bytes | None:
        buf = self._buf
        while True:
            if self._chunk_left:
                take = min(self._chunk_left, len(buf))
                if not take:
                    return None
                self._parts.append(bytes(buf[:take]))
                del buf[:take]
                self._chunk_left -= take
                continue
            # Expect a chunk header "\n#<size>\n" or end of chunks "\n##\n".
            if len(buf) < 4:
                return None
            if buf[0:2] != b"\n#":
                raise NetconfError(f"bad chunk header: {bytes(buf[:16])!r}")
            if buf[2:4] == b"#\n":
                if not self._parts:
                    raise NetconfError("end-of-chunks with no chunk")
                del buf[:4]
                msg = b"".join(self._parts)
                self._parts.clear()
                self._size = 0
                return msg
            nl = buf.find(b"\n", 2, _MAX_CHUNK_HEADER)
            if nl < 0:
                if len(buf) >= _MAX_CHUNK_HEADER:
                    raise NetconfError(f"bad chunk header: {bytes(buf[:16])!r}")
                return None
            digits = bytes(buf[2:nl])
            if not digits.isdigit() or digits.startswith(b"0"):
                raise NetconfError(f"bad chunk size: {digits!r}")
            size = int(digits)
            if size > _MAX_CHUNK_SIZE:
                raise NetconfError(f"chunk size {size} out of range")
            self._size += size
            if self._size > self._max:
                raise NetconfError(f"message larger than {self._max} bytes")
            del buf[: nl + 1]
            self._chunk_left = size


class ThinNetconfClient:
    """One NETCONF session over SSH.  Create it with :meth:`connect`."""

    def __init__(
        self,
        transport: paramiko.Transport,
        channel: paramiko.Channel,
        *,
        timeout: float,
        max_message: int,
    ) -> None:
        self._transport = transport
        self._chan = channel
        self._timeout = timeout
        self._framer = _Framer(max_message)
        self._pending: list[bytes] = []
        self._next_id = 1
        self._closed = False
        self.session_id: int | None = None
        self.server_capabilities: frozenset[str] = frozenset()

    # ----------------------------------------------------------- connection

    @classmethod
    def connect(
        cls,
        host: str,
        port: int,
        username: str,
        client_key_path: str | Path,
        host_key_pub: str,
        *,
        timeout: float = 30.0,
        max_message: int = DEFAULT_MAX_MESSAGE,
        capabilities: Iterable[str] = (),
    ) -> ThinNetconfClient:
        """Connect, verify the pinned host key, authenticate, open the
        netconf subsystem and exchange hellos."""
        pinned_type, pinned_blob = parse_host_key_line(host_key_pub)
        client_key = paramiko.PKey.from_path(str(client_key_path))
        sock = socket.create_connection((host, port), timeout=timeout)
        transport: paramiko.Transport | None = None
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            transport = paramiko.Transport(sock)
            # Ask only for the pinned key's algorithm, so a server holding
            # several host keys presents the one we can check.
            opts = transport.get_security_options()
            if pinned_type not in opts.key_types:
                raise NetconfError(f"host key type {pinned_type} not supported by paramiko")
            opts.key_types = (pinned_type,)
            transport.start_client(timeout=timeout)
            server_key = transport.get_remote_server_key()
            if server_key.get_name() != pinned_type or not hmac.compare_digest(
                server_key.asbytes(), pinned_blob
            ):
                raise HostKeyMismatchError(
                    f"host key of {host}:{port} is {server_key.get_name()} "
                    f"{server_key.get_base64()}, not the pinned {pinned_type} key"
                )
            transport.auth_publickey(username, client_key)
            channel = transport.open_session(timeout=timeout)
            channel.settimeout(timeout)
            channel.invoke_subsystem("netconf")
            client = cls(transport, channel, timeout=timeout, max_message=max_message)
            client._hello(capabilities)
            return client
        except BaseException:
            if transport is not None:
                transport.close()
            sock.close()
            raise

    def _hello(self, extra_caps: Iterable[str]) -> None:
        caps = [CAP_BASE_10, CAP_BASE_11, *extra_caps]
        body = "".join(f"<capability>{c}</capability>" for c in caps)
        hello = (
            '<?xml version="1.0" encoding="UTF-8"?>'
            f'<hello xmlns="{BASE_NS}"><capabilities>{body}</capabilities></hello>'
        ).encode()
        self._chan.sendall(hello + EOM)
        raw = self._recv_message()
        try:
            root = etree.fromstring(raw, _safe_parser())
        except etree.XMLSyntaxError as exc:
            raise NetconfError(f"unparsable server hello: {exc}") from exc
        if root.tag != f"{{{BASE_NS}}}hello":
            raise NetconfError(f"expected <hello>, got {root.tag}")
        server_caps = frozenset(
            (c.text or "").strip() for c in root.iterfind(f"{{{BASE_NS}}}capabilities/*")
        )
        sid = root.findtext(f"{{{BASE_NS}}}session-id")
        if sid is None or not sid.strip().isdigit():
            raise NetconfError("server hello without a session-id")
        self.session_id = int(sid)
        self.server_capabilities = server_caps
        if CAP_BASE_11 in server_caps:
            self._framer.chunked = True
        elif CAP_BASE_10 not in server_caps:
            raise NetconfError("server advertises neither base:1.0 nor base:1.1")

    # -------------------------------------------------------------- framing

    @property
    def framing(self) -> str:
        return "chunked (base:1.1)" if self._framer.chunked else "end-of-message (base:1.0)"

    def capability_startswith(self, prefix: str) -> bool:
        return any(c.startswith(prefix) for c in self.server_capabilities)

    def _send_message(self, data: bytes) -> None:
        if self._framer.chunked:
            self._chan.sendall(b"\n#%d\n" % len(data) + data + b"\n##\n")
        else:
            self._chan.sendall(data + EOM)

    def _recv_message(self, timeout: float | None = None) -> bytes:
        if not self._pending:
            # Bytes left over from an earlier read (e.g. after a framing switch).
            self._pending.extend(self._framer.feed(b""))
        if self._pending:
            return self._pending.pop(0)
        wait = self._timeout if timeout is None else timeout
        deadline = time.monotonic() + wait
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise NetconfError(f"no complete message from the server within {wait} s")
            self._chan.settimeout(left)
            try:
                data = self._chan.recv(_RECV_SIZE)
            except TimeoutError as exc:
                raise NetconfError(f"no complete message from the server within {wait} s") from exc
            if not data:
                raise NetconfError("session closed by the server")
            msgs = self._framer.feed(data)
            if msgs:
                self._pending.extend(msgs[1:])
                return msgs[0]

    # ------------------------------------------------------------------ rpc

    def rpc(self, xml_body: str, *, timeout: float | None = None) -> bytes:
        """Send ``<rpc>xml_body</rpc>`` and return the raw rpc-reply bytes.

        ``timeout`` (seconds, default: the session's) bounds the wait for the
        reply.  Raises :class:`NetconfError` if the reply's message-id does not match.
        <rpc-error> replies are returned as they are (see :meth:`rpc_ok`).
        """
        if self._closed:
            raise NetconfError("session is closed")
        mid = str(self._next_id)
        self._next_id += 1
        self._send_message(f'<rpc message-id="{mid}" xmlns="{BASE_NS}">{xml_body}</rpc>'.encode())
        reply = self._recv_message(timeout)
        start = _REPLY_START.search(reply, 0, 4096)
        if start is None:
            raise NetconfError(f"expected <rpc-reply>, got {reply[:200]!r}")
        m = _MESSAGE_ID.search(start.group(0))
        if m is None or m.group(2).decode() != mid:
            got = m.group(2).decode() if m else None
            raise NetconfError(f"rpc-reply message-id {got!r} does not match {mid!r}")
        return reply

    def rpc_ok(self, xml_body: str, *, timeout: float | None = None) -> bytes:
        """:meth:`rpc` that raises :class:`RpcError` unless the reply is <ok/>."""
        reply = self.rpc(xml_body, timeout=timeout)
        if not reply_is_ok(reply):
            raise RpcError(reply)
        return reply

    def rpc_data(self, xml_body: str, *, timeout: float | None = None) -> bytes:
        """:meth:`rpc` that raises :class:`RpcError` on an <rpc-error> reply."""
        reply = self.rpc(xml_body, timeout=timeout)
        if reply_has_error(reply):
            raise RpcError(reply)
        return reply

    # ---------------------------------------------------------------- close

    def close(self) -> None:
        """Send <close-session/> (best effort) and close the SSH connection."""
        if self._closed:
            return
        try:
            if self._transport.is_active() and not self._chan.closed:
                self.rpc("<close-session/>", timeout=min(self._timeout, 5.0))
        except (NetconfError, OSError, paramiko.SSHException):
            pass
        finally:
            self._closed = True
            # The server may close the connection right after <ok/> (RFC 6241 7.8).
            with contextlib.suppress(EOFError, OSError, paramiko.SSHException):
                self._chan.close()
            self._transport.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
