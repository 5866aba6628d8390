"""One NETCONF session (RFC 6241 Sections 2, 4, 8.1; RFC 6242 Section 3).

A session owns its framer, exchanges hellos, and turns each incoming message
into exactly one rpc-reply, in order.  Messages are queued and handled by one
task per session, so a slow operation of one client never delays another
client, and a client that floods requests is paused at the transport instead
of growing our memory.  Whatever a client sends, the worst outcome is that its
own session is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from lxml import etree

from nc_core.errors import RpcError, RpcErrors, malformed
from nc_core.framing import Framer, FramingError, MessageTooBig
from nc_core.xmlutil import NC_NS, XmlRejected, local, namespace, parse_message, qn

if TYPE_CHECKING:
    from nc_core.notifications import Subscription
    from nc_core.server import NetconfServer

log = logging.getLogger("cevpn.netconf")

BASE_10 = "urn:ietf:params:netconf:base:1.0"
BASE_11 = "urn:ietf:params:netconf:base:1.1"
QUEUE_LIMIT = 16
"""Messages a client may have outstanding before we stop reading from it."""
QUEUE_BYTES = 4 * 1024 * 1024
"""Octets of complete messages a client may have outstanding before we stop reading."""


@dataclass
class SessionCounters:
    """RFC 6022 per-session statistics."""

    in_rpcs: int = 0
    in_bad_rpcs: int = 0
    out_rpc_errors: int = 0
    out_notifications: int = 0


@dataclass(eq=False)
class Session:
    server: NetconfServer
    id: int
    user: str
    source_host: str
    write: Callable[[bytes], None]
    """Send bytes to the peer."""
    close_transport: Callable[[], None]
    pause_reading: Callable[[], None] = lambda: None
    resume_reading: Callable[[], None] = lambda: None
    transport_buffered: Callable[[], int] = lambda: 0
    """Octets written to the transport that the client has not taken yet."""
    transport: str = "netconf-ssh"
    login_time: datetime = field(default_factory=lambda: datetime.now(UTC))
    counters: SessionCounters = field(default_factory=SessionCounters)
    client_capabilities: list[str] = field(default_factory=list)
    hello_received: bool = False
    closed: bool = False
    subscription: Subscription | None = None
    killed_by: int | None = None
    termination_reason: str = "closed"

    def __post_init__(self) -> None:
        self.framer = Framer(self.server.options.max_message_size)
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.worker: asyncio.Task[None] | None = None
        self.hello_timer: asyncio.TimerHandle | None = None
        self.last_activity = time.monotonic()
        self._close_after_reply = False
        self.writable = asyncio.Event()
        """Clear while the client leaves more than the high-water mark of output unread:
        no request of its is handled until it reads (back-pressure)."""
        self.writable.set()
        self._backlog: deque[bytes] = deque()
        self._backlog_notifications = 0
        self._queued_bytes = 0
        self._held = 0
        """Input octets this session holds (partial message and queued ones), counted in
        server.input_held."""
        self._reading_paused = False

    # -- transport side ------------------------------------------------------

    def start(self) -> None:
        """Send our hello (RFC 6241 8.1: both peers send it at once) and start working."""
        self._send(self.server.hello(self.id))
        self.worker = asyncio.get_running_loop().create_task(
            self._work(), name=f"netconf-{self.id}"
        )
        self.hello_timer = asyncio.get_running_loop().call_later(
            self.server.options.hello_timeout, self._hello_timed_out
        )

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        self.last_activity = time.monotonic()
        try:
            messages = self.framer.feed(data)
            if messages and not self.hello_received:
                # The first message is the hello: handle it before the bytes
                # behind it are split, since it decides their framing.
                self._handle_hello(messages.pop(0))
                if self.closed:
                    return
                messages += self.framer.feed(b"")
            for message in messages:
                self.queue.put_nowait(message)
                self._queued_bytes += len(message)
            if not self._account_input():
                return
        except MessageTooBig as exc:
            self.server.stats.in_bad_rpcs += 1
            self._reply_error_and_close(
                RpcError("too-big", f"Message refused: {exc}", type="rpc"), "dropped"
            )
            return
        except FramingError as exc:
            self.server.stats.in_bad_rpcs += 1
            log.info("session %d: framing error, closing: %s", self.id, exc)
            self.close("dropped")
            return
        if not self._reading_paused and (
            self.queue.qsize() >= QUEUE_LIMIT or self._queued_bytes >= QUEUE_BYTES
        ):
            self._reading_paused = True
            self.pause_reading()

    def _account_input(self) -> bool:
        """Count what this session holds in the server-wide input budget; False (and the
        session is closed) when it would take the server past its limit."""
        held = self.framer.buffered() + self._queued_bytes
        server = self.server
        grew = held > self._held
        server.input_held += held - self._held
        self._held = held
        if grew and server.input_held > server.options.max_input_buffer:
            log.warning(
                "session %d (%s): input refused, the server holds %d octets of unhandled "
                "input (limit %d)",
                self.id,
                self.user,
                server.input_held,
                server.options.max_input_buffer,
            )
            server.stats.in_bad_rpcs += 1
            self._reply_error_and_close(
                RpcError(
                    "resource-denied",
                    "The server holds too much unhandled input from all clients: "
                    "this message was refused; send smaller messages or wait.",
                    type="transport",
                ),
                "dropped",
            )
            return False
        return True

    def _release_input(self) -> None:
        self.server.input_held -= self._held
        self._held = 0

    def connection_lost(self) -> None:
        if not self.closed:
            self.close("dropped", transport_gone=True)

    # -- hello -----------------------------------------------------------------

    def _handle_hello(self, message: bytes) -> None:
        if self.hello_timer is not None:
            self.hello_timer.cancel()
        try:
            root = parse_message(message)
        except XmlRejected as exc:
            self._bad_hello(f"hello is not XML: {exc}")
            return
        if root.tag != qn(NC_NS, "hello"):
            self._bad_hello(f"expected <hello>, got <{local(root.tag)}>")
            return
        if root.find(qn(NC_NS, "session-id")) is not None:
            self._bad_hello("a client must not send a session-id in its hello (RFC 6241 8.1)")
            return
        caps = [(c.text or "").strip() for c in root.iter(qn(NC_NS, "capability"))]
        if BASE_11 not in caps and BASE_10 not in caps:
            self._bad_hello("the hello advertises neither base:1.0 nor base:1.1")
            return
        self.client_capabilities = caps
        self.hello_received = True
        if BASE_11 in caps:
            self.framer.switch_to_chunked()
        self.server.session_started(self)

    def _bad_hello(self, why: str) -> None:
        self.server.stats.in_bad_hellos += 1
        log.info("session %d: bad hello, closing: %s", self.id, why)
        self.close("bad-hello")

    def _hello_timed_out(self) -> None:
        if not self.hello_received and not self.closed:
            self.server.stats.in_bad_hellos += 1
            log.info("session %d: no hello within %ss", self.id, self.server.options.hello_timeout)
            self.close("bad-hello")

    @property
    def base11(self) -> bool:
        return self.framer.chunked

    # -- messages ----------------------------------------------------------------

    async def _work(self) -> None:
        while True:
            # Back-pressure: nothing more is handled for a client that does not read.
            await self.writable.wait()
            message = await self.queue.get()
            if message is None or self.closed:
                return
            self._queued_bytes -= len(message)
            self._account_input()
            if (
                self._reading_paused
                and self.queue.qsize() < QUEUE_LIMIT // 2
                and self._queued_bytes < QUEUE_BYTES // 2
            ):
                self._reading_paused = False
                self.resume_reading()
            try:
                await self._handle(message)
            except asyncio.CancelledError:
                raise
            except Exception:  # never let one bad request take the session loop down
                log.exception("session %d: internal error", self.id)
                self._send_reply(
                    None,
                    {},
                    errors=[
                        RpcError("operation-failed", "Internal server error; see the server log.")
                    ],
                )

    async def _handle(self, message: bytes) -> None:
        try:
            rpc = parse_message(message)
        except XmlRejected as exc:
            self._count_bad_rpc()
            if self.base11:
                self._send_reply(None, {}, errors=[malformed(f"Message refused: {exc}.")])
            else:  # malformed-message must not be sent to base:1.0 peers (RFC 6241 App. A)
                self.close("dropped")
            return
        attrs: dict[str, str] = {str(k): str(v) for k, v in rpc.attrib.items()}
        if rpc.tag != qn(NC_NS, "rpc"):
            self._count_bad_rpc()
            self._send_reply(
                rpc,
                attrs,
                errors=[
                    RpcError(
                        "unknown-element",
                        f"Expected <rpc> in namespace {NC_NS}, got <{local(rpc.tag)}>"
                        + (
                            f" in {namespace(rpc.tag)}"
                            if namespace(rpc.tag)
                            else " without namespace"
                        )
                        + ".",
                        type="protocol",
                        info=[("bad-element", local(rpc.tag))],
                    )
                ],
            )
            return
        if "message-id" not in rpc.attrib:
            self._count_bad_rpc()
            self._send_reply(
                rpc,
                attrs,
                errors=[
                    RpcError(
                        "missing-attribute",
                        "The <rpc> element needs a message-id attribute (RFC 6241 4.1).",
                        type="rpc",
                        info=[("bad-attribute", "message-id"), ("bad-element", "rpc")],
                    )
                ],
            )
            return
        self.counters.in_rpcs += 1
        self.server.stats.in_rpcs += 1
        started = time.perf_counter()
        ok = False
        try:
            body = await self.server.dispatch(self, rpc)
        except RpcError as err:
            self._send_reply(rpc, attrs, errors=[err])
        except RpcErrors as errs:
            self._send_reply(rpc, attrs, errors=errs.errors)
        except asyncio.CancelledError:
            raise
        except Exception:  # a server bug: the client still gets a reply to its message-id
            log.exception("session %d: internal error", self.id)
            error = RpcError("operation-failed", "Internal server error; see the server log.")
            self._send_reply(rpc, attrs, errors=[error])
        else:
            ok = True
            self._send_reply(rpc, attrs, body=body)
        metrics = self.server.metrics
        if metrics.enabled:
            metrics.rpc_done(self.server.operation_name(rpc), ok, time.perf_counter() - started)

    def _count_bad_rpc(self) -> None:
        """RFC 6022 in-bad-rpcs, for this session and the server."""
        self.counters.in_bad_rpcs += 1
        self.server.stats.in_bad_rpcs += 1

    def _send_reply(
        self,
        rpc: etree._Element | None,
        attrs: dict[str, str],
        *,
        body: list[etree._Element] | None = None,
        errors: list[RpcError] | None = None,
    ) -> None:
        if self.closed:
            return
        # Keep the client's prefixes for the attributes echoed back (RFC 6241 4.2).
        nsmap: Any = {None: NC_NS}
        if rpc is not None:
            nsmap.update({p: ns for p, ns in rpc.nsmap.items() if p is not None})
        reply = etree.Element(qn(NC_NS, "rpc-reply"), nsmap=nsmap)
        for name, value in attrs.items():  # RFC 6241 4.2: all attributes of <rpc> come back
            reply.set(name, value)
        if errors:
            self.counters.out_rpc_errors += 1
            self.server.stats.out_rpc_errors += 1
            for err in errors:
                reply.append(err.to_xml())
        elif body:
            for elem in body:
                reply.append(elem)
        else:
            etree.SubElement(reply, qn(NC_NS, "ok"))
        self._send(etree.tostring(reply, encoding="UTF-8", xml_declaration=True))
        if rpc is not None and self._close_after_reply:
            self.close(self.termination_reason)

    def close_after_reply(self, reason: str = "closed") -> None:
        self._close_after_reply = True
        self.termination_reason = reason

    def send_notification(self, notification: bytes) -> None:
        if self.closed:
            return
        self.counters.out_notifications += 1
        self.server.stats.out_notifications += 1
        if not self.writable.is_set():
            self._backlog_notifications += len(notification)
            if self._backlog_notifications > self.server.options.notification_backlog:
                log.warning(
                    "session %d (%s): closed, it left %d octets of notifications unread",
                    self.id,
                    self.user,
                    self._backlog_notifications,
                )
                self.server.stats.dropped_subscribers += 1
                self.close("dropped")
                return
        self._send(notification)

    # -- output and back-pressure -------------------------------------------------

    def output_buffered(self) -> int:
        """Octets of output held for this client: the transport's and the backlog's."""
        return self.transport_buffered() + sum(len(b) for b in self._backlog)

    def input_held(self) -> int:
        """Octets of this client's input held (partial and queued messages)."""
        return self._held

    def pause_writing(self) -> None:
        """The transport holds more unread output than its high-water mark."""
        self.writable.clear()

    def resume_writing(self) -> None:
        """The client read enough: send what waited, then handle requests again."""
        self.writable.set()
        # A write may take the transport past its high-water mark again (pause_writing
        # clears ``writable``): what is left then waits for the next resume.
        while self._backlog and self.writable.is_set() and not self.closed:
            self._write(self._backlog.popleft())
        if self._backlog:
            self.writable.clear()
        else:
            self._backlog_notifications = 0

    def _send(self, message: bytes) -> None:
        framed = self.framer.encode(message)
        if not self.writable.is_set():
            # Kept here, not in the transport, so it is counted and bounded.
            self._backlog.append(framed)
            return
        self._write(framed)

    def _write(self, framed: bytes) -> None:
        try:
            self.write(framed)
        except (OSError, ConnectionError, BrokenPipeError):
            self.close("dropped", transport_gone=True)
        except Exception:  # asyncssh raises its own errors on closed channels
            log.debug("session %d: write failed", self.id, exc_info=True)
            self.close("dropped", transport_gone=True)

    def _reply_error_and_close(self, error: RpcError, reason: str) -> None:
        self._send_reply(None, {}, errors=[error])
        self.close(reason)

    # -- end -------------------------------------------------------------------

    def close(self, reason: str = "closed", *, transport_gone: bool = False) -> None:
        """End the session: release its locks and subscriptions, close the transport."""
        if self.closed:
            return
        self.closed = True
        self.termination_reason = reason
        if self.hello_timer is not None:
            self.hello_timer.cancel()
        self.queue.put_nowait(None)
        self._backlog.clear()
        self._release_input()
        self.writable.set()  # the worker wakes and sees the session closed
        current = asyncio.current_task() if asyncio.get_event_loop().is_running() else None
        if self.worker is not None and self.worker is not current and not self.worker.done():
            self.worker.cancel()
        self.server.session_ended(self)
        if not transport_gone:
            with contextlib.suppress(Exception):
                self.close_transport()
