"""Readers of a configuration find every YANG default, even of a module never configured.

libyang validates with ``validate_present``: defaults are created only for modules that
have data.  A CE agent's datastore holds only accounts until the server's first push, so
without ``Schema.defaults_json`` the agent found no ``cevpn-ce:ce`` defaults at all and
failed to start (CI on f5c94a8: every lab test).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from nc_agent.desired import compile_desired
from nc_core.schema import SchemaIndex, ce_schema, service_schema
from nc_core.transaction import tree_json
from tests.netconf_server import BIN

KEY_ORIGIN = "/cevpn-ce:ce/cevpn-ce:certificates/cevpn-ce:key-origin"


@pytest.fixture(scope="module")
def schema():
    return ce_schema()


def test_an_empty_datastore_reads_the_defaults_of_every_module(schema) -> None:
    config = tree_json(None, schema.defaults_json())
    certs = config["cevpn-ce:ce"]["certificates"]
    assert certs["key-origin"] == SchemaIndex(schema).default(KEY_ORIGIN)


def test_the_service_schema_has_its_own_defaults() -> None:
    assert "cevpn-service:vpn-service" in service_schema().defaults_json()
    assert "cevpn-ce:ce" not in service_schema().defaults_json()


def test_configured_values_are_kept_and_only_missing_modules_are_completed(schema) -> None:
    text = json.dumps({"cevpn-ce:ce": {"certificates": {"key-origin": "ce"}}})
    tree = schema.parse_config(text, "json")
    try:
        config = tree_json(tree, schema.defaults_json())
    finally:
        tree.free()
    assert config["cevpn-ce:ce"]["certificates"]["key-origin"] == "ce"
    assert (
        config["cevpn-ce:ce"]["retry-policy"]
        == (schema.defaults_json()["cevpn-ce:ce"]["retry-policy"])
    )


def test_readers_cannot_corrupt_the_shared_defaults(schema) -> None:
    config = tree_json(None, schema.defaults_json())
    config["cevpn-ce:ce"]["certificates"]["key-origin"] = "ce"
    assert schema.defaults_json()["cevpn-ce:ce"]["certificates"]["key-origin"] == (
        SchemaIndex(schema).default(KEY_ORIGIN)
    )


def test_a_ce_with_no_configuration_compiles_to_no_kernel_objects(schema) -> None:
    desired = compile_desired(tree_json(None, schema.defaults_json()), {})
    assert not desired.peers
    assert desired.credentials.private_key is None


def test_offline_validate_accepts_a_ce_document_without_ce_configuration(tmp_path: Path) -> None:
    """The agent's offline check compiles the kernel state as its start-up does: a
    document with accounts and rules only is the state of every CE before enrolment."""
    document = tmp_path / "accounts-only.json"
    document.write_text(json.dumps({"ietf-netconf-acm:nacm": {"enable-nacm": True}}))
    result = subprocess.run(
        [str(BIN / "cevpn-agent"), "validate", str(document)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.endswith(": valid\n")
