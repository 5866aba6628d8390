"""`cevpn-server`: the SP VPN server's command line.

cevpn-server --state-dir DIR [--listen HOST:PORT]       serve cevpn-service over NETCONF
cevpn-server adduser --state-dir DIR NAME [--password-file F] [--key F.pub] [--group G]
cevpn-server host-key --state-dir DIR                   the host key clients must pin
cevpn-server validate FILE...                           check documents against the YANG
"""

from __future__ import annotations

from nc_core.cli_common import add_common_commands, build_parser, run_common_command, run_server
from nc_core.schema import SERVICE_MODULES
from nc_core.transaction import Application


class ServiceApplication(Application):
    """The VPN database served as a datastore; the controller logic joins it in nc_server."""

    modules = SERVICE_MODULES


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(
        "cevpn-server",
        "SP VPN server of cevpn: the VPN database (cevpn-service) over NETCONF.",
    )
    add_common_commands(parser.add_subparsers(dest="command", required=False))
    args = parser.parse_args(argv)
    done = run_common_command(args, SERVICE_MODULES, ServiceApplication)
    if done is not None:
        return done
    return run_server(args, ServiceApplication, "cevpn-server")
