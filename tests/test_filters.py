"""<filter> for <get>/<get-config>: subtree (RFC 6241 Section 6) and XPath (Section 8.9).

The RFC's examples (6.4.1 to 6.4.8) are reproduced with the <data> representation: the
datastore is a <data> element whose children are the top-level data nodes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
from lxml import etree

from nc_core import filters
from nc_core.errors import RpcError
from nc_core.filters import apply_filter
from nc_core.xmlutil import NC_NS

CFG = "http://example.com/schema/1.2/config"
STATS = "http://example.com/schema/1.2/stats"
CE = "urn:cevpn:yang:cevpn-ce"

_PARSER = etree.XMLParser(remove_blank_text=True)


def users(barney_type: str = "admin") -> str:
    """The configuration of RFC 6241 6.4.3's reply."""
    return f"""
    <top xmlns="{CFG}">
      <users>
        <user>
          <name>root</name><type>superuser</type><full-name>Charlie Root</full-name>
          <company-info><dept>1</dept><id>1</id></company-info>
        </user>
        <user>
          <name>fred</name><type>admin</type><full-name>Fred Flintstone</full-name>
          <company-info><dept>2</dept><id>2</id></company-info>
        </user>
        <user>
          <name>barney</name><type>{barney_type}</type><full-name>Barney Rubble</full-name>
          <company-info><dept>2</dept><id>3</id></company-info>
        </user>
      </users>
    </top>"""


STATS_DATA = f"""
    <t:top xmlns:t="{STATS}">
      <t:interfaces>
        <t:interface t:ifName="eth0">
          <t:ifInOctets>45621</t:ifInOctets><t:ifOutOctets>774344</t:ifOutOctets>
        </t:interface>
        <t:interface t:ifName="eth1">
          <t:ifInOctets>1</t:ifInOctets><t:ifOutOctets>2</t:ifOutOctets>
        </t:interface>
      </t:interfaces>
    </t:top>"""

CE_DATA = f"""
    <ce xmlns="{CE}">
      <interface><name>eth0</name><mtu>1500</mtu><description>uplink</description></interface>
      <interface><name>eth1</name><mtu>9000</mtu><description>lan</description></interface>
    </ce>"""


def keys_of(elem: etree._Element) -> Sequence[str]:
    if elem.tag == f"{{{CFG}}}user":
        return (f"{{{CFG}}}name",)
    if elem.tag == f"{{{CE}}}interface":
        return (f"{{{CE}}}name",)
    return ()


def parse(xml: str) -> etree._Element:
    return etree.fromstring(xml, _PARSER)


def datastore(*fragments: str) -> etree._Element:
    return parse(f'<data xmlns="{NC_NS}">{"".join(fragments)}</data>')


def subtree(content: str, *, type_attr: str | None = "subtree") -> etree._Element:
    attr = f' type="{type_attr}"' if type_attr is not None else ""
    return parse(f'<filter xmlns="{NC_NS}"{attr}>{content}</filter>')


def xpath(select: str, **prefixes: str) -> etree._Element:
    nsmap: dict[Any, str] = {None: NC_NS, **prefixes}  # lxml-stubs: keys are str, but None is ok
    return etree.Element(f"{{{NC_NS}}}filter", type="xpath", select=select, nsmap=nsmap)


def shape(elem: etree._Element) -> Any:
    """What matters of a tree: tags, attributes, text and order (not prefixes or whitespace)."""
    return (
        elem.tag,
        sorted(elem.attrib.items()),
        (elem.text or "").strip(),
        [shape(c) for c in elem],
    )


def assert_reply(result: etree._Element, *expected: str) -> None:
    assert shape(result) == shape(datastore(*expected))


# -- RFC 6241 Section 6.4 ----------------------------------------------------------------------


def test_no_filter_returns_the_whole_datastore() -> None:  # 6.4.1
    data = datastore(users(), STATS_DATA)
    assert_reply(apply_filter(data, None, keys_of), users(), STATS_DATA)


