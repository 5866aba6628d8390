"""A commit answering <ok/> means deployable: the service rules and the compiler run, by one
code path, for <commit>, confirmed commit, <validate>, test-only and `cevpn-server validate`;
a refusal names the VPN and the site and stores nothing.  A real cevpn-server over SSH."""

from __future__ import annotations

import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from lxml import etree
from ncclient.operations.rpc import RPCError

from tests.netconf_server import BIN, ServerProcess, ncclient_connect, running_server

NC = "urn:ietf:params:xml:ns:netconf:base:1.0"
SVC = "urn:cevpn:yang:cevpn-service"


def site(site_id: str, n: int, *prefixes: str) -> str:
    return (
        f"<site><id>{site_id}</id><ce-address>192.0.2.{n}</ce-address>"
        + "".join(f"<local-prefix>{p}</local-prefix>" for p in prefixes)
        + "</site>"
    )


def vpn(vpn_id: str, *sites: str, extra: str = "") -> str:
    return (
        f"<vpn><id>{vpn_id}</id><customer>{vpn_id}</customer><topology><type>full-mesh</type>"
        f"</topology>{extra}{''.join(sites)}</vpn>"
    )


def config(*vpns: str) -> str:
    return f'<config xmlns="{NC}"><vpn-service xmlns="{SVC}">{"".join(vpns)}</vpn-service></config>'


GOOD = vpn("acme", site("a", 1, "10.1.0.0/24"), site("b", 2, "10.2.0.0/24"))
BAD = {
    "overlap": (
        vpn("acme", site("a", 1, "10.1.0.0/24"), site("b", 2, "10.1.0.0/25")),
        "b",
        "10.1.0.0/25",
        "prefix-overlap",
    ),
    "duplicate": (
        vpn("acme", site("a", 1, "10.1.0.0/24"), site("b", 2, "10.1.0.0/24")),
        "b",
        "10.1.0.0/24",
        "prefix-overlap",
    ),
    "ipv6": (
        vpn("acme", site("a", 1, "10.1.0.0/24"), site("b", 2, "2001:db8:1::/64")),
        "b",
        "2001:db8:1::/64",
        "prefix-family",
    ),
    "default-route-next-to-a-gateway": (
        vpn(
            "acme",
            site("a", 1, "10.1.0.0/24"),
            site("b", 2, "0.0.0.0/0"),
            extra="<internet-gateway>a</internet-gateway>",
        ),
        "b",
        "0.0.0.0/0",
        "default-route",
    ),
}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with running_server(tmp_path_factory.mktemp("svc")) as srv:
        yield srv


@pytest.fixture
def m(server: ServerProcess):  # type: ignore[no-untyped-def]
    with ncclient_connect(server) as manager:
        manager.edit_config(
            target="running",
            config=f'<config xmlns="{NC}" xmlns:nc="{NC}"><vpn-service xmlns="{SVC}" '
            'nc:operation="remove"/></config>',
        )
        manager.edit_config(target="running", config=config(GOOD))
        yield manager
        manager.discard_changes()


def assert_refusal(error: RPCError, site_id: str, prefix: str, rule: str) -> None:
    assert error.tag == "invalid-value"
    assert error.app_tag == rule
    assert error.path is not None
    assert "[cevpn-svc:id='acme']" in error.path
    assert f"site[cevpn-svc:id='{site_id}']" in error.path
    assert f"local-prefix[.='{prefix}']" in error.path
    assert f"Site '{site_id}' of VPN 'acme'" in error.message


def running_vpns(m) -> str:  # type: ignore[no-untyped-def]
    return m.get_config("running", filter=("subtree", f'<vpn-service xmlns="{SVC}"/>')).data_xml


@pytest.mark.parametrize("case", list(BAD))
def test_a_commit_of_an_undeployable_vpn_is_refused_and_stores_nothing(m, case):
    bad, site_id, prefix, rule = BAD[case]
    before = running_vpns(m)
    m.edit_config(target="candidate", config=config(bad))
    with pytest.raises(RPCError) as exc:
        m.commit()
    assert_refusal(exc.value, site_id, prefix, rule)
    assert running_vpns(m) == before


@pytest.mark.parametrize("case", ["overlap", "ipv6"])
def test_validate_refuses_what_commit_refuses(m, case):
    bad, site_id, prefix, rule = BAD[case]
    m.edit_config(target="candidate", config=config(bad))
    with pytest.raises(RPCError) as exc:
        m.validate(source="candidate")
    assert_refusal(exc.value, site_id, prefix, rule)


