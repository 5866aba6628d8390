"""The call-home dialer's schedule (RFC 8071 Section 4.1, persistent connection): endpoints in
order, back-off between failed rounds, dial again at once when a connection closes,
starting with the endpoint it was connected to.

The dial and the clock are the dialer's two inputs, so they are driven here
directly; the connection over real SSH is tests/test_call_home.py's.
"""

from __future__ import annotations

import asyncio

from nc_core.call_home import FIRST_WAIT, CallHomeDialer, CallHomeEndpoint
from tests.waiting import next_turn

A = CallHomeEndpoint("192.0.2.1", 4334)
B = CallHomeEndpoint("192.0.2.2", 4334)


class FakeConnection:
    """What the dialer uses of an asyncssh connection: wait_closed and abort."""

    def __init__(self) -> None:
        self.closed = asyncio.Event()

    async def wait_closed(self) -> None:
        await self.closed.wait()

    def abort(self) -> None:
        self.closed.set()


class Script:
    """Answers dials from a list of outcomes and records them; sleeps are recorded and
    return at once (a clock the test owns)."""

    def __init__(self, answers: dict[CallHomeEndpoint, list[bool]]) -> None:
        self.answers = answers
        self.dialled: list[CallHomeEndpoint] = []
        self.slept: list[float] = []
        self.connections: list[FakeConnection] = []
        self.progress = asyncio.Event()

    async def dial(self, endpoint: CallHomeEndpoint) -> FakeConnection:
        self.dialled.append(endpoint)
        self.progress.set()
        outcomes = self.answers.get(endpoint, [])
        if not outcomes or not outcomes.pop(0):
            raise OSError(111, "Connection refused")
        conn = FakeConnection()
        self.connections.append(conn)
        return conn

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        await next_turn()

    async def until(self, condition) -> None:  # type: ignore[no-untyped-def]
        while not condition():
            self.progress.clear()
            await asyncio.wait_for(self.progress.wait(), 5)


def run(answers: dict[CallHomeEndpoint, list[bool]], scenario) -> Script:  # type: ignore[no-untyped-def]
    script = Script(answers)

    async def main() -> None:
        dialer = CallHomeDialer(script.dial, sleep=script.sleep)  # type: ignore[arg-type]
        dialer.configure([A, B], max_wait=8)
        try:
            await scenario(dialer, script)
        finally:
            await dialer.close()

    asyncio.run(main())
    return script


def test_the_first_endpoint_that_answers_is_kept() -> None:
    async def scenario(dialer: CallHomeDialer, script: Script) -> None:
        await script.until(lambda: dialer.connected_to is not None)
        assert dialer.connected_to == B

    script = run({A: [False], B: [True]}, scenario)
    assert script.dialled == [A, B]
    assert script.slept == []


def test_rounds_that_fail_are_spaced_by_a_doubling_back_off_up_to_max_wait() -> None:
    async def scenario(dialer: CallHomeDialer, script: Script) -> None:
        await script.until(lambda: len(script.dialled) >= 12)

    script = run({}, scenario)
    assert script.dialled[:6] == [A, B, A, B, A, B]
    assert script.slept[:5] == [FIRST_WAIT, 2 * FIRST_WAIT, 4 * FIRST_WAIT, 8, 8]


def test_a_closed_connection_is_dialled_again_at_once() -> None:
    async def scenario(dialer: CallHomeDialer, script: Script) -> None:
        await script.until(lambda: len(script.connections) == 1)
        script.connections[0].closed.set()
        await script.until(lambda: len(script.connections) == 2)
        assert dialer.connected_to == A
        assert dialer.connections == 2

    script = run({A: [True, True]}, scenario)
    assert script.dialled == [A, A]
    assert script.slept == []


def test_after_a_close_the_endpoint_last_connected_is_dialled_first_then_the_others() -> None:
    """b closed the call (to confirm a change over a new one, or it died): the CE calls b
    again before a, which it left because a did not answer."""

    async def scenario(dialer: CallHomeDialer, script: Script) -> None:
        await script.until(lambda: len(script.connections) == 1)
        script.connections[0].closed.set()  # b cuts the call: b is dialled again at once
        await script.until(lambda: len(script.connections) == 2)
        assert dialer.connected_to == B
        script.connections[1].closed.set()  # b dies: b refuses, a answers
        await script.until(lambda: len(script.connections) == 3)
        assert dialer.connected_to == A

    script = run({A: [False, True], B: [True, True]}, scenario)
    assert script.dialled == [A, B, B, B, A]
    assert script.slept == []


def test_after_a_success_the_back_off_starts_again_from_the_first_wait() -> None:
    async def scenario(dialer: CallHomeDialer, script: Script) -> None:
        await script.until(lambda: len(script.connections) == 1)
        script.connections[0].closed.set()
        await script.until(lambda: len(script.slept) >= 2)

    # A, B fail; wait 1; A answers; closed; A, B fail; wait 1 again.
    script = run({A: [False, True, False]}, scenario)
    assert script.slept[:2] == [FIRST_WAIT, FIRST_WAIT]


def test_new_endpoints_close_the_open_connection_and_start_over() -> None:
    C = CallHomeEndpoint("192.0.2.3", 4334)

    async def scenario(dialer: CallHomeDialer, script: Script) -> None:
        await script.until(lambda: len(script.connections) == 1)
        first = script.connections[0]
        dialer.configure([C], max_wait=8)
        await script.until(lambda: dialer.connected_to == C)
        assert first.closed.is_set()

    run({A: [True], C: [True]}, scenario)


def test_the_same_endpoints_again_change_nothing() -> None:
    async def scenario(dialer: CallHomeDialer, script: Script) -> None:
        await script.until(lambda: len(script.connections) == 1)
        dialer.configure([A, B], max_wait=8)
        await next_turn()
        assert not script.connections[0].closed.is_set()
        assert dialer.connections == 1

    run({A: [True]}, scenario)
