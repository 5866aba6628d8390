"""RFC 8341 access control decisions (nc_core.nacm), against the real cevpn-ce model."""

from __future__ import annotations

import copy

import pytest
from lxml import etree

from nc_core.edit import Change
from nc_core.errors import RpcError
from nc_core.nacm import Nacm, exec_denied, parse_path
from nc_core.schema import Schema, SchemaIndex
from nc_core.xmlutil import NACM_NS, NC_NS

CE = "urn:cevpn:yang:cevpn-ce"
TYPES = "urn:cevpn:yang:cevpn-types"
SYS = "urn:ietf:params:xml:ns:yang:ietf-system"
NS = {"nc": NC_NS, "ce": CE, "sys": SYS, "n": NACM_NS}

GROUPS = {"admin": ["alice"], "operators": ["olga", "oscar"], "guests": ["gus"]}

DATA = """<data xmlns="{nc}">
  <ce xmlns="{ce}">
    <configuration-version>v7</configuration-version>
    <certificates>
      <private-key>PRIVATE-KEY</private-key>
      <certificate>CERT</certificate>
    </certificates>
    <peer>
      <name>a</name>
      <sp-address>192.0.2.1</sp-address>
      <tunnel><mtu>1400</mtu></tunnel>
      <ike><pre-shared-key>secret-a</pre-shared-key></ike>
    </peer>
    <peer>
      <name>b</name>
      <sp-address>192.0.2.2</sp-address>
      <tunnel><mtu>1500</mtu></tunnel>
      <ike><pre-shared-key>secret-b</pre-shared-key></ike>
    </peer>
    <routing><router-id>10.0.0.1</router-id></routing>
  </ce>
  <ce-state xmlns="{ce}" xmlns:ct="{types}">
    <alarms>
      <alarm><type>ct:peer-unreachable</type><resource>b</resource></alarm>
      <alarm><type>ct:config-fetch-failed</type><resource>server</resource></alarm>
    </alarms>
  </ce-state>
  <system xmlns="{sys}">
    <hostname>ce1</hostname>
    <authentication>
      <user-authentication-order>sys:local-users</user-authentication-order>
    </authentication>
  </system>
  {nacm}
</data>"""


@pytest.fixture(scope="module")
def index() -> SchemaIndex:
    schema = Schema(
        ["cevpn-types", "cevpn-ce", "ietf-netconf-acm", "ietf-system"],
        features={"ietf-system": ["authentication"]},
    )
    return SchemaIndex(schema)


# -- building NACM configurations -------------------------------------------


def rule(
    name: str,
    action: str,
    *,
    module: str | None = None,
    path: str | None = None,
    rpc: str | None = None,
    notification: str | None = None,
    ops: str | None = None,
) -> str:
    parts = [f"<name>{name}</name>"]
    if module is not None:
        parts.append(f"<module-name>{module}</module-name>")
    if path is not None:
        parts.append(f'<path xmlns:ce="{CE}" xmlns:sys="{SYS}" xmlns:n="{NACM_NS}">{path}</path>')
    if rpc is not None:
        parts.append(f"<rpc-name>{rpc}</rpc-name>")
    if notification is not None:
        parts.append(f"<notification-name>{notification}</notification-name>")
    if ops is not None:
        parts.append(f"<access-operations>{ops}</access-operations>")
    parts.append(f"<action>{action}</action>")
    return f"<rule>{''.join(parts)}</rule>"


def rule_list(name: str, groups: str | list[str], *rules: str) -> str:
    names = [groups] if isinstance(groups, str) else groups
    group_xml = "".join(f"<group>{g}</group>" for g in names)
    return f"<rule-list><name>{name}</name>{group_xml}{''.join(rules)}</rule-list>"


def nacm_xml(
    *rule_lists: str,
    read: str = "permit",
    write: str = "deny",
    exec_: str = "permit",
    enable: str = "true",
    groups: dict[str, list[str]] | None = None,
) -> str:
    group_xml = "".join(
        f"<group><name>{g}</name>{''.join(f'<user-name>{u}</user-name>' for u in users)}</group>"
        for g, users in (GROUPS if groups is None else groups).items()
    )
    return (
        f'<nacm xmlns="{NACM_NS}"><enable-nacm>{enable}</enable-nacm>'
        f"<read-default>{read}</read-default><write-default>{write}</write-default>"
        f"<exec-default>{exec_}</exec-default><groups>{group_xml}</groups>"
        f"{''.join(rule_lists)}</nacm>"
    )


