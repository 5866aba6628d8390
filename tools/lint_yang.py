"""YANG lint gate, run by `make lint` and by tests/test_models.py.

- `pyang --lint` (RFC 8407 rules) must print nothing for any module.
- `pyang --ietf` may print only the three findings that no module outside the
  IETF can avoid: the 'ietf-' name prefix (4.1), the urn:ietf namespace (4.9)
  and the IETF Trust copyright statement (3.1).
- `pyang -f tree` must succeed (docs/models.md shows the trees).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nc_core.schema import CEVPN_YANG_DIR, ietf_module_dirs  # noqa: E402

IETF_ONLY = re.compile(r"RFC 8407: (4\.1|4\.9|3\.1): ")


def modules() -> list[Path]:
    return sorted(CEVPN_YANG_DIR.glob("*.yang"))


def pyang(*args: str) -> str:
    search = ":".join(str(d) for d in [CEVPN_YANG_DIR, *ietf_module_dirs()])
    proc = subprocess.run(
        [sys.executable, "-m", "pyang", "-p", search, *args],
        capture_output=True,
        text=True,
        check=False,
    )
    return (proc.stdout + proc.stderr).strip()


def findings() -> list[str]:
    """Every finding that is not allowed, as printed by pyang."""
    bad: list[str] = []
    for module in modules():
        out = pyang("--lint", str(module))
        bad += [f"--lint: {line}" for line in out.splitlines()]
        out = pyang("--ietf", str(module))
        bad += [f"--ietf: {line}" for line in out.splitlines() if not IETF_ONLY.search(line)]
    return bad


def main() -> int:
    bad = findings()
    for line in bad:
        print(line)
    if bad:
        print(f"{len(bad)} YANG lint finding(s)")
        return 1
    print(f"YANG lint: {len(modules())} modules clean (pyang --lint, --ietf)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
