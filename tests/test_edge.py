"""The CE's edge keeps its routing daemon running: a BIRD that dies is started again.

Runs BIRD for real in a throw-away network namespace of this host (BIRD needs
no tunnel to start); skipped where that is impossible (not root, no BIRD).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from nc_agent import edge as edge_module
from nc_agent.edge import Edge
from nc_agent.routing.bird_config import RoutingPlan

BIRD = "/usr/sbin/bird"
pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not Path(BIRD).exists(), reason="needs root and BIRD 2"
)


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"cevpn-edge-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def test_a_routing_daemon_that_dies_is_restarted_with_the_committed_plan(
    netns: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(edge_module, "RESTART_DELAY", 0.2)
    plan = RoutingPlan(router_id="10.9.0.1", announce=("10.9.0.0/24",))

    async def scenario() -> tuple[int, int | None]:
        edge = Edge(tmp_path, netns)
        await edge.bird.apply(plan)
        edge.routing = plan
        first = edge.bird.pid
        assert first is not None
        os.kill(first, signal.SIGKILL)
        for _ in range(100):
            await asyncio.sleep(0.1)
            if edge.bird.running and edge.bird.pid != first:
                break
        second = edge.bird.pid
        await edge.stop()
        return first, second

    first, second = asyncio.run(scenario())
    assert second is not None and second != first
