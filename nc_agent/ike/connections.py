"""A cevpn-ce IKE peer as a charon connection (seed 3.3, 3.4), as VICI messages.

Pure logic, no daemon: the agent's datastore (RFC 7951 JSON with defaults)
becomes one `IkePeer` per peer keyed by IKE, and each `IkePeer` knows the
`load-conn` and `load-shared` messages that realise it.  Keeping the mapping
here, apart from the VICI session and the supervision, lets it be tested
without a charon and read in one place.

Why these charon options
------------------------
- The CHILD_SA's ``reqid`` is the peer's cevpn reqid (its device name and VTI
  mark follow from it, exactly as with IKE-less keying), so the kernel layer
  recognises charon's SAs and policies as cevpn's and can flush them after a
  crash, and the tunnel devices stay shared code.
- transport-ipip: transport-mode ESP on IP-in-IP (protocol 4, ``ipencap``)
  between the two SP addresses; tunnel-mode: 0.0.0.0/0 both ways with
  ``mark_in``/``mark_out`` = reqid, the key of the peer's VTI device.
- Every CHILD_SA is ``start_action = trap`` (policies are in the kernel
  before any SA, so a packet can only trigger a negotiation, never leave in
  clear) with ``dpd_action`` and ``close_action`` trap too; a permanent peer is
  then initiated explicitly by the agent.  ``start_action = start`` is never
  used: it leaks clear text while a daemon restarts (../shared/LAB.md).
- ``keyingtries = 1``: retries follow the seed 3.4 schedule kept by the agent,
  not charon's own.  ``unique = no``: a restarted peer's INITIAL_CONTACT
  replaces the IKE_SA it lost.  MOBIKE off: a CE's SP address is fixed.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from nc_agent.ike.proposals import proposals

# cevpn-ce sa-defaults description: what applies where neither the peer nor the
# CE-wide sa-defaults give a value.
DEFAULT_IKE_LIFETIME = 4 * 3600
DEFAULT_CHILD_SOFT = 3600
DEFAULT_CHILD_HARD = 3600 + 600
DEFAULT_REPLAY_WINDOW = 1024
DEFAULT_DPD_DELAY = 30
DEFAULT_DPD_TIMEOUT = 150


class IkeConfigProblem(ValueError):
    """The configuration of an IKE peer cannot be realised (``peer`` says which)."""

    def __init__(self, message: str, peer: str | None = None) -> None:
        super().__init__(message)
        self.peer = peer


@dataclass(frozen=True)
class Credentials:
    """The CE-wide certificate material (seed 3.3 (ii)); PEM text."""

    certificate: str | None = None
    private_key: str | None = field(default=None, repr=False)
    ca_certificates: tuple[str, ...] = ()


@dataclass(frozen=True)
class IkePeer:
    """One peer keyed by IKEv2, with everything charon needs for it."""

    name: str
    reqid: int
    local: str
    remote: str
    mode: Literal["transport", "tunnel"]
    permanent: bool
    idle_timeout: int
    ike_proposals: tuple[str, ...]
    esp_proposals: tuple[str, ...]
    ike_lifetime: int
    child_soft_seconds: int
    child_hard_seconds: int
    child_soft_bytes: int
    child_hard_bytes: int
    replay_window: int
    dpd_delay: int
    dpd_timeout: int
    psk: str | None = field(default=None, repr=False)
    peer_identity: str | None = None
    own_certificate: str | None = field(default=None, repr=False)
    ca_certificates: tuple[str, ...] = field(default=(), repr=False)

    @property
    def uses_certificates(self) -> bool:
        return self.psk is None

    def _selectors(self) -> tuple[list[str], list[str]]:
        if self.mode == "tunnel":
            any_net = "0.0.0.0/0" if _v4(self.local) else "::/0"
            return [any_net], [any_net]
        bits = 32 if _v4(self.local) else 128
        return [f"{self.local}/{bits}[ipencap]"], [f"{self.remote}/{bits}[ipencap]"]

    def vici_connection(self) -> dict[str, Any]:
        """The ``load-conn`` message: one IKE connection named after the peer."""
        local_ts, remote_ts = self._selectors()
        child: dict[str, Any] = {
            "mode": self.mode,
            "reqid": str(self.reqid),
            "local_ts": local_ts,
            "remote_ts": remote_ts,
            "esp_proposals": list(self.esp_proposals),
            "rekey_time": f"{self.child_soft_seconds}s",
            "life_time": f"{max(self.child_hard_seconds, self.child_soft_seconds)}s",
            "replay_window": str(self.replay_window),
            "start_action": "trap",
            "dpd_action": "trap",
            "close_action": "trap",
        }
        if self.child_soft_bytes:
            child["rekey_bytes"] = str(self.child_soft_bytes)
        if self.child_hard_bytes:
            child["life_bytes"] = str(self.child_hard_bytes)
        if self.mode == "tunnel":
            child["mark_in"] = str(self.reqid)
            child["mark_out"] = str(self.reqid)
        if not self.permanent and self.idle_timeout:
            child["inactivity"] = f"{self.idle_timeout}s"
        if self.uses_certificates:
            local: dict[str, Any] = {"auth": "pubkey", "certs": [self.own_certificate or ""]}
            remote: dict[str, Any] = {
                "auth": "pubkey",
                "id": self.peer_identity,
                "cacerts": list(self.ca_certificates),
            }
        else:
            local = {"auth": "psk", "id": self.local}
            remote = {"auth": "psk", "id": self.remote}
        conn: dict[str, Any] = {
            "version": "2",
            "local_addrs": [self.local],
            "remote_addrs": [self.remote],
            "proposals": list(self.ike_proposals),
            "rekey_time": f"{self.ike_lifetime}s",
            "reauth_time": "0",
            "dpd_delay": f"{self.dpd_delay}s",
            "keyingtries": "1",
            "unique": "no",
            "mobike": "no",
            "local": local,
            "remote": remote,
            "children": {self.name: child},
        }
        return {self.name: conn}

    def vici_shared_key(self) -> dict[str, Any] | None:
        """The ``load-shared`` message for a PSK peer (owners: both SP addresses)."""
        if self.psk is None:
            return None
        return {
            "id": f"cevpn-{self.name}",
            "type": "IKE",
            "data": self.psk,
            "owners": [self.local, self.remote],
        }


def _v4(address: str) -> bool:
    return ipaddress.ip_address(address).version == 4


def merge_sa_information(defaults: Mapping[str, Any], own: Mapping[str, Any]) -> dict[str, Any]:
    """The effective SA information: ``own`` overrides ``defaults`` value by value (seed
    3.3); a list (proposals) given by the peer replaces the default list whole."""
    merged: dict[str, Any] = dict(defaults)
    for key, value in own.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = merge_sa_information(merged[key], value)
        else:
            merged[key] = value
    return merged


def credentials(ce: Mapping[str, Any], own_key_pem: str | None) -> Credentials:
    """The CE's certificate, its private key (the datastore's, or the agent's own key when
    key-origin is 'ce') and its trust anchors."""
    certs = ce.get("certificates", {})
    key = certs.get("private-key") if certs["key-origin"] == "server" else own_key_pem
    return Credentials(
        certificate=certs.get("certificate"),
        private_key=key,
        ca_certificates=tuple(str(ca["certificate"]) for ca in certs.get("ca-certificate", [])),
    )


def ike_peer(
    peer: Mapping[str, Any],
    *,
    local: str,
    reqid: int,
    sa_defaults: Mapping[str, Any],
    creds: Credentials,
) -> IkePeer:
    """One cevpn-ce peer (with its ``ike`` case) as an `IkePeer`; IkeConfigProblem if the
    configuration cannot be realised (unknown transform, missing certificate material)."""
    name = str(peer["name"])
    ike = peer["ike"]
    info = merge_sa_information(sa_defaults, ike.get("sa-information", {}))
    try:
        ike_props, esp_props = proposals(info)
    except ValueError as exc:
        raise IkeConfigProblem(f"Peer {name}: {exc}.", name) from None
    ike_info = info.get("ike", {})
    version = str(ike_info.get("version", "ikev2")).rpartition(":")[2]
    if version not in ("ikev2", "2"):
        raise IkeConfigProblem(
            f"Peer {name}: IKE version {version} is not offered; cevpn negotiates IKEv2 only.",
            name,
        )
    esp = info.get("esp", {})
    lifetime = esp.get("lifetime", {})
    dpd = ike_info.get("dpd", {})
    tunnel = peer["tunnel"]
    psk = ike.get("pre-shared-key")
    if psk is None:
        if "peer-identity" not in ike:
            raise IkeConfigProblem(
                f"Peer {name} needs a pre-shared-key or a peer-identity (certificates).", name
            )
        if not creds.certificate or not creds.ca_certificates:
            raise IkeConfigProblem(
                f"Peer {name} authenticates by certificate, but this CE has no certificate "
                "or no CA certificate under ce/certificates.",
                name,
            )
        if not creds.private_key:
            raise IkeConfigProblem(
                f"Peer {name} authenticates by certificate, but the private key of this CE's "
                "certificate is not available (key-origin 'ce' and the agent has no own key).",
                name,
            )
    encapsulation = tunnel["encapsulation"]
    return IkePeer(
        name=name,
        reqid=reqid,
        local=local,
        remote=str(peer["sp-address"]),
        mode="tunnel" if encapsulation == "tunnel-mode" else "transport",
        permanent=tunnel["establishment"] == "permanent",
        idle_timeout=int(tunnel.get("idle-timeout", 0)),  # present when traffic-driven
        ike_proposals=tuple(ike_props),
        esp_proposals=tuple(esp_props),
        ike_lifetime=int(ike_info.get("lifetime", DEFAULT_IKE_LIFETIME)),
        child_soft_seconds=int(lifetime.get("soft-seconds", DEFAULT_CHILD_SOFT)),
        child_hard_seconds=int(lifetime.get("hard-seconds", DEFAULT_CHILD_HARD)),
        child_soft_bytes=int(lifetime.get("soft-bytes", 0)),
        child_hard_bytes=int(lifetime.get("hard-bytes", 0)),
        replay_window=int(esp.get("replay-window", DEFAULT_REPLAY_WINDOW)),
        dpd_delay=int(dpd.get("delay", DEFAULT_DPD_DELAY)),
        dpd_timeout=int(dpd.get("timeout", DEFAULT_DPD_TIMEOUT)),
        psk=None if psk is None else str(psk),
        peer_identity=None if psk is not None else str(ike["peer-identity"]),
        own_certificate=None if psk is not None else creds.certificate,
        ca_certificates=() if psk is not None else creds.ca_certificates,
    )
