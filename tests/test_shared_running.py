"""Several cevpn-servers on one PostgreSQL database share one running configuration.

Real servers (subprocesses on a throw-away PostgreSQL, tests/postgres.py), real
NETCONF clients (ncclient): a commit on one is seen by the other within a
second, conflicting commits on two servers leave exactly one winner, disjoint
ones both survive, and the running lock holds across servers.  The VPNs here
have no CE enrolled: which server provisions a CE is tests/test_ce_ownership.py's.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psycopg
import pytest
from lxml import etree
from ncclient.operations.rpc import RPCError

from nc_core import faults
from nc_server.shared_running import CONFIRMED_LOCK, RUNNING_LOCK
from tests.controller import vpn_xml
from tests.netconf_server import ADMIN, ServerProcess, free_port, ncclient_connect
from tests.waiting import wait_for

SVC = "urn:cevpn:yang:cevpn-service"
NC = "urn:ietf:params:xml:ns:netconf:base:1.0"
NCN = "urn:ietf:params:xml:ns:yang:ietf-netconf-notifications"
NS = {"s": SVC, "ncn": NCN}


def config(body: str) -> str:
    return f'<config xmlns="{NC}">{body}</config>'


def customer_of(vpn: str, customer: str) -> str:
    return config(
        f'<vpn-service xmlns="{SVC}"><vpn><id>{vpn}</id><customer>{customer}</customer></vpn>'
        "</vpn-service>"
    )


def running(m: Any) -> etree._Element:
    reply = m.get_config(source="running", filter=("subtree", f'<vpn-service xmlns="{SVC}"/>'))
    return etree.fromstring(reply.data_xml.encode())


def customers(m: Any, source: str = "running") -> dict[str, str]:
    reply = m.get_config(source=source, filter=("subtree", f'<vpn-service xmlns="{SVC}"/>'))
    root = etree.fromstring(reply.data_xml.encode())
    return {
        vpn.findtext("s:id", namespaces=NS): vpn.findtext("s:customer", namespaces=NS)
        for vpn in root.iterfind(".//s:vpn", NS)
    }


@pytest.fixture
def pair(tmp_path: Path, postgres_url: str) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    """Two servers on one fresh database; the accounts are in the shared running."""
    a = ServerProcess("cevpn-server", tmp_path / "a", free_port(), database=postgres_url)
    b = ServerProcess("cevpn-server", tmp_path / "b", free_port(), database=postgres_url)
    a.adduser(ADMIN[0], ADMIN[1], ("admin",))
    a.start()
    try:
        b.start()
        try:
            yield a, b
        finally:
            b.stop()
    finally:
        a.stop()


def test_a_commit_on_one_server_is_in_the_running_of_the_other_within_a_second(
    pair: tuple[ServerProcess, ServerProcess],
) -> None:
    a, b = pair
    with ncclient_connect(a) as ma, ncclient_connect(b) as mb:
        delays = []
        for n in range(5):
            vpn = f"vpn{n}"
            ma.edit_config(target="running", config=config(vpn_xml(vpn)))
            committed = time.monotonic()
            wait_for(lambda vpn=vpn: vpn in customers(mb), 10, f"{vpn} on b", step=0.005)
            delays.append(time.monotonic() - committed)
        print(f"propagation delays A -> B (s): {[round(d, 3) for d in delays]}")
        assert max(delays) < 1.0


def commit(m: Any) -> RPCError | None:
    """Commit the candidate; the rpc-error if it is refused."""
    try:
        m.commit()
    except RPCError as error:
        return error
    return None


def edit_running(m: Any, body: str) -> RPCError | None:
    try:
        m.edit_config(target="running", config=body)
    except RPCError as error:
        return error
    return None


def locked(m: Any) -> bool:
    """Take the running lock; False if refused."""
    try:
        m.lock(target="running")
    except RPCError as error:
        assert error.tag == "lock-denied", error
        return False
    return True


def test_a_subscriber_of_the_other_server_is_told_of_the_commit(
    pair: tuple[ServerProcess, ServerProcess],
) -> None:
    a, b = pair
    with ncclient_connect(a) as ma, ncclient_connect(b) as mb:
        mb.create_subscription()
        ma.edit_config(target="running", config=config(vpn_xml("jade")))
        while True:
            notification = mb.take_notification(timeout=10)
            assert notification is not None, "no netconf-config-change on b"
            event = etree.fromstring(notification.notification_xml.encode())
            change = event.find("ncn:netconf-config-change", NS)
            if change is not None:
                break
        assert change.find("ncn:changed-by/ncn:server", NS) is not None
        assert change.findtext("ncn:datastore", namespaces=NS) == "running"
        targets = [t.text for t in change.iterfind("ncn:edit/ncn:target", NS)]
        assert targets == ["/cevpn-service:vpn-service"]


def test_conflicting_commits_on_two_servers_leave_exactly_one_winner(
    pair: tuple[ServerProcess, ServerProcess],
) -> None:
    a, b = pair
    with ncclient_connect(a) as ma, ncclient_connect(b) as mb:
        ma.edit_config(target="running", config=config(vpn_xml("jade")))
        wait_for(lambda: "jade" in customers(mb), 10, "jade on b")
        ma.edit_config(target="candidate", config=customer_of("jade", "from-a"))
        mb.edit_config(target="candidate", config=customer_of("jade", "from-b"))
        with ThreadPoolExecutor(2) as pool:
            outcomes = list(pool.map(commit, (ma, mb)))
        refused = [error for error in outcomes if error is not None]
        assert len(refused) == 1, outcomes
        error = refused[0]
        assert error.tag == "operation-failed"
        # Refused at the commit (another server's newer running) or, when this server had
        # already adopted it, by the candidate's own merge: both say what to do.
        assert error.app_tag in ("configuration-changed-elsewhere", "running-changed")
        assert "discard-changes" in error.message
        winner = "from-a" if outcomes[0] is None else "from-b"
        for m in (ma, mb):
            wait_for(lambda m=m: customers(m)["jade"] == winner, 10, f"{winner} everywhere")
        loser = mb if outcomes[0] is None else ma
        loser.discard_changes()
        assert commit(loser) is None  # nothing left to commit, nothing half-made
        assert customers(ma) == customers(mb) == {"jade": winner}


def test_disjoint_commits_on_two_servers_both_survive(
    pair: tuple[ServerProcess, ServerProcess],
) -> None:
    a, b = pair
    with ncclient_connect(a) as ma, ncclient_connect(b) as mb:
        ma.edit_config(target="candidate", config=config(vpn_xml("amber")))
        mb.edit_config(target="candidate", config=config(vpn_xml("beryl")))
        with ThreadPoolExecutor(2) as pool:
            outcomes = list(pool.map(commit, (ma, mb)))
        assert outcomes == [None, None]
        for m in (ma, mb):
            wait_for(lambda m=m: set(customers(m)) == {"amber", "beryl"}, 10, "both vpns")


def test_disjoint_edits_of_running_on_two_servers_at_once_all_survive(
    pair: tuple[ServerProcess, ServerProcess],
) -> None:
    """Many commits racing on both servers: each either is based on the newest running or
    is redone on it, so none is lost."""
    a, b = pair
    with ncclient_connect(a) as ma, ncclient_connect(b) as mb:
        jobs = [(ma if n % 2 else mb, f"vpn{n}") for n in range(12)]
        with ThreadPoolExecutor(2) as pool:
            outcomes = list(
                pool.map(lambda job: edit_running(job[0], config(vpn_xml(job[1]))), jobs)
            )
        assert outcomes == [None] * len(jobs)
        expected = {vpn for _, vpn in jobs}
        for m in (ma, mb):
            wait_for(lambda m=m: set(customers(m)) == expected, 10, "every vpn everywhere")


def test_a_lock_on_one_server_refuses_changes_and_locks_on_the_other(
    pair: tuple[ServerProcess, ServerProcess],
) -> None:
    a, b = pair
    with ncclient_connect(a) as ma, ncclient_connect(b) as mb:
        ma.lock(target="running")
        refused = edit_running(mb, config(vpn_xml("jade")))
        assert refused is not None and refused.tag == "in-use"
        assert f"session {ma.session_id} of server" in refused.message
        assert f"<session-id>{ma.session_id}</session-id>" in refused.info.replace(" ", "")
        mb.edit_config(target="candidate", config=config(vpn_xml("jade")))
        refused = commit(mb)
        assert refused is not None and refused.tag == "in-use"
        assert not locked(mb)
        ma.edit_config(target="running", config=config(vpn_xml("amber")))  # the holder may
        ma.unlock(target="running")
        assert locked(mb)
        assert commit(mb) is None
        mb.unlock(target="running")
        wait_for(lambda: set(customers(ma)) == {"amber", "jade"}, 10, "both on a")


def test_the_lock_is_released_when_its_session_ends(
    pair: tuple[ServerProcess, ServerProcess],
) -> None:
    a, b = pair
    with ncclient_connect(b) as mb:
        with ncclient_connect(a) as ma:
            ma.lock(target="running")
            assert not locked(mb)
        wait_for(lambda: locked(mb), 10, "the lock free once a's session closed")


def test_the_lock_is_released_when_its_server_is_killed(
    pair: tuple[ServerProcess, ServerProcess],
) -> None:
    a, b = pair
    with ncclient_connect(b) as mb:
        ma = ncclient_connect(a)
        ma.lock(target="running")
        assert not locked(mb)
        a.kill9()
        wait_for(lambda: locked(mb), 10, "the lock free once a died")
        assert edit_running(mb, config(vpn_xml("jade"))) is None


def test_a_persistent_confirmed_commit_is_confirmed_from_the_other_server(
    pair: tuple[ServerProcess, ServerProcess],
) -> None:
    a, b = pair
    with ncclient_connect(a) as ma, ncclient_connect(b) as mb, ncclient_connect(a) as other:
        ma.edit_config(target="candidate", config=config(vpn_xml("jade")))
        ma.commit(confirmed=True, timeout="600", persist="jade-token")
        wait_for(lambda: "jade" in customers(mb), 10, "jade on b")
        refused = edit_running(mb, config(vpn_xml("amber")))
        assert refused is not None and refused.tag == "in-use"
        assert f"Session {ma.session_id} of server" in refused.message
        mb.commit(persist_id="jade-token")
        # a's own record of it ends too: its other sessions may change running again.
        wait_for(lambda: edit_running(other, config(vpn_xml("amber"))) is None, 10, "a free")
        for m in (ma, mb):
            wait_for(lambda m=m: set(customers(m)) == {"jade", "amber"}, 10, "both kept")


def test_a_persistent_confirmed_commit_is_cancelled_from_the_other_server(
    pair: tuple[ServerProcess, ServerProcess],
) -> None:
    a, b = pair
    with ncclient_connect(a) as ma, ncclient_connect(b) as mb:
        ma.edit_config(target="running", config=config(vpn_xml("kept")))
        ma.edit_config(target="candidate", config=config(vpn_xml("jade")))
        ma.commit(confirmed=True, timeout="600", persist="jade-token")
        wait_for(lambda: "jade" in customers(mb), 10, "jade on b")
        mb.cancel_commit(persist_id="jade-token")
        for m in (ma, mb):
            wait_for(lambda m=m: set(customers(m)) == {"kept"}, 10, "rolled back everywhere")
        assert edit_running(ma, config(vpn_xml("amber"))) is None


def test_a_persistent_confirmed_commit_rolls_back_at_its_deadline_though_its_server_died(
    pair: tuple[ServerProcess, ServerProcess],
) -> None:
    a, b = pair
    with ncclient_connect(b) as mb:
        ma = ncclient_connect(a)
        ma.edit_config(target="running", config=config(vpn_xml("kept")))
        ma.edit_config(target="candidate", config=config(vpn_xml("jade")))
        ma.commit(confirmed=True, timeout="3", persist="jade-token")
        wait_for(lambda: "jade" in customers(mb), 10, "jade on b")
        a.kill9()
        wait_for(lambda: set(customers(mb)) == {"kept"}, 15, "rolled back by b")
        assert edit_running(mb, config(vpn_xml("amber"))) is None


def test_a_confirmed_commit_rolls_back_when_its_server_dies(
    pair: tuple[ServerProcess, ServerProcess],
) -> None:
    a, b = pair
    with ncclient_connect(b) as mb:
        ma = ncclient_connect(a)
        ma.edit_config(target="running", config=config(vpn_xml("kept")))
        ma.edit_config(target="candidate", config=config(vpn_xml("jade")))
        ma.commit(confirmed=True, timeout="600")
        wait_for(lambda: "jade" in customers(mb), 10, "jade on b")
        a.kill9()
        wait_for(lambda: set(customers(mb)) == {"kept"}, 15, "rolled back by b")


@pytest.fixture
def unfollowing(tmp_path: Path, postgres_url: str) -> Iterator[tuple[Any, Any]]:
    """Two servers in this process on one database, neither following the other: each
    learns of the other's commits only when it commits itself (deterministic races)."""
    from nc_server.northbound import ServiceApplication
    from tests.in_process import InProcessServer

    servers = []
    try:
        for name in ("a", "b"):
            app = ServiceApplication(tmp_path / name, provisioning=False, database=postgres_url)
            servers.append(InProcessServer(tmp_path / name, app))
        yield servers[0], servers[1]
    finally:
        for server in servers:
            server.close()
            server.app.storage.close()


