"""Where a NETCONF server is and how to log in to it: shared by both clients.

The blocking client (nc_core.client, ncclient: the agent's pull and the CLI)
and the asyncio client (nc_core.netconf_client: the VPN server's
southbound) take the same record, so an endpoint built once serves either.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Endpoint:
    """Where a NETCONF server is, the host keys it may present, and how to log in."""

    host: str
    port: int
    host_keys: Sequence[str]
    """OpenSSH public key lines ("ssh-ed25519 AAAA... comment"); at least one."""
    username: str
    key_file: Path
    """The client's private key (OpenSSH or PEM), 0600."""
    timeout: float = 10.0
    call_home: bool = False
    """The server calls us (RFC 8071, nc_core.call_home): never dial ``host``/``port``;
    wait up to ``timeout`` for its call instead."""
    local_address: str | None = None
    """The local address to connect from (None: the system's choice)."""
    extra: dict[str, Any] = field(default_factory=dict)


def host_key_blob(line: str) -> str:
    """The base64 blob of an OpenSSH public key line, checked to be base64."""
    parts = line.split()
    if len(parts) < 2:
        raise ValueError(f"not an OpenSSH public key line: {line!r}")
    base64.b64decode(parts[1], validate=True)
    return parts[1]
