"""Moving the kernel from one desired state to another, or reconciling it with one.

The one place where the agent's intent meets the kernel layer
(nc_agent.dataplane): it orders the changes so that the CE is never
fail-open -- SAs and policies exist before a tunnel device carries traffic,
a device goes before its policies and SAs when a peer is removed, a new
inbound SA is installed before the outbound one that the peer will answer
-- and it undoes what it did when the kernel refuses a step, so a commit is
all or nothing.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from nc_agent.dataplane.links import Existing, LinkError, Links, Tunnel
from nc_agent.dataplane.xfrm import SA, Policy, SAKey, SAState, Xfrm, XfrmError
from nc_agent.desired import Desired
from nc_core import faults

log = logging.getLogger("cevpn.agent")


def sa_key(sa: SA | SAState) -> SAKey:
    return SAKey(sa.dst, sa.spi, mark=sa.mark)


def policy_key(p: Policy) -> tuple[str, str, str, int, int | None]:
    return (p.direction, p.src, p.dst, p.proto, p.mark)


class KernelRefused(Exception):
    """A change the kernel refused; ``peer`` names the peer it was for (if any)."""

    def __init__(self, message: str, peer: str | None = None) -> None:
        super().__init__(message)
        self.peer = peer


@dataclass
class Observed:
    """What the kernel holds of ours, read back (for reconciliation and for <get>)."""

    sas: dict[SAKey, SAState] = field(default_factory=dict)
    policies: dict[tuple[str, str, str, int, int | None], Policy] = field(default_factory=dict)
    tunnels: dict[str, Existing] = field(default_factory=dict)


class Kernel:
    def __init__(self, vpn_netns: str, sp_netns: str | None = None) -> None:
        self.links = Links(vpn_netns, sp_netns)
        self.xfrm = Xfrm(sp_netns)

    def close(self) -> None:
        self.xfrm.close()

    # -- reading -----------------------------------------------------------------

    def observe(self) -> Observed:
        obs = Observed()
        for state in self.xfrm.dump_sas(owned_only=True):
            obs.sas[sa_key(state)] = state
        for pol in self.xfrm.dump_policies(owned_only=True):
            obs.policies[policy_key(pol)] = pol
        obs.tunnels = self.links.existing()
        return obs

    # -- changing ----------------------------------------------------------------

    def transition(self, old: Desired, new: Desired, keep: Iterable[SAKey] = ()) -> None:
        """Change the kernel from ``old`` to ``new``; all or nothing (KernelRefused)."""
        kept = set(keep)
        old_sas = {sa_key(s): s for s in old.sas()}
        new_sas = {sa_key(s): s for s in new.sas()}
        old_pols = {policy_key(p): p for p in old.policies()}
        new_pols = {policy_key(p): p for p in new.policies()}
        old_tun, new_tun = old.tunnels(), new.tunnels()

        # Inbound SAs first (sorted so that SAs towards this CE come before ours).
        local = new.sp_address
        add_sas = sorted(
            (s for k, s in new_sas.items() if old_sas.get(k) != s),
            key=lambda s: 0 if s.dst == local else 1,
        )
        changed_sas = [k for k, s in new_sas.items() if k in old_sas and old_sas[k] != s]
        add_pols = [p for k, p in new_pols.items() if old_pols.get(k) != p]
        changed_pols = [
            old_pols[k] for k, p in new_pols.items() if k in old_pols and old_pols[k] != p
        ]
        try:
            self.xfrm.apply(
                add_sas=add_sas,
                del_sas=changed_sas,
                add_policies=add_pols,
                del_policies=changed_pols,
            )
        except XfrmError as exc:
            raise KernelRefused(str(exc), _peer_of(exc.obj, new)) from exc
        # Crash tests stop the agent here: SAs and policies in, devices not yet.
        faults.point("agent-apply-sas-installed")

        fresh = [t for name, t in new_tun.items() if name not in old_tun]
        try:
            self.links.add_many(fresh)
            for name, tunnel in new_tun.items():
                if name in old_tun and old_tun[name] != tunnel:
                    self._retune(old_tun[name], tunnel)
        except LinkError as exc:
            made = exc.created or [t.name for t in fresh]
            self._quietly(lambda: self.links.remove_many(made))
            self._quietly(
                lambda: self.xfrm.apply(
                    del_sas=[sa_key(s) for s in add_sas],
                    del_policies=add_pols,
                )
            )
            self._quietly(
                lambda: self.xfrm.apply(
                    add_sas=[old_sas[k] for k in changed_sas],
                    add_policies=changed_pols,
                )
            )
            raise KernelRefused(str(exc), _peer_of_tunnel(exc, new)) from exc

        # Removals: devices first (no more traffic), then policies, then SAs.
        gone = [name for name in old_tun if name not in new_tun]
        self._quietly(lambda: self.links.remove_many(gone))
        gone_pols = [p for k, p in old_pols.items() if k not in new_pols]
        gone_sas = [k for k in old_sas if k not in new_sas and k not in kept]
        self._quietly(lambda: self.xfrm.apply(del_policies=gone_pols, del_sas=gone_sas))

    def _retune(self, old: Tunnel, new: Tunnel) -> None:
        if (old.encapsulation, old.local, old.remote, old.key) != (
            new.encapsulation,
            new.local,
            new.remote,
            new.key,
        ):
            self.links.remove(old.name)
            self.links.add(new)
        else:
            self.links.configure(new)

    def reconcile(self, desired: Desired, keep: Iterable[SAKey] = ()) -> None:
        """Make the kernel match ``desired``: remove what is stale, add what is missing.

        SAs and policies of IKE peers are charon's and left alone; those of peers
        that are gone are removed like any other stale object."""
        obs = self.observe()
        charons = desired.ike_reqids()
        obs.sas = {k: s for k, s in obs.sas.items() if s.reqid not in charons}
        obs.policies = {k: p for k, p in obs.policies.items() if p.reqid not in charons}
        kept = set(keep)
        want_sas = {sa_key(s): s for s in desired.sas()}
        want_pols = {policy_key(p): p for p in desired.policies()}
        want_tun = desired.tunnels()
        stale_tunnels = [n for n, e in obs.tunnels.items() if not _same_tunnel(e, want_tun.get(n))]
        self.links.remove_many(stale_tunnels)
        self.xfrm.apply(
            del_policies=[p for k, p in obs.policies.items() if want_pols.get(k) != p],
            del_sas=[k for k in obs.sas if k not in want_sas and k not in kept],
        )
        self.xfrm.apply(
            add_sas=[s for k, s in want_sas.items() if k not in obs.sas],
            add_policies=[p for k, p in want_pols.items() if obs.policies.get(k) != p],
        )
        missing = [t for n, t in want_tun.items() if n not in obs.tunnels or n in stale_tunnels]
        self.links.add_many(missing)
        drifted = [
            t
            for n, t in want_tun.items()
            if t not in missing and not _configured(obs.tunnels[n], t)
        ]
        self.links.configure_many(drifted)

    def converge(self, desired: Desired, keep: Iterable[SAKey] = ()) -> None:
        """reconcile(), but a failure is only logged: the commit itself succeeded."""
        try:
            self.reconcile(desired, keep)
        except (XfrmError, LinkError, OSError) as exc:
            log.warning("reconciling after the commit failed (retried at the next one): %s", exc)

    def flush_reqids(self, reqids: set[int]) -> int:
        """Remove the SAs and policies of these reqids (what a dead IKE daemon left)."""
        return self.xfrm.flush_reqids(reqids)

    def remove_sas(self, keys: Iterable[SAKey]) -> None:
        self._quietly(lambda: self.xfrm.apply(del_sas=list(keys)))

    @staticmethod
    def _quietly(step: Callable[[], object]) -> None:
        try:
            step()
        except (XfrmError, LinkError, OSError) as exc:
            log.warning("cleanup step failed (the reconciler will retry): %s", exc)


def _same_tunnel(existing: Existing, wanted: Tunnel | None) -> bool:
    if wanted is None:
        return False
    kind = "ipip" if wanted.encapsulation == "transport-ipip" else "vti"
    return (existing.kind, existing.local, existing.remote, existing.key) == (
        kind,
        wanted.local,
        wanted.remote,
        wanted.key,
    )


def _configured(existing: Existing, wanted: Tunnel) -> bool:
    """Is the device up with the wanted MTU and exactly the wanted routes?"""
    routes = tuple(sorted(str(ipaddress.ip_network(p, strict=False)) for p in wanted.routes))
    return existing.up and existing.mtu == wanted.mtu and existing.routes == routes


def _peer_of(obj: object, desired: Desired) -> str | None:
    for peer in desired.peers.values():
        if obj in (peer.outbound, peer.inbound) or obj in peer.policies:
            return peer.name
        sas = [sa for sa in (peer.outbound, peer.inbound) if sa is not None]
        if isinstance(obj, SAKey) and obj in [sa_key(sa) for sa in sas]:
            return peer.name
    return None


def _peer_of_tunnel(exc: LinkError, desired: Desired) -> str | None:
    text = str(exc)
    for peer in desired.peers.values():
        if peer.tunnel.name in text:
            return peer.name
    return None
