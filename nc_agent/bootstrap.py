"""`cevpn-agent --bootstrap BUNDLE`: a CE starts from the bundle its VPN server made (seed 3.2).

The bundle (written by `cevpn-server enrol` or taken from the enrol RPC) is
the CE's pre-configuration.  Before the agent serves anything:
- ``/ce/pre-configuration`` in its running datastore becomes the bundle;
- the VPN server's account (``management/server-username``) is created with
  the server's public key(s) and put in group ``admin``: the server manages
  the CE (seed 3.1);
- the SSH host key becomes the one the server generated and pinned
  (``management/host-private-key``), so the server's first connection is
  already verified;
- the key the agent logs in to the server with is written 0600 next to it.
Applying the same bundle again changes nothing; a new bundle replaces the
pre-configuration and the keys.
"""

from __future__ import annotations

import json
import os
from copy import deepcopy
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from lxml import etree

from nc_core.datastore import free, write_atomically
from nc_core.errors import RpcErrors
from nc_core.server import NetconfServer, lock_state_dir
from nc_core.transport_ssh import HOST_KEY_FILE
from nc_core.users import replace_user
from nc_core.xmlutil import default_ns_element, qn

CE_NS = "urn:cevpn:yang:cevpn-ce"
CLIENT_KEY_FILE = "vpn_server_client_key"


class BadBundle(ValueError):
    """The bundle cannot be used; the message says why."""


def read_bundle(path: Path) -> dict[str, Any]:
    try:
        document = json.loads(path.read_text())
        pre = document["cevpn-ce:ce"]["pre-configuration"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BadBundle(f"{path}: not a cevpn enrolment bundle ({exc})") from None
    if not isinstance(pre, dict):
        raise BadBundle(f"{path}: pre-configuration is not an object")
    return pre


def _write_secret(path: Path, text: str) -> None:
    write_atomically(path, (text if text.endswith("\n") else text + "\n").encode())


def _public_line(private_openssh: str, comment: str) -> str:
    key = serialization.load_ssh_private_key(private_openssh.encode(), password=None)
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    return f"{public.decode()} {comment}"


def apply_bundle(server: NetconfServer, bundle_path: Path) -> None:
    """Put the bundle into the state directory of a server that is not running yet."""
    pre = read_bundle(bundle_path)
    state_dir = server.options.state_dir
    fd = lock_state_dir(state_dir)
    try:
        root = server.stored_running()
        pre_xml = _pre_configuration_xml(server, pre)
        ce = root.find(qn(CE_NS, "ce"))
        if ce is None:
            ce = default_ns_element(CE_NS, "ce")
            root.append(ce)
        old = ce.find(qn(CE_NS, "pre-configuration"))
        if old is not None:
            keep = old.find(qn(CE_NS, "sp-interface"))
            if keep is not None:
                pre_xml.append(deepcopy(keep))
            ce.remove(old)
        ce.insert(0, pre_xml)
        management = pre.get("management", {})
        username = str(management.get("server-username", ""))
        keys = [str(k) for k in management.get("server-authorized-key", [])]
        if not username or not keys:
            raise BadBundle("the bundle names no server account or key")
        replace_user(root, username, keys, ["admin"])
        try:
            server.store_running(root)
        except RpcErrors as exc:
            raise BadBundle(f"{bundle_path}: {exc}") from None
        host_private = management.get("host-private-key")
        if host_private:
            _write_secret(state_dir / HOST_KEY_FILE, str(host_private))
            (state_dir / HOST_KEY_FILE).with_suffix(".pub").write_text(
                _public_line(str(host_private), f"{pre.get('site-id', 'ce')} host") + "\n"
            )
        client = pre.get("vpn-server", {}).get("client-private-key")
        if client:
            _write_secret(state_dir / CLIENT_KEY_FILE, str(client))
    finally:
        os.close(fd)


def _pre_configuration_xml(server: NetconfServer, pre: dict[str, Any]) -> etree._Element:
    document = json.dumps({"cevpn-ce:ce": {"pre-configuration": pre}})
    try:
        tree = server.schema.parse_config(document, "json")
    except Exception as exc:
        raise BadBundle(f"the bundle is not a valid pre-configuration: {exc}") from None
    try:
        text = tree.print_mem("xml", with_siblings=True, pretty=False)
    finally:
        free(tree)
    ce = etree.fromstring(text.encode())
    pre_xml = ce.find(qn(CE_NS, "pre-configuration"))
    assert pre_xml is not None
    return pre_xml
