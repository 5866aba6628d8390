"""The VPN server's access rules (RFC 8341), installed in a fresh VPN database.

- ``operators`` may read and write the whole VPN database and use every
  cevpn-service operation, but never read key material: the ``keys``
  subtrees are denied to them explicitly (nacm:default-deny-all alone would
  not stop a rule that permits the whole module).
- ``cevpn-ce-agents`` (one account per enrolled CE) may only fetch their own
  configuration and subscribe to the notification telling them to; which
  site a CE may fetch is decided by the operation itself from the account.
- A customer's group is made by the operator, one rule list per customer,
  with the VPN's key in the path (docs/operators.md shows it):
  permit read ``/vpn-service/vpn[id='<vpn>']``, deny ``/vpn-service``.
"""

from __future__ import annotations

from lxml import etree

from nc_core.xmlutil import NACM_NS, default_ns_element, qn

SVC_NS = "urn:cevpn:yang:cevpn-service"
OPERATORS = "operators"
CE_AGENTS = "cevpn-ce-agents"

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
