"""The record of the key material a commit's compile wrote (nc_server.shared_keys): what a
server adopting that commit reads instead of the whole VPN."""

from __future__ import annotations

from nc_server import shared_keys
from nc_server.keystore import TABLE_PSK, TABLE_SA
from nc_server.shared_keys import KeyJournal, KeyNews, merge_changes, merge_records


def test_the_rows_written_while_validating_are_recorded_by_vpn_until_published() -> None:
    journal = KeyJournal()
    journal.wrote({(TABLE_PSK, "v1/a/d"), (TABLE_SA, "v1/a/d"), (TABLE_PSK, "v2/x/y")})
    journal.wrote({(TABLE_SA, "v1/d/a")})
    record = journal.pending()
    assert merge_records([record]) == {
        "v1": {(TABLE_PSK, "v1/a/d"), (TABLE_SA, "v1/a/d"), (TABLE_SA, "v1/d/a")},
        "v2": {(TABLE_PSK, "v2/x/y")},
    }
    journal.published()
    assert merge_records([journal.pending()]) == {}


def test_a_record_not_published_is_carried_to_the_next_commit() -> None:
    """A commit whose publication failed wrote its material all the same: the next commit
    of this server must name it, or the others would make their own for those pairs."""
    journal = KeyJournal()
    journal.wrote({(TABLE_PSK, "v1/a/b")})
    journal.pending()  # stored with a commit that then failed: published() never called
    journal.wrote({(TABLE_PSK, "v1/a/c")})
    assert merge_records([journal.pending()]) == {
        "v1": {(TABLE_PSK, "v1/a/b"), (TABLE_PSK, "v1/a/c")}
    }


def test_a_vpn_with_too_many_rows_is_recorded_as_read_it_whole(monkeypatch) -> None:
    monkeypatch.setattr(shared_keys, "MAX_ROWS", 3)
    journal = KeyJournal()
    journal.wrote({(TABLE_PSK, f"v1/a/s{n}") for n in range(4)} | {(TABLE_PSK, "v2/a/b")})
    journal.wrote({(TABLE_PSK, "v1/b/c")})
    assert merge_records([journal.pending()]) == {"v1": None, "v2": {(TABLE_PSK, "v2/a/b")}}


def test_records_of_several_commits_merge_and_one_missing_means_every_vpn_whole() -> None:
    first = shared_keys.encode_rows({"v1": [(TABLE_PSK, "v1/a/b")]})
    second = shared_keys.encode_rows({"v1": [(TABLE_PSK, "v1/a/c")], "v2": None})
    assert merge_records([first, second]) == {
        "v1": {(TABLE_PSK, "v1/a/b"), (TABLE_PSK, "v1/a/c")},
        "v2": None,
    }
    assert merge_records([first, None, second]) is None
    assert merge_records([first, b"not json"]) is None


def test_while_adopting_a_vpn_not_named_needs_no_reading_and_unknown_means_whole() -> None:
    journal = KeyJournal()
    assert journal.rows_for("v1") is None  # not adopting: read whole
    journal.incoming = {"v1": frozenset({(TABLE_PSK, "v1/a/b")}), "v2": None}
    assert journal.rows_for("v1") == {(TABLE_PSK, "v1/a/b")}
    assert journal.rows_for("v2") is None
    assert journal.rows_for("v3") == frozenset()


# -- news of material changed between commits ---------------------------------------------


def test_news_of_a_few_rows_carries_them_and_names_each_vpn_s_own() -> None:
    rows = frozenset({(TABLE_SA, "v1/a/b"), (TABLE_SA, "v2/c/d")})
    news = KeyNews.parse(KeyNews("a", frozenset({"v1", "v2"}), rows).payload())
    assert news is not None and news.rows == rows
    assert news.changes() == {
        "v1": frozenset({(TABLE_SA, "v1/a/b")}),
        "v2": frozenset({(TABLE_SA, "v2/c/d")}),
    }


def test_news_of_too_many_rows_names_its_vpns_whole_and_of_too_many_vpns_every_vpn() -> None:
    rows = frozenset((TABLE_SA, f"v1/s{n}/s{n + 1}") for n in range(1000))
    news = KeyNews.parse(KeyNews("a", frozenset({"v1"}), rows).payload())
    assert news is not None and news.rows is None
    assert news.changes() == {"v1": None}
    many = KeyNews("a", frozenset(f"vpn-{n:05d}" for n in range(2000)))
    news = KeyNews.parse(many.payload())
    assert news is not None and news.changes() is None


def test_news_merge_into_one_reading() -> None:
    one = {"v1": frozenset({(TABLE_SA, "v1/a/b")})}
    two = {"v1": frozenset({(TABLE_SA, "v1/b/a")}), "v2": None}
    assert merge_changes(one, two) == {
        "v1": frozenset({(TABLE_SA, "v1/a/b"), (TABLE_SA, "v1/b/a")}),
        "v2": None,
    }
    assert merge_changes(one, None) is None
    assert merge_changes(two, {"v2": frozenset({(TABLE_SA, "v2/x/y")})})["v2"] is None
