"""The rules of CE ownership among several VPN servers: leases, fencing, rendezvous.

Pure logic, no database (nc_server.ownership runs it on PostgreSQL), so that
the rules are tested with a controllable clock and plain data:

- **A server's lease** is a row whose expiry the *database* sets (its
  ``now()`` + :attr:`LeaseTimes.ttl`), renewed every :attr:`LeaseTimes.renew`
  seconds.  Another server judges it dead only once the database's clock is
  past that expiry by :attr:`LeaseTimes.grace` as well.
- **The keep-alive** renews nothing but the lease, in a thread of its own
  (nc_server.lease_keepalive), so that an event loop busy for seconds (adopting
  another server's commit, compiling, a thousand CEs logging in) does not cost
  the server its CEs; it renews only while the loop has turned within
  :attr:`LeaseTimes.stall`, so that a hung loop still does.
- **Fencing** (:class:`LocalLease`): the server itself counts its lease on its
  own monotonic clock from the moment it *sent* the renewal that succeeded (the
  database set the expiry later than that, so this end comes first), and stops
  pushing :attr:`LeaseTimes.margin` seconds before it.  Between the last edit
  it may send and the first moment another server may take its CEs over there
  are then margin + grace seconds: room for an edit on its way and for the two
  clocks' rates to differ.
- **Who owns a CE** (:func:`owner_of`): rendezvous (highest random weight)
  hashing of the site over the live servers.  Load spreads evenly, every server
  computes the same answer from the same list, and a server joining or leaving
  moves only the CEs it wins or held.
- **A Call Home CE** (RFC 8071) can be provisioned only over the connection it
  opens, so it is owned by the server holding that connection (:func:`winner`),
  never by a rendezvous winner it did not call.  While no live server holds one
  it stays with its owner (a dead owner's goes to the rendezvous winner, until
  the CE calls).  Its owner hands it over to the server it called only once it
  holds no live connection from the CE itself, and has no push to it in flight.
- **What changes** (:func:`plan`): the CEs of a dead server go to the live ones
  in one transaction, each with its epoch + 1; a CE nobody owns yet goes to its
  winner; a CE this server owns but another live server now wins is handed
  over, only while no push to it is in flight.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class LeaseTimes:
    """Every duration of the lease protocol, in seconds, in one place.

    With the defaults a dead server's CEs are taken over at most
    ttl + grace + renew = 6 s after its last renewal; those of a server whose event
    loop hangs (its process alive), at most stall + ttl + grace + renew = 66 s after the
    loop last turned.
    """

    ttl: float = 4.0
    """A renewal keeps the lease this long (by the database's clock)."""
    renew: float = 1.0
    """Seconds between renewals (and checks for dead servers)."""
    margin: float = 1.0
    """The server stops pushing this long before its lease ends by its own clock."""
    grace: float = 1.0
    """Another server waits this long past the expiry before it takes the CEs over."""
    stall: float = 60.0
    """The keep-alive stops renewing once the event loop has not turned for this long.
    Only a hung loop is to reach it: the longest busy stretch measured is 40 s (a
    second server adopting the commit of a 1,000-site IKE-less full mesh, 999,000 SA
    directions read and compiled, on a loaded 2-core machine)."""

    def __post_init__(self) -> None:
        if not 0 < self.renew < self.ttl - self.margin:
            raise ValueError("a lease must be renewed well before it runs out")
        if self.stall <= 0:
            raise ValueError("the event loop's stall bound must be positive")

    @classmethod
    def from_environment(cls) -> LeaseTimes:
        """The defaults, or ``CEVPN_LEASE_TTL`` / ``_RENEW`` / ``_MARGIN`` / ``_GRACE`` /
        ``_STALL`` (tests shorten or lengthen them; an operator has no reason to)."""
        values = {}
        for name in ("ttl", "renew", "margin", "grace", "stall"):
            raw = os.environ.get(f"CEVPN_LEASE_{name.upper()}")
            if raw:
                values[name] = float(raw)
        return cls(**values)


class Fenced(Exception):
    """This server may not push to the CE now: it does not own it, or its own lease may
    have run out (the database is unreachable).  Nothing was sent; the owner, this server
    once its lease is renewed or another one, provisions the CE."""


class LocalLease:
    """The fencing rule: is this server's lease still valid, by its own monotonic clock?

    Renewed from two threads (the keep-alive's and the event loop's ownership rounds),
    read on the loop: the writes hold a lock, a read is one float.
    """

    def __init__(self, times: LeaseTimes, clock: Callable[[], float] = time.monotonic) -> None:
        self.times = times
        self.clock = clock
        self.valid_until = float("-inf")
        """Local monotonic time at which pushing stops; -inf: never renewed."""
        self.revivals = 0
        """How many times a renewal made a lapsed (or never valid) lease valid again: the
        ownership round that sees it change goes over every CE again, since pushes were
        refused meanwhile."""
        self._lock = threading.Lock()

    def sending(self) -> float:
        """Call just before sending a renewal: the stamp to give :meth:`renewed`."""
        return self.clock()

    def renewed(self, sent_at: float) -> None:
        """The renewal sent at ``sent_at`` succeeded (the database committed it)."""
        with self._lock:
            now = self.clock()
            lapsed = not now < self.valid_until
            self.valid_until = max(self.valid_until, sent_at + self.times.ttl - self.times.margin)
            if lapsed and now < self.valid_until:
                self.revivals += 1

    def lapse(self) -> None:
        """Stop pushing now (a clean stop, the lease row gone, or ownership rows lost)."""
        with self._lock:
            self.valid_until = float("-inf")

    def valid(self) -> bool:
        return self.clock() < self.valid_until

    def remaining(self) -> float:
        return max(0.0, self.valid_until - self.clock())


def weight(site: str, server: str) -> int:
    """The rendezvous weight of ``server`` for ``site``: stable across processes and runs
    (never Python's salted hash())."""
    digest = hashlib.blake2b(f"{site}\0{server}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def owner_of(site: str, servers: Iterable[str]) -> str | None:
    """The live server that should own ``site`` (None: no server is live)."""
    best: tuple[int, str] | None = None
    for server in servers:
        candidate = (weight(site, server), server)
        if best is None or candidate > best:
            best = candidate
    return None if best is None else best[1]


@dataclass(frozen=True)
class Calls:
    """Who holds the call-home connections (RFC 8071) of the call-home CEs."""

    call_home: Collection[str] = ()
    """The sites whose CE calls home (every other site is dialled)."""
    held: Mapping[str, Collection[str]] = field(default_factory=dict)
    """Site -> the servers recorded holding a connection from its CE (live or not)."""
    mine: Collection[str] = ()
    """The sites whose CE's connection this server holds, alive, right now."""


def winner(
    site: str, live: Collection[str], calls: Calls, current: str | None = None
) -> str | None:
    """The server that should own ``site`` now, ``current`` owning it; None: no preference
    (a call-home CE no live server holds a connection from stays where it is).

    A dialled CE: its rendezvous winner among the live servers.  A call-home CE: the live
    server holding its connection (``current`` if it is one of them; the rendezvous winner
    among them if, for a moment, several are recorded).
    """
    if site not in calls.call_home:
        return owner_of(site, live)
    holders = [s for s in calls.held.get(site, ()) if s in live]
    if current is not None and current in holders:
        return current
    return owner_of(site, holders)


def hands_over(me: str, site: str, live: Collection[str], calls: Calls) -> str | None:
    """The server this server's CE ``site`` is to be handed to now (None: keep it).

    Never a call-home CE whose live connection this server holds: the CE is provisioned
    over it, and it is this server's until the connection ends.
    """
    if site in calls.call_home and site in calls.mine:
        return None
    to = winner(site, live, calls, me)
    return None if to is None or to == me else to


@dataclass(frozen=True)
class Owner:
    """A CE's ownership row: which server, and how many times it changed hands."""

    server: str
    epoch: int


@dataclass(frozen=True)
class Change:
    """One row to write: ``site`` is now ``server``'s at ``epoch``."""

    site: str
    server: str
    epoch: int
    previous: str | None
    """The server that owned it (None: nobody yet)."""
    reason: str
    """'new', 'takeover' (its server died) or 'handover' (rebalanced to a live server)."""


def plan(
    me: str,
    rows: Mapping[str, Owner],
    live: Collection[str],
    known_sites: Iterable[str],
    busy: Collection[str] = (),
    calls: Calls | None = None,
) -> list[Change]:
    """The ownership rows to write so that every known CE has one live owner.

    ``rows``: the table now; ``live``: the servers whose lease has not expired (``me``
    among them); ``known_sites``: the sites this server knows of (a row is never made for
    a site it does not know, nor deleted here); ``busy``: this server's CEs with a push in
    flight, which it does not hand over yet; ``calls``: the call-home CEs and who holds
    their connections (None: every CE is dialled).
    """
    assert me in live, "only a live server changes ownership"
    calls = calls or Calls()
    changes = []
    for site, row in sorted(rows.items()):
        if row.server not in live:
            to = winner(site, live, calls) or owner_of(site, live)
            assert to is not None
            changes.append(Change(site, to, row.epoch + 1, row.server, "takeover"))
        elif row.server == me and site not in busy:
            handed_to = hands_over(me, site, live, calls)
            if handed_to is not None:
                changes.append(Change(site, handed_to, row.epoch + 1, me, "handover"))
    for site in sorted(set(known_sites) - set(rows)):
        to = winner(site, live, calls) or owner_of(site, live)
        assert to is not None
        changes.append(Change(site, to, 1, None, "new"))
    return changes
