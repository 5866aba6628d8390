"""Provisioning of every CE: one worker per CE, bounded concurrency, retry with back-off.

The VPN database changes in a NETCONF transaction; making the CEs follow is
asynchronous, as it must be when CEs can be down: each CE has a record
(status, versions, last error, retries) that `<get>` shows and whose status
changes are notified.  A CE that cannot be reached is retried after 1, 2,
4 ... seconds up to the server's unreachable-retry-limit, so a CE that
returns catches up by itself.  A CE that refuses a configuration is not
retried until something changes (retrying would be refused again), and a
change that could not be confirmed is not retried either: pushing it again
would cut the management path again.

What a worker does for a CE is the application's business (push, or
deprovision); this module only decides when, how many at once, and what
happened.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TypeVar

from nc_core.notifications import date_and_time
from nc_core.tasks import stop_tasks
from nc_server.southbound import CeBusy, CeRefused, CeUnreachable, NotConfirmed, Timings

log = logging.getLogger("cevpn.server.provisioning")
T = TypeVar("T")


def now_text(moment: datetime | None = None) -> str:
    return date_and_time(moment or datetime.now(UTC), "seconds")


def retry_delay(attempt: int, limit: float) -> float:
    """Seconds before retry number ``attempt`` (1, 2, 4 ... capped at ``limit``)."""
    return min(limit, float(2 ** min(attempt - 1, 30)))


@dataclass
class CeRecord:
    """Where provisioning of one CE stands (cevpn-service site/provisioning)."""

    vpn: str
    site: str
    status: str = "pending"
    since: str = field(default_factory=now_text)
    target_version: str | None = None
    applied_version: str | None = None
    last_contact: str | None = None
    last_error: str | None = None
    retry_count: int = 0
    next_attempt: str | None = None
    peer_count: int = 0
    timings: Timings = field(default_factory=Timings)
    """Cumulated cost of the provisioning work for this CE."""


Job = Callable[[CeRecord], Awaitable[str]]
"""Does the work for one CE; returns the new status ('in-sync', 'pending', ...)."""
StatusListener = Callable[[CeRecord, str, str | None], None]


class Provisioner:
    def __init__(
        self,
        job: Job,
        on_status: StatusListener,
        *,
        max_concurrent: int = 32,
        retry_limit: float = 300.0,
        on_retry_failed: StatusListener | None = None,
    ) -> None:
        self.job = job
        self.on_status = on_status
        self.on_retry_failed = on_retry_failed
        """Told of each failed attempt to reach a CE that was already unreachable (its
        status does not change: ``on_status`` is not told)."""
        self.records: dict[str, CeRecord] = {}
        self.max_concurrent = max_concurrent
        self.retry_limit = retry_limit
        self._slots = asyncio.Semaphore(max_concurrent)
        self._running: dict[str, asyncio.Task[None]] = {}
        self._again: set[str] = set()
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._idle = asyncio.Event()
        self._idle.set()
        self._closed = False

    def configure(self, max_concurrent: int, retry_limit: float) -> None:
        if max_concurrent != self.max_concurrent:
            self.max_concurrent = max_concurrent
            self._slots = asyncio.Semaphore(max_concurrent)
        self.retry_limit = retry_limit

    def record(self, vpn: str, site: str) -> CeRecord:
        rec = self.records.get(site)
        if rec is None or rec.vpn != vpn:
            rec = CeRecord(vpn, site)
            self.records[site] = rec
        return rec

    def forget(self, site: str) -> None:
        self.records.pop(site, None)
        timer = self._timers.pop(site, None)
        if timer is not None:
            timer.cancel()

    def drop(self, site: str) -> None:
        """No more retries for ``site`` (its record stays); a job running now ends by
        itself (it is fenced)."""
        timer = self._timers.pop(site, None)
        if timer is not None:
            timer.cancel()
        self._again.discard(site)
        rec = self.records.get(site)
        if rec is not None:
            rec.next_attempt = None
        if not self._running and not self._timers:
            self._idle.set()

    def set_status(self, rec: CeRecord, status: str, error: str | None = None) -> None:
        previous = rec.status
        rec.last_error = error if error is not None else rec.last_error
        if status == "in-sync":
            rec.last_error = None
        if status != previous:
            rec.status = status
            rec.since = now_text()
            level = logging.WARNING if status in ("failed", "unreachable") else logging.INFO
            log.log(level, "CE %s: %s -> %s%s", rec.site, previous, status,
                    f" ({error})" if error else "")  # fmt: skip
            self.on_status(rec, previous, error)

    def want(self, site: str, *, reset_backoff: bool = True) -> None:
        """Run the job for ``site`` soon (again, if it is running now)."""
        if self._closed:
            return
        rec = self.records.get(site)
        if rec is None:
            return
        if reset_backoff:
            rec.retry_count = 0
            timer = self._timers.pop(site, None)
            if timer is not None:
                timer.cancel()
            rec.next_attempt = None
        if site in self._running:
            self._again.add(site)
            return
        self._idle.clear()
        task = asyncio.get_running_loop().create_task(self._run(site))
        self._running[site] = task

    def busy(self, site: str) -> bool:
        """Is a job for ``site`` waiting for a slot or running (not merely a retry timer)?"""
        return site in self._running

    async def _run(self, site: str) -> None:
        try:
            while True:
                rec = self.records.get(site)
                if rec is None:
                    return
                async with self._slots:
                    await self._once(rec)
                if site not in self._again:
                    return
                self._again.discard(site)
        finally:
            self._running.pop(site, None)
            if not self._running and not self._timers:
                self._idle.set()

    async def _once(self, rec: CeRecord) -> None:
        try:
            status = await self.job(rec)
        except CeUnreachable as exc:
            rec.retry_count += 1
            delay = retry_delay(rec.retry_count, self.retry_limit)
            rec.next_attempt = now_text(datetime.now(UTC) + timedelta(seconds=delay))
            previous = rec.status
            self.set_status(rec, "unreachable", str(exc))
            if previous == "unreachable" and self.on_retry_failed is not None:
                self.on_retry_failed(rec, previous, str(exc))
            log.info(
                "CE %s unreachable (%s); retry %d in %.0f s", rec.site, exc, rec.retry_count, delay
            )
            self._schedule_retry(rec.site, delay)
            return
        except CeBusy as exc:
            # Not the CE's fault nor a configuration problem: wait for its rollback.
            rec.retry_count += 1
            delay = retry_delay(rec.retry_count, self.retry_limit)
            rec.next_attempt = now_text(datetime.now(UTC) + timedelta(seconds=delay))
            self.set_status(rec, "pending", str(exc))
            log.info("CE %s busy (%s); retry %d in %.0f s", rec.site, exc, rec.retry_count, delay)
            self._schedule_retry(rec.site, delay)
            return
        except NotConfirmed as exc:
            self.set_status(rec, "failed", str(exc))
            return
        except CeRefused as exc:
            where = f" at {exc.path}" if exc.path else ""
            self.set_status(rec, "failed", f"the CE refused the configuration: {exc}{where}")
            return
        except Exception as exc:  # a server bug must not kill the worker: report it
            log.exception("provisioning %s failed", rec.site)
            self.set_status(rec, "failed", f"internal error: {exc}")
            return
        rec.retry_count = 0
        rec.next_attempt = None
        self.set_status(rec, status)

    def _schedule_retry(self, site: str, delay: float) -> None:
        old = self._timers.pop(site, None)
        if old is not None:
            old.cancel()

        def fire() -> None:
            self._timers.pop(site, None)
            self.want(site, reset_backoff=False)

        self._timers[site] = asyncio.get_running_loop().call_later(delay, fire)

    async def idle(self) -> None:
        """Wait until no work is running and no retry is scheduled (a CE that stays
        unreachable keeps it busy: bound the wait)."""
        await self._idle.wait()

    async def settle(self) -> None:
        """Wait until no work is running (retries may still be scheduled)."""
        while self._running:
            await asyncio.gather(*list(self._running.values()), return_exceptions=True)

    async def close(self) -> None:
        self._closed = True
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        await stop_tasks(list(self._running.values()))  # again if a cancellation was lost
