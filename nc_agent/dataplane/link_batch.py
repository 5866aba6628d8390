"""New tunnel devices in one netlink batch per namespace (nc_agent.dataplane.links).

pyroute2 sends one request and waits for its answer at a time, with a lot of
Python per message: creating a device, finding its index, setting its MTU,
moving it to the VPN space, then finding it again, bringing it up and adding its
route cost ~27 ms per device under the lab's UML kernel (1.3 s of a 50-peer
commit, before charon could be given a single peer).  Here the same requests
for every new device go to the kernel in one ``sendmsg`` per namespace and the
acknowledgements are read back together:

1. SP space: for each device an RTM_NEWLINK that creates it (with its MTU) and an
   RTM_NEWLINK that moves it, by name, into the VPN space;
2. VPN space: one RTM_GETLINK dump for the devices' new indexes, then for each
   device an RTM_NEWLINK bringing it up, its address and its routes.

Only for IPv4 IP-in-IP and VTI devices that do not exist yet (what
``Links.add_many`` is asked for); the idempotent repair of existing devices
stays with pyroute2 (``Links.configure_many``).  The result is the same kernel
state as pyroute2's path: same attributes, routes in the main table with the
agent's protocol and universe scope.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
from collections.abc import Sequence
from typing import Any

from nc_agent.dataplane.netns import create_in

RTM_NEWLINK, RTM_DELLINK, RTM_GETLINK = 16, 17, 18
RTM_NEWADDR, RTM_NEWROUTE = 20, 24
NLM_F_REQUEST, NLM_F_ACK = 0x1, 0x4
NLM_F_REPLACE, NLM_F_EXCL, NLM_F_CREATE, NLM_F_DUMP = 0x100, 0x200, 0x400, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLA_F_NESTED = 0x8000
IFLA_IFNAME, IFLA_MTU, IFLA_LINKINFO, IFLA_NET_NS_FD = 3, 4, 18, 28
IFLA_INFO_KIND, IFLA_INFO_DATA = 1, 2
IFLA_IPTUN_LOCAL, IFLA_IPTUN_REMOTE, IFLA_IPTUN_TTL = 2, 3, 4
IFLA_VTI_IKEY, IFLA_VTI_OKEY, IFLA_VTI_LOCAL, IFLA_VTI_REMOTE = 2, 3, 4, 5
IFA_ADDRESS, IFA_LOCAL = 1, 2
RTA_DST, RTA_OIF = 1, 4
IFF_UP = 0x1
RT_TABLE_MAIN, RTN_UNICAST, RT_SCOPE_UNIVERSE = 254, 1, 0

NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
IFINFOMSG = struct.Struct("=BxHiII")  # family, type, index, flags, change
IFADDRMSG = struct.Struct("=BBBBI")  # family, prefixlen, flags, scope, index
RTMSG = struct.Struct("=BBBBBBBBI")  # family, dst/src len, tos, table, proto, scope, type, flags


class BatchError(Exception):
    """The kernel refused one of the batch's requests: ``errno`` and what was asked."""

    def __init__(self, what: str, errno: int) -> None:
        super().__init__(f"{what}: {os.strerror(errno)}")
        self.what = what
        self.errno = errno
        self.created: list[str] = []
        """Devices of the batch that are in the VPN space (to be removed by the caller)."""


def batchable(tunnel: Any) -> bool:
    """An IPv4 IP-in-IP or VTI device (the only kinds links.py creates)."""
    try:
        return all(
            ipaddress.ip_address(a).version == 4 for a in (tunnel.local, tunnel.remote)
        ) and tunnel.encapsulation in ("transport-ipip", "tunnel-mode")
    except ValueError:
        return False


