"""`cevpn-agent`: the CE agent's command line.

cevpn-agent --state-dir DIR [--listen HOST:PORT]        serve cevpn-ce over NETCONF
cevpn-agent adduser --state-dir DIR NAME [--password-file F] [--key F.pub] [--group G]
cevpn-agent host-key --state-dir DIR                    the host key clients must pin
cevpn-agent validate FILE...                            check documents against the YANG
"""

from __future__ import annotations

import argparse
from importlib.metadata import version

from nc_core.cli_common import (
    add_common_commands,
    add_server_arguments,
    run_adduser,
    run_host_key,
    run_server,
    run_validate,
)
from nc_core.schema import CE_MODULES, Schema
from nc_core.transaction import Application


class CeApplication(Application):
    """The cevpn-ce datastore without a data plane: for validate and adduser only."""

    modules = CE_MODULES


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cevpn-agent",
        description="CE agent of cevpn: serves cevpn-ce over NETCONF and applies it to the kernel.",
    )
    parser.add_argument("--version", action="version", version=f"cevpn {version('cevpn')}")
    add_server_arguments(parser)
    parser.add_argument(
        "--vpn-netns",
        metavar="NAME",
        help="network namespace of the VPN routing space (site LAN, tunnel devices)",
    )
    parser.add_argument(
        "--sp-netns",
        metavar="NAME",
        help="network namespace of the SP routing space (default: the agent's own)",
    )
    commands = parser.add_subparsers(dest="command", required=False)
    add_common_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "validate":
        return run_validate(Schema(CE_MODULES), args.documents)
    if args.command == "adduser":
        return run_adduser(args, CeApplication)
    if args.command == "host-key":
        return run_host_key(args)
    if not args.vpn_netns:
        print("cevpn-agent: --vpn-netns is required to serve (the VPN routing space)")
        return 2
    from nc_agent.application import AgentApplication

    return run_server(
        args,
        lambda: AgentApplication(args.state_dir, args.vpn_netns, args.sp_netns),
        "cevpn-agent",
    )
