"""Hand-written test documents completed with their YANG defaults, the way the servers see
their configuration (libyang prints it with implicit defaults).

The agent and the server read defaults from what libyang prints, never from
literals of their own; a test that builds RFC 7951 JSON by hand passes it
through :func:`with_defaults` to get the same shape.
"""

from __future__ import annotations

import functools
import json
from typing import Any

from nc_core.schema import Schema, ce_schema, service_schema
from nc_core.with_defaults import add_implicit_defaults


def _without_empty(value: Any) -> Any:
    """Empty containers say nothing in YANG data, and libyang then gives them no defaults."""
    if isinstance(value, dict):
        kept = {k: _without_empty(v) for k, v in value.items()}
        return {k: v for k, v in kept.items() if v != {}}
    if isinstance(value, list):
        return [_without_empty(v) for v in value]
    return value


@functools.cache
def _schema(kind: str) -> Schema:
    return ce_schema() if kind == "ce" else service_schema()


def with_defaults(document: dict[str, Any], kind: str = "ce") -> dict[str, Any]:
    """``document`` (RFC 7951 JSON, top-level members module-qualified) with every default
    the schema gives filled in.  Only what each node says about itself is checked (the
    document may be a fragment a test needs, not a whole valid configuration)."""
    schema = _schema(kind)
    tree = schema.ctx.parse_data_mem(
        json.dumps(_without_empty(document)), "json", parse_only=True, strict=True, no_state=True
    )
    try:
        add_implicit_defaults(tree)
        printed = tree.print_mem("json", with_siblings=True, include_implicit_defaults=True)
    finally:
        tree.free()
    return json.loads(printed) if printed else {}


def merged(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` on top of ``base``, containers merged member by member."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = value
    return out


def ce_with_defaults(ce: dict[str, Any]) -> dict[str, Any]:
    """A cevpn-ce ``ce`` container as the agent sees it: with every default the model gives
    it, those that depend on its values (YANG 'when') included.  A test that gives the
    agent values the model would refuse gets the unconditional defaults under its own."""
    try:
        return dict(
            with_defaults({"cevpn-ce:ce": {"configuration-version": "v", **ce}})["cevpn-ce:ce"]
        )
    except Exception:  # libyang refuses the test's values: defaults that need none of them
        defaults = with_defaults({"cevpn-ce:ce": {"configuration-version": "v"}})["cevpn-ce:ce"]
        del defaults["configuration-version"]
        return merged(defaults, ce)


def peer_with_defaults(peer: dict[str, Any]) -> dict[str, Any]:
    """A cevpn-ce ``peer`` entry with the model's defaults under the test's own values."""
    plain = {"name": "x", "sp-address": "192.0.2.99", "ike": {"pre-shared-key": "0" * 16}}
    defaults = with_defaults({"cevpn-ce:ce": {"peer": [plain]}})["cevpn-ce:ce"]["peer"][0]
    return merged(
        {k: v for k, v in defaults.items() if k not in ("ike", "name", "sp-address")}, peer
    )


def esp_proposal_with_defaults(proposal: dict[str, Any]) -> dict[str, Any]:
    """An esp-proposal entry with the model's defaults under the test's own values."""
    plain = {"id": 1, "encryption": "cevpn-types:encr-aes-gcm-16-128"}
    ce = with_defaults({"cevpn-ce:ce": {"sa-defaults": {"esp": {"proposal": [plain]}}}})
    defaults = ce["cevpn-ce:ce"]["sa-defaults"]["esp"]["proposal"][0]
    return merged({k: v for k, v in defaults.items() if k not in plain}, proposal)