def datastore(nacm: str = "") -> etree._Element:
    text = DATA.format(nc=NC_NS, ce=CE, types=TYPES, sys=SYS, nacm=nacm)
    return etree.fromstring(text.encode())


def make(index: SchemaIndex, *rule_lists: str, **defaults: str) -> tuple[Nacm, etree._Element]:
    tree = datastore(nacm_xml(*rule_lists, **defaults))
    nacm = Nacm(index, recovery_user="root")
    nacm.load(tree)
    return nacm, tree


def seen(nacm: Nacm, user: str, tree: etree._Element) -> etree._Element:
    return nacm.filter_read(user, copy.deepcopy(tree))


def texts(tree: etree._Element, xpath: str) -> list[str]:
    return [e.text or "" for e in tree.xpath(xpath, namespaces=NS)]


def node(tree: etree._Element, xpath: str) -> etree._Element:
    (found,) = tree.xpath(xpath, namespaces=NS)
    return found


PSK = "//ce:pre-shared-key"
PEER_A = "/nc:data/ce:ce/ce:peer[ce:name='a']"
PEER_B = "/nc:data/ce:ce/ce:peer[ce:name='b']"
MTU_A = f"{PEER_A}/ce:tunnel/ce:mtu"


def denial(nacm: Nacm, user: str, *changes: Change) -> RpcError:
    with pytest.raises(RpcError) as info:
        nacm.check_write(user, changes)
    return info.value


# -- enable-nacm, recovery session, defaults ----------------------------------


def test_absent_nacm_configuration_means_the_defaults_of_the_yang_module(index):
    tree = datastore()
    nacm = Nacm(index)
    nacm.load(tree)
    shown = seen(nacm, "olga", tree)
    assert texts(shown, "//ce:mtu") == ["1400", "1500"]
    assert texts(shown, PSK) == []
    with pytest.raises(RpcError):
        nacm.check_write("olga", [Change("update", node(tree, MTU_A))])
    assert nacm.may_exec("olga", "cevpn-ce", "reset-tunnel")


def test_disabled_nacm_permits_everything(index):
    nacm, tree = make(
        index,
        rule_list("deny", "*", rule("deny-all", "deny")),
        read="deny",
        exec_="deny",
        enable="false",
    )
    assert texts(seen(nacm, "gus", tree), PSK) == ["secret-a", "secret-b"]
    nacm.check_write("gus", [Change("delete", node(tree, PEER_A))])
    assert nacm.may_exec("gus", "ietf-netconf", "kill-session")
    assert nacm.may_notify("gus", "cevpn-ce", "tunnel-up")


def test_recovery_user_bypasses_every_rule(index):
    nacm, tree = make(
        index, rule_list("deny", "*", rule("deny-all", "deny")), read="deny", exec_="deny"
    )
    assert texts(seen(nacm, "root", tree), PSK) == ["secret-a", "secret-b"]
    nacm.check_write("root", [Change("delete", node(tree, "//n:nacm"))])
    assert nacm.may_exec("root", "ietf-netconf", "delete-config")


def test_read_default_deny_hides_everything_not_permitted(index):
    nacm, tree = make(index, read="deny")
    assert len(seen(nacm, "olga", tree)) == 0


def test_read_default_deny_shows_what_a_rule_permits(index):
    nacm, tree = make(
        index,
        rule_list("ops", "operators", rule("system", "permit", module="ietf-system", ops="read")),
        read="deny",
    )
    shown = seen(nacm, "olga", tree)
    assert texts(shown, "//sys:hostname") == ["ce1"]
    assert shown.find(f"{{{CE}}}ce") is None


# -- groups and rule-lists ------------------------------------------------------


def test_groups_of_lists_the_groups_naming_the_user(index):
    nacm, _ = make(index, groups={"admin": ["alice"], "ops": ["alice", "olga"]})
    assert nacm.groups_of("alice") == frozenset({"admin", "ops"})
    assert nacm.groups_of("olga") == frozenset({"ops"})
    assert nacm.groups_of("mallory") == frozenset()


def test_rule_list_for_group_star_applies_to_every_user_with_a_group(index):
    nacm, tree = make(
        index, rule_list("all", "*", rule("no-routing", "deny", path="/ce:ce/ce:routing"))
    )
    for user in ("alice", "olga", "gus"):
        assert texts(seen(nacm, user, tree), "//ce:router-id") == []


def test_user_in_no_group_gets_only_the_defaults(index):
    # RFC 8341 3.4.5 step 4: no groups, no rule-list -- not even group '*'.
    nacm, tree = make(
        index, rule_list("all", "*", rule("no-routing", "deny", path="/ce:ce/ce:routing"))
    )
    assert texts(seen(nacm, "mallory", tree), "//ce:router-id") == ["10.0.0.1"]


