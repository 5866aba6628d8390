"""Which reqid (and so which mark and device name) each peer owns, kept across restarts.

Kernel objects are recognised as cevpn's by their reqid (OWNED_REQIDS); a
peer keeps its reqid for as long as it is configured, so a restarted agent
finds its own SAs, policies and devices again instead of flushing and
rebuilding them.  Allocations are made in the transaction's prepare phase
and released by abort; the file is written atomically.
"""

from __future__ import annotations

import json
from pathlib import Path

from nc_agent.dataplane.xfrm import OWNED_REQIDS
from nc_core.datastore import write_atomically


class Allocations:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.reqids: dict[str, int] = {}
        if path.exists():
            data = json.loads(path.read_text())
            self.reqids = {str(k): int(v) for k, v in data.get("reqids", {}).items()}
        self._saved = dict(self.reqids) if path.exists() else None
        """What the file holds (None: no file yet)."""

    def reserve(self, peers: list[str]) -> dict[str, int]:
        """Reqids for every peer, allocating new ones; returns those newly allocated."""
        used = set(self.reqids.values())
        fresh: dict[str, int] = {}
        candidates = (r for r in OWNED_REQIDS[:-1] if r not in used)  # the last: the guard
        for peer in peers:
            if peer in self.reqids:
                continue
            try:
                reqid = next(candidates)
            except StopIteration:
                raise RuntimeError("no free reqid left for a new peer") from None
            self.reqids[peer] = reqid
            fresh[peer] = reqid
        return fresh

    def release(self, peers: list[str]) -> None:
        for peer in peers:
            self.reqids.pop(peer, None)

    def keep_only(self, peers: set[str]) -> None:
        for peer in list(self.reqids):
            if peer not in peers:
                del self.reqids[peer]

    def save(self) -> None:
        """Write the file, unless it holds these allocations already (a commit that adds
        or removes no peer changes none)."""
        if self._saved == self.reqids:
            return
        write_atomically(self.path, json.dumps({"reqids": self.reqids}, indent=1).encode())
        self._saved = dict(self.reqids)
