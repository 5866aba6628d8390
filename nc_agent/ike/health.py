"""The life of one IKE tunnel as the operator sees it: status, failures, retries, alarm.

Pure state, no daemon and no clock of its own: the IKE manager feeds it what
charon reports (an attempt failed, the CHILD_SA came up, the tunnel went
down) with the time, and it answers what the seed asks for next (3.4): when
to try again, and whether an alarm must be raised or cleared.  Status values
are cevpn-types tunnel-status.

Only failures of attempts this CE initiated count towards the back-off: a
failed attempt by the peer is the peer's own schedule, and is only recorded
as the last error so the operator sees it on both ends.  A failure because
the peer does not know this CE yet is counted, but is not a back-off step
(nc_agent.ike.retry): `failures` counts every failure (the retry-count),
`steps` only those that move the back-off.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from nc_agent.ike.retry import RetryPolicy

ALARM_TYPE = "cevpn-types:tunnel-establishment-failure"


@dataclass(frozen=True)
class Failure:
    """What to do after a failed attempt."""

    delay: float
    """Seconds until the next attempt (seed 3.4 schedule)."""
    raise_alarm: bool
    """The back-off reached its limit just now: raise the alarm (once)."""


@dataclass
class TunnelHealth:
    permanent: bool
    policy: RetryPolicy
    status: str = "down"
    since: datetime | None = None
    failures: int = 0
    steps: int = 0
    """Failures that moved the back-off (all but the peer-unprovisioned ones)."""
    failing_since: datetime | None = None
    """The first failure of the current run of failures."""
    next_attempt: datetime | None = None
    last_error: str | None = None
    last_error_at: datetime | None = None
    alarm_raised_at: datetime | None = None
    established_at: datetime | None = None

    def _set(self, status: str, now: datetime) -> bool:
        changed = status != self.status
        if changed:
            self.status = status
            self.since = now
        return changed

    def idle(self, now: datetime) -> bool:
        """Armed and waiting: permanent ones are about to be initiated, traffic-driven ones
        wait for their first packet.  True if the status changed."""
        self.next_attempt = None
        return self._set("connecting" if self.permanent else "waiting-for-traffic", now)

    def attempt(self, now: datetime) -> bool:
        """This CE starts a negotiation; a tunnel already up stays 'up' (a second attempt,
        started before its up event arrived, only ever duplicates a working CHILD_SA)."""
        self.next_attempt = None
        if self.status == "up":
            return False
        return self._set("connecting", now)

    def failed(self, now: datetime, reason: str, *, unprovisioned: bool = False) -> Failure | None:
        """An attempt this CE initiated failed (refused, authentication failed, no answer);
        ``unprovisioned``: the peer answered as one without a configuration for this CE.

        None when the back-off is already running: an attempt nobody scheduled (a
        packet hit a trap, or both the agent and a trap started one) failed too; it
        is recorded but does not move the schedule."""
        self.last_error, self.last_error_at = reason, now
        if self.next_attempt is not None:
            return None
        self.failures += 1
        if self.failing_since is None:
            self.failing_since = now
        if unprovisioned:
            refused_for = (now - self.failing_since).total_seconds()
            delay = self.policy.unprovisioned_delay(refused_for)
            alarm = self.policy.unprovisioned_alarm(refused_for)
        else:
            self.steps += 1
            delay = self.policy.delay(self.steps)
            alarm = self.policy.alarm(self.steps)
        self.next_attempt = now + timedelta(seconds=delay)
        self._set("failed" if alarm else "retrying", now)
        first = alarm and self.alarm_raised_at is None
        if first:
            self.alarm_raised_at = now
        return Failure(delay, first)

    def peer_failed(self, now: datetime, reason: str) -> None:
        """The peer's attempt failed here: recorded, not counted."""
        self.last_error, self.last_error_at = reason, now

    def up(self, now: datetime) -> tuple[bool, bool]:
        """The CHILD_SA is installed: (status changed, alarm to clear)."""
        self.failures = self.steps = 0
        self.failing_since = None
        self.next_attempt = None
        self.established_at = now
        clear = self.alarm_raised_at is not None
        self.alarm_raised_at = None
        return self._set("up", now), clear

    def down(self, now: datetime, reason: str) -> bool:
        """An established tunnel went down (DPD, delete from the peer, idle, daemon gone)."""
        self.last_error, self.last_error_at = reason, now
        self.established_at = None
        return self._set("down", now)

    @property
    def alarm(self) -> bool:
        return self.alarm_raised_at is not None