def test_empty_subtree_filter_selects_nothing() -> None:  # 6.4.2
    result = apply_filter(datastore(users()), subtree(""), keys_of)
    assert result.tag == f"{{{NC_NS}}}data"
    assert len(result) == 0


def test_selection_node_selects_the_entire_users_subtree() -> None:  # 6.4.3
    filt = subtree(f'<top xmlns="{CFG}"><users/></top>')
    assert_reply(apply_filter(datastore(users(), STATS_DATA), filt, keys_of), users())


def test_selection_node_inside_list_entries_selects_all_name_elements() -> None:  # 6.4.4
    filt = subtree(f'<top xmlns="{CFG}"><users><user><name/></user></users></top>')
    expected = f"""
    <top xmlns="{CFG}"><users>
      <user><name>root</name></user>
      <user><name>fred</name></user>
      <user><name>barney</name></user>
    </users></top>"""
    assert_reply(apply_filter(datastore(users()), filt, keys_of), expected)


def test_content_match_on_key_selects_only_that_list_entry() -> None:  # 6.4.5
    filt = subtree(f'<top xmlns="{CFG}"><users><user><name>fred</name></user></users></top>')
    expected = f"""
    <top xmlns="{CFG}"><users><user>
      <name>fred</name><type>admin</type><full-name>Fred Flintstone</full-name>
      <company-info><dept>2</dept><id>2</id></company-info>
    </user></users></top>"""
    assert_reply(apply_filter(datastore(users()), filt, keys_of), expected)


def test_content_match_with_selection_nodes_returns_only_those_elements_of_the_entry() -> None:
    # 6.4.6
    filt = subtree(
        f"""<top xmlns="{CFG}"><users><user>
              <name>fred</name><type/><full-name/>
            </user></users></top>"""
    )
    expected = f"""
    <top xmlns="{CFG}"><users><user>
      <name>fred</name><type>admin</type><full-name>Fred Flintstone</full-name>
    </user></users></top>"""
    assert_reply(apply_filter(datastore(users()), filt, keys_of), expected)


def test_multiple_subtrees_select_different_parts_of_different_entries() -> None:  # 6.4.7
    # The RFC's reply shows barney as a superuser, so that is what this datastore holds.
    filt = subtree(
        f"""<top xmlns="{CFG}"><users>
              <user><name>root</name><company-info/></user>
              <user><name>fred</name><company-info><id/></company-info></user>
              <user>
                <name>barney</name><type>superuser</type>
                <company-info><dept/></company-info>
              </user>
            </users></top>"""
    )
    expected = f"""
    <top xmlns="{CFG}"><users>
      <user><name>root</name><company-info><dept>1</dept><id>1</id></company-info></user>
      <user><name>fred</name><company-info><id>2</id></company-info></user>
      <user>
        <name>barney</name><type>superuser</type><company-info><dept>2</dept></company-info>
      </user>
    </users></top>"""
    result = apply_filter(datastore(users(barney_type="superuser")), filt, keys_of)
    assert_reply(result, expected)


def test_attribute_match_expression_selects_the_element_with_that_attribute() -> None:  # 6.4.8
    filt = subtree(
        f"""<t:top xmlns:t="{STATS}"><t:interfaces>
              <t:interface t:ifName="eth0"/>
            </t:interfaces></t:top>"""
    )
    expected = f"""
    <t:top xmlns:t="{STATS}"><t:interfaces>
      <t:interface t:ifName="eth0">
        <t:ifInOctets>45621</t:ifInOctets><t:ifOutOctets>774344</t:ifOutOctets>
      </t:interface>
    </t:interfaces></t:top>"""
    assert_reply(apply_filter(datastore(STATS_DATA), filt, keys_of), expected)


# -- subtree filtering: the rules behind the examples ----------------------------------------


def test_filter_without_type_attribute_is_a_subtree_filter() -> None:
    filt = subtree(f'<top xmlns="{CFG}"><users/></top>', type_attr=None)
    assert_reply(apply_filter(datastore(users(), CE_DATA), filt, keys_of), users())