def test_rule_lists_of_other_groups_do_not_apply(index):
    nacm, tree = make(
        index, rule_list("guests", "guests", rule("no-routing", "deny", path="/ce:ce/ce:routing"))
    )
    assert texts(seen(nacm, "gus", tree), "//ce:router-id") == []
    assert texts(seen(nacm, "olga", tree), "//ce:router-id") == ["10.0.0.1"]


def test_a_rule_list_applies_when_any_of_its_groups_is_the_users(index):
    nacm, tree = make(
        index,
        rule_list(
            "staff", ["admin", "operators"], rule("no-routing", "deny", path="/ce:ce/ce:routing")
        ),
    )
    assert texts(seen(nacm, "oscar", tree), "//ce:router-id") == []


def test_first_matching_rule_wins_within_a_rule_list(index):
    nacm, tree = make(
        index,
        rule_list(
            "ops",
            "operators",
            rule("permit-routing", "permit", path="/ce:ce/ce:routing", ops="update"),
            rule("deny-ce", "deny", path="/ce:ce", ops="update"),
        ),
        write="permit",
    )
    nacm.check_write("olga", [Change("update", node(tree, "//ce:router-id"))])
    with pytest.raises(RpcError):
        nacm.check_write("olga", [Change("update", node(tree, "//ce:configuration-version"))])


def test_first_matching_rule_wins_across_rule_lists(index):
    nacm, tree = make(
        index,
        rule_list("first", "operators", rule("deny-routing", "deny", path="/ce:ce/ce:routing")),
        rule_list("second", "*", rule("permit-all", "permit")),
    )
    shown = seen(nacm, "olga", tree)
    assert texts(shown, "//ce:router-id") == []
    assert texts(shown, PSK) == ["secret-a", "secret-b"]


# -- path, module-name, access-operations ---------------------------------------


def test_path_rule_without_key_predicate_covers_every_entry_and_its_descendants(index):
    nacm, tree = make(
        index,
        rule_list("ops", "operators", rule("no-tunnel", "deny", path="/ce:ce/ce:peer/ce:tunnel")),
    )
    shown = seen(nacm, "olga", tree)
    assert texts(shown, "//ce:peer/ce:name") == ["a", "b"]
    assert texts(shown, "//ce:mtu") == []


def test_path_rule_with_key_predicate_covers_only_that_entry(index):
    nacm, tree = make(
        index,
        rule_list("ops", "operators", rule("no-b", "deny", path="/ce:ce/ce:peer[ce:name='b']")),
    )
    shown = seen(nacm, "olga", tree)
    assert texts(shown, "//ce:peer/ce:name") == ["a"]
    assert texts(shown, "//ce:mtu") == ["1400"]


def test_path_rule_key_predicate_compares_identityref_values_by_namespace(index):
    deny = rule(
        "no-unreachable",
        "deny",
        path="/ce:ce-state/ce:alarms/ce:alarm[ce:type='t:peer-unreachable']",
    ).replace("<path ", f'<path xmlns:t="{TYPES}" ')
    nacm, tree = make(index, rule_list("ops", "operators", deny))
    assert texts(seen(nacm, "olga", tree), "//ce:alarm/ce:resource") == ["server"]


def test_path_rule_key_predicate_may_name_the_user(index):
    nacm, tree = make(
        index,
        rule_list(
            "peers",
            "peers",
            rule("own-entry", "permit", path="/ce:ce/ce:peer[ce:name=$USER]", ops="read"),
            rule("no-other-peer", "deny", path="/ce:ce/ce:peer", ops="read"),
        ),
        groups={"peers": ["a", "b"]},
    )
    assert texts(seen(nacm, "a", tree), "//ce:peer/ce:name") == ["a"]
    assert texts(seen(nacm, "b", tree), "//ce:peer/ce:name") == ["b"]


def test_path_rule_does_not_cover_the_ancestors_of_its_node(index):
    # Read filtering is strict (RFC 8341 3.2.4): /ce is denied by read-default,
    # so /ce/peer goes with it even though a rule permits it.
    nacm, tree = make(
        index,
        rule_list("ops", "operators", rule("peers", "permit", path="/ce:ce/ce:peer", ops="read")),
        read="deny",
    )
    assert len(seen(nacm, "olga", tree)) == 0
    assert nacm.allowed("olga", "read", node(tree, PEER_A))
    assert not nacm.allowed("olga", "read", node(tree, "/nc:data/ce:ce"))


