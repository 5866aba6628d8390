"""One tunnel, one IKE_SA: which duplicate IKE_SAs this end deletes (seed 3.4).

When both CEs of a pair negotiate at the same time, each completes the IKE_SA
it initiated *and* answers the other's: two IKE_SAs, each with its CHILD_SA,
and traffic sent on one and received on the other.  strongSwan does not
resolve this by itself: RFC 7296 has no rule for crossing IKE_SA_INITs, its
``unique = keep`` still admits a second IKE_SA from the same address (it could
be a reauthentication), and ``unique = replace`` run by both responders at once
can delete both.  The agent avoids starting the second negotiation (the lower
address initiates, the other waits and looks first: nc_agent.ike.manager), but
an IKE_SA_INIT already on the wire cannot be called back, so once both are up
the ends converge by a rule they evaluate alike without talking to each other:

- only IKE_SAs that are ESTABLISHED with an INSTALLED CHILD_SA take part (one
  still negotiating may yet fail; deleting a working one for it would be wrong);
- the one to keep is the one the lower-addressed end initiated, and among
  several of those (or none) the one with the lowest initiator SPI, then
  responder SPI: the SPIs are the same numbers on both ends;
- each end deletes only the other IKE_SAs *it initiated*, with a delete
  exchange: every duplicate is deleted exactly once, by one end, so the two
  ends never delete crossing pairs and lose both.

Pure logic on charon's list-sas entries, so it is tested without a charon.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _spi(value: Any) -> int:
    try:
        return int(_text(value), 16)
    except ValueError:
        return 0


def carries_traffic(sa: Mapping[Any, Any]) -> bool:
    """ESTABLISHED with at least one INSTALLED CHILD_SA."""
    children = sa.get("child-sas", {})
    installed = isinstance(children, Mapping) and any(
        _text(c.get("state")) == "INSTALLED" for c in children.values()
    )
    return _text(sa.get("state")) == "ESTABLISHED" and installed


def initiated_here(sa: Mapping[Any, Any]) -> bool:
    return _text(sa.get("initiator")) == "yes"


def keeper(sas: Sequence[Mapping[Any, Any]], leader: bool) -> Mapping[Any, Any] | None:
    """The IKE_SA both ends keep among those carrying traffic (``leader``: this end has
    the lower SP address); None if there are none."""
    working = [sa for sa in sas if carries_traffic(sa)]
    if not working:
        return None

    def rank(sa: Mapping[Any, Any]) -> tuple[bool, int, int]:
        by_leader = initiated_here(sa) == leader
        return (not by_leader, _spi(sa.get("initiator-spi")), _spi(sa.get("responder-spi")))

    return min(working, key=rank)


def to_delete(sas: Sequence[Mapping[Any, Any]], leader: bool) -> list[str]:
    """The unique ids of the IKE_SAs of one connection this end deletes as duplicates."""
    keep = keeper(sas, leader)
    if keep is None:
        return []
    return [
        _text(sa.get("uniqueid"))
        for sa in sas
        if sa is not keep and carries_traffic(sa) and initiated_here(sa)
    ]
