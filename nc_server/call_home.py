"""The VPN server's side of NETCONF Call Home (RFC 8071): CEs behind a NAT dial in.

A site whose ``management/connection`` is ``call-home`` has a CE the server
cannot reach; the CE dials ``/vpn-service/server/call-home/port`` instead
(nc_core.call_home has the protocol: the listener, the SSH roles).  This
module is the server's policy around it:

- listen while ``server/call-home`` is configured, where the NETCONF service
  listens;
- know which host key is which call-home site: a caller is identified by its
  pinned host key alone (behind a NAT its address is the NAT's), and a key
  that is not pinned for a call-home site is refused before the server logs
  in;
- hand the connection to the southbound (nc_server.southbound) as the site's
  standing link, then tell the controller the CE is reachable, which pushes
  it at once if it is behind.

With several servers on one database, the call-home CEs whose live links a
server holds (``Southbound.called_sites``) are recorded at each lease renewal,
and a call-home CE is owned by the server it called (nc_server.ownership,
nc_server.leases.winner): a server that is called by a CE another server owns
pushes nothing to it until that one hands it over.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from nc_core.asyncssh_import import asyncssh
from nc_core.call_home import CallHomeListener
from nc_core.endpoint import host_key_blob
from nc_core.netconf_client import KEEPALIVE_COUNT_MAX, KEEPALIVE_INTERVAL
from nc_server.enrolment import SERVER_USERNAME_ON_CE
from nc_server.provisioning import ProvisioningJobs
from nc_server.service_tree import SiteView

log = logging.getLogger("cevpn.server.call-home")

Reachable = Callable[[str, str], None]
"""``(site, address)``: the site's CE called from this address."""


class CallHomeDesk:
    """The call-home listener while configured, the call-home sites' host keys, and what a
    call starts."""

    def __init__(self, jobs: ProvisioningJobs, on_called: Reachable) -> None:
        self.jobs = jobs
        self.on_called = on_called
        self.sites: Mapping[str, SiteView] = {}
        self.keys: dict[str, str] = {}
        """Host key (base64 blob) -> site, for every call-home site."""
        self.listener: CallHomeListener | None = None

    def learn(self, sites: Mapping[str, SiteView]) -> None:
        """The database changed: these are the sites, and their CEs' host keys, from now on."""
        self.sites = sites
        self.keys = {
            host_key_blob(key): site
            for site, view in sites.items()
            if view.call_home
            for key in view.host_keys
        }

    def _identify(self, blob: str) -> str | None:
        return self.keys.get(blob)

    async def listen(self, settings: Mapping[str, Any] | None, host: str) -> None:
        """Accept calls on ``settings['port']`` (again, if it moved), or stop (None).
        Raises OSError when the port cannot be listened on; nothing changed then."""
        if settings is None:
            self.close()
            return
        if self.listener is None:
            self.listener = CallHomeListener(
                username=SERVER_USERNAME_ON_CE,
                key_file=self.jobs.southbound_key,
                identify=self._identify,
                arrived=self._arrived,
                keepalive_interval=KEEPALIVE_INTERVAL,
                keepalive_count_max=KEEPALIVE_COUNT_MAX,
            )
        await self.listener.listen(host, int(settings["port"]))

    async def _arrived(self, site: str, conn: asyncssh.SSHClientConnection) -> None:
        view = self.sites.get(site)
        if view is None or not view.call_home:  # the site changed while it was calling
            conn.close()
            return
        await self.jobs.southbound.called(site, self.jobs.endpoint(view), conn)
        address = self.jobs.southbound.called_from(site)
        if address is not None:
            self.on_called(site, address)

    def close(self) -> None:
        if self.listener is not None:
            self.listener.close()
            self.listener = None
