"""Several VPN servers on one PostgreSQL database: one set of key material for all.

Every server compiles the CEs' configurations from the key store it loaded
into memory (nc_server.keystore).  Material made during a commit reaches the
other servers with the commit itself: they read the key store again before
compiling a running configuration they adopt (nc_server.controller).  This
module covers what changes *between* commits:

- an IKE-less rekey (begun by one server only, the rekey leader: the first live
  server by name, nc_server.ownership), then each receiver's promotion, done by
  the server that heard the receiver confirm;
- ``rotate-keys``, and a CE's certificate made from its CSR, on whichever
  server the operator or the CE reached.

The server that writes such material NOTIFYs :data:`CHANNEL` in the very
transaction that writes it, naming itself and the VPNs.  The others read those
VPNs again (only the pairs that differ are compiled again) and push what
changed to the CEs they own; without it, two servers would push different SAs
to the two ends of one tunnel.  A server whose listening connection was lost
reads every VPN again when it is back (a notification may have been missed).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

CHANNEL = "cevpn_keys"
"""NOTIFY channel: the payload is :class:`KeyNews` as JSON."""


@dataclass(frozen=True)
class KeyNews:
    """A server changed the material of some VPNs."""

    server: str
    vpns: frozenset[str]

    def payload(self) -> str:
        """As sent (PostgreSQL limits a payload to 8,000 bytes: a flush names few VPNs, and
        one naming too many is sent as "every VPN", an empty list)."""
        text = json.dumps({"server": self.server, "vpns": sorted(self.vpns)})
        if len(text.encode()) > 7000:
            text = json.dumps({"server": self.server, "vpns": []})
        return text

    @classmethod
    def parse(cls, payload: str) -> KeyNews | None:
        """None for a payload this version does not understand (it is logged, not fatal)."""
        try:
            data = json.loads(payload)
            return cls(str(data["server"]), frozenset(str(v) for v in data["vpns"]))
        except (ValueError, KeyError, TypeError):
            return None
