"""NMDA through ncclient (0.7.1, unmodified; it has no get_data/edit_data, so the RPCs
go through ``dispatch``): the datastores of RFC 8342 in the YANG library (RFC 8525),
<get-data> and <edit-data> (RFC 8526), against a real cevpn-server over real SSH, and a
few cases against the CE agent (``--dataplane none``) too.

The VPN server holds the database of tests/test_access_control.py (two VPNs, one with a
pre-shared key) and its customer ``acme-noc``, given access with the rule list
docs/server.md prints.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from lxml import etree
from ncclient.operations.rpc import RPCError
from ncclient.xml_ import to_ele

from tests.netconf_server import (
    ADMIN,
    OPERATOR,
    VIEWER,
    ServerProcess,
    free_port,
    ncclient_connect,
    running_server,
)
from tests.test_access_control import CUSTOMER, DATABASE, customer_template

NC = "urn:ietf:params:xml:ns:netconf:base:1.0"
NMDA = "urn:ietf:params:xml:ns:yang:ietf-netconf-nmda"
DS = "urn:ietf:params:xml:ns:yang:ietf-datastores"
OR = "urn:ietf:params:xml:ns:yang:ietf-origin"
YL = "urn:ietf:params:xml:ns:yang:ietf-yang-library"
WD = "urn:ietf:params:xml:ns:yang:ietf-netconf-with-defaults"
WD_ATTR = "urn:ietf:params:xml:ns:netconf:default:1.0"
MON = "urn:ietf:params:xml:ns:yang:ietf-netconf-monitoring"
SVC = "urn:cevpn:yang:cevpn-service"
CE = "urn:cevpn:yang:cevpn-ce"
NS = {"n": NMDA, "yl": YL, "s": SVC, "m": MON, "c": CE}
OPERATIONAL_DEFAULTS = "urn:ietf:params:netconf:capability:with-operational-defaults:1.0"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    tmp = tmp_path_factory.mktemp("nmda")
    srv = ServerProcess("cevpn-server", tmp / "state", free_port())
    srv.adduser(ADMIN[0], ADMIN[1], ("admin",))
    srv.adduser(OPERATOR[0], OPERATOR[1], ("operators",))
    srv.adduser(VIEWER[0], VIEWER[1])
    srv.adduser(CUSTOMER[0], CUSTOMER[1])
    srv.start()
    try:
        with ncclient_connect(srv) as m:
            m.edit_config(target="running", config=DATABASE)
            m.edit_config(target="running", config=customer_template())
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def m(server: ServerProcess):  # type: ignore[no-untyped-def]
    with ncclient_connect(server) as session:
        yield session


def get_data(m, datastore: str, body: str = "", ds: str = "") -> etree._Element:  # type: ignore[no-untyped-def]
    """The <data> of a <get-data> of ``datastore`` (ds:NAME unless ``ds`` gives the whole
    <datastore> element)."""
    ds = ds or f"<datastore>ds:{datastore}</datastore>"
    rpc = to_ele(f'<get-data xmlns="{NMDA}" xmlns:ds="{DS}">{ds}{body}</get-data>')
    reply = etree.fromstring(m.dispatch(rpc).xml.encode())
    data = reply.find(f"{{{NMDA}}}data")
    assert data is not None, etree.tostring(reply).decode()
    return data


def edit_data(m, datastore: str, config: str, body: str = "") -> None:  # type: ignore[no-untyped-def]
    m.dispatch(
        to_ele(
            f'<edit-data xmlns="{NMDA}" xmlns:ds="{DS}"><datastore>ds:{datastore}</datastore>'
            f"{body}<config>{config}</config></edit-data>"
        )
    )


def vpn_ids(data: etree._Element) -> list[str]:
    return [str(t) for t in data.xpath("s:vpn-service/s:vpn/s:id/text()", namespaces=NS)]


def text(data: etree._Element) -> str:
    return etree.tostring(data).decode()


def origin_of(elem: etree._Element) -> str | None:
    """The identity (Clark notation) of elem's or:origin, resolved in its namespaces."""
    value = elem.get(f"{{{OR}}}origin")
    if value is None:
        return None
    prefix, _, name = value.rpartition(":")
    return f"{{{elem.nsmap[prefix]}}}{name}"


