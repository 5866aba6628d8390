"""What common clients send, as they send it, to real cevpn servers over real SSH.

ncclient's documented idioms and the vendor examples built on them (Cisco IOS-XE,
Huawei, Tail-f) put <config> and <filter> in no namespace or declare the base
namespace under a prefix; scrapli writes a newline before its <?xml declaration
and, with its 'system' transport, asks for a pseudo-terminal before starting the
netconf subsystem.  The servers accept these (docs/netconf.md, "Leniencies")
and still refuse what is ambiguous: each test is one behaviour.  The servers'
host keys are pinned.
"""

from __future__ import annotations

import base64
import re

import paramiko
import pytest
from lxml import etree
from ncclient.operations.rpc import RPCError
from ncclient.xml_ import to_ele

from nc_core.framing import Framer
from tests.netconf_server import ADMIN, ServerProcess, ncclient_connect

NC = "urn:ietf:params:xml:ns:netconf:base:1.0"
SVC = "urn:cevpn:yang:cevpn-service"
SYS = "urn:ietf:params:xml:ns:yang:ietf-system"
WD = "urn:ietf:params:xml:ns:yang:ietf-netconf-with-defaults"
NOTIF = "urn:ietf:params:xml:ns:netconf:notification:1.0"
NCN = "urn:ietf:params:xml:ns:yang:ietf-netconf-notifications"
NS = {"s": SVC, "sys": SYS}
XML_DECL = b'<?xml version="1.0" encoding="UTF-8"?>'
HELLO_BODY = (
    f'<hello xmlns="{NC}"><capabilities><capability>urn:ietf:params:netconf:base:BASE'
    "</capability></capabilities></hello>"
)
# Only the account "operator" (the servers also hold "admin" and "viewer").
OPERATOR_ONLY = (
    f'<system xmlns="{SYS}"><authentication><user><name>operator</name></user>'
    "</authentication></system>"
)


def hello(base: str) -> bytes:
    return HELLO_BODY.replace("BASE", base).encode()


@pytest.fixture
def m(server: ServerProcess):  # type: ignore[no-untyped-def]
    with ncclient_connect(server) as session:
        yield session
        # leave running empty of VPNs for the next test
        session.edit_config(
            target="running",
            config=f'<config xmlns="{NC}"><vpn-service xmlns="{SVC}" xmlns:nc="{NC}" '
            'nc:operation="remove"/></config>',
        )


def vpn(vpn_id: str, customer: str = "ACME") -> str:
    return (
        f'<vpn-service xmlns="{SVC}"><vpn><id>{vpn_id}</id><customer>{customer}</customer></vpn>'
        "</vpn-service>"
    )


def vpn_ids(reply_xml: str) -> list[str]:
    return etree.fromstring(reply_xml.encode()).xpath("//s:vpn/s:id/text()", namespaces=NS)


def user_names(reply_xml: str) -> list[str]:
    tree = etree.fromstring(reply_xml.encode())
    return tree.xpath("//sys:authentication/sys:user/sys:name/text()", namespaces=NS)


def error_of(m, operation: str) -> RPCError:  # type: ignore[no-untyped-def]
    with pytest.raises(RPCError) as err:
        m.dispatch(to_ele(operation))
    return err.value


# -- <config> in no namespace, or in the base namespace by prefix ---------------------------


def test_config_with_xmlns_xc_is_applied_and_xc_operation_honoured(either: ServerProcess):
    # The Cisco IOS-XE / Huawei / Tail-f example: <config> in no namespace, the base
    # namespace declared as xc for the operation attribute.
    user = (
        f'<system xmlns="{SYS}"><authentication><user{{op}}><name>idiom</name></user>'
        "</authentication></system>"
    )
    config = f'<config xmlns:xc="{NC}">{{}}</config>'
    with ncclient_connect(either) as m:
        m.edit_config(target="running", config=config.format(user.format(op="")))
        assert "idiom" in user_names(m.get_config("running").data_xml)
        m.edit_config(
            target="running", config=config.format(user.format(op=' xc:operation="delete"'))
        )
        assert "idiom" not in user_names(m.get_config("running").data_xml)


def test_bare_config_without_namespace_is_applied(m):
    m.edit_config(target="running", config=f"<config>{vpn('acme')}</config>")
    assert vpn_ids(m.get_config("running").data_xml) == ["acme"]


