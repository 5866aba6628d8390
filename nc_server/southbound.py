"""The VPN server's NETCONF operations on one CE (southbound), on ncclient.

A change is pushed the way RFC 6241 makes safe for a change that might cut
the management path (seed 3.2: the SP manages the CE over the network it
configures):

1. edit the CE's candidate (after discarding anything left in it);
2. ``<commit><confirmed/><confirm-timeout>T</confirm-timeout><persist>X</persist>``;
3. close that session and open a *new* one: if the change broke the path
   from the server to the CE, this is where it shows;
4. ``<commit><persist-id>X</persist-id>`` confirms.

If step 3 or 4 fails, the CE puts its previous configuration back by itself
after T seconds.  Every call runs in a worker thread (ncclient is blocking)
and reports how long it spent in SSH and in NETCONF exchanges.
"""

from __future__ import annotations

import contextlib
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from lxml import etree
from ncclient.operations.rpc import RPCError as NcRpcError

from nc_core.client import Endpoint, connect
from nc_server.ce_config import CE_NS

T = TypeVar("T")


@dataclass
class Timings:
    """Where the time of one provisioning went (bench and `<get>`)."""

    ssh: float = 0.0
    """TCP + SSH handshake + authentication + NETCONF hello."""
    netconf: float = 0.0
    """Request/reply exchanges."""
    rpcs: int = 0
    sessions: int = 0

    def add(self, other: Timings) -> None:
        self.ssh += other.ssh
        self.netconf += other.netconf
        self.rpcs += other.rpcs
        self.sessions += other.sessions


class CeRefused(Exception):
    """The CE answered with an rpc-error: its configuration was not changed."""

    def __init__(self, message: str, app_tag: str | None = None, path: str | None = None) -> None:
        super().__init__(message)
        self.app_tag = app_tag
        self.path = path


class CeUnreachable(Exception):
    """No NETCONF session could be opened, or it broke."""


class NotConfirmed(Exception):
    """The change was committed but could not be confirmed over a new session: the CE
    rolls back by itself when the confirm timeout expires."""


@dataclass
class Session:
    endpoint: Endpoint
    timings: Timings = field(default_factory=Timings)
    manager: Any = None

    def open(self) -> Session:
        return self.__enter__()

    def close(self) -> None:
        self.__exit__()

    def alive(self) -> bool:
        return self.manager is not None and bool(self.manager.connected)

    def __enter__(self) -> Session:
        started = time.perf_counter()
        try:
            self.manager = connect(self.endpoint)
        except Exception as exc:
            raise CeUnreachable(_describe(exc, self.endpoint)) from None
        finally:
            self.timings.ssh += time.perf_counter() - started
        self.timings.sessions += 1
        return self

    def __exit__(self, *exc: object) -> None:
        if self.manager is not None:
            started = time.perf_counter()
            with contextlib.suppress(Exception):  # the session is over either way
                self.manager.close_session()
            self.manager = None
            self.timings.ssh += time.perf_counter() - started

    def call(self, what: Callable[[Any], T]) -> T:
        started = time.perf_counter()
        try:
            return what(self.manager)
        except NcRpcError as exc:
            raise CeRefused(
                str(exc.message or exc), getattr(exc, "tag", None), getattr(exc, "path", None)
            ) from None
        except Exception as exc:
            raise CeUnreachable(_describe(exc, self.endpoint)) from None
        finally:
            self.timings.netconf += time.perf_counter() - started
            self.timings.rpcs += 1


def _describe(exc: Exception, endpoint: Endpoint) -> str:
    text = str(exc) or type(exc).__name__
    return f"{endpoint.host} port {endpoint.port}: {text}"


PEER_NAMES_FILTER = f'<ce xmlns="{CE_NS}"><peer><name/></peer></ce>'
CE_FILTER = f'<ce xmlns="{CE_NS}"/>'


def present_peers(session: Session) -> list[str]:
    reply = session.call(lambda m: m.get_config("running", filter=("subtree", PEER_NAMES_FILTER)))
    root = reply.data_ele
    return [str(e.text) for e in root.iterfind(f".//{{{CE_NS}}}peer/{{{CE_NS}}}name")]


def read_ce(endpoint: Endpoint) -> tuple[etree._Element | None, Timings]:
    """The CE's running ``<ce>`` (None if it has none)."""
    with Session(endpoint) as session:
        reply = session.call(lambda m: m.get_config("running", filter=("subtree", CE_FILTER)))
        ce = reply.data_ele.find(f"{{{CE_NS}}}ce")
        return (None if ce is None else etree.fromstring(etree.tostring(ce))), session.timings


def push(
    endpoint: Endpoint,
    make_config: Callable[[list[str] | None], etree._Element],
    confirm_timeout: int,
    *,
    needs_peer_list: bool,
    kept: Session | None = None,
    confirm_endpoint: Endpoint | None = None,
) -> tuple[Timings, Session]:
    """Edit, commit confirmed, reconnect, confirm.  ``make_config`` gets the CE's current
    peer names when ``needs_peer_list`` (a full resynchronisation), else None.

    The confirming session stays open and is returned: the next push to the
    same CE starts on it (``kept``), so each push costs one SSH handshake,
    the one that proves the management path still works.  A change that
    moves the CE's management port is confirmed at ``confirm_endpoint``.
    """
    token = secrets.token_hex(16)
    timings = Timings()
    first = kept if kept is not None and kept.alive() else None
    if first is not None:
        first.timings = timings
        try:
            _edit_and_commit(first, make_config, confirm_timeout, token, needs_peer_list)
        except CeUnreachable:
            first.close()
            first = None  # the kept session died (the CE restarted): start afresh
        else:
            first.close()
    if first is None:
        fresh = Session(endpoint, timings).open()
        try:
            _edit_and_commit(fresh, make_config, confirm_timeout, token, needs_peer_list)
        finally:
            fresh.close()
    try:
        second = Session(confirm_endpoint or endpoint, timings).open()
        second.call(lambda m: m.commit(persist_id=token))
    except (CeUnreachable, CeRefused) as exc:
        raise NotConfirmed(
            f"committed but not confirmed ({exc}): the CE rolls back by itself within "
            f"{confirm_timeout} s"
        ) from None
    return timings, second


def _edit_and_commit(
    session: Session,
    make_config: Callable[[list[str] | None], etree._Element],
    confirm_timeout: int,
    token: str,
    needs_peer_list: bool,
) -> None:
    peers = present_peers(session) if needs_peer_list else None
    text = etree.tostring(make_config(peers)).decode()
    session.call(lambda m: m.discard_changes())
    session.call(lambda m: m.edit_config(target="candidate", config=text))
    session.call(lambda m: m.commit(confirmed=True, timeout=str(confirm_timeout), persist=token))