def error(excinfo: pytest.ExceptionInfo[RPCError]) -> RPCError:
    return excinfo.value


# -- YANG library and capabilities -------------------------------------------------------


def test_yang_library_lists_the_four_datastores_each_with_a_schema(m):
    data = get_data(
        m, "operational", f'<subtree-filter><yang-library xmlns="{YL}"/></subtree-filter>'
    )
    library = data.find(f"{{{YL}}}yang-library")
    assert library is not None
    schemas = set(library.xpath("yl:schema/yl:name/text()", namespaces=NS))
    found = {}
    for entry in library.iterfind(f"{{{YL}}}datastore"):
        name = entry.find(f"{{{YL}}}name")
        assert name is not None and name.text is not None
        prefix, _, ident = name.text.partition(":")
        assert name.nsmap[prefix] == DS
        found[ident] = entry.findtext(f"{{{YL}}}schema")
    assert set(found) == {"running", "candidate", "startup", "operational"}
    assert all(schema in schemas for schema in found.values())
    content_id = library.findtext(f"{{{YL}}}content-id")
    assert content_id and any(f"content-id={content_id}" in c for c in m.server_capabilities)


def test_yang_library_datastores_are_listed_by_get_too(m):
    reply = m.get(filter=("subtree", f'<yang-library xmlns="{YL}"><datastore/></yang-library>'))
    names = etree.fromstring(reply.xml.encode()).xpath("//yl:datastore/yl:name", namespaces=NS)
    assert sorted(n.text for n in names) == [
        "ds:candidate",
        "ds:operational",
        "ds:running",
        "ds:startup",
    ]


def test_hello_advertises_ietf_netconf_nmda_with_origin_and_with_defaults(m):
    caps = list(m.server_capabilities)
    nmda = [c for c in caps if c.startswith(f"{NMDA}?module=ietf-netconf-nmda")]
    assert nmda and "features=origin,with-defaults" in nmda[0]
    assert any(c.startswith(f"{OR}?module=ietf-origin") for c in caps)
    assert any(c.startswith(OPERATIONAL_DEFAULTS) for c in caps)


# -- get-data of each datastore -----------------------------------------------------------


@pytest.mark.parametrize("datastore", ["running", "candidate", "startup"])
def test_get_data_of_a_configuration_datastore_is_what_get_config_returns(m, datastore):
    data = get_data(m, datastore)
    config = etree.fromstring(m.get_config(datastore).xml.encode()).find(f"{{{NC}}}data")
    assert config is not None
    assert [etree.tostring(c) for c in data] == [etree.tostring(c) for c in config]
    assert data.find(f"{{{MON}}}netconf-state") is None


def test_get_data_of_operational_is_configuration_and_state(m):
    data = get_data(m, "operational")
    assert vpn_ids(data) == ["acme-vpn", "other-vpn"]
    assert data.find(f"{{{MON}}}netconf-state") is not None
    assert data.find(f"{{{YL}}}yang-library") is not None


def test_get_data_of_candidate_shows_an_uncommitted_edit(m):
    edit = (
        f'<config xmlns="{NC}"><vpn-service xmlns="{SVC}"><vpn><id>pending-vpn</id>'
        "<customer>p</customer></vpn></vpn-service></config>"
    )
    m.edit_config(target="candidate", config=edit)
    try:
        assert "pending-vpn" in vpn_ids(get_data(m, "candidate"))
        assert "pending-vpn" not in vpn_ids(get_data(m, "running"))
    finally:
        m.discard_changes()


# -- filters ---------------------------------------------------------------------------------


def test_subtree_filter_selects_one_entry(m):
    body = (
        f'<subtree-filter><vpn-service xmlns="{SVC}"><vpn><id>other-vpn</id></vpn></vpn-service>'
        "</subtree-filter>"
    )
    for datastore in ("running", "operational"):
        data = get_data(m, datastore, body)
        assert vpn_ids(data) == ["other-vpn"]
        assert data.find(f"{{{MON}}}netconf-state") is None


