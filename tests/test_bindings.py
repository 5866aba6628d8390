"""bindings/ is generated from yang/ by pyangbind and never edited by hand."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
VALID = ROOT / "tests" / "examples" / "valid"


def test_committed_bindings_match_the_yang(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "tools" / "gen_bindings.py"), str(tmp_path)],
                   check=True, capture_output=True)  # fmt: skip
    for generated in sorted(tmp_path.glob("*.py")):
        committed = ROOT / "bindings" / generated.name
        assert committed.exists(), f"{committed} is missing: run `make bindings`"
        assert committed.read_bytes() == generated.read_bytes(), (
            f"{committed} is stale: run `make bindings` and commit the result"
        )


@pytest.mark.parametrize(
    ("example", "module", "cls"),
    [
        ("ce-site-b-ikeless.json", "cevpn_ce", "cevpn_ce"),
        ("service-ikeless.json", "cevpn_service", "cevpn_service"),
    ],
)
def test_bindings_round_trip_an_rfc7951_example(example, module, cls, ce_schema, service_schema):
    import importlib

    import pyangbind.lib.pybindJSON as pybind_json
    from pyangbind.lib.xpathhelper import YANGPathHelper

    bound = pybind_json.loads_ietf(
        (VALID / example).read_text(),
        importlib.import_module(f"bindings.{module}"),
        cls,
        path_helper=YANGPathHelper(),
    )
    text = pybind_json.dumps(bound, mode="ietf")
    schema = ce_schema if module == "cevpn_ce" else service_schema
    # What the bindings write, libyang accepts, and it is the same data.
    assert json.loads(schema.parse_config(text, "json").print_mem("json", with_siblings=True)) == (
        json.loads(
            schema.parse_config((VALID / example).read_text(), "json").print_mem(
                "json", with_siblings=True
            )
        )
    )


def test_bindings_refuse_a_malformed_address():
    from bindings import cevpn_ce

    ce = cevpn_ce.cevpn_ce()
    peer = ce.ce.peer.add("site-b")
    with pytest.raises(ValueError):
        peer.sp_address = "192.0.2.300"
