"""Online password guessing: delayed per address, capped per connection, logged, and the same
cost for a user who does not exist (nc_core.ssh_auth).

The policy's arithmetic runs on a fake clock and a fake sleep; the SSH
behaviour against a real cevpn-server with a real SSH client (asyncssh).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from nc_core import ssh_auth
from nc_core.asyncssh_import import asyncssh
from nc_core.ssh_auth import GuessPolicy, PasswordGuard
from nc_core.users import User, hash_password
from tests.netconf_server import ADMIN, ServerProcess, running_server

USER = User("alice", hash_password("right-password"))


class FakeTime:
    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def guard(**policy: float) -> tuple[PasswordGuard, FakeTime]:
    fake = FakeTime()
    return PasswordGuard(GuessPolicy(**policy), clock=fake.clock, sleep=fake.sleep), fake  # type: ignore[arg-type]


def attempts(g: PasswordGuard, n: int, source: str = "198.51.100.7") -> list[bool]:
    async def run() -> list[bool]:
        return [await g.check(USER, "wrong", source) for _ in range(n)]

    return asyncio.run(run())


def test_the_first_failures_from_an_address_are_answered_at_once():
    g, fake = guard(free_failures=3)
    assert attempts(g, 3) == [False] * 3
    assert fake.slept == []


def test_the_delay_doubles_with_each_further_failure_up_to_the_cap():
    g, fake = guard(free_failures=3, base_delay=1.0, max_delay=8.0)
    attempts(g, 9)
    assert fake.slept == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]


def test_the_right_password_waits_too_once_an_address_is_suspect():
    g, fake = guard(free_failures=1, base_delay=2.0)
    attempts(g, 2)

    async def right() -> bool:
        return await g.check(USER, "right-password", "198.51.100.7")

    assert asyncio.run(right()) is True
    assert fake.slept[-1] == 4.0  # not answered sooner because it is right


def test_failures_are_forgotten_after_the_window():
    g, fake = guard(free_failures=1, window=600.0)
    attempts(g, 3)
    assert g.delay("198.51.100.7") > 0
    fake.now += 601 + sum(fake.slept)
    assert g.delay("198.51.100.7") == 0


def test_other_addresses_are_not_delayed():
    g, fake = guard(free_failures=1)
    attempts(g, 4, source="198.51.100.7")
    slept = list(fake.slept)
    attempts(g, 1, source="203.0.113.9")
    assert fake.slept == slept


def test_a_success_does_not_wipe_an_addresses_failures():
    g, _ = guard(free_failures=1)
    attempts(g, 3)
    before = g.recent_failures("198.51.100.7")

    async def right() -> bool:
        return await g.check(USER, "right-password", "198.51.100.7")

    assert asyncio.run(right())
    assert g.recent_failures("198.51.100.7") == before


def test_attempts_from_one_address_are_answered_one_at_a_time():
    g, fake = guard(free_failures=0, base_delay=1.0, max_delay=64.0)
    order: list[str] = []

    async def one(tag: str) -> None:
        await g.check(USER, "wrong", "198.51.100.7")
        order.append(tag)

    async def run() -> None:
        await asyncio.gather(*(one(str(i)) for i in range(4)))

    asyncio.run(run())
    # Each waited for the one before: the delays grew one by one instead of all four
    # attempts sharing the first delay.
    assert fake.slept == [1.0, 2.0, 4.0, 8.0]
    assert order == ["0", "1", "2", "3"]


def test_an_unknown_user_costs_a_hash_like_a_known_one(monkeypatch):
    g, _ = guard()
    checked: list[str] = []
    real = ssh_auth.check_password

    def spy(password: str, stored: str) -> bool:
        checked.append(stored[:3])
        return real(password, stored)

    monkeypatch.setattr(ssh_auth, "check_password", spy)

    async def run() -> list[bool]:
        key_only = User("bob", None)
        return [
            await g.check(None, "x", "192.0.2.1"),
            await g.check(key_only, "x", "192.0.2.2"),
            await g.check(USER, "x", "192.0.2.3"),
        ]

    assert asyncio.run(run()) == [False, False, False]
    assert checked == ["$6$", "$6$", "$6$"]


def test_the_number_of_addresses_remembered_is_bounded():
    g, _ = guard(max_tracked=100)
    for i in range(500):
        attempts(g, 1, source=f"10.0.{i // 256}.{i % 256}")
    assert len(g._sources) <= 100


# -- over SSH ------------------------------------------------------------------------------


class Guesser(asyncssh.SSHClient):
    def __init__(self, passwords: list[str]) -> None:
        self.passwords = passwords
        self.tried = 0

    def password_auth_requested(self) -> str | None:
        if self.tried >= len(self.passwords):
            return None
        self.tried += 1
        return self.passwords[self.tried - 1]


async def login(server: ServerProcess, user: str, passwords: list[str]) -> tuple[bool, int]:
    """(authenticated, passwords tried) on one connection."""
    client = Guesser(passwords)
    try:
        conn = await asyncssh.connect(
            server.host,
            server.port,
            username=user,
            known_hosts=None,
            client_factory=lambda: client,
            client_keys=None,
            preferred_auth="password",
            agent_path=None,
        )
    except (asyncssh.PermissionDenied, asyncssh.DisconnectError, ConnectionError):
        return False, client.tried
    conn.close()
    return True, client.tried


@pytest.fixture
def server(tmp_path: Path):  # type: ignore[no-untyped-def]
    (tmp_path / "x").mkdir()
    with running_server(tmp_path / "x") as srv:
        yield srv


def test_a_connection_is_closed_after_three_wrong_passwords(server):
    ok, tried = asyncio.run(login(server, ADMIN[0], [f"guess-{i}" for i in range(10)]))
    assert not ok
    assert tried <= 4  # the client may have sent a fourth before it read the disconnect
    summary = "closed before authenticating as 'admin' (3 passwords, 0 public keys refused)"
    deadline = time.monotonic() + 30
    while summary not in server.log_path.read_text():
        assert time.monotonic() < deadline, server.log_path.read_text()[-2000:]
        time.sleep(0.05)


def test_each_failure_is_logged_with_user_and_address_never_the_password(server):
    asyncio.run(login(server, "no-such-user", ["Sup3r-Secret-Guess"]))
    asyncio.run(login(server, ADMIN[0], ["another-Secret-Guess"]))
    deadline = time.monotonic() + 30
    while "no-such-user" not in server.log_path.read_text():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    text = server.log_path.read_text()
    assert "authentication failed: user 'no-such-user' from 127.0.0.1" in text
    assert f"authentication failed: user '{ADMIN[0]}' from 127.0.0.1" in text
    assert "Secret-Guess" not in text


def test_guesses_past_the_free_ones_are_slowed_down_and_the_right_password_still_works(server):
    policy = GuessPolicy()

    async def run() -> tuple[float, bool]:
        await login(server, ADMIN[0], ["wrong"] * policy.free_failures)  # the free ones
        await login(server, ADMIN[0], ["wrong"])
        started = time.monotonic()
        ok, _ = await login(server, ADMIN[0], [ADMIN[1]])
        return time.monotonic() - started, ok

    waited, ok = asyncio.run(run())
    assert ok
    assert waited >= policy.base_delay  # answered only after this address's delay