def test_xpath_filter_resolves_prefixes_declared_on_the_xpath_filter_element(m):
    body = (
        f"<xpath-filter xmlns:v='{SVC}'>/v:vpn-service/v:vpn[v:id='acme-vpn']/v:customer"
        "</xpath-filter>"
    )
    data = get_data(m, "operational", body)
    assert vpn_ids(data) == ["acme-vpn"]
    assert data.xpath("//s:customer/text()", namespaces=NS) == ["acme-vpn"]
    assert not data.xpath("//s:site", namespaces=NS)


def test_an_xpath_filter_computing_a_number_is_refused(m):
    with pytest.raises(RPCError) as exc:
        get_data(m, "running", "<xpath-filter>count(//*)</xpath-filter>")
    assert error(exc).tag == "invalid-value"


def test_an_empty_subtree_filter_selects_nothing(m):
    assert len(get_data(m, "running", "<subtree-filter/>")) == 0


def test_config_filter_false_gives_state_with_the_keys_of_its_ancestors(m):
    data = get_data(m, "operational", "<config-filter>false</config-filter>")
    assert data.find(f"{{{MON}}}netconf-state") is not None
    assert not data.xpath("//s:customer | //s:ce-address | //s:topology", namespaces=NS)
    for vpn in data.xpath("s:vpn-service/s:vpn", namespaces=NS):
        assert vpn.find(f"{{{SVC}}}id") is not None
        assert vpn.xpath(".//s:provisioning", namespaces=NS)


def test_config_filter_true_gives_configuration_only(m):
    data = get_data(m, "operational", "<config-filter>true</config-filter>")
    assert vpn_ids(data) == ["acme-vpn", "other-vpn"]
    assert data.find(f"{{{MON}}}netconf-state") is None
    assert data.find(f"{{{YL}}}yang-library") is None
    assert not data.xpath("//s:provisioning", namespaces=NS)


def test_config_filter_and_a_subtree_filter_are_both_applied(m):
    body = (
        f'<subtree-filter><vpn-service xmlns="{SVC}"><vpn><id>acme-vpn</id></vpn></vpn-service>'
        "</subtree-filter><config-filter>true</config-filter>"
    )
    data = get_data(m, "operational", body)
    assert vpn_ids(data) == ["acme-vpn"]
    assert not data.xpath("//s:provisioning", namespaces=NS)


def test_max_depth_one_gives_the_selected_node_without_children(m):
    body = f'<subtree-filter><vpn-service xmlns="{SVC}"/></subtree-filter><max-depth>1</max-depth>'
    data = get_data(m, "running", body)
    top = data.find(f"{{{SVC}}}vpn-service")
    assert top is not None and len(top) == 0


def test_max_depth_two_gives_list_entries_with_their_keys_only(m):
    body = f'<subtree-filter><vpn-service xmlns="{SVC}"/></subtree-filter><max-depth>2</max-depth>'
    data = get_data(m, "running", body)
    assert vpn_ids(data) == ["acme-vpn", "other-vpn"]
    for vpn in data.xpath("s:vpn-service/s:vpn", namespaces=NS):
        assert [etree.QName(c).localname for c in vpn] == ["id"]


def test_max_depth_without_a_filter_counts_from_the_top_level_nodes(m):
    data = get_data(m, "operational", "<max-depth>1</max-depth>")
    state = data.find(f"{{{MON}}}netconf-state")
    assert state is not None and len(state) == 0


def test_max_depth_zero_is_invalid_value(m):
    with pytest.raises(RPCError) as exc:
        get_data(m, "running", "<max-depth>0</max-depth>")
    assert error(exc).tag == "invalid-value"


# -- origin ------------------------------------------------------------------------------------


def test_with_origin_marks_configuration_intended_and_state_with_none(m):
    data = get_data(m, "operational", "<with-origin/>")
    top = data.find(f"{{{SVC}}}vpn-service")
    assert top is not None and origin_of(top) == f"{{{OR}}}intended"
    # below, the origin is inherited (no annotation) unless it differs
    assert all(origin_of(e) is None for e in top.iter() if e is not top)
    state = data.find(f"{{{MON}}}netconf-state")
    assert state is not None and all(origin_of(e) is None for e in state.iter())


