"""Ansible's ``ansible.netcommon`` NETCONF modules (ansible 12.3.0 from PyPI, which bundles
the collection; ansible-core 2.19) against both servers, as an operator's playbook uses
them: ``connection: ansible.netcommon.netconf`` with the default NETCONF platform,
password login, the host key checked against a known_hosts file.

Each test writes an inventory and a playbook, runs ``ansible-playbook`` as a user would,
and then reads the server with ncclient to see the change really happened.  The
playbooks' own ``assert`` tasks check what the modules returned.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from interop.documents import NC, SYS, user_config
from tests.netconf_server import ADMIN, BIN, ServerProcess, ncclient_connect

NMDA = "urn:ietf:params:xml:ns:yang:ietf-netconf-nmda"
DS = "urn:ietf:params:xml:ns:yang:ietf-datastores"
PLAYBOOK_BIN = Path(sys.executable).parent / "ansible-playbook"

pytestmark = [
    pytest.mark.timeout(300),
    pytest.mark.skipif(not PLAYBOOK_BIN.exists(), reason="ansible is a dev dependency"),
]


def known_hosts_line(server: ServerProcess) -> str:
    """What ``host-key --known-hosts`` prints: the line paramiko (under ncclient, under
    Ansible) looks ``[host]:port`` up in."""
    return subprocess.run(
        [str(BIN / server.command), "host-key", "--state-dir", str(server.state_dir),
         "--known-hosts", f"{server.host}:{server.port}"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip


def playbook(
    server: ServerProcess, home: Path, tasks: list[dict[str, object]], *, host_key: str = ""
) -> subprocess.CompletedProcess[str]:
    """Run ``tasks`` against ``server`` with ansible-playbook; HOME is ``home``, whose
    ~/.ssh/known_hosts holds the server's key (or ``host_key`` instead)."""
    ssh = home / ".ssh"
    ssh.mkdir(parents=True, exist_ok=True)
    (ssh / "known_hosts").write_text(host_key or known_hosts_line(server))
    inventory = home / "inventory.json"
    inventory.write_text(
        json.dumps(
            {
                "all": {
                    "hosts": {
                        "ce": {
                            "ansible_host": server.host,
                            "ansible_port": server.port,
                            "ansible_user": ADMIN[0],
                            "ansible_password": ADMIN[1],
                            "ansible_connection": "ansible.netcommon.netconf",
                            "ansible_network_os": "default",
                        }
                    }
                }
            }
        )
    )
    book = home / "play.json"  # YAML is a superset of JSON
    book.write_text(json.dumps([{"hosts": "ce", "gather_facts": False, "tasks": tasks}]))
    env = {
        **os.environ,
        "HOME": str(home),
        "ANSIBLE_HOST_KEY_CHECKING": "True",
        "ANSIBLE_LOCAL_TEMP": str(home / "tmp"),
        "ANSIBLE_PERSISTENT_CONTROL_PATH_DIR": str(home / "cp"),
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_FORCE_COLOR": "0",
        "ANSIBLE_STDOUT_CALLBACK": "default",
        "ANSIBLE_PYTHON_INTERPRETER": sys.executable,
        "PATH": f"{PLAYBOOK_BIN.parent}:{os.environ.get('PATH', '')}",
    }
    return subprocess.run(
        [str(PLAYBOOK_BIN), "-i", str(inventory), str(book)],
        capture_output=True, text=True, env=env, timeout=240, check=False,
    )  # fmt: skip


