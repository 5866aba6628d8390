"""The CE's ingress policy (seed 6.2) in whichever packet filter its SP space's kernel has.

The policy itself is nc_agent.dataplane.ingress_policy; nftables
(nc_agent.dataplane.ingress_nft) installs it, or iptables-legacy
(nc_agent.dataplane.ingress_iptables) where nf_tables has no address family.
"""

from __future__ import annotations

import logging

from nc_agent.dataplane.ingress_iptables import Iptables
from nc_agent.dataplane.ingress_nft import Nftables
from nc_agent.dataplane.ingress_policy import IngressBackend, IngressError, IngressPolicy

log = logging.getLogger("cevpn.agent")


class IngressFilter:
    """The ingress policy in whichever packet filter the SP space's kernel has.

    nftables first; a kernel whose nf_tables has no address family (nft answers
    "Operation not supported" to any table) gets the same rules as iptables-legacy
    chains -- from then on, for this agent.
    """

    def __init__(self, sp_netns: str | None) -> None:
        self.sp_netns = sp_netns
        self.backend: IngressBackend = Nftables(sp_netns)

    def apply(self, policy: IngressPolicy | None) -> None:
        try:
            self.backend.apply(policy)
            return
        except IngressError as exc:
            if not isinstance(self.backend, Nftables) or "Operation not supported" not in str(exc):
                raise
        log.warning("this kernel's nf_tables has no address family: using iptables")
        self.backend = Iptables(self.sp_netns)
        self.backend.apply(policy)