def test_empty_filter_without_type_attribute_selects_nothing() -> None:
    assert len(apply_filter(datastore(users()), subtree("", type_attr=None), keys_of)) == 0


def test_false_content_match_selects_nothing_of_that_entry() -> None:
    # barney is an admin here, so the barney sibling set of 6.4.7 selects nothing at all.
    filt = subtree(
        f"""<top xmlns="{CFG}"><users><user>
              <name>barney</name><type>superuser</type><company-info><dept/></company-info>
            </user></users></top>"""
    )
    assert len(apply_filter(datastore(users()), filt, keys_of)) == 0


def test_all_content_matches_of_a_sibling_set_must_be_true() -> None:
    # fred is an admin too, but his full name does not match.
    filt = subtree(
        f"""<top xmlns="{CFG}"><users>
              <user><type>admin</type><full-name>Barney Rubble</full-name><name/></user>
            </users></top>"""
    )
    expected = f"""
    <top xmlns="{CFG}"><users><user>
      <name>barney</name><type>admin</type><full-name>Barney Rubble</full-name>
    </user></users></top>"""
    assert_reply(apply_filter(datastore(users()), filt, keys_of), expected)


def test_content_match_inside_a_containment_node_does_not_decide_for_the_parent() -> None:
    # fred's <company-info> fails its content match, so only it is left out;
    # barney's passes, and being the only filter node there it selects all of <company-info>.
    filt = subtree(
        f"""<top xmlns="{CFG}"><users>
              <user><type>admin</type><company-info><id>3</id></company-info></user>
            </users></top>"""
    )
    expected = f"""
    <top xmlns="{CFG}"><users>
      <user><name>fred</name><type>admin</type></user>
      <user>
        <name>barney</name><type>admin</type><company-info><dept>2</dept><id>3</id></company-info>
      </user>
    </users></top>"""
    assert_reply(apply_filter(datastore(users()), filt, keys_of), expected)


def test_content_match_ignores_whitespace_around_the_value() -> None:
    filt = subtree(
        f'<top xmlns="{CFG}"><users><user><name>\n  fred  \n</name></user></users></top>'
    )
    result = apply_filter(datastore(users()), filt, keys_of)
    assert result.xpath("//c:user/c:name/text()", namespaces={"c": CFG}) == ["fred"]


def test_content_match_alone_under_a_container_selects_the_whole_parent() -> None:
    filt = subtree(f'<ce xmlns="{CE}"><interface><mtu>9000</mtu></interface></ce>')
    expected = f"""
    <ce xmlns="{CE}">
      <interface><name>eth1</name><mtu>9000</mtu><description>lan</description></interface>
    </ce>"""
    assert_reply(apply_filter(datastore(CE_DATA), filt, keys_of), expected)


def test_filter_node_without_namespace_matches_that_name_in_any_namespace() -> None:
    filt = subtree('<top xmlns=""><users><user><name>fred</name></user></users></top>')
    result = apply_filter(datastore(users(), STATS_DATA), filt, keys_of)
    assert [child.tag for child in result] == [f"{{{CFG}}}top"]
    assert result.xpath("//c:user/c:name/text()", namespaces={"c": CFG}) == ["fred"]


def test_filter_node_without_namespace_selects_same_name_from_every_namespace() -> None:
    filt = subtree('<top xmlns=""/>')
    assert_reply(apply_filter(datastore(users(), STATS_DATA), filt, keys_of), users(), STATS_DATA)


def test_filter_node_in_another_namespace_selects_nothing() -> None:
    filt = subtree('<top xmlns="http://example.com/other"><users/></top>')
    assert len(apply_filter(datastore(users()), filt, keys_of)) == 0


def test_attribute_match_compares_qualified_names() -> None:
    # ifName without the prefix is another attribute than t:ifName.
    filt = subtree(
        f'<t:top xmlns:t="{STATS}"><t:interfaces><t:interface ifName="eth0"/>'
        "</t:interfaces></t:top>"
    )
    assert len(apply_filter(datastore(STATS_DATA), filt, keys_of)) == 0


