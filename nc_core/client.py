"""A NETCONF client on ncclient for the VPN server (southbound) and the CE agent (pull).

Two things are added to stock ncclient, both measured:

- ncclient 0.7.1's session thread polls its send queue every 100 ms (TICK),
  so each sequential request waits ~100 ms whatever the server does (about
  10 RPCs/s; ../shared/NETCONF-NOTES.md).  :class:`PromptSSHSession` wakes
  its loop through a pipe the moment a request is queued, so requests go out
  at once without turning the loop into a busy poll.
- Host keys are always pinned: :func:`connect` takes the OpenSSH lines the
  peer may present and refuses anything else.  There is no way to connect
  without verifying.
- SSH handshakes are taken one at a time in a process (:data:`HANDSHAKE_TURN`).
  paramiko signs and verifies Ed25519 keys with PyNaCl, a cffi module, and
  cffi's lazy realization of C types is not thread-safe on CPython builds with
  a GIL (python-cffi/cffi#271): two threads handshaking at once (the agent's
  notification listener and a fetch, at start-up) aborted the agent in CI with
  ``realize_c_type_or_func_lock_held: Assertion ... failed``.  A handshake is
  milliseconds; the sessions themselves run concurrently.
"""

from __future__ import annotations

import os
import selectors
import socket
import threading
from typing import Any

import paramiko
from ncclient import manager, transport
from ncclient.devices.default import DefaultDeviceHandler
from ncclient.transport.errors import SessionCloseError
from ncclient.transport.session import MSG_DELIM, NetconfBase

from nc_core.endpoint import Endpoint, host_key_blob

__all__ = ["Endpoint", "PromptSSHSession", "connect", "host_key_blob"]

END_DELIM = b"\n##\n"

HANDSHAKE_TURN = threading.Lock()
"""Held for an SSH handshake and authentication (where paramiko uses PyNaCl)."""


def realize_pynacl_types() -> None:
    """Make cffi realize every PyNaCl function type now, in the importing thread.

    Defence in depth beside :data:`HANDSHAKE_TURN`, for paramiko used outside
    :func:`connect` (ncclient directly, in tools and tests): once realized, a
    type is only read, and reading is safe from any thread.  239 functions,
    about 2 ms.
    """
    import nacl._sodium  # type: ignore[import-not-found]

    for name in dir(nacl._sodium.lib):
        getattr(nacl._sodium.lib, name)


realize_pynacl_types()


class PromptSSHSession(transport.SSHSession):  # type: ignore[misc]
    """ncclient's SSH session whose loop wakes on send instead of every 100 ms."""

    def __init__(self, device_handler: Any) -> None:
        super().__init__(device_handler)
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._wake_lock = threading.Lock()
        self._wake_open = True

    def _wake(self) -> None:
        with self._wake_lock:
            if self._wake_open:
                try:
                    os.write(self._wake_w, b"x")
                except BlockingIOError:
                    pass  # the pipe is full of wake-ups already

    def send(self, message: str) -> None:
        super().send(message)
        self._wake()

    def run(self) -> None:
        """ncclient's Session.run, with the wake-up pipe in the selector and no timeout."""
        q = self._q
        try:
            sel = selectors.DefaultSelector()
            sel.register(self._channel, selectors.EVENT_READ, "channel")
            sel.register(self._wake_r, selectors.EVENT_READ, "wake")
            while True:
                while not q.empty() and self._send_ready():
                    data = q.get().encode()
                    if self._base == NetconfBase.BASE_11:
                        data = b"\n#%d\n%s%s" % (len(data), data, END_DELIM)
                    else:
                        data = data + MSG_DELIM
                    while data:
                        n = self._transport_write(data)
                        if n <= 0:
                            raise SessionCloseError(self._buffer.getvalue(), data)
                        data = data[n:]
                # A short timeout only while a send waits for window space.
                timeout = 0.01 if not q.empty() else None
                for key, _ in sel.select(timeout=timeout):
                    if key.data == "wake":
                        try:
                            while os.read(self._wake_r, 4096):
                                pass
                        except BlockingIOError:
                            pass
                        continue
                    data = self._transport_read()
                    if data:
                        self.parser.parse(data)
                    elif self._closing.is_set():
                        return
                    else:
                        raise SessionCloseError(self._buffer.getvalue())
                if self._closing.is_set() and self._channel.closed:
                    return
        except Exception as exc:
            self._dispatch_error(exc)
            self.close()
        finally:
            with self._wake_lock:
                self._wake_open = False
                os.close(self._wake_r)
                os.close(self._wake_w)

    def close(self) -> None:
        super().close()
        self._wake()


def _tcp_connect(endpoint: Endpoint) -> socket.socket:
    """A TCP connection with Nagle off.  paramiko writes a request in more than one
    segment; with Nagle on, the second waits for the peer's delayed ACK: ~40 ms per
    request, measured (get-config 44 ms -> 3 ms)."""
    sock = socket.create_connection((endpoint.host, endpoint.port), timeout=endpoint.timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def connect(endpoint: Endpoint) -> manager.Manager:
    """Open a NETCONF session; the server must present one of ``endpoint.host_keys``."""
    if not endpoint.host_keys:
        raise ValueError(f"no pinned host key for {endpoint.host}: refusing to connect")
    last: Exception | None = None
    for line in endpoint.host_keys:
        device_handler = DefaultDeviceHandler({})
        session = PromptSSHSession(device_handler)
        try:
            sock = _tcp_connect(endpoint)
        except OSError as exc:
            raise transport.SSHError(
                f"Could not open socket to {endpoint.host}:{endpoint.port}: {exc}"
            ) from None
        try:
            with HANDSHAKE_TURN:
                session.connect(
                    host=endpoint.host,
                    sock=sock,
                    port=endpoint.port,
                    username=endpoint.username,
                    key_filename=str(endpoint.key_file),
                    hostkey_verify=True,
                    hostkey_b64=host_key_blob(line),
                    allow_agent=False,
                    look_for_keys=False,
                    timeout=endpoint.timeout,
                )
        except (paramiko.SSHException, transport.SSHError) as exc:
            if session.transport:
                session.close()
            else:
                sock.close()
            last = exc
            if "Negotiation failed" in str(exc) or "Unknown host key" in str(exc):
                continue  # another pinned key may be the one this server has
            raise
        except Exception:
            if session.transport:
                session.close()
            else:
                sock.close()
            raise
        return manager.Manager(session, device_handler, timeout=max(endpoint.timeout, 30.0))
    assert last is not None
    raise last