def test_path_slash_covers_all_data(index):
    nacm, tree = make(index, rule_list("ops", "operators", rule("nothing", "deny", path="/")))
    assert len(seen(nacm, "olga", tree)) == 0


def test_module_name_rule_matches_only_nodes_of_that_module(index):
    nacm, tree = make(
        index, rule_list("ops", "operators", rule("no-ce", "deny", module="cevpn-ce", ops="read"))
    )
    shown = seen(nacm, "olga", tree)
    assert shown.find(f"{{{CE}}}ce") is None
    assert texts(shown, "//sys:hostname") == ["ce1"]


def test_module_name_of_a_path_rule_must_match_too(index):
    nacm, tree = make(
        index,
        rule_list(
            "ops", "operators", rule("wrong-module", "deny", module="ietf-system", path="/ce:ce")
        ),
    )
    assert texts(seen(nacm, "olga", tree), "//ce:router-id") == ["10.0.0.1"]


def test_module_name_star_matches_every_module(index):
    nacm, tree = make(
        index, rule_list("ops", "operators", rule("nothing", "deny", module="*", ops="read"))
    )
    assert len(seen(nacm, "olga", tree)) == 0


def test_access_operations_bits_select_the_operations_a_rule_covers(index):
    nacm, tree = make(
        index,
        rule_list(
            "ops", "operators", rule("peers", "permit", path="/ce:ce/ce:peer", ops="create update")
        ),
        read="deny",
    )
    nacm.check_write("olga", [Change("create", node(tree, MTU_A))])
    nacm.check_write("olga", [Change("update", node(tree, MTU_A))])
    with pytest.raises(RpcError):
        nacm.check_write("olga", [Change("delete", node(tree, MTU_A))])
    assert not nacm.allowed("olga", "read", node(tree, MTU_A))


def test_access_operations_star_covers_every_operation(index):
    nacm, tree = make(
        index,
        rule_list("ops", "operators", rule("peers", "permit", path="/ce:ce/ce:peer", ops="*")),
        read="deny",
    )
    for op in ("read", "create", "update", "delete"):
        assert nacm.allowed("olga", op, node(tree, MTU_A))


def test_a_data_node_rule_decides_neither_exec_nor_notifications(index):
    nacm, tree = make(
        index,
        rule_list("ops", "operators", rule("no-ce-data", "deny", module="cevpn-ce", path="/")),
    )
    assert nacm.may_exec("olga", "cevpn-ce", "reset-tunnel")
    assert nacm.may_notify("olga", "cevpn-ce", "tunnel-up")
    assert texts(seen(nacm, "olga", tree), "//sys:hostname") == ["ce1"]
    assert texts(seen(nacm, "olga", tree), "//ce:router-id") == []


def test_a_rule_without_rule_type_covers_data_exec_and_notifications(index):
    nacm, tree = make(
        index, rule_list("ops", "operators", rule("no-ce", "deny", module="cevpn-ce"))
    )
    assert not nacm.may_exec("olga", "cevpn-ce", "reset-tunnel")
    assert not nacm.may_notify("olga", "cevpn-ce", "tunnel-up")
    assert texts(seen(nacm, "olga", tree), "//ce:router-id") == []


# -- default-deny-all and default-deny-write -------------------------------------


def test_psk_is_invisible_without_an_explicit_permit_rule(index):
    nacm, tree = make(
        index, rule_list("ops", "operators", rule("routing", "permit", path="/ce:ce/ce:routing"))
    )
    shown = seen(nacm, "olga", tree)
    assert texts(shown, PSK) == []
    assert texts(shown, "//ce:private-key") == []
    assert texts(shown, "//ce:ike/..//ce:name") == ["a", "b"]


def test_psk_is_visible_with_an_explicit_permit_rule(index):
    nacm, tree = make(
        index,
        rule_list(
            "admin",
            "admin",
            rule("keys", "permit", path="/ce:ce/ce:peer/ce:ike/ce:pre-shared-key", ops="read"),
        ),
    )
    assert texts(seen(nacm, "alice", tree), PSK) == ["secret-a", "secret-b"]
    assert texts(seen(nacm, "olga", tree), PSK) == []


def test_a_matching_module_rule_permits_default_deny_all_nodes_too(index):
    # RFC 8341 3.4.5: the extensions are consulted only when no rule matched.
    nacm, tree = make(index, rule_list("admin", "admin", rule("permit-all", "permit", module="*")))
    assert texts(seen(nacm, "alice", tree), "//ce:private-key") == ["PRIVATE-KEY"]


