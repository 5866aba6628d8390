"""From a cevpn-ce configuration to the kernel objects that realise it.

Pure logic, no kernel: given the running configuration (RFC 7951 JSON, with
defaults) and the reqid allocated to each peer, compute for every enabled
peer its tunnel device, its SAs and its XFRM policies, plus the CE-wide
fail-closed guard.  The apply and reconcile code compares two such states;
nothing here touches netlink.

Kernel mapping (seed 5, ../shared/ARCHITECTURE.md):
- transport-ipip: an IP-in-IP device; transport-mode SAs; policies on
  protocol 4 between the two SP addresses, both directions.
- tunnel-mode: a VTI device whose key is the peer's mark (= its reqid);
  tunnel-mode SAs and policies carrying that mark.
- IKE keying (seed 3.3, 3.4): the same tunnel device, but the SAs and
  policies are charon's, made under the peer's reqid (and mark); the peer
  carries its charon connection (nc_agent.ike.connections) instead of SAs.
- the CE's edge (nc_agent.edge): the SP-side ingress policy (seed 6.2), the
  Internet gateway link (seed 6.1) and the VPN-space routing daemon's plan
  (seed 4.3) are computed here too, so one commit validates them all.
- guard: an 'out' policy blocking every IP-in-IP packet from this CE's SP
  address that no peer policy covers, so an IP-in-IP device can never send
  in clear, whatever happens to a peer's policies (or to the IKE daemon);
  and its 'in' twin, so IP-in-IP arriving in clear is never accepted either
  (while an IKE daemon restarts, its peers' inbound policies are gone).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from nc_agent.dataplane.algorithms import ENCRYPTION, INTEGRITY
from nc_agent.dataplane.gateway import GatewayLink
from nc_agent.dataplane.ingress_policy import IngressPolicy, policy_from_config
from nc_agent.dataplane.links import Tunnel, device_name, tunnel_mtu
from nc_agent.dataplane.site_routes import StaticRoute, static_routes_from_config
from nc_agent.dataplane.xfrm import OWNED_REQIDS, SA, Algorithm, Lifetime, Policy
from nc_agent.ike.connections import (
    Credentials,
    IkeConfigProblem,
    IkePeer,
    credentials,
    ike_peer,
    merge_sa_information,
)
from nc_agent.ike.retry import RetryPolicy
from nc_agent.routing.bird_config import (
    RoutingConfigProblem,
    RoutingPlan,
    plan_from_config,
    router_id,
)

PEER_PRIORITY = 1000
GUARD_PRIORITY = 0x0CE0_0000
"""Lower values win in the kernel: the guard only catches what no peer policy covers."""
GUARD_REQID = OWNED_REQIDS[-1]
"""Never given to a peer: marks the guard policy as cevpn's (its template carries it)."""


class ConfigProblem(Exception):
    """The configuration cannot be realised; ``peer`` names where (None: CE-wide)."""

    def __init__(self, message: str, peer: str | None = None) -> None:
        super().__init__(message)
        self.peer = peer


@dataclass(frozen=True)
class PeerObjects:
    """Everything the kernel holds for one peer: with IKE-less keying the SAs and
    policies are ours; with IKE they are charon's and ``ike`` says how to make them."""

    name: str
    reqid: int
    tunnel: Tunnel
    outbound: SA | None = None
    inbound: SA | None = None
    policies: tuple[Policy, ...] = ()
    rekey_grace: int = 30
    ike: IkePeer | None = None


@dataclass
class Desired:
    """The kernel state one configuration asks for."""

    sp_address: str | None = None
    peers: dict[str, PeerObjects] = field(default_factory=dict)
    guard: tuple[Policy, ...] = ()
    credentials: Credentials = field(default_factory=Credentials)
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    ingress: IngressPolicy | None = None
    """The SP-side filter; its ``sp_interface`` is "" when the configuration names none
    (the edge finds the interface holding the SP address)."""
    gateway: GatewayLink | None = None
    routing: RoutingPlan | None = None
    static_routes: frozenset[StaticRoute] = frozenset()
    """routing/static-route: towards the site's own routers, in the VPN space."""

    def sas(self) -> set[SA]:
        return {sa for p in self.peers.values() for sa in (p.outbound, p.inbound) if sa is not None}

    def ike_peers(self) -> dict[str, IkePeer]:
        return {name: p.ike for name, p in self.peers.items() if p.ike is not None}

    def ike_reqids(self) -> set[int]:
        """Reqids whose SAs and policies belong to charon, not to the agent."""
        return {p.reqid for p in self.peers.values() if p.ike is not None}

    def policies(self) -> set[Policy]:
        return {pol for p in self.peers.values() for pol in p.policies} | set(self.guard)

    def tunnels(self) -> dict[str, Tunnel]:
        return {p.tunnel.name: p.tunnel for p in self.peers.values()}


