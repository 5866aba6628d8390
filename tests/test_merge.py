"""Three-way merge of a candidate onto the current running (nc_core.merge), on the real models.

base is running when the candidate was taken, mine the candidate, theirs
running now.  Documents are built with the edit engine and put in libyang's
canonical form, as the server keeps its datastores.
"""

from __future__ import annotations

from copy import deepcopy
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lxml import etree

from nc_core.edit import Editor, instance_identity, schema_of
from nc_core.errors import RpcErrors
from nc_core.merge import MergeConflict, merge3
from nc_core.schema import Schema, SchemaIndex, SchemaNode
from nc_core.validation import Validator
from nc_core.xmlutil import NACM_NS, NC_NS, SYS_NS

from .conftest import EXAMPLES

SVC = "urn:cevpn:yang:cevpn-service"
CE = "urn:cevpn:yang:cevpn-ce"
YANG = "urn:ietf:params:xml:ns:yang:1"
NS = {"nc": NC_NS, "s": SVC, "sys": SYS_NS, "n": NACM_NS, "ce": CE}

SERVER_MODULES = [
    "ietf-netconf-acm",
    "ietf-system",
    "cevpn-system-deviations",
    "cevpn-types",
    "cevpn-service",
]


@dataclass
class Store:
    """The schema of a server and what tests do with it: load, edit, compare."""

    index: SchemaIndex
    validator: Validator

    def load(self, body: str) -> etree._Element:
        root = etree.fromstring(f'<data xmlns="{NC_NS}">{body}</data>'.encode())
        return self.canonical(root)

    def canonical(self, root: etree._Element) -> etree._Element:
        try:
            tree = self.validator.validate(root)
        except RpcErrors as errs:
            raise errs.errors[0] from None
        try:
            return self.validator.canonical(tree)
        finally:
            tree.free()

    def edit(self, root: etree._Element, body: str) -> etree._Element:
        """A new canonical datastore: ``root`` with an <edit-config> merge of ``body``."""
        work = deepcopy(root)
        config = etree.fromstring(
            f'<config xmlns="{NC_NS}" xmlns:nc="{NC_NS}" xmlns:yang="{YANG}">{body}</config>'
        )
        Editor(self.index).apply(work, config, "merge")
        return self.canonical(work)

    def same(self, a: etree._Element, b: etree._Element) -> bool:
        """Equal as data: both put through libyang's canonical printing."""
        return etree.tostring(self.canonical(a)) == etree.tostring(self.canonical(b))


@pytest.fixture(scope="module")
def server() -> Store:
    schema = Schema(SERVER_MODULES, features={"ietf-system": ("authentication", "local-users")})
    index = SchemaIndex(schema)
    return Store(index, Validator(schema, index))


@pytest.fixture(scope="module")
def ce(ce_schema) -> Store:
    index = SchemaIndex(ce_schema)
    return Store(index, Validator(ce_schema, index))


def example(name: str, top: str) -> str:
    """An example instance document without its leading comment, to embed in <data>."""
    text = (EXAMPLES / "valid" / name).read_text()
    return text[text.index(f"<{top}") :]


def service_xml() -> str:
    return example("service-three-vpns.xml", "vpn-service")


def users_xml(*names: str) -> str:
    users = "".join(f"<user><name>{n}</name><password>$0$pw-{n}</password></user>" for n in names)
    return f'<system xmlns="{SYS_NS}"><authentication>{users}</authentication></system>'


NACM_BASE = (
    f'<nacm xmlns="{NACM_NS}"><write-default>deny</write-default>'
    "<groups><group><name>admin</name><user-name>alice</user-name></group></groups>"
    "<rule-list><name>first</name><group>admin</group></rule-list>"
    "<rule-list><name>second</name><group>admin</group></rule-list>"
    "<rule-list><name>third</name><group>admin</group></rule-list>"
    "</nacm>"
)


