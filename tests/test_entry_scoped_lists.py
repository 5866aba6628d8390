"""Which lists incremental validation may validate entry by entry (nc_core.schema).

A list qualifies only if no constraint anywhere can read one of its entries from
another entry, or from outside the list other than through a leafref (which more
entries cannot break).  The analysis must err on the side of 'may read it': every
expression it cannot follow leaves the list out.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from nc_core.schema import Schema, SchemaIndex, entry_scoped_lists

MODULE = """
module scoped {
  yang-version 1.1;
  namespace "urn:test:scoped";
  prefix s;

  container top {
    leaf own-address { type string; }
    leaf gateway { type leafref { path "/s:top/s:alone/s:name"; } }

    list alone {
      key name;
      unique "address";
      leaf name { type string; }
      leaf address {
        type string;
        must "not(. = /s:top/s:own-address)";
      }
      container inner {
        leaf a { type string; }
        leaf b { type string; must "../a or ../../name"; when "../a != 'x'"; }
      }
    }
    list reads-another-entry {
      key name;
      leaf name { type string; }
      leaf peer { type string; must "/s:top/s:reads-another-entry[s:name = current()]"; }
    }
    list climbs-back-in {
      key name;
      leaf name { type string; }
      leaf x { type string; must "../../s:climbs-back-in/s:name"; }
    }
    list counted-from-outside {
      key name;
      leaf name { type string; }
    }
    leaf limit { type uint8; must "count(../s:counted-from-outside) < 5"; }
    list bounded {
      key name;
      max-elements 3;
      leaf name { type string; }
    }
    list unique-with-default {
      key name;
      unique "kind";
      leaf name { type string; }
      leaf kind { type string; default "plain"; }
    }
    list ancestors {
      key name;
      leaf name { type string; }
      leaf x { type string; must "ancestor::*[s:own-address][1]/s:own-address != ."; }
    }
  }
}
"""


UNFOLLOWABLE = """
module unfollowable {
  yang-version 1.1;
  namespace "urn:test:unfollowable";
  prefix u;

  container top {
    list plain {
      key name;
      leaf name { type string; }
    }
  }
  container elsewhere {
    list sibling-axis {
      key name;
      leaf name { type string; }
      leaf x { type string; must "not(../following-sibling::u:sibling-axis)"; }
    }
  }
}
"""


def qualifying(directory: Path, name: str, text: str) -> set[str]:
    (directory / f"{name}.yang").write_text(text)
    found = entry_scoped_lists(SchemaIndex(Schema([name], search_dirs=(directory,))))
    return {tags[-1].partition("}")[2] for tags in found if "urn:test:" in tags[0]}


@pytest.fixture(scope="module")
def scoped(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    return qualifying(tmp_path_factory.mktemp("yang"), "scoped", MODULE)


def test_a_list_read_only_by_its_own_entries_and_by_outside_leafrefs_qualifies(scoped):
    assert "alone" in scoped


def test_a_path_to_another_entry_disqualifies_its_list(scoped):
    assert "reads-another-entry" not in scoped


def test_climbing_out_of_an_entry_and_back_into_the_list_disqualifies_it(scoped):
    assert "climbs-back-in" not in scoped


def test_a_must_outside_the_list_reading_its_entries_disqualifies_it(scoped):
    assert "counted-from-outside" not in scoped


def test_an_expression_the_analysis_cannot_follow_disqualifies_every_list(tmp_path: Path):
    """It might read any entry of any list (here: the following entries of its own)."""
    assert qualifying(tmp_path, "unfollowable", UNFOLLOWABLE) == set()


def test_max_elements_disqualifies_the_list(scoped):
    assert "bounded" not in scoped


def test_a_unique_leaf_with_a_default_disqualifies_the_list(scoped):
    assert "unique-with-default" not in scoped


def test_reading_data_outside_the_list_through_the_ancestor_axis_is_followed(scoped):
    assert "ancestors" in scoped


TOP_LEVEL = """
module toplevel {
  yang-version 1.1;
  namespace "urn:test:toplevel";
  prefix t;

  list item {
    key name;
    leaf name { type string; }
  }
}
"""


def test_a_list_at_the_top_of_the_data_tree_is_validated_whole(tmp_path: Path):
    """Its first entry is what a libyang tree is held by: a patch removing it in place
    would pull the tree from under its holders (nc_core.shared_tree)."""
    assert qualifying(tmp_path, "toplevel", TOP_LEVEL) == set()


def test_the_ce_peer_list_qualifies_with_its_unique_sp_address() -> None:
    from nc_core.schema import CE_MODULES

    ce = "urn:cevpn:yang:cevpn-ce"
    found = entry_scoped_lists(SchemaIndex(Schema(CE_MODULES)))
    peer = found[(f"{{{ce}}}ce", f"{{{ce}}}peer")]
    assert peer.keys == (f"{{{ce}}}name",)
    assert peer.uniques == (((f"{{{ce}}}sp-address",),),)


FREE_LEAVES = """
module freeleaves {
  yang-version 1.1;
  namespace "urn:test:freeleaves";
  prefix f;

  container top {
    leaf version { type string { length "1..8"; } }
    leaf read-by-an-entry { type string; }
    leaf read-from-elsewhere { type uint8; }
    leaf with-a-must { type string; must "string-length(.) > 1"; }
    leaf with-a-when { type string; when "../read-by-an-entry"; }
    leaf a-leafref { type leafref { path "/f:top/f:entry/f:name"; } }
    leaf an-instance-identifier { type instance-identifier; }
    choice either {
      leaf in-a-case { type string; }
      leaf in-another { type string; }
    }
    list entry {
      key name;
      leaf name { type string; }
      leaf x { type string; must "not(. = /f:top/f:read-by-an-entry)"; }
    }
  }
  container elsewhere {
    leaf y { type uint8; must ". < /f:top/f:read-from-elsewhere"; }
  }
}
"""


def test_a_leaf_beside_the_entries_that_nothing_reads_is_free(tmp_path: Path):
    """A new value of a free leaf leaves every other node as valid as it was; any
    constraint of its own, on it, or in another case of a choice leaves it out."""
    (tmp_path / "freeleaves.yang").write_text(FREE_LEAVES)
    found = entry_scoped_lists(SchemaIndex(Schema(["freeleaves"], search_dirs=(tmp_path,))))
    (scoped,) = [s for tags, s in found.items() if tags[-1] == "{urn:test:freeleaves}entry"]
    assert {tag.partition("}")[2] for tag in scoped.free_leaves} == {"version"}


def test_the_ce_configuration_version_is_a_free_leaf_beside_the_peers() -> None:
    """The VPN server changes it with every peer it adds (nc_server.ce_config)."""
    from nc_core.schema import CE_MODULES

    ce = "urn:cevpn:yang:cevpn-ce"
    found = entry_scoped_lists(SchemaIndex(Schema(CE_MODULES)))
    assert found[(f"{{{ce}}}ce", f"{{{ce}}}peer")].free_leaves == {f"{{{ce}}}configuration-version"}
