"""The VPN compiler: one cevpn-service VPN in, one valid cevpn-ce configuration per site out.

VPN entries are built by parsing cevpn-service documents through libyang and
printing them with implicit defaults, so the compiler sees the shape the
server's datastore gives it.  Every compiled configuration is checked
against cevpn-ce with libyang, and its version against the canonical JSON.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import itertools
import json
import time
from collections import Counter, defaultdict
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pytest

from nc_core.schema import Schema, ValidationFailed, ce_schema, service_schema
from nc_server.compiler import (
    CA_CERTIFICATE_NAME,
    CeConfig,
    CompileError,
    SaSuite,
    SiteDelta,
    VpnCompiler,
    compile_vpn,
    diff_configs,
    identity_ancestors,
    meets_strength,
    sa_suite,
    tunnel_pairs,
)

EXAMPLES = Path(__file__).resolve().parent / "examples" / "valid"
T = "cevpn-types:"

# --------------------------------------------------------------------------
# Helpers: real VPN shape through libyang, a deterministic key source
# --------------------------------------------------------------------------


@functools.cache
def _service() -> Schema:
    return service_schema()


@functools.cache
def _ce() -> Schema:
    return ce_schema()


def _printed(schema: Schema, text: str, fmt: str) -> dict[str, Any]:
    tree = schema.parse_config(text, fmt)
    try:
        out: dict[str, Any] = json.loads(
            tree.print_mem("json", with_siblings=True, include_implicit_defaults=True)
        )
    finally:
        tree.free()
    return out


def parse_vpn(vpn: Mapping[str, Any]) -> dict[str, Any]:
    """A cevpn-service VPN entry as the datastore prints it (validated, defaults included)."""
    doc = {"cevpn-service:vpn-service": {"vpn": [vpn]}}
    printed = _printed(_service(), json.dumps(doc), "json")
    result: dict[str, Any] = printed["cevpn-service:vpn-service"]["vpn"][0]
    return result


def example_vpns(name: str) -> dict[str, dict[str, Any]]:
    path = EXAMPLES / name
    fmt = path.suffix[1:]
    printed = _printed(_service(), path.read_text(), fmt)
    return {v["id"]: v for v in printed["cevpn-service:vpn-service"]["vpn"]}


def site(site_id: str, n: int, **fields: Any) -> dict[str, Any]:
    """A site entry: address 192.0.2.n and prefix 10.n.0.0/24 unless ``prefixes`` is given."""
    prefixes = fields.pop("prefixes", [f"10.{n}.0.0/24"])
    return {"id": site_id, "ce-address": f"192.0.2.{n}", "local-prefix": prefixes, **fields}


def vpn_doc(sites: list[dict[str, Any]], **fields: Any) -> dict[str, Any]:
    return {"id": "acme", "customer": "ACME", **fields, "site": sites}


def mesh(n: int = 3, **fields: Any) -> dict[str, Any]:
    return parse_vpn(vpn_doc([site(f"site-{i}", i) for i in range(1, n + 1)], **fields))


def hub_and_spoke(hubs: int, spokes: int, **fields: Any) -> dict[str, Any]:
    sites = [site(f"hub-{i}", 100 + i, role="hub") for i in range(1, hubs + 1)]
    sites += [site(f"spoke-{i}", i, role="spoke") for i in range(1, spokes + 1)]
    return parse_vpn(vpn_doc(sites, topology={"type": "hub-and-spoke"}, **fields))


def _octets(seed: str, count: int) -> str:
    stream = b""
    block = 0
    while len(stream) < count:
        stream += hashlib.sha256(f"{seed}|{block}".encode()).digest()
        block += 1
    return ":".join(f"{b:02x}" for b in stream[:count])


def _pem(kind: str, seed: str) -> str:
    body = hashlib.sha256(seed.encode()).hexdigest()
    return f"-----BEGIN {kind}-----\n{body}\n-----END {kind}-----"


# Key lengths in octets as cevpn-types' ikeless-sa must statements demand.
ENCRYPTION_OCTETS = {
    T + "encr-3des": 24,
    T + "encr-aes-cbc-128": 16,
    T + "encr-aes-cbc-192": 24,
    T + "encr-aes-cbc-256": 32,
    T + "encr-aes-ctr-128": 20,
    T + "encr-aes-ctr-256": 36,
    T + "encr-aes-gcm-16-128": 20,
    T + "encr-aes-gcm-16-192": 28,
    T + "encr-aes-gcm-16-256": 36,
    T + "encr-aes-ccm-16-128": 19,
    T + "encr-aes-ccm-16-256": 35,
    T + "encr-chacha20-poly1305": 36,
}
INTEGRITY_OCTETS = {
    T + "auth-hmac-sha1-96": 20,
    T + "auth-aes-xcbc-96": 16,
    T + "auth-hmac-sha2-256-128": 32,
    T + "auth-hmac-sha2-384-192": 48,
    T + "auth-hmac-sha2-512-256": 64,
}


class FakeKeys:
    """Deterministic key material of correct lengths; ``rotate`` replaces some of it.

    Generated keys are kept, as a real key store keeps them, so that a call
    is a look-up.  Like the real one it says which pairs ``rotate`` changed
    (``changed_pairs``): a compiler asks only for those and for the entries it builds.
    """

    def __init__(self) -> None:
        self.generation: defaultdict[tuple[str, ...], int] = defaultdict(int)
        self.calls: Counter[str] = Counter()
        self._psk_length: int | None = None
        self._psks: dict[tuple[str, str, str, int, int], str] = {}
        self._epoch = 0
        self._log: list[tuple[str, str]] = []
        """Pairs whose material changed, in order: what changed_pairs reads."""

    @property
    def psk_length(self) -> int | None:
        """Force a (too short) length: every key changes, so changed_pairs cannot tell."""
        return self._psk_length

    @psk_length.setter
    def psk_length(self, length: int | None) -> None:
        self._psk_length = length
        self._epoch += 1

    def rotate(self, *what: str) -> None:
        """("psk", a, b), ("sa", from, to), ("sa-inbound-ahead", from, to) or ("cert", site)."""
        self.generation[what] += 1
        if len(what) == 3:
            a, b = what[1], what[2]
            self._log.append((a, b) if a < b else (b, a))

    def material_mark(self, vpn: str) -> tuple[int, int]:
        return self._epoch, len(self._log)

    def changed_pairs(self, vpn: str, mark: Hashable) -> set[tuple[str, str]] | None:
        epoch, position = mark if isinstance(mark, tuple) else (None, 0)
        return None if epoch != self._epoch else set(self._log[position:])

    def pre_shared_key(self, vpn: str, site_a: str, site_b: str, min_length: int) -> str:
        self.calls["pre_shared_key"] += 1
        a, b = (site_a, site_b) if site_a < site_b else (site_b, site_a)
        length = self.psk_length or max(min_length, 40)
        gen = self.generation.get(("psk", a, b), 0) if self.generation else 0
        stored = (vpn, a, b, gen, length)
        key = self._psks.get(stored)
        if key is None:
            text = ""
            while len(text) < length:
                text += hashlib.sha256(f"psk|{stored}|{len(text)}".encode()).hexdigest()
            key = self._psks[stored] = text[:length]
        return key

    def ikeless_sa(
        self,
        vpn: str,
        from_site: str,
        to_site: str,
        direction: Literal["outbound", "inbound"],
        suite: SaSuite,
    ) -> dict[str, Any]:
        self.calls["ikeless_sa"] += 1
        gen = self.generation[("sa", from_site, to_site)]
        if direction == "inbound":
            # A rekey installs the new inbound SA first.
            gen += self.generation[("sa-inbound-ahead", from_site, to_site)]
        seed = f"sa|{vpn}|{from_site}|{to_site}|{gen}"
        spi = 256 + int.from_bytes(hashlib.sha256(seed.encode()).digest()[:4], "big") % (
            2**32 - 256
        )
        sa: dict[str, Any] = {
            "spi": spi,
            "encryption-algorithm": suite.encryption,
            "encryption-key": _octets(seed + "|enc", ENCRYPTION_OCTETS[suite.encryption]),
            "lifetime": {"soft-seconds": suite.soft_seconds, "hard-seconds": suite.hard_seconds},
        }
        if suite.integrity is not None:
            sa["integrity-algorithm"] = suite.integrity
            sa["integrity-key"] = _octets(seed + "|int", INTEGRITY_OCTETS[suite.integrity])
        return sa

    def site_certificate(self, vpn: str, site: str) -> tuple[str, str]:
        self.calls["site_certificate"] += 1
        gen = self.generation[("cert", site)]
        return (
            _pem("CERTIFICATE", f"cert|{vpn}|{site}|{gen}"),
            _pem("PRIVATE KEY", f"key|{vpn}|{site}|{gen}"),
        )

    def ca_certificate(self, vpn: str) -> str:
        self.calls["ca_certificate"] += 1
        return _pem("CERTIFICATE", f"ca|{vpn}")

    def identity(self, vpn: str, site: str) -> str:
        self.calls["identity"] += 1
        return f"CN={site},O={vpn}"


def canonical_version(config: Mapping[str, Any]) -> str:
    """What a version is (nc_server/compile_cache.py), computed here from the configuration
    itself: sha256 over the digest of every section but the peers and each peer's digest,
    each digest the sha256 of the canonical JSON."""

    def digest(value: Any) -> bytes:
        text = json.dumps(value, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).digest()

    body = {k: v for k, v in config.items() if k not in ("configuration-version", "peer")}
    parts = [digest(body)] + [digest(entry) for entry in config.get("peer", [])]
    return "v" + hashlib.sha256(b"".join(parts)).hexdigest()[:16]


def validate(configs: Iterable[CeConfig]) -> None:
    """Each configuration is valid cevpn-ce and carries the version of its canonical JSON."""
    for result in configs:
        assert result.config["configuration-version"] == result.version
        assert result.version == canonical_version(result.config)
        assert "pre-configuration" not in result.config
        try:
            _printed(_ce(), json.dumps({"cevpn-ce:ce": result.config}), "json")
        except ValidationFailed as exc:  # pragma: no cover - shown on failure
            pytest.fail(f"{result.site}: {exc}")


def compiled(vpn: Mapping[str, Any], keys: FakeKeys | None = None) -> dict[str, CeConfig]:
    """Compile and validate every configuration."""
    result = compile_vpn(vpn, keys or FakeKeys())
    validate(result.values())
    return result


def peers(result: CeConfig) -> dict[str, dict[str, Any]]:
    return {p["name"]: p for p in result.config.get("peer", [])}


def remote(result: CeConfig, peer: str) -> list[str]:
    prefixes: list[str] = peers(result)[peer]["tunnel"].get("remote-prefix", [])
    return prefixes


# --------------------------------------------------------------------------
# Security strength table
# --------------------------------------------------------------------------

STRENGTHS = [T + f"strength-{bits}" for bits in (80, 112, 128, 192, 256)]


def _derived(base: str) -> list[str]:
    return sorted(i for i, a in identity_ancestors().items() if base in a and i != base)


def test_strength_levels_form_a_chain() -> None:
    for weaker, stronger in itertools.pairwise(STRENGTHS):
        assert meets_strength(stronger, weaker)
        assert not meets_strength(weaker, stronger)
    assert meets_strength(T + "encr-aes-gcm-16-256", T + "strength-256")
    assert not meets_strength(T + "encr-3des", T + "strength-128")
    assert meets_strength(T + "encr-3des", T + "strength-112")


def test_strength_table_agrees_with_the_yang_must_statements() -> None:
    """libyang accepts a CE proposal exactly when the table says it is strong enough."""
    encryptions = _derived(T + "encryption-algorithm")
    groups = _derived(T + "dh-group")
    assert T + "encr-aes-cbc-128" in encryptions and T + "modp-1024" in groups
    outcomes: Counter[bool] = Counter()
    for minimum in STRENGTHS:
        proposals = [
            {"encryption": e}
            if meets_strength(e, T + "aead-algorithm")
            else {"encryption": e, "integrity": T + "auth-hmac-sha2-512-256"}
            for e in encryptions
            if e != T + "aead-algorithm"
        ] + [{"encryption": T + "encr-aes-gcm-16-256", "pfs-group": g} for g in groups]
        for proposal in proposals:
            doc = {
                "cevpn-ce:ce": {
                    "minimum-strength": minimum,
                    "sa-defaults": {"esp": {"proposal": [{"id": 1, **proposal}]}},
                }
            }
            algorithm = proposal.get("pfs-group", proposal["encryption"])
            try:
                _printed(_ce(), json.dumps(doc), "json")
                accepted = True
            except ValidationFailed:
                accepted = False
            assert accepted == meets_strength(algorithm, minimum), (algorithm, minimum)
            outcomes[accepted] += 1
    assert outcomes[True] > 10 and outcomes[False] > 10


# --------------------------------------------------------------------------
# Topologies
# --------------------------------------------------------------------------


def test_full_mesh_pairs_every_two_sites() -> None:
    assert tunnel_pairs(mesh(4)) == {
        ("site-1", "site-2"),
        ("site-1", "site-3"),
        ("site-1", "site-4"),
        ("site-2", "site-3"),
        ("site-2", "site-4"),
        ("site-3", "site-4"),
    }


def test_hub_and_spoke_pairs_hubs_with_everyone_and_no_spoke_pairs() -> None:
    assert tunnel_pairs(hub_and_spoke(2, 2)) == {
        ("hub-1", "hub-2"),
        ("hub-1", "spoke-1"),
        ("hub-1", "spoke-2"),
        ("hub-2", "spoke-1"),
        ("hub-2", "spoke-2"),
    }


def test_explicit_topology_pairs_are_exactly_the_links() -> None:
    vpn = example_vpns("service-three-vpns.xml")["initech"]
    assert tunnel_pairs(vpn) == {("berlin", "paris"), ("madrid", "paris")}
    result = compiled(vpn)
    assert list(peers(result["paris"])) == ["berlin", "madrid"]
    assert list(peers(result["berlin"])) == ["paris"]
    assert list(peers(result["madrid"])) == ["paris"]


def test_full_mesh_peers_sorted_with_addresses_and_prefixes() -> None:
    vpn = parse_vpn(
        vpn_doc(
            [
                site("c", 3),
                site("a", 1, prefixes=["10.1.0.0/24", "10.1.8.0/22"]),
                site("b", 2),
            ]
        )
    )
    result = compiled(vpn)
    assert list(result) == ["a", "b", "c"]
    assert [p["name"] for p in result["c"].config["peer"]] == ["a", "b"]
    entry = peers(result["b"])["a"]
    assert entry["sp-address"] == "192.0.2.1"
    assert entry["tunnel"] == {
        "establishment": "permanent",
        "encapsulation": "transport-ipip",
        "dynamic-routing": False,
        "remote-prefix": ["10.1.0.0/24", "10.1.8.0/22"],
    }


def test_hub_and_spoke_one_hub_routes_spoke_traffic_through_the_hub() -> None:
    result = compiled(hub_and_spoke(1, 3))
    assert list(peers(result["spoke-1"])) == ["hub-1"]
    assert remote(result["spoke-1"], "hub-1") == ["10.101.0.0/24", "10.2.0.0/24", "10.3.0.0/24"]
    assert list(peers(result["hub-1"])) == ["spoke-1", "spoke-2", "spoke-3"]
    assert remote(result["hub-1"], "spoke-2") == ["10.2.0.0/24"]


def test_hub_and_spoke_two_hubs_other_spokes_only_via_the_smallest_hub() -> None:
    result = compiled(hub_and_spoke(2, 2))
    assert remote(result["spoke-1"], "hub-1") == ["10.101.0.0/24", "10.2.0.0/24"]
    assert remote(result["spoke-1"], "hub-2") == ["10.102.0.0/24"]
    assert remote(result["hub-1"], "hub-2") == ["10.102.0.0/24"]
    assert remote(result["hub-2"], "hub-1") == ["10.101.0.0/24"]
    assert remote(result["hub-2"], "spoke-1") == ["10.1.0.0/24"]
    assert list(peers(result["hub-2"])) == ["hub-1", "spoke-1", "spoke-2"]


def test_repeated_prefixes_appear_once_in_a_remote_prefix_list() -> None:
    vpn = parse_vpn(
        vpn_doc(
            [
                site("hub", 1, role="hub"),
                site("s1", 2, role="spoke", prefixes=["10.9.0.0/24"]),
                site("s2", 3, role="spoke", prefixes=["10.9.0.0/24"]),
                site("s3", 4, role="spoke"),
            ],
            topology={"type": "hub-and-spoke"},
        )
    )
    result = compiled(vpn)
    assert remote(result["s3"], "hub") == ["10.1.0.0/24", "10.9.0.0/24"]


# --------------------------------------------------------------------------
# Keying
# --------------------------------------------------------------------------


def test_pre_shared_key_is_the_same_at_both_ends_and_asked_once_per_pair() -> None:
    keys = FakeKeys()
    result = compiled(mesh(4), keys)
    a = peers(result["site-1"])["site-3"]["ike"]["pre-shared-key"]
    b = peers(result["site-3"])["site-1"]["ike"]["pre-shared-key"]
    assert a == b == keys.pre_shared_key("acme", "site-3", "site-1", 32)
    assert keys.calls["pre_shared_key"] == 6 + 1


def test_explicit_pre_shared_keys_override_the_key_source() -> None:
    vpn = example_vpns("service-three-vpns.xml")["acme"]
    result = compiled(vpn)
    assert (
        peers(result["site-b"])["site-a"]["ike"]["pre-shared-key"]
        == "r4I8w7BDOiuVAeY7I39QON7DzY7P5_AdHd3PhS3N"
    )
    assert (
        peers(result["site-c"])["site-b"]["ike"]["pre-shared-key"]
        == "wFDYlrjptu_UGrd6RsllcG5EKKJQeOzvyNKAB5-a"
    )


def test_certificate_authentication_gives_identities_and_certificates() -> None:
    keys = FakeKeys()
    vpn = mesh(3, **{"security-profile": {"authentication": "certificate"}})
    result = compiled(vpn, keys)
    assert peers(result["site-1"])["site-2"]["ike"] == {"peer-identity": "CN=site-2,O=acme"}
    certificates = result["site-2"].config["certificates"]
    assert (certificates["certificate"], certificates["private-key"]) == keys.site_certificate(
        "acme", "site-2"
    )
    assert certificates["ca-certificate"] == [
        {"name": CA_CERTIFICATE_NAME, "certificate": keys.ca_certificate("acme")}
    ]


def test_explicit_ca_and_site_certificate_override_the_key_source() -> None:
    vpn = example_vpns("service-three-vpns.xml")["globex"]
    cert, key = FakeKeys().site_certificate("other", "x")
    vpn["keys"]["site-certificate"] = [{"site": "hq", "certificate": cert, "private-key": key}]
    result = compiled(vpn)
    ca = vpn["keys"]["ca"]["certificate"]
    assert result["shop-1"].config["certificates"]["ca-certificate"][0]["certificate"] == ca
    assert result["hq"].config["certificates"]["certificate"] == cert
    assert result["hq"].config["certificates"]["private-key"] == key


def test_explicit_site_certificate_without_private_key_is_refused() -> None:
    vpn = example_vpns("service-three-vpns.xml")["globex"]
    cert, _ = FakeKeys().site_certificate("other", "x")
    vpn["keys"]["site-certificate"] = [{"site": "hq", "certificate": cert}]
    with pytest.raises(CompileError) as caught:
        compile_vpn(vpn, FakeKeys())
    assert caught.value.site == "hq"


def test_pre_shared_key_vpn_has_no_certificates() -> None:
    result = compiled(mesh(2))
    assert "certificates" not in result["site-1"].config


def test_ikeless_outbound_is_the_senders_sa_and_inbound_the_receivers() -> None:
    keys = FakeKeys()
    vpn = mesh(3, keying="ikeless", **{"tunnel-defaults": {"ikeless-rekey-interval": 600}})
    suite = SaSuite(T + "encr-aes-gcm-16-256", None, 1200, 1800)
    keys.rotate("sa-inbound-ahead", "site-2", "site-1")  # a rekey of 2 -> 1 under way
    result = compiled(vpn, keys)
    at_1 = peers(result["site-1"])["site-2"]["ikeless"]
    at_2 = peers(result["site-2"])["site-1"]["ikeless"]
    assert at_1["outbound"] == keys.ikeless_sa("acme", "site-1", "site-2", "outbound", suite)
    assert at_1["inbound"] == keys.ikeless_sa("acme", "site-2", "site-1", "inbound", suite)
    assert at_2["inbound"] == at_1["outbound"]  # no rekey of 1 -> 2: the same SA
    assert at_2["outbound"] != at_1["inbound"]  # new inbound SA installed first
    assert at_1["outbound"]["lifetime"] == {"soft-seconds": 1200, "hard-seconds": 1800}
    assert "ike" not in peers(result["site-1"])["site-2"]


def test_ikeless_suite_from_the_first_esp_proposal() -> None:
    profile = {
        "esp": {
            "proposal": [
                {
                    "id": 2,
                    "encryption": T + "encr-aes-gcm-16-128",
                },
                {
                    "id": 1,
                    "encryption": T + "encr-aes-cbc-256",
                    "integrity": T + "auth-hmac-sha2-256-128",
                },
            ],
            "replay-window": 2048,
        }
    }
    vpn = mesh(2, keying="ikeless", **{"security-profile": profile})
    assert sa_suite(vpn) == SaSuite(
        T + "encr-aes-cbc-256", T + "auth-hmac-sha2-256-128", 7200, 10800
    )
    result = compiled(vpn)
    ikeless = peers(result["site-1"])["site-2"]["ikeless"]
    assert ikeless["outbound"]["integrity-algorithm"] == T + "auth-hmac-sha2-256-128"
    assert ikeless["replay-window"] == 2048


def test_ikeless_suite_defaults_to_aes_gcm_256() -> None:
    assert sa_suite(mesh(2, keying="ikeless")) == SaSuite(
        T + "encr-aes-gcm-16-256", None, 7200, 10800
    )


def test_explicit_ikeless_sas_override_the_key_source() -> None:
    vpn = example_vpns("service-ikeless.json")["factory"]
    result = compiled(vpn)
    at_1 = peers(result["plant-1"])["plant-2"]["ikeless"]
    at_2 = peers(result["plant-2"])["plant-1"]["ikeless"]
    assert at_1["outbound"]["spi"] == at_2["inbound"]["spi"] == 825360385
    assert at_1["inbound"]["spi"] == at_2["outbound"]["spi"] == 842072065
    assert "created" not in at_1["outbound"]
    assert peers(result["plant-1"])["plant-2"]["tunnel"]["encapsulation"] == "tunnel-mode"


# --------------------------------------------------------------------------
# Routing and Internet access
# --------------------------------------------------------------------------


def test_ospf_routing_has_dynamic_tunnels_and_no_remote_prefixes() -> None:
    vpn = mesh(3, routing={"protocol": "ospf", "ospf-area": "0.0.0.7"})
    result = compiled(vpn)
    tunnel = peers(result["site-1"])["site-2"]["tunnel"]
    assert tunnel["dynamic-routing"] is True
    assert "remote-prefix" not in tunnel
    assert result["site-1"].config["routing"]["dynamic"] == {
        "protocol": "ospf",
        # The VPN's timers, its YANG defaults here, given explicitly.
        "ospf": {"area": "0.0.0.7", "hello-interval": 10, "dead-interval": 40},
    }


def test_vpn_ospf_timers_reach_every_ce() -> None:
    vpn = mesh(
        3,
        routing={"protocol": "ospf", "ospf-hello-interval": 2, "ospf-dead-interval": 8},
    )
    result = compiled(vpn)
    for site in ("site-1", "site-2", "site-3"):
        assert result[site].config["routing"]["dynamic"]["ospf"] == {
            "area": "0.0.0.0",
            "hello-interval": 2,
            "dead-interval": 8,
        }


def test_static_routing_declares_protocol_none() -> None:
    result = compiled(mesh(2))
    assert result["site-1"].config["routing"]["dynamic"] == {"protocol": "none"}
    assert peers(result["site-1"])["site-2"]["tunnel"]["dynamic-routing"] is False


def test_router_id_given_derived_or_absent() -> None:
    vpn = parse_vpn(
        vpn_doc(
            [
                site("a", 1, **{"router-id": "1.1.1.1"}),
                site("b", 2, prefixes=["fd00:2::/64", "10.2.4.0/22"]),
                site("c", 3, prefixes=["fd00:3::/64"]),
                site("d", 4, prefixes=["10.4.4.4/32"]),
            ]
        )
    )
    result = compiled(vpn)
    assert result["a"].config["routing"]["router-id"] == "1.1.1.1"
    assert result["b"].config["routing"]["router-id"] == "10.2.4.1"
    assert "router-id" not in result["c"].config["routing"]
    assert result["d"].config["routing"]["router-id"] == "10.4.4.4"
    assert result["b"].config["routing"]["local-prefix"] == ["fd00:2::/64", "10.2.4.0/22"]


def test_internet_gateway_with_static_routing() -> None:
    vpn = mesh(4, **{"internet-gateway": ["site-3", "site-2"]})
    result = compiled(vpn)
    for gateway in ("site-2", "site-3"):
        assert result[gateway].config["internet-access"] == {
            "role": "integrated-gateway",
            "integrated-gateway": {"nat": True, "originate-default": False},
        }
        assert "0.0.0.0/0" not in remote(result[gateway], "site-1")
    assert result["site-1"].config["internet-access"] == {
        "role": "via-gateway-site",
        "gateway-peer": "site-2",
    }
    assert remote(result["site-1"], "site-2") == ["10.2.0.0/24", "0.0.0.0/0"]
    assert remote(result["site-1"], "site-3") == ["10.3.0.0/24"]
    assert remote(result["site-4"], "site-2")[-1] == "0.0.0.0/0"


def test_internet_gateway_with_ospf_originates_the_default() -> None:
    vpn = example_vpns("service-three-vpns.xml")["acme"]
    result = compiled(vpn)
    assert result["site-c"].config["internet-access"]["integrated-gateway"] == {
        "nat": True,
        "originate-default": True,
    }
    assert result["site-a"].config["internet-access"] == {
        "role": "via-gateway-site",
        "gateway-peer": "site-c",
    }
    assert "remote-prefix" not in peers(result["site-a"])["site-c"]["tunnel"]


def test_no_gateway_in_reach_means_no_internet_access() -> None:
    vpn = example_vpns("service-three-vpns.xml")["initech"]
    assert compiled(vpn)["paris"].config["internet-access"] == {"role": "none"}
    vpn["internet-gateway"] = ["madrid"]
    result = compiled(vpn)
    assert result["berlin"].config["internet-access"] == {"role": "none"}  # no link to madrid
    assert result["paris"].config["internet-access"]["gateway-peer"] == "madrid"


def test_hub_and_spoke_spokes_reach_a_hub_gateway() -> None:
    vpn = hub_and_spoke(1, 2, **{"internet-gateway": ["hub-1"]})
    result = compiled(vpn)
    assert result["spoke-2"].config["internet-access"]["gateway-peer"] == "hub-1"
    assert remote(result["spoke-2"], "hub-1")[-1] == "0.0.0.0/0"


# --------------------------------------------------------------------------
# Profile, timers and overrides
# --------------------------------------------------------------------------


def test_sa_defaults_are_the_profile_with_the_tunnel_dpd() -> None:
    vpn = example_vpns("service-three-vpns.xml")["acme"]
    config = compiled(vpn)["site-a"].config
    assert config["minimum-strength"] == T + "strength-128"
    ike = config["sa-defaults"]["ike"]
    assert ike["proposal"] == vpn["security-profile"]["ike"]["proposal"]
    assert ike["dpd"] == {"delay": 30, "timeout": 150}
    assert config["sa-defaults"]["esp"] == vpn["security-profile"]["esp"]
    assert config["retry-policy"] == {
        "minimum-wait": 5,
        "t1": 10,
        "backoff-factor": "2.0",
        "limit": 600,
    }


def test_empty_esp_section_is_left_out() -> None:
    config = compiled(mesh(2))["site-1"].config
    assert "esp" not in config["sa-defaults"]


def test_site_overrides_of_dpd_and_retry_policy() -> None:
    vpn = parse_vpn(
        vpn_doc(
            [
                site(
                    "a",
                    1,
                    overrides={
                        "dpd": {"delay": 5},
                        "retry-policy": {"t1": 20, "backoff-factor": "1.5"},
                    },
                ),
                site("b", 2),
            ],
            **{"security-profile": {"site-overridable": ["dpd", "retry-policy"]}},
        )
    )
    result = compiled(vpn)
    assert result["a"].config["sa-defaults"]["ike"]["dpd"] == {"delay": 5, "timeout": 150}
    assert result["a"].config["retry-policy"] == {
        "minimum-wait": 5,
        "t1": 20,
        "backoff-factor": "1.5",
        "limit": 600,
    }
    assert result["b"].config["retry-policy"]["t1"] == 10


def _tunnels(result: Mapping[str, CeConfig], a: str, b: str) -> tuple[Any, Any]:
    """The parameters both ends negotiate (everything but the routes), at a and at b."""

    def negotiated(tunnel: Mapping[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in tunnel.items() if k != "remote-prefix"}

    return negotiated(peers(result[a])[b]["tunnel"]), negotiated(peers(result[b])[a]["tunnel"])


def test_overrides_agree_at_both_ends_the_smaller_id_wins() -> None:
    allowed = {"site-overridable": ["establishment", "encapsulation"]}
    vpn = parse_vpn(
        vpn_doc(
            [
                site("a", 1, overrides={"encapsulation": "tunnel-mode"}),
                site(
                    "b",
                    2,
                    overrides={
                        "encapsulation": "transport-ipip",
                        "establishment": "traffic-driven",
                        "idle-timeout": 60,
                    },
                ),
                site("c", 3),
            ],
            **{"security-profile": allowed},
        )
    )
    result = compiled(vpn)
    ab, ba = _tunnels(result, "a", "b")
    assert ab == ba
    assert ab["encapsulation"] == "tunnel-mode"  # a's, the smaller id
    assert (ab["establishment"], ab["idle-timeout"]) == ("traffic-driven", 60)  # only b has one
    bc, cb = _tunnels(result, "b", "c")
    assert bc == cb
    assert bc["encapsulation"] == "transport-ipip"
    ac, ca = _tunnels(result, "a", "c")
    assert ac["encapsulation"] == ca["encapsulation"] == "tunnel-mode"
    assert "idle-timeout" not in ac


def test_overrides_agree_at_both_ends_a_hub_wins() -> None:
    vpn = parse_vpn(
        vpn_doc(
            [
                site("z-hub", 100, role="hub", overrides={"encapsulation": "tunnel-mode"}),
                site("a-spoke", 1, role="spoke", overrides={"encapsulation": "transport-ipip"}),
            ],
            topology={"type": "hub-and-spoke"},
            **{"security-profile": {"site-overridable": ["encapsulation"]}},
        )
    )
    result = compiled(vpn)
    hub_side, spoke_side = _tunnels(result, "z-hub", "a-spoke")
    assert hub_side["encapsulation"] == spoke_side["encapsulation"] == "tunnel-mode"


def test_traffic_driven_default_with_idle_timeout() -> None:
    vpn = example_vpns("service-three-vpns.xml")["initech"]
    tunnel = peers(compiled(vpn)["berlin"])["paris"]["tunnel"]
    assert (tunnel["establishment"], tunnel["idle-timeout"]) == ("traffic-driven", 600)


# --------------------------------------------------------------------------
# Refusals
# --------------------------------------------------------------------------


def test_weak_profile_proposal_is_refused() -> None:
    vpn = example_vpns("service-three-vpns.xml")["globex"]
    vpn["security-profile"]["esp"]["proposal"][0]["encryption"] = T + "encr-aes-gcm-16-128"
    with pytest.raises(CompileError, match="weaker than the VPN's minimum-strength") as caught:
        compile_vpn(vpn, FakeKeys())
    assert caught.value.vpn == "globex"


def test_weak_ikeless_suite_is_refused() -> None:
    """The suite is the first ESP proposal: refused as a proposal, before any SA is made."""
    vpn = mesh(2, keying="ikeless")
    vpn["security-profile"]["minimum-strength"] = T + "strength-256"
    vpn["security-profile"]["esp"] = {"proposal": [{"id": 1, "encryption": T + "encr-3des"}]}
    keys = FakeKeys()
    with pytest.raises(CompileError, match="esp proposal 1 encryption"):
        compile_vpn(vpn, keys)
    assert keys.calls["ikeless_sa"] == 0


def test_weak_explicit_ikeless_sa_is_refused() -> None:
    vpn = example_vpns("service-ikeless.json")["factory"]
    sa = vpn["keys"]["ikeless-sa"][0]
    sa["encryption-algorithm"] = T + "encr-aes-gcm-16-128"
    sa["encryption-key"] = _octets("x", 20)
    with pytest.raises(CompileError, match="keys/ikeless-sa"):
        compile_vpn(vpn, FakeKeys())


def test_weak_sa_from_the_key_source_is_refused() -> None:
    class WeakKeys(FakeKeys):
        def ikeless_sa(
            self,
            vpn: str,
            from_site: str,
            to_site: str,
            direction: Literal["outbound", "inbound"],
            suite: SaSuite,
        ) -> dict[str, Any]:
            weak = SaSuite(T + "encr-aes-cbc-128", T + "auth-hmac-sha1-96", 1, 2)
            return super().ikeless_sa(vpn, from_site, to_site, direction, weak)

    with pytest.raises(CompileError, match="outbound SA"):
        compile_vpn(mesh(2, keying="ikeless"), WeakKeys())


def test_short_pre_shared_key_from_the_key_source_is_refused() -> None:
    keys = FakeKeys()
    keys.psk_length = 20
    with pytest.raises(CompileError, match="psk-min-length"):
        compile_vpn(mesh(2), keys)


def test_hub_and_spoke_without_hub_is_refused() -> None:
    vpn = hub_and_spoke(1, 2)
    vpn["site"][0]["role"] = "spoke"
    with pytest.raises(CompileError, match="hub"):
        compile_vpn(vpn, FakeKeys())
    with pytest.raises(CompileError):
        tunnel_pairs(vpn)


def test_site_without_ce_address_is_refused() -> None:
    vpn = mesh(2)
    del vpn["site"][1]["ce-address"]
    with pytest.raises(CompileError, match="ce-address") as caught:
        compile_vpn(vpn, FakeKeys())
    assert caught.value.site == "site-2"


def test_override_the_profile_does_not_allow_is_refused() -> None:
    vpn = mesh(2)
    vpn["site"][0]["overrides"] = {"encapsulation": "tunnel-mode"}
    with pytest.raises(CompileError, match="does not let sites override") as caught:
        compile_vpn(vpn, FakeKeys())
    assert caught.value.site == "site-1"


def test_traffic_driven_ikeless_tunnels_are_refused() -> None:
    vpn = mesh(2, keying="ikeless")
    vpn["tunnel-defaults"]["establishment"] = "traffic-driven"
    with pytest.raises(CompileError, match="IKE-less SAs are always permanent"):
        compile_vpn(vpn, FakeKeys())


def test_ospf_through_tunnel_mode_is_refused() -> None:
    vpn = mesh(2, routing={"protocol": "ospf"})
    vpn["tunnel-defaults"]["encapsulation"] = "tunnel-mode"
    with pytest.raises(CompileError, match="OSPF through the tunnels needs"):
        compile_vpn(vpn, FakeKeys())


def test_failed_compile_keeps_the_previous_cache() -> None:
    compiler = VpnCompiler(FakeKeys())
    vpn = mesh(3)
    first = compiler.compile(vpn)
    broken = copy.deepcopy(vpn)
    del broken["site"][2]["ce-address"]
    with pytest.raises(CompileError):
        compiler.compile(broken)
    builds = compiler.peer_builds
    assert compiler.compile(vpn) == first
    assert compiler.peer_builds == builds


# --------------------------------------------------------------------------
# Determinism and versions
# --------------------------------------------------------------------------


def test_same_input_gives_the_same_output_byte_for_byte() -> None:
    vpn = example_vpns("service-three-vpns.xml")["acme"]
    one = compile_vpn(vpn, FakeKeys())
    two = compile_vpn(copy.deepcopy(vpn), FakeKeys())
    assert list(one) == list(two)
    for name in one:
        assert one[name].version == two[name].version
        assert json.dumps(one[name].config) == json.dumps(two[name].config)


def test_a_changed_input_changes_the_versions_it_touches() -> None:
    vpn = mesh(3)
    before = compile_vpn(vpn, FakeKeys())
    vpn["site"][0]["local-prefix"] = ["10.99.0.0/24"]
    after = compiled(vpn)
    assert all(before[s].version != after[s].version for s in before)


def test_version_is_the_sha256_of_the_digests_of_the_canonical_json() -> None:
    result = compiled(hub_and_spoke(2, 2, **{"internet-gateway": ["spoke-2"]}))
    for config in result.values():
        assert config.version.startswith("v") and len(config.version) == 17
        assert config.version == canonical_version(config.config)


def test_a_site_without_tunnels_still_compiles() -> None:
    vpn = parse_vpn(vpn_doc([site("alone", 1)]))
    result = compiled(vpn)
    assert "peer" not in result["alone"].config


# --------------------------------------------------------------------------
# Incremental compilation on small VPNs
# --------------------------------------------------------------------------


def test_recompiling_unchanged_input_builds_nothing_and_diffs_empty() -> None:
    compiler = VpnCompiler(FakeKeys())
    vpn = mesh(4)
    first = compiler.compile(vpn)
    builds = compiler.peer_builds
    assert builds == 12
    second = compiler.compile(copy.deepcopy(vpn))
    assert compiler.peer_builds == builds
    assert all(second[s] is first[s] for s in first)
    assert diff_configs(first, second) == {}


def test_forgetting_a_vpn_rebuilds_it_from_scratch() -> None:
    compiler = VpnCompiler(FakeKeys())
    vpn = mesh(3)
    first = compiler.compile(vpn)
    compiler.forget("acme")
    second = compiler.compile(vpn)
    assert compiler.peer_builds == 12
    assert {s: r.version for s, r in first.items()} == {s: r.version for s, r in second.items()}


def test_rotating_one_pre_shared_key_rebuilds_the_two_entries_of_that_pair() -> None:
    keys = FakeKeys()
    compiler = VpnCompiler(keys)
    vpn = mesh(4)
    first = compiler.compile(vpn)
    builds = compiler.peer_builds
    keys.rotate("psk", "site-2", "site-4")
    second = compiler.compile(vpn)
    assert compiler.peer_builds - builds == 2
    delta = diff_configs(first, second)
    assert set(delta) == {"site-2", "site-4"}
    assert delta["site-2"].changed_peers == ("site-4",)
    assert delta["site-4"].changed_peers == ("site-2",)
    validate(second.values())


def test_rotating_an_ikeless_sa_changes_both_ends() -> None:
    keys = FakeKeys()
    compiler = VpnCompiler(keys)
    vpn = mesh(3, keying="ikeless")
    first = compiler.compile(vpn)
    builds = compiler.peer_builds
    keys.rotate("sa", "site-1", "site-3")
    second = compiler.compile(vpn)
    assert compiler.peer_builds - builds == 2
    assert {s: d.changed_peers for s, d in diff_configs(first, second).items()} == {
        "site-1": ("site-3",),
        "site-3": ("site-1",),
    }


def test_removing_a_site_removes_it_from_every_peer_list() -> None:
    compiler = VpnCompiler(FakeKeys())
    vpn = mesh(4)
    first = compiler.compile(vpn)
    builds = compiler.peer_builds
    smaller = copy.deepcopy(vpn)
    smaller["site"] = [s for s in vpn["site"] if s["id"] != "site-3"]
    second = compiler.compile(smaller)
    assert compiler.peer_builds == builds
    delta = diff_configs(first, second)
    assert delta["site-3"].removed_site
    assert delta["site-3"].removed_peers == ("site-1", "site-2", "site-4")
    for other in ("site-1", "site-2", "site-4"):
        assert delta[other].removed_peers == ("site-3",)
        assert delta[other].added_peers == delta[other].changed_peers == ()
        assert delta[other].changed_sections == ()


def test_prefix_change_in_hub_and_spoke_updates_every_entry_that_carries_it() -> None:
    compiler = VpnCompiler(FakeKeys())
    vpn = hub_and_spoke(2, 3)
    first = compiler.compile(vpn)
    builds = compiler.peer_builds
    changed = copy.deepcopy(vpn)
    spoke_1 = next(s for s in changed["site"] if s["id"] == "spoke-1")
    spoke_1["local-prefix"] = ["10.77.0.0/24"]
    second = compiler.compile(changed)
    validate(second.values())
    delta = diff_configs(first, second)
    # The hubs route spoke-1's prefixes to it; the other spokes reach them via hub-1.
    assert delta["hub-1"].changed_peers == ("spoke-1",)
    assert delta["hub-2"].changed_peers == ("spoke-1",)
    assert delta["spoke-2"].changed_peers == ("hub-1",)
    assert delta["spoke-3"].changed_peers == ("hub-1",)
    assert "10.77.0.0/24" in remote(second["spoke-2"], "hub-1")
    assert "10.1.0.0/24" not in remote(second["spoke-2"], "hub-1")
    # spoke-1's own entries do not carry its prefixes; its routing section does.
    assert delta["spoke-1"].changed_peers == ()
    assert delta["spoke-1"].changed_sections == ("routing",)
    # Rebuilt: two hubs' entries for spoke-1, three spokes' entries for hub-1.
    assert compiler.peer_builds - builds == 5


def test_changing_a_vpn_default_rebuilds_every_entry() -> None:
    compiler = VpnCompiler(FakeKeys())
    vpn = mesh(3)
    first = compiler.compile(vpn)
    builds = compiler.peer_builds
    vpn["tunnel-defaults"]["encapsulation"] = "tunnel-mode"
    second = compiler.compile(vpn)
    assert compiler.peer_builds - builds == 6
    deltas = diff_configs(first, second).values()
    assert all(d.changed_peers and not d.changed_sections for d in deltas)


# --------------------------------------------------------------------------
# Every topology and keying validates against cevpn-ce
# --------------------------------------------------------------------------

SCENARIOS: dict[str, Any] = {
    "full-mesh-psk": lambda: mesh(4),
    "full-mesh-ospf-gateway": lambda: example_vpns("service-three-vpns.xml")["acme"],
    "hub-and-spoke-certificates": lambda: example_vpns("service-three-vpns.xml")["globex"],
    "explicit-traffic-driven": lambda: example_vpns("service-three-vpns.xml")["initech"],
    "full-mesh-ikeless": lambda: example_vpns("service-ikeless.json")["factory"],
    "hub-and-spoke-two-hubs-ikeless-cbc": lambda: hub_and_spoke(
        2,
        3,
        keying="ikeless",
        **{
            "security-profile": {
                "esp": {
                    "proposal": [
                        {
                            "id": 1,
                            "encryption": T + "encr-aes-cbc-128",
                            "integrity": T + "auth-hmac-sha2-256-128",
                        }
                    ]
                }
            }
        },
    ),
    "hub-and-spoke-ospf-certificates": lambda: hub_and_spoke(
        1,
        2,
        routing={"protocol": "ospf"},
        **{"security-profile": {"authentication": "certificate"}, "internet-gateway": ["hub-1"]},
    ),
    "explicit-psk-gateway": lambda: parse_vpn(
        vpn_doc(
            [site("a", 1), site("b", 2), site("c", 3, prefixes=["fd00:3::/64"])],
            topology={
                "type": "explicit",
                "link": [{"site-a": "a", "site-b": "b"}, {"site-a": "c", "site-b": "b"}],
            },
            **{"internet-gateway": ["b"]},
        )
    ),
}


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_every_compiled_configuration_validates_against_cevpn_ce(scenario: str) -> None:
    vpn = SCENARIOS[scenario]()
    result = compiled(vpn)  # validates every site
    assert set(result) == {s["id"] for s in vpn["site"]}
    pairs = tunnel_pairs(vpn)
    assert sum(len(peers(r)) for r in result.values()) == 2 * len(pairs)


# --------------------------------------------------------------------------
# 1,000-site full mesh
# --------------------------------------------------------------------------

BIG = 1000


def _big_site(template: Mapping[str, Any], i: int) -> dict[str, Any]:
    entry = copy.deepcopy(dict(template))
    entry.update(
        {
            "id": f"s{i:04d}",
            "ce-address": f"100.64.{i // 256}.{i % 256}",
            "local-prefix": [f"10.{i // 256}.{i % 256}.0/24"],
        }
    )
    return entry


@dataclass
class BigMesh:
    base: dict[str, CeConfig]
    grown: dict[str, CeConfig]
    shrunk: dict[str, CeConfig]
    builds: tuple[int, int, int]
    seconds: tuple[float, float, float]
    psk_calls: int


@pytest.fixture(scope="module")
def big_mesh() -> BigMesh:
    """Compile 1,000 sites, add one, then remove another, with one compiler.

    libyang validates a 1,000-site VPN in seconds (each site's uniqueness
    must is O(n)), so the site entries are cloned from one libyang has printed.
    """
    template = parse_vpn(vpn_doc([site("s0", 1), site("s1", 2)]))
    keys = FakeKeys()
    compiler = VpnCompiler(keys)
    vpn = {**template, "site": [_big_site(template["site"][0], i) for i in range(BIG)]}
    seconds: list[float] = []
    builds: list[int] = []

    def timed(v: dict[str, Any]) -> dict[str, CeConfig]:
        start, before = time.perf_counter(), compiler.peer_builds
        out = compiler.compile(v)
        seconds.append(time.perf_counter() - start)
        builds.append(compiler.peer_builds - before)
        return out

    base = timed(vpn)
    psk_calls = keys.calls["pre_shared_key"]
    grown_vpn = {**vpn, "site": [*vpn["site"], _big_site(template["site"][0], BIG)]}
    grown = timed(grown_vpn)
    shrunk_vpn = {**grown_vpn, "site": [s for s in grown_vpn["site"] if s["id"] != "s0500"]}
    shrunk = timed(shrunk_vpn)
    print(f"\n1,000-site mesh: compile/add/remove seconds {seconds}, peer builds {builds}")
    return BigMesh(
        base,
        grown,
        shrunk,
        (builds[0], builds[1], builds[2]),
        (seconds[0], seconds[1], seconds[2]),
        psk_calls,
    )


def test_thousand_site_mesh_compiles_every_peer_entry(big_mesh: BigMesh) -> None:
    assert len(big_mesh.base) == BIG
    assert all(len(r.config["peer"]) == BIG - 1 for r in big_mesh.base.values())
    assert big_mesh.builds[0] == BIG * (BIG - 1)
    assert big_mesh.psk_calls == BIG * (BIG - 1) // 2  # once per pair
    assert len({r.version for r in big_mesh.base.values()}) == BIG
    validate([big_mesh.base["s0000"], big_mesh.base["s0999"]])


def test_adding_a_site_to_the_mesh_builds_only_the_new_tunnels(big_mesh: BigMesh) -> None:
    # The new site's 1,000 entries plus one entry for it in each existing site.
    assert big_mesh.builds[1] == 2 * BIG
    new = big_mesh.grown[f"s{BIG:04d}"]
    assert len(new.config["peer"]) == BIG
    validate([new, big_mesh.grown["s0000"]])


def test_adding_a_site_to_the_mesh_diffs_one_added_peer_per_site(big_mesh: BigMesh) -> None:
    delta = diff_configs(big_mesh.base, big_mesh.grown)
    new = f"s{BIG:04d}"
    assert len(delta) == BIG + 1
    assert delta[new].new_site and len(delta[new].added_peers) == BIG
    for name, site_delta in delta.items():
        if name != new:
            assert site_delta.added_peers == (new,)
            assert site_delta.changed_peers == site_delta.removed_peers == ()
            assert site_delta.changed_sections == ()
            assert not site_delta.new_site


def test_removing_a_site_from_the_mesh_builds_nothing(big_mesh: BigMesh) -> None:
    assert big_mesh.builds[2] == 0
    delta = diff_configs(big_mesh.grown, big_mesh.shrunk)
    assert delta["s0500"].removed_site
    assert len(delta) == BIG + 1
    assert all(d.removed_peers == ("s0500",) for n, d in delta.items() if n != "s0500")
    assert all(len(r.config["peer"]) == BIG - 1 for r in big_mesh.shrunk.values())


def without_changes(configs: Mapping[str, CeConfig]) -> dict[str, CeConfig]:
    """The configurations without what the engine knows of their changes: diff_configs
    then compares them entry by entry, the reference for the changes it was told."""
    return {name: dataclasses.replace(c, changes=None) for name, c in configs.items()}


@pytest.mark.parametrize("new_id", ["s0000", "s0150a", "s9999"])
def test_a_site_added_to_a_few_hundred_site_mesh_gives_the_fresh_compile(new_id: str) -> None:
    """The add-site path (each site's list edited, its hash resumed where the new entry
    sorts: first, in the middle, last) against a compile from nothing."""
    template = parse_vpn(vpn_doc([site("s0", 1), site("s1", 2)]))
    keys = FakeKeys()
    compiler = VpnCompiler(keys)
    count = 300
    vpn = {**template, "site": [_big_site(template["site"][0], i) for i in range(1, count + 1)]}
    before = compiler.compile(vpn)
    added = {**_big_site(template["site"][0], count + 1), "id": new_id}
    grown = {**vpn, "site": [*vpn["site"], added]}
    builds = compiler.peer_builds
    after = compiler.compile(grown)
    assert compiler.peer_builds - builds == 2 * count
    fresh = compile_vpn(grown, keys)
    assert list(after) == list(fresh)
    for name, config in fresh.items():
        assert after[name].version == config.version, name
        assert after[name].config == config.config, name
    validate([after[new_id], after["s0001"], after["s0300"]])
    delta = diff_configs(before, after)
    assert delta == diff_configs(without_changes(before), without_changes(after))
    assert len(delta) == count + 1
    assert delta[new_id].new_site and len(delta[new_id].added_peers) == count
    for name, site_delta in delta.items():
        if name != new_id:
            assert site_delta == SiteDelta(name, added_peers=(new_id,))