@pytest.fixture(scope="module")
def base(server: Store) -> etree._Element:
    return server.load(service_xml() + users_xml("alice", "bob") + NACM_BASE)


def vpn(body: str) -> str:
    return f'<vpn-service xmlns="{SVC}">{body}</vpn-service>'


def system(body: str) -> str:
    return f'<system xmlns="{SYS_NS}"><authentication>{body}</authentication></system>'


def nacm(body: str) -> str:
    return f'<nacm xmlns="{NACM_NS}">{body}</nacm>'


def texts(root: etree._Element, path: str) -> list[str]:
    return [(e.text or "").strip() for e in root.xpath(path, namespaces=NS)]


def conflict_of(base, mine, theirs, index) -> MergeConflict:
    with pytest.raises(MergeConflict) as caught:
        merge3(base, mine, theirs, index)
    return caught.value


# -- changes on different nodes -------------------------------------------------------


def test_list_entries_added_on_both_sides_both_survive(server: Store, base) -> None:
    mine = server.edit(base, system("<user><name>carol</name></user>"))
    theirs = server.edit(base, system("<user><name>dave</name></user>"))

    merged = merge3(base, mine, theirs, server.index)

    names = texts(merged, "/nc:data/sys:system/sys:authentication/sys:user/sys:name")
    assert sorted(names) == ["alice", "bob", "carol", "dave"]
    server.canonical(merged)  # valid as it stands


def test_leaf_changed_on_each_side_both_survive(server: Store, base) -> None:
    mine = server.edit(base, vpn("<vpn><id>acme</id><customer>ACME Inc.</customer></vpn>"))
    theirs = server.edit(base, vpn("<vpn><id>acme</id><pull-interval>900</pull-interval></vpn>"))

    merged = merge3(base, mine, theirs, server.index)

    acme = "/nc:data/s:vpn-service/s:vpn[s:id='acme']"
    assert texts(merged, f"{acme}/s:customer") == ["ACME Inc."]
    assert texts(merged, f"{acme}/s:pull-interval") == ["900"]


def test_running_change_survives_commit_of_unrelated_candidate_edit(server: Store, base) -> None:
    # The lost update: a user account added to running directly while a
    # candidate changing a VPN was open used to vanish at that commit.
    mine = server.edit(base, vpn("<vpn><id>globex</id><customer>Globex Ltd</customer></vpn>"))
    theirs = server.edit(
        base, system("<user><name>erin</name><password>$0$pw-erin</password></user>")
    )

    merged = merge3(base, mine, theirs, server.index)

    assert texts(merged, "//sys:user[sys:name='erin']/sys:password") == ["$0$pw-erin"]
    assert texts(merged, "//s:vpn[s:id='globex']/s:customer") == ["Globex Ltd"]
    assert server.same(
        merged,
        server.edit(theirs, vpn("<vpn><id>globex</id><customer>Globex Ltd</customer></vpn>")),
    )


def test_deletion_in_candidate_is_applied_to_current_running(server: Store, base) -> None:
    mine = server.edit(base, system('<user nc:operation="delete"><name>bob</name></user>'))
    theirs = server.edit(base, system("<user><name>dave</name></user>"))

    merged = merge3(base, mine, theirs, server.index)

    assert sorted(texts(merged, "//sys:user/sys:name")) == ["alice", "dave"]


def test_deletion_in_running_is_kept(server: Store, base) -> None:
    mine = server.edit(base, vpn("<vpn><id>acme</id><customer>ACME Inc.</customer></vpn>"))
    theirs = server.edit(base, vpn('<vpn nc:operation="delete"><id>globex</id></vpn>'))

    merged = merge3(base, mine, theirs, server.index)

    assert "globex" not in texts(merged, "//s:vpn/s:id")
    assert texts(merged, "//s:vpn[s:id='acme']/s:customer") == ["ACME Inc."]


