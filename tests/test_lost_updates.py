"""No acknowledged change is ever silently lost: a commit applies the candidate's own changes
onto running as it is then, and nobody changes running under a pending confirmed commit.

A real cevpn-server over real SSH, ncclient clients, the server's own enrolment.
"""

from __future__ import annotations

import concurrent.futures
import threading
from collections.abc import Iterator

import pytest
from lxml import etree
from ncclient.operations.rpc import RPCError
from ncclient.xml_ import to_ele

from nc_core.asyncssh_import import asyncssh
from tests.netconf_server import ADMIN, OPERATOR, ServerProcess, ncclient_connect, running_server

NC = "urn:ietf:params:xml:ns:netconf:base:1.0"
SVC = "urn:cevpn:yang:cevpn-service"
SYS = "urn:ietf:params:xml:ns:yang:ietf-system"
NACM = "urn:ietf:params:xml:ns:yang:ietf-netconf-acm"
SITES = [f"s{i}" for i in range(1, 7)]


def database() -> str:
    sites = "".join(
        f"<site><id>{s}</id><ce-address>192.0.2.{i}</ce-address>"
        f"<local-prefix>10.{i}.0.0/24</local-prefix></site>"
        for i, s in enumerate(SITES, start=1)
    )
    return (
        f'<config xmlns="{NC}"><vpn-service xmlns="{SVC}">'
        "<server><endpoint><address>127.0.0.1</address></endpoint></server>"
        "<vpn><id>v</id><customer>Before</customer><topology><type>full-mesh</type></topology>"
        f"{sites}</vpn></vpn-service></config>"
    )


def group(name: str) -> str:
    return (
        f'<config xmlns="{NC}"><nacm xmlns="{NACM}"><groups><group><name>{name}</name>'
        "</group></groups></nacm></config>"
    )


def customer(value: str) -> str:
    return (
        f'<config xmlns="{NC}"><vpn-service xmlns="{SVC}"><vpn><id>v</id>'
        f"<customer>{value}</customer></vpn></vpn-service></config>"
    )


def enrol(m, site: str) -> str:  # type: ignore[no-untyped-def]
    """Enrol ``site``; returns (the base64 of) the host key the server pinned for it."""
    reply = etree.fromstring(
        m.dispatch(
            to_ele(f'<enrol xmlns="{SVC}"><vpn>v</vpn><site>{site}</site></enrol>')
        ).xml.encode()
    )
    private = reply.findtext(f".//{{{SVC}}}host-private-key")
    assert private, "the bundle carries no host key"
    return key_blob(asyncssh.import_private_key(private).export_public_key().decode())


def running(server: ServerProcess) -> etree._Element:
    with ncclient_connect(server) as m:
        return etree.fromstring(m.get_config("running").data_xml.encode())


def customers_in(root: etree._Element) -> list[str]:
    return list(root.xpath("//v:vpn/v:customer/text()", namespaces={"v": SVC}))


def groups_in(root: etree._Element) -> set[str]:
    return set(root.xpath("//n:group/n:name/text()", namespaces={"n": NACM}))


def users_in(root: etree._Element) -> set[str]:
    return set(root.xpath("//s:user/s:name/text()", namespaces={"s": SYS}))


def key_blob(line: str) -> str:
    return line.split()[1]


def pinned(root: etree._Element, site: str) -> list[str]:
    keys = root.xpath(
        "//v:site[v:id=$site]/v:management/v:host-key/text()", namespaces={"v": SVC}, site=site
    )
    return [key_blob(k) for k in keys]


@pytest.fixture
def server(tmp_path) -> Iterator[ServerProcess]:  # type: ignore[no-untyped-def]
    (tmp_path / "x").mkdir()
    with running_server(tmp_path / "x") as srv:
        with ncclient_connect(srv) as m:
            m.edit_config(target="running", config=database())
        yield srv


def test_a_commit_keeps_a_running_edit_made_after_the_candidate_was_taken(server):
    with ncclient_connect(server) as a, ncclient_connect(server) as b:
        a.edit_config(target="candidate", config=customer("After"))
        b.edit_config(target="running", config=group("made-meanwhile"))
        a.commit()
    root = running(server)
    assert "made-meanwhile" in groups_in(root)
    assert customers_in(root) == ["After"]


def test_copying_the_candidate_to_running_keeps_a_newer_running_edit(server):
    with ncclient_connect(server) as a, ncclient_connect(server) as b:
        a.edit_config(target="candidate", config=customer("Copied"))
        b.edit_config(target="running", config=group("made-meanwhile"))
        a.copy_config(source="candidate", target="running")
    root = running(server)
    assert "made-meanwhile" in groups_in(root)
    assert customers_in(root) == ["Copied"]


def test_a_commit_keeps_an_enrolment_made_after_the_candidate_was_taken(server):
    # docs/examples/oss_create_vpn.py's pattern: lock, edit the candidate, validate,
    # commit, while the server enrols a CE for another operator.
    with ncclient_connect(server, OPERATOR) as oss, ncclient_connect(server) as other:
        oss.lock("candidate")
        oss.edit_config(target="candidate", config=customer("OSS edit"))
        oss.validate(source="candidate")
        host_key = enrol(other, "s1")
        oss.commit()
        oss.unlock("candidate")
    root = running(server)
    assert pinned(root, "s1") == [host_key]
    assert "ce-s1" in users_in(root)