def test_a_commit_on_a_running_changed_elsewhere_at_the_same_node_is_refused(
    unfollowing: tuple[Any, Any],
) -> None:
    a, b = unfollowing
    with a.connect() as ma, b.connect() as mb:
        ma.edit_config(target="running", config=config(vpn_xml("jade")))
        mb.edit_config(target="running", config=config(vpn_xml("beryl")))  # b adopts jade first
        mb.edit_config(target="candidate", config=customer_of("jade", "from-b"))
        ma.edit_config(target="running", config=customer_of("jade", "from-a"))
        refused = commit(mb)
        assert refused is not None and refused.tag == "operation-failed"
        assert refused.app_tag == "configuration-changed-elsewhere"
        assert (
            "generation 5" in refused.message
        )  # adduser on a, on b, jade, beryl, from-a and "discard-changes" in refused.message
        assert customers(mb) == {"jade": "from-a", "beryl": "acme"}  # a's, adopted; b's not
        mb.discard_changes()
        assert commit(mb) is None
        assert customers(ma) == customers(mb)


def test_a_commit_on_a_running_changed_elsewhere_at_other_nodes_is_redone_on_it(
    unfollowing: tuple[Any, Any],
) -> None:
    a, b = unfollowing
    with a.connect() as ma, b.connect() as mb:
        mb.edit_config(target="candidate", config=config(vpn_xml("beryl")))
        ma.edit_config(target="running", config=config(vpn_xml("amber")))
        assert commit(mb) is None
        assert customers(mb) == {"amber": "acme", "beryl": "acme"}
        ma.edit_config(target="running", config=customer_of("amber", "later"))  # a's turn
        assert customers(ma) == {"amber": "later", "beryl": "acme"}


