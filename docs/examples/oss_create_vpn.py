#!/usr/bin/env python3
"""An OSS talking to the cevpn VPN server over NETCONF, with ncclient only.

What a provider's OSS does to sell a CE-based VPN (draft-ietf-l3vpn-ce-based-02):
describe the VPN and its sites (seed 3.1), enrol each site's CE (3.2: the
answer is the bundle the CE boots from), add a site later (3.5: the other
CEs are updated by the server, nobody touches them) and remove one (3.6).
Every change goes through the candidate datastore: lock, edit, validate,
commit, unlock -- so a refused change leaves the server exactly as it was.

    oss_create_vpn.py --server 192.0.2.1 --user oss --password-file pw \\
        --host-key AAAAC3NzaC1lZDI1NTE5AAAA... \\
        create acme --customer "ACME Corp" --keying ike --routing ospf \\
        --gateway site-1 --site site-1=198.51.100.2,10.1.0.0/24 \\
        --site site-2=198.51.100.6,10.2.0.0/24
    oss_create_vpn.py ... enrol acme site-1 site-2 -d bundles/
    (create and add-site take --enrol-dir DIR to enrol in the same session)
    oss_create_vpn.py ... add-site acme site-5=198.51.100.18,10.5.0.0/24
    oss_create_vpn.py ... remove-site acme site-2
    oss_create_vpn.py ... status

The host key is pinned (the server prints it: `cevpn-server host-key`); an
rpc-error is printed with its error-tag, error-path and message, and the
script exits non-zero.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from lxml import etree
from ncclient import manager
from ncclient.operations import RPCError

SVC = "urn:cevpn:yang:cevpn-service"
NC = "urn:ietf:params:xml:ns:netconf:base:1.0"


def connect(args: argparse.Namespace) -> Any:
    password = Path(args.password_file).read_text().strip()
    return manager.connect(
        host=args.server,
        port=args.port,
        username=args.user,
        password=password,
        hostkey_verify=True,
        hostkey_b64=args.host_key,
        allow_agent=False,
        look_for_keys=False,
        timeout=120,
    )


def commit(m: Any, body: str) -> None:
    """One change to the VPN database, all or nothing, through the candidate."""
    config = f'<config xmlns="{NC}"><vpn-service xmlns="{SVC}">{body}</vpn-service></config>'
    with m.locked("candidate"):
        m.discard_changes()
        try:
            m.edit_config(target="candidate", config=config)
            m.validate(source="candidate")
            m.commit()
        except RPCError:
            m.discard_changes()
            raise


def site_xml(spec: str, role: str | None = None) -> str:
    """'site-1=198.51.100.2,10.1.0.0/24[,10.1.1.0/24...]' -> a <site> entry."""
    name, _, rest = spec.partition("=")
    address, *prefixes = rest.split(",")
    parts = [f"<id>{name}</id>", f"<ce-address>{address}</ce-address>"]
    if role:
        parts.append(f"<role>{role}</role>")
    parts += [f"<local-prefix>{p}</local-prefix>" for p in prefixes]
    return "<site>" + "".join(parts) + "</site>"


def create(m: Any, args: argparse.Namespace) -> None:
    hubs = set(args.hub or [])
    topology = "hub-and-spoke" if hubs else "full-mesh"
    keying = f"<keying>{args.keying}</keying>"
    if args.keying == "ike":
        keying += (
            f"<security-profile><authentication>{args.authentication}</authentication>"
            "</security-profile>"
        )
    routing = f"<protocol>{args.routing}</protocol>"
    if args.routing == "ospf" and args.ospf_hello:
        routing += f"<ospf-hello-interval>{args.ospf_hello}</ospf-hello-interval>"
    if args.routing == "ospf" and args.ospf_dead:
        routing += f"<ospf-dead-interval>{args.ospf_dead}</ospf-dead-interval>"
    routing = f"<routing>{routing}</routing>"
    timers = f"<tunnel-defaults><dpd><delay>{args.dpd_delay}</delay>"
    timers += f"<timeout>{args.dpd_timeout}</timeout></dpd></tunnel-defaults>"
    sites = ""
    for spec in args.site:
        name = spec.partition("=")[0]
        role = None if not hubs else ("hub" if name in hubs else "spoke")
        sites += site_xml(spec, role)
    gateways = "".join(f"<internet-gateway>{g}</internet-gateway>" for g in args.gateway or [])
    server = ""
    if args.endpoint:
        server = f"<endpoint><address>{args.endpoint}</address></endpoint>"
    if args.unreachable_retry_limit:
        server += (
            f"<unreachable-retry-limit>{args.unreachable_retry_limit}</unreachable-retry-limit>"
        )
    if server:
        server = f"<server>{server}</server>"
    commit(
        m,
        f"{server}<vpn><id>{args.vpn}</id><customer>{args.customer}</customer>"
        f"<topology><type>{topology}</type></topology>{keying}{routing}{timers}"
        f"{gateways}{sites}</vpn>",
    )
    print(f"VPN {args.vpn}: {len(args.site)} sites, {topology}, {args.keying}, {args.routing}")
    if args.enrol_dir:
        enrol_sites(m, args.vpn, [spec.partition("=")[0] for spec in args.site], args.enrol_dir)


def add_site(m: Any, args: argparse.Namespace) -> None:
    commit(m, f"<vpn><id>{args.vpn}</id>{site_xml(args.site, args.role)}</vpn>")
    print(f"VPN {args.vpn}: site {args.site.partition('=')[0]} added")
    if args.enrol_dir:
        enrol_sites(m, args.vpn, [args.site.partition("=")[0]], args.enrol_dir)


def remove_site(m: Any, args: argparse.Namespace) -> None:
    """The remove-site operation (seed 3.6): the server deprovisions the CE, then drops it."""
    rpc = etree.fromstring(
        f'<remove-site xmlns="{SVC}"><vpn>{args.vpn}</vpn><site>{args.site}</site></remove-site>'
    )
    m.dispatch(rpc)
    print(f"VPN {args.vpn}: site {args.site} removed")


def bundle_json(bundle: etree._Element) -> dict[str, Any]:
    """The enrol answer's <bundle> as the JSON document `cevpn-agent --bootstrap` reads.

    The same conversion as nc_server.enrolment.bundle_document_from_xml, kept here
    so that an OSS needs ncclient and lxml only, not the cevpn package."""
    lists = {"endpoint", "host-key", "server-authorized-key", "url-host-key"}
    ints = {"port", "pull-interval", "connect-timeout", "fetch-alarm-after", "orphan-after"}

    def walk(elem: etree._Element) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for child in elem:
            if not isinstance(child.tag, str):
                continue
            name = etree.QName(child).localname
            value: Any = walk(child) if len(child) else (child.text or "")
            if name in ints and isinstance(value, str):
                value = int(value)
            if name in lists:
                out.setdefault(name, []).append(value)
            else:
                out[name] = value
        return out

    return {"cevpn-ce:ce": {"pre-configuration": walk(bundle)}}


def enrol_sites(m: Any, vpn: str, sites: list[str], output_dir: str) -> None:
    """Seed 3.2: a bundle holds the CE's private keys: written 0600, never printed."""
    out_dir = Path(output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for site in sites:
        rpc = etree.fromstring(f'<enrol xmlns="{SVC}"><vpn>{vpn}</vpn><site>{site}</site></enrol>')
        reply = etree.fromstring(m.dispatch(rpc).xml.encode())
        bundle = reply.find(f".//{{{SVC}}}bundle")
        if bundle is None:
            raise SystemExit(f"the server's enrol answer for {site} has no bundle")
        path = out_dir / f"{site}.json"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            json.dump(bundle_json(bundle), out)
        print(f"site {site}: bundle written to {path} (0600)")


def enrol(m: Any, args: argparse.Namespace) -> None:
    enrol_sites(m, args.vpn, args.site, args.output_dir)


def status(m: Any, args: argparse.Namespace) -> None:
    """Each site's provisioning status, as the server sees it."""
    data = m.get(filter=("subtree", f'<vpn-service xmlns="{SVC}"><vpn/></vpn-service>')).data_ele
    ns = {"s": SVC}
    print(f"{'vpn':<10} {'site':<10} {'ce-address':<16} {'provisioning':<14} last-error")
    for vpn in data.iterfind(".//s:vpn", ns):
        for site in vpn.iterfind("s:site", ns):
            print(
                f"{vpn.findtext('s:id', '', ns):<10} {site.findtext('s:id', '', ns):<10} "
                f"{site.findtext('s:ce-address', '', ns):<16} "
                f"{site.findtext('s:provisioning/s:status', '', ns):<14} "
                f"{site.findtext('s:provisioning/s:last-error', '', ns)}"
            )


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--server", required=True, help="the VPN server's address")
    p.add_argument("--port", type=int, default=830)
    p.add_argument("--user", required=True)
    p.add_argument("--password-file", required=True)
    p.add_argument("--host-key", required=True, help="the server's ed25519 host key (base64)")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("create", help="create a VPN with its sites")
    c.add_argument("vpn")
    c.add_argument("--customer", required=True)
    c.add_argument("--site", action="append", required=True, help="NAME=CE-ADDRESS,PREFIX...")
    c.add_argument("--hub", action="append", help="hub-and-spoke: this site is a hub")
    c.add_argument("--keying", choices=["ike", "ikeless"], default="ike")
    c.add_argument(
        "--authentication", choices=["pre-shared-key", "certificate"], default="pre-shared-key"
    )
    c.add_argument("--routing", choices=["none", "ospf"], default="none")
    c.add_argument("--ospf-hello", type=int, help="OSPF hello interval, s (default 10)")
    c.add_argument("--ospf-dead", type=int, help="OSPF dead interval, s (default 40)")
    c.add_argument("--gateway", action="append", help="a site that is an Internet gateway")
    c.add_argument("--dpd-delay", type=int, default=30)
    c.add_argument("--dpd-timeout", type=int, default=150)
    c.add_argument("--endpoint", help="the address the CEs reach the server at")
    c.add_argument("--enrol-dir", help="then enrol every site: write their bundles there")
    c.add_argument(
        "--unreachable-retry-limit", type=int, help="longest wait between pushes to a silent CE"
    )
    a = sub.add_parser("add-site", help="add a site to a VPN")
    a.add_argument("vpn")
    a.add_argument("site", help="NAME=CE-ADDRESS,PREFIX...")
    a.add_argument("--role", choices=["hub", "spoke"])
    a.add_argument("--enrol-dir", help="then enrol the site: write its bundle there")
    r = sub.add_parser("remove-site", help="remove a site (seed 3.6)")
    r.add_argument("vpn")
    r.add_argument("site")
    e = sub.add_parser("enrol", help="enrol sites' CEs: write their bootstrap bundles")
    e.add_argument("vpn")
    e.add_argument("site", nargs="+")
    e.add_argument("-d", "--output-dir", required=True, help="one SITE.json per site")
    sub.add_parser("status", help="every site's provisioning status")
    return p


COMMANDS = {
    "create": create,
    "add-site": add_site,
    "remove-site": remove_site,
    "enrol": enrol,
    "status": status,
}


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        with connect(args) as m:
            COMMANDS[args.command](m, args)
    except RPCError as exc:
        print(
            f"rpc-error: {exc.tag}: {exc.message}" + (f" (at {exc.path})" if exc.path else ""),
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
