"""Committed configuration survives kill -9 at any moment; unconfirmed commits do not."""

from __future__ import annotations

import random
import threading
from pathlib import Path

import pytest
from lxml import etree
from ncclient.operations.rpc import RPCError

from tests.netconf_server import ADMIN, ServerProcess, free_port, ncclient_connect
from tests.waiting import wait_until

SVC = "urn:cevpn:yang:cevpn-service"
NC = "urn:ietf:params:xml:ns:netconf:base:1.0"


def vpn(vpn_id: str) -> str:
    return (
        f'<config xmlns="{NC}"><vpn-service xmlns="{SVC}"><vpn><id>{vpn_id}</id>'
        f"<customer>c-{vpn_id}</customer></vpn></vpn-service></config>"
    )


def vpn_ids(m) -> list[str]:  # type: ignore[no-untyped-def]
    data = etree.fromstring(m.get_config("running").data_xml.encode())
    return data.xpath("//s:vpn/s:id/text()", namespaces={"s": SVC})


BOTH_BACK_ENDS = pytest.mark.parametrize("server", ["sqlite", "postgresql"], indirect=True)
"""For the few tests that also run on PostgreSQL (the storage contract itself is
tests/test_storage.py's: a server on each back end for every test would double their cost)."""


@pytest.fixture
def server(request: pytest.FixtureRequest, tmp_path: Path):  # type: ignore[no-untyped-def]
    database = None
    if getattr(request, "param", "sqlite") == "postgresql":
        database = request.getfixturevalue("postgres_url")
    srv = ServerProcess("cevpn-server", tmp_path / "state", free_port(), database=database)
    srv.adduser(ADMIN[0], ADMIN[1], ("admin",))
    srv.start()
    yield srv
    srv.stop()


@BOTH_BACK_ENDS
def test_committed_configuration_survives_kill_9(server):
    with ncclient_connect(server) as m:
        m.edit_config(target="running", config=vpn("acme"))
    server.kill9()
    server.start()
    with ncclient_connect(server) as m:
        assert vpn_ids(m) == ["acme"]


def test_kill_9_at_random_moments_during_edits_never_loses_or_tears_a_commit(server):
    rng = random.Random(7)
    committed: list[str] = []
    for round_ in range(5):
        stop = threading.Event()
        acked: list[str] = []

        def edit_loop(
            prefix: str = f"r{round_}",
            stop: threading.Event = stop,
            acked: list[str] = acked,
        ) -> None:
            # No `with`: its close-session, on a session whose server was killed,
            # waits ncclient's whole 30 s timeout for a reply that cannot come.
            try:
                m = ncclient_connect(server)
                for i in range(1000):
                    if stop.is_set():
                        return
                    name = f"{prefix}-{i}"
                    m.edit_config(target="running", config=vpn(name))
                    acked.append(name)
            except Exception:  # the server is killed under us: expected
                return

        worker = threading.Thread(target=edit_loop)
        worker.start()
        # Killed while the edits stream in, after a (seeded) random number of them was
        # acknowledged: the moment within the next commit's write is whatever it is.
        target = rng.randint(1, 6)
        wait_until(lambda a=acked, n=target, w=worker: len(a) >= n or not w.is_alive(), 60, 0.005)
        assert len(acked) >= target, "the edits did not start"
        server.kill9()
        stop.set()
        worker.join(30)
        assert not worker.is_alive(), "the editing client did not see the server die"
        committed += acked
        server.start()
        with ncclient_connect(server) as m:
            present = set(vpn_ids(m))
        # every acknowledged commit is there; at most the one in flight is extra
        assert set(committed) <= present
        assert len(present - set(committed)) <= 1
        committed = sorted(present)


@BOTH_BACK_ENDS
def test_pending_confirmed_commit_is_rolled_back_after_kill_9(server):
    with ncclient_connect(server) as m:
        m.edit_config(target="running", config=vpn("kept"))
        m.edit_config(target="candidate", config=vpn("unconfirmed"))
        m.commit(confirmed=True, timeout="600")
        assert sorted(vpn_ids(m)) == ["kept", "unconfirmed"]
    server.kill9()
    server.start()
    with ncclient_connect(server) as m:
        assert vpn_ids(m) == ["kept"]


@BOTH_BACK_ENDS
def test_startup_is_saved_by_copy_config_and_used_when_running_is_lost(server):
    with ncclient_connect(server) as m:
        m.edit_config(target="running", config=vpn("saved"))
        m.copy_config(source="running", target="startup")
        m.edit_config(target="running", config=vpn("unsaved"))
        startup = etree.fromstring(m.get_config("startup").data_xml.encode())
        assert startup.xpath("//s:vpn/s:id/text()", namespaces={"s": SVC}) == ["saved"]
    server.stop()
    # The VPN server keeps its datastores in its storage (nc_server.storage): lose running there.
    from nc_server.storage import SqliteDatastores, open_storage

    storage = open_storage(server.database, server.state_dir)
    SqliteDatastores(storage).delete("running")
    storage.close()
    server.start()
    with ncclient_connect(server) as m:
        assert vpn_ids(m) == ["saved"]


@BOTH_BACK_ENDS
def test_running_cannot_be_deleted_but_startup_can(server):
    with ncclient_connect(server) as m:
        with pytest.raises(RPCError) as err:
            m.delete_config(target="running")
        assert err.value.tag == "invalid-value"
        m.delete_config(target="startup")
        assert "<vpn-service" not in m.get_config("startup").data_xml


def test_datastore_files_are_private(server):
    for name in ("vpn-server.db", "ssh_host_ed25519_key", "southbound_ed25519_key"):
        assert (server.state_dir / name).stat().st_mode & 0o077 == 0, name
    assert server.state_dir.stat().st_mode & 0o077 == 0
