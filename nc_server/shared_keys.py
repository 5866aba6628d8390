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

The material a commit's compile makes is not announced on its own: a
:class:`KeyJournal` collects the rows written while commits are validated, and
the commit that publishes running stores them beside its generation
(nc_server.shared_running).  A server adopting that running reads those rows
only, not the whole VPN (a 1,000-site IKE-less mesh holds about a million rows,
one per direction: a site added writes about 2,000).  A generation whose rows
are not known (pruned, or more than :data:`MAX_ROWS` in one VPN) makes it read
the VPN whole, as before.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

CHANNEL = "cevpn_keys"
"""NOTIFY channel: the payload is :class:`KeyNews` as JSON."""


@dataclass(frozen=True)
class KeyNews:
    """A server changed the material of some VPNs: these rows of them, if known."""

    server: str
    vpns: frozenset[str]
    rows: frozenset[tuple[str, str]] | None = None
    """The rows (table, key) written; None: read the VPNs whole."""

    def payload(self) -> str:
        """As sent.  PostgreSQL limits a payload to 8,000 bytes: a rekey or a promotion
        names a few rows, and is sent with them; a flush naming more rows is sent with its
        VPNs only (read whole), and one naming too many VPNs as "every VPN" (no VPN)."""
        data: dict[str, object] = {"server": self.server, "vpns": sorted(self.vpns)}
        if self.rows is not None:
            text = json.dumps({**data, "rows": sorted(self.rows)}, separators=(",", ":"))
            if len(text.encode()) <= PAYLOAD_LIMIT:
                return text
        text = json.dumps(data, separators=(",", ":"))
        if len(text.encode()) > PAYLOAD_LIMIT:
            text = json.dumps({"server": self.server, "vpns": []})
        return text

    @classmethod
    def parse(cls, payload: str) -> KeyNews | None:
        """None for a payload this version does not understand (it is logged, not fatal)."""
        try:
            data = json.loads(payload)
            rows = data.get("rows")
            return cls(
                str(data["server"]),
                frozenset(str(v) for v in data["vpns"]),
                None if rows is None else frozenset((str(t), str(k)) for t, k in rows),
            )
        except (ValueError, KeyError, TypeError, AttributeError):
            return None

    def changes(self) -> dict[str, Rows] | None:
        """VPN -> the rows to read again (None: the whole VPN); None: every VPN."""
        if not self.vpns:
            return None
        if self.rows is None:
            return dict.fromkeys(self.vpns)
        grouped = by_vpn(self.rows)
        return {vpn: frozenset(grouped.get(vpn, ())) for vpn in self.vpns}


PAYLOAD_LIMIT = 7000
"""Bytes of a NOTIFY payload sent at most (PostgreSQL's limit is 8,000)."""


def merge_changes(
    into: dict[str, Rows] | None, more: dict[str, Rows] | None
) -> dict[str, Rows] | None:
    """Two sets of changes as one (None: every VPN, whole)."""
    if into is None or more is None:
        return None
    merged = dict(into)
    for vpn, rows in more.items():
        if vpn in merged:
            known = merged[vpn]
            merged[vpn] = None if known is None or rows is None else known | rows
        else:
            merged[vpn] = rows
    return merged


MAX_ROWS = 20_000
"""Rows of one VPN a commit's record names at most; beyond, it says "the whole VPN"."""

Rows = frozenset[tuple[str, str]] | None
"""Rows (table, key) of one VPN's material, or None: any of them (read the VPN whole)."""


def vpn_of(key: str) -> str:
    """Key store keys begin with the VPN's id (nc_server.keystore)."""
    return key.split("/", 1)[0]


def by_vpn(rows: Iterable[tuple[str, str]]) -> dict[str, set[tuple[str, str]]]:
    grouped: dict[str, set[tuple[str, str]]] = {}
    for table, key in rows:
        grouped.setdefault(vpn_of(key), set()).add((table, key))
    return grouped


@dataclass
class KeyJournal:
    """Key material rows written while commits were validated, until a commit of running
    is published (:meth:`pending`, :meth:`published`); and, while this server adopts
    another's running, the rows that running's commits wrote (:attr:`incoming`)."""

    _written: dict[str, set[tuple[str, str]] | None] = field(default_factory=dict)
    incoming: dict[str, Rows] | None = None
    """VPN -> rows the commits being adopted wrote (a VPN not named: none); None while
    nothing is being adopted, or when those commits' rows are not known."""

    def wrote(self, rows: Iterable[tuple[str, str]]) -> None:
        for vpn, keys in by_vpn(rows).items():
            known = self._written.setdefault(vpn, set())
            if known is not None:  # None: already too many, the VPN is read whole
                known |= keys
                if len(known) > MAX_ROWS:
                    self._written[vpn] = None

    def pending(self) -> bytes:
        """The record of what this server wrote since its last published commit (JSON)."""
        return encode_rows(self._written)

    def published(self) -> None:
        """The record of :meth:`pending` was stored with a published commit (called in the
        same turn of the event loop, so nothing was written in between)."""
        self._written.clear()

    def rows_for(self, vpn: str) -> Rows:
        """What the commits being adopted wrote of ``vpn`` (None: read it whole)."""
        if self.incoming is None:
            return None
        return self.incoming.get(vpn, frozenset())


def encode_rows(written: Mapping[str, Iterable[tuple[str, str]] | None]) -> bytes:
    return json.dumps(
        {vpn: None if rows is None else sorted(rows) for vpn, rows in sorted(written.items())},
        separators=(",", ":"),
    ).encode()


def merge_records(records: Iterable[bytes | None]) -> dict[str, Rows] | None:
    """What several commits' records name together; None if one is missing or unreadable
    (the VPNs are then read whole)."""
    merged: dict[str, Rows] | None = {}
    for record in records:
        if record is None:
            return None
        try:
            parsed = {
                str(vpn): None if rows is None else frozenset((str(t), str(k)) for t, k in rows)
                for vpn, rows in json.loads(record).items()
            }
        except (ValueError, TypeError, AttributeError):
            return None
        merged = merge_changes(merged, parsed)
    return merged
