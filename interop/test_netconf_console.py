"""netconf-console2 (3.0.1, the command-line client many operators script with)
against a running cevpn-server.  Host keys are verified through a private
known_hosts file named by an OpenSSH config (--ssh-config, --hostkey-verify).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.netconf_server import ADMIN, ServerProcess

SVC = "urn:cevpn:yang:cevpn-service"
CONSOLE = str(Path(sys.executable).parent / "netconf-console2")


def pinned_ssh_config(server: ServerProcess, home: Path) -> Path:
    """An OpenSSH config in ``home`` whose known_hosts holds ``server``'s key only."""
    known = home / "known_hosts"
    known.write_text(f"[{server.host}]:{server.port} {server.host_key_line}\n")
    config = home / "config"
    config.write_text(
        f"Host {server.host}\n  UserKnownHostsFile {known}\n  StrictHostKeyChecking yes\n"
    )
    return config


@pytest.fixture(scope="module")
def ssh_config(server: ServerProcess, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return pinned_ssh_config(server, tmp_path_factory.mktemp("console-ssh"))


def argv(server: ServerProcess, ssh_config: Path, *args: str) -> list[str]:
    return [
        CONSOLE, "--host", server.host, "--port", str(server.port), "-u", ADMIN[0],
        "-p", ADMIN[1], "--ssh-config", str(ssh_config), "--hostkey-verify", *args,
    ]  # fmt: skip


def vpn_xml(vpn: str, customer: str) -> str:
    return (
        f'<vpn-service xmlns="{SVC}"><vpn><id>{vpn}</id><customer>{customer}</customer></vpn>'
        "</vpn-service>"
    )


def console(server: ServerProcess, ssh_config: Path, *args: str, check: bool = True) -> str:
    proc = subprocess.run(
        argv(server, ssh_config, *args),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr


def xml_file(ssh_config: Path, name: str, text: str) -> str:
    path = ssh_config.parent / name
    path.write_text(text)
    return str(path)


def test_hello_lists_our_capabilities(server, ssh_config):
    out = console(server, ssh_config, "--hello")
    assert "urn:ietf:params:netconf:base:1.1" in out
    assert "module=cevpn-service" in out


def test_edit_then_get_config_with_subtree_filter(server, ssh_config):
    console(
        server,
        ssh_config,
        "--edit-config",
        xml_file(
            ssh_config,
            "acme.xml",
            f'<vpn-service xmlns="{SVC}"><vpn><id>acme</id><customer>ACME</customer></vpn>'
            "</vpn-service>",
        ),
    )
    out = console(
        server,
        ssh_config,
        "--get-config",
        "--filter",  # netconf-console2 turns this path into a subtree filter
        "/s:vpn-service/s:vpn[s:id='acme']",
        "-N",
        f"s={SVC}",
    )
    assert "<customer>ACME</customer>" in out


def test_get_with_xpath_filter(server, ssh_config):
    out = console(
        server,
        ssh_config,
        "--get",
        "-x",
        "/ncm:netconf-state/ncm:datastores",
        "-N",
        "ncm=urn:ietf:params:xml:ns:yang:ietf-netconf-monitoring",
    )
    assert "<name>running</name>" in out


def test_get_schema(server, ssh_config):
    out = console(server, ssh_config, "--get-schema", "cevpn-types")
    assert "module cevpn-types" in out


def test_invalid_edit_prints_the_rpc_error(server, ssh_config):
    out = console(
        server,
        ssh_config,
        "--edit-config",
        xml_file(
            ssh_config,
            "bad.xml",
            f'<vpn-service xmlns="{SVC}"><vpn><id>bad</id><customer>B</customer>'
            "<topology><type>hub-and-spoke</type></topology></vpn></vpn-service>",
        ),
        check=False,
    )
    assert "<error-tag>operation-failed</error-tag>" in out
    assert "vpn[cevpn-service:id='bad']" in out


def test_candidate_edit_and_commit(server, ssh_config):
    console(
        server,
        ssh_config,
        "--db",
        "candidate",
        "--edit-config",
        xml_file(
            ssh_config,
            "cand.xml",
            f'<vpn-service xmlns="{SVC}"><vpn><id>cand</id><customer>C</customer></vpn>'
            "</vpn-service>",
        ),
        "--commit",
    )
    out = console(server, ssh_config, "--get-config")
    assert "<id>cand</id>" in out


def test_with_defaults_report_all_shows_defaults(server, ssh_config):
    # Its own VPN: the test does not rely on what another test left in the database.
    console(
        server,
        ssh_config,
        "--edit-config",
        xml_file(
            ssh_config,
            "wd.xml",
            f'<vpn-service xmlns="{SVC}"><vpn><id>wd</id><customer>W</customer></vpn>'
            "</vpn-service>",
        ),
    )
    out = console(server, ssh_config, "--get-config", "--with-defaults", "report-all")
    assert "<keying>ike</keying>" in out  # a default, never configured
    explicit = console(server, ssh_config, "--get-config")
    assert "<keying>" not in explicit


def test_lock_and_unlock(server, ssh_config):
    out = console(server, ssh_config, "--lock", "--unlock")
    assert "rpc-error" not in out


def test_set_create_and_delete_with_both_delete_operations(server, ssh_config):
    ns = ["-N", f"s={SVC}"]
    console(server, ssh_config, *ns, "--set", "/s:vpn-service/s:vpn[s:id='setv']/s:customer=Set")
    assert "<id>setv</id>" in console(server, ssh_config, "--get-config")
    console(
        server,
        ssh_config,
        *ns,
        "--delete",
        "/s:vpn-service/s:vpn[s:id='setv']",
        "--del-operation",
        "delete",
    )
    assert "<id>setv</id>" not in console(server, ssh_config, "--get-config")
    out = console(
        server,
        ssh_config,
        *ns,
        "--delete",
        "/s:vpn-service/s:vpn[s:id='setv']",
        "--del-operation",
        "delete",
        check=False,
    )
    assert "<error-tag>data-missing</error-tag>" in out
    out = console(
        server,
        ssh_config,
        *ns,
        "--delete",
        "/s:vpn-service/s:vpn[s:id='setv']",
        "--del-operation",
        "remove",
    )
    assert "rpc-error" not in out


def test_replace_operation(server, ssh_config):
    path = xml_file(
        ssh_config,
        "rep.xml",
        f'<vpn-service xmlns="{SVC}"><vpn><id>rep</id><customer>One</customer>'
        "<description>gone after replace</description></vpn></vpn-service>",
    )
    console(server, ssh_config, "--edit-config", path)
    path = xml_file(
        ssh_config,
        "rep2.xml",
        f'<vpn-service xmlns="{SVC}" xmlns:nc="urn:ietf:params:xml:ns:netconf:base:1.0">'
        '<vpn nc:operation="replace"><id>rep</id><customer>Two</customer></vpn></vpn-service>',
    )
    console(server, ssh_config, "--edit-config", path)
    out = console(
        server,
        ssh_config,
        "--get-config",
        "-x",
        "/s:vpn-service/s:vpn[s:id='rep']",
        "-N",
        f"s={SVC}",
    )
    assert "<customer>Two</customer>" in out and "gone after replace" not in out


def test_lock_held_by_one_console_is_denied_to_another(server, ssh_config):
    holder = subprocess.Popen(
        argv(server, ssh_config, "--lock", "--sleep", "4", "--unlock"),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        time.sleep(2)
        out = console(server, ssh_config, "--lock", check=False)
        assert "<error-tag>lock-denied</error-tag>" in out
        assert "<session-id>" in out
    finally:
        holder.wait(20)
    assert "rpc-error" not in (holder.stdout.read() if holder.stdout else "")


def test_confirmed_commit_rolls_back_after_its_timeout(server, ssh_config):
    path = xml_file(
        ssh_config,
        "conf.xml",
        f'<vpn-service xmlns="{SVC}"><vpn><id>unconfirmed</id><customer>U</customer></vpn>'
        "</vpn-service>",
    )
    # One session: commit with a 2 s timeout, read, wait, read again.
    out = console(
        server, ssh_config, "--db", "candidate", "--edit-config", path,
        "--commit", "confirmed", "--timeout", "2",
        "--get-config", "--sleep", "3.5", "--get-config",
    )  # fmt: skip
    first, _, second = out.partition("</data>")
    assert "<id>unconfirmed</id>" in first
    assert "<id>unconfirmed</id>" not in second


def test_confirmed_commit_is_rolled_back_when_its_session_ends(server, ssh_config):
    path = xml_file(
        ssh_config,
        "conf2.xml",
        vpn_xml("orphan", "O"),
    )
    console(server, ssh_config, "--db", "candidate", "--edit-config", path, "--commit", "confirmed")
    assert "<id>orphan</id>" not in console(server, ssh_config, "--get-config")


def test_create_subscription_receives_notifications(server, ssh_config):
    listener = subprocess.Popen(
        argv(server, ssh_config, "--create-subscription", "--sleep", "4"),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    time.sleep(1.5)
    path = xml_file(
        ssh_config,
        "notif.xml",
        vpn_xml("notified", "N"),
    )
    console(server, ssh_config, "--edit-config", path)
    out, _ = listener.communicate(timeout=30)
    assert "netconf-config-change" in out


# -- NMDA (RFC 8342, 8526) through --rpc: netconf-console2 has no get-data command ----------

NMDA = "urn:ietf:params:xml:ns:yang:ietf-netconf-nmda"
DS = "urn:ietf:params:xml:ns:yang:ietf-datastores"
OR = "urn:ietf:params:xml:ns:yang:ietf-origin"


def nmda_rpc(ssh_config: Path, operation: str, inner: str) -> str:
    """A file holding one RFC 8526 operation, for ``--rpc``; its name is the operation's
    and a hash of its content, so tests do not overwrite each other's."""
    text = f'<{operation} xmlns="{NMDA}" xmlns:ds="{DS}">{inner}</{operation}>'
    return xml_file(ssh_config, f"{operation}-{abs(hash(text))}.xml", text)


def test_yang_library_lists_the_nmda_datastores(server, ssh_config):
    out = console(
        server, ssh_config, "--get", "-x", "/yl:yang-library/yl:datastore/yl:name",
        "-N", "yl=urn:ietf:params:xml:ns:yang:ietf-yang-library",
    )  # fmt: skip
    for datastore in ("running", "candidate", "startup", "operational"):
        assert f"ds:{datastore}</name>" in out, out


def test_get_data_of_operational_has_state_with_origin(server, ssh_config):
    console(server, ssh_config, "--edit-config",
            xml_file(ssh_config, "nmda-op.xml", vpn_xml("nmda-op", "OP")))  # fmt: skip
    request = nmda_rpc(
        ssh_config, "get-data", "<datastore>ds:operational</datastore><with-origin/>"
    )
    out = console(server, ssh_config, "--rpc", request)
    assert "<id>nmda-op</id>" in out
    assert "netconf-state" in out  # config false data
    assert f'xmlns:or="{OR}"' in out and 'or:origin="or:intended"' in out, out


def test_get_data_of_candidate_shows_what_running_does_not_yet(server, ssh_config):
    console(server, ssh_config, "--db", "candidate", "--edit-config",
            xml_file(ssh_config, "nmda-cand.xml", vpn_xml("nmda-cand", "C")))  # fmt: skip
    try:
        for datastore, present in (("candidate", True), ("running", False)):
            request = nmda_rpc(
                ssh_config,
                "get-data",
                f"<datastore>ds:{datastore}</datastore>"
                f'<subtree-filter><vpn-service xmlns="{SVC}"/></subtree-filter>',
            )
            out = console(server, ssh_config, "--rpc", request)
            assert ("<id>nmda-cand</id>" in out) is present, out
            assert "netconf-state" not in out
    finally:
        console(server, ssh_config, "--discard-changes")


def test_edit_data_on_candidate_then_commit(server, ssh_config):
    request = nmda_rpc(
        ssh_config,
        "edit-data",
        f"<datastore>ds:candidate</datastore><config>{vpn_xml('nmda-edit', 'E')}</config>",
    )
    out = console(server, ssh_config, "--rpc", request)
    assert "<ok/>" in out, out
    console(server, ssh_config, "--commit")
    out = console(server, ssh_config, "--get-config", "--filter",
                  "/s:vpn-service/s:vpn[s:id='nmda-edit']", "-N", f"s={SVC}")  # fmt: skip
    assert "<customer>E</customer>" in out


def test_get_data_of_a_datastore_that_does_not_exist_prints_the_rpc_error(server, ssh_config):
    request = nmda_rpc(ssh_config, "get-data", "<datastore>ds:intended</datastore>")
    out = console(server, ssh_config, "--rpc", request, check=False)
    assert "rpc-error" in out and "invalid-value" in out, out


# -- the CE agent (cevpn-ce and ietf-system, no service model) ----------------------------

SYS = "urn:ietf:params:xml:ns:yang:ietf-system"


@pytest.fixture(scope="module")
def agent_ssh_config(agent: ServerProcess, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return pinned_ssh_config(agent, tmp_path_factory.mktemp("console-agent-ssh"))


def test_agent_hello_lists_the_ce_model(agent, agent_ssh_config):
    out = console(agent, agent_ssh_config, "--hello")
    assert "urn:ietf:params:netconf:base:1.1" in out and "module=cevpn-ce" in out


def test_agent_candidate_edit_commit_and_filtered_get_config(agent, agent_ssh_config):
    user = (
        f'<system xmlns="{SYS}"><authentication><user><name>console-op</name></user>'
        "</authentication></system>"
    )
    console(agent, agent_ssh_config, "--db", "candidate", "--edit-config",
            xml_file(agent_ssh_config, "agent-user.xml", user))  # fmt: skip
    console(agent, agent_ssh_config, "--commit")
    out = console(agent, agent_ssh_config, "--get-config", "--filter",
                  "/sys:system/sys:authentication/sys:user[sys:name='console-op']",
                  "-N", f"sys={SYS}")  # fmt: skip
    assert "<name>console-op</name>" in out


def test_agent_get_data_of_operational_through_rpc(agent, agent_ssh_config):
    request = nmda_rpc(
        agent_ssh_config,
        "get-data",
        "<datastore>ds:operational</datastore><subtree-filter><netconf-state xmlns="
        '"urn:ietf:params:xml:ns:yang:ietf-netconf-monitoring"><sessions/></netconf-state>'
        "</subtree-filter>",
    )
    out = console(agent, agent_ssh_config, "--rpc", request)
    assert "<session-id>" in out, out