def test_attribute_match_with_another_value_selects_nothing() -> None:
    filt = subtree(
        f'<t:top xmlns:t="{STATS}"><t:interfaces><t:interface t:ifName="eth9"/>'
        "</t:interfaces></t:top>"
    )
    assert len(apply_filter(datastore(STATS_DATA), filt, keys_of)) == 0


def test_containment_node_whose_descendants_select_nothing_produces_no_output() -> None:
    filt = subtree(f'<top xmlns="{CFG}"><users><user><no-such-leaf/></user></users></top>')
    assert len(apply_filter(datastore(users()), filt, keys_of)) == 0


def test_sibling_containment_nodes_with_the_same_name_select_the_union() -> None:
    filt = subtree(
        f"""<top xmlns="{CFG}"><users>
              <user><name>fred</name><type/></user>
              <user><name>root</name><type/></user>
            </users></top>"""
    )
    expected = f"""
    <top xmlns="{CFG}"><users>
      <user><name>root</name><type>superuser</type></user>
      <user><name>fred</name><type>admin</type></user>
    </users></top>"""
    assert_reply(apply_filter(datastore(users()), filt, keys_of), expected)


def test_overlapping_filter_nodes_merge_into_one_copy_of_each_node() -> None:
    filt = subtree(
        f"""<top xmlns="{CFG}"><users>
              <user><type/></user>
              <user><name>fred</name><company-info><id/></company-info></user>
              <user><name>fred</name><type/><company-info><dept/></company-info></user>
            </users></top>"""
    )
    expected = f"""
    <top xmlns="{CFG}"><users>
      <user><name>root</name><type>superuser</type></user>
      <user><name>fred</name><type>admin</type>
        <company-info><dept>2</dept><id>2</id></company-info></user>
      <user><name>barney</name><type>admin</type></user>
    </users></top>"""
    assert_reply(apply_filter(datastore(users()), filt, keys_of), expected)


def test_list_keys_are_included_when_an_entry_is_selected_in_part() -> None:
    filt = subtree(f'<ce xmlns="{CE}"><interface><mtu/></interface></ce>')
    expected = f"""
    <ce xmlns="{CE}">
      <interface><name>eth0</name><mtu>1500</mtu></interface>
      <interface><name>eth1</name><mtu>9000</mtu></interface>
    </ce>"""
    assert_reply(apply_filter(datastore(CE_DATA), filt, keys_of), expected)


def test_several_top_level_filter_nodes_select_from_several_modules() -> None:
    filt = subtree(f'<top xmlns="{CFG}"><users/></top><ce xmlns="{CE}"/>')
    result = apply_filter(datastore(users(), STATS_DATA, CE_DATA), filt, keys_of)
    assert_reply(result, users(), CE_DATA)


def test_top_level_filter_nodes_are_applied_independently() -> None:
    # A false content match on one top-level node does not empty the rest of the reply.
    filt = subtree(f'<hostname xmlns="{CE}">other</hostname><top xmlns="{CFG}"><users/></top>')
    hostname = f'<hostname xmlns="{CE}">ce1</hostname>'
    assert_reply(apply_filter(datastore(hostname, users()), filt, keys_of), users())


def test_top_level_content_match_selects_the_matching_leaf() -> None:
    filt = subtree(f'<hostname xmlns="{CE}">ce1</hostname>')
    hostname = f'<hostname xmlns="{CE}">ce1</hostname>'
    assert_reply(apply_filter(datastore(hostname, users()), filt, keys_of), hostname)


def test_reply_keeps_the_document_order_of_the_data() -> None:
    filt = subtree(
        f"""<ce xmlns="{CE}"/>
            <top xmlns="{CFG}"><users>
              <user><name>barney</name><full-name/><type/></user>
              <user><name>root</name><full-name/></user>
            </users></top>"""
    )
    expected = f"""
    <top xmlns="{CFG}"><users>
      <user><name>root</name><full-name>Charlie Root</full-name></user>
      <user><name>barney</name><type>admin</type><full-name>Barney Rubble</full-name></user>
    </users></top>"""
    assert_reply(apply_filter(datastore(users(), CE_DATA), filt, keys_of), expected, CE_DATA)