def identity_name(value: str) -> str:
    """'cevpn-types:encr-aes-gcm-16-256' -> 'encr-aes-gcm-16-256'."""
    return value.rpartition(":")[2]


def key_bytes(text: str) -> bytes:
    return bytes.fromhex(text.replace(":", ""))


def _lifetime(node: Mapping[str, Any]) -> Lifetime:
    lt = node.get("lifetime", {})
    return Lifetime(
        soft_bytes=int(lt.get("soft-bytes", 0)),
        hard_bytes=int(lt.get("hard-bytes", 0)),
        soft_seconds=int(lt.get("soft-seconds", 0)),
        hard_seconds=int(lt.get("hard-seconds", 0)),
    )


def make_sa(
    sa: Mapping[str, Any],
    *,
    src: str,
    dst: str,
    reqid: int,
    mode: Literal["transport", "tunnel"],
    mark: int | None,
    replay_window: int,
) -> SA:
    kind, name, bits = ENCRYPTION[identity_name(sa["encryption-algorithm"])]
    key = key_bytes(sa["encryption-key"])
    aead = enc = auth = None
    if kind == "aead":
        aead = Algorithm(name, key, bits)
    else:
        enc = Algorithm(name, key)
        auth_name, trunc = INTEGRITY[identity_name(sa["integrity-algorithm"])]
        auth = Algorithm(auth_name, key_bytes(sa["integrity-key"]), trunc)
    return SA(
        src=src,
        dst=dst,
        spi=int(sa["spi"]),
        reqid=reqid,
        mode=mode,
        aead=aead,
        enc=enc,
        auth=auth,
        replay_window=replay_window,
        mark=mark,
        lifetime=_lifetime(sa),
    )


def _mtu_for(sa: SA, link_mtu: int) -> int:
    alg = sa.aead or sa.enc
    assert alg is not None
    icv = alg.bits if sa.aead is not None else (sa.auth.bits if sa.auth is not None else 0)
    return tunnel_mtu(link_mtu, alg.name, icv)


def _ike_mtu(peer: Mapping[str, Any], sa_defaults: Mapping[str, Any], link_mtu: int) -> int:
    """The tunnel MTU for the first ESP proposal (the preferred one; AES-GCM by default)."""
    info = merge_sa_information(sa_defaults, peer["ike"].get("sa-information", {}))
    first = next(iter(info.get("esp", {}).get("proposal", [])), None)
    if first is None:
        return tunnel_mtu(link_mtu, "rfc4106(gcm(aes))", 128)
    kind, name, bits = ENCRYPTION[identity_name(first["encryption"])]
    if kind == "aead":
        return tunnel_mtu(link_mtu, name, bits)
    return tunnel_mtu(link_mtu, name, INTEGRITY[identity_name(first["integrity"])][1])


def _tunnel(
    peer: Mapping[str, Any], reqid: int, local: str, mtu: int, router_id: str | None
) -> Tunnel:
    tunnel_cfg = peer["tunnel"]
    encap = tunnel_cfg["encapsulation"]
    return Tunnel(
        name=device_name(encap, reqid),
        encapsulation=encap,
        local=local,
        remote=peer["sp-address"],
        mtu=int(tunnel_cfg.get("mtu", 0)) or mtu,
        key=reqid if encap == "tunnel-mode" else 0,
        routes=tuple(tunnel_cfg.get("remote-prefix", ())),
        address=f"{router_id}" if router_id else None,
    )


