"""The application hook: validate / prepare / apply / abort, and nothing half-applied.

An in-process server (real asyncssh, real ncclient) with a test application
that records the phases it sees and can be told to fail.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from lxml import etree
from ncclient import manager
from ncclient.operations.rpc import RPCError

from nc_core.errors import RpcError
from nc_core.journal import stored_running
from nc_core.schema import CE_MODULES
from nc_core.server import NetconfServer, ServerOptions
from nc_core.transaction import Application, Transaction
from nc_core.transport_ssh import host_key_line, listen
from tests.netconf_server import free_port

CE = "urn:cevpn:yang:cevpn-ce"
NC = "urn:ietf:params:xml:ns:netconf:base:1.0"
PSK = "0123456789abcdef0123"


class Recorder(Application):
    modules = CE_MODULES

    def __init__(self) -> None:
        self.phases: list[tuple[str, str]] = []
        self.fail_apply: Exception | None = None
        self.refuse: RpcError | None = None
        self.last: Transaction | None = None

    async def validate(self, txn: Transaction) -> None:
        self.phases.append(("validate", txn.reason))
        if self.refuse is not None:
            raise self.refuse

    async def prepare(self, txn: Transaction) -> None:
        self.phases.append(("prepare", txn.reason))

    async def apply(self, txn: Transaction) -> None:
        self.phases.append(("apply", txn.reason))
        self.last = txn
        if self.fail_apply is not None:
            raise self.fail_apply

    async def abort(self, txn: Transaction) -> None:
        self.phases.append(("abort", txn.reason))

    async def operational(self, session: object) -> list[etree._Element]:
        state = etree.Element(f"{{{CE}}}ce-state", nsmap={None: CE})
        etree.SubElement(state, f"{{{CE}}}applied-version").text = "v-test"
        return [state]


class InProcessServer:
    def __init__(self, state_dir: Path, app: Recorder) -> None:
        self.app = app
        self.port = free_port()
        self.loop = asyncio.new_event_loop()
        self.server = NetconfServer(ServerOptions(state_dir=state_dir, port=self.port), app)
        self.server.add_user_offline(
            "admin", password="pw-admin-1", public_keys=[], groups=["admin"]
        )
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.call(self._start())
        self.host_key = host_key_line(state_dir).split()[1]

    async def _start(self) -> None:
        await self.server.load()
        self.acceptor = await listen(self.server, "127.0.0.1", self.port)

    def call(self, coro):  # type: ignore[no-untyped-def]
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    def connect(self):  # type: ignore[no-untyped-def]
        return manager.connect(
            host="127.0.0.1",
            port=self.port,
            username="admin",
            password="pw-admin-1",
            hostkey_verify=True,
            hostkey_b64=self.host_key,
            allow_agent=False,
            look_for_keys=False,
            timeout=30,
        )

    def close(self) -> None:
        async def stop() -> None:
            self.acceptor.close()
            self.server.close()

        self.call(stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture
def srv(tmp_path: Path) -> Iterator[InProcessServer]:
    server = InProcessServer(tmp_path / "state", Recorder())
    try:
        yield server
    finally:
        server.close()


def peer_config(name: str = "b") -> str:
    return (
        f'<config xmlns="{NC}"><ce xmlns="{CE}"><peer><name>{name}</name>'
        f"<sp-address>192.0.2.2</sp-address><ike><pre-shared-key>{PSK}</pre-shared-key></ike>"
        "</peer></ce></config>"
    )


def peers(m) -> list[str]:  # type: ignore[no-untyped-def]
    data = etree.fromstring(m.get_config("running").data_xml.encode())
    return data.xpath("//c:peer/c:name/text()", namespaces={"c": CE})


def test_running_is_applied_through_the_application_at_start(srv):
    assert srv.app.phases[:3] == [
        ("validate", "startup"),
        ("prepare", "startup"),
        ("apply", "startup"),
    ]


def test_an_edit_runs_validate_prepare_apply_with_the_changes(srv):
    srv.app.phases.clear()
    with srv.connect() as m:
        m.edit_config(target="running", config=peer_config())
    assert srv.app.phases == [("validate", "edit"), ("prepare", "edit"), ("apply", "edit")]
    txn = srv.app.last
    assert txn is not None and txn.user == "admin"
    created = [c.element for c in txn.changes if c.op == "create"]
    assert [e.tag.split("}")[1] for e in created] == ["ce"]  # the new subtree, by its top
    assert created[0].findtext(f".//{{{CE}}}pre-shared-key") == PSK
    assert txn.new_json()["cevpn-ce:ce"]["peer"][0]["tunnel"]["establishment"] == "permanent"


def test_a_failing_apply_is_aborted_and_leaves_running_unchanged(srv):
    srv.app.fail_apply = OSError("kernel said no")
    srv.app.phases.clear()
    with srv.connect() as m:
        with pytest.raises(RPCError) as err:
            m.edit_config(target="running", config=peer_config())
        assert err.value.tag == "operation-failed"
        assert "kernel said no" in err.value.message
        assert peers(m) == []
    assert srv.app.phases[-1] == ("abort", "edit")
    assert b"<peer>" not in stored_running(srv.server.options.state_dir)


def test_an_application_refusal_reaches_the_client_as_its_rpc_error(srv):
    srv.app.refuse = RpcError(
        "invalid-value",
        "peer b is unreachable from this CE",
        path="/cevpn-ce:ce/cevpn-ce:peer[cevpn-ce:name='b']",
        path_ns={"cevpn-ce": CE},
    )
    with srv.connect() as m:
        with pytest.raises(RPCError) as err:
            m.edit_config(target="running", config=peer_config())
        assert err.value.tag == "invalid-value"
        assert err.value.path == "/cevpn-ce:ce/cevpn-ce:peer[cevpn-ce:name='b']"
        assert peers(m) == []


def test_commit_of_the_candidate_is_one_transaction(srv):
    srv.app.phases.clear()
    with srv.connect() as m:
        m.edit_config(target="candidate", config=peer_config("b"))
        m.edit_config(target="candidate", config=peer_config("c").replace("192.0.2.2", "192.0.2.3"))
        assert srv.app.phases == []
        m.commit()
    assert srv.app.phases == [("validate", "commit"), ("prepare", "commit"), ("apply", "commit")]


def test_operational_data_from_the_application_appears_in_get(srv):
    with srv.connect() as m:
        data = m.get(filter=("subtree", f'<ce-state xmlns="{CE}"/>')).data_xml
    assert "<applied-version>v-test</applied-version>" in data


def test_clear_text_password_is_stored_hashed(srv):
    sys_ns = "urn:ietf:params:xml:ns:yang:ietf-system"
    with srv.connect() as m:
        m.edit_config(
            target="running",
            config=f'<config xmlns="{NC}"><system xmlns="{sys_ns}"><authentication><user>'
            "<name>bob</name><password>$0$bobs-password</password></user></authentication>"
            "</system></config>",
        )
        data = m.get_config("running").data_xml
    assert "bobs-password" not in data
    assert "<password>$6$" in data
    assert srv.server.users["bob"].password.startswith("$6$")  # type: ignore[union-attr]