def test_config_in_the_base_namespace_by_prefix_is_applied(m):
    m.edit_config(target="running", config=f'<nc:config xmlns:nc="{NC}">{vpn("acme")}</nc:config>')
    assert vpn_ids(m.get_config("running").data_xml) == ["acme"]


def test_copy_config_source_config_without_namespace_is_applied(m):
    # <source> and <config> in no namespace, <candidate/> in the base namespace.
    try:
        m.dispatch(
            to_ele(
                f'<copy-config xmlns="{NC}"><target><candidate/></target>'
                f'<source xmlns=""><config>{vpn("acme")}</config></source></copy-config>'
            )
        )
        assert vpn_ids(m.get_config("candidate").data_xml) == ["acme"]
    finally:
        m.discard_changes()


# -- <filter> in no namespace, and its attributes qualified --------------------------------


def test_string_filter_without_namespace_returns_only_the_filtered_part(either: ServerProcess):
    with ncclient_connect(either) as m:
        reply = m.get_config("running", filter=f'<filter type="subtree">{OPERATOR_ONLY}</filter>')
        assert user_names(reply.data_xml) == ["operator"]


def test_get_with_string_filter_without_namespace_returns_only_the_filtered_part(m):
    m.edit_config(target="running", config=f'<config xmlns="{NC}">{vpn("acme")}</config>')
    m.edit_config(
        target="running", config=f'<config xmlns="{NC}">{vpn("globex", "Globex")}</config>'
    )
    reply = m.get(filter=f'<filter type="subtree">{vpn("globex", "Globex")}</filter>')
    tree = etree.fromstring(reply.data_xml.encode())
    assert vpn_ids(reply.data_xml) == ["globex"]
    assert not tree.xpath("//sys:system", namespaces=NS)


def test_filter_with_xc_type_and_xc_select_is_an_xpath_filter(m):
    m.edit_config(target="running", config=f'<config xmlns="{NC}">{vpn("acme")}</config>')
    m.edit_config(
        target="running", config=f'<config xmlns="{NC}">{vpn("globex", "Globex")}</config>'
    )
    flt = (
        f'<filter xmlns:xc="{NC}" xmlns:s="{SVC}" xc:type="xpath" '
        "xc:select=\"/s:vpn-service/s:vpn[s:customer='Globex']\"/>"
    )
    assert vpn_ids(m.get_config("running", filter=flt).data_xml) == ["globex"]


def test_filter_type_given_both_plain_and_qualified_is_bad_attribute(m):
    err = error_of(
        m,
        f'<get-config xmlns="{NC}"><source><running/></source>'
        f'<filter xmlns:xc="{NC}" type="subtree" xc:type="xpath" xc:select="/"/></get-config>',
    )
    assert err.tag == "bad-attribute"
    assert "<bad-attribute>type</bad-attribute>" in err.info


# -- what stays refused: ambiguity and what is not a parameter --------------------------------


@pytest.mark.parametrize(
    ("name", "operation"),
    [
        (
            "source",
            f'<get-config xmlns="{NC}"><source><running/></source>'
            '<source xmlns=""><candidate/></source></get-config>',
        ),
        (
            "filter",
            f'<get xmlns="{NC}"><filter type="subtree">{OPERATOR_ONLY}</filter>'
            '<filter xmlns="" type="subtree"/></get>',
        ),
        (
            "config",
            f'<edit-config xmlns="{NC}"><target><running/></target>'
            f"<config>{vpn('acme')}</config><config/></edit-config>",
        ),
        (
            "target",
            f'<lock xmlns="{NC}"><target xmlns=""><candidate/></target>'
            '<target xmlns=""><running/></target></lock>',
        ),
        (
            "with-defaults",
            f'<get-config xmlns="{NC}"><source><running/></source>'
            f'<with-defaults xmlns="{WD}">trim</with-defaults>'
            f'<with-defaults xmlns="{WD}">report-all</with-defaults></get-config>',
        ),
        (
            "filter",
            f'<create-subscription xmlns="{NOTIF}"><filter type="subtree"/>'
            '<filter xmlns="" type="subtree"/></create-subscription>',
        ),
        (
            "stream",
            f'<create-subscription xmlns="{NOTIF}"><stream>NETCONF</stream>'
            f'<stream xmlns="{NC}">NETCONF</stream></create-subscription>',
        ),
    ],
    ids=[
        "source-namespaced-and-not",
        "filter-namespaced-and-not",
        "config-twice",
        "target-bare-twice",
        "with-defaults-twice",
        "subscription-filter-notification-namespace-and-none",
        "subscription-stream-notification-and-base-namespace",
    ],
)
def test_a_parameter_given_twice_is_bad_element(m, name: str, operation: str):
    err = error_of(m, operation)
    assert err.tag == "bad-element"
    assert f"<bad-element>{name}</bad-element>" in err.info
    assert vpn_ids(m.get_config("running").data_xml) == []


