"""bench/compiler_bench.py runs end to end (it had broken unnoticed when the commit's apply
came to need the NETCONF server it is attached to)."""

from __future__ import annotations

import pytest

from bench import compiler_bench


@pytest.mark.parametrize("added", ["first", "last"])
def test_the_compiler_bench_measures_every_line_at_a_small_size(added: str) -> None:
    result = compiler_bench.measure(12, 1, added)
    assert result.sites == 12
    for line in ("fresh", "add_compile", "add_diff", "server_validate", "server_apply"):
        assert getattr(result, line) > 0, line
    assert "12 add: compile + diff" in " ".join(compiler_bench.report([result]).split())
