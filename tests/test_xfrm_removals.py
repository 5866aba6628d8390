"""XFRM deletes of objects already gone (this host's kernel: policies, no ESP needed)."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator

import pytest

from nc_agent.dataplane.xfrm import OWNED_REQIDS, Policy, SAKey, Xfrm

REQID = OWNED_REQIDS[7]


@pytest.fixture
def xfrm() -> Iterator[Xfrm]:
    name = f"cevpn-xr-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    x = Xfrm(name)
    try:
        yield x
    finally:
        x.close()
        subprocess.run(["ip", "netns", "del", name], check=False)


def policy(dst: str) -> Policy:
    return Policy("out", "10.1.0.0/24", dst, reqid=REQID, priority=100)


def test_deleting_a_policy_that_vanished_is_not_an_error(xfrm: Xfrm) -> None:
    present, vanished = policy("10.2.0.0/24"), policy("10.3.0.0/24")
    xfrm.apply(add_policies=[present, vanished])
    subprocess.run(
        ["ip", "-n", xfrm.netns or "", "xfrm", "policy", "delete", "dir", "out",
         "src", "10.1.0.0/24", "dst", "10.3.0.0/24"],
        check=True,
    )  # fmt: skip
    xfrm.apply(del_policies=[vanished, present])  # the dump said both; one is gone already
    assert xfrm.dump_policies() == []


def test_deleting_an_sa_that_vanished_is_not_an_error(xfrm: Xfrm) -> None:
    xfrm.apply(del_sas=[SAKey("198.51.100.2", 0, 50, None)])  # a larval SA that expired
    assert xfrm.dump_sas() == []
