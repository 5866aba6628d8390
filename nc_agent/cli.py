"""`cevpn-agent`: the CE agent's command line.

cevpn-agent --state-dir DIR --vpn-netns NAME [--sp-netns NAME] [--listen HOST:PORT]
            [--bootstrap BUNDLE] [--dataplane kernel|none]
cevpn-agent adduser --state-dir DIR NAME [--password-file F] [--key F.pub] [--group G]
cevpn-agent host-key --state-dir DIR                    the host key clients must pin
cevpn-agent validate FILE...                            check documents against the YANG
"""

from __future__ import annotations

import sys
from pathlib import Path

from nc_core.cli_common import add_common_commands, build_parser, run_common_command, run_server
from nc_core.config_file import parse_args
from nc_core.schema import CE_MODULES
from nc_core.transaction import Application


class CeApplication(Application):
    """The cevpn-ce datastore without a data plane: for adduser only."""

    modules = CE_MODULES


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(
        "cevpn-agent",
        "CE agent of cevpn: serves cevpn-ce over NETCONF and applies it to the kernel.",
    )
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
    parser.add_argument(
        "--bootstrap",
        type=Path,
        metavar="BUNDLE",
        help="start from the enrolment bundle of `cevpn-server enrol` (seed 3.2): "
        "pre-configuration, the server's account, pinned keys; the agent then listens on "
        "the bundle's management port unless --listen is given",
    )
    parser.add_argument(
        "--dataplane",
        choices=("kernel", "none"),
        default="kernel",
        help="'none' touches no kernel state: NETCONF and the datastore only, for scale "
        "tests of the VPN server; such an agent never reports a tunnel up",
    )
    add_common_commands(parser.add_subparsers(dest="command", required=False))
    raw = sys.argv[1:] if argv is None else argv
    args = parse_args(parser, argv)

    def offline_app(state_dir: Path) -> Application:
        from nc_agent.application import AgentApplication

        # Validation compiles the kernel's desired state without touching the kernel.
        return AgentApplication(state_dir, None, dataplane="kernel")

    done = run_common_command(args, CE_MODULES, CeApplication, offline_app)
    if done is not None:
        return done
    if args.dataplane == "kernel" and not args.vpn_netns:
        print(
            "cevpn-agent: --vpn-netns is required to serve (the VPN routing space)", file=sys.stderr
        )
        return 2
    if args.state_dir is None:
        print("cevpn-agent: --state-dir is required", file=sys.stderr)
        return 2
    explicit_listen = "listen" in args.configured or any(
        a == "--listen" or a.startswith("--listen=") for a in raw
    )
    if args.bootstrap is not None:
        from nc_agent.bootstrap import BadBundle, apply_bundle
        from nc_core.server import NetconfServer, ServerOptions, StateDirLocked

        try:
            apply_bundle(
                NetconfServer(ServerOptions(state_dir=args.state_dir), CeApplication()),
                args.bootstrap,
            )
        except (BadBundle, StateDirLocked) as exc:
            print(f"cevpn-agent: {exc}", file=sys.stderr)
            return 2
    from nc_agent.application import AgentApplication

    return run_server(
        args,
        lambda: AgentApplication(
            args.state_dir,
            args.vpn_netns,
            args.sp_netns,
            dataplane=args.dataplane,
            follow_management_port=not explicit_listen,
        ),
        "cevpn-agent",
    )
