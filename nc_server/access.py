"""The VPN server's access rules (RFC 8341), installed in a fresh VPN database.

- ``operators`` may read and write the whole VPN database and use every
  cevpn-service operation, but never read key material: the ``keys``
  subtrees are denied to them explicitly (nacm:default-deny-all alone would
  not stop a rule that permits the whole module).
- ``cevpn-ce-agents`` (one account per enrolled CE) may only fetch their own
  configuration and subscribe to the notification telling them to; which
  site a CE may fetch is decided by the operation itself from the account.
- A customer's group is made by the operator, one rule list per customer
  (:func:`customer_rule_list`, shown in docs/server.md): read its own VPNs,
  nothing else, no operation, no write, no alarm (the server's alarm list names
  every customer's sites).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from lxml import etree

from nc_core.xmlutil import MON_NS, NACM_NS, default_ns_element, qn

SVC_NS = "urn:cevpn:yang:cevpn-service"
OPERATORS = "operators"
CE_AGENTS = "cevpn-ce-agents"
CE_SESSIONS = 4
"""NETCONF sessions an enrolled CE's account may hold, outside the server's max-sessions
(nc_core Application.session_quota): its notification session, a fetch over a connection
of its own when that session is down, and room for a reconnection that overlaps an old
session not yet seen dead.  With one shared limit, a server holding more CEs than
max-sessions left the others retrying, each retry an SSH handshake (at 1,000 CEs and
the former 256 sessions, most of the server's idle CPU)."""

_RULES = f"""
<nacm xmlns="{NACM_NS}">
  <rule-list>
    <name>{OPERATORS}</name>
    <group>{OPERATORS}</group>
    <rule>
      <name>no-key-material</name>
      <module-name>cevpn-service</module-name>
      <path xmlns:svc="{SVC_NS}">/svc:vpn-service/svc:vpn/svc:keys</path>
      <access-operations>read</access-operations>
      <action>deny</action>
      <comment>Keys are generated and read by the server only.</comment>
    </rule>
    <rule>
      <name>vpn-database</name>
      <module-name>cevpn-service</module-name>
      <access-operations>*</access-operations>
      <action>permit</action>
      <comment>Operators manage VPNs and sites and use every cevpn-service operation.</comment>
    </rule>
  </rule-list>
  <rule-list>
    <name>{CE_AGENTS}</name>
    <group>{CE_AGENTS}</group>
    <rule>
      <name>fetch-own-configuration</name>
      <module-name>cevpn-service</module-name>
      <rpc-name>fetch-ce-configuration</rpc-name>
      <access-operations>exec</access-operations>
      <action>permit</action>
    </rule>
    <rule>
      <name>subscribe</name>
      <module-name>notifications</module-name>
      <rpc-name>create-subscription</rpc-name>
      <access-operations>exec</access-operations>
      <action>permit</action>
    </rule>
    <rule>
      <name>hear-configuration-available</name>
      <module-name>cevpn-service</module-name>
      <notification-name>configuration-available</notification-name>
      <access-operations>read</access-operations>
      <action>permit</action>
    </rule>
    <rule>
      <name>close-and-hello</name>
      <module-name>ietf-netconf</module-name>
      <rpc-name>close-session</rpc-name>
      <access-operations>exec</access-operations>
      <action>permit</action>
    </rule>
    <rule>
      <name>nothing-else</name>
      <module-name>*</module-name>
      <access-operations>*</access-operations>
      <action>deny</action>
      <comment>A CE sees nothing of the VPN database but its own configuration.</comment>
    </rule>
  </rule-list>
</nacm>
"""


_CUSTOMER_RULES = """
  <rule-list xmlns="{nacm}">
    <name>customer-{customer}</name>
    <group>customer-{customer}</group>
    <rule>
      <name>no-keys</name>
      <module-name>cevpn-service</module-name>
      <path xmlns:svc="{svc}">/svc:vpn-service/svc:vpn/svc:keys</path>
      <access-operations>*</access-operations>
      <action>deny</action>
      <comment>First, or a rule permitting a VPN would also open its keys.</comment>
    </rule>
{own_vpns}    <rule>
      <name>no-other-vpn</name>
      <module-name>cevpn-service</module-name>
      <path xmlns:svc="{svc}">/svc:vpn-service/svc:vpn</path>
      <access-operations>*</access-operations>
      <action>deny</action>
    </rule>
    <rule>
      <name>no-server</name>
      <module-name>cevpn-service</module-name>
      <path xmlns:svc="{svc}">/svc:vpn-service/svc:server</path>
      <access-operations>*</access-operations>
      <action>deny</action>
    </rule>
    <rule>
      <name>no-operations</name>
      <module-name>cevpn-service</module-name>
      <rpc-name>*</rpc-name>
      <access-operations>exec</access-operations>
      <action>deny</action>
    </rule>
    <rule>
      <name>own-provisioning-events</name>
      <module-name>cevpn-service</module-name>
      <notification-name>provisioning-status-changed</notification-name>
      <access-operations>read</access-operations>
      <action>permit</action>
      <comment>Sent only for the sites this group may read.</comment>
    </rule>
    <rule>
      <name>no-other-events</name>
      <module-name>cevpn-service</module-name>
      <notification-name>*</notification-name>
      <access-operations>read</access-operations>
      <action>deny</action>
    </rule>
    <rule>
      <name>no-sessions</name>
      <module-name>ietf-netconf-monitoring</module-name>
      <path xmlns:ncm="{ncm}">/ncm:netconf-state/ncm:sessions</path>
      <access-operations>*</access-operations>
      <action>deny</action>
      <comment>Nor the session events of other users.</comment>
    </rule>
    <rule>
      <name>no-locks</name>
      <module-name>ietf-netconf-monitoring</module-name>
      <path xmlns:ncm="{ncm}">/ncm:netconf-state/ncm:datastores</path>
      <access-operations>*</access-operations>
      <action>deny</action>
    </rule>
    <rule>
      <name>no-statistics</name>
      <module-name>ietf-netconf-monitoring</module-name>
      <path xmlns:ncm="{ncm}">/ncm:netconf-state/ncm:statistics</path>
      <access-operations>*</access-operations>
      <action>deny</action>
    </rule>
    <rule>
      <name>no-accounts</name>
      <module-name>ietf-system</module-name>
      <access-operations>*</access-operations>
      <action>deny</action>
    </rule>
    <rule>
      <name>no-rules</name>
      <module-name>ietf-netconf-acm</module-name>
      <access-operations>*</access-operations>
      <action>deny</action>
    </rule>
    <rule>
      <name>no-alarms</name>
      <module-name>ietf-alarms</module-name>
      <access-operations>*</access-operations>
      <action>deny</action>
      <comment>The server's alarms name every customer's sites.</comment>
    </rule>
  </rule-list>
"""
_OWN_VPN = """    <rule>
      <name>own-vpn-{vpn}</name>
      <module-name>cevpn-service</module-name>
      <path xmlns:svc="{svc}">/svc:vpn-service/svc:vpn[svc:id='{vpn}']</path>
      <access-operations>read</access-operations>
      <action>permit</action>
    </rule>
"""


def customer_rule_list(customer: str, vpns: Sequence[str]) -> etree._Element:
    """The rule list of a customer's group ``customer-<customer>``: read its own VPNs
    (sites and provisioning state, never keys) and nothing else of anyone's.

    The customer role of docs/server.md.  It permits no write, so members
    can neither lock a datastore nor discard or commit the candidate
    (NetconfServer.require_writer), and kill-session stays denied (RFC 8341
    default).  Notifications: config changes and provisioning events of
    its own VPNs only (nc_core.notifications checks each event against what
    the group may read), no other user's session events.
    """
    for name in (customer, *vpns):
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise ValueError(f"{name!r}: use letters, digits, '.', '_' and '-' only")
    own = "".join(_OWN_VPN.format(vpn=vpn, svc=SVC_NS) for vpn in vpns)
    text = _CUSTOMER_RULES.format(
        nacm=NACM_NS, svc=SVC_NS, ncm=MON_NS, customer=customer, own_vpns=own
    )
    return etree.fromstring(text.encode())


def server_rule_lists() -> list[etree._Element]:
    """The rule lists to add to a NACM configuration that lacks them."""
    root = etree.fromstring(_RULES.encode())
    return list(root.iterfind(qn(NACM_NS, "rule-list")))


def ensure_rule_lists(running: etree._Element) -> bool:
    """Add the server's rule lists to a datastore tree if missing; True if anything changed."""
    nacm = running.find(qn(NACM_NS, "nacm"))
    if nacm is None:
        nacm = default_ns_element(NACM_NS, "nacm")
        running.append(nacm)
    present = {
        (r.findtext(qn(NACM_NS, "name")) or "") for r in nacm.iterfind(qn(NACM_NS, "rule-list"))
    }
    changed = False
    for rule_list in server_rule_lists():
        if rule_list.findtext(qn(NACM_NS, "name")) not in present:
            nacm.append(rule_list)
            changed = True
    return changed
