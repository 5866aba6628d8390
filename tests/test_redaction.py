"""Errors never echo a secret's value and never name data the user may not read
(nc_core.redaction); pure logic on the real schemas."""

from __future__ import annotations

import pytest
from lxml import etree

from nc_core.datastore import issue_to_error
from nc_core.errors import RpcError
from nc_core.nacm import Nacm
from nc_core.redaction import for_user
from nc_core.schema import SchemaIndex, SchemaIssue, ce_schema, service_schema

SVC = "urn:cevpn:yang:cevpn-service"
NACM_NS = "urn:ietf:params:xml:ns:yang:ietf-netconf-acm"
KEY_PATH = "/cevpn-service:vpn-service/vpn[id='v']/keys/pre-shared-key[site-a='a'][site-b='b']/key"


@pytest.fixture(scope="module")
def svc_index() -> SchemaIndex:
    return SchemaIndex(service_schema())


@pytest.fixture(scope="module")
def ce_index() -> SchemaIndex:
    return SchemaIndex(ce_schema())


def test_a_rejected_secret_value_is_named_by_its_rule_not_echoed(svc_index):
    issue = SchemaIssue(
        'Unsatisfied length - string "hunter2-short" length is not allowed.', KEY_PATH
    )
    error = issue_to_error(issue, svc_index)
    assert "hunter2-short" not in error.message
    assert "Invalid value of key" in error.message and "16..1024" in error.message
    assert error.path is not None and "pre-shared-key" in error.path


def test_a_must_rule_on_a_secret_keeps_the_schemas_own_message(ce_index):
    text = "The encryption key length does not match the encryption algorithm."
    issue = SchemaIssue(
        text,
        "/cevpn-ce:ce/peer[name='b']/ikeless/inbound/encryption-key",
        app_tag="must-violation",
    )
    assert issue_to_error(issue, ce_index).message == text


def test_values_of_other_nodes_are_still_quoted_for_the_client(svc_index):
    message = 'Invalid value "300x" in "pull-interval" element.'
    issue = SchemaIssue(message, "/cevpn-service:vpn-service/vpn[id='v']/pull-interval")
    assert issue_to_error(issue, svc_index).message == message


def operators_nacm(index: SchemaIndex) -> Nacm:
    nacm = Nacm(index)
    root = etree.fromstring(
        f"""<data xmlns="urn:ietf:params:xml:ns:netconf:base:1.0">
        <nacm xmlns="{NACM_NS}"><groups><group><name>operators</name>
          <user-name>op</user-name></group></groups>
          <rule-list><name>operators</name><group>operators</group>
            <rule><name>no-keys</name><module-name>cevpn-service</module-name>
              <path xmlns:s="{SVC}">/s:vpn-service/s:vpn/s:keys</path>
              <access-operations>read</access-operations><action>deny</action></rule>
            <rule><name>all</name><module-name>cevpn-service</module-name>
              <access-operations>*</access-operations><action>permit</action></rule>
          </rule-list></nacm></data>"""
    )
    nacm.load(root)
    return nacm


def running_with_key() -> etree._Element:
    return etree.fromstring(
        f"""<data xmlns="urn:ietf:params:xml:ns:netconf:base:1.0">
        <vpn-service xmlns="{SVC}"><vpn><id>v</id><keys><pre-shared-key>
          <site-a>a</site-a><site-b>b</site-b><key>0123456789abcdefXYZ</key>
        </pre-shared-key></keys></vpn></vpn-service></data>"""
    )


def key_error(svc_index: SchemaIndex) -> RpcError:
    issue = SchemaIssue(
        'The pre-shared key "0123456789abcdefXYZ" is shorter than psk-min-length allows.',
        KEY_PATH,
        app_tag="must-violation",
    )
    return issue_to_error(issue, svc_index)


def test_an_error_at_a_node_the_user_may_not_read_is_reported_at_its_readable_ancestor(svc_index):
    [error] = for_user(
        [key_error(svc_index)], "op", operators_nacm(svc_index), [running_with_key()]
    )
    assert error.path == "/cevpn-service:vpn-service/cevpn-service:vpn[cevpn-service:id='v']"
    assert "data you may not read" in error.message
    assert "0123456789abcdefXYZ" not in error.message
    assert "psk-min-length" in error.message  # the rule, so the operator can act


def test_an_administrator_sees_the_error_unchanged(svc_index):
    nacm = Nacm(svc_index, recovery_user="root")
    error = key_error(svc_index)
    assert for_user([error], "root", nacm, [running_with_key()]) == [error]


def test_an_error_about_a_node_the_client_is_creating_keeps_its_path(svc_index):
    path = "/cevpn-service:vpn-service/cevpn-service:vpn[cevpn-service:id='new']"
    error = RpcError("invalid-value", "bad", path=path, path_ns={"cevpn-service": SVC})
    assert for_user([error], "op", operators_nacm(svc_index), [running_with_key()]) == [error]