def compile_desired(
    config: Mapping[str, Any],
    reqids: Mapping[str, int],
    *,
    link_mtu: int = 1500,
    own_key_pem: str | None = None,
) -> Desired:
    """The kernel objects for a cevpn-ce configuration (RFC 7951 JSON with defaults).

    ``own_key_pem`` is the agent's own private key, used with certificates whose
    key-origin is 'ce'."""
    ce = config.get("cevpn-ce:ce", {})
    pre = ce.get("pre-configuration", {})
    local = pre.get("sp-address")
    creds = credentials(ce, own_key_pem)
    desired = Desired(
        sp_address=local,
        credentials=creds,
        retry=RetryPolicy.from_yang(ce.get("retry-policy", {})),
    )
    peers = [p for p in ce.get("peer", []) if p["enabled"]]
    if peers and not local:
        raise ConfigProblem(
            "Peers need this CE's own SP address: set pre-configuration/sp-address."
        )
    router_id = _tunnel_address(ce)
    sa_defaults = ce.get("sa-defaults", {})
    for peer in peers:
        name = peer["name"]
        reqid = reqids[name]
        if "ike" in peer:
            try:
                ike = ike_peer(peer, local=local, reqid=reqid, sa_defaults=sa_defaults, creds=creds)
            except IkeConfigProblem as exc:
                raise ConfigProblem(str(exc), name) from None
            mtu = _ike_mtu(peer, sa_defaults, link_mtu)
            desired.peers[name] = PeerObjects(
                name=name, reqid=reqid, tunnel=_tunnel(peer, reqid, local, mtu, router_id), ike=ike
            )
            continue
        encap = peer["tunnel"]["encapsulation"]
        remote = peer["sp-address"]
        ikeless = peer["ikeless"]
        replay = int(ikeless["replay-window"])
        tunnel_mode = encap == "tunnel-mode"
        mode: Literal["transport", "tunnel"] = "tunnel" if tunnel_mode else "transport"
        mark = reqid if tunnel_mode else None
        outbound = make_sa(
            ikeless["outbound"], src=local, dst=remote, reqid=reqid, mode=mode, mark=mark,
            replay_window=replay,
        )  # fmt: skip
        inbound = make_sa(
            ikeless["inbound"], src=remote, dst=local, reqid=reqid, mode=mode, mark=mark,
            replay_window=replay,
        )  # fmt: skip
        if tunnel_mode:
            policies = (
                Policy("out", "0.0.0.0/0", "0.0.0.0/0", tmpl_src=local, tmpl_dst=remote,
                       mode="tunnel", reqid=reqid, mark=mark, priority=PEER_PRIORITY),
                Policy("in", "0.0.0.0/0", "0.0.0.0/0", tmpl_src=remote, tmpl_dst=local,
                       mode="tunnel", reqid=reqid, mark=mark, priority=PEER_PRIORITY),
            )  # fmt: skip
        else:
            policies = (
                Policy("out", f"{local}/32", f"{remote}/32", proto=4, mode="transport",
                       reqid=reqid, priority=PEER_PRIORITY),
                Policy("in", f"{remote}/32", f"{local}/32", proto=4, mode="transport",
                       reqid=reqid, priority=PEER_PRIORITY),
            )  # fmt: skip
        desired.peers[name] = PeerObjects(
            name=name,
            reqid=reqid,
            tunnel=_tunnel(peer, reqid, local, _mtu_for(outbound, link_mtu), router_id),
            outbound=outbound,
            inbound=inbound,
            policies=policies,
            rekey_grace=int(ikeless["rekey-grace"]),
        )
    desired.routing = _routing(ce, desired)
    desired.static_routes = static_routes_from_config(ce)
    if ce["internet-access"]["role"] == "integrated-gateway":
        desired.gateway = GatewayLink()
    if local:
        desired.ingress = policy_from_config(ce, str(pre.get("sp-interface", "")))
        desired.guard = (
            Policy("out", f"{local}/32", "0.0.0.0/0", proto=4, priority=GUARD_PRIORITY,
                   reqid=GUARD_REQID, action="block"),
            Policy("in", "0.0.0.0/0", f"{local}/32", proto=4, priority=GUARD_PRIORITY,
                   reqid=GUARD_REQID, action="block"),
        )  # fmt: skip
    return desired


def _routing(ce: Mapping[str, Any], desired: Desired) -> RoutingPlan | None:
    """The routing daemon's plan (seed 4.3); a tunnel asking for dynamic routing on a CE
    whose routing is static is refused rather than silently left without it."""
    if ce["routing"]["dynamic"]["protocol"] == "none":
        for peer in ce.get("peer", []):
            if peer["enabled"] and peer.get("tunnel", {}).get("dynamic-routing"):
                raise ConfigProblem(
                    "Dynamic routing through this tunnel needs a routing protocol: set "
                    "routing/dynamic/protocol (draft-ietf-l3vpn-ce-based-02, Section 4.3) "
                    "or turn the tunnel's dynamic-routing off.",
                    peer["name"],
                )
        return None
    try:
        return plan_from_config(ce, {n: p.tunnel.name for n, p in desired.peers.items()})
    except RoutingConfigProblem as exc:
        raise ConfigProblem(str(exc)) from None


def _tunnel_address(ce: Mapping[str, Any]) -> str | None:
    """The /32 on every tunnel device: the router ID, which OSPF needs on its unnumbered
    point-to-point interfaces (derived when routing is dynamic and none is configured)."""
    routing = ce["routing"]
    if routing["dynamic"]["protocol"] == "none":
        configured = routing.get("router-id")
        return str(configured) if configured else None
    try:
        return router_id(ce)
    except RoutingConfigProblem as exc:
        raise ConfigProblem(str(exc)) from None
