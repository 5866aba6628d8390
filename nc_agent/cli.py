"""`cevpn-agent`: the CE agent's command line."""

from __future__ import annotations

import argparse
from importlib.metadata import version

from nc_core.cli_common import add_validate_command, run_validate
from nc_core.schema import ce_schema


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cevpn-agent",
        description="CE agent of cevpn: serves cevpn-ce over NETCONF and applies it to the kernel.",
    )
    parser.add_argument("--version", action="version", version=f"cevpn {version('cevpn')}")
    commands = parser.add_subparsers(dest="command", required=True)
    add_validate_command(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "validate":
        return run_validate(ce_schema(), args.documents)
    raise AssertionError(args.command)
