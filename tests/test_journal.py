"""The datastore journal (nc_core.journal): what a crash at any byte leaves, one sync per
commit, compaction, and taking over an older state directory.

Crashes are simulated by cutting the file at every byte boundary of the records a
commit writes: what a kill -9 or a power cut can leave behind.  The kill -9 tests of
whole servers are in tests/test_persistence.py and tests/test_transactions.py.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from nc_core import journal
from nc_core.journal import JOURNAL_FILE, Journal, read_document, scan


def reopened(state: Path) -> Journal:
    return Journal(state)


def test_a_published_document_is_read_back_after_reopening(tmp_path: Path) -> None:
    j = Journal(tmp_path)
    j.stage("running", b"<data>1</data>")
    j.publish("running")
    j.close()
    assert reopened(tmp_path).read("running") == b"<data>1</data>"


def test_a_staged_document_is_invisible_until_published(tmp_path: Path) -> None:
    j = Journal(tmp_path)
    j.write("running", b"old")
    j.stage("running", b"new")
    assert j.read("running") == b"old"
    assert reopened(tmp_path).read("running") == b"old"  # as after a crash during apply
    j.publish("running")
    assert j.read("running") == b"new" and reopened(tmp_path).read("running") == b"new"


def test_a_discarded_stage_never_becomes_the_document(tmp_path: Path) -> None:
    j = Journal(tmp_path)
    j.write("running", b"old")
    j.stage("running", b"refused")
    j.discard("running")
    j.write("startup", b"other")  # a later sync must not publish it either
    assert reopened(tmp_path).read("running") == b"old"


def test_delete_removes_a_document_for_good(tmp_path: Path) -> None:
    j = Journal(tmp_path)
    j.write("startup", b"s")
    j.delete("startup")
    assert j.read("startup") is None and reopened(tmp_path).read("startup") is None


def test_a_commit_cut_at_any_byte_leaves_the_previous_or_the_new_document(
    tmp_path: Path,
) -> None:
    j = Journal(tmp_path)
    j.write("running", b"<data>before</data>")
    j.close()
    path = tmp_path / JOURNAL_FILE
    committed = path.read_bytes()
    j = Journal(tmp_path)
    j.stage("running", b"<data>after, a little longer</data>")
    j.publish("running")
    j.close()
    full = path.read_bytes()
    for cut in range(len(committed), len(full) + 1):
        path.write_bytes(full[:cut])
        got = Journal(tmp_path).read("running")
        expected = (
            b"<data>after, a little longer</data>" if cut == len(full) else b"<data>before</data>"
        )
        assert got == expected, cut
        # the torn tail was cut: what is left is whole records only
        assert scan(path.read_bytes()).valid_end == path.stat().st_size <= cut


def test_a_corrupted_record_ends_the_journal_there(tmp_path: Path) -> None:
    j = Journal(tmp_path)
    j.write("running", b"first")
    size = (tmp_path / JOURNAL_FILE).stat().st_size
    j.write("running", b"second")
    j.close()
    data = bytearray((tmp_path / JOURNAL_FILE).read_bytes())
    data[size + 20] ^= 0xFF  # inside the second STAGE record
    (tmp_path / JOURNAL_FILE).write_bytes(bytes(data))
    assert Journal(tmp_path).read("running") == b"first"


def test_a_commit_syncs_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    j = Journal(tmp_path)
    j.write("running", b"0")
    calls: list[str] = []
    for name in ("fsync", "fdatasync"):
        real = getattr(os, name)
        monkeypatch.setattr(os, name, lambda fd, _n=name, _r=real: (calls.append(_n), _r(fd))[1])
    j.stage("running", b"1")
    assert calls == []  # staging writes, and does not wait for the disk
    j.publish("running")
    assert calls == ["fdatasync"]


def test_the_journal_is_compacted_once_it_outgrows_its_documents(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(journal, "COMPACT_MIN", 4096)
    j = Journal(tmp_path)
    sizes = []
    for i in range(200):
        j.stage("running", b"x" * 100 + str(i).encode())
        j.publish("running")
        sizes.append((tmp_path / JOURNAL_FILE).stat().st_size)
    assert max(sizes) <= 4096 + 200  # compacted whenever it passed the limit
    assert min(sizes[10:]) < 400  # right after a compaction: one document
    assert reopened(tmp_path).read("running") == b"x" * 100 + b"199"


def test_no_compaction_while_a_document_is_staged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(journal, "COMPACT_MIN", 1)
    j = Journal(tmp_path)
    j.write("running", b"r0")
    j.stage("running", b"r1")
    j.write("startup", b"s" * 100)  # would compact, but the staged offset must survive
    j.publish("running")
    assert reopened(tmp_path).read("running") == b"r1"
    assert reopened(tmp_path).read("startup") == b"s" * 100


def test_an_older_state_directory_is_taken_over_and_its_files_removed(tmp_path: Path) -> None:
    (tmp_path / "running.xml").write_bytes(b"<data>r</data>")
    (tmp_path / "startup.xml").write_bytes(b"<data>s</data>")
    (tmp_path / ".running.xml.staged").write_bytes(b"<data>never committed</data>")
    (tmp_path / "other.xml").write_bytes(b"not ours")
    j = Journal(tmp_path)
    assert j.read("running") == b"<data>r</data>" and j.read("startup") == b"<data>s</data>"
    assert sorted(p.name for p in tmp_path.iterdir()) == [JOURNAL_FILE, "other.xml"]


def test_the_journal_is_readable_by_its_owner_only(tmp_path: Path) -> None:
    Journal(tmp_path).write("running", b"secret")
    assert (tmp_path / JOURNAL_FILE).stat().st_mode & 0o077 == 0


def test_read_document_looks_without_cutting_anything(tmp_path: Path) -> None:
    j = Journal(tmp_path)
    j.write("running", b"committed")
    j.stage("running", b"half")  # as if the writer were in the middle of a commit
    size = (tmp_path / JOURNAL_FILE).stat().st_size
    with (tmp_path / JOURNAL_FILE).open("ab") as f:
        f.write(b"CJ\x00")  # a torn record
    assert read_document(tmp_path, "running") == b"committed"
    assert (tmp_path / JOURNAL_FILE).stat().st_size == size + 3


def test_scan_refuses_a_file_that_is_not_a_journal() -> None:
    with pytest.raises(ValueError):
        scan(b"<data/>")


# -- PATCH records: a large document's change is appended as the bytes that changed --------


def peers_document(count: int, changed: int | None = None) -> bytes:
    """A document the size of a many-peer CE configuration; ``changed`` alters one entry."""
    entries = b"".join(
        b"<peer><name>site-%d</name><prefix>172.16.%d.0/24</prefix></peer>"
        % (i, 99 if i == changed else i % 250)
        for i in range(count)
    )
    return b"<data><ce>" + entries + b"</ce></data>"


def test_a_one_entry_change_of_a_large_document_appends_only_that_entry(tmp_path: Path) -> None:
    j = Journal(tmp_path)
    j.write("running", peers_document(1000))
    size = (tmp_path / JOURNAL_FILE).stat().st_size
    j.stage("running", peers_document(1000, changed=500))
    j.publish("running")
    assert (tmp_path / JOURNAL_FILE).stat().st_size - size < 200
    assert reopened(tmp_path).read("running") == peers_document(1000, changed=500)


def test_patched_commits_are_read_back_in_order_after_reopening(tmp_path: Path) -> None:
    j = Journal(tmp_path)
    j.write("running", peers_document(300))
    for changed in (0, 299, 150, 3):  # at the start, at the end, in the middle
        j.stage("running", peers_document(300, changed=changed))
        j.publish("running")
    j.stage("running", peers_document(301))  # longer
    j.publish("running")
    j.stage("running", peers_document(100))  # shorter: the end is kept, not the middle
    j.publish("running")
    j.close()
    assert reopened(tmp_path).read("running") == peers_document(100)


def test_a_patched_commit_cut_at_any_byte_leaves_the_previous_or_the_new_document(
    tmp_path: Path,
) -> None:
    before, after = peers_document(200), peers_document(200, changed=120)
    j = Journal(tmp_path)
    j.write("running", before)
    j.close()
    path = tmp_path / JOURNAL_FILE
    committed = path.read_bytes()
    j = Journal(tmp_path)
    j.stage("running", after)
    j.publish("running")
    j.close()
    full = path.read_bytes()
    assert len(full) - len(committed) < 200  # a PATCH record, not the whole document
    for cut in range(len(committed), len(full) + 1):
        path.write_bytes(full[:cut])
        got = Journal(tmp_path).read("running")
        assert got == (after if cut == len(full) else before), cut
        assert scan(path.read_bytes()).valid_end == path.stat().st_size <= cut


def test_a_patch_is_applied_only_to_the_document_it_was_written_against(tmp_path: Path) -> None:
    j = Journal(tmp_path)
    j.write("running", peers_document(200))
    base_end = (tmp_path / JOURNAL_FILE).stat().st_size
    j.stage("running", peers_document(200, changed=7))
    j.publish("running")
    j.close()
    tail = (tmp_path / JOURNAL_FILE).read_bytes()[base_end:]
    # The same PATCH and COMMIT records after another base document: they must not apply.
    (tmp_path / "other").mkdir()
    other = Journal(tmp_path / "other")
    other.write("running", peers_document(200, changed=8))
    other.close()
    forged = (tmp_path / "other" / JOURNAL_FILE).read_bytes() + tail
    assert scan(forged).documents["running"] == peers_document(200, changed=8)


def test_patches_are_compacted_into_one_document_after_many_commits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(journal, "COMPACT_PATCHES", 8)
    j = Journal(tmp_path)
    j.write("running", peers_document(200))
    for i in range(20):
        j.stage("running", peers_document(200, changed=i))
        j.publish("running")
    j.close()
    found = scan((tmp_path / JOURNAL_FILE).read_bytes())
    assert found.patches < 8
    assert found.documents["running"] == peers_document(200, changed=19)


# -- COPY records: a document copied, durable with the next sync ---------------------------


def test_a_copy_reads_back_as_the_source_document_after_the_next_sync(tmp_path: Path) -> None:
    j = Journal(tmp_path)
    j.write("running", b"before")
    j.copy("running", "confirmed-commit-rollback")
    j.stage("running", b"after")
    j.publish("running")
    j.close()
    again = reopened(tmp_path)
    assert again.read("confirmed-commit-rollback") == b"before"
    assert again.read("running") == b"after"


def test_a_copy_then_commit_cut_at_any_byte_never_leaves_the_commit_without_the_copy(
    tmp_path: Path,
) -> None:
    """A confirmed commit: its rollback document must be there whenever its change is."""
    before, after = peers_document(200), peers_document(200, changed=3)
    j = Journal(tmp_path)
    j.write("running", before)
    j.close()
    path = tmp_path / JOURNAL_FILE
    committed = path.read_bytes()
    j = Journal(tmp_path)
    j.copy("running", "confirmed-commit-rollback")
    j.stage("running", after)
    j.publish("running")
    j.close()
    full = path.read_bytes()
    seen = set()
    for cut in range(len(committed), len(full) + 1):
        path.write_bytes(full[:cut])
        again = Journal(tmp_path)
        running, rollback = again.read("running"), again.read("confirmed-commit-rollback")
        again.close()
        assert running in (before, after), cut
        assert rollback in (None, before), cut
        if running == after:
            assert rollback == before, cut
        seen.add((running == after, rollback is not None))
    assert seen == {(False, False), (False, True), (True, True)}


def test_a_copy_syncs_nothing_by_itself(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    j = Journal(tmp_path)
    j.write("running", b"0")
    calls: list[str] = []
    for name in ("fsync", "fdatasync"):
        real = getattr(os, name)
        monkeypatch.setattr(os, name, lambda fd, _n=name, _r=real: (calls.append(_n), _r(fd))[1])
    j.copy("running", "confirmed-commit-rollback")
    assert calls == []
