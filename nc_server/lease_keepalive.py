"""The lease's keep-alive: one ``UPDATE`` per renewal period, in a thread of its own.

Why a thread: the ownership round (nc_server.ownership) runs on the server's event
loop, as several statements under the ownership lock.  On a loaded machine that loop
is busy for seconds at a time (adopting another server's commit of a 1,000-site
configuration, compiling, a thousand agents logging in on two cores).  When the lease
was renewed only there, every such stretch longer than the lease (4 s) made the other
servers take this server's CEs over, mid-provisioning (the 1,000-CE benchmark with two
servers: 497-517 CEs moved, four times in three minutes).  Here the lease is renewed
by a thread that needs the loop for nothing, over its own autocommit connection, so
that a busy loop only delays handovers and takeovers, never the lease.

Why a heartbeat: a loop that is *hung* (not busy) must still lose its CEs, or they
would never be provisioned again.  The loop stamps :meth:`LeaseKeepAlive.beat` every
fraction of a second; the keep-alive renews only while that stamp is younger than
:attr:`LeaseTimes.stall <nc_server.leases.LeaseTimes.stall>`.

Why it never renews behind a taker's back: the server taking over a dead server's CEs
locks the lease rows it judged expired (``FOR UPDATE``, the expiry checked again on the
latest row) and deletes them in the transaction that moves the CEs.  This ``UPDATE``
waits on that lock, then finds no row: the lease is lapsed here too (fencing, nc_server.
leases.LocalLease), and the next ownership round starts a fresh lease owning none of
the CEs taken.  An ``UPDATE`` that commits first makes the taker see a live lease.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable
from typing import Any

import psycopg

from nc_server.leases import LeaseTimes, LocalLease
from nc_server.storage_postgresql import redact_error

log = logging.getLogger("cevpn.ownership")

RENEW_SQL = (
    "UPDATE cevpn_server_lease SET expires = GREATEST(expires, now() + make_interval(secs => %s))"
    " WHERE server = %s RETURNING expires"
)
"""The whole renewal.  GREATEST: an ownership round's renewal, whose ``now()`` is its
transaction's start, never shortens what this one set."""


class LeaseKeepAlive:
    """Renews one server's lease row every :attr:`LeaseTimes.renew` seconds (see module)."""

    def __init__(
        self,
        url: str,
        name: str,
        lease: LocalLease,
        times: LeaseTimes,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url = url
        self.name = name
        self.lease = lease
        self.times = times
        self.clock = clock
        self._beat = clock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._conn: psycopg.Connection[Any] | None = None
        self._failing = False
        self._gone = False
        self._stalled = False
        self._busy_peak = 0.0
        """The longest the loop had not turned, in the busy stretch under way (seconds)."""
        self._busy_where: Counter[str] = Counter()
        """Where the loop was, sampled at each renewal of the busy stretch under way."""
        self._loop_thread: int | None = None

    # -- on the event loop -------------------------------------------------------------

    def beat(self) -> None:
        """The event loop turned (called from a callback it runs every fraction of a second)."""
        self._beat = self.clock()
        self._loop_thread = threading.get_ident()

    def start(self) -> None:
        self._beat = self.clock()
        # A lease the first ownership round could not make is not "gone": no warning.
        self._gone = not self.lease.valid()
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._run, name=f"lease-keepalive-{self.name}", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop renewing and wait for the thread (blocking: run it off the loop)."""
        self._stop.set()
        if self._thread is not None:
            # A renewal in progress ends within its statement timeout.
            self._thread.join(timeout=self.times.renew * 2 + 5)
            self._thread = None
        self._close()

    # -- in the thread ---------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.wait(self.times.renew):
            self.renew_once()

    def renew_once(self) -> bool | None:
        """One renewal: True renewed; False the lease row is gone (another server took
        this one's CEs over), so the lease lapses now; None not renewed (the loop is hung,
        or the database did not answer in time)."""
        if not self._loop_turns():
            return None
        try:
            conn = self._connection()
            sent = self.lease.sending()
            row = conn.execute(RENEW_SQL, (self.times.ttl, self.name)).fetchone()
        except (psycopg.Error, OSError) as exc:
            if not self._failing:
                log.warning(
                    "ownership: lease renewal failed (%s); pushes stop within %.1f s",
                    redact_error(exc, self.url),
                    self.lease.remaining(),
                )
            self._failing = True
            self._close()
            return None
        if self._failing:
            log.info("ownership: lease renewed again")
            self._failing = False
        if row is None:
            self.lease.lapse()
            if not self._gone:
                log.warning(
                    "ownership: the lease of server %s is gone (another server judged it"
                    " dead and took its CEs over): no push until the next ownership round",
                    self.name,
                )
            self._gone = True
            return False
        self._gone = False
        self.lease.renewed(sent)
        return True

    def _loop_turns(self) -> bool:
        """Whether the event loop turned recently enough to renew; logs a hung loop, and
        a busy stretch the lease would not have survived without this thread."""
        idle = self.clock() - self._beat
        # Longer than this, the lease would not have survived on the loop alone.
        long_stretch = min(self.times.ttl - self.times.margin, self.times.stall)
        if idle > long_stretch:
            self._busy_peak = max(self._busy_peak, idle)
            self._busy_where[self._where_the_loop_is()] += 1
        if idle > self.times.stall:
            if not self._stalled:
                log.warning(
                    "ownership: the event loop has not turned for %.1f s (in %s): the lease"
                    " is no longer renewed, pushes stop within %.1f s and the CEs go to the"
                    " other servers",
                    idle,
                    self._busy_where.most_common(1)[0][0],
                    self.lease.remaining(),
                )
            self._stalled = True
            return False
        if self._stalled:
            log.info("ownership: the event loop turns again; renewing the lease")
            self._stalled = False
        if idle <= long_stretch and self._busy_peak:
            where = "; ".join(f"{n}x {at}" for at, n in self._busy_where.most_common(3))
            log.warning(
                "ownership: the event loop was busy for at least %.1f s (sampled in: %s);"
                " the lease was kept all along",
                self._busy_peak,
                where,
                extra={"step": "loop-busy", "seconds": round(self._busy_peak, 1)},
            )
            self._busy_peak = 0.0
            self._busy_where.clear()
        return True

    def _where_the_loop_is(self) -> str:
        """The event loop thread's innermost frames (code locations only, never values):
        what an operator, or the next developer, needs to know of a long busy stretch."""
        frame = sys._current_frames().get(self._loop_thread or -1)
        if frame is None:
            return "unknown"
        frames = traceback.extract_stack(frame)[-6:]
        return " < ".join(
            f"{f.name} ({'/'.join(f.filename.split('/')[-2:])}:{f.lineno})"
            for f in reversed(frames)
        )

    def _connection(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed:
            conn = psycopg.connect(
                self.url,
                autocommit=True,
                connect_timeout=max(1, int(self.times.renew * 2)),
                application_name=f"cevpn-lease-{self.name}"[:63],
            )
            # A renewal that cannot finish within its period is worth nothing: give it up
            # (it may be waiting on a taker's lock) and try again at the next one.
            conn.execute(f"SET statement_timeout = {int(self.times.renew * 1000)}")
            self._conn = conn
        return self._conn

    def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except (psycopg.Error, OSError):
                pass
