"""One tunnel, one IKE_SA: which IKE_SAs an end deletes when both ends negotiated at once.

The entries are shaped like charon's list-sas answer (values as text); each test
looks at the SAME pair of IKE_SAs from both ends, as the rule must give both
ends one answer without their talking to each other.
"""

from __future__ import annotations

from typing import Any

from nc_agent.ike.duplicates import keeper, to_delete


def ike_sa(
    uid: str,
    *,
    initiator: bool,
    spi_i: str,
    spi_r: str,
    child: str = "INSTALLED",
    state: str = "ESTABLISHED",
) -> dict[str, Any]:
    return {
        "uniqueid": uid,
        "state": state,
        "initiator": "yes" if initiator else "no",
        "initiator-spi": spi_i,
        "responder-spi": spi_r,
        "child-sas": {f"c{uid}": {"state": child}} if child else {},
    }


# The same two IKE_SAs seen from the lower-addressed end (the leader, L) and the other (F):
# "led" was initiated by L, "followed" by F.  Unique ids are each end's own numbering.
AT_LEADER = [
    ike_sa("1", initiator=True, spi_i="9a00000000000001", spi_r="0000000000000002"),
    ike_sa("2", initiator=False, spi_i="0100000000000003", spi_r="0000000000000004"),
]
AT_FOLLOWER = [
    ike_sa("7", initiator=False, spi_i="9a00000000000001", spi_r="0000000000000002"),
    ike_sa("8", initiator=True, spi_i="0100000000000003", spi_r="0000000000000004"),
]


def test_both_ends_keep_the_ike_sa_the_lower_address_initiated() -> None:
    assert keeper(AT_LEADER, leader=True) is AT_LEADER[0]
    assert keeper(AT_FOLLOWER, leader=False) is AT_FOLLOWER[0]


def test_only_the_end_that_initiated_the_duplicate_deletes_it() -> None:
    assert to_delete(AT_FOLLOWER, leader=False) == ["8"]
    assert to_delete(AT_LEADER, leader=True) == []


def test_among_ike_sas_the_same_end_initiated_the_lowest_spis_are_kept() -> None:
    mine = [
        ike_sa("4", initiator=True, spi_i="00000000000000f0", spi_r="0000000000000001"),
        ike_sa("3", initiator=True, spi_i="000000000000000f", spi_r="0000000000000002"),
    ]
    theirs = [{**sa, "initiator": "no", "uniqueid": f"1{sa['uniqueid']}"} for sa in mine]
    assert to_delete(mine, leader=True) == ["4"]
    assert to_delete(theirs, leader=False) == []


def test_an_ike_sa_still_negotiating_is_neither_kept_nor_deleted() -> None:
    sas = [
        AT_FOLLOWER[0],
        ike_sa("8", initiator=True, spi_i="01", spi_r="00", state="CONNECTING", child=""),
    ]
    assert to_delete(sas, leader=False) == []


def test_an_ike_sa_without_an_installed_child_sa_does_not_replace_a_working_one() -> None:
    """The follower's own IKE_SA carries traffic; the leader's has no CHILD_SA (yet)."""
    sas = [
        ike_sa("7", initiator=False, spi_i="01", spi_r="02", child=""),
        ike_sa("8", initiator=True, spi_i="03", spi_r="04"),
    ]
    assert to_delete(sas, leader=False) == []


def test_a_single_ike_sa_is_never_deleted() -> None:
    assert to_delete(AT_FOLLOWER[1:], leader=False) == []
    assert to_delete([], leader=True) == []
