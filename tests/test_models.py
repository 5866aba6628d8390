"""The YANG models: lint-clean, valid instance documents load, invalid ones are
rejected by libyang with the offending node named and a human message (or, for the
rules that span every VPN, by the VPN server's service rules, as `cevpn-server
validate` and a commit refuse them)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from nc_core.schema import SchemaIssue, ValidationFailed
from tests.netconf_server import BIN

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "tests" / "examples"
VALID = sorted((EXAMPLES / "valid").iterdir())
INVALID = sorted((EXAMPLES / "invalid").iterdir())

# file -> (the end of the error path, a fragment of the message)
EXPECTED_REJECTIONS: dict[str, tuple[str, str]] = {
    "ce-malformed-prefix.xml": ("/tunnel/remote-prefix", '"10.2.0.0/33"'),
    "ce-traffic-driven-with-dynamic-routing.xml": (
        "peer[name='site-b']/tunnel/establishment",
        "Traffic-driven establishment cannot be combined with dynamic routing",
    ),
    "ce-weak-proposal.xml": (
        "sa-information/esp/proposal[id='1']/encryption",
        "weaker than the minimum-strength",
    ),
    "ce-psk-too-short.xml": ("ike/pre-shared-key", "length"),
    "ce-default-route-to-non-gateway.xml": (
        "remote-prefix[.='0.0.0.0/0']",
        "only point to the Internet gateway",
    ),
    "ce-peer-without-keying.xml": ("peer/keying", 'choice "keying"'),
    "ce-certificate-auth-without-certificate.xml": (
        "ike/peer-identity",
        "needs this CE's own certificate",
    ),
    "ce-ikeless-one-direction.json": ("peer[name='site-a']/ikeless", "both the inbound and"),
    "ce-ikeless-wrong-key-length.json": (
        "ikeless/outbound/encryption-key",
        "key length does not match",
    ),
    "ce-ikeless-cbc-without-integrity.json": (
        "ikeless/outbound/encryption-algorithm",
        "'integrity-algorithm' is required",
    ),
    "service-psk-shorter-than-profile.xml": (
        "keys/pre-shared-key[site-a='site-a'][site-b='site-b']/key",
        "shorter than the VPN's security-profile/psk-min-length",
    ),
    "service-hub-and-spoke-without-hub.xml": (
        "vpn[id='globex']/topology/type",
        "needs at least one site with role 'hub'",
    ),
    "service-link-to-unknown-site.xml": (
        "link[site-a='berlin'][site-b='lisbon']/site-b",
        '"lisbon"',
    ),
    "service-weak-proposal.xml": (
        "security-profile/ike/proposal[id='1']/encryption",
        "weaker than the minimum-strength",
    ),
    "service-weak-pfs-group.json": (
        "security-profile/esp/proposal[id='1']/pfs-group",
        "weaker than the minimum-strength",
    ),
    "service-override-not-allowed.xml": (
        "site[id='site-a']/overrides/encapsulation",
        "does not let sites override 'encapsulation'",
    ),
    "service-spoke-in-full-mesh.xml": ("site[id='site-a']/role", "the role is 'any'"),
    "service-traffic-driven-with-ospf.json": (
        "tunnel-defaults/establishment",
        "cannot be combined with dynamic routing",
    ),
    "service-ospf-dead-not-longer-than-hello.json": (
        "vpn[id='acme']/routing/ospf-dead-interval",
        "dead interval must be longer than the hello interval",
    ),
    "service-bad-site-id.json": ("vpn[id='acme']/site/id", '"site a"'),
}

# Valid YANG, refused by the VPN server's service rules (nc_server.service_rules: checks
# over all VPNs' sites, one pass, where a YANG must would cost the square of the sites):
# file -> (the end of the error path, a fragment of the message).
SERVICE_RULE_REJECTIONS: dict[str, tuple[str, str]] = {
    "service-duplicate-ce-address.xml": (
        "vpn[cevpn-svc:id='globex']/cevpn-svc:site[cevpn-svc:id='shop-1']/cevpn-svc:ce-address",
        "already has this CE SP address",
    ),
}
YANG_INVALID = [p for p in INVALID if p.name not in SERVICE_RULE_REJECTIONS]
RULE_INVALID = [p for p in INVALID if p.name in SERVICE_RULE_REJECTIONS]


def schema_for(path: Path, ce_schema, service_schema):
    return ce_schema if path.name.startswith("ce-") else service_schema


def test_yang_modules_pass_pyang_lint_and_ietf_checks():
    sys.path.insert(0, str(ROOT / "tools"))
    import lint_yang

    assert lint_yang.findings() == []


def test_every_invalid_example_has_an_expectation():
    assert sorted(p.name for p in INVALID) == sorted(EXPECTED_REJECTIONS | SERVICE_RULE_REJECTIONS)


@pytest.mark.parametrize("path", VALID, ids=lambda p: p.name)
def test_valid_example_loads(path, ce_schema, service_schema):
    tree = schema_for(path, ce_schema, service_schema).parse_config_file(path)
    assert tree is not None


@pytest.mark.parametrize("path", YANG_INVALID, ids=lambda p: p.name)
def test_invalid_example_is_rejected_naming_the_node(path, ce_schema, service_schema):
    with pytest.raises(ValidationFailed) as caught:
        schema_for(path, ce_schema, service_schema).parse_config_file(path)
    path_end, fragment = EXPECTED_REJECTIONS[path.name]
    issue: SchemaIssue = caught.value.issues[0]
    assert issue.path is not None and issue.path.endswith(path_end), issue
    assert fragment in issue.message, issue


@pytest.mark.parametrize("path", RULE_INVALID, ids=lambda p: p.name)
def test_invalid_example_is_refused_by_the_service_rules_naming_the_node(path, service_schema):
    service_schema.parse_config_file(path)  # the YANG alone accepts it
    result = subprocess.run(
        [str(BIN / "cevpn-server"), "validate", str(path)], capture_output=True, text=True
    )
    path_end, fragment = SERVICE_RULE_REJECTIONS[path.name]
    assert result.returncode == 1, result.stderr
    message, where = result.stderr.strip().split("\n    at ")
    assert fragment in message
    assert where.endswith(path_end), where


@pytest.mark.parametrize("path", VALID, ids=lambda p: p.name)
def test_xml_and_json_forms_of_an_example_are_the_same_data(path, ce_schema, service_schema):
    schema = schema_for(path, ce_schema, service_schema)
    tree = schema.parse_config_file(path)
    other = "json" if path.suffix == ".xml" else "xml"
    text = tree.print_mem(other, with_siblings=True)
    again = schema.parse_config(text, other)
    assert json.loads(again.print_mem("json", with_siblings=True)) == json.loads(
        tree.print_mem("json", with_siblings=True)
    )


def test_defaults_follow_the_seed_recommendations(ce_schema):
    # seed 3.4: 'permanent' tunnels are recommended; seed 4.3: transport mode
    # over IP-in-IP when routing runs through the tunnel.
    tree = ce_schema.parse_config(
        '<ce xmlns="urn:cevpn:yang:cevpn-ce"><peer><name>b</name>'
        "<sp-address>192.0.2.2</sp-address><ike><pre-shared-key>"
        "0123456789abcdef0123</pre-shared-key></ike></peer></ce>",
        "xml",
    )
    data = json.loads(tree.print_mem("json", with_siblings=True, include_implicit_defaults=True))
    tunnel = data["cevpn-ce:ce"]["peer"][0]["tunnel"]
    assert tunnel["establishment"] == "permanent"
    assert tunnel["encapsulation"] == "transport-ipip"
    retry = data["cevpn-ce:ce"]["retry-policy"]
    assert (retry["minimum-wait"], retry["t1"], retry["limit"]) == (5, 10, 600)


def test_minimum_strength_default_admits_128_bit_transforms(service_schema):
    tree = service_schema.parse_config(
        json.dumps(
            {
                "cevpn-service:vpn-service": {
                    "vpn": [
                        {
                            "id": "v",
                            "customer": "c",
                            "security-profile": {
                                "ike": {
                                    "proposal": [
                                        {
                                            "id": 1,
                                            "encryption": "cevpn-types:encr-aes-cbc-128",
                                            "prf": "cevpn-types:prf-hmac-sha2-256",
                                            "integrity": "cevpn-types:auth-hmac-sha2-256-128",
                                            "dh-group": "cevpn-types:ecp-256",
                                        }
                                    ]
                                }
                            },
                        }
                    ]
                }
            }
        ),
        "json",
    )
    assert tree is not None


def test_aead_proposal_with_integrity_is_rejected(service_schema):
    doc = {
        "cevpn-service:vpn-service": {
            "vpn": [
                {
                    "id": "v",
                    "customer": "c",
                    "security-profile": {
                        "esp": {
                            "proposal": [
                                {
                                    "id": 1,
                                    "encryption": "cevpn-types:encr-aes-gcm-16-256",
                                    "integrity": "cevpn-types:auth-hmac-sha2-256-128",
                                }
                            ]
                        }
                    },
                }
            ]
        }
    }
    with pytest.raises(ValidationFailed) as caught:
        service_schema.parse_config(json.dumps(doc), "json")
    assert caught.value.issues[0].path.endswith("proposal[id='1']/integrity")
    assert "AEAD" in caught.value.issues[0].message


def test_state_data_is_refused_in_a_configuration_document(ce_schema):
    with pytest.raises(ValidationFailed):
        ce_schema.parse_config(
            '<ce-state xmlns="urn:cevpn:yang:cevpn-ce"><applied-version>1</applied-version>'
            "</ce-state>",
            "xml",
        )


PRECONFIG = """<ce xmlns="urn:cevpn:yang:cevpn-ce"><pre-configuration>
<site-id>a</site-id><vpn-id>v</vpn-id><sp-address>192.0.2.1</sp-address>
<vpn-server>{location}<username>ce-a</username></vpn-server>
<management><server-username>vpn-server</server-username><server-authorized-key>{server_key}\
</server-authorized-key></management></pre-configuration></ce>"""
HOST_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAINNE7SiAB0dX9CNpmIAVxlfhKpncGUay/WKMnEVvJLOU h"
SERVER_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOUExW9Ajh9Sbqm7lpNpatUIlOzK45/zUIRlybyD+Vyp s"


def preconfig(location: str) -> str:
    return PRECONFIG.format(location=location, server_key=SERVER_KEY)


def test_vpn_server_may_be_given_as_a_url_with_a_pinned_host_key(ce_schema):
    location = f"<url>ssh://vpn.example.net:830/site-a</url><url-host-key>{HOST_KEY}</url-host-key>"
    assert ce_schema.parse_config(preconfig(location), "xml") is not None


def test_vpn_server_url_without_a_pinned_host_key_is_refused(ce_schema):
    with pytest.raises(ValidationFailed) as caught:
        ce_schema.parse_config(preconfig("<url>ssh://vpn/a</url>"), "xml")
    assert caught.value.issues[0].path.endswith("url-host-key")


def test_vpn_server_url_must_use_the_ssh_scheme(ce_schema):
    location = f"<url>https://vpn.example.net/a</url><url-host-key>{HOST_KEY}</url-host-key>"
    with pytest.raises(ValidationFailed) as caught:
        ce_schema.parse_config(preconfig(location), "xml")
    assert caught.value.issues[0].path.endswith("vpn-server/url")


def test_pre_configuration_needs_a_vpn_server_location(ce_schema):
    with pytest.raises(ValidationFailed) as caught:
        ce_schema.parse_config(preconfig(""), "xml")
    assert 'choice "location"' in caught.value.issues[0].message
