"""The agent's apply: ordered steps behind one interface, driven by one generic loop.

A commit moves the CE from one :class:`~nc_agent.desired.Desired` state to another
through three steps, in this order:

``kernel``
    XFRM SAs and policies, tunnel devices and their routes (nc_agent.kernel);
``edge``
    the ingress policy, the Internet gateway link, static site routes and the
    routing daemon (nc_agent.edge), which run over the tunnel devices;
``ike``
    the IKE peers charon holds (nc_agent.ike.manager): new peers last, so their
    trap policies are installed once their device exists, and nothing the
    kernel does while creating it starts a negotiation.

Every step has two phases.  ``withdraw`` runs for every step before any step's
``apply``: it is where a step lets go of what others are about to take.  Only
IKE has something there: a peer leaving IKE (removed, or keyed without IKE now)
is deleted in charon before the kernel installs IKE-less policies on the same
selectors.

Each phase of a step is all or nothing: when it refuses (:class:`StepRefused`) it
has put its own part back.  The loop then undoes the steps that changed something
by running *the same two phases with old and new swapped*: undoing is the
transition back, and it needs the same make-before-break order as the transition
forward.  It runs in the same order, not the reverse one, for that reason: in
reverse order, charon would get back a peer that was IKE-keyed before while the
kernel still held the IKE-less policies the refused commit gave the same
selectors.  A step that only changed something in ``withdraw`` is undone by both
of its phases (charon gets back the peers it let go of).

Without a data plane (``--dataplane none``) the agent has no steps at all: the
loop moves nothing and the commit is the datastore's alone.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

from nc_agent.dataplane.xfrm import SAKey
from nc_agent.desired import Desired
from nc_agent.edge import Edge, EdgeRefused
from nc_agent.ike.connections import Credentials, IkePeer
from nc_agent.ike.manager import IkeManager, IkeRefused
from nc_agent.ike.retry import RetryPolicy
from nc_agent.kernel import Kernel, KernelRefused

log = logging.getLogger("cevpn.agent")


class StepRefused(Exception):
    """A step could not be made; it left its own part as it was.

    ``what`` says who refused, in the words an rpc-error uses; ``peer`` names the
    peer the refusal is about, when there is one."""

    def __init__(self, step: str, what: str, reason: str, peer: str | None = None) -> None:
        super().__init__(reason)
        self.step = step
        self.what = what
        self.reason = reason
        self.peer = peer


class Step(Protocol):
    """One part of the CE the agent changes; ``apply(new, old)`` is its undo."""

    name: str

    async def withdraw(self, old: Desired, new: Desired) -> bool:
        """Let go of what another step's apply will take; True if anything changed."""
        ...

    async def apply(self, old: Desired, new: Desired) -> None:
        """Move this part from ``old`` to ``new``, or refuse and leave it as it was."""
        ...


async def move(steps: Sequence[Step], old: Desired, new: Desired, *, undo: bool = True) -> None:
    """Move every step from ``old`` to ``new``; on a refusal, move the steps that had
    changed something back (when ``undo``) and raise the refusal.

    ``undo`` is False at start-up: what the CE held before is not known then (the
    kernel is reconciled with the configuration, not moved from a state), so there
    is nothing to go back to."""
    changed: list[Step] = []
    try:
        for step in steps:
            if await step.withdraw(old, new):
                changed.append(step)
        for step in steps:
            await step.apply(old, new)
            if step not in changed:
                changed.append(step)
    except StepRefused:
        if undo:
            await _back(sorted(changed, key=list(steps).index), new, old)
        raise


async def _back(steps: Sequence[Step], new: Desired, old: Desired) -> None:
    """The same two phases from ``new`` to ``old``; failures are logged, since the
    commit is refused anyway and the next commit or restart reconciles."""
    for phase in ("withdraw", "apply"):
        for step in steps:
            try:
                await getattr(step, phase)(new, old)
            except StepRefused as exc:
                log.warning("undoing the %s step (%s) failed: %s", step.name, phase, exc)


class KernelStep:
    """XFRM and tunnel devices: nc_agent.kernel.Kernel behind the step interface.

    ``held`` gives the inbound SAs to leave installed although the target lacks them
    (those a rekey replaced, kept for the peer's rekey-grace).  At start-up the
    kernel is reconciled with the target instead of moved from a known state."""

    name = "kernel"

    def __init__(
        self, kernel: Kernel, held: Callable[[], set[SAKey]], *, startup: bool = False
    ) -> None:
        self.kernel = kernel
        self.held = held
        self.startup = startup

    async def withdraw(self, old: Desired, new: Desired) -> bool:
        return False

    async def apply(self, old: Desired, new: Desired) -> None:
        try:
            if self.startup:
                await asyncio.to_thread(self.kernel.reconcile, new, self.held())
                return
            await asyncio.to_thread(self.kernel.transition, old, new, self.held())
        except KernelRefused as exc:
            raise StepRefused(
                self.name, "The kernel refused the change", str(exc), exc.peer
            ) from exc
        # Then compare with what the kernel really holds: anything changed behind the
        # agent's back (or left by a crash) converges too.
        await asyncio.to_thread(self.kernel.converge, new, self.held())


class EdgeStep:
    """Ingress policy, gateway link, site routes, routing daemon (nc_agent.edge).

    At start-up a refusal is logged, not raised: the tunnels the kernel step
    installed keep working, and the next commit tries the edge again."""

    name = "edge"

    def __init__(
        self, edge: Edge, management_port: Callable[[], int | None], *, startup: bool = False
    ) -> None:
        self.edge = edge
        self.management_port = management_port
        self.startup = startup

    async def withdraw(self, old: Desired, new: Desired) -> bool:
        return False

    async def apply(self, old: Desired, new: Desired) -> None:
        try:
            await self.edge.apply(old, new, self.management_port())
        except EdgeRefused as exc:
            if self.startup:
                log.error("the CE's edge could not be set up (retried at the next commit): %s", exc)
                return
            raise StepRefused(self.name, "The change could not be made", str(exc)) from exc


class IkeStep:
    """The IKE peers charon holds (nc_agent.ike.manager).

    ``withdraw`` lets go of the peers the target does not key with IKE, keeping the
    others as charon has them now; ``apply`` makes charon hold exactly the target's."""

    name = "ike"

    def __init__(self, ike: IkeManager) -> None:
        self.ike = ike

    async def withdraw(self, old: Desired, new: Desired) -> bool:
        staying = {n: p for n, p in self.ike.peers.items() if n in new.ike_peers()}
        if staying.keys() == self.ike.peers.keys():
            return False
        await self._charon(staying, self.ike.credentials, self.ike.policy)
        return True

    async def apply(self, old: Desired, new: Desired) -> None:
        await self._charon(new.ike_peers(), new.credentials, new.retry)

    async def _charon(
        self, peers: Mapping[str, IkePeer], credentials: Credentials, policy: RetryPolicy
    ) -> None:
        try:
            await self.ike.apply(peers, credentials, policy)
        except IkeRefused as exc:
            raise StepRefused(
                self.name, "The IKE daemon refused the change", str(exc), exc.peer
            ) from exc
