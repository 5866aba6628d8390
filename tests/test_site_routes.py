"""Static routes towards the site's own routers (cevpn-ce routing/static-route), in a real
network namespace of this host: installed, changed, removed, refused, and never anyone else's."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator

import pytest

from nc_agent.dataplane.links import LinkError
from nc_agent.dataplane.site_routes import SiteRoutes, StaticRoute, static_routes_from_config
from nc_agent.desired import compile_desired
from tests.yang_defaults import with_defaults


def ip(netns: str, *args: str) -> str:
    return subprocess.run(
        ["ip", "-n", netns, *args], check=True, capture_output=True, text=True
    ).stdout


@pytest.fixture
def vpn() -> Iterator[str]:
    """A VPN space with a site LAN (10.1.0.1/24, 2001:db8:1::1/64) and a device named like a
    tunnel."""
    name = f"cevpn-sr-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        # veth pairs: this host's kernel has no dummy devices
        ip(name, "link", "add", "lan0", "type", "veth", "peer", "name", "lan0p")
        ip(name, "link", "set", "lan0p", "up")
        ip(name, "link", "set", "lan0", "up")
        ip(name, "addr", "add", "10.1.0.1/24", "dev", "lan0")
        ip(name, "-6", "addr", "add", "2001:db8:1::1/64", "dev", "lan0", "nodad")
        ip(name, "link", "add", "cvi0001", "type", "veth", "peer", "name", "cvi0001p")
        ip(name, "link", "set", "cvi0001p", "up")
        ip(name, "link", "set", "cvi0001", "up")
        ip(name, "addr", "add", "10.255.0.1/30", "dev", "cvi0001")
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


BRANCH = StaticRoute("10.9.0.0/16", "10.1.0.254")


def test_static_routes_come_from_the_configuration_in_canonical_form() -> None:
    ce = {"routing": {"static-route": [{"prefix": "10.9.0.0/16", "next-hop": "10.1.0.254"}]}}
    assert static_routes_from_config(ce) == {BRANCH}
    assert static_routes_from_config({}) == frozenset()


def test_compiled_configuration_carries_its_static_routes() -> None:
    config = {"cevpn-ce:ce": {"routing": {"static-route": [
        {"prefix": "10.9.0.0/16", "next-hop": "10.1.0.254"},
    ]}}}  # fmt: skip
    assert compile_desired(with_defaults(config), {}).static_routes == {BRANCH}


def test_a_static_route_is_installed_with_the_agents_protocol(vpn: str) -> None:
    SiteRoutes(vpn).apply({BRANCH})
    assert "10.9.0.0/16 via 10.1.0.254 dev lan0 proto 206" in ip(vpn, "route", "show")
    assert SiteRoutes(vpn).installed() == {BRANCH}


def test_an_ipv6_static_route_is_installed(vpn: str) -> None:
    v6 = StaticRoute("2001:db8:9::/48", "2001:db8:1::fe")
    SiteRoutes(vpn).apply({v6})
    assert "2001:db8:9::/48 via 2001:db8:1::fe dev lan0 proto 206" in ip(vpn, "-6", "route")
    assert SiteRoutes(vpn).installed() == {v6}


def test_a_changed_next_hop_replaces_the_route(vpn: str) -> None:
    routes = SiteRoutes(vpn)
    routes.apply({BRANCH})
    routes.apply({StaticRoute("10.9.0.0/16", "10.1.0.253")})
    shown = ip(vpn, "route", "show", "10.9.0.0/16")
    assert shown.strip() == "10.9.0.0/16 via 10.1.0.253 dev lan0 proto 206"


def test_a_route_no_longer_configured_is_removed(vpn: str) -> None:
    routes = SiteRoutes(vpn)
    routes.apply({BRANCH, StaticRoute("10.8.0.0/16", "10.1.0.254")})
    routes.apply({BRANCH})
    assert "10.8.0.0" not in ip(vpn, "route", "show")
    assert routes.installed() == {BRANCH}


def test_routes_of_others_are_left_alone(vpn: str) -> None:
    # An operator's own route, the tunnel layer's route (proto 0xce on a cvi device)
    # and a routing daemon's route are none of the static-route layer's business.
    ip(vpn, "route", "add", "10.7.0.0/16", "via", "10.1.0.7")
    ip(vpn, "route", "add", "10.2.0.0/24", "dev", "cvi0001", "proto", "206")
    ip(vpn, "route", "add", "10.3.0.0/24", "via", "10.255.0.2", "dev", "cvi0001", "proto", "206")
    ip(vpn, "route", "add", "10.4.0.0/24", "via", "10.1.0.4", "proto", "bird")
    SiteRoutes(vpn).apply(set())
    shown = ip(vpn, "route", "show")
    for prefix in ("10.7.0.0/16", "10.2.0.0/24", "10.3.0.0/24", "10.4.0.0/24"):
        assert prefix in shown


def test_an_unreachable_next_hop_is_refused_and_nothing_changes(vpn: str) -> None:
    routes = SiteRoutes(vpn)
    routes.apply({BRANCH})
    before = ip(vpn, "route", "show")
    # 10.5.0.0/16 is installed first (sorted order), then taken back when 10.6.0.0/16 fails.
    wanted = {StaticRoute("10.5.0.0/16", "10.1.0.254"), StaticRoute("10.6.0.0/16", "192.0.2.1")}
    with pytest.raises(LinkError, match=r"10\.6\.0\.0/16 via 192\.0\.2\.1"):
        routes.apply(wanted)
    assert ip(vpn, "route", "show") == before
