"""`make demo`: the main job, end to end, in the User-Mode Linux lab.

Boots a guest kernel with ESP, IP-in-IP, VTI and nftables (../shared/LAB.md),
builds a provider core with five CE routers, their site LANs and an Internet
host, and runs tools/demo_lab.py in it: the VPN server, an OSS creating a VPN
over NETCONF, four CE agents, tunnels, OSPF, pings, a capture of the core, the
Internet gateway, the ingress policy, a fifth site joining and one leaving.
Its output is shown live; the exit status is non-zero if any step failed.

The guest's work directory (logs, captures, report.json) is kept and named at
the end: `CEVPN_DEMO_WORK=DIR` chooses it.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lab.uml import LabUnavailable, run_guest  # noqa: E402

GUEST_SCRIPT = """\
.venv/bin/python -m lab.topology build 5 > $WORK/topology.log 2>&1 || exit 3
ip netns exec pe .venv/bin/python tools/demo_lab.py > /dev/console 2>&1
"""
NOISE = ("SELinux", "mmapper_init", "Failed to initialize ubd", "Halting", "reboot:")


def main() -> int:
    started = time.monotonic()
    work = Path(os.environ.get("CEVPN_DEMO_WORK") or tempfile.mkdtemp(prefix="cevpn-demo-"))
    print("cevpn demo: booting the lab (User-Mode Linux, kernel with ESP/IPIP/VTI/nftables)")

    def show(line: str) -> None:
        if line.strip() and not line.startswith(NOISE):
            print(line, flush=True)

    try:
        result = run_guest(GUEST_SCRIPT, timeout=600, workdir=work, on_line=show)
    except LabUnavailable as exc:
        print(f"cevpn demo: the lab cannot run here: {exc}", file=sys.stderr)
        return 2
    elapsed = time.monotonic() - started
    print(f"\ncevpn demo: {elapsed:.0f} s in all (boot included); logs, captures and "
          f"report.json in {work}")  # fmt: skip
    if result.returncode != 0:
        print(f"cevpn demo: FAILED (exit status {result.returncode})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