def _attr(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + b"\0" * (-length % 4)


def _nested(kind: int, *attrs: bytes) -> bytes:
    return _attr(kind | NLA_F_NESTED, b"".join(attrs))


def _u32(value: int) -> bytes:
    return struct.pack("=I", value)


def _v4(address: str) -> bytes:
    return socket.inet_aton(address)


def _name(name: str) -> bytes:
    return _attr(IFLA_IFNAME, name.encode() + b"\0")


def create_message(tunnel: Any) -> tuple[int, int, bytes]:
    """RTM_NEWLINK creating the device in the current (SP) namespace, with its MTU."""
    if tunnel.encapsulation == "transport-ipip":
        kind = b"ipip"
        data = (
            _attr(IFLA_IPTUN_LOCAL, _v4(tunnel.local))
            + _attr(IFLA_IPTUN_REMOTE, _v4(tunnel.remote))
            + _attr(IFLA_IPTUN_TTL, bytes([64]))
        )
    else:
        kind = b"vti"
        key = struct.pack("!I", tunnel.key)
        data = (
            _attr(IFLA_VTI_IKEY, key)
            + _attr(IFLA_VTI_OKEY, key)
            + _attr(IFLA_VTI_LOCAL, _v4(tunnel.local))
            + _attr(IFLA_VTI_REMOTE, _v4(tunnel.remote))
        )
    body = (
        IFINFOMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)
        + _name(tunnel.name)
        + _attr(IFLA_MTU, _u32(tunnel.mtu))
        + _nested(IFLA_LINKINFO, _attr(IFLA_INFO_KIND, kind), _nested(IFLA_INFO_DATA, data))
    )
    return RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL, body


def move_message(name: str, netns_fd: int) -> tuple[int, int, bytes]:
    """RTM_NEWLINK moving an existing device, by name, into another namespace."""
    body = (
        IFINFOMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)
        + _name(name)
        + _attr(IFLA_NET_NS_FD, _u32(netns_fd))
    )
    return RTM_NEWLINK, 0, body


def delete_message(name: str) -> tuple[int, int, bytes]:
    return RTM_DELLINK, 0, IFINFOMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0) + _name(name)


def configure_messages(tunnel: Any, index: int, route_proto: int) -> list[tuple[int, int, bytes]]:
    """Up with its MTU, its /32 address if it has one, and its routes (main table)."""
    out = [
        (
            RTM_NEWLINK,
            0,
            IFINFOMSG.pack(socket.AF_UNSPEC, 0, index, IFF_UP, IFF_UP)
            + _attr(IFLA_MTU, _u32(tunnel.mtu)),
        )
    ]
    if tunnel.address:
        address = _v4(tunnel.address)
        out.append(
            (
                RTM_NEWADDR,
                NLM_F_CREATE | NLM_F_REPLACE,
                IFADDRMSG.pack(socket.AF_INET, 32, 0, 0, index)
                + _attr(IFA_LOCAL, address)
                + _attr(IFA_ADDRESS, address),
            )
        )
    for prefix in sorted({str(ipaddress.ip_network(p, strict=False)) for p in tunnel.routes}):
        net = ipaddress.ip_network(prefix)
        rtmsg = RTMSG.pack(
            socket.AF_INET, net.prefixlen, 0, 0, RT_TABLE_MAIN, route_proto,
            RT_SCOPE_UNIVERSE, RTN_UNICAST, 0,
        )  # fmt: skip
        body = rtmsg + _attr(RTA_DST, net.network_address.packed) + _attr(RTA_OIF, _u32(index))
        out.append((RTM_NEWROUTE, NLM_F_CREATE | NLM_F_REPLACE, body))
    return out