def test_with_origin_and_report_all_marks_defaults_default(m):
    body = f'<with-origin/><with-defaults xmlns="{WD}">report-all</with-defaults>'
    data = get_data(m, "operational", body)
    removal = data.xpath("s:vpn-service/s:vpn[s:id='acme-vpn']/s:site-removal", namespaces=NS)
    assert removal and origin_of(removal[0]) == f"{{{OR}}}default"
    assert removal[0].get(f"{{{WD_ATTR}}}default") is None  # report-all, not tagged
    customer = data.xpath("s:vpn-service/s:vpn[s:id='acme-vpn']/s:customer", namespaces=NS)
    assert customer and origin_of(customer[0]) is None  # inherits intended


def test_origin_filter_default_keeps_defaults_and_their_ancestors_keys(m):
    body = (
        "<origin-filter xmlns:or='urn:ietf:params:xml:ns:yang:ietf-origin'>or:default"
        f'</origin-filter><with-defaults xmlns="{WD}">report-all</with-defaults>'
        f"<config-filter>true</config-filter>"
    )
    data = get_data(m, "operational", body)
    assert vpn_ids(data) == ["acme-vpn", "other-vpn"]
    assert data.xpath("//s:site-removal", namespaces=NS)
    assert not data.xpath("//s:customer", namespaces=NS)


def test_with_origin_on_running_is_invalid_value(m):
    with pytest.raises(RPCError) as exc:
        get_data(m, "running", "<with-origin/>")
    assert error(exc).tag == "invalid-value"
    assert "operational" in str(error(exc).message)


# -- with-defaults -------------------------------------------------------------------------


@pytest.mark.parametrize("datastore", ["running", "operational"])
@pytest.mark.parametrize(
    ("mode", "shown", "tagged"),
    [
        ("explicit", False, False),
        ("trim", False, False),
        ("report-all", True, False),
        ("report-all-tagged", True, True),
    ],
)
def test_with_defaults_mode_applies_to_get_data(m, datastore, mode, shown, tagged):
    body = (
        f'<subtree-filter><vpn-service xmlns="{SVC}"><vpn><id>acme-vpn</id></vpn></vpn-service>'
        f'</subtree-filter><with-defaults xmlns="{WD}">{mode}</with-defaults>'
    )
    data = get_data(m, datastore, body)
    removal = data.xpath("//s:vpn/s:site-removal", namespaces=NS)
    assert bool(removal) == shown
    if removal:
        assert (removal[0].get(f"{{{WD_ATTR}}}default") == "true") == tagged


# -- NACM --------------------------------------------------------------------------------------


@pytest.mark.parametrize("datastore", ["running", "candidate", "startup", "operational"])
def test_a_viewer_reads_no_password_hash_nor_key(server, datastore):
    with ncclient_connect(server, VIEWER) as m:
        data = text(get_data(m, datastore))
        found = get_data(m, datastore, "<xpath-filter>//*[local-name()='password']</xpath-filter>")
    assert "$6$" not in data and "an-explicit-key-of-21" not in data
    assert len(found) == 0


def test_an_administrator_reads_password_hashes_with_get_data(m):
    assert "$6$" in text(get_data(m, "running"))


def test_a_customer_reads_its_own_vpn_and_nothing_of_the_others(server):
    with ncclient_connect(server, CUSTOMER) as m:
        for datastore in ("running", "operational"):
            data = get_data(m, datastore)
            assert vpn_ids(data) == ["acme-vpn"]
            reply = text(data)
            assert "other-vpn" not in reply and "an-explicit-key-of-21" not in reply
            assert "<nacm" not in reply and ADMIN[0] not in reply


def test_a_customers_xpath_filter_cannot_probe_another_vpn(server):
    probe = (
        f"<xpath-filter xmlns:s='{SVC}'>/s:vpn-service/s:vpn[s:id='other-vpn']"
        "/s:site[s:ce-address='192.0.2.11']</xpath-filter>"
    )
    with ncclient_connect(server, CUSTOMER) as m:
        assert len(get_data(m, "operational", probe)) == 0


# -- edit-data -------------------------------------------------------------------------------