def test_emptied_container_on_one_side_merges_with_additions_on_the_other(
    server: Store, base
) -> None:
    # Deleting the only group removes <groups> from the canonical tree: an
    # absent non-presence container is an empty one, not a deleted node.
    mine = server.edit(
        base, nacm('<groups><group nc:operation="delete"><name>admin</name></group></groups>')
    )
    theirs = server.edit(base, nacm("<groups><group><name>ops</name></group></groups>"))

    merged = merge3(base, mine, theirs, server.index)

    assert texts(merged, "//n:groups/n:group/n:name") == ["ops"]


def test_same_change_on_both_sides_is_not_a_conflict(server: Store, base) -> None:
    edit = vpn(
        "<vpn><id>acme</id><customer>ACME Inc.</customer><pull-interval>60</pull-interval></vpn>"
    ) + system("<user><name>carol</name></user>")
    mine = server.edit(base, edit)
    theirs = server.edit(base, edit)

    merged = merge3(base, mine, theirs, server.index)

    assert server.same(merged, theirs)


def test_unchanged_candidate_yields_current_running(server: Store, base) -> None:
    theirs = server.edit(base, system('<user nc:operation="delete"><name>alice</name></user>'))

    merged = merge3(base, deepcopy(base), theirs, server.index)

    assert etree.tostring(merged) == etree.tostring(theirs)


# -- conflicts ----------------------------------------------------------------------


def test_conflicting_leaf_values_raise_merge_conflict_with_keyed_path(server: Store, base) -> None:
    mine = server.edit(base, vpn("<vpn><id>acme</id><customer>ACME Inc.</customer></vpn>"))
    theirs = server.edit(base, vpn("<vpn><id>acme</id><customer>Acme Corp</customer></vpn>"))

    conflict = conflict_of(base, mine, theirs, server.index)

    [record] = conflict.conflicts
    assert record.path == (
        "/cevpn-service:vpn-service/cevpn-service:vpn[cevpn-service:id='acme']"
        "/cevpn-service:customer"
    )
    assert record.readable == "/vpn-service/vpn[id='acme']/customer"
    assert (record.element.text or "") == "Acme Corp"  # from running now
    error = conflict.rpc_error()
    assert (error.tag, error.type, error.app_tag) == (
        "operation-failed",
        "application",
        "running-changed",
    )
    assert error.path == record.path
    assert error.path_ns == {"cevpn-service": SVC}
    assert "/vpn-service/vpn[id='acme']/customer" in error.message
    assert "since the candidate was taken" in error.message
    assert "<discard-changes>" in error.message
    xml = etree.tostring(error.to_xml()).decode()
    assert "running-changed" in xml


def test_every_conflict_is_reported_not_only_the_first(server: Store, base) -> None:
    mine = server.edit(
        base,
        vpn(
            "<vpn><id>acme</id><customer>A</customer></vpn>"
            "<vpn><id>globex</id><customer>G</customer></vpn>"
        )
        + system("<user><name>bob</name><password>$0$mine</password></user>"),
    )
    theirs = server.edit(
        base,
        vpn(
            "<vpn><id>acme</id><customer>B</customer></vpn>"
            "<vpn><id>globex</id><customer>H</customer></vpn>"
        )
        + system("<user><name>bob</name><password>$0$theirs</password></user>"),
    )

    conflict = conflict_of(base, mine, theirs, server.index)

    readable = sorted(c.readable for c in conflict.conflicts)
    assert readable == [
        "/system/authentication/user[name='bob']/password",
        "/vpn-service/vpn[id='acme']/customer",
        "/vpn-service/vpn[id='globex']/customer",
    ]
    for path in readable:
        assert path in conflict.rpc_error().message


def test_candidate_modifying_what_running_deleted_is_a_conflict(server: Store, base) -> None:
    mine = server.edit(base, system("<user><name>bob</name><password>$0$new</password></user>"))
    theirs = server.edit(base, system('<user nc:operation="delete"><name>bob</name></user>'))

    conflict = conflict_of(base, mine, theirs, server.index)

    [record] = conflict.conflicts
    assert record.readable == "/system/authentication/user[name='bob']"
    assert record.path.endswith("/ietf-system:user[ietf-system:name='bob']")
    assert "running deleted it" in record.reason


