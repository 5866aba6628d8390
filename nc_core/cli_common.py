"""Command-line pieces shared by cevpn-server and cevpn-agent."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from nc_core.schema import Schema, ValidationFailed


def add_validate_command(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    cmd = subparsers.add_parser(
        "validate",
        help="check configuration documents (XML or RFC 7951 JSON) against the served YANG",
        description="Validate instance documents with libyang: types, patterns, ranges, "
        "mandatory, unique, leafref, must and when.  Exit status 1 if any is invalid.",
    )
    cmd.add_argument("documents", nargs="+", type=Path, metavar="FILE")


def run_validate(schema: Schema, documents: list[Path]) -> int:
    status = 0
    for path in documents:
        try:
            schema.parse_config_file(path)
        except ValidationFailed as exc:
            status = 1
            for issue in exc.issues:
                where = f"\n    at {issue.path}" if issue.path else ""
                print(f"{path}: invalid: {issue.message}{where}", file=sys.stderr)
        except (OSError, ValueError) as exc:
            status = 1
            print(f"{path}: {exc}", file=sys.stderr)
        else:
            print(f"{path}: valid")
    return status
