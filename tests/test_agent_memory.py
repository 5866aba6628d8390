"""What a CE agent keeps in memory for a large configuration (issue 17: 1,000 agents of a
999-peer full mesh in farm processes must fit one machine; docs/benchmarks.md).

The lxml and libyang trees are C allocations that tracemalloc does not see; what it
sees is what the server keeps in Python beside them.  The validator's memo kept two
serialised copies of the configuration (the validated document, 0.9 MB at 999 peers,
and each peer's serialised entry, 0.8 MB): it keeps their digests now.
"""

from __future__ import annotations

import gc
import tracemalloc
from copy import deepcopy
from pathlib import Path
from typing import Any

import pytest

from bench.agent_commit_bench import peer
from nc_core import release
from nc_core.datastore import free
from tests.test_document_splice import server_with_peers
from tests.test_shared_candidate import config as ce_config
from tests.test_shared_candidate import peer as ce_peer
from tests.test_validator_memo import CE, configuration, fresh, server  # noqa: F401
from tests.waiting import wait_for

PEERS = 999
MEMO_BOUND = 700_000
"""Bytes tracemalloc may see the validator keep for 999 peers after a whole validation
and a one-peer change: 2.4 MB when it kept serialised copies (measured, with the
schema's own objects), under 0.6 MB since, 0.64 MB with the index of where each key is
(nc_core/list_entries.py: 1 ms less per push)."""


def test_the_validators_memo_of_999_peers_keeps_no_serialised_copies(server: Any) -> None:  # noqa: F811
    validator = fresh(server)
    root = configuration(server, "".join(peer(i) for i in range(PEERS)))
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.take_snapshot()
        first = validator.validate(root)
        canonical = validator.canonical(first)
        changed = deepcopy(canonical)
        prefix = changed.find(f".//{{{CE}}}peer/{{{CE}}}tunnel/{{{CE}}}remote-prefix")
        assert prefix is not None
        prefix.text = "172.31.1.0/24"
        second = validator.validate(changed)  # incremental: the entries are compared
        validator.canonical(second)
        assert validator.counts["changed-entries"] == 1
        for tree in (first, second):
            free(tree)
        del changed, prefix, canonical
        gc.collect()
        kept = tracemalloc.take_snapshot().compare_to(base, "filename")
    finally:
        tracemalloc.stop()
    held = sum(d.size_diff for d in kept if "nc_core" in str(d.traceback))
    assert held < MEMO_BOUND, [(str(d.traceback), d.size_diff) for d in kept[:5]]


def rss_bytes() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_trimming_the_heap_gives_the_pages_freed_between_kept_chunks_back() -> None:
    """What a let-go configuration leaves: free chunks between live ones, which glibc keeps
    resident until asked (the top of the heap alone goes back by itself)."""
    chunks = [bytes(1024) + i.to_bytes(4, "big") for i in range(100_000)]  # malloc, not pymalloc
    kept = chunks[::16]
    del chunks
    gc.collect()
    before = rss_bytes()
    release.trim_heap()
    after = rss_bytes()
    assert before - after > 30 * 2**20, (before, after)
    assert len(kept) == 6250


def test_after_a_large_configurations_commit_an_idle_server_gives_its_free_pages_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trims: list[int] = []
    # Every trim asked for counts (the pace is tests/test_release.py's).
    monkeypatch.setattr(release, "_pacer", release.TrimPacer(every=0, trim=lambda: trims.append(1)))
    for peers, expected in ((40, 0), (400, 1)):
        where = tmp_path / str(peers)
        where.mkdir()
        with server_with_peers(where, peers=peers, spare_keep_seconds=0) as lab:

            def settled(lab: Any = lab) -> bool:  # the idle timer fired, the loop turned
                return bool(lab.run(lambda: lab.server._settle_timer is None))

            wait_for(settled, 10, "settled after loading")
            trims.clear()
            with lab.connect() as m:
                m.edit_config(target="candidate", config=ce_config(ce_peer(1, prefix=1)))
                m.commit()
            wait_for(settled, 10, "settled after the commit")
            assert lab.run(lambda lab=lab: lab.server._spare) is None
            lab.run(lambda: None)  # the loop's next turn: what was let go is freed
        assert len(trims) == expected, (peers, trims)