def test_candidate_deleting_what_running_modified_is_a_conflict(server: Store, base) -> None:
    mine = server.edit(base, vpn('<vpn nc:operation="delete"><id>globex</id></vpn>'))
    theirs = server.edit(base, vpn("<vpn><id>globex</id><customer>Globex Ltd</customer></vpn>"))

    conflict = conflict_of(base, mine, theirs, server.index)

    [record] = conflict.conflicts
    assert record.readable == "/vpn-service/vpn[id='globex']"
    assert "the candidate deletes it" in record.reason


def test_entry_created_on_both_sides_merges_their_different_leaves(server: Store, base) -> None:
    mine = server.edit(base, system("<user><name>carol</name><password>$0$a</password></user>"))
    theirs = server.edit(
        base,
        system(
            "<user><name>carol</name><authorized-key><name>k</name>"
            "<algorithm>ssh-ed25519</algorithm><key-data>AAAA</key-data>"
            "</authorized-key></user>"
        ),
    )

    merged = merge3(base, mine, theirs, server.index)

    assert texts(merged, "//sys:user[sys:name='carol']/sys:password") == ["$0$a"]
    assert texts(merged, "//sys:user[sys:name='carol']/sys:authorized-key/sys:name") == ["k"]


def test_leaf_created_on_both_sides_with_different_values_is_a_conflict(
    server: Store, base
) -> None:
    mine = server.edit(base, system("<user><name>carol</name><password>$0$a</password></user>"))
    theirs = server.edit(base, system("<user><name>carol</name><password>$0$b</password></user>"))

    conflict = conflict_of(base, mine, theirs, server.index)

    [record] = conflict.conflicts
    assert record.readable == "/system/authentication/user[name='carol']/password"
    assert "created on both sides" in record.reason


def test_different_cases_of_a_choice_conflict(ce: Store) -> None:
    base = ce.load(example("ce-site-a.xml", "ce "))
    server_ep = "<pre-configuration><vpn-server>{}</vpn-server></pre-configuration>"
    mine = ce.edit(
        base,
        f'<ce xmlns="{CE}">'
        + server_ep.format(
            '<endpoint nc:operation="delete"><address>203.0.113.10</address></endpoint>'
            "<url>ssh://vpn.example/</url>"
            "<url-host-key>ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAINNE7SiAB0dX9CNpmIAVxlfhKpnc"
            "GUay/WKMnEVvJLOU vpn-server-host</url-host-key>"
        )
        + "</ce>",
    )
    theirs = ce.edit(
        base,
        f'<ce xmlns="{CE}">'
        + server_ep.format(
            "<endpoint><address>203.0.113.11</address><host-key>ssh-ed25519 AAAAC3NzaC1lZDI1"
            "NTE5AAAAINNE7SiAB0dX9CNpmIAVxlfhKpncGUay/WKMnEVvJLOU b</host-key></endpoint>"
        )
        + "</ce>",
    )

    conflict = conflict_of(base, mine, theirs, ce.index)

    [record] = conflict.conflicts
    assert "case" in record.reason
    assert "/pre-configuration/vpn-server/" in record.readable


def test_unknown_nodes_are_compared_as_opaque_subtrees(server: Store) -> None:
    other = "urn:example:not-served"
    base = etree.fromstring(f'<data xmlns="{NC_NS}"><x xmlns="{other}"><y>1</y></x></data>')
    one_side = etree.fromstring(f'<data xmlns="{NC_NS}"><x xmlns="{other}"><y>2</y></x></data>')
    other_side = etree.fromstring(f'<data xmlns="{NC_NS}"><x xmlns="{other}"><y>3</y></x></data>')

    assert etree.tostring(merge3(base, one_side, base, server.index)) == etree.tostring(one_side)
    conflict = conflict_of(base, one_side, other_side, server.index)
    assert [c.readable for c in conflict.conflicts] == ["/x"]


