"""The CE's edge: what surrounds the tunnels on either side (seed 4.3, 6.1, 6.2).

- the ingress policy on the SP interface (nftables table ``inet cevpn``,
  nc_agent.dataplane.ingress; iptables chains ``CEVPN-*`` on kernels whose
  nf_tables has no family): IPsec, IKE and management to the CE's own
  address, nothing else unless the CE is an integrated Internet gateway;
- the Internet gateway link between the two spaces (nc_agent.dataplane.gateway)
  and its NAT (part of the same nftables table);
- the VPN-space routing daemon (BIRD, nc_agent.routing): OSPF through the
  tunnels that ask for it, the site's prefixes announced, a default route
  originated by a gateway site only.

The agent's commit moves the edge after the tunnels exist (so the routing
daemon finds its devices) and before IKE is told about new peers.  Each step
is undone if a later one fails, so the edge is never half-applied: a refused
commit leaves the previous ruleset, link and routing configuration in place.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from nc_agent.dataplane.gateway import Gateway
from nc_agent.dataplane.ingress import IngressFilter
from nc_agent.dataplane.ingress_policy import IngressError, IngressPolicy
from nc_agent.dataplane.links import LinkError
from nc_agent.dataplane.netns import with_ipr
from nc_agent.dataplane.site_routes import SiteRoutes, StaticRoute
from nc_agent.desired import Desired
from nc_agent.routing.bird import Bird, RoutingError
from nc_agent.routing.bird_config import RoutingPlan

log = logging.getLogger("cevpn.agent")
RESTART_DELAY = 2.0
"""Seconds before a routing daemon that died is started again (and between failed starts)."""


class EdgeRefused(Exception):
    """A step of the edge could not be made; the message says which and why."""


def interface_holding(sp_netns: str | None, address: str) -> str | None:
    """The SP-space interface that carries ``address`` (the interface seed 6.2 guards)."""

    def find(ipr: Any) -> str | None:
        for entry in ipr.get_addr():
            if entry.get_attr("IFA_ADDRESS") == address:
                links = ipr.get_links(entry["index"])
                return str(links[0].get_attr("IFLA_IFNAME")) if links else None
        return None

    result: str | None = with_ipr(sp_netns, find)
    return result


class Edge:
    def __init__(self, state_dir: Path, vpn_netns: str, sp_netns: str | None = None) -> None:
        self.sp_netns = sp_netns
        self.gateway = Gateway(vpn_netns, sp_netns)
        self.ingress = IngressFilter(sp_netns)
        self.site_routes = SiteRoutes(vpn_netns)
        self.applied_static: frozenset[StaticRoute] | None = None
        """The static routes installed since the agent started (None: not yet reconciled)."""
        self.bird = Bird(state_dir, vpn_netns)
        self.bird.on_exit = self._bird_exited
        self.routing: RoutingPlan | None = None
        """The plan the committed configuration asks for (BIRD is restarted with it)."""
        self.applied_ingress: IngressPolicy | None = None
        self._ingress_known = False
        """Whether a policy (or its absence) was applied since the agent started."""
        self._restart: asyncio.TimerHandle | None = None

    def resolve(self, desired: Desired, management_port: int | None) -> IngressPolicy | None:
        """The ingress policy with its interface found and the port the agent listens on."""
        policy = desired.ingress
        if policy is None:
            return None
        changes: dict[str, Any] = {}
        if not policy.sp_interface:
            found = interface_holding(self.sp_netns, policy.sp_address)
            if found is None:
                raise EdgeRefused(
                    f"No interface of the SP space holds the CE's SP address "
                    f"{policy.sp_address}, so the ingress policy (seed 6.2) has nothing to "
                    "guard: add the address, or name the interface in "
                    "pre-configuration/sp-interface."
                )
            changes["sp_interface"] = found
        if management_port is not None and management_port != policy.management_port:
            changes["management_port"] = management_port
        return dataclasses.replace(policy, **changes) if changes else policy

    async def apply(self, old: Desired, new: Desired, management_port: int | None) -> None:
        """Move the edge from ``old`` to ``new``; on failure, back to ``old`` (EdgeRefused)."""
        undo: list[Callable[[], Awaitable[None]]] = []
        try:
            policy = await asyncio.to_thread(self.resolve, new, management_port)
            if new.gateway is not None:
                await asyncio.to_thread(self.gateway.ensure)
                if old.gateway is None:
                    undo.append(lambda: asyncio.to_thread(self.gateway.remove))
            previous = self.applied_ingress
            if policy != previous or not self._ingress_known:
                # Unchanged policies are not rewritten: most commits only touch peers.
                await asyncio.to_thread(self.ingress.apply, policy)
                self.applied_ingress, self._ingress_known = policy, True
                undo.append(lambda: self._restore_ingress(previous))
            if new.gateway is None and old.gateway is not None:
                await asyncio.to_thread(self.gateway.remove)
                undo.append(lambda: asyncio.to_thread(self.gateway.ensure))
            if new.static_routes != self.applied_static:  # None after start: reconcile once
                await asyncio.to_thread(self.site_routes.apply, new.static_routes)
                self.applied_static = new.static_routes
                undo.append(lambda: self._restore_static(old.static_routes))
            await self.bird.apply(new.routing)
            self.routing = new.routing
        except (EdgeRefused, IngressError, LinkError, RoutingError, OSError) as exc:
            for step in reversed(undo):
                try:
                    await step()
                except Exception as undo_exc:  # the reconciler will retry at the next commit
                    log.warning("undoing an edge step failed: %s", undo_exc)
            raise EdgeRefused(str(exc)) from exc

    async def _restore_static(self, routes: frozenset[StaticRoute]) -> None:
        await asyncio.to_thread(self.site_routes.apply, routes)
        self.applied_static = routes

    async def _restore_ingress(self, policy: IngressPolicy | None) -> None:
        await asyncio.to_thread(self.ingress.apply, policy)
        self.applied_ingress = policy

    def _bird_exited(self, status: int) -> None:
        """BIRD died behind the agent's back: start it again with the committed plan."""
        if self.routing is None or self._restart is not None:
            return
        log.warning("the routing daemon exited (status %d): restarting it in %.0f s", status,
                    RESTART_DELAY)  # fmt: skip
        loop = asyncio.get_running_loop()
        self._restart = loop.call_later(RESTART_DELAY, lambda: loop.create_task(self._restarted()))

    async def _restarted(self) -> None:
        self._restart = None
        if self.routing is None or self.bird.running:
            return
        try:
            await self.bird.apply(self.routing)
        except (RoutingError, OSError) as exc:
            log.error("restarting the routing daemon failed: %s", exc)
            self._bird_exited(-1)

    async def stop(self) -> None:
        """The agent stops: the routing daemon stops with it (its routes go too).

        The ingress policy and the gateway link stay: a stopped agent must not open the
        CE to the SP side, and the tunnels that keep working (IKE-less) keep their edge."""
        self.routing = None
        if self._restart is not None:
            self._restart.cancel()
        await self.bird.stop()
