"""Firewall rules for integration tests (nftables on this machine): what a NAT or a site's
firewall does to management traffic, without touching anything else."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

HAVE_NFT = Path("/usr/sbin/nft").exists()


@contextmanager
def new_connections_refused(*ports: int) -> Iterator[None]:
    """Drop TCP SYNs to ``ports``; connections already established are untouched."""
    table = f"cevpn_test_{min(ports)}"
    # The SYN itself, not conntrack's "new": a connection conntrack first sees mid-stream
    # (the module loads with the first rule that uses it) counts as new too.
    rules = "".join(f" tcp dport {p} tcp flags & (syn | ack) == syn drop;\n" for p in ports)
    script = (
        f"table inet {table} {{\n chain input {{\n type filter hook input priority -10;\n"
        f"{rules} }}\n}}\n"
    )
    subprocess.run(["nft", "-f", "-"], input=script.encode(), check=True)
    try:
        yield
    finally:
        subprocess.run(["nft", "delete", "table", "inet", table], check=False)
