"""The agent reads the kernel's XFRM state from several worker threads at once (a <get>,
the VPN server's tunnel watcher, metrics): every dump ends, none waits for ever.

Two dumps on the one netlink socket used to skip each other's messages, and one then
waited for ever for an NLMSG_DONE the other had read; the agent could not exit on SIGTERM
(its executor waits for every worker), which failed the lab demo in CI.  This runs on the
host's own XFRM tables (dumps need CAP_NET_ADMIN: root, as CI runs).
"""

from __future__ import annotations

import os
import threading

import pytest

from nc_agent.dataplane.xfrm import Xfrm

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="XFRM dumps need CAP_NET_ADMIN")


def test_dumps_from_several_threads_at_once_all_end() -> None:
    finished: list[int] = []

    with Xfrm(None) as xfrm:

        def dump_repeatedly() -> None:
            for _ in range(200):
                xfrm.dump_sas(owned_only=False)
                xfrm.dump_policies(owned_only=False)
            finished.append(1)

        threads = [threading.Thread(target=dump_repeatedly, daemon=True) for _ in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)  # bounds a broken run only: each thread takes well under 1 s
    assert len(finished) == 6, f"{6 - len(finished)} of 6 threads never got their dump's end"
