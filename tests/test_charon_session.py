"""The agent's VICI command session: stopping charon never waits for a request in flight.

A worker thread may be blocked in a VICI request holding the session's lock (an
``initiate`` lasts as long as its IKE exchange).  The event loop stops charon on SIGTERM;
when that waited for the lock, the whole agent froze and a removed CE did not exit.
The charon here is a real Unix socket at charon's VICI path that accepts and never
answers, so a request on it blocks for ever: only the fix lets these tests end.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from nc_agent.ike.charon import VICI_SOCKET, Charon, CharonError
from tests.waiting import wait_for


@dataclass
class SilentVici:
    """A VICI socket that accepts sessions, reads their requests and never answers."""

    listener: socket.socket
    accepted: list[socket.socket] = field(default_factory=list)
    received: list[bytes] = field(default_factory=list)

    def serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.accepted.append(conn)
            threading.Thread(target=self._read, args=(conn,), daemon=True).start()

    def _read(self, conn: socket.socket) -> None:
        while True:
            try:
                data = conn.recv(4096)
            except OSError:
                return
            if not data:
                return
            self.received.append(data)


@pytest.fixture
def silent_vici(tmp_path: Path) -> Iterator[tuple[Charon, SilentVici]]:
    charon = Charon(tmp_path, None)
    charon.run_dir.mkdir(parents=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(charon.run_dir / VICI_SOCKET))
    listener.listen()
    server = SilentVici(listener)
    threading.Thread(target=server.serve, daemon=True).start()
    yield charon, server
    listener.close()
    for conn in server.accepted:
        conn.close()


async def _blocked_request_then_stop(charon: Charon, server: SilentVici) -> BaseException | None:
    charon.proc = await asyncio.create_subprocess_exec("sleep", "600")
    proc = charon.proc
    request = asyncio.ensure_future(asyncio.to_thread(charon.request, "version"))
    await asyncio.to_thread(wait_for, lambda: server.received, 10)  # the request is out
    await asyncio.wait_for(charon.stop(), 20)  # before the fix: blocked on the lock for ever
    assert proc.returncode is not None, "charon was not terminated"
    try:
        await asyncio.wait_for(request, 20)
    except (OSError, CharonError) as exc:
        return exc
    return None


def test_stopping_charon_ends_a_request_blocked_on_it(
    silent_vici: tuple[Charon, SilentVici],
) -> None:
    charon, server = silent_vici
    error = asyncio.run(_blocked_request_then_stop(charon, server))
    assert error is not None, "the blocked request returned as if charon had answered"


def test_a_request_broken_by_the_stop_opens_no_new_session(
    silent_vici: tuple[Charon, SilentVici],
) -> None:
    charon, server = silent_vici
    asyncio.run(_blocked_request_then_stop(charon, server))
    assert len(server.accepted) == 1
    assert charon._session is None


def test_disconnect_with_no_request_in_flight_closes_the_session(
    silent_vici: tuple[Charon, SilentVici],
) -> None:
    charon, _server = silent_vici
    charon._connect()
    session = charon._session
    charon.disconnect()
    assert charon._session is None
    assert session.transport.socket.fileno() == -1
