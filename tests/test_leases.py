"""The rules of CE ownership (nc_server.leases): rendezvous, the plan of changes, fencing.

Plain data and a controllable clock: no database, no server.
"""

from __future__ import annotations

from collections import Counter

import pytest

from nc_server.leases import Calls, Fenced, LeaseTimes, LocalLease, Owner, owner_of, plan, winner


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


SITES = [f"site-{n}" for n in range(600)]


def test_rendezvous_spreads_the_ces_evenly_and_every_server_computes_the_same_owner() -> None:
    servers = ["a", "b", "c"]
    owners = {site: owner_of(site, servers) for site in SITES}
    assert owners == {site: owner_of(site, list(reversed(servers))) for site in SITES}
    shares = Counter(owners.values())
    assert set(shares) == set(servers)
    assert all(150 <= n <= 250 for n in shares.values()), shares
    assert owner_of("x", []) is None


def test_a_server_joining_takes_only_its_share_and_one_leaving_moves_only_its_own() -> None:
    before = {site: owner_of(site, ["a", "b"]) for site in SITES}
    joined = {site: owner_of(site, ["a", "b", "c"]) for site in SITES}
    moved = [site for site in SITES if before[site] != joined[site]]
    assert all(joined[site] == "c" for site in moved)
    assert 150 <= len(moved) <= 250
    left = {site: owner_of(site, ["a", "c"]) for site in SITES}
    assert all(left[site] == joined[site] for site in SITES if joined[site] != "b")


def test_the_ces_of_a_dead_server_go_to_the_live_ones_with_their_epoch_plus_one() -> None:
    rows = {site: Owner("dead" if n % 2 else "a", 3) for n, site in enumerate(SITES[:40])}
    changes = plan("a", rows, ["a", "b"], SITES[:40])
    taken = {c.site: c for c in changes if c.reason == "takeover"}
    # a also hands over its own CEs that b wins now.
    assert all(c.reason == "handover" and c.server == "b" for c in changes if c.site not in taken)
    assert set(taken) == {site for site, row in rows.items() if row.server == "dead"}
    for site, change in taken.items():
        assert change.reason == "takeover" and change.previous == "dead"
        assert change.epoch == 4
        assert change.server == owner_of(site, ["a", "b"])
    assert {c.server for c in changes} == {"a", "b"}


def test_new_ces_get_their_rendezvous_owner_and_unknown_rows_are_left_alone() -> None:
    rows = {"gone": Owner("b", 1)}
    changes = plan("a", rows, ["a", "b"], ["n1", "n2", "n3"])
    assert [(c.site, c.reason, c.epoch, c.previous) for c in changes] == [
        ("n1", "new", 1, None),
        ("n2", "new", 1, None),
        ("n3", "new", 1, None),
    ]
    assert all(c.server == owner_of(c.site, ["a", "b"]) for c in changes)


def test_a_server_hands_over_what_another_now_wins_but_never_a_ce_with_a_push_in_flight() -> None:
    rows = {site: Owner("a", 1) for site in SITES[:30]}
    winners = {site: owner_of(site, ["a", "b"]) for site in rows}
    to_b = sorted(site for site, w in winners.items() if w == "b")
    busy = {to_b[0]}
    changes = plan("a", rows, ["a", "b"], rows, busy=busy)
    assert sorted(c.site for c in changes) == to_b[1:]
    assert all(c.reason == "handover" and c.server == "b" and c.epoch == 2 for c in changes)
    # b never takes a live server's CE itself: a's release is the handover.
    assert plan("b", rows, ["a", "b"], rows) == []


def test_a_call_home_ce_is_owned_by_the_server_it_called_not_by_its_rendezvous_winner() -> None:
    sites = SITES[:40]
    # Every CE called b: new ones are b's, whatever rendezvous says; a dialled one is not.
    calls = Calls(call_home=sites, held={site: {"b"} for site in sites})
    changes = plan("a", {}, ["a", "b"], [*sites, "dialled"], calls=calls)
    assert {c.site: c.server for c in changes if c.site != "dialled"} == dict.fromkeys(sites, "b")
    assert [c.server for c in changes if c.site == "dialled"] == [owner_of("dialled", ["a", "b"])]
    # One nobody called yet goes to its rendezvous winner, and stays there while no live
    # server holds its connection (a dead server's record does not count).
    alone = Calls(call_home=sites, held={site: {"c"} for site in sites})
    assert [c.server for c in plan("a", {}, ["a", "b"], sites[:1], calls=alone)] == [
        owner_of(sites[0], ["a", "b"])
    ]
    rows = {site: Owner("a", 3) for site in sites}
    assert plan("a", rows, ["a", "b"], sites, calls=alone) == []
    assert plan("a", rows, ["a", "b"], sites, calls=Calls(call_home=sites)) == []
    assert winner(sites[0], ["a", "b"], alone) is None


