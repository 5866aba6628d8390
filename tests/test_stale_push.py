"""A push overtaken by a commit is not sent: the CE gets the newer version only.

A full push reads the CE's peer list before it makes its edit.  The CE is
held (SIGSTOP) while that read is on its way, the operator commits a change of
the CE's configuration meanwhile, and the CE is let go: the edit made from the
old target would take a CE that pulls back to an older version, so it is
dropped and the push runs again with the new target.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from tests.controller import SVC_NS, controller, vpn_xml
from tests.waiting import wait_for

pytestmark = pytest.mark.timeout(300)


def test_a_push_overtaken_by_a_commit_is_not_sent_and_the_newer_version_is(
    tmp_path: Path,
) -> None:
    with controller(tmp_path) as ctl:
        ctl.edit(vpn_xml("sable"))
        s1 = ctl.join("sable", "sable-s1", 1, "10.1.0.0/24")
        ctl.join("sable", "sable-s2", 2, "10.2.0.0/24")
        ctl.in_sync("sable-s1", "sable-s2")
        old = ctl.provisioning()["sable-s1"]["applied-version"]
        log = ctl.server.log_path
        confirmed_line = f"CE sable-s1: version {old} committed and confirmed"
        confirmed_before = log.read_text().count(confirmed_line)
        assert s1.proc is not None
        os.kill(s1.proc.pid, signal.SIGSTOP)
        try:
            ctl.rpc(
                f'<resynchronise xmlns="{SVC_NS}"><vpn>sable</vpn><site>sable-s1</site>'
                "</resynchronise>"
            )
            pushing = f"CE sable-s1: pushing version {old}"
            wait_for(lambda: pushing in log.read_text(), 30, "the full push under way")
            ctl.join("sable", "sable-s3", 3, "10.3.0.0/24")  # a new peer for sable-s1
            assert ctl.provisioning()["sable-s1"]["target-version"] != old
        finally:
            os.kill(s1.proc.pid, signal.SIGCONT)
        ctl.in_sync("sable-s1", "sable-s2", "sable-s3")
        assert s1.running_ce()["peers"] == ["sable-s2", "sable-s3"]
        text = log.read_text()
        assert f"CE sable-s1: version {old} superseded before it was sent" in text
        assert text.count(confirmed_line) == confirmed_before
