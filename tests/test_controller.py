"""The VPN server provisions real CE agents over real SSH (seed 3.1-3.6).

Agents run with --dataplane none (kernel untouched); the data plane is
proven in tests/lab/test_server_lab.py.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from ncclient.operations.rpc import RPCError

from tests.controller import SVC_NS, Controller, controller, vpn_xml, wait_for
from tests.netconf_server import BIN

pytestmark = pytest.mark.timeout(300)


def mesh(ctl: Controller, vpn: str, n: int, **kw: object) -> None:
    ctl.edit(vpn_xml(vpn, **kw))  # type: ignore[arg-type]
    for i in range(1, n + 1):
        ctl.join(vpn, f"{vpn}-s{i}", i, f"10.{i}.0.0/24")


def test_enrolled_agents_of_a_full_mesh_are_provisioned_with_every_other_site(tmp_path: Path) -> None:
    with controller(tmp_path) as ctl:
        mesh(ctl, "red", 3)
        ctl.in_sync("red-s1", "red-s2", "red-s3")
        prov = ctl.provisioning()
        for i in (1, 2, 3):
            ce = ctl.agents[f"red-s{i}"].running_ce()
            assert ce["peers"] == sorted(f"red-s{j}" for j in (1, 2, 3) if j != i)
            assert ce["version"] == prov[f"red-s{i}"]["applied-version"]
            assert prov[f"red-s{i}"]["peer-count"] == "2"