def test_default_deny_all_is_inherited_by_descendants(index):
    nacm, tree = make(index, write="permit")
    groups = node(tree, "//n:nacm/n:groups")
    assert not nacm.allowed("olga", "read", groups)
    assert seen(nacm, "olga", tree).find(f"{{{NACM_NS}}}nacm") is None
    with pytest.raises(RpcError):
        nacm.check_write("olga", [Change("update", node(tree, "//n:nacm/n:read-default"))])


def test_default_deny_all_blocks_writes_even_when_write_default_permits(index):
    nacm, tree = make(index, write="permit")
    error = denial(nacm, "olga", Change("create", node(tree, f"{PEER_A}/ce:ike/ce:pre-shared-key")))
    assert error.tag == "access-denied"


def test_default_deny_write_blocks_writes_but_not_reads(index):
    nacm, tree = make(index, write="permit")
    order = "//sys:authentication/sys:user-authentication-order"
    assert texts(seen(nacm, "olga", tree), order) == ["sys:local-users"]
    with pytest.raises(RpcError):
        nacm.check_write("olga", [Change("update", node(tree, order))])
    nacm.check_write("olga", [Change("update", node(tree, "//sys:hostname"))])


def test_default_deny_write_yields_to_an_explicit_permit_rule(index):
    nacm, tree = make(
        index,
        rule_list("admin", "admin", rule("auth", "permit", path="/sys:system/sys:authentication")),
        write="permit",
    )
    order = node(tree, "//sys:user-authentication-order")
    nacm.check_write("alice", [Change("update", order)])


def test_write_default_deny_with_a_permit_rule_for_one_subtree(index):
    nacm, tree = make(
        index,
        rule_list(
            "ops",
            "operators",
            rule("routing", "permit", path="/ce:ce/ce:routing", ops="create update delete"),
        ),
    )
    nacm.check_write("olga", [Change("update", node(tree, "//ce:router-id"))])
    nacm.check_write("olga", [Change("delete", node(tree, "//ce:routing"))])
    with pytest.raises(RpcError):
        nacm.check_write("olga", [Change("update", node(tree, "//ce:configuration-version"))])


# -- check_write errors ----------------------------------------------------------


def test_denied_create_reports_access_denied_at_the_xpath_of_the_node(index):
    nacm, tree = make(index)
    error = denial(nacm, "olga", Change("create", node(tree, MTU_A)))
    assert (error.tag, error.type) == ("access-denied", "application")
    assert (
        error.path == "/cevpn-ce:ce/cevpn-ce:peer[cevpn-ce:name='a']/cevpn-ce:tunnel/cevpn-ce:mtu"
    )
    assert dict(error.path_ns) == {"cevpn-ce": CE}
    assert "create" in error.message and "mtu" in error.message


def test_denied_update_names_the_operation_and_the_node(index):
    nacm, tree = make(index)
    error = denial(nacm, "olga", Change("update", node(tree, "//sys:hostname")))
    assert error.path == "/ietf-system:system/ietf-system:hostname"
    assert dict(error.path_ns) == {"ietf-system": SYS}
    assert "update" in error.message and "/ietf-system:system/hostname" in error.message


def test_denied_delete_of_a_list_entry_names_the_entry(index):
    nacm, tree = make(index)
    error = denial(nacm, "olga", Change("delete", node(tree, PEER_B)))
    assert error.path == "/cevpn-ce:ce/cevpn-ce:peer[cevpn-ce:name='b']"
    assert "delete" in error.message


def test_error_path_of_a_leaf_list_entry_carries_its_value(index):
    nacm, tree = make(index)
    error = denial(nacm, "olga", Change("delete", node(tree, "//sys:user-authentication-order")))
    assert error.path == (
        "/ietf-system:system/ietf-system:authentication"
        "/ietf-system:user-authentication-order[.='sys:local-users']"
    )


def test_error_path_is_declared_in_the_rpc_error_xml(index):
    nacm, tree = make(index)
    error = denial(nacm, "olga", Change("create", node(tree, MTU_A)))
    path = error.to_xml().find(f"{{{NC_NS}}}error-path")
    assert path is not None and path.nsmap["cevpn-ce"] == CE


