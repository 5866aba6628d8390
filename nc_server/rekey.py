"""IKE-less rekeying on time (RFC 9061's IKE-less case): each VPN's SAs are replaced every
``tunnel-defaults/ikeless-rekey-interval`` of that VPN, inbound first.

The scheduler sleeps until the earliest moment an SA of any IKE-less VPN
present *now* is due, and is woken whenever that moment may have moved: a
commit added, removed or changed a VPN, a rekey began or completed.  (It used
to sleep a period computed once, before any VPN existed: a VPN added later
with a 10 s interval was rekeyed up to 60 s late.)

What a rekey does (new SAs in the key store, the CEs' configurations
recompiled, the receiver first) is the controller's (nc_server.controller);
this module only says when.  The clock and the wait are injectable, so tests drive time instead of
waiting for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

log = logging.getLogger("cevpn.server.rekey")

RETRY_AFTER_FAILURE = 5.0
"""Seconds before a due rekey that could not begin is tried again."""
IDLE_CHECK = 3600.0
"""Seconds to sleep when no IKE-less SA exists (a wake-up comes with the first one)."""


@dataclass(frozen=True)
class RekeyPlan:
    """One IKE-less VPN as the scheduler sees it."""

    vpn: str
    interval: float
    """Its ikeless-rekey-interval, seconds."""


class RekeySource(Protocol):
    """What the scheduler needs of the key store (nc_server.keystore.KeyStore has it)."""

    def next_rekey_at(self, vpn: str, interval_seconds: float) -> float | None: ...

    def due_for_rekey(
        self, vpn: str, interval_seconds: float, now: datetime | None = None
    ) -> list[tuple[str, str]]: ...


Wait = Callable[[asyncio.Event, float], Awaitable[None]]


async def wait_event(event: asyncio.Event, timeout: float) -> None:
    """Until ``event`` is set or ``timeout`` seconds pass."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), timeout)


class RekeyScheduler:
    """When the IKE-less SAs of the database's VPNs are due, and the task that waits for
    it: ``plans`` says which VPNs are IKE-less now, ``rekey`` begins one VPN's due SAs."""

    def __init__(
        self,
        keys: RekeySource,
        plans: Callable[[], Iterable[RekeyPlan]],
        rekey: Callable[[str, list[tuple[str, str]]], None],
        *,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        wait: Wait = wait_event,
        leads: Callable[[], bool] = lambda: True,
    ) -> None:
        self.keys = keys
        self.plans = plans
        self.rekey = rekey
        self.leads = leads
        """Whether this server begins rekeys now: with several servers on one database only
        one does (nc_server.ownership); the others learn of its new SAs from the database
        (nc_server.shared_keys) and ask again every RETRY_AFTER_FAILURE seconds while an SA
        is due, so that a new leader takes over a dead one's rekeys."""
        self.clock = clock
        self.wait = wait
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Run :meth:`run` in the background (the server is up)."""
        self._task = asyncio.get_running_loop().create_task(self.run())

    def stop(self) -> None:
        """Stop the background run, if any (the server is stopping)."""
        if self._task is not None:
            self._task.cancel()

    def changed(self) -> None:
        """The VPNs, their intervals or their SAs changed: compute the next moment again."""
        self._wake.set()

    def seconds_to_next(self) -> float | None:
        """Seconds until the next SA is due (0: one is due now); None: no IKE-less SA."""
        now = self.clock().timestamp()
        moments = [
            at
            for plan in self.plans()
            if (at := self.keys.next_rekey_at(plan.vpn, plan.interval)) is not None
        ]
        return max(0.0, min(moments) - now) if moments else None

    def run_due(self) -> int:
        """Begin the rekeys that are due now; the number of directions."""
        started = 0
        if not self.leads():
            return 0
        now = self.clock()
        for plan in list(self.plans()):
            try:
                due = self.keys.due_for_rekey(plan.vpn, plan.interval, now)
                if due:
                    log.info("VPN %s: rekeying %d IKE-less SAs", plan.vpn, len(due))
                    self.rekey(plan.vpn, due)
                    started += len(due)
            except Exception:  # one VPN's failure must not stop the others' rekeys
                log.exception("IKE-less rekey of VPN %s", plan.vpn)
        return started

    async def run(self) -> None:
        """Forever: sleep until the next due moment (or a change), then rekey what is due.

        A wake-up only makes the next moment computed again: a commit wakes the
        scheduler, and looking for due SAs among a million costs 0.2 s, which is
        spent only once one is due."""
        while True:
            self._wake.clear()
            delay = self.seconds_to_next()
            if delay is None or delay > 0:
                await self.wait(self._wake, IDLE_CHECK if delay is None else delay)
                continue
            if not self.run_due():
                # Due, yet nothing could begin (the failure is logged, or another server
                # leads): try again in a while rather than spin.
                await self.wait(self._wake, RETRY_AFTER_FAILURE)