# -- cevpn-server adduser while servers run ---------------------------------------------

OPERATOR = ("oper2", "Oper2-pw-9v")


def can_log_in(server: ServerProcess, user: tuple[str, str]) -> bool:
    try:
        with ncclient_connect(server, user):
            return True
    except Exception:
        return False


def waiting_for_an_advisory_lock(url: str) -> bool:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
        ).fetchone()
    return bool(row and row[0])


def test_adduser_while_servers_run_reaches_every_server(
    pair: tuple[ServerProcess, ServerProcess], tmp_path: Path, postgres_url: str
) -> None:
    a, b = pair
    tool = ServerProcess("cevpn-server", tmp_path / "tool", free_port(), database=postgres_url)
    tool.adduser(OPERATOR[0], OPERATOR[1], ("operators",))
    wait_for(lambda: can_log_in(a, OPERATOR), 10, "the new account on a")
    wait_for(lambda: can_log_in(b, OPERATOR), 10, "the new account on b")


def test_adduser_is_refused_while_a_session_holds_the_running_lock(
    pair: tuple[ServerProcess, ServerProcess], tmp_path: Path, postgres_url: str
) -> None:
    a, b = pair
    tool = ServerProcess("cevpn-server", tmp_path / "tool", free_port(), database=postgres_url)
    with ncclient_connect(a) as ma:
        ma.lock(target="running")
        with pytest.raises(subprocess.CalledProcessError) as refused:
            tool.adduser(OPERATOR[0], OPERATOR[1], ("operators",))
        assert b"the running datastore is locked by session" in refused.value.stderr
        assert b"nothing was changed" in refused.value.stderr
    assert not can_log_in(b, OPERATOR)