def ran(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def user_names(server: ServerProcess) -> list[str]:
    with ncclient_connect(server) as m:
        reply = m.get_config("running").data_ele
    return sorted(str(n) for n in reply.xpath("//s:user/s:name/text()", namespaces={"s": SYS}))


def test_netconf_get_reads_running_with_a_subtree_filter(either, tmp_path):
    out = ran(
        playbook(
            either,
            tmp_path,
            [
                {
                    "name": "read the accounts",
                    "ansible.netcommon.netconf_get": {
                        "source": "running",
                        "filter": f'<system xmlns="{SYS}"><authentication><user><name/>'
                        "</user></authentication></system>",
                        "display": "xml",
                    },
                    "register": "users",
                },
                {"ansible.builtin.assert": {"that": [f"'{ADMIN[0]}' in users.stdout"]}},
                {"ansible.builtin.assert": {"that": ["'password' not in users.stdout"]}},
            ],
        )
    )
    assert "failed=0" in out


def test_netconf_config_edits_the_candidate_commits_and_deletes(either, tmp_path):
    name = f"ansible-{either.command}"
    out = ran(
        playbook(
            either,
            tmp_path,
            [
                {
                    "name": "add an account",
                    "ansible.netcommon.netconf_config": {
                        "content": user_config(name),
                        "target": "candidate",
                        "commit": True,
                        "lock": "always",
                    },
                    "register": "added",
                },
                {"ansible.builtin.assert": {"that": ["added.changed"]}},
                {
                    "name": "the same again changes nothing",
                    "ansible.netcommon.netconf_config": {
                        "content": user_config(name),
                        "target": "candidate",
                        "commit": True,
                    },
                    "register": "again",
                },
                {"ansible.builtin.assert": {"that": ["not again.changed"]}},
            ],
        )
    )
    assert "failed=0" in out
    assert name in user_names(either)
    ran(
        playbook(
            either,
            tmp_path,
            [
                {
                    "ansible.netcommon.netconf_config": {
                        "content": user_config(name, "delete"),
                        "target": "candidate",
                        "commit": True,
                    }
                }
            ],
        )
    )
    assert name not in user_names(either)


def test_netconf_rpc_sends_get_data_of_operational(either, tmp_path):
    out = ran(
        playbook(
            either,
            tmp_path,
            [
                {
                    "ansible.netcommon.netconf_rpc": {
                        "rpc": "get-data",
                        "xmlns": NMDA,
                        "content": f'<datastore xmlns:ds="{DS}">ds:operational</datastore>'
                        "<subtree-filter><netconf-state xmlns="
                        '"urn:ietf:params:xml:ns:yang:ietf-netconf-monitoring">'
                        "<sessions/></netconf-state></subtree-filter>",
                        "display": "xml",
                    },
                    "register": "state",
                },
                {"ansible.builtin.assert": {"that": ["'<session-id>' in state.output"]}},
            ],
        )
    )
    assert "failed=0" in out


def test_an_invalid_edit_fails_the_task_with_the_servers_error_and_changes_nothing(
    either, tmp_path
):
    bad = (
        f'<config xmlns="{NC}"><system xmlns="{SYS}"><authentication><user>'
        "<name>ansible-bad</name><no-such-leaf>1</no-such-leaf></user></authentication>"
        "</system></config>"
    )
    result = playbook(
        either,
        tmp_path,
        [
            {
                "ansible.netcommon.netconf_config": {
                    "content": bad,
                    "target": "candidate",
                    "commit": True,
                }
            }
        ],
    )
    assert result.returncode != 0
    assert "no-such-leaf" in result.stdout, result.stdout
    assert "ansible-bad" not in user_names(either)


def test_a_wrong_pinned_host_key_stops_the_play_before_login(server, tmp_path):
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "other")],
                   check=True)  # fmt: skip
    other = (tmp_path / "other.pub").read_text().split()
    result = playbook(
        server,
        tmp_path,
        [{"ansible.netcommon.netconf_get": {"source": "running"}}],
        host_key=f"[{server.host}]:{server.port} {other[0]} {other[1]}\n",
    )
    assert result.returncode != 0
    assert "Unknown host key" in result.stdout, result.stdout  # ncclient says so for both


def test_an_unknown_host_key_stops_the_play_before_login(server, tmp_path):
    result = playbook(
        server, tmp_path, [{"ansible.netcommon.netconf_get": {"source": "running"}}], host_key="\n"
    )
    assert result.returncode != 0
    assert "Unknown host key" in result.stdout, result.stdout
