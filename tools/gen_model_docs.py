"""Refresh the `pyang -f tree` blocks in docs/models.md.

Usage: python tools/gen_model_docs.py [--check]
With --check, exit 1 (and change nothing) when the blocks are out of date.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nc_core.schema import CEVPN_YANG_DIR, ietf_module_dirs  # noqa: E402

DOC = ROOT / "docs" / "models.md"
BLOCK = re.compile(r"(<!-- BEGIN tree (?P<mod>[\w-]+) -->\n).*?(<!-- END tree (?P=mod) -->)", re.S)


def tree(module: str) -> str:
    search = ":".join(str(d) for d in [CEVPN_YANG_DIR, *ietf_module_dirs()])
    # cevpn-types has no data nodes: show its groupings instead.
    groupings = ["--tree-print-groupings"] if module == "cevpn-types" else []
    return subprocess.run(
        [sys.executable, "-m", "pyang", "-f", "tree", *groupings, "-p", search,
         str(CEVPN_YANG_DIR / f"{module}.yang")],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip


def render(text: str) -> str:
    return BLOCK.sub(lambda m: f"{m.group(1)}```\n{tree(m.group('mod'))}```\n{m.group(3)}", text)


def main() -> int:
    current = DOC.read_text()
    fresh = render(current)
    if "--check" in sys.argv[1:]:
        if fresh != current:
            print("docs/models.md trees are out of date: run `make docs`")
            return 1
        return 0
    DOC.write_text(fresh)
    return 0


if __name__ == "__main__":
    sys.exit(main())