@pytest.mark.parametrize(
    "operation",
    [
        f'<get-config xmlns="{NC}"><source><running/></source><bogus/></get-config>',
        f'<get xmlns="{NC}"><bogus xmlns=""/></get>',
        f'<commit xmlns="{NC}"><bogus/></commit>',
        f'<discard-changes xmlns="{NC}"><bogus xmlns=""/></discard-changes>',
        f'<create-subscription xmlns="{NOTIF}"><bogus/></create-subscription>',
        f'<create-subscription xmlns="{NOTIF}"><bogus xmlns=""/></create-subscription>',
    ],
    ids=[
        "get-config-namespaced",
        "get-bare",
        "commit-namespaced",
        "discard-changes-bare",
        "create-subscription-namespaced",
        "create-subscription-bare",
    ],
)
def test_an_unknown_parameter_is_unknown_element(m, operation: str):
    err = error_of(m, operation)
    assert err.tag == "unknown-element"
    assert err.type == "protocol"
    assert "<bad-element>bogus</bad-element>" in err.info


# -- <create-subscription> with a string <filter> --------------------------------------------

SESSION_START_ONLY = f'<netconf-session-start xmlns="{NCN}"/>'


@pytest.mark.parametrize(
    "filter_xmlns",
    ["", f' xmlns="{NC}"', f' xmlns="{NOTIF}"'],
    ids=["none", "base", "notification"],
)
def test_subscription_string_filter_selects_the_notifications(
    either: ServerProcess, filter_xmlns: str
):
    # ncclient sends a filter given as a string as written: often in no namespace.
    user = (
        f'<system xmlns="{SYS}"><authentication><user{{op}}><name>listener</name></user>'
        "</authentication></system>"
    )
    config = f'<config xmlns:xc="{NC}">{{}}</config>'
    with ncclient_connect(either) as listener:
        listener.create_subscription(
            filter=f'<filter{filter_xmlns} type="subtree">{SESSION_START_ONLY}</filter>'
        )
        # a config change (filtered out), then a session start (selected) and end (filtered out)
        listener.edit_config(target="running", config=config.format(user.format(op="")))
        with ncclient_connect(either):
            pass
        notif = listener.take_notification(timeout=10)
        assert notif is not None
        assert "netconf-session-start" in notif.notification_xml
        assert listener.take_notification(timeout=2) is None
        listener.edit_config(
            target="running", config=config.format(user.format(op=' xc:operation="delete"'))
        )


# -- framing: whitespace before <?xml, and a pseudo-terminal ---------------------------------


class RawChannel:
    """A session channel of our own, fed raw bytes; the host key is pinned."""

    def __init__(self, server: ServerProcess, *, pty: bool = False) -> None:
        self.transport = paramiko.Transport((server.host, server.port))
        self.transport.start_client(timeout=10)
        key = self.transport.get_remote_server_key()
        if base64.b64encode(key.asbytes()).decode() != server.host_key_b64:
            raise AssertionError("server host key does not match the pinned key")
        self.transport.auth_password(ADMIN[0], ADMIN[1])
        self.chan = self.transport.open_session(timeout=10)
        self.chan.settimeout(20)
        if pty:  # what `ssh -tt ... -s netconf` (scrapli's system transport) asks for
            self.chan.get_pty()

    def netconf(self) -> bytes:
        """Start the netconf subsystem; the server's hello, as received."""
        self.chan.invoke_subsystem("netconf")
        return self.read_until(b"]]>]]>")

    def read_until(self, marker: bytes) -> bytes:
        data = b""
        while marker not in data:
            chunk = self.chan.recv(65536)
            if not chunk:
                break
            data += chunk
        return data

    def close(self) -> None:
        self.transport.close()