def test_a_commit_that_would_revert_a_newer_change_is_refused_and_changes_nothing(server):
    with ncclient_connect(server) as a, ncclient_connect(server) as b:
        a.edit_config(target="candidate", config=customer("From the candidate"))
        b.edit_config(target="running", config=customer("Acknowledged meanwhile"))
        with pytest.raises(RPCError) as exc:
            a.commit()
        error = exc.value
        assert error.tag == "operation-failed"
        assert error.app_tag == "running-changed"
        assert "id='v'" in (error.path or "") and "customer" in (error.path or "")
        assert "discard-changes" in error.message
        a.discard_changes()
    values = customers_in(running(server))
    assert values == ["Acknowledged meanwhile"]


def test_a_running_edit_is_refused_while_another_sessions_confirmed_commit_is_pending(server):
    with ncclient_connect(server) as a, ncclient_connect(server) as b:
        a.edit_config(target="candidate", config=group("confirmed"))
        a.commit(confirmed=True, timeout="120")
        with pytest.raises(RPCError) as exc:
            b.edit_config(target="running", config=group("refused"))
        assert exc.value.tag == "in-use"
        assert str(a.session_id) in exc.value.message
        a.cancel_commit()
        b.edit_config(target="running", config=group("after-the-rollback"))
    root = running(server)
    assert "refused" not in groups_in(root) and "confirmed" not in groups_in(root)
    assert "after-the-rollback" in groups_in(root)


def test_a_candidate_edited_on_a_confirmed_commit_that_rolls_back_is_not_committed(server):
    """The VPN server's case: it pushes a CE's whole configuration again while its previous
    push's confirmed commit is still pending, and that one times out between the new edit
    and the new commit.  Merged onto the older running, the edit (identical to what was
    rolled back) would be nothing, and the commit would succeed without it."""
    with ncclient_connect(server) as a, ncclient_connect(server) as b:
        a.edit_config(target="candidate", config=customer("Pushed"))
        a.commit(confirmed=True, timeout="120")
        b.discard_changes()
        b.edit_config(target="candidate", config=customer("Pushed"))
        a.cancel_commit()  # the first push's commit is rolled back
        with pytest.raises(RPCError) as exc:
            b.commit(confirmed=True, timeout="120")
        assert exc.value.tag == "operation-failed"
        assert exc.value.app_tag == "running-changed"
        assert "rolled back" in exc.value.message and "discard-changes" in exc.value.message
        values = customers_in(running(server))
        assert values == ["Before"]
        b.discard_changes()
        b.edit_config(target="candidate", config=customer("Pushed"))
        b.commit()
    values = customers_in(running(server))
    assert values == ["Pushed"]


def test_an_untouched_candidate_follows_running_back_after_a_rollback(server):
    with ncclient_connect(server) as a, ncclient_connect(server) as b:
        a.edit_config(target="candidate", config=customer("Confirmed"))
        a.commit(confirmed=True, timeout="120")
        a.cancel_commit()
        b.commit()  # nothing to commit: the candidate is running again
        reply = b.get_config(
            source="candidate", filter=("subtree", f'<vpn-service xmlns="{SVC}"/>')
        )
        assert "Before" in reply.data_xml and "Confirmed" not in reply.data_xml
    values = customers_in(running(server))
    assert values == ["Before"]


def test_an_enrolment_is_refused_while_a_confirmed_commit_is_pending(server):
    with ncclient_connect(server) as a, ncclient_connect(server, OPERATOR) as b:
        a.edit_config(target="candidate", config=group("confirmed"))
        a.commit(confirmed=True, timeout="120")
        with pytest.raises(RPCError) as exc:
            enrol(b, "s2")
        assert exc.value.tag == "in-use"
        a.commit()  # confirmed
        host_key = enrol(b, "s2")
    assert pinned(running(server), "s2") == [host_key]


def test_fifty_sessions_and_enrolments_lose_no_acknowledged_change(server):
    """25 sessions commit through the candidate, 25 edit running, while CEs are enrolled:
    running ends with exactly every change that was acknowledged."""
    acknowledged: set[str] = set()
    lock = threading.Lock()
    start = threading.Barrier(51)

    def candidate_worker(n: int) -> None:
        with ncclient_connect(server) as m:
            start.wait()
            for k in range(4):
                name = f"cand-{n}-{k}"
                m.edit_config(target="candidate", config=group(name))
                m.commit()
                with lock:
                    acknowledged.add(name)

    def running_worker(n: int) -> None:
        with ncclient_connect(server) as m:
            start.wait()
            for k in range(4):
                name = f"run-{n}-{k}"
                m.edit_config(target="running", config=group(name))
                with lock:
                    acknowledged.add(name)

    enrolled: dict[str, str] = {}

    def enroller() -> None:
        with ncclient_connect(server, OPERATOR) as m:
            start.wait()
            for _ in range(2):
                for site in SITES:
                    enrolled[site] = enrol(m, site)

    with concurrent.futures.ThreadPoolExecutor(max_workers=51) as pool:
        jobs = [pool.submit(candidate_worker, n) for n in range(25)]
        jobs += [pool.submit(running_worker, n) for n in range(25)]
        jobs.append(pool.submit(enroller))
        for job in jobs:
            job.result(timeout=600)
    root = running(server)
    made = {g for g in groups_in(root) if g.startswith(("cand-", "run-"))}
    assert len(acknowledged) == 200
    assert made == acknowledged
    for site, host_key in enrolled.items():
        assert pinned(root, site) == [host_key]
        assert f"ce-{site}" in users_in(root)
    assert ADMIN[0] in users_in(root)