def test_selecting_many_list_entries_by_key_compares_each_entry_a_bounded_number_of_times(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Matching each of 1000 filter entries against each of 5000 list entries would
    # mean millions of value comparisons; a keyed lookup needs a few per entry.
    compared = 0
    same_text = filters._same_text

    def counting(f: etree._Element, node: etree._Element) -> bool:
        nonlocal compared
        compared += 1
        return same_text(f, node)

    monkeypatch.setattr(filters, "_same_text", counting)
    entries = "".join(
        f"<interface><name>if{n}</name><mtu>1500</mtu></interface>" for n in range(5000)
    )
    wanted = "".join(f"<interface><name>if{n}</name><mtu/></interface>" for n in range(0, 5000, 5))
    filt = subtree(f'<ce xmlns="{CE}">{wanted}</ce>')
    result = apply_filter(datastore(f'<ce xmlns="{CE}">{entries}</ce>'), filt, keys_of)
    assert len(result[0]) == 1000
    assert compared < 20 * 1000


def test_filter_attributes_qualified_with_the_base_namespace_are_accepted() -> None:
    filt = etree.Element(
        f"{{{NC_NS}}}filter",
        {f"{{{NC_NS}}}type": "xpath", f"{{{NC_NS}}}select": "/ce:ce"},
        nsmap={"nc": NC_NS, "ce": CE},
    )
    assert_reply(apply_filter(datastore(users(), CE_DATA), filt, keys_of), CE_DATA)


def test_unknown_filter_type_is_a_bad_attribute_error() -> None:
    with pytest.raises(RpcError) as caught:
        apply_filter(datastore(users()), subtree("", type_attr="regex"), keys_of)
    assert caught.value.tag == "bad-attribute"
    assert caught.value.type == "protocol"
    assert ("bad-attribute", "type") in caught.value.info


def test_subtree_filter_does_not_modify_the_data() -> None:
    data = datastore(users(), CE_DATA)
    before = etree.tostring(data)
    filt = subtree(
        f'<top xmlns="{CFG}"><users><user><name>fred</name><type/></user></users></top>'
        f'<ce xmlns="{CE}"/>'
    )
    result = apply_filter(data, filt, keys_of)
    assert result is not data
    assert etree.tostring(data) == before
    result[0].clear()  # and the reply shares nothing with the data
    assert etree.tostring(data) == before


# -- XPath filtering (RFC 6241 Section 8.9) ----------------------------------------------------


def test_xpath_absolute_path_selects_the_node_with_its_ancestors() -> None:
    filt = xpath("/t:top/t:users/t:user[t:name='fred']/t:full-name", t=CFG)
    expected = f"""
    <top xmlns="{CFG}"><users><user>
      <name>fred</name><full-name>Fred Flintstone</full-name>
    </user></users></top>"""
    assert_reply(apply_filter(datastore(users(), CE_DATA), filt, keys_of), expected)


def test_xpath_predicate_on_key_selects_one_whole_list_entry() -> None:
    filt = xpath("/t:top/t:users/t:user[t:name='fred']", t=CFG)
    expected = f"""
    <top xmlns="{CFG}"><users><user>
      <name>fred</name><type>admin</type><full-name>Fred Flintstone</full-name>
      <company-info><dept>2</dept><id>2</id></company-info>
    </user></users></top>"""
    assert_reply(apply_filter(datastore(users()), filt, keys_of), expected)


def test_xpath_union_selects_both_sides_in_document_order() -> None:
    filt = xpath(
        "/ce:ce/ce:interface[ce:name='eth1']/ce:mtu | /t:top/t:users/t:user/t:type", t=CFG, ce=CE
    )
    expected_users = f"""
    <top xmlns="{CFG}"><users>
      <user><name>root</name><type>superuser</type></user>
      <user><name>fred</name><type>admin</type></user>
      <user><name>barney</name><type>admin</type></user>
    </users></top>"""
    expected_ce = f'<ce xmlns="{CE}"><interface><name>eth1</name><mtu>9000</mtu></interface></ce>'
    result = apply_filter(datastore(users(), CE_DATA), filt, keys_of)
    assert_reply(result, expected_users, expected_ce)


def test_xpath_duplicate_selections_appear_once() -> None:
    filt = xpath("/t:top | /t:top/t:users | //t:user[t:name='fred'] | //t:name", t=CFG)
    assert_reply(apply_filter(datastore(users()), filt, keys_of), users())


def test_xpath_does_not_deep_copy_a_subtree_twice(monkeypatch: pytest.MonkeyPatch) -> None:
    copied: list[str] = []
    original = filters._copy_whole

    def counting_copy(elem: etree._Element) -> etree._Element:
        copied.append(elem.tag)
        return original(elem)

    monkeypatch.setattr(filters, "_copy_whole", counting_copy)
    filt = xpath("//t:user | /t:top | //t:name", t=CFG)
    apply_filter(datastore(users()), filt, keys_of)
    assert copied == [f"{{{CFG}}}top"]


def test_xpath_prefix_declared_on_the_filter_element_is_used() -> None:
    filt = xpath("/x:ce", x=CE)
    assert_reply(apply_filter(datastore(users(), CE_DATA), filt, keys_of), CE_DATA)


def test_xpath_prefix_declared_on_an_enclosing_element_is_in_scope() -> None:
    rpc = parse(
        f"""<rpc xmlns="{NC_NS}" xmlns:ce="{CE}" message-id="1"><get>
              <filter type="xpath" select="/ce:ce/ce:interface[ce:name='eth0']"/>
            </get></rpc>"""
    )
    filt = rpc.find(f".//{{{NC_NS}}}filter")
    assert filt is not None
    expected = f"""
    <ce xmlns="{CE}">
      <interface><name>eth0</name><mtu>1500</mtu><description>uplink</description></interface>
    </ce>"""
    assert_reply(apply_filter(datastore(CE_DATA), filt, keys_of), expected)


def test_xpath_selecting_a_leaf_includes_the_keys_of_ancestor_list_entries() -> None:
    filt = xpath("//ce:description", ce=CE)
    expected = f"""
    <ce xmlns="{CE}">
      <interface><name>eth0</name><description>uplink</description></interface>
      <interface><name>eth1</name><description>lan</description></interface>
    </ce>"""
    assert_reply(apply_filter(datastore(CE_DATA), filt, keys_of), expected)


def test_xpath_selected_text_node_selects_its_element() -> None:
    filt = xpath("/ce:ce/ce:interface/ce:mtu/text()", ce=CE)
    expected = f"""
    <ce xmlns="{CE}">
      <interface><name>eth0</name><mtu>1500</mtu></interface>
      <interface><name>eth1</name><mtu>9000</mtu></interface>
    </ce>"""
    assert_reply(apply_filter(datastore(CE_DATA), filt, keys_of), expected)


def test_xpath_selected_attribute_selects_its_element() -> None:
    filt = xpath("//t:interface/@t:ifName[. = 'eth1']", t=STATS)
    expected = f"""
    <t:top xmlns:t="{STATS}"><t:interfaces>
      <t:interface t:ifName="eth1"><t:ifInOctets>1</t:ifInOctets><t:ifOutOctets>2</t:ifOutOctets>
      </t:interface>
    </t:interfaces></t:top>"""
    assert_reply(apply_filter(datastore(STATS_DATA), filt, keys_of), expected)


def test_xpath_root_selects_everything() -> None:
    assert_reply(apply_filter(datastore(users(), CE_DATA), xpath("/"), keys_of), users(), CE_DATA)


def test_xpath_selecting_nothing_gives_an_empty_reply() -> None:
    assert len(apply_filter(datastore(users()), xpath("/t:top/t:nothing", t=CFG), keys_of)) == 0


def test_xpath_absolute_paths_start_at_the_data_even_inside_a_larger_document() -> None:
    reply = parse(f'<rpc-reply xmlns="{NC_NS}"><data>{CE_DATA}</data></rpc-reply>')
    data = reply[0]
    assert_reply(apply_filter(data, xpath("/ce:ce", ce=CE), keys_of), CE_DATA)


def test_xpath_that_does_not_select_nodes_is_invalid_value() -> None:
    with pytest.raises(RpcError) as caught:
        apply_filter(datastore(users()), xpath("count(/t:top/t:users/t:user)", t=CFG), keys_of)
    assert caught.value.tag == "invalid-value"
    assert "must select nodes" in caught.value.message


def test_xpath_syntax_error_is_invalid_value() -> None:
    with pytest.raises(RpcError) as caught:
        apply_filter(datastore(users()), xpath("/t:top[", t=CFG), keys_of)
    assert caught.value.tag == "invalid-value"
    assert ("bad-attribute", "select") in caught.value.info


def test_xpath_undeclared_prefix_is_invalid_value_naming_the_prefix() -> None:
    with pytest.raises(RpcError) as caught:
        apply_filter(datastore(users()), xpath("/nope:top", t=CFG), keys_of)
    assert caught.value.tag == "invalid-value"
    assert "'nope'" in caught.value.message


def test_xpath_variables_are_refused() -> None:
    with pytest.raises(RpcError) as caught:
        apply_filter(datastore(users()), xpath("$root"), keys_of)
    assert caught.value.tag == "invalid-value"


def test_xpath_has_only_the_core_function_library() -> None:
    filt = xpath("//*[re:test(., 'f.*')]", re="http://exslt.org/regular-expressions")
    with pytest.raises(RpcError) as caught:
        apply_filter(datastore(users()), filt, keys_of)
    assert caught.value.tag == "invalid-value"


def test_xpath_filter_without_select_is_missing_attribute() -> None:
    filt = parse(f'<filter xmlns="{NC_NS}" type="xpath"/>')
    with pytest.raises(RpcError) as caught:
        apply_filter(datastore(users()), filt, keys_of)
    assert caught.value.tag == "missing-attribute"
    assert caught.value.type == "protocol"
    assert caught.value.info == [("bad-attribute", "select"), ("bad-element", "filter")]


def test_xpath_filter_does_not_modify_the_data() -> None:
    data = datastore(users(), CE_DATA)
    before = etree.tostring(data)
    result = apply_filter(
        data, xpath("//t:user[t:name='fred']/t:type | /ce:ce", t=CFG, ce=CE), keys_of
    )
    for node in result.iter():
        node.text = "changed"
    assert etree.tostring(data) == before


def test_xpath_unprefixed_names_match_by_local_name_as_yangcli_sends_them():
    data = etree.fromstring(
        f'<data xmlns="{NC_NS}"><top xmlns="urn:t"><item><k>a</k></item><item><k>b</k></item>'
        "</top></data>"
    )
    f = etree.fromstring(f'<filter xmlns="{NC_NS}" type="xpath" select="/top/item[k=\'b\']"/>')
    out = apply_filter(data, f, lambda e: ("{urn:t}k",) if e.tag == "{urn:t}item" else ())
    assert [e.text for e in out.iter("{urn:t}k")] == ["b"]


def test_xpath_unprefixed_function_and_attribute_names_are_left_alone():
    data = etree.fromstring(
        f'<data xmlns="{NC_NS}"><top xmlns="urn:t"><item a="1"><k>a</k></item></top></data>'
    )
    f = etree.fromstring(
        f'<filter xmlns="{NC_NS}" type="xpath" select="/top/item[@a=\'1\' and count(k)=1]"/>'
    )
    out = apply_filter(data, f, lambda e: ())
    assert len(out.findall(".//{urn:t}item")) == 1