NEW_VPN = (
    f'<vpn-service xmlns="{SVC}"><vpn><id>nmda-vpn</id><customer>NMDA</customer></vpn>'
    "</vpn-service>"
)
DELETE_VPN = (
    f'<vpn-service xmlns="{SVC}" xmlns:nc="{NC}"><vpn nc:operation="delete"><id>nmda-vpn</id>'
    "</vpn></vpn-service>"
)


def test_edit_data_on_candidate_then_commit(m):
    edit_data(m, "candidate", NEW_VPN)
    try:
        assert "nmda-vpn" in vpn_ids(get_data(m, "candidate"))
        assert "nmda-vpn" not in vpn_ids(get_data(m, "running"))
        m.commit()
        assert "nmda-vpn" in vpn_ids(get_data(m, "running"))
        assert "nmda-vpn" in vpn_ids(get_data(m, "operational"))
    finally:
        m.discard_changes()
        if "nmda-vpn" in vpn_ids(get_data(m, "running")):
            edit_data(m, "running", DELETE_VPN)
    assert "nmda-vpn" not in vpn_ids(get_data(m, "running"))


def test_edit_data_on_running_uses_the_netconf_operation_attribute(m):
    edit_data(m, "running", NEW_VPN)
    with pytest.raises(RPCError) as exc:
        create = NEW_VPN.replace("<vpn>", f'<vpn xmlns:nc="{NC}" nc:operation="create">')
        edit_data(m, "running", create)
    assert error(exc).tag == "data-exists"
    edit_data(m, "running", DELETE_VPN)
    assert "nmda-vpn" not in vpn_ids(get_data(m, "running"))


def test_edit_data_with_default_operation_none_creates_nothing_unmarked(m):
    with pytest.raises(RPCError) as exc:
        edit_data(m, "running", NEW_VPN, "<default-operation>none</default-operation>")
    assert error(exc).tag == "data-missing"
    assert "nmda-vpn" not in vpn_ids(get_data(m, "running"))


def test_edit_data_is_validated_like_edit_config(m):
    bad = (
        f'<vpn-service xmlns="{SVC}"><vpn><id>bad</id><customer>x</customer><topology>'
        "<type>no-such-topology</type></topology></vpn></vpn-service>"
    )
    with pytest.raises(RPCError) as exc:
        edit_data(m, "running", bad)
    assert error(exc).tag == "invalid-value"
    assert "bad" not in vpn_ids(get_data(m, "running"))


@pytest.mark.parametrize("user", [VIEWER, CUSTOMER], ids=lambda u: u[0])
@pytest.mark.parametrize("datastore", ["running", "candidate"])
def test_edit_data_is_refused_to_an_account_that_may_not_write(server, user, datastore):
    with ncclient_connect(server, user) as m, pytest.raises(RPCError) as exc:
        edit_data(m, datastore, NEW_VPN)
    assert error(exc).tag == "access-denied"
    with ncclient_connect(server) as admin:
        assert "nmda-vpn" not in vpn_ids(get_data(admin, datastore))


def test_edit_data_on_running_is_refused_while_another_session_holds_the_lock(server, m):
    with ncclient_connect(server, OPERATOR) as holder:
        holder.lock("running")
        try:
            with pytest.raises(RPCError) as exc:
                edit_data(m, "running", NEW_VPN)
            assert error(exc).tag == "in-use"
        finally:
            holder.unlock("running")


@pytest.mark.parametrize("datastore", ["startup", "operational"])
def test_edit_data_on_a_datastore_it_cannot_write_is_invalid_value(m, datastore):
    with pytest.raises(RPCError) as exc:
        edit_data(m, datastore, NEW_VPN)
    assert error(exc).tag == "invalid-value"
    assert f"ds:{datastore}" in str(error(exc).message)


# -- bad requests -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("datastore", "says"),
    [
        ("<datastore>ds:intended</datastore>", "'ds:intended' is not implemented"),
        ("<datastore>ds:no-such-datastore</datastore>", "'ds:no-such-datastore'"),
        ("<datastore>nope:running</datastore>", "prefix 'nope' is not declared"),
        ('<datastore xmlns:x="urn:example">x:running</datastore>', "bound to 'urn:example'"),
        ("<datastore>running</datastore>", "without a prefix"),
    ],
)
def test_a_bad_datastore_is_invalid_value_naming_it(m, datastore, says):
    with pytest.raises(RPCError) as exc:
        get_data(m, "", ds=datastore)
    assert error(exc).tag == "invalid-value"
    assert says in str(error(exc).message)


