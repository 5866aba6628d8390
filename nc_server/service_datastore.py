"""The VPN database's NETCONF datastores on the server's storage, and nothing more.

ServiceApplication (nc_server.application) adds the compiler, the key store
and the provisioner on top of this.  `cevpn-server adduser` needs only the
datastores and YANG validation to add an account, and importing the whole
application costs seconds of CPU on a slow machine (7.5 s in the lab guest).
"""

from __future__ import annotations

from pathlib import Path

from nc_core.persistence import DatastorePersistence
from nc_core.schema import SERVICE_MODULES
from nc_core.transaction import Application
from nc_server.storage import SqliteDatastores, SqliteStorage, Storage


class ServiceDatastore(Application):
    modules = SERVICE_MODULES

    def __init__(self, state_dir: Path) -> None:
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.storage: Storage = SqliteStorage.in_state_dir(state_dir)

    def persistence(self, state_dir: Path) -> DatastorePersistence:
        return SqliteDatastores(self.storage)
