"""`cevpn-server`: the SP VPN server's command line.

cevpn-server --state-dir DIR [--listen HOST:PORT]       serve the VPN database and provision CEs
             [--database postgresql://...]              ... in PostgreSQL (default: SQLite in DIR)
             [--southbound-source ADDRESS]              ... dialling CEs from that address
cevpn-server enrol --state-dir DIR SITE [-o FILE]       a CE's pre-configuration bundle (seed 3.2)
cevpn-server adduser --state-dir DIR NAME [--password-file F] [--key F.pub] [--group G]
cevpn-server host-key --state-dir DIR                   the host key clients must pin
cevpn-server validate FILE...                           check documents against the YANG
cevpn-server customer-access NAME --vpn VPN [--user U]  the NACM rules of a customer (print)

Every subcommand taking --state-dir takes --database too (docs/server.md).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path

from nc_core.cli_common import add_common_commands, build_parser, run_common_command, run_server
from nc_core.config_file import parse_args
from nc_core.schema import SERVICE_MODULES

DATABASE_HELP = (
    "where the VPN database lives: a postgresql:// (or postgres://) libpq URI, several "
    "hosts allowed, or sqlite:PATH; default: SQLite in --state-dir, which keeps what is "
    "per server (host key, local files) either way.  Prefer ~/.pgpass or PGPASSFILE to a "
    "password in the URI (a command line is visible to every local user)"
)


def add_database_arguments(
    parser: argparse.ArgumentParser,
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
) -> None:
    """``--database`` on the server and on each subcommand taking ``--state-dir``.

    On a subcommand its default is SUPPRESS: the server's value (from the command
    line before the subcommand, or the --config file's ``database`` key) stands
    unless the subcommand is given its own.
    """
    parser.add_argument("--database", metavar="URL", help=DATABASE_HELP)
    for sub in commands.choices.values():
        if "--state-dir" in sub._option_string_actions:
            sub.add_argument(
                "--database", metavar="URL", default=argparse.SUPPRESS, help=DATABASE_HELP
            )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(
        "cevpn-server",
        "SP VPN server of cevpn: the VPN database (cevpn-service) over NETCONF, "
        "compiled into each CE's configuration and provisioned over NETCONF.",
    )
    commands = parser.add_subparsers(dest="command", required=False)
    add_common_commands(commands)
    enrol = commands.add_parser(
        "enrol",
        help="enrol a site's CE: write its pre-configuration bundle (seed 3.2)",
        description="Generate the CE's SSH host and client keys, pin them in the VPN "
        "database, and write the bundle `cevpn-agent --bootstrap` starts from.  Works "
        "with the server running (through NETCONF, as the local admin account) or stopped.",
    )
    enrol.add_argument("--state-dir", type=Path, required=True)
    enrol.add_argument("site")
    enrol.add_argument("-o", "--output", type=Path, help="bundle file (default: stdout)")
    customer = commands.add_parser(
        "customer-access",
        help="print the <config> giving a customer read access to its own VPNs only",
        description="Print an <edit-config> <config> payload: NACM group customer-NAME "
        "(with --user accounts) and its rule list: read the customer's VPNs (sites, "
        "provisioning state; never keys), nothing else, no operation, no write, no lock, "
        "no other user's events (docs/server.md).  Apply it with any NETCONF client.",
    )
    customer.add_argument("name", help="the customer (group customer-NAME)")
    customer.add_argument("--vpn", action="append", required=True, help="a VPN id (repeatable)")
    customer.add_argument("--user", action="append", default=[], help="an account to add")
    add_database_arguments(parser, commands)
    parser.add_argument(
        "--southbound-source",
        metavar="ADDRESS",
        help="the local address connections to CEs leave from (default: the system's "
        "choice); with several servers it also tells them apart in the CEs' logs",
    )
    args = parse_args(parser, argv)
    if args.command == "customer-access":
        return run_customer_access(args)
    from nc_server.storage import StorageError

    try:
        return run_command(args)
    except StorageError as exc:  # its message never holds the database's password
        print(f"cevpn-server: {exc}", file=sys.stderr)
        return 1


def run_command(args: argparse.Namespace) -> int:
    def make_app():  # type: ignore[no-untyped-def]
        if args.command == "adduser":
            from nc_server.service_datastore import ServiceDatastore

            return ServiceDatastore(args.state_dir, database=args.database)
        from nc_server.northbound import ServiceApplication

        app = ServiceApplication(args.state_dir, database=args.database)
        app.controller.jobs.source_address = getattr(args, "southbound_source", None)
        return app

    def offline_app(state_dir: Path):  # type: ignore[no-untyped-def]
        from nc_server.northbound import ServiceApplication

        return ServiceApplication(state_dir, provisioning=False)

    done = run_common_command(args, SERVICE_MODULES, make_app, offline_app)
    if done is not None:
        return done
    if args.command == "enrol":
        return run_enrol(args)
    return run_server(args, make_app, "cevpn-server")


def run_customer_access(args: argparse.Namespace) -> int:
    from lxml import etree

    from nc_core.xmlutil import NACM_NS, NC_NS, default_ns_element
    from nc_server.access import customer_rule_list

    try:
        rules = customer_rule_list(args.name, args.vpn)
    except ValueError as exc:
        print(f"customer-access: {exc}", file=sys.stderr)
        return 2
    config = default_ns_element(NC_NS, "config")
    nacm = default_ns_element(NACM_NS, "nacm")
    config.append(nacm)
    groups = etree.SubElement(nacm, f"{{{NACM_NS}}}groups")
    group = etree.SubElement(groups, f"{{{NACM_NS}}}group")
    etree.SubElement(group, f"{{{NACM_NS}}}name").text = f"customer-{args.name}"
    for user in args.user:
        etree.SubElement(group, f"{{{NACM_NS}}}user-name").text = user
    nacm.append(rules)
    etree.indent(config, space="  ")
    sys.stdout.write(etree.tostring(config, encoding="unicode") + "\n")
    return 0


def run_enrol(args: argparse.Namespace) -> int:
    from nc_core.server import StateDirLocked

    try:
        document = asyncio.run(_enrol_offline(args.state_dir, args.site, args.database))
    except StateDirLocked:
        try:
            document = _enrol_online(args.state_dir, args.site)
        except Exception as exc:
            print(f"enrol: {exc}", file=sys.stderr)
            return 1
    except (LookupError, ValueError) as exc:
        print(f"enrol: {exc}", file=sys.stderr)
        return 1
    text = json.dumps(document, indent=2) + "\n"
    if args.output is None:
        sys.stdout.write(text)
    else:
        fd = os.open(args.output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(text)
        print(f"bundle for {args.site} written to {args.output} (0600: it holds private keys)")
    return 0


async def _enrol_offline(state_dir: Path, site: str, database: str | None) -> dict[str, object]:
    from nc_core.errors import RpcError
    from nc_core.server import NetconfServer, ServerOptions
    from nc_server.northbound import ServiceApplication

    app = ServiceApplication(state_dir, provisioning=False, database=database)
    server = NetconfServer(ServerOptions(state_dir=state_dir), app)
    await server.load()
    # One turn of the loop: what loading scheduled (the controller's after-commit work,
    # which reads the storage) runs now, not after `stopping` closed the storage.
    await asyncio.sleep(0)
    try:
        view = app.controller.sites.get(site)
        if view is None:
            raise LookupError(f"there is no site {site!r} in the VPN database")
        try:
            bundle = await app.controller.enrol(view.vpn, site)
        except RpcError as exc:
            raise ValueError(exc.message) from None
        return bundle.ce_document()
    finally:
        await app.stopping()
        server.close()


def _enrol_online(state_dir: Path, site: str) -> dict[str, object]:
    from lxml import etree

    from nc_core.client import Endpoint, connect
    from nc_core.transport_ssh import host_key_line
    from nc_core.xmlutil import default_ns_element
    from nc_server.enrolment import LOCAL_ADMIN, LOCAL_ADMIN_KEY, bundle_document_from_xml
    from nc_server.service_datastore import LISTENING_FILE
    from nc_server.service_tree import SVC_NS

    try:
        listening = (state_dir / LISTENING_FILE).read_text().split()
    except FileNotFoundError:
        raise RuntimeError(
            f"a server holds {state_dir} but does not listen yet: try again in a moment"
        ) from None
    host, port = listening[0], int(listening[1])
    if host in ("::", "0.0.0.0", ""):  # noqa: S104 - a wildcard listener: connect locally
        host = "127.0.0.1"
    endpoint = Endpoint(
        host=host,
        port=port,
        host_keys=[host_key_line(state_dir)],
        username=LOCAL_ADMIN,
        key_file=state_dir / LOCAL_ADMIN_KEY,
    )
    manager = connect(endpoint)
    try:
        sites = manager.get(
            filter=(
                "subtree",
                f'<vpn-service xmlns="{SVC_NS}"><vpn><id/><site><id/></site></vpn></vpn-service>',
            )
        ).data_ele
        vpn = None
        for vpn_elem in sites.iter(f"{{{SVC_NS}}}vpn"):
            for site_elem in vpn_elem.iterfind(f"{{{SVC_NS}}}site"):
                if site_elem.findtext(f"{{{SVC_NS}}}id") == site:
                    vpn = vpn_elem.findtext(f"{{{SVC_NS}}}id")
        if vpn is None:
            raise LookupError(f"there is no site {site!r} in the VPN database")
        request = default_ns_element(SVC_NS, "enrol")
        etree.SubElement(request, f"{{{SVC_NS}}}vpn").text = vpn
        etree.SubElement(request, f"{{{SVC_NS}}}site").text = site
        reply = etree.fromstring(manager.dispatch(request).xml.encode())
        bundle = reply.find(f".//{{{SVC_NS}}}bundle")
        if bundle is None:
            raise RuntimeError("the server's answer has no bundle")
        return bundle_document_from_xml(bundle)
    finally:
        manager.close_session()
