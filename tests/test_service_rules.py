"""The service rules (nc_server.service_rules): what makes a VPN deployable beyond its YANG.
Pure logic; the same rules over NETCONF are in tests/test_service_validation.py."""

from __future__ import annotations

from typing import Any

from nc_server.service_rules import check_sites_unique, check_vpn, prefix_path


def vpn(*sites: tuple[str, list[str]]) -> dict[str, Any]:
    return {
        "id": "acme",
        "site": [
            {"id": site, "ce-address": f"192.0.2.{n}", "local-prefix": prefixes}
            for n, (site, prefixes) in enumerate(sites, start=1)
        ],
    }


def rules(v: dict[str, Any]) -> list[tuple[str, str, str]]:
    return [(x.site, x.prefix, x.rule) for x in check_vpn(v)]


def test_disjoint_prefixes_are_deployable():
    assert rules(vpn(("a", ["10.1.0.0/24", "10.1.8.0/22"]), ("b", ["10.2.0.0/24"]))) == []


def test_a_prefix_inside_another_sites_prefix_is_refused():
    assert rules(vpn(("a", ["10.1.0.0/24"]), ("b", ["10.1.0.0/25"]))) == [
        ("b", "10.1.0.0/25", "prefix-overlap")
    ]


def test_a_prefix_covering_another_sites_prefix_is_refused():
    found = check_vpn(vpn(("a", ["10.1.0.128/25"]), ("b", ["10.0.0.0/8"])))
    assert [(x.site, x.prefix) for x in found] == [("a", "10.1.0.128/25")]
    assert "inside 10.0.0.0/8 of site 'b'" in found[0].message


def test_the_same_prefix_at_two_sites_is_refused():
    found = check_vpn(vpn(("a", ["10.1.0.0/24"]), ("b", ["10.1.0.0/24"])))
    assert len(found) == 1 and "is also a prefix of site" in found[0].message


def test_overlaps_within_one_site_are_its_own_business():
    assert rules(vpn(("a", ["10.1.0.0/16", "10.1.2.0/24"]), ("b", ["10.2.0.0/16"]))) == []


def test_an_ipv6_prefix_in_a_vpn_is_refused():
    found = check_vpn(vpn(("a", ["10.1.0.0/24"]), ("b", ["2001:db8::/64"])))
    assert [(x.site, x.rule) for x in found] == [("b", "prefix-family")]
    assert "IPv6" in found[0].message and "IPv4" in found[0].message


def test_a_default_route_as_a_site_prefix_is_refused_even_alone():
    assert rules(vpn(("a", ["0.0.0.0/0"]))) == [("a", "0.0.0.0/0", "default-route")]


def test_every_violation_is_reported_not_only_the_first():
    found = rules(vpn(("a", ["10.0.0.0/8"]), ("b", ["10.1.0.0/24"]), ("c", ["10.2.0.0/24"])))
    assert [s for s, _, _ in found] == ["b", "c"]


def test_the_error_path_names_vpn_site_and_prefix_with_their_keys():
    [error] = [
        x.rpc_error() for x in check_vpn(vpn(("a", ["10.1.0.0/24"]), ("b", ["10.1.0.0/24"])))
    ]
    assert error.path == prefix_path("acme", "b", "10.1.0.0/24")
    assert error.path == (
        "/cevpn-svc:vpn-service/cevpn-svc:vpn[cevpn-svc:id='acme']"
        "/cevpn-svc:site[cevpn-svc:id='b']/cevpn-svc:local-prefix[.='10.1.0.0/24']"
    )
    assert error.tag == "invalid-value" and error.app_tag == "prefix-overlap"


def test_ten_thousand_sites_are_checked_in_one_pass():
    sites = [(f"s{i}", [f"10.{i // 256}.{i % 256}.0/24"]) for i in range(10_000)]
    assert check_vpn(vpn(*sites)) == []
    sites.append(("late", ["10.39.15.128/25"]))  # inside s9999's 10.39.15.0/24
    assert rules(vpn(*sites)) == [("late", "10.39.15.128/25", "prefix-overlap")]


def service(**vpns: list[tuple[str, str]]) -> list[dict[str, Any]]:
    """VPNs by id, each a list of (site id, CE SP address)."""
    return [
        {"id": vid, "site": [{"id": site, "ce-address": ce} for site, ce in sites]}
        for vid, sites in vpns.items()
    ]


def test_a_site_id_used_in_two_vpns_is_refused_at_the_second_site():
    [dup] = check_sites_unique(
        service(v1=[("s1", "192.0.2.1")], v2=[("s2", "192.0.2.2"), ("s1", "192.0.2.3")])
    )
    error = dup.rpc_error()
    assert error.path == (
        "/cevpn-svc:vpn-service/cevpn-svc:vpn[cevpn-svc:id='v2']"
        "/cevpn-svc:site[cevpn-svc:id='s1']/cevpn-svc:id"
    )
    assert error.message == "A site identifier must be unique across all VPNs."
    # What libyang answered for the YANG must this check replaces.
    assert (error.tag, error.app_tag) == ("operation-failed", "must-violation")


def test_a_ce_address_used_in_two_vpns_is_refused_at_the_second_site():
    [dup] = check_sites_unique(service(v1=[("a", "192.0.2.1")], v2=[("b", "192.0.2.1")]))
    error = dup.rpc_error()
    assert error.path == (
        "/cevpn-svc:vpn-service/cevpn-svc:vpn[cevpn-svc:id='v2']"
        "/cevpn-svc:site[cevpn-svc:id='b']/cevpn-svc:ce-address"
    )
    assert "already has this CE SP address" in error.message
    assert (error.tag, error.app_tag) == ("operation-failed", "must-violation")


def test_an_ipv6_ce_address_is_the_same_address_however_it_is_written():
    found = check_sites_unique(service(v1=[("a", "2001:db8::1")], v2=[("b", "2001:DB8:0::1")]))
    assert [(d.vpn, d.site, d.leaf) for d in found] == [("v2", "b", "ce-address")]


def test_every_duplicate_is_reported_both_kinds_at_once():
    found = check_sites_unique(
        service(
            v1=[("a", "192.0.2.1"), ("b", "192.0.2.2")],
            v2=[("a", "192.0.2.9"), ("c", "192.0.2.2")],
            v3=[("a", "192.0.2.2")],
        )
    )
    assert [(d.vpn, d.site, d.leaf) for d in found] == [
        ("v2", "a", "id"),
        ("v2", "c", "ce-address"),
        ("v3", "a", "id"),
        ("v3", "a", "ce-address"),
    ]


def test_distinct_sites_over_many_vpns_are_no_duplicates():
    vpns = [
        {
            "id": f"v{v}",
            "site": [
                {"id": f"s{v * 100 + i}", "ce-address": f"10.{v}.{i // 250}.{i % 250 + 1}"}
                for i in range(100)
            ],
        }
        for v in range(100)
    ]
    assert check_sites_unique(vpns) == []