class Rtnl:
    """A NETLINK_ROUTE socket of one namespace that sends requests in batches."""

    def __init__(self, netns: str | None) -> None:
        def create() -> socket.socket:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
            sock.bind((0, 0))
            return sock

        self.sock = create_in(netns, create)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.seq = 0

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Rtnl:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def run(self, requests: Sequence[tuple[int, int, bytes]]) -> list[int]:
        """Send every request (each acknowledged) in one go: the errno of each, 0 if done."""
        first = self.seq + 1
        parts = []
        for kind, flags, body in requests:
            self.seq += 1
            flags |= NLM_F_REQUEST | NLM_F_ACK
            parts.append(NLMSGHDR.pack(16 + len(body), kind, flags, self.seq, 0) + body)
        results: dict[int, int] = {}
        for start in range(0, len(parts), 128):  # acks of a chunk fit the receive buffer
            self.sock.sendall(b"".join(parts[start : start + 128]))
            expected = set(range(first + start, first + min(start + 128, len(parts))))
            while expected:
                data = self.sock.recv(1 << 20)
                for kind, seq, payload in _messages(data):
                    if kind == NLMSG_ERROR and seq in expected:
                        expected.discard(seq)
                        results[seq] = -struct.unpack_from("=i", payload)[0]
        return [results[first + i] for i in range(len(parts))]

    def link_indexes(self) -> dict[str, int]:
        """Every device of the namespace by name (one RTM_GETLINK dump)."""
        self.seq += 1
        seq = self.seq
        body = IFINFOMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)
        flags = NLM_F_REQUEST | NLM_F_DUMP
        self.sock.sendall(NLMSGHDR.pack(16 + len(body), RTM_GETLINK, flags, seq, 0) + body)
        found: dict[str, int] = {}
        while True:
            data = self.sock.recv(1 << 20)
            for kind, mseq, payload in _messages(data):
                if mseq != seq:
                    continue
                if kind == NLMSG_DONE:
                    return found
                if kind == NLMSG_ERROR:
                    raise BatchError("listing devices", -struct.unpack_from("=i", payload)[0])
                if kind == RTM_NEWLINK:
                    index = IFINFOMSG.unpack_from(payload)[2]
                    name = _find_attr(payload, IFINFOMSG.size, IFLA_IFNAME)
                    if name is not None:
                        found[name.rstrip(b"\0").decode()] = index


def _messages(data: bytes) -> list[tuple[int, int, bytes]]:
    out = []
    off = 0
    while off + 16 <= len(data):
        length, kind, _flags, seq, _pid = NLMSGHDR.unpack_from(data, off)
        if length < 16:
            break
        out.append((kind, seq, data[off + 16 : off + length]))
        off += (length + 3) & ~3
    return out


def _find_attr(payload: bytes, offset: int, wanted: int) -> bytes | None:
    while offset + 4 <= len(payload):
        length, kind = struct.unpack_from("=HH", payload, offset)
        if length < 4:
            return None
        if kind & 0x3FFF == wanted:
            return payload[offset + 4 : offset + length]
        offset += (length + 3) & ~3
    return None


def add_tunnels(
    tunnels: Sequence[Any], sp_netns: str | None, vpn_netns: str, route_proto: int
) -> list[str]:
    """Create ``tunnels`` in the SP space, move them into the VPN space and configure
    them there; returns the names of the devices now in the VPN space.

    BatchError on the first refusal (the kernel still ran the requests after it:
    devices created but not moved are deleted again, so the SP space keeps none;
    BatchError.created lists what is in the VPN space)."""
    created: list[str] = []
    with open(f"/run/netns/{vpn_netns}") as target, Rtnl(sp_netns) as sp:
        requests = []
        for tunnel in tunnels:
            requests += [create_message(tunnel), move_message(tunnel.name, target.fileno())]
        results = sp.run(requests)
    failure: BatchError | None = None
    stranded = []
    for i, tunnel in enumerate(tunnels):
        made, moved = results[2 * i], results[2 * i + 1]
        if made == 0 and moved == 0:
            created.append(tunnel.name)
            continue
        if made == 0:
            stranded.append(tunnel.name)
        if failure is None:
            what = (
                f"creating {tunnel.name} ({tunnel.local} -> {tunnel.remote})"
                if made
                else f"moving {tunnel.name} to {vpn_netns}"
            )
            failure = BatchError(what, made or moved)
    if stranded:
        with Rtnl(sp_netns) as sp:
            sp.run([delete_message(name) for name in stranded])
    if failure is None:
        with Rtnl(vpn_netns) as vpn:
            indexes = vpn.link_indexes()
            requests = []
            owners = []
            for tunnel in tunnels:
                for message in configure_messages(tunnel, indexes[tunnel.name], route_proto):
                    requests.append(message)
                    owners.append(tunnel.name)
            for name, err in zip(owners, vpn.run(requests), strict=True):
                if err and failure is None:
                    failure = BatchError(f"configuring {name}", err)
    if failure is not None:
        failure.created = created
        raise failure
    return created