def test_a_confirmed_commit_refuses_it_too(m):
    bad, site_id, prefix, rule = BAD["duplicate"]
    m.edit_config(target="candidate", config=config(bad))
    with pytest.raises(RPCError) as exc:
        m.commit(confirmed=True, timeout="60")
    assert_refusal(exc.value, site_id, prefix, rule)


def test_test_only_refuses_it_too(m):
    bad, site_id, prefix, rule = BAD["default-route-next-to-a-gateway"]
    with pytest.raises(RPCError) as exc:
        m.edit_config(target="running", config=config(bad), test_option="test-only")
    assert_refusal(exc.value, site_id, prefix, rule)


def test_an_edit_of_running_refuses_it_too(m):
    bad, site_id, prefix, rule = BAD["overlap"]
    with pytest.raises(RPCError) as exc:
        m.edit_config(target="running", config=config(bad))
    assert_refusal(exc.value, site_id, prefix, rule)


@pytest.mark.parametrize(
    ("reused", "leaf", "fragment"),
    [
        (site("a", 21, "10.21.0.0/24"), "id", "unique across all VPNs"),
        (site("z", 1, "10.21.0.0/24"), "ce-address", "already has this CE SP address"),
    ],
    ids=["site-id", "ce-address"],
)
def test_a_site_reused_from_another_vpn_is_refused_at_its_leaf(m, reused, leaf, fragment):
    before = running_vpns(m)
    m.edit_config(target="candidate", config=config(vpn("beta", reused)))
    with pytest.raises(RPCError) as exc:
        m.commit()
    assert (exc.value.tag, exc.value.app_tag) == ("operation-failed", "must-violation")
    site_id = "a" if leaf == "id" else "z"
    assert exc.value.path == (
        "/cevpn-svc:vpn-service/cevpn-svc:vpn[cevpn-svc:id='beta']"
        f"/cevpn-svc:site[cevpn-svc:id='{site_id}']/cevpn-svc:{leaf}"
    )
    assert fragment in exc.value.message
    assert running_vpns(m) == before


def key_rows(server: ServerProcess) -> int:
    db = sqlite3.connect(server.state_dir / "vpn-server.db")
    try:
        return int(db.execute("SELECT count(*) FROM kv WHERE tbl LIKE 'keystore/%'").fetchone()[0])
    finally:
        db.close()


def test_validate_of_a_good_candidate_keeps_no_key_material(server, m):
    before = key_rows(server)
    new = vpn("beta", site("c", 11, "10.11.0.0/24"), site("d", 12, "10.12.0.0/24"))
    m.edit_config(target="candidate", config=config(new))
    m.validate(source="candidate")
    m.edit_config(target="running", config=config(new), test_option="test-only")
    assert key_rows(server) == before  # keys are made when the VPN is committed, not before
    m.commit()
    assert key_rows(server) > before


def document(tmp_path: Path, bad: str) -> Path:
    path = tmp_path / "database.xml"
    root = etree.fromstring(config(bad).encode())
    path.write_bytes(etree.tostring(root[0]))
    return path


@pytest.mark.parametrize("case", list(BAD))
def test_the_offline_validate_subcommand_refuses_it_too(tmp_path, case):
    bad, site_id, prefix, _ = BAD[case]
    result = subprocess.run(
        [str(BIN / "cevpn-server"), "validate", str(document(tmp_path, bad))],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1
    assert f"Site '{site_id}' of VPN 'acme'" in result.stderr
    assert f"local-prefix[.='{prefix}']" in result.stderr


def test_the_offline_validate_subcommand_accepts_a_deployable_database(tmp_path):
    result = subprocess.run(
        [str(BIN / "cevpn-server"), "validate", str(document(tmp_path, GOOD))],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.endswith(": valid\n")


def test_a_compiler_fault_is_refused_and_never_reaches_running(tmp_path, monkeypatch):
    monkeypatch.setenv("CEVPN_FAULTS", "compile:acme=raise")
    (tmp_path / "x").mkdir()
    with running_server(tmp_path / "x") as srv, ncclient_connect(srv) as m:
        with pytest.raises(RPCError) as exc:
            m.edit_config(target="running", config=config(GOOD))
        assert exc.value.tag == "operation-failed"
        assert exc.value.path == "/cevpn-svc:vpn-service/cevpn-svc:vpn[cevpn-svc:id='acme']"
        assert "could not be compiled" in exc.value.message
        assert "<vpn>" not in running_vpns(m)
        other = vpn("beta", site("c", 11, "10.11.0.0/24"))
        m.edit_config(target="running", config=config(other))  # other VPNs are unaffected
        assert "<id>beta</id>" in running_vpns(m)
