"""nc_agent.dataplane.xfrm against a real kernel (UML lab guest).

Two guest boots: `datapath` (transport mode over IP-in-IP and route-based
tunnel mode between two CEs, with the core watched by tcpdump) and `control`
(install/dump round trip, the all-or-nothing failure path, flush_owned next
to somebody else's objects, expire and acquire events).  The scenarios live
in tests/lab/xfrm_scenarios.py; each test asserts one behaviour on its JSON.
"""

from __future__ import annotations

import errno
import json
import re
from typing import Any

import pytest

from lab.uml import run_guest

pytestmark = pytest.mark.lab

R = 0x0CE00001


def scenario(name: str) -> dict[str, Any]:
    result = run_guest(f".venv/bin/python -m tests.lab.xfrm_scenarios {name}\n", timeout=240)
    assert result.returncode == 0, result.console[-3000:]
    data: dict[str, Any] = json.loads(result.read(f"{name}.json"))
    assert "error" not in data, data.get("traceback", data)
    return data


@pytest.fixture(scope="module")
def datapath() -> dict[str, Any]:
    return scenario("datapath")


@pytest.fixture(scope="module")
def control() -> dict[str, Any]:
    return scenario("control")


def only_esp(captured: list[str]) -> None:
    assert captured, "the capture on pe saw nothing"
    assert all("ESP(spi=" in line for line in captured), captured
    assert not any(" 10." in line for line in captured), captured


def windows(ip_state: str) -> list[int]:
    """The anti-replay window of every SA in `ip xfrm state` output (ESN context wins)."""
    out = []
    for block in re.split(r"\n(?=src )", ip_state.strip()):
        esn = re.search(r"replay_window (\d+)", block)
        legacy = re.search(r"replay-window (\d+)", block)
        out.append(int(esn.group(1)) if esn else int(legacy.group(1)) if legacy else 0)
    return out


def test_transport_mode_over_ipip_carries_site_traffic_and_the_core_sees_only_esp(datapath):
    t = datapath["transport"]
    assert t["ping"]["rc"] == 0 and " 0% packet loss" in t["ping"]["out"], t["ping"]
    only_esp(t["pe"])
    assert {(p["direction"], p["proto"], p["mode"]) for p in t["policies"]} == {
        ("out", 4, "transport"),
        ("in", 4, "transport"),
    }


def test_tunnel_mode_vti_with_marked_policies_carries_site_traffic(datapath):
    t = datapath["tunnel"]
    assert t["ping"]["rc"] == 0 and " 0% packet loss" in t["ping"]["out"], t["ping"]
    only_esp(t["pe"])
    assert all(s["mode"] == "tunnel" and s["mark"] == R + 0x10 for s in t["sas"]), t["sas"]
    assert all(p["mark"] == R + 0x10 for p in t["policies"]), t["policies"]


def test_dump_sas_reports_the_packet_counters_after_the_ping(datapath):
    for mode in ("transport", "tunnel"):
        sas = {s["spi"]: s for s in datapath[mode]["sas"]}
        out_spi, in_spi = (0x1001, 0x2001) if mode == "transport" else (0x3001, 0x4001)
        assert sas[out_spi]["packets"] >= 3 and sas[out_spi]["bytes"] > 0, sas
        assert sas[in_spi]["packets"] >= 3, sas
        assert sas[out_spi]["use_time"] > 0 and sas[out_spi]["add_time"] > 0
        assert sas[in_spi]["integrity_failures"] == 0


def test_anti_replay_window_is_never_zero(datapath, control):
    for text in (datapath["transport"]["ip_state"], datapath["tunnel"]["ip_state"]):
        assert windows(text) and all(w == 1024 for w in windows(text)), text
    # a window of 32 goes in the legacy field, larger ones in the ESN attribute
    assert sorted(set(windows(control["install"]["ip_state"]))) == [32, 1024]
    assert control["install"]["windows"] == [32, 1024]


def test_install_and_dump_round_trip(control):
    install = control["install"]
    assert install["sas_match"] and install["policies_match"], install
    assert install["all_sas"] == 8  # 7 ours + somebody else's


def test_a_failing_batch_raises_naming_the_sa_and_leaves_the_kernel_as_it_was(control):
    f = control["failures"]
    assert f["add"] is not None and f["add"]["errno"] == errno.EEXIST
    assert f["add"]["text"].startswith(
        "adding SA 203.0.113.1->203.0.113.10 spi 0x100: File exists (EEXIST)"
    ), f["add"]
    assert f["add_unchanged"]
    # deletes in the same batch are undone from the kernel's own dump
    assert f["mixed"] is not None and f["mixed"]["errno"] == errno.EEXIST
    assert f["mixed_unchanged"], f["diff"]
    assert f["foreign"] and "not owned" in f["foreign"]


def test_flush_owned_removes_ours_and_leaves_a_foreign_sa_and_policy(control):
    fl = control["flush"]
    assert fl["count"] == fl["expected"] and fl["owned_left"] == 0, fl
    assert "spi 0x00000999" in fl["ip_state"] and "reqid 7 " in fl["ip_state"], fl["ip_state"]
    assert [ln for ln in fl["ip_state"].splitlines() if ln.startswith("src ")] == [
        "src 192.0.2.1 dst 192.0.2.2"
    ], fl["ip_state"]
    assert "192.0.2.20/32" in fl["ip_policy"] and "reqid 7 " in fl["ip_policy"], fl["ip_policy"]
    assert fl["ip_policy"].count("dir ") == 1, fl["ip_policy"]


def test_expire_events_soft_then_hard_for_a_short_lifetime(control):
    ev = control["events"]
    mine = [e for e in ev["expire"] if e["spi"] == 0x777]
    assert [e["hard"] for e in mine][:1] == [False], ev
    assert any(e["hard"] for e in mine), ev
    assert 0x777 not in ev["left_after_hard"]
    assert ev["fileno"]


def test_acquire_event_when_traffic_hits_an_out_policy_without_sa(control):
    acq = control["events"]["acquire"]
    assert acq, control["events"]
    a = acq[0]
    assert a["selector"]["dst"] == "192.0.2.99/32" and a["direction"] == "out", a
    assert a["tmpl"]["reqid"] == R + 31 and a["tmpl"]["mode"] == "transport", a
