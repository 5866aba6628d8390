"""RFC 8341 3.4: the recovery session is not restricted by NACM."""

from __future__ import annotations

from tests.netconf_server import VIEWER, ncclient_connect, running_server

NC = "urn:ietf:params:xml:ns:netconf:base:1.0"
NACM = "urn:ietf:params:xml:ns:yang:ietf-netconf-acm"
SVC = "urn:cevpn:yang:cevpn-service"

DENY_EVERYONE = (
    f'<config xmlns="{NC}"><nacm xmlns="{NACM}"><rule-list><name>admin</name>'
    "<rule><name>permit-all</name><action>deny</action></rule></rule-list></nacm></config>"
)


def test_recovery_user_may_write_even_when_rules_deny_everyone(tmp_path):
    with running_server(tmp_path, "cevpn-server", "--recovery-user", VIEWER[0]) as server:
        with ncclient_connect(server) as admin:  # lock every group out, admin included
            admin.edit_config(target="running", config=DENY_EVERYONE)
        with ncclient_connect(server, VIEWER) as recovery:
            recovery.edit_config(
                target="running",
                config=f'<config xmlns="{NC}"><vpn-service xmlns="{SVC}"><vpn><id>fixed</id>'
                "<customer>C</customer></vpn></vpn-service></config>",
            )
            assert "<id>fixed</id>" in recovery.get_config("running").data_xml
