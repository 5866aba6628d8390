"""Enrolment of a CE (seed 3.2): its pre-configuration bundle and the keys in it.

The server generates both SSH key pairs a CE needs, so that every connection
is pinned from the first one (nothing is learned on first use):
- the CE's *host* key: the server records the public half in the site's
  ``management/host-key`` and only ever connects to a CE presenting it;
- the CE's *client* key, with which the agent logs in to the server to pull
  its configuration: the public half becomes the CE's account on the server.
The private halves exist only in the bundle (and then on the CE).

The server's own client key (its identity on every CE) lives in its state
directory and is authorised on the CE through the bundle.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from lxml import etree

from nc_core.datastore import write_atomically
from nc_server.service_tree import q

SOUTHBOUND_KEY_FILE = "southbound_ed25519_key"
"""The server's client key for reaching CE agents."""
SERVER_USERNAME_ON_CE = "cevpn-server"
CE_GROUP = "cevpn-ce-agents"


@dataclass(frozen=True)
class KeyPair:
    private_openssh: str = field(repr=False)
    public_line: str


def new_ed25519(comment: str) -> KeyPair:
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    ).decode()
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    return KeyPair(private, f"{public.decode()} {comment}")


LOCAL_ADMIN = "cevpn-local"
"""The account `cevpn-server enrol` uses to reach a running server on the same machine."""
LOCAL_ADMIN_KEY = "local_admin_ed25519_key"


def key_pair_file(path: Path, comment: str) -> str:
    """An Ed25519 key kept in ``path`` (made on first use, 0600, written atomically) and
    ``path``.pub; returns the public line."""
    if not path.exists():
        pair = new_ed25519(comment)
        write_atomically(path, pair.private_openssh.encode())
        path.with_suffix(".pub").write_text(pair.public_line + "\n")
    return path.with_suffix(".pub").read_text().strip()


def southbound_key(state_dir: Path) -> tuple[Path, str]:
    """The server's client key file and its public line."""
    path = state_dir / SOUTHBOUND_KEY_FILE
    return path, key_pair_file(path, "cevpn-server")


def ce_username(site: str) -> str:
    return f"ce-{site}"


@dataclass(frozen=True)
class Bundle:
    """A CE's pre-configuration (cevpn-types grouping ce-pre-configuration) as JSON content."""

    content: dict[str, Any] = field(repr=False)
    host_public: str
    client_public: str

    def ce_document(self) -> dict[str, Any]:
        """The document `cevpn-agent --bootstrap` reads: the CE's pre-configuration."""
        return {"cevpn-ce:ce": {"pre-configuration": self.content}}


def make_bundle(
    *,
    vpn: str,
    site: str,
    sp_address: str,
    management_port: int,
    server_endpoints: list[dict[str, Any]],
    server_host_key: str,
    southbound_public: str,
    ca_certificate: str | None,
    pull_interval: int,
    orphan_after: int,
    call_home_port: int | None = None,
) -> Bundle:
    """The bundle of one site.  ``call_home_port``: the CE calls home (RFC 8071) to every
    server endpoint's address at that port, in the endpoints' order."""
    if not server_endpoints:
        raise ValueError(
            "no VPN server endpoint is configured: set /vpn-service/server/endpoint "
            "(the address CEs reach this server at) before enrolling"
        )
    host = new_ed25519(f"{site} host")
    client = new_ed25519(ce_username(site))
    content: dict[str, Any] = {
        "site-id": site,
        "vpn-id": vpn,
        "sp-address": sp_address,
        "vpn-server": {
            "endpoint": [
                {
                    "address": e["address"],
                    "port": int(e["port"]),
                    "host-key": [server_host_key],
                }
                for e in server_endpoints
            ],
            "username": ce_username(site),
            "client-private-key": client.private_openssh,
        },
        "management": {
            "server-username": SERVER_USERNAME_ON_CE,
            "server-authorized-key": [southbound_public],
            "host-private-key": host.private_openssh,
            "port": management_port,
        },
        "timers": {"pull-interval": pull_interval, "orphan-after": orphan_after},
    }
    if call_home_port is not None:
        content["management"]["call-home"] = {
            "endpoint": [
                {"address": e["address"], "port": call_home_port} for e in server_endpoints
            ]
        }
    if ca_certificate:
        content["ca-certificate"] = ca_certificate
    return Bundle(content, host.public_line, client.public_line)


# --------------------------------------------------------------------------
# The bundle as the enrol operation carries it
# --------------------------------------------------------------------------


def bundle_xml(bundle: Bundle) -> etree._Element:
    """The enrol RPC's output <bundle> (cevpn-service)."""
    elem = etree.Element(q("bundle"))
    _fill(elem, bundle.content)
    return elem


def _fill(parent: etree._Element, content: Mapping[str, Any]) -> None:
    for key, value in content.items():
        if isinstance(value, dict):
            _fill(etree.SubElement(parent, q(key)), value)
        elif isinstance(value, list):
            for item in value:
                if isinstance(item, dict):
                    _fill(etree.SubElement(parent, q(key)), item)
                else:
                    etree.SubElement(parent, q(key)).text = str(item)
        else:
            etree.SubElement(parent, q(key)).text = str(value)


def bundle_document_from_xml(bundle: etree._Element) -> dict[str, Any]:
    """The enrol RPC's <bundle> as the JSON document `cevpn-agent --bootstrap` reads (what
    `cevpn-server enrol` writes, for a client that called the operation itself)."""
    lists = {"endpoint", "host-key", "server-authorized-key", "url-host-key"}
    ints = {"port", "pull-interval", "connect-timeout", "fetch-alarm-after", "orphan-after"}

    def walk(elem: etree._Element) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for child in elem:
            if not isinstance(child.tag, str):
                continue
            name = etree.QName(child).localname
            value: Any = walk(child) if len(child) else (child.text or "")
            if name in ints and isinstance(value, str):
                value = int(value)
            if name in lists:
                out.setdefault(name, []).append(value)
            else:
                out[name] = value
        return out

    return {"cevpn-ce:ce": {"pre-configuration": walk(bundle)}}
