"""The netlink requests that create tunnel devices in one batch (nc_agent.dataplane.link_batch),
read back by pyroute2's own decoders: the kernel gets what pyroute2's one-by-one path sent.

(tests/lab/test_links.py runs them against a real kernel.)"""

from __future__ import annotations

import struct
from typing import Any

from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg
from pyroute2.netlink.rtnl.rtmsg import rtmsg

from nc_agent.dataplane.link_batch import (
    NLM_F_CREATE,
    NLM_F_EXCL,
    RTM_NEWADDR,
    RTM_NEWLINK,
    RTM_NEWROUTE,
    batchable,
    configure_messages,
    create_message,
    move_message,
)
from nc_agent.dataplane.links import ROUTE_PROTO, Tunnel

IPIP = Tunnel("cvi0001", "transport-ipip", "198.51.100.2", "198.51.100.6", 1446,
              routes=("10.2.0.0/24", "10.22.0.9/16"), address="10.255.0.1")  # fmt: skip
VTI = Tunnel("cvt0002", "tunnel-mode", "198.51.100.2", "198.51.100.6", 1438, key=0x0CE00002)


def decoded(cls: Any, body: bytes) -> Any:
    header = struct.pack("=IHHII", 16 + len(body), 0, 0, 0, 0)
    message = cls(header + body)
    message.decode()
    return message


def test_an_ip_in_ip_device_is_created_with_its_name_mtu_addresses_and_ttl() -> None:
    kind, flags, body = create_message(IPIP)
    assert (kind, flags) == (RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL)
    link = decoded(ifinfmsg, body)
    assert (link.get_attr("IFLA_IFNAME"), link.get_attr("IFLA_MTU")) == ("cvi0001", 1446)
    info = link.get_attr("IFLA_LINKINFO")
    assert info.get_attr("IFLA_INFO_KIND") == "ipip"
    data = info.get_attr("IFLA_INFO_DATA")
    assert data.get_attr("IFLA_IPIP_LOCAL") == "198.51.100.2"
    assert data.get_attr("IFLA_IPIP_REMOTE") == "198.51.100.6"
    assert data.get_attr("IFLA_IPIP_TTL") == 64


def test_a_vti_device_is_keyed_both_ways_by_the_peers_mark() -> None:
    link = decoded(ifinfmsg, create_message(VTI)[2])
    info = link.get_attr("IFLA_LINKINFO")
    assert info.get_attr("IFLA_INFO_KIND") == "vti"
    data = info.get_attr("IFLA_INFO_DATA")
    assert (data.get_attr("IFLA_VTI_IKEY"), data.get_attr("IFLA_VTI_OKEY")) == (0x0CE00002,) * 2
    assert (data.get_attr("IFLA_VTI_LOCAL"), data.get_attr("IFLA_VTI_REMOTE")) == (
        "198.51.100.2",
        "198.51.100.6",
    )


def test_a_device_is_moved_by_name_into_the_vpn_space() -> None:
    link = decoded(ifinfmsg, move_message("cvi0001", 7)[2])
    assert (link["index"], link.get_attr("IFLA_IFNAME")) == (0, "cvi0001")
    assert link.get_attr("IFLA_NET_NS_FD") == 7


def test_in_the_vpn_space_a_device_comes_up_with_its_address_and_its_own_routes() -> None:
    up, address, *routes = configure_messages(IPIP, 42, ROUTE_PROTO)
    link = decoded(ifinfmsg, up[2])
    assert (link["index"], link["flags"] & 1, link["change"] & 1) == (42, 1, 1)
    assert address[0] == RTM_NEWADDR
    addr = decoded(ifaddrmsg, address[2])
    assert (addr["index"], addr["prefixlen"], addr.get_attr("IFA_LOCAL")) == (42, 32, "10.255.0.1")
    assert [r[0] for r in routes] == [RTM_NEWROUTE, RTM_NEWROUTE]
    got = [decoded(rtmsg, r[2]) for r in routes]
    assert [(r.get_attr("RTA_DST"), r["dst_len"]) for r in got] == [
        ("10.2.0.0", 24),
        ("10.22.0.0", 16),
    ]
    assert {(r["table"], r["proto"], r["scope"], r.get_attr("RTA_OIF")) for r in got} == {
        (254, ROUTE_PROTO, 0, 42)
    }


def test_only_ipv4_devices_go_through_the_batch() -> None:
    assert batchable(IPIP) and batchable(VTI)
    six = Tunnel("cvi0003", "transport-ipip", "2001:db8::1", "2001:db8::2", 1400)
    assert not batchable(six)
