"""A cevpn NETCONF server run inside the test process, on its own event-loop thread.

For tests that need a server built with particular ServerOptions (tiny
limits, a fake application) and to look at its state directly; real asyncssh
and real clients over TCP all the same.  Servers as operators run them are in
tests/netconf_server.py.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

from ncclient import manager

from nc_core.server import NetconfServer, ServerOptions
from nc_core.transaction import Application
from nc_core.transport_ssh import host_key_line, listen
from tests.netconf_server import free_port

T = TypeVar("T")


class InProcessServer:
    """``users``: name -> (password, NACM groups); ``public_keys``: name -> (OpenSSH
    public key lines, NACM groups) for accounts that log in with a key only.  Both are
    added before the server starts."""

    def __init__(
        self,
        state_dir: Path,
        app: Application | None = None,
        *,
        users: dict[str, tuple[str, tuple[str, ...]]] | None = None,
        public_keys: dict[str, tuple[list[str], tuple[str, ...]]] | None = None,
        **options: Any,
    ) -> None:
        self.app = app or Application()
        self.port = free_port()
        self.loop = asyncio.new_event_loop()
        self.server = NetconfServer(
            ServerOptions(state_dir=state_dir, port=self.port, **options), self.app
        )
        self.users = users or {"admin": ("pw-admin-1", ("admin",))}
        for name, (password, groups) in self.users.items():
            self.server.add_user_offline(
                name, password=password, public_keys=[], groups=list(groups)
            )
        for name, (keys, groups) in (public_keys or {}).items():
            self.server.add_user_offline(name, password=None, public_keys=keys, groups=list(groups))
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.call(self._start())
        self.host_key = host_key_line(state_dir).split()[1]

    async def _start(self) -> None:
        await self.server.load()
        self.acceptor = await listen(self.server, "127.0.0.1", self.port)

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def run(self, fn: Any) -> Any:
        """Call ``fn()`` on the server's loop (to read its state safely)."""

        async def call() -> Any:
            return fn()

        return self.call(call())

    def connect(self, user: str = "admin", **kw: Any) -> Any:
        return manager.connect(
            host="127.0.0.1",
            port=self.port,
            username=user,
            password=self.users[user][0],
            hostkey_verify=True,
            hostkey_b64=self.host_key,
            allow_agent=False,
            look_for_keys=False,
            timeout=kw.pop("timeout", 30),
            **kw,
        )

    def close(self) -> None:
        async def stop() -> None:
            self.acceptor.close()
            self.server.close()

        self.call(stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
