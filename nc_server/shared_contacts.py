"""Several VPN servers on one PostgreSQL database: a CE heard by a server that does not own it.

A CE may reach any server: its agent fails over between the endpoints of its
bundle for pulls, notifications and logins, while one server provisions it
(nc_server.ownership).  When a CE's account logs in to a server that does not
own it, that server NOTIFYs :data:`CHANNEL`; the owner reacts as if the CE had
logged in to it (``Controller.ce_reachable``): a CE it had marked unreachable
is pushed at once instead of at its next back-off retry, up to
``unreachable-retry-limit`` seconds away.  A server tells of each CE at most
once per :data:`EVERY` seconds (a pulling CE logs in at every pull).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass

CHANNEL = "cevpn_ce_heard"
"""NOTIFY channel: the payload is :class:`ContactNews` as JSON."""
EVERY = 5.0
"""Seconds: at most one notification per CE per server in this time."""


@dataclass(frozen=True)
class ContactNews:
    """Server ``server`` heard from the site's CE (its account logged in from ``source``)."""

    server: str
    site: str
    source: str

    def payload(self) -> str:
        return json.dumps({"server": self.server, "site": self.site, "source": self.source})

    @classmethod
    def parse(cls, payload: str) -> ContactNews | None:
        """None for a payload this version does not understand."""
        try:
            data = json.loads(payload)
            return cls(str(data["server"]), str(data["site"]), str(data["source"]))
        except (ValueError, KeyError, TypeError):
            return None


class ContactTeller:
    """What a server sends: at most one notification per CE every :data:`EVERY` seconds."""

    def __init__(
        self,
        server: str,
        send: Callable[[str, str], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.server = server
        self.send = send
        """(channel, payload): NOTIFY now."""
        self.clock = clock
        self._told: dict[str, float] = {}

    def heard(self, site: str, source: str) -> bool:
        """Tell the owner (True), unless this CE was told of less than EVERY seconds ago."""
        now = self.clock()
        if now - self._told.get(site, float("-inf")) < EVERY:
            return False
        self._told[site] = now
        if len(self._told) > 100_000:  # bounded: forget the oldest half
            for old in sorted(self._told, key=self._told.__getitem__)[: len(self._told) // 2]:
                del self._told[old]
        self.send(CHANNEL, ContactNews(self.server, site, source).payload())
        return True
