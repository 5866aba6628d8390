"""When a CE tries again after a refused or failed SA negotiation (seed 3.4).

"...wait for a time interval larger than a certain minimum value ... After
a new failure, the CE device SHOULD retry after a certain period of time (t1)
... with exponential backoff of t1 until a certain limit upon which an alarm
MUST trigger human interaction."  With the cevpn-types retry-policy:
failure 1 waits minimum-wait, failure 2 waits t1, failure n > 2 waits
t1 x backoff-factor^(n-2); once that interval reaches the limit the alarm is
raised and retries go on every `limit` seconds until the tunnel comes up
(with a factor of 1, once the retries at t1 have lasted the limit).

One failure is not a step of that back-off: a peer that answers IKE_SA_INIT as
one without a configuration for this CE (nc_agent.ike.reasons.NOT_PROVISIONED)
is usually still being provisioned by the VPN server, and will be within
seconds.  Waiting t1 x factor^n for it would keep the tunnel down long after
both ends are configured, so such a failure is retried after minimum-wait;
only once such refusals have gone on for `limit` seconds is the alarm raised
and the retries slow to every `limit` seconds.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class RetryPolicy:
    minimum_wait: float = 5.0
    t1: float = 10.0
    backoff_factor: float = 2.0
    limit: float = 600.0

    @classmethod
    def from_yang(cls, policy: Mapping[str, Any]) -> RetryPolicy:
        """From a cevpn-types retry-policy container (RFC 7951 JSON, defaults included)."""
        return cls(
            minimum_wait=float(policy["minimum-wait"]),
            t1=float(policy["t1"]),
            backoff_factor=float(policy["backoff-factor"]),
            limit=float(policy["limit"]),
        )

    def delay(self, failures: int) -> float:
        """Seconds to wait after the ``failures``-th consecutive failure (1-based)."""
        if failures < 1:
            raise ValueError("no failure, no wait")
        if failures == 1:
            return min(self.minimum_wait, self.limit)
        interval = self.t1 * self.backoff_factor ** (failures - 2)
        return min(interval, self.limit)

    def alarm(self, failures: int) -> bool:
        """Has the back-off reached the limit, so that a human must act (seed 3.4)?

        With a back-off factor of 1 the interval never grows; the alarm is then
        raised once the retries at t1 have taken as long as the limit."""
        if failures < 2:
            return False
        if self.backoff_factor <= 1.0:
            return self.t1 >= self.limit or (failures - 1) * self.t1 >= self.limit
        return self.t1 * self.backoff_factor ** (failures - 2) >= self.limit

    def unprovisioned_delay(self, refused_for: float) -> float:
        """Seconds to wait after the peer refused this CE as unknown, ``refused_for``
        seconds after the first failure of this run of failures: minimum-wait, not a
        back-off step, until the refusals have lasted the limit; then the limit."""
        if refused_for >= self.limit:
            return self.limit
        return min(self.minimum_wait, self.limit)

    def unprovisioned_alarm(self, refused_for: float) -> bool:
        """Has the peer refused this CE as unknown for as long as the limit?"""
        return refused_for >= self.limit

    def schedule(self, failures: int) -> list[float]:
        """The waits after failures 1..``failures`` (for operators and tests)."""
        return [self.delay(n) for n in range(1, failures + 1)]