def test_denied_delete_of_unreadable_data_does_not_reveal_it(index):
    nacm, tree = make(
        index,
        rule_list("ops", "operators", rule("no-b", "deny", path="/ce:ce/ce:peer[ce:name='b']")),
    )
    error = denial(nacm, "olga", Change("delete", node(tree, f"{PEER_B}/ce:tunnel/ce:mtu")))
    assert error.path == "/cevpn-ce:ce"
    assert "'b'" not in error.message and "1500" not in error.message

    error = denial(nacm, "olga", Change("delete", node(tree, f"{PEER_A}/ce:ike/ce:pre-shared-key")))
    assert error.path == "/cevpn-ce:ce/cevpn-ce:peer[cevpn-ce:name='a']/cevpn-ce:ike"
    assert "secret" not in error.message


def test_create_of_a_subtree_is_denied_when_a_descendant_is_protected(index):
    nacm, tree = make(index, write="permit")
    error = denial(nacm, "olga", Change("create", node(tree, PEER_A)))
    assert error.path is not None and error.path.endswith("/cevpn-ce:pre-shared-key")


def test_delete_of_a_subtree_is_permitted_by_a_rule_covering_it(index):
    nacm, tree = make(
        index, rule_list("ops", "operators", rule("peers", "permit", path="/ce:ce/ce:peer"))
    )
    nacm.check_write("olga", [Change("delete", node(tree, PEER_A))])


def test_update_checks_only_the_node_itself_but_create_checks_the_subtree(index):
    nacm, tree = make(
        index,
        rule_list(
            "ops",
            "operators",
            rule("no-tunnel", "deny", path="/ce:ce/ce:peer/ce:tunnel"),
            rule("peers", "permit", path="/ce:ce/ce:peer"),
        ),
    )
    nacm.check_write("olga", [Change("update", node(tree, PEER_A))])
    error = denial(nacm, "olga", Change("create", node(tree, PEER_A)))
    assert error.path == "/cevpn-ce:ce/cevpn-ce:peer[cevpn-ce:name='a']/cevpn-ce:tunnel"


def test_the_first_denied_change_is_reported(index):
    nacm, tree = make(
        index, rule_list("ops", "operators", rule("routing", "permit", path="/ce:ce/ce:routing"))
    )
    error = denial(
        nacm,
        "olga",
        Change("update", node(tree, "//ce:router-id")),
        Change("update", node(tree, MTU_A)),
        Change("update", node(tree, "//sys:hostname")),
    )
    assert error.path is not None and error.path.endswith("cevpn-ce:mtu")


# -- exec (RFC 8341 3.4.4) -------------------------------------------------------


def test_exec_default_permits_rpcs_without_a_rule(index):
    nacm, _ = make(index)
    assert nacm.may_exec("olga", "cevpn-ce", "refresh-configuration")


def test_exec_rule_decides_a_named_rpc(index):
    nacm, _ = make(
        index,
        rule_list(
            "ops",
            "operators",
            rule("no-reset", "deny", module="cevpn-ce", rpc="reset-tunnel", ops="exec"),
        ),
    )
    assert not nacm.may_exec("olga", "cevpn-ce", "reset-tunnel")
    assert nacm.may_exec("olga", "cevpn-ce", "refresh-configuration")
    assert nacm.may_exec("gus", "cevpn-ce", "reset-tunnel")


def test_exec_default_deny_with_a_permit_rule(index):
    nacm, _ = make(
        index,
        rule_list("ops", "operators", rule("ce-rpcs", "permit", module="cevpn-ce", rpc="*")),
        exec_="deny",
    )
    assert nacm.may_exec("olga", "cevpn-ce", "reset-tunnel")
    assert not nacm.may_exec("olga", "ietf-netconf", "edit-config")


def test_close_session_is_always_permitted(index):
    nacm, _ = make(index, rule_list("all", "*", rule("nothing", "deny", rpc="*")), exec_="deny")
    assert nacm.may_exec("gus", "ietf-netconf", "close-session")
    assert nacm.may_exec("mallory", "ietf-netconf", "close-session")


def test_kill_session_and_delete_config_are_denied_unless_a_rule_permits_them(index):
    nacm, _ = make(
        index,
        rule_list(
            "admin", "admin", rule("kill", "permit", module="ietf-netconf", rpc="kill-session")
        ),
    )
    assert not nacm.may_exec("olga", "ietf-netconf", "kill-session")
    assert not nacm.may_exec("olga", "ietf-netconf", "delete-config")
    assert nacm.may_exec("olga", "ietf-netconf", "get-config")
    assert nacm.may_exec("alice", "ietf-netconf", "kill-session")


