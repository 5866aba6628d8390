"""One identity for every VPN server on one database: the southbound key and the host key.

A CE authorises exactly one client key for the server's account (its
bundle's southbound public key) and pins the server host key its bundle
names.  With several servers on one database any of them may provision a CE
(nc_server.ownership) and a CE may fetch from any of them, so they must all
present the same two keys: the service has one identity, not one per machine.

The first server to start on a database stores its two private keys there
(the storage's ``server-identity`` table, in the same database that already
holds the VPNs' keys); every other server, at start-up, replaces its local
copies (0600, in its state directory, where SSH and the southbound read them)
with the stored ones.  One storage transaction decides, so two servers
starting together cannot both store theirs.  The keys never appear in a log
line: only which key was taken from where.

With SQLite (one server) nothing is stored: the state directory's keys are
the identity, as before.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import asyncssh

from nc_core.datastore import write_atomically
from nc_core.transport_ssh import HOST_KEY_FILE, host_key
from nc_server.enrolment import SOUTHBOUND_KEY_FILE, southbound_key
from nc_server.storage import Storage

log = logging.getLogger("cevpn.server")

TABLE = "server-identity"
KEYS = {
    "southbound-key": (SOUTHBOUND_KEY_FILE, "southbound client key (CEs authorise it)"),
    "host-key": (HOST_KEY_FILE, "SSH host key (CEs and clients pin it)"),
}


def share_identity(storage: Storage, state_dir: Path) -> None:
    """Make the state directory's keys the database's (storing them if the database has
    none yet)."""
    southbound_key(state_dir)  # made here if missing: the first server stores them
    host_key(state_dir)
    with storage.transaction():
        for name, (file_name, what) in KEYS.items():
            path = state_dir / file_name
            local = path.read_bytes()
            stored = storage.get(TABLE, name)
            if stored is None:
                storage.put(TABLE, name, local)
                log.info("identity: this server's %s is now the database's", what)
            elif stored != local:
                _install(path, stored)
                log.info("identity: using the %s stored in the database", what)


def _install(path: Path, private: bytes) -> None:
    """Replace the local key pair by ``private`` (0600) and its public line."""
    key = asyncssh.import_private_key(private)
    write_atomically(path, private)
    os.chmod(path, 0o600)
    public = path.with_suffix(".pub")
    public.write_text(key.export_public_key().decode().strip() + "\n")
