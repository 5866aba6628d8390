"""`cevpn-server`: the SP VPN server's command line."""

from __future__ import annotations

import argparse
from importlib.metadata import version

from nc_core.cli_common import add_validate_command, run_validate
from nc_core.schema import service_schema


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cevpn-server",
        description="SP VPN server of cevpn: the VPN database (cevpn-service) over NETCONF.",
    )
    parser.add_argument("--version", action="version", version=f"cevpn {version('cevpn')}")
    commands = parser.add_subparsers(dest="command", required=True)
    add_validate_command(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "validate":
        return run_validate(service_schema(), args.documents)
    raise AssertionError(args.command)