@pytest.fixture
def commits_stop_at_compile(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> tuple[Path, Path]:
    """Servers started after this stop (SIGSTOP) inside a commit, at its compile step, while
    the file ``armed`` exists; ``report`` names the step once reached."""
    armed, report = tmp_path / "armed", tmp_path / "reached"
    monkeypatch.setenv(faults.ENV, "compile=stop")
    monkeypatch.setenv(faults.ARMED_ENV, str(armed))
    monkeypatch.setenv(faults.REPORT_ENV, str(report))
    return armed, report


def test_adduser_waits_for_a_commit_in_progress_and_keeps_it(
    commits_stop_at_compile: tuple[Path, Path],
    pair: tuple[ServerProcess, ServerProcess],
    tmp_path: Path,
    postgres_url: str,
) -> None:
    """Without the servers' commit lock, adduser would write the running it read before
    the commit was published, and undo that commit."""
    armed, report = commits_stop_at_compile
    a, b = pair
    tool = ServerProcess("cevpn-server", tmp_path / "tool", free_port(), database=postgres_url)
    with ncclient_connect(a) as ma, ThreadPoolExecutor(2) as pool:
        armed.touch()
        committed = pool.submit(edit_running, ma, config(vpn_xml("jade")))
        wait_for(lambda: report.exists() and "compile" in report.read_text(), 30, "a stopped")
        armed.unlink()  # b compiles when it adopts the commit: it must not stop
        assert a.proc is not None
        try:
            added = pool.submit(tool.adduser, OPERATOR[0], OPERATOR[1], ("operators",))
            wait_for(lambda: waiting_for_an_advisory_lock(postgres_url), 30, "adduser waiting")
            assert not added.done()
        finally:
            os.kill(a.proc.pid, signal.SIGCONT)
        assert committed.result(60) is None
        added.result(60)
    wait_for(lambda: can_log_in(b, OPERATOR), 10, "the new account on b")
    with ncclient_connect(b) as mb:
        wait_for(lambda: "jade" in customers(mb), 10, "the commit on b")


# -- startup ---------------------------------------------------------------------------


def test_a_startup_saved_on_one_server_is_served_by_the_other(
    pair: tuple[ServerProcess, ServerProcess],
) -> None:
    a, b = pair
    with ncclient_connect(a) as ma, ncclient_connect(b) as mb:
        ma.edit_config(target="running", config=config(vpn_xml("jade")))
        ma.copy_config(source="running", target="startup")
        wait_for(lambda: "jade" in customers(mb, "startup"), 10, "a's startup on b")
        mb.delete_config(target="startup")
        wait_for(lambda: not customers(ma, "startup"), 10, "b's deletion on a")
        assert "jade" in customers(ma)  # running untouched


# -- locks whose database connection breaks ----------------------------------------------


def backend_holding(url: str, key: int) -> int | None:
    """The database backend (pid) holding session-level advisory lock ``key`` exclusively."""
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted "
            "AND mode = 'ExclusiveLock' AND objsubid = 1 "
            "AND classid::bigint = %s AND objid::bigint = %s",
            (key >> 32, key & 0xFFFFFFFF),
        ).fetchone()
    return None if row is None else int(row[0])


