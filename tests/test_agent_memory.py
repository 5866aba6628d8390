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
from typing import Any

from bench.agent_commit_bench import peer
from nc_core.datastore import free
from tests.test_validator_memo import CE, configuration, fresh, server  # noqa: F401

PEERS = 999
MEMO_BOUND = 600_000
"""Bytes tracemalloc may see the validator keep for 999 peers after a whole validation
and a one-peer change: 2.4 MB when it kept serialised copies (measured, with the
schema's own objects), under 0.6 MB since."""


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
