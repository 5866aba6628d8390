"""Who gets in over SSH, and how fast a guesser may try (RFC 4252 policy, RFC 7317 accounts).

A NETCONF server of cevpn's holds the keys of an SP's customers, and the
accounts it authenticates are RFC 7317 users (password as an iana-crypt-hash,
authorized SSH keys).  Without a policy a single SSH connection could try
~480 passwords a second, forever, and a failed login for an existing user
took 3.8 ms against 0.8 ms for an unknown name, so names could be listed.
The policy here:

- **Per connection:** after ``per_connection`` wrong passwords the connection
  is disconnected (OpenSSH's MaxAuthTries).
- **Per source address:** every password attempt from an address with
  recent failures waits first, whatever the password: the wait doubles with
  each failure past ``free_failures`` within ``window`` seconds, up to
  ``max_delay``; and attempts from one address are answered one at a time,
  so opening many connections does not multiply the rate.  Waiting before
  answering a right password too is what makes the delay a brake: an
  attacker cannot cut a failure short by timing out.  A successful login
  does not wipe an address's failures (a valid account must not open the
  door to guessing another).  Keys never wait: they cannot be guessed.
- **No user enumeration:** a password for an unknown user, or a user with no
  password, is checked against a dummy hash of the same kind (SHA-512 crypt,
  what this server stores), so the failure costs the same time.
- **Logged:** each failure with the user name and source address, never
  the password; each success with the method.

The clock and the sleep are injectable so tests drive the policy without waiting.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from nc_core.users import User, check_password, hash_password

log = logging.getLogger("cevpn.netconf.auth")


@dataclass
class GuessPolicy:
    """The numbers of the policy above (docs/security.md explains the choice)."""

    per_connection: int = 3
    """Wrong passwords one SSH connection may try before it is disconnected."""
    free_failures: int = 3
    """Failures from one address within the window answered without delay."""
    base_delay: float = 1.0
    """Delay after the first failure past the free ones, in seconds; doubles each time."""
    max_delay: float = 30.0
    window: float = 900.0
    """Seconds a failure counts against its address."""
    max_tracked: int = 10_000
    """Addresses remembered at most (the oldest are forgotten first)."""


@dataclass
class _Source:
    failures: deque[float] = field(default_factory=deque)
    turn: asyncio.Lock = field(default_factory=asyncio.Lock)


class PasswordGuard:
    """Checks passwords under :class:`GuessPolicy`; one per server."""

    def __init__(
        self,
        policy: GuessPolicy | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.policy = policy or GuessPolicy()
        self.clock = clock
        self.sleep = sleep
        self._sources: OrderedDict[str, _Source] = OrderedDict()
        # The same algorithm and cost as the hashes this server writes (hash_password).
        self._dummy_hash = hash_password(secrets.token_urlsafe(24))
        self.failures = 0
        """Failed password attempts since start (for monitoring)."""

    def recent_failures(self, source: str) -> int:
        entry = self._sources.get(source)
        if entry is None:
            return 0
        self._expire(entry)
        return len(entry.failures)

    def delay(self, source: str) -> float:
        """How long the next password attempt from ``source`` waits before it is answered."""
        excess = self.recent_failures(source) - self.policy.free_failures
        if excess < 0:
            return 0.0
        return float(min(self.policy.base_delay * (2**excess), self.policy.max_delay))

    async def check(self, user: User | None, password: str, source: str) -> bool:
        """Is ``password`` right for ``user`` (None: no such account)?  Waits the source's
        delay first and serialises the source's attempts; records a failure."""
        entry = self._entry(source)
        async with entry.turn:
            wait = self.delay(source)
            if wait > 0:
                await self.sleep(wait)
            stored = user.password if user is not None and user.password else None
            # The same work whether or not the account (or its password) exists.
            ok = await asyncio.to_thread(check_password, password, stored or self._dummy_hash)
            ok = ok and stored is not None
            if not ok:
                entry.failures.append(self.clock())
                self.failures += 1
            return ok

    def _entry(self, source: str) -> _Source:
        entry = self._sources.get(source)
        if entry is None:
            entry = self._sources[source] = _Source()
            while len(self._sources) > self.policy.max_tracked:
                oldest, old = next(iter(self._sources.items()))
                if old.turn.locked():
                    break
                del self._sources[oldest]
        else:
            self._sources.move_to_end(source)
        return entry

    def _expire(self, entry: _Source) -> None:
        horizon = self.clock() - self.policy.window
        while entry.failures and entry.failures[0] < horizon:
            entry.failures.popleft()
