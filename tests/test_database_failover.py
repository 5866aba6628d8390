"""The backup database: the primary PostgreSQL dies, its synchronous standby is promoted.

Real PostgreSQL (a primary and a synchronous streaming-replication standby,
tests/postgres.py), a real cevpn-server given both in one multi-host URL with
``target_session_attrs=read-write``, ncclient as the operator.  Every commit
the operator got <ok/> for is on the standby (``synchronous_commit`` with a
synchronous standby) and so in running after the promotion; a commit while no
database accepts writes gets an rpc-error in bounded time and changes nothing;
the server reconnects by itself and commits work again; the password is in no
log line.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest
from lxml import etree
from ncclient.operations.rpc import RPCError

from tests.controller import vpn_xml
from tests.netconf_server import ADMIN, ServerProcess, free_port, ncclient_connect
from tests.postgres import PASSWORD, ReplicatedPostgres
from tests.waiting import wait_for

SVC = "urn:cevpn:yang:cevpn-service"
NC = "urn:ietf:params:xml:ns:netconf:base:1.0"
NS = {"s": SVC}

COMMIT_BOUND = 20.0
"""Seconds within which any commit is answered, database or not (never a hang)."""
OUTAGE_REFUSALS = 12
"""Commits of the stream refused before the standby is promoted (some seconds' outage)."""


def config(body: str) -> str:
    return f'<config xmlns="{NC}">{body}</config>'


def vpns_of(document: bytes | str) -> set[str]:
    root = etree.fromstring(document.encode() if isinstance(document, str) else document)
    return {vpn.findtext("s:id", namespaces=NS) or "" for vpn in root.iterfind(".//s:vpn", NS)}


def running_vpns(m: Any) -> set[str]:
    reply = m.get_config(source="running", filter=("subtree", f'<vpn-service xmlns="{SVC}"/>'))
    return vpns_of(reply.data_xml)


def stored_vpns(url: str) -> set[str]:
    """The VPNs of running as the database holds it (read directly, not through a server)."""
    with psycopg.connect(url, autocommit=True, connect_timeout=5) as conn:
        row = conn.execute(
            "SELECT value FROM cevpn_kv WHERE tbl = 'datastore' AND key = 'running'"
        ).fetchone()
    assert row is not None
    return vpns_of(bytes(row[0]))


def commit_vpn(m: Any, vpn: str) -> RPCError | None:
    """edit-config of the candidate, then commit; the rpc-error if either is refused."""
    try:
        m.discard_changes()
        m.edit_config(target="candidate", config=config(vpn_xml(vpn)))
        m.commit()
    except RPCError as error:
        return error
    return None


@dataclass
class Outcome:
    vpn: str
    started: float
    seconds: float
    error: RPCError | None


@dataclass
class CommitStream:
    """Commits, one new VPN each, from one operator session in a thread, until stopped."""

    server: ServerProcess
    outcomes: list[Outcome] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    failure: BaseException | None = None

    def run(self) -> None:
        try:
            with ncclient_connect(self.server) as m:
                n = 0
                while not self.stop.is_set():
                    vpn = f"stream{n}"
                    started = time.monotonic()
                    error = commit_vpn(m, vpn)
                    self.outcomes.append(Outcome(vpn, started, time.monotonic() - started, error))
                    n += 1
        except BaseException as exc:  # the test fails on it, with this cause
            self.failure = exc

    def acknowledged(self) -> list[Outcome]:
        return [o for o in list(self.outcomes) if o.error is None]

    def refused(self) -> list[Outcome]:
        return [o for o in list(self.outcomes) if o.error is not None]


@pytest.fixture
def server(tmp_path: Path, replicated_postgres: ReplicatedPostgres) -> Iterator[ServerProcess]:
    url = replicated_postgres.database()
    server = ServerProcess("cevpn-server", tmp_path / "state", free_port(), database=url)
    server.adduser(ADMIN[0], ADMIN[1], ("admin",))
    server.start()
    try:
        yield server
    finally:
        server.stop()


def test_the_standby_is_synchronous(replicated_postgres: ReplicatedPostgres) -> None:
    assert replicated_postgres.sync_state() == "sync"
    url = replicated_postgres.database()
    name = url.rsplit("/", 1)[1].split("?")[0]

    def on_standby() -> bool:
        with replicated_postgres.standby.superuser() as conn:
            return bool(
                conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
            )

    wait_for(on_standby, 30, "the database made on the primary, on the standby")


def test_every_acknowledged_commit_survives_the_failover_and_commits_work_again(
    server: ServerProcess, replicated_postgres: ReplicatedPostgres, tmp_path: Path
) -> None:
    assert server.database is not None
    # A second server on the same URL, which only follows: it too reconnects by itself.
    other = ServerProcess("cevpn-server", tmp_path / "other", free_port(), database=server.database)
    other.start()
    try:
        _stream_through_failover(server, other, replicated_postgres)
    finally:
        other.stop()


def _stream_through_failover(
    server: ServerProcess, other: ServerProcess, replicated_postgres: ReplicatedPostgres
) -> None:
    assert server.database is not None
    stream = CommitStream(server)
    thread = threading.Thread(target=stream.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: len(stream.acknowledged()) >= 5, 60, "5 acknowledged commits")
        replicated_postgres.primary.kill9()
        killed = time.monotonic()

        # While no database accepts writes, a commit is refused within a bounded time.
        with ncclient_connect(server) as m:
            started = time.monotonic()
            error = commit_vpn(m, "during-outage")
            outage_commit = time.monotonic() - started
        assert error is not None, "a commit with no database was acknowledged"
        assert outage_commit < COMMIT_BOUND
        print(f"commit during the outage: {error.tag}: {error.message} ({outage_commit:.2f} s)")
        # An outage of seconds, as an HA tool takes to decide: the pool's reconnection
        # attempts back off meanwhile (never past storage_postgresql.RECONNECT).
        wait_for(
            lambda: len([o for o in stream.refused() if o.started > killed]) >= OUTAGE_REFUSALS,
            COMMIT_BOUND * OUTAGE_REFUSALS,
            f"{OUTAGE_REFUSALS} refused commits of the stream",
        )
        print(f"outage: {time.monotonic() - killed:.2f} s")

        replicated_postgres.promote()
        promoted = time.monotonic()
        wait_for(
            lambda: any(o.started > promoted for o in stream.acknowledged()),
            30,
            "an acknowledged commit after the promotion",
        )
        first = min(o.started + o.seconds for o in stream.acknowledged() if o.started > promoted)
        print(f"promotion -> first acknowledged commit: {first - promoted:.2f} s")
        wait_for(
            lambda: len([o for o in stream.acknowledged() if o.started > promoted]) >= 3,
            30,
            "3 acknowledged commits after the promotion",
        )
    finally:
        stream.stop.set()
        thread.join(COMMIT_BOUND * 2)
    assert not thread.is_alive(), "a commit hung"
    assert stream.failure is None, stream.failure
    for outcome in stream.outcomes:
        assert outcome.seconds < COMMIT_BOUND, outcome
    acknowledged = {o.vpn for o in stream.acknowledged()}
    print(
        f"{len(acknowledged)} acknowledged, {len(stream.refused())} refused: "
        + ", ".join(
            f"{o.vpn} {o.error.tag if o.error else 'ok'} {o.seconds:.2f}s" for o in stream.outcomes
        )
    )

    stored = stored_vpns(server.database)
    with ncclient_connect(server) as m:
        seen = running_vpns(m)
    assert acknowledged <= stored, acknowledged - stored
    assert acknowledged <= seen, acknowledged - seen
    assert "during-outage" not in stored | seen
    # What the server shows is what the database holds (a refused commit that the database
    # made nonetheless, its acknowledgement lost, is adopted).
    assert seen == stored
    with ncclient_connect(other) as m:
        wait_for(lambda: running_vpns(m) == stored, 10, "the other server following")

    log = server.log_path.read_text()
    assert PASSWORD not in log
    assert PASSWORD not in other.log_path.read_text()
    assert "the VPN database" in log  # the connection errors are logged, redacted


def test_a_connection_lost_while_the_commit_is_stored_is_an_rpc_error_and_changes_nothing(
    tmp_path: Path, postgres_url: str
) -> None:
    """The database connection breaks after the change was applied, while running is
    written (a trigger of the real database terminates its own backend there): the commit
    is refused, running (on the server, in the database) is as it was, and the next commit
    works on a new connection."""
    server = ServerProcess("cevpn-server", tmp_path / "state", free_port(), database=postgres_url)
    server.adduser(ADMIN[0], ADMIN[1], ("admin",))
    server.start()
    try:
        with ncclient_connect(server) as m:
            assert commit_vpn(m, "before") is None
            with psycopg.connect(postgres_url, autocommit=True) as conn:
                conn.execute(
                    "CREATE FUNCTION doom() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
                    " IF NEW.key = 'running' AND position('doomed'::bytea IN NEW.value) > 0"
                    " THEN PERFORM pg_terminate_backend(pg_backend_pid()); END IF;"
                    " RETURN NEW; END $$"
                )
                conn.execute(
                    "CREATE TRIGGER doom BEFORE INSERT OR UPDATE ON cevpn_kv"
                    " FOR EACH ROW EXECUTE FUNCTION doom()"
                )
            started = time.monotonic()
            error = commit_vpn(m, "doomed")
            assert error is not None, "a commit whose connection broke was acknowledged"
            assert time.monotonic() - started < COMMIT_BOUND
            print(f"{error.tag}: {error.message}")
            assert error.tag == "operation-failed"
            assert "could not be stored" in error.message
            assert PASSWORD not in error.message
            assert "doomed" not in running_vpns(m)
            assert "doomed" not in stored_vpns(postgres_url)
            assert commit_vpn(m, "after") is None
            assert running_vpns(m) == {"before", "after"} == stored_vpns(postgres_url)
    finally:
        server.stop()
    log = server.log_path.read_text()
    assert PASSWORD not in log
    assert "commit not stored" in log
    assert "could not be taken back" not in log  # the application is back to running