# -- order --------------------------------------------------------------------------


def endpoints(root: etree._Element) -> list[str]:
    return texts(root, "//s:server/s:endpoint/s:address")


def test_candidate_reordering_of_user_ordered_list_is_kept(server: Store, base) -> None:
    assert endpoints(base) == ["203.0.113.10", "203.0.113.11"]
    mine = server.edit(
        base,
        vpn(
            '<server><endpoint yang:insert="first"><address>203.0.113.11</address>'
            "</endpoint></server>"
        ),
    )
    theirs = server.edit(
        base, vpn("<server><endpoint><address>203.0.113.12</address></endpoint></server>")
    )

    merged = merge3(base, mine, theirs, server.index)

    assert endpoints(merged) == ["203.0.113.11", "203.0.113.10", "203.0.113.12"]


def test_running_reordering_of_user_ordered_list_is_kept(server: Store, base) -> None:
    mine = server.edit(base, vpn("<vpn><id>acme</id><customer>ACME Inc.</customer></vpn>"))
    theirs = server.edit(
        base,
        vpn(
            '<server><endpoint yang:insert="first"><address>203.0.113.11</address>'
            "</endpoint></server>"
        ),
    )

    merged = merge3(base, mine, theirs, server.index)

    assert endpoints(merged) == ["203.0.113.11", "203.0.113.10"]


def test_entry_added_by_candidate_follows_its_preceding_sibling(server: Store, base) -> None:
    mine = server.edit(
        base,
        nacm(
            '<rule-list yang:insert="after" yang:key="[name=\'first\']"><name>new</name>'
            "</rule-list>"
        ),
    )
    theirs = server.edit(base, nacm("<rule-list><name>last</name></rule-list>"))

    merged = merge3(base, mine, theirs, server.index)

    assert texts(merged, "//n:rule-list/n:name") == ["first", "new", "second", "third", "last"]


def test_entry_added_first_by_candidate_stays_first(server: Store, base) -> None:
    mine = server.edit(base, nacm('<rule-list yang:insert="first"><name>zero</name></rule-list>'))
    theirs = server.edit(
        base, nacm('<rule-list nc:operation="delete"><name>first</name></rule-list>')
    )

    merged = merge3(base, mine, theirs, server.index)

    assert texts(merged, "//n:rule-list/n:name") == ["zero", "second", "third"]


def test_user_ordered_list_reordered_differently_on_both_sides_conflicts_on_parent(
    server: Store, base
) -> None:
    mine = server.edit(base, nacm('<rule-list yang:insert="first"><name>third</name></rule-list>'))
    theirs = server.edit(base, nacm('<rule-list yang:insert="last"><name>first</name></rule-list>'))

    conflict = conflict_of(base, mine, theirs, server.index)

    [record] = conflict.conflicts
    assert record.readable == "/nacm"
    assert record.path == "/ietf-netconf-acm:nacm"
    assert "reordered differently" in record.reason
    assert conflict.rpc_error().path == "/ietf-netconf-acm:nacm"


# -- purity and size ------------------------------------------------------------------


def test_inputs_are_not_modified(server: Store, base) -> None:
    mine = server.edit(
        base,
        vpn("<vpn><id>acme</id><customer>ACME Inc.</customer></vpn>")
        + system('<user nc:operation="delete"><name>bob</name></user>')
        + nacm('<rule-list yang:insert="first"><name>third</name></rule-list>'),
    )
    theirs = server.edit(base, system("<user><name>dave</name></user>"))
    before = [etree.tostring(t) for t in (base, mine, theirs)]

    merged = merge3(base, mine, theirs, server.index)

    assert [etree.tostring(t) for t in (base, mine, theirs)] == before
    assert merged is not theirs and merged is not mine
    merged_nodes = set(merged.iter())
    assert not merged_nodes & set(theirs.iter())
    assert not merged_nodes & set(mine.iter())