def test_get_data_without_a_datastore_is_missing_element(m):
    with pytest.raises(RPCError) as exc:
        get_data(m, "", ds="<config-filter>true</config-filter>")
    assert error(exc).tag == "missing-element"


def test_an_unknown_parameter_is_unknown_element(m):
    with pytest.raises(RPCError) as exc:
        get_data(m, "running", "<no-such-parameter/>")
    assert error(exc).tag == "unknown-element"


def test_lock_and_unlock_take_an_nmda_datastore(m):
    target = f'<target><datastore xmlns="{NMDA}" xmlns:ds="{DS}">ds:candidate</datastore></target>'
    m.dispatch(to_ele(f'<lock xmlns="{NC}">{target}</lock>'))
    monitoring = m.get(
        filter=("subtree", f'<netconf-state xmlns="{MON}"><datastores/></netconf-state>')
    )
    assert "<locked-by-session>" in monitoring.xml
    m.dispatch(to_ele(f'<unlock xmlns="{NC}">{target}</unlock>'))


def test_lock_of_operational_is_invalid_value(m):
    target = (
        f'<target><datastore xmlns="{NMDA}" xmlns:ds="{DS}">ds:operational</datastore></target>'
    )
    with pytest.raises(RPCError) as exc:
        m.dispatch(to_ele(f'<lock xmlns="{NC}">{target}</lock>'))
    assert error(exc).tag == "invalid-value"


# -- both servers ---------------------------------------------------------------------------

SERVERS = {
    "cevpn-server": (
        f'<vpn-service xmlns="{SVC}"><vpn><id>both</id><customer>B</customer></vpn></vpn-service>',
        f'<vpn-service xmlns="{SVC}"/>',
        "both",
    ),
    "cevpn-agent": (
        f'<ce xmlns="{CE}"><configuration-version>nmda-1</configuration-version></ce>',
        f'<ce xmlns="{CE}"/>',
        "nmda-1",
    ),
}


@pytest.fixture(scope="module", params=list(SERVERS))
def each_server(request, tmp_path_factory) -> Iterator[tuple[str, ServerProcess]]:  # type: ignore[no-untyped-def]
    command = request.param
    extra = ("--dataplane", "none") if command == "cevpn-agent" else ()
    with running_server(tmp_path_factory.mktemp(command), command, *extra) as srv:
        yield command, srv


def test_both_servers_edit_data_on_candidate_commit_and_get_data(each_server):
    command, srv = each_server
    config, top, marker = SERVERS[command]
    with ncclient_connect(srv) as m:
        edit_data(m, "candidate", config)
        m.commit()
        body = f"<subtree-filter>{top}</subtree-filter>"
        assert marker in text(get_data(m, "running", body))
        operational = get_data(m, "operational", "<with-origin/>")
        assert marker in text(operational)
        assert operational.find(f"{{{MON}}}netconf-state") is not None
        ours = operational.find(etree.fromstring(top).tag)
        assert ours is not None and origin_of(ours) == f"{{{OR}}}intended"


def test_both_servers_list_the_datastores_in_the_yang_library(each_server):
    _, srv = each_server
    with ncclient_connect(srv) as m:
        body = (
            f'<subtree-filter><yang-library xmlns="{YL}"><datastore/></yang-library>'
            "</subtree-filter>"
        )
        names = get_data(m, "operational", body).xpath(
            "//yl:datastore/yl:name/text()", namespaces=NS
        )
    assert sorted(names) == ["ds:candidate", "ds:operational", "ds:running", "ds:startup"]


def test_both_servers_refuse_get_data_of_an_unknown_datastore(each_server):
    _, srv = each_server
    with ncclient_connect(srv) as m, pytest.raises(RPCError) as exc:
        get_data(m, "conventional")
    assert error(exc).tag == "invalid-value"
    assert "ds:conventional" in str(error(exc).message)