def get_config_rpc(message_id: str) -> bytes:
    return (
        f'<rpc message-id="{message_id}" xmlns="{NC}"><get-config><source><running/></source>'
        f'<filter type="subtree">{OPERATOR_ONLY}</filter></get-config></rpc>'
    ).encode()


def chunked(message: bytes) -> bytes:
    return b"\n#%d\n" % len(message) + message + b"\n##\n"


@pytest.mark.parametrize("base", ["1.0", "1.1"])
def test_whitespace_before_the_xml_declaration_is_accepted(either: ServerProcess, base: str):
    raw = RawChannel(either)
    try:
        raw.netconf()
        # scrapli's hello starts with a newline; its base:1.0 messages follow one.
        raw.chan.sendall(b"\n  " + XML_DECL + b"\n" + hello(base) + b"]]>]]>")
        message = b" \r\n\t\n" + XML_DECL + get_config_rpc("idiom-7")
        if base == "1.0":
            raw.chan.sendall(message + b"]]>]]>")
            reply = raw.read_until(b"]]>]]>")
        else:
            raw.chan.sendall(chunked(message))
            reply = raw.read_until(b"\n##\n")
    finally:
        raw.close()
    assert b'message-id="idiom-7"' in reply
    assert b"rpc-error" not in reply
    assert b"<name>operator</name>" in reply


@pytest.mark.parametrize("garbage", [b"x", b"\x0c", b"\n.\n"], ids=["letter", "form-feed", "dot"])
def test_garbage_before_the_xml_declaration_is_malformed_message(
    server: ServerProcess, garbage: bytes
):
    raw = RawChannel(server)
    try:
        raw.netconf()
        raw.chan.sendall(hello("1.1") + b"]]>]]>")
        raw.chan.sendall(chunked(garbage + XML_DECL + get_config_rpc("idiom-8")))
        reply = raw.read_until(b"\n##\n")
    finally:
        raw.close()
    assert b"<error-tag>malformed-message</error-tag>" in reply


def test_pty_then_netconf_subsystem_is_byte_exact(either: ServerProcess):
    plain = RawChannel(either)
    try:
        plain_hello = plain.netconf()
    finally:
        plain.close()
    raw = RawChannel(either, pty=True)
    try:
        server_hello = raw.netconf()
        raw.chan.sendall(hello("1.1") + b"]]>]]>")
        # CR LF inside the message: a terminal would turn CR into LF and break the chunk size.
        raw.chan.sendall(chunked(XML_DECL + b"\r\n" + get_config_rpc("idiom-9") + b"\r\n"))
        framer = Framer(1 << 20)
        framer.switch_to_chunked()
        received = b""
        replies: list[bytes] = []
        while not replies:
            data = raw.chan.recv(65536)
            assert data, "the server closed the channel"
            received += data
            replies = framer.feed(data)
        raw.chan.settimeout(0.5)
        with pytest.raises(TimeoutError):  # nothing after the reply: no echo
            raw.chan.recv(65536)
    finally:
        raw.close()

    def without_session_id(hello_bytes: bytes) -> bytes:
        return re.sub(rb"<session-id>\d+</session-id>", b"", hello_bytes)

    assert without_session_id(server_hello) == without_session_id(plain_hello)
    assert b"\r" not in received
    assert len(replies) == 1 and framer.buffered() == 0
    assert received == chunked(replies[0])
    reply = etree.fromstring(replies[0])
    assert reply.get("message-id") == "idiom-9"
    assert reply.xpath("//sys:user/sys:name/text()", namespaces=NS) == ["operator"]


@pytest.mark.parametrize("request_kind", ["shell", "exec"])
def test_pty_with_shell_or_exec_is_still_refused(server: ServerProcess, request_kind: str):
    raw = RawChannel(server, pty=True)
    try:
        with pytest.raises(paramiko.SSHException):
            if request_kind == "shell":
                raw.chan.invoke_shell()
            else:
                raw.chan.exec_command("id")
    finally:
        raw.close()


def test_pty_with_another_subsystem_is_still_refused(server: ServerProcess):
    raw = RawChannel(server, pty=True)
    try:
        with pytest.raises(paramiko.SSHException):
            raw.chan.invoke_subsystem("sftp")
    finally:
        raw.close()