def test_a_call_home_ces_owner_hands_it_over_only_without_a_live_call_or_a_push() -> None:
    sites = SITES[:10]
    rows = {site: Owner("a", 3) for site in sites}
    # The CE called b (a's connection died): a hands every one over, but the one being pushed.
    moved = Calls(call_home=sites, held={site: {"b"} for site in sites})
    changes = plan("a", rows, ["a", "b"], sites, busy={sites[0]}, calls=moved)
    assert [c.site for c in changes] == sites[1:]
    assert all(c.server == "b" and c.epoch == 4 and c.reason == "handover" for c in changes)
    # a still holds a live connection from the CE (b's record may be of a call a has not
    # seen end yet, or the CE's redial): a keeps it, even if a's own record lags.
    both = Calls(call_home=sites, held={site: {"a", "b"} for site in sites}, mine=sites)
    assert plan("a", rows, ["a", "b"], sites, calls=both) == []
    lagging = Calls(call_home=sites, held={site: {"b"} for site in sites}, mine=sites)
    assert plan("a", rows, ["a", "b"], sites, calls=lagging) == []
    # b never takes it from live a itself, not even holding the connection.
    b_holds = Calls(call_home=sites, held={site: {"b"} for site in sites}, mine=sites)
    assert plan("b", rows, ["a", "b"], sites, calls=b_holds) == []
    # A dead owner's call-home CE goes to the server it called, with the epoch + 1.
    taken = plan("b", rows, ["b", "c"], sites, calls=b_holds)
    assert {(c.server, c.epoch, c.reason) for c in taken} == {("b", 4, "takeover")}
    # ... and to the rendezvous winner when it called nobody (yet).
    taken = plan("b", rows, ["b", "c"], sites, calls=Calls(call_home=sites))
    assert all(c.server == owner_of(c.site, ["b", "c"]) for c in taken)


def test_a_lease_is_valid_from_the_sending_of_its_renewal_minus_the_margin() -> None:
    clock = Clock()
    times = LeaseTimes(ttl=4.0, renew=1.0, margin=1.0, grace=1.0)
    lease = LocalLease(times, clock)
    assert not lease.valid()  # never renewed
    sent = lease.sending()
    clock.now += 0.8  # the database answered 0.8 s later: the lease still counts from `sent`
    lease.renewed(sent)
    assert lease.valid()
    clock.now = sent + 2.99
    assert lease.valid()
    clock.now = sent + 3.0  # ttl - margin after sending: stop, a second before expiry
    assert not lease.valid()
    # An older renewal answered late never shortens nor extends past a newer one.
    lease.renewed(sent - 5)
    assert not lease.valid()


def test_a_renewal_that_makes_a_lapsed_lease_valid_again_is_counted_as_a_revival() -> None:
    """The ownership round goes over every CE again when it sees the count change: pushes
    were refused while the lease had lapsed (whichever thread renewed it back)."""
    clock = Clock()
    lease = LocalLease(LeaseTimes(ttl=4.0, renew=1.0, margin=1.0, grace=1.0), clock)
    lease.renewed(lease.sending())
    assert lease.revivals == 1  # the first renewal: nothing was valid before
    clock.now += 1
    lease.renewed(lease.sending())
    assert lease.revivals == 1  # renewed while valid
    clock.now += 5
    stale = clock.now - 3.5  # answered too late to make it valid
    lease.renewed(stale)
    assert lease.revivals == 1 and not lease.valid()
    lease.renewed(lease.sending())
    assert lease.revivals == 2
    lease.lapse()
    lease.renewed(lease.sending())
    assert lease.revivals == 3


def test_fencing_leaves_margin_and_grace_between_the_last_push_and_a_takeover() -> None:
    """Whatever the database's delay, the last moment the old owner may send is at least
    margin + grace before the earliest moment the database lets another take over."""
    times = LeaseTimes()
    for delay in (0.0, 0.3, 0.99):
        clock = Clock()
        lease = LocalLease(times, clock)
        sent = lease.sending()
        database_now = clock.now + delay  # the expiry is set at the database's now()
        lease.renewed(sent)
        last_push = lease.valid_until
        takeover = database_now + times.ttl + times.grace
        assert takeover - last_push >= times.margin + times.grace


def test_lease_times_are_checked_and_overridable_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with pytest.raises(ValueError):
        LeaseTimes(ttl=2.0, renew=1.0, margin=1.0)
    with pytest.raises(ValueError):
        LeaseTimes(stall=0)
    monkeypatch.setenv("CEVPN_LEASE_TTL", "8")
    monkeypatch.setenv("CEVPN_LEASE_GRACE", "2")
    monkeypatch.setenv("CEVPN_LEASE_STALL", "30")
    assert LeaseTimes.from_environment() == LeaseTimes(ttl=8.0, grace=2.0, stall=30.0)


def test_the_shared_ownership_refuses_a_push_without_a_valid_lease_or_at_another_epoch() -> None:
    from nc_server.ownership import SharedOwnership

    clock = Clock()
    own = SharedOwnership(
        None,  # type: ignore[arg-type]  # no renewal runs here
        "a",
        known_sites=list,
        busy=list,
        changed=lambda gained, lost: None,
        times=LeaseTimes(),
        clock=clock,
    )
    own.owned = {"s1": 2}
    assert own.epoch("s1") is None  # no lease yet
    with pytest.raises(Fenced):
        own.check("s1", 2)
    own.lease.renewed(own.lease.sending())
    assert own.epoch("s1") == 2 and own.epoch("s2") is None
    own.check("s1", 2)
    with pytest.raises(Fenced):
        own.check("s1", 1)  # the push began under an older epoch
    clock.now += 3.5  # no renewal since: the lease may run out soon, pushes stop
    with pytest.raises(Fenced):
        own.check("s1", 2)
    assert own.epoch("s1") is None


def test_the_keepalive_does_not_renew_for_an_event_loop_that_stopped_turning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A hung loop loses its lease (its CEs go to the other servers); the keep-alive
    does not even reach for the database while the heartbeat is older than ``stall``."""
    from nc_server.lease_keepalive import LeaseKeepAlive

    clock = Clock()
    times = LeaseTimes(stall=5.0)
    lease = LocalLease(times, clock)
    keepalive = LeaseKeepAlive("postgresql://nobody@192.0.2.1/none", "a", lease, times, clock)
    keepalive.beat()
    clock.now += 5.5
    with caplog.at_level("INFO", logger="cevpn.ownership"):
        assert keepalive.renew_once() is None
        assert keepalive.renew_once() is None
    assert keepalive._conn is None
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "event loop has not turned for 5.5 s" in warnings[0]