def users_doc(names: range | list[str], password: dict[str, str] | None = None) -> etree._Element:
    password = password or {}
    users = "".join(
        f"<user><name>{n}</name><password>{password.get(str(n), '$0$x')}</password></user>"
        for n in names
    )
    return etree.fromstring(
        f'<data xmlns="{NC_NS}"><system xmlns="{SYS_NS}"><authentication>'
        f"{users}</authentication></system></data>"
    )


def test_ten_thousand_entry_list_merges(server: Store) -> None:
    # Correctness only: the time is measured by the benchmark, not asserted here.
    names = [f"u{i:05d}" for i in range(10_000)]
    base = users_doc(names)
    mine = users_doc(names, {"u05000": "$0$mine"})
    theirs = users_doc([n for n in names if n != "u00003"] + ["u10000"])

    merged = merge3(base, mine, theirs, server.index)

    got = texts(merged, "//sys:user/sys:name")
    assert got == [n for n in names if n != "u00003"] + ["u10000"]
    assert texts(merged, "//sys:user[sys:name='u05000']/sys:password") == ["$0$mine"]


# -- property: disjoint edits commute ------------------------------------------------


LEAVES = ("read-default", "write-default", "exec-default")
GROUPS = tuple(f"g{i}" for i in range(5))
USERS = tuple(f"u{i}" for i in range(4))


@dataclass(frozen=True)
class NacmModel:
    """A small NACM configuration: three leaves and groups of user names."""

    leaves: tuple[tuple[str, str], ...]
    groups: tuple[tuple[str, tuple[str, ...]], ...]

    def xml(self) -> etree._Element:
        leaves = "".join(f"<{k}>{v}</{k}>" for k, v in self.leaves)
        groups = "".join(
            f"<group><name>{g}</name>{''.join(f'<user-name>{u}</user-name>' for u in us)}</group>"
            for g, us in self.groups
        )
        body = leaves + (f"<groups>{groups}</groups>" if groups else "")
        inner = f'<nacm xmlns="{NACM_NS}">{body}</nacm>' if body else ""
        return etree.fromstring(f'<data xmlns="{NC_NS}">{inner}</data>')

    def apply(self, changes: dict[str, object]) -> NacmModel:
        """Set (a value) or delete (None) each named leaf or group."""
        leaves = dict(self.leaves)
        groups = dict(self.groups)
        for part, value in changes.items():
            target: dict = leaves if part in LEAVES else groups
            if value is None:
                target.pop(part, None)
            else:
                target[part] = value
        return NacmModel(tuple(leaves.items()), tuple(groups.items()))


# Sorted, as libyang keeps an ordered-by system leaf-list in canonical form.
user_sets = st.lists(st.sampled_from(USERS), unique=True).map(lambda us: tuple(sorted(us)))
models = st.builds(
    NacmModel,
    st.dictionaries(st.sampled_from(LEAVES), st.sampled_from(["permit", "deny"])).map(
        lambda d: tuple(d.items())
    ),
    st.dictionaries(st.sampled_from(GROUPS), user_sets).map(lambda d: tuple(d.items())),
)


def change_of(part: str) -> st.SearchStrategy[object]:
    value = st.sampled_from(["permit", "deny"]) if part in LEAVES else user_sets
    return st.one_of(st.none(), value)


@st.composite
def disjoint_edits(draw) -> tuple[NacmModel, dict[str, object], dict[str, object]]:
    base = draw(models)
    parts = list(LEAVES + GROUPS)
    owners = draw(
        st.lists(
            st.sampled_from(["mine", "theirs", None]), min_size=len(parts), max_size=len(parts)
        )
    )
    mine: dict[str, object] = {}
    theirs: dict[str, object] = {}
    for part, owner in zip(parts, owners, strict=True):
        if owner is not None:
            (mine if owner == "mine" else theirs)[part] = draw(change_of(part))
    return base, mine, theirs


