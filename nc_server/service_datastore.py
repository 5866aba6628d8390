"""The VPN database's NETCONF datastores on the server's storage, and nothing more.

ServiceApplication (nc_server.northbound) adds the controller, the key store
and the provisioning on top of this.  `cevpn-server adduser` needs only the
datastores and YANG validation to add an account, and importing the whole
application costs seconds of CPU on a slow machine (7.5 s in the lab guest).
"""

from __future__ import annotations

from pathlib import Path

from lxml import etree

from nc_core.persistence import DatastorePersistence
from nc_core.schema import SERVICE_MODULES
from nc_core.transaction import Application
from nc_server.storage import SqliteDatastores, Storage, open_storage

LISTENING_FILE = "listening"
"""Where a running server says it listens (host and port), for `cevpn-server enrol`."""


class ServiceDatastore(Application):
    modules = SERVICE_MODULES

    def __init__(self, state_dir: Path, *, database: str | None = None) -> None:
        """``database``: where the VPN database lives (``--database``; see
        nc_server.storage.open_storage), by default SQLite in ``state_dir``."""
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.state_dir = state_dir
        self.storage: Storage = open_storage(database, state_dir)

    def persistence(self, state_dir: Path) -> DatastorePersistence:
        if type(self.storage).__name__ == "PostgresStorage":
            # Running is shared with every server on the database (nc_server.shared_running).
            from nc_server.shared_running import SharedDatastores
            from nc_server.storage_postgresql import PostgresStorage

            assert isinstance(self.storage, PostgresStorage)
            self.datastores: SqliteDatastores = SharedDatastores(self.storage)
        else:
            self.datastores = SqliteDatastores(self.storage)
        return self.datastores

    def state_dir_taken(self) -> None:
        # `listening` tells `cevpn-server enrol` where the running server is; one left by a
        # server killed with -9 would point at nothing.
        (self.state_dir / LISTENING_FILE).unlink(missing_ok=True)

    def initial_configuration(self, root: etree._Element) -> None:
        """A fresh VPN database: the operators' and CEs' rule lists, and the local admin
        account `cevpn-server enrol` uses to reach a running server (its key is made in
        the state directory).  Created here once: an administrator may delete them."""
        from nc_core.users import add_user
        from nc_server import access
        from nc_server.enrolment import LOCAL_ADMIN, LOCAL_ADMIN_KEY, key_pair_file

        access.ensure_rule_lists(root)
        public = key_pair_file(self.state_dir / LOCAL_ADMIN_KEY, LOCAL_ADMIN)
        add_user(root, LOCAL_ADMIN, password=None, public_keys=[public], groups=["admin"])