def test_rpc_with_default_deny_all_is_denied_unless_a_rule_permits_it(index):
    restart = index.top_node(SYS, "system-restart")
    assert restart is not None and restart.deny_all
    nacm, _ = make(
        index,
        rule_list("admin", "admin", rule("restart", "permit", module="ietf-system", ops="exec")),
    )
    assert not nacm.may_exec("olga", "ietf-system", "system-restart", default_deny_all=True)
    assert nacm.may_exec("alice", "ietf-system", "system-restart", default_deny_all=True)


def test_exec_denied_error_is_protocol_level(index):
    error = exec_denied("ietf-netconf", "kill-session")
    assert (error.tag, error.type) == ("access-denied", "protocol")
    assert "kill-session" in error.message


# -- notifications (RFC 8341 3.4.6) ------------------------------------------------


def test_notification_rule_decides_a_named_event(index):
    nacm, _ = make(
        index,
        rule_list(
            "guests", "guests", rule("no-up", "deny", module="cevpn-ce", notification="tunnel-up")
        ),
    )
    assert not nacm.may_notify("gus", "cevpn-ce", "tunnel-up")
    assert nacm.may_notify("gus", "cevpn-ce", "tunnel-down")
    assert nacm.may_notify("olga", "cevpn-ce", "tunnel-up")


def test_notifications_follow_read_default(index):
    nacm, _ = make(
        index,
        rule_list("ops", "operators", rule("ce-events", "permit", notification="*", ops="read")),
        read="deny",
    )
    assert nacm.may_notify("olga", "cevpn-ce", "alarm-raised")
    assert not nacm.may_notify("gus", "cevpn-ce", "alarm-raised")


def test_notification_with_default_deny_all_needs_a_permit_rule(index):
    nacm, _ = make(index)
    assert not nacm.may_notify("olga", "cevpn-ce", "sa-expired", default_deny_all=True)


def test_replay_complete_and_notification_complete_are_always_sent(index):
    nacm, _ = make(index, rule_list("all", "*", rule("nothing", "deny")), read="deny")
    assert nacm.may_notify("gus", "nc-notifications", "replayComplete")
    assert nacm.may_notify("gus", "nc-notifications", "notificationComplete")


# -- counters ----------------------------------------------------------------------


def test_counters_count_denials(index):
    nacm, tree = make(index, rule_list("all", "*", rule("no-up", "deny", notification="tunnel-up")))
    assert (nacm.denied_operations, nacm.denied_data_writes, nacm.denied_notifications) == (0, 0, 0)
    nacm.may_exec("olga", "ietf-netconf", "kill-session")
    nacm.may_exec("olga", "ietf-netconf", "get")
    with pytest.raises(RpcError):
        nacm.check_write("olga", [Change("update", node(tree, MTU_A))])
    nacm.may_notify("olga", "cevpn-ce", "tunnel-up")
    nacm.may_notify("olga", "cevpn-ce", "tunnel-down")
    assert (nacm.denied_operations, nacm.denied_data_writes, nacm.denied_notifications) == (1, 1, 1)


def test_counters_survive_a_reload(index):
    nacm, tree = make(index)
    nacm.may_exec("olga", "ietf-netconf", "kill-session")
    nacm.load(tree)
    assert nacm.denied_operations == 1


# -- filter_read ----------------------------------------------------------------------


def test_filter_read_modifies_the_tree_in_place_and_returns_it(index):
    nacm, tree = make(index)
    copy_ = copy.deepcopy(tree)
    assert nacm.filter_read("olga", copy_) is copy_
    assert texts(copy_, PSK) == []


def test_filter_read_keeps_readable_parents_of_removed_children(index):
    nacm, tree = make(index)
    shown = seen(nacm, "olga", tree)
    ike = shown.xpath(f"{PEER_A}/ce:ike", namespaces=NS)
    assert len(ike) == 1 and len(ike[0]) == 0


def test_filter_read_drops_list_entries_whose_key_is_unreadable(index):
    nacm, tree = make(
        index,
        rule_list("ops", "operators", rule("no-names", "deny", path="/ce:ce/ce:peer/ce:name")),
    )
    shown = seen(nacm, "olga", tree)
    assert texts(shown, "//ce:peer/ce:sp-address") == []
    assert texts(shown, "//ce:router-id") == ["10.0.0.1"]


