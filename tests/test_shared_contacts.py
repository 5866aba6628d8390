"""A CE heard by a server that does not own it (nc_server.shared_contacts): the owner is
told, at most once per CE every few seconds."""

from __future__ import annotations

from nc_server.shared_contacts import CHANNEL, EVERY, ContactNews, ContactTeller


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_owner_is_told_once_per_ce_every_few_seconds() -> None:
    sent: list[tuple[str, str]] = []
    clock = Clock()
    teller = ContactTeller("b", lambda channel, payload: sent.append((channel, payload)), clock)
    assert teller.heard("s1", "192.0.2.1")
    assert not teller.heard("s1", "192.0.2.1")  # a pulling CE logs in again at once
    assert teller.heard("s2", "192.0.2.2")  # another CE is told of at once
    clock.now += EVERY
    assert teller.heard("s1", "192.0.2.1")
    assert [channel for channel, _ in sent] == [CHANNEL] * 3
    assert ContactNews.parse(sent[0][1]) == ContactNews("b", "s1", "192.0.2.1")


def test_a_notification_not_understood_is_none_not_an_exception() -> None:
    for payload in ("", "[]", '{"server": "a"}', "not json"):
        assert ContactNews.parse(payload) is None