def ordered(root: etree._Element, index: SchemaIndex) -> bytes:
    """Serialised with siblings sorted by identity, except ordered-by user ones."""
    copy = deepcopy(root)

    def sort(elem: etree._Element, snode: SchemaNode | None) -> None:
        keyed = []
        for child in elem:
            child_snode = schema_of(index, snode, child)
            assert child_snode is not None
            sort(child, child_snode)
            ident = instance_identity(child, child_snode)
            keyed.append(((child.tag, () if child_snode.user_ordered else ident), child))
        keyed.sort(key=lambda pair: pair[0])
        elem[:] = [child for _, child in keyed]

    for top in copy:
        sort(top, schema_of(index, None, top))
    return etree.tostring(copy)


@settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(disjoint_edits())
def test_disjoint_random_edits_merge_to_both_applied(server: Store, edits) -> None:
    base_model, mine_changes, theirs_changes = edits
    base = base_model.xml()
    mine = base_model.apply(mine_changes).xml()
    theirs = base_model.apply(theirs_changes).xml()
    both = base_model.apply(mine_changes).apply(theirs_changes).xml()

    index = server.index
    assert ordered(merge3(base, mine, theirs, index), index) == ordered(both, index)
    assert ordered(merge3(base, base, theirs, index), index) == ordered(theirs, index)
    assert ordered(merge3(base, mine, base, index), index) == ordered(mine, index)


@st.composite
def any_edits(draw) -> tuple[NacmModel, dict[str, object], dict[str, object]]:
    base = draw(models)
    parts = st.sampled_from(LEAVES + GROUPS)
    mine = draw(st.dictionaries(parts, st.none() | st.sampled_from(["permit", "deny"])))
    theirs = draw(st.dictionaries(parts, st.none() | st.sampled_from(["permit", "deny"])))
    for side in (mine, theirs):
        for part in [p for p in side if p in GROUPS and side[p] is not None]:
            side[part] = draw(user_sets)
    return base, mine, theirs


def expected_merge(base: NacmModel, mine: NacmModel, theirs: NacmModel) -> NacmModel | None:
    """The merge rules, on the model: None where they say conflict."""
    b_leaves, m_leaves, t_leaves = dict(base.leaves), dict(mine.leaves), dict(theirs.leaves)
    b_groups, m_groups, t_groups = dict(base.groups), dict(mine.groups), dict(theirs.groups)
    leaves: dict[str, str] = {}
    for leaf in LEAVES:
        b, m, t = b_leaves.get(leaf), m_leaves.get(leaf), t_leaves.get(leaf)
        if m != b and t != b and m != t:
            return None
        value = t if m == b else m
        if value is not None:
            leaves[leaf] = value
    groups: dict[str, tuple[str, ...]] = {}
    for group in GROUPS:
        bg, mg, tg = b_groups.get(group), m_groups.get(group), t_groups.get(group)
        if mg == bg or tg == bg or mg == tg:
            value = tg if mg == bg else mg
        elif mg is None or tg is None:
            return None  # one side deleted the group the other changed
        else:  # both changed its members: merged member by member
            value = tuple(
                u for u in USERS if ((u in tg) if (u in mg) == (u in (bg or ())) else (u in mg))
            )
        if value is not None:
            groups[group] = value
    return NacmModel(tuple(leaves.items()), tuple(groups.items()))


@settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(any_edits())
def test_random_edits_merge_by_the_rules_or_conflict(server: Store, edits) -> None:
    base_model, mine_changes, theirs_changes = edits
    mine_model = base_model.apply(mine_changes)
    theirs_model = base_model.apply(theirs_changes)
    want = expected_merge(base_model, mine_model, theirs_model)

    index = server.index
    base, mine, theirs = base_model.xml(), mine_model.xml(), theirs_model.xml()
    if want is None:
        with pytest.raises(MergeConflict):
            merge3(base, mine, theirs, index)
    else:
        assert ordered(merge3(base, mine, theirs, index), index) == ordered(want.xml(), index)