def break_connection_holding(url: str, key: int) -> int:
    """Cut the database connection holding lock ``key`` (as a failover or a network cut
    would); its backend's pid."""
    pid = backend_holding(url, key)
    assert pid is not None, "nobody holds the lock"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
    wait_for(lambda: backend_holding(url, key) != pid, 10, "the connection cut")
    return pid


@pytest.fixture
def lock_retakes_stop(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Servers started after this stop (SIGSTOP) where they are about to take a lock again
    whose connection broke; the file returned names the step once reached."""
    report = tmp_path / "reached"
    monkeypatch.setenv(faults.ENV, "lock-retake=stop,confirmed-lock-retake=stop")
    monkeypatch.setenv(faults.REPORT_ENV, str(report))
    return report


def reached(report: Path, step: str) -> bool:
    return report.exists() and step in report.read_text().split()


def test_the_running_lock_is_taken_again_when_its_database_connection_breaks(
    pair: tuple[ServerProcess, ServerProcess], postgres_url: str
) -> None:
    a, b = pair
    with ncclient_connect(a) as ma, ncclient_connect(b) as mb:
        ma.lock(target="running")
        break_connection_holding(postgres_url, RUNNING_LOCK)
        wait_for(lambda: "was taken again" in a.log_path.read_text(), 10, "a's lock again")
        assert backend_holding(postgres_url, RUNNING_LOCK) is not None
        refused = edit_running(mb, config(vpn_xml("jade")))
        assert refused is not None and refused.tag == "in-use"
        assert edit_running(ma, config(vpn_xml("amber"))) is None  # still the holder
        ma.unlock(target="running")
        assert locked(mb)


def test_a_session_whose_lock_lapsed_while_another_server_committed_is_ended(
    lock_retakes_stop: Path, pair: tuple[ServerProcess, ServerProcess], postgres_url: str
) -> None:
    """Between the connection's break and the lock taken again, b could commit: a's
    session must not go on believing that nobody else changed running."""
    a, b = pair
    assert a.proc is not None
    ma = ncclient_connect(a)  # ended by the server: never closed here
    with ncclient_connect(b) as mb:
        ma.lock(target="running")
        break_connection_holding(postgres_url, RUNNING_LOCK)
        wait_for(lambda: reached(lock_retakes_stop, "lock-retake"), 10, "a about to take it")
        try:
            assert edit_running(mb, config(vpn_xml("jade"))) is None  # no lock any more
        finally:
            os.killpg(a.proc.pid, signal.SIGCONT)
        wait_for(lambda: not ma.connected, 10, "the lock holder's session ended")
        log = a.log_path.read_text()
        assert "lock of session" in log and "was lost" in log and "changed running" in log
        assert locked(mb)
        with ncclient_connect(a) as again:
            wait_for(lambda: "jade" in customers(again), 10, "b's commit on a")


def test_a_confirmed_commit_outlives_a_broken_database_connection_of_its_server(
    lock_retakes_stop: Path, pair: tuple[ServerProcess, ServerProcess], postgres_url: str
) -> None:
    """b sees no server holding the commit's lock while a's connection is down: it must
    give a time to take it again rather than roll the commit back at once."""
    a, b = pair
    assert a.proc is not None
    with ncclient_connect(a) as ma, ncclient_connect(b) as mb:
        ma.edit_config(target="running", config=config(vpn_xml("kept")))
        ma.edit_config(target="candidate", config=config(vpn_xml("jade")))
        ma.commit(confirmed=True, timeout="600")
        wait_for(lambda: "jade" in customers(mb), 10, "jade on b")
        break_connection_holding(postgres_url, CONFIRMED_LOCK)
        wait_for(lambda: reached(lock_retakes_stop, "confirmed-lock-retake"), 10, "a stopped")
        try:
            wait_for(
                lambda: "holds no lock on its pending confirmed commit" in b.log_path.read_text(),
                10,
                "b sees the commit without a live server",
            )
        finally:
            os.killpg(a.proc.pid, signal.SIGCONT)
        wait_for(
            lambda: "confirmed commit's lock was taken again" in a.log_path.read_text(),
            10,
            "a holds it again",
        )
        ma.commit()  # the confirmation
        for m in (ma, mb):
            wait_for(lambda m=m: set(customers(m)) == {"kept", "jade"}, 10, "jade kept")
        assert "died with a confirmed commit pending" not in b.log_path.read_text()
