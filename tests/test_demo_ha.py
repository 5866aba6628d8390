"""`make demo-ha` (tools/demo_ha.py) runs to its end with every check passed, and a
failed check makes it exit non-zero; either way it leaves no process behind.

The demo runs as a subprocess, exactly as `make demo-ha` runs it: real PostgreSQL
(a primary and a synchronous standby), two real servers, real agents without a data
plane.  The failing run is a real failure, not a simulated one: the primary is killed
and the standby never promoted (``--no-promotion``), so the server cannot reconnect.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "tools" / "demo_ha.py"

CHECKS = [
    "✓ the standby streams synchronously",
    "✓ B took the service's identity from the database",
    "✓ the operator account made once is accepted by both servers",
    "CEs enrolled on A; each bundle lists both servers' endpoints",
    "✓ B's running holds the VPN and its sites too",
    "✓ mid-provisioning: some CEs in-sync, some not yet",
    "✓ server A (pid",
    "CEs in-sync as read from B",
    "✓ each CE's own running holds every other site as a peer",
    "in-sync, s07 included",
    "✓ every CE learnt of the new site",
    "✓ commits made while no database accepts writes are refused",
    "✓ the standby accepts writes",
    "✓ B reconnected by itself",
    "acknowledged commits in B's running",
    "acknowledged commits in the database (the promoted standby)",
    "✓ every CE in-sync after the failover",
    "✓ A's running holds every acknowledged commit and every site",
    "✓ A reports all 7 CEs in-sync",
    "✓ a commit on the restarted A is seen on B",
]


def run_demo(work: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(DEMO), "--work", str(work), *args],
        capture_output=True,
        text=True,
        timeout=400,
        cwd=ROOT,
    )


def leftovers(work: Path, output: str) -> list[str]:
    """Processes still running that the demo started: servers and agent farms (their
    command lines name the work directory) and the PostgreSQL clusters (their ports)."""
    ports = re.findall(r"(?:primary|standby) 127\.0\.0\.1:(\d+)", output)
    marks = [str(work), *(f"port={port} " for port in ports)]
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if any(mark in cmdline for mark in marks):
            found.append(f"{proc.name}: {cmdline}")
    return found


def test_the_demo_passes_every_check_and_stops_everything(tmp_path: Path) -> None:
    work = tmp_path / "demo"
    done = run_demo(work, "--sites", "6")
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    for line in CHECKS:
        assert line in output, f"{line!r} not in:\n{output}"
    assert "✗" not in output, output
    assert re.search(r"every check passed in \d+ s", output), output
    assert not leftovers(work, output), output


def test_a_failed_check_makes_the_demo_exit_non_zero_and_stop_everything(
    tmp_path: Path,
) -> None:
    work = tmp_path / "demo"
    done = run_demo(work, "--sites", "2", "--no-promotion")
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    assert "✗ B reconnected by itself" in output, output
    assert "FAILED after" in output, output
    assert "✓ B reconnected by itself" not in output, output
    assert not leftovers(work, output), output
