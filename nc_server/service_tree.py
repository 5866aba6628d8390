"""The VPN database (cevpn-service) as the server's parts read and edit it.

The northbound adapter, the controller and the provisioning jobs all speak of
the same few things: the module's namespace, where a site's CE is
(:class:`SiteView`), a VPN with its compiled CE configurations
(:class:`VpnState`), and the two edits the server makes to the database as
itself (pin an enrolled CE's host key, delete a site).  They live here so that
none of those parts has to import another for them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lxml import etree

from nc_core.xmlutil import qn

if TYPE_CHECKING:
    from nc_server.compiler import CeConfig

SVC_NS = "urn:cevpn:yang:cevpn-service"
SVC = "cevpn-service:vpn-service"
"""The database's top-level container, as RFC 7951 JSON names it."""


def q(name: str) -> str:
    """A cevpn-service element name in Clark notation."""
    return qn(SVC_NS, name)


@dataclass
class SiteView:
    """What the server needs of a site outside the compiler: where its CE is."""

    vpn: str
    site: str
    ce_address: str
    management_address: str
    management_port: int
    host_keys: list[str]
    autodiscovery: str
    removal: str
    call_home: bool = False
    """The CE calls the server (RFC 8071) instead of being dialled."""


@dataclass
class VpnState:
    """One VPN of the database and the CE configurations compiled from it."""

    vpn: dict[str, Any]
    """The VPN's list entry, RFC 7951 JSON with defaults."""
    compiled: dict[str, CeConfig] = field(default_factory=dict)
    """Per site."""


def site_views(vpns: Mapping[str, VpnState]) -> dict[str, SiteView]:
    """Every site of the database by its id (site ids are unique across VPNs)."""
    views: dict[str, SiteView] = {}
    for vid, state in vpns.items():
        vpn = state.vpn
        for site in vpn.get("site", []):
            mgmt = site.get("management", {})
            views[site["id"]] = SiteView(
                vpn=vid,
                site=site["id"],
                ce_address=site["ce-address"],
                management_address=mgmt.get("address", site["ce-address"]),
                management_port=int(mgmt["port"]),
                host_keys=list(mgmt.get("host-key", [])),
                autodiscovery=str(vpn["autodiscovery"]),
                removal=str(vpn["site-removal"]),
                call_home=mgmt.get("connection") == "call-home",
            )
    return views


def compiled_part(vpn: Mapping[str, Any] | None) -> Any:
    """A VPN entry without what the compiler does not read (sites' management endpoints):
    a commit that changes only these (enrolment, a new port) needs no compilation."""
    if vpn is None:
        return None
    return {
        **vpn,
        "site": [
            {k: v for k, v in site.items() if k != "management"} for site in vpn.get("site", [])
        ],
    }


# --------------------------------------------------------------------------
# Datastore edits the server makes as itself
# --------------------------------------------------------------------------


def _vpn_elem(root: etree._Element, vpn: str) -> etree._Element | None:
    for elem in root.iterfind(f"{q('vpn-service')}/{q('vpn')}"):
        if elem.findtext(q("id")) == vpn:
            return elem
    return None


def _site_elem(root: etree._Element, vpn: str, site: str) -> etree._Element | None:
    vpn_elem = _vpn_elem(root, vpn)
    if vpn_elem is None:
        return None
    for elem in vpn_elem.iterfind(q("site")):
        if elem.findtext(q("id")) == site:
            return elem
    return None


def set_host_key(root: etree._Element, vpn: str, site: str, public: str) -> None:
    """Pin the host key enrolment made for the site's CE (the only one accepted)."""
    elem = _site_elem(root, vpn, site)
    assert elem is not None
    mgmt = elem.find(q("management"))
    if mgmt is None:
        mgmt = etree.SubElement(elem, q("management"))
    for old in mgmt.findall(q("host-key")):
        mgmt.remove(old)
    etree.SubElement(mgmt, q("host-key")).text = public


def delete_site(root: etree._Element, vpn: str, site: str) -> None:
    """The site and everything in its VPN that names it (links, gateways, explicit keys)."""
    vpn_elem = _vpn_elem(root, vpn)
    assert vpn_elem is not None
    for elem in list(vpn_elem.iter()):
        parent = elem.getparent()
        if parent is None or not isinstance(elem.tag, str):
            continue
        local = etree.QName(elem).localname
        if local == "site" and parent is vpn_elem and elem.findtext(q("id")) == site:
            parent.remove(elem)
        elif local == "internet-gateway" and (elem.text or "").strip() == site:
            parent.remove(elem)
        elif local in ("link", "pre-shared-key", "ikeless-sa", "site-certificate") and site in {
            (c.text or "").strip()
            for c in elem
            if isinstance(c.tag, str)
            and etree.QName(c).localname in ("site-a", "site-b", "from-site", "to-site", "site")
        }:
            parent.remove(elem)