def test_filter_read_handles_ten_thousand_entries_in_one_pass(index):
    nacm, tree = make(
        index,
        rule_list(
            "ops", "operators", rule("no-p5000", "deny", path="/ce:ce/ce:peer[ce:name='p5000']")
        ),
    )
    ce = node(tree, "/nc:data/ce:ce")
    for peer in ce.findall(f"{{{CE}}}peer"):
        ce.remove(peer)
    for i in range(10_000):
        peer = etree.SubElement(ce, f"{{{CE}}}peer")
        etree.SubElement(peer, f"{{{CE}}}name").text = f"p{i}"
        etree.SubElement(peer, f"{{{CE}}}sp-address").text = f"10.{i // 256}.{i % 256}.1"
        ike = etree.SubElement(peer, f"{{{CE}}}ike")
        etree.SubElement(ike, f"{{{CE}}}pre-shared-key").text = f"secret-{i}"
    shown = nacm.filter_read("olga", tree)
    names = texts(shown, "//ce:peer/ce:name")
    assert len(names) == 9_999 and "p5000" not in names
    assert texts(shown, PSK) == []


# -- configuration handling --------------------------------------------------------------


def test_load_rereads_the_configuration(index):
    nacm, _ = make(index, exec_="deny")
    assert not nacm.may_exec("olga", "cevpn-ce", "reset-tunnel")
    nacm.load(datastore(nacm_xml(exec_="permit")))
    assert nacm.may_exec("olga", "cevpn-ce", "reset-tunnel")


def test_a_path_rule_that_cannot_be_compiled_fails_closed(index):
    nacm, tree = make(
        index,
        rule_list(
            "ops",
            "operators",
            rule("broken-permit", "permit", path="/x:ce", ops="read"),
            rule("broken-deny", "deny", path="/ce:ce/ce:peer[1]", ops="update"),
        ),
        read="deny",
        write="permit",
    )
    assert len(nacm.problems) == 2
    assert len(seen(nacm, "olga", tree)) == 0
    with pytest.raises(RpcError):
        nacm.check_write("olga", [Change("update", node(tree, "//sys:hostname"))])


def test_parse_path_resolves_prefixes_and_keys():
    steps = parse_path("/c:ce/c:peer[c:name='a']/c:ike", {"c": CE})
    assert [s.tag for s in steps] == [f"{{{CE}}}ce", f"{{{CE}}}peer", f"{{{CE}}}ike"]
    assert steps[1].predicates[0].tag == f"{{{CE}}}name"
    assert steps[1].predicates[0].value == "a"


def test_an_entry_created_node_by_node_reports_its_first_denied_node(index):
    nacm, tree = make(
        index,
        rule_list("all", "*", rule("no-ike", "deny", path="/ce:ce/ce:peer/ce:ike")),
        rule_list("ops", "operators", rule("peers", "permit", path="/ce:ce/ce:peer")),
    )
    changes = [Change("create", n) for n in node(tree, PEER_A).iter(etree.Element)]
    error = denial(nacm, "olga", *changes)
    assert error.path == "/cevpn-ce:ce/cevpn-ce:peer[cevpn-ce:name='a']/cevpn-ce:ike"
    outside_ike = [n for n in node(tree, PEER_A) if not n.tag.endswith("}ike")]
    nacm.check_write("olga", [Change("create", n) for n in outside_ike])


def test_check_write_of_ten_thousand_created_entries_is_one_pass(index):
    nacm, tree = make(
        index, rule_list("ops", "operators", rule("peers", "permit", path="/ce:ce/ce:peer"))
    )
    ce = node(tree, "/nc:data/ce:ce")
    changes = []
    for i in range(10_000):
        peer = etree.SubElement(ce, f"{{{CE}}}peer")
        etree.SubElement(peer, f"{{{CE}}}name").text = f"p{i}"
        ike = etree.SubElement(peer, f"{{{CE}}}ike")
        etree.SubElement(ike, f"{{{CE}}}pre-shared-key").text = f"secret-{i}"
        changes.extend(Change("create", n) for n in peer.iter(etree.Element))
    nacm.check_write("olga", changes)
    assert nacm.denied_data_writes == 0


def test_notification_content_is_filtered_by_rules_not_by_read_default(index):
    nacm, _ = make(
        index,
        rule_list(
            "ops",
            "operators",
            rule("no-spi", "deny", path="/ce:tunnel-up/ce:outbound-spi", ops="read"),
            rule("events", "permit", notification="*", ops="read"),
        ),
        read="deny",
    )
    data = etree.fromstring(
        f'<data xmlns="{NC_NS}"><tunnel-up xmlns="{CE}"><peer>b</peer>'
        "<outbound-spi>4096</outbound-spi><inbound-spi>8192</inbound-spi></tunnel-up></data>"
    )
    assert nacm.may_notify("olga", "cevpn-ce", "tunnel-up")
    shown = nacm.filter_read("olga", data)
    assert texts(shown, "//ce:tunnel-up/*") == ["b", "8192"]
