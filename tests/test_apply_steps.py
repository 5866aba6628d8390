"""The agent's generic apply loop (nc_agent.apply_steps): order, undo, start-up.

The steps here record what they are asked to do; the real kernel, edge and IKE steps
are exercised in the lab (tests/lab: refused changes, kill -9 mid-apply, IKE).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

import pytest

from nc_agent.apply_steps import StepRefused, move
from nc_agent.desired import Desired

OLD = Desired(sp_address="192.0.2.1")
NEW = Desired(sp_address="192.0.2.2")


def _label(state: Desired) -> str:
    return "old" if state is OLD else "new" if state is NEW else "?"


@dataclass
class Recording:
    name: str
    journal: list[str]
    withdraws: bool = False
    refuse: set[str] = field(default_factory=set)
    """Phases ('withdraw', 'apply') that refuse when moving old -> new."""

    async def withdraw(self, old: Desired, new: Desired) -> bool:
        self.journal.append(f"{self.name}.withdraw {_label(old)}->{_label(new)}")
        if "withdraw" in self.refuse and old is OLD:
            raise StepRefused(self.name, "refused", f"{self.name} refuses to withdraw")
        return self.withdraws

    async def apply(self, old: Desired, new: Desired) -> None:
        self.journal.append(f"{self.name}.apply {_label(old)}->{_label(new)}")
        if "apply" in self.refuse and old is OLD:
            raise StepRefused(self.name, "refused", f"{self.name} refuses", peer="site-2")


def steps(journal: list[str], **overrides: dict) -> list[Recording]:
    made = {name: Recording(name, journal) for name in ("kernel", "edge", "ike")}
    made["ike"].withdraws = True
    for name, fields in overrides.items():
        for key, value in fields.items():
            setattr(made[name], key, value)
    return list(made.values())


def run(step_list: list[Recording], undo: bool = True) -> None:
    asyncio.run(move(step_list, OLD, NEW, undo=undo))


def test_every_step_withdraws_before_any_step_applies_in_order() -> None:
    journal: list[str] = []
    run(steps(journal))
    assert journal == [
        "kernel.withdraw old->new",
        "edge.withdraw old->new",
        "ike.withdraw old->new",
        "kernel.apply old->new",
        "edge.apply old->new",
        "ike.apply old->new",
    ]


def test_a_refusal_moves_changed_steps_back_in_the_same_order_with_old_and_new_swapped() -> None:
    journal: list[str] = []
    with pytest.raises(StepRefused, match="edge refuses") as refused:
        run(steps(journal, edge={"refuse": {"apply"}}))
    assert refused.value.peer == "site-2"
    undo = journal[journal.index("edge.apply old->new") + 1 :]
    # The kernel applied and IKE withdrew: both go back, withdrawals first, kernel
    # before IKE (charon gets its peers back once the kernel has let go of theirs).
    # The edge refused and put itself back: it is not asked again.
    assert undo == [
        "kernel.withdraw new->old",
        "ike.withdraw new->old",
        "kernel.apply new->old",
        "ike.apply new->old",
    ]


def test_a_step_that_only_withdrew_is_undone_by_both_phases() -> None:
    journal: list[str] = []
    with pytest.raises(StepRefused):
        run(steps(journal, kernel={"refuse": {"apply"}}))
    undo = journal[journal.index("kernel.apply old->new") + 1 :]
    assert undo == ["ike.withdraw new->old", "ike.apply new->old"]


def test_a_step_that_changed_nothing_is_not_undone() -> None:
    journal: list[str] = []
    with pytest.raises(StepRefused):
        run(steps(journal, ike={"withdraws": False}, kernel={"refuse": {"apply"}}))
    assert journal[-1] == "kernel.apply old->new"


def test_the_last_step_refusing_undoes_every_other_step() -> None:
    journal: list[str] = []
    with pytest.raises(StepRefused):
        run(steps(journal, ike={"refuse": {"apply"}}))
    undo = journal[journal.index("ike.apply old->new") + 1 :]
    assert undo == [
        "kernel.withdraw new->old",
        "edge.withdraw new->old",
        "ike.withdraw new->old",
        "kernel.apply new->old",
        "edge.apply new->old",
        "ike.apply new->old",
    ]


def test_at_start_up_nothing_is_undone() -> None:
    journal: list[str] = []
    with pytest.raises(StepRefused):
        run(steps(journal, ike={"refuse": {"apply"}}), undo=False)
    assert journal[-1] == "ike.apply old->new"


def test_a_failing_undo_is_logged_and_the_original_refusal_is_raised(caplog) -> None:
    journal: list[str] = []

    class Stubborn(Recording):
        async def apply(self, old: Desired, new: Desired) -> None:
            await super().apply(old, new)
            if old is NEW:
                raise StepRefused(self.name, "refused", "cannot go back")

    step_list = steps(journal, edge={"refuse": {"apply"}})
    step_list[0] = Stubborn("kernel", journal)
    with caplog.at_level(logging.WARNING, logger="cevpn.agent"):
        with pytest.raises(StepRefused, match="edge refuses"):
            run(step_list)
    assert "undoing the kernel step (apply) failed: cannot go back" in caplog.text
    assert journal[-1] == "ike.apply new->old"
