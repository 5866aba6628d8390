"""Logs an operator can use: real daemons, their stderr read back.

One line per commit (who, session, source address, paths; never a value), one per
provisioning step on the server, library chatter only when asked for, no warning at
start, plain prioritised lines under systemd's journal, JSON for log pipelines."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from lxml import etree

from nc_core.journal import stored_running
from tests.controller import CE_NS, controller, vpn_xml
from tests.netconf_server import ServerProcess, ncclient_connect, running_server
from tests.waiting import wait_for

NC = "urn:ietf:params:xml:ns:netconf:base:1.0"
PSK = "0123456789abcdef0123-never-logged"
PEER = (
    f'<config xmlns="{NC}"><ce xmlns="{CE_NS}"><peer><name>site-b</name>'
    f"<sp-address>192.0.2.2</sp-address><ike><pre-shared-key>{PSK}"
    "</pre-shared-key></ike></peer></ce></config>"
)


@pytest.fixture
def agent(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[ServerProcess]:
    extra = getattr(request, "param", ())
    with running_server(tmp_path, "cevpn-agent", "--dataplane", "none", *extra) as srv:
        yield srv


def log_after_one_commit(agent: ServerProcess) -> str:
    with ncclient_connect(agent) as m:
        m.edit_config(target="running", config=PEER)
    agent.stop()
    return agent.log_path.read_text()


def commit_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if "cevpn.commit" in line]


def test_a_commit_is_one_info_line_naming_who_session_source_and_paths(
    agent: ServerProcess,
) -> None:
    (line,) = commit_lines(log_after_one_commit(agent))
    assert " INFO cevpn.commit: running changed (edit) by admin (session " in line
    assert " from 127.0.0.1): " in line
    assert line.endswith("): create /cevpn-ce:ce")  # the top of what was created


def test_a_commit_line_never_holds_a_value(agent: ServerProcess) -> None:
    log = log_after_one_commit(agent)
    assert PSK not in log and "192.0.2.2" not in log


def test_a_leaf_list_entry_is_logged_by_its_leaf_list_not_its_value(agent: ServerProcess) -> None:
    def prefix(value: str) -> str:
        return (
            f'<config xmlns="{NC}"><ce xmlns="{CE_NS}"><peer><name>site-b</name><tunnel>'
            f"<remote-prefix>{value}</remote-prefix></tunnel></peer></ce></config>"
        )

    with ncclient_connect(agent) as m:
        m.edit_config(target="running", config=PEER)
        m.edit_config(target="running", config=prefix("198.51.100.0/24"))  # creates <tunnel>
        m.edit_config(target="running", config=prefix("203.0.113.0/24"))  # one more entry
    agent.stop()
    log = agent.log_path.read_text()
    assert commit_lines(log)[-1].endswith(
        "): create /cevpn-ce:ce/cevpn-ce:peer[cevpn-ce:name='site-b']"
        "/cevpn-ce:tunnel/cevpn-ce:remote-prefix"
    )
    assert "198.51.100" not in log and "203.0.113" not in log


def test_a_start_prints_no_warning_and_no_library_chatter(agent: ServerProcess) -> None:
    log = log_after_one_commit(agent)
    assert "Warning" not in log and "WARNING" not in log
    assert not [line for line in log.splitlines() if " asyncssh" in line or "paramiko" in line]


@pytest.mark.parametrize("agent", [("--debug-libraries",)], indirect=True)
def test_debug_libraries_lets_asyncssh_speak(agent: ServerProcess) -> None:
    log = log_after_one_commit(agent)
    assert " DEBUG asyncssh: " in log or " INFO asyncssh: " in log


@pytest.mark.parametrize("agent", [("--log-format", "json")], indirect=True)
def test_json_logs_are_one_object_a_line_with_the_commit_as_fields(agent: ServerProcess) -> None:
    entries = [json.loads(line) for line in log_after_one_commit(agent).splitlines()]
    assert all({"time", "level", "logger", "message"} <= entry.keys() for entry in entries)
    (commit,) = [e for e in entries if e["logger"] == "cevpn.commit"]
    assert commit["level"] == "INFO"
    assert commit["user"] == "admin" and commit["source"] == "127.0.0.1"
    assert isinstance(commit["session_id"], int) and commit["reason"] == "edit"
    assert commit["paths"] == ["create /cevpn-ce:ce"]
    assert commit["time"].endswith("+00:00")


def test_under_systemds_journal_lines_carry_a_priority_and_no_timestamp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = ServerProcess("cevpn-agent", tmp_path / "state", 0)
    server.log_path.touch()  # the daemon's stderr: JOURNAL_STREAM names this very file
    st = os.stat(server.log_path)
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
    with running_server(tmp_path, "cevpn-agent", "--dataplane", "none") as agent:
        lines = log_after_one_commit(agent).splitlines()
    assert lines and all(line.startswith(("<6>", "<4>", "<3>")) for line in lines), lines
    (commit,) = commit_lines("\n".join(lines))
    assert commit.startswith("<6>cevpn.commit: running changed (edit) by admin (session ")


def test_a_journal_stream_elsewhere_keeps_timestamps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("JOURNAL_STREAM", "1:1")  # inherited, but stderr was redirected
    with running_server(tmp_path, "cevpn-agent", "--dataplane", "none") as agent:
        (line,) = commit_lines(log_after_one_commit(agent))
    assert line[:4].isdigit() and " cevpn-agent INFO cevpn.commit: " in line


def test_each_provisioning_step_is_a_server_line_and_the_agent_logs_the_change(
    tmp_path: Path,
) -> None:
    with controller(tmp_path) as ctl:
        ctl.edit(vpn_xml("red"))
        ctl.join("red", "red-s1", 1, "10.1.0.0/24")
        # In sync first: red-s1's start-up fetch is over, so its peer red-s2 can reach it
        # only in a push of the server's (not in that fetch, were red-s2 added before it).
        ctl.in_sync("red-s1")
        ctl.join("red", "red-s2", 2, "10.2.0.0/24")
        ctl.in_sync("red-s1", "red-s2")
        agent_dir = ctl.agents["red-s1"].state_dir
        ce = etree.fromstring(stored_running(agent_dir))
    server_log = ctl.server.log_path.read_text()
    agent_log = (agent_dir.parent / "red-s1.log").read_text()
    assert "cevpn.server: CE red-s1: pushing version " in server_log
    assert "CE red-s1: version " in server_log and " committed and confirmed (" in server_log
    assert "cevpn.server.provisioning: CE red-s1: " in server_log  # status transitions
    changes = [line for line in commit_lines(agent_log) if "by cevpn-server" in line]
    assert changes and "/cevpn-ce:ce/cevpn-ce:peer[cevpn-ce:name='red-s2']" in "".join(changes)
    keys = [k.text for k in ce.iter(f"{{{CE_NS}}}encryption-key") if k.text]
    assert keys and not any(key in agent_log or key in server_log for key in keys)


def test_sigusr2_writes_every_threads_stack_to_the_log_and_the_daemon_carries_on(
    agent: ServerProcess,
) -> None:
    assert agent.proc is not None
    with ncclient_connect(agent) as m:
        os.kill(agent.proc.pid, signal.SIGUSR2)
        wait_for(lambda: "most recent call first" in agent.log_path.read_text(), 10, "stacks")
        m.edit_config(target="running", config=PEER)  # still serving
    log = agent.log_path.read_text()
    assert "Current thread" in log or "Thread 0x" in log
    assert PSK not in log
