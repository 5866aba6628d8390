"""strongSwan's charon, run by the agent in the CE's SP space and spoken to over VICI only.

One charon per CE agent (../shared/LAB.md): its own strongswan.conf, VICI
socket, pid file and log under ``<state-dir>/ike/``, so several CEs can run
on one machine (the lab runs one per network namespace).  charon's pid file
is hard-wired to /var/run, so it runs in a private mount namespace with
``<state-dir>/ike/run`` bind-mounted over /run; the agent reaches the VICI
socket in that directory through /proc/self/fd, which keeps the socket path
short whatever the state directory's length.

charon is the agent's child: it gets SIGKILL if the agent dies
(PR_SET_PDEATHSIG), so a killed agent never leaves an IKE daemon behind that
nobody supervises; the agent flushes what the dead daemon left in the kernel
before it starts a new one.

Only the plugins cevpn needs are loaded (no stroke, no /etc/ipsec.*), and
logging goes to one file at level 1, which never includes key material.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import vici
from vici.protocol import Message, Packet

from nc_agent.children import die_with_parent, terminate

log = logging.getLogger("cevpn.ike")

CHARON = os.environ.get("CEVPN_CHARON", "/usr/lib/ipsec/charon")
PLUGINS = (
    "random nonce aes sha1 sha2 hmac xcbc gcm openssl pem pkcs1 pkcs8 x509 pubkey "
    "constraints revocation kdf kernel-netlink socket-default vici"
)
VICI_SOCKET = "charon.vici"
EVENTS = ("ike-updown", "child-updown", "ike-rekey", "child-rekey")
LOG_TAIL = 256 << 10
"""How much of the end of charon.log is searched for an IKE_SA's lines."""
LOG_LIMIT = 16 << 20
"""charon.log is moved to charon.log.1 at a start when it is bigger than this."""
PIPELINE = 32
"""VICI requests written before their answers are read (Charon.pipelined)."""


class CharonError(RuntimeError):
    """charon could not be started or refused a command."""


@dataclass(frozen=True)
class CharonSettings:
    """strongswan.conf values the agent derives from its configuration.

    IKEv2 has no DPD timeout of its own: a liveness check is a request that is
    retransmitted until charon gives up.  So the retransmission schedule is
    chosen to give up after the smallest dpd/timeout of the CE's peers; the same
    schedule bounds how long an attempt towards a silent peer takes."""

    retransmit_timeout: float = 150 / 8.125
    retransmit_base: float = 1.5
    retransmit_tries: int = 3

    @classmethod
    def for_dpd_timeout(cls, seconds: float) -> CharonSettings:
        tries, base = 3, 1.5
        total = sum(base**i for i in range(tries + 1))
        return cls(max(0.5, round(seconds / total, 2)), base, tries)


def render_conf(log_file: Path, settings: CharonSettings) -> str:
    return f"""# Written by the cevpn agent; rewritten on every start.
charon {{
    load_modular = no
    load = {PLUGINS}
    install_routes = no
    install_virtual_ip = no
    retransmit_timeout = {settings.retransmit_timeout}
    retransmit_base = {settings.retransmit_base}
    retransmit_tries = {settings.retransmit_tries}
    init_limit_half_open = 0
    cookie_threshold = 100000
    cookie_threshold_ip = 100000
    block_threshold = 100000
    ikesa_table_size = 64
    ikesa_table_segments = 8
    plugins {{
        vici {{
            socket = unix:///run/{VICI_SOCKET}
        }}
    }}
    filelog {{
        cevpn {{
            path = {log_file}
            time_format = %Y-%m-%dT%H:%M:%S
            ike_name = yes
            append = yes
            flush_line = yes
            default = 1
            # packet-by-packet lines would fill the file (a DPD exchange every
            # few seconds per peer); the failure reasons are in the IKE lines
            net = 0
            enc = 0
        }}
    }}
    syslog {{
        daemon {{
            default = -1
        }}
    }}
}}
"""


def text(value: Any) -> str:
    """A VICI value (bytes) as text."""
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _close(session: Any) -> None:
    """Close a VICI session's socket now rather than whenever it is garbage-collected."""
    with contextlib.suppress(OSError):
        session.transport.socket.close()


class Charon:
    """The charon process of one CE and its VICI command session."""

    def __init__(self, state_dir: Path, sp_netns: str | None) -> None:
        self.dir = state_dir / "ike"
        self.run_dir = self.dir / "run"
        self.conf = self.dir / "strongswan.conf"
        self.log_file = self.dir / "charon.log"
        self.sp_netns = sp_netns
        self.proc: asyncio.subprocess.Process | None = None
        self.settings = CharonSettings()
        self._session: Any = None
        self._lock = threading.Lock()
        self._stopping = False
        self.started_at = 0.0

    # -- process ---------------------------------------------------------------

    def _rotate_log(self) -> None:
        """charon appends to its log for ever: at each start keep one older file."""
        with contextlib.suppress(OSError):
            if self.log_file.stat().st_size > LOG_LIMIT:
                os.replace(self.log_file, self.log_file.with_suffix(".log.1"))

    def write_config(self, settings: CharonSettings) -> None:
        """The state directory's ike/ tree and a strongswan.conf for ``settings``."""
        self.settings = settings
        self.run_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)
        if not self.log_file.exists():
            fd = os.open(self.log_file, os.O_CREAT | os.O_WRONLY, 0o600)
            os.close(fd)
        self.conf.write_text(render_conf(self.log_file, settings))
        os.chmod(self.conf, 0o600)

    def reconfigure(self, settings: CharonSettings) -> None:
        """New settings for the running charon (blocking): rewrite and reload."""
        self.write_config(settings)
        self.request("reload-settings")

    def command(self) -> list[str]:
        """How charon is run: in the SP namespace, with ike/run over /run."""
        prefix = ["ip", "netns", "exec", self.sp_netns] if self.sp_netns else []
        return [
            *prefix,
            "unshare", "--mount", "--propagation", "private",
            "sh", "-c", 'mount --bind "$0" /run && exec "$1"', str(self.run_dir), CHARON,
        ]  # fmt: skip

    def environment(self) -> dict[str, str]:
        return dict(os.environ, STRONGSWAN_CONF=str(self.conf))

    def kill_stale(self) -> None:
        """A charon left by an earlier agent run (its pid file is ours): kill it."""
        pid_file = self.run_dir / "charon.pid"
        with contextlib.suppress(OSError, ValueError):
            pid = int(pid_file.read_text().strip())
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
            if comm == "charon":
                os.kill(pid, signal.SIGKILL)
                for _ in range(100):
                    if not Path(f"/proc/{pid}").exists():
                        break
                    time.sleep(0.02)
        with contextlib.suppress(OSError):
            pid_file.unlink()
        with contextlib.suppress(OSError):
            (self.run_dir / VICI_SOCKET).unlink()

    async def start(self, settings: CharonSettings, timeout: float = 30.0) -> None:
        """Start charon (on the event loop's thread: the death signal follows that thread)."""
        self.disconnect()  # a session to an earlier daemon is dead
        self._stopping = False
        await asyncio.to_thread(self.kill_stale)
        self._rotate_log()
        self.write_config(settings)
        out = open(self.dir / "charon.stdout", "ab")  # handed to the child
        try:
            self.proc = await asyncio.create_subprocess_exec(
                *self.command(),
                env=self.environment(),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=asyncio.subprocess.STDOUT,
                preexec_fn=die_with_parent,
            )
        finally:
            out.close()
        self.started_at = time.monotonic()
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.returncode is not None:
                raise CharonError(
                    f"charon exited with status {self.proc.returncode} at start-up "
                    f"(see {self.dir / 'charon.stdout'} and {self.log_file})"
                )
            try:
                await asyncio.to_thread(self._connect)
                return
            except OSError:
                if time.monotonic() > deadline:
                    await self.stop()
                    raise CharonError(
                        f"charon did not open its VICI socket within {timeout:.0f} s"
                    ) from None
                await asyncio.sleep(0.05)

    async def stop(self) -> None:
        self._stopping = True  # a call whose session breaks now must not open another
        self.disconnect()
        proc, self.proc = self.proc, None
        await terminate(proc)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    def lines_of(self, unique_id: str, count: int = 12) -> list[str]:
        """The last ``count`` messages charon logged for one IKE_SA (blocking).

        charon names the IKE_SA in every line (``ike_name = yes``: ``<conn|id>``, or
        ``<id>`` before a connection is chosen); only the end of the file is read."""
        try:
            with self.log_file.open("rb") as f:
                f.seek(max(0, f.seek(0, os.SEEK_END) - LOG_TAIL))
                tail = f.read().decode(errors="replace")
        except OSError:
            return []
        marker = re.compile(rf"<(?:[^|>]*\|)?{re.escape(unique_id)}> (.*)$")
        found = [m.group(1) for line in tail.splitlines() if (m := marker.search(line))]
        return found[-count:]

    # -- VICI ------------------------------------------------------------------

    def open_session(self) -> Any:
        """A new VICI session (blocking)."""
        dirfd = os.open(self.run_dir, os.O_RDONLY | os.O_DIRECTORY)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(f"/proc/self/fd/{dirfd}/{VICI_SOCKET}")
        except OSError:
            sock.close()
            raise
        finally:
            os.close(dirfd)
        return vici.Session(sock)

    def _connect(self) -> None:
        with self._lock:
            if self._session is None:
                self._session = self.open_session()

    def disconnect(self) -> None:
        """End the command session now, without waiting for the call using it.

        The event loop calls this when charon stops or restarts, while a worker thread
        may hold the lock in a VICI request that waits on charon (an ``initiate`` lasts
        as long as the IKE exchange).  Waiting for the lock there froze the whole agent:
        a removed CE did not exit on SIGTERM.  Shutting the socket down ends such a
        request at once with an error; the thread that held it drops the session."""
        session = self._session
        if session is None:
            return
        with contextlib.suppress(OSError):
            session.transport.socket.shutdown(socket.SHUT_RDWR)
        if self._lock.acquire(blocking=False):
            try:
                if self._session is session:
                    self._session = None
                    _close(session)
            finally:
                self._lock.release()

    def call(self, command: Callable[[Any], Any]) -> Any:
        """Run ``command(session)`` on the command session (blocking; one at a time)."""
        with self._lock:
            if self._session is None:
                self._session = self.open_session()
            try:
                return command(self._session)
            except (OSError, vici.exception.SessionException):
                _close(self._session)
                self._session = None
                if not self.running or self._stopping:
                    raise
            # The session broke but charon runs: one more try on a new session.
            self._session = self.open_session()
            return command(self._session)

    def request(self, name: str, message: Mapping[str, Any] | None = None) -> Any:
        """A plain VICI command; CharonError with charon's message when it fails."""

        def run(session: Any) -> Any:
            try:
                return session.request(name, message)
            except vici.exception.CommandException as exc:
                raise CharonError(str(exc).removeprefix("Command failed: ")) from None

        return self.call(run)

    def pipelined(self, requests: list[tuple[str, Mapping[str, Any]]]) -> list[str | None]:
        """Plain VICI commands sent back to back, PIPELINE at a time, before their answers
        are read (blocking): charon handles one session's requests in order, so this is
        the same as one request() after the other without a round trip each (100
        load-conn/load-shared of a 50-peer commit: ~0.15 s under UML).  For each request
        None, or charon's error message."""

        def run(session: Any) -> list[str | None]:
            out: list[str | None] = []
            for start in range(0, len(requests), PIPELINE):
                chunk = requests[start : start + PIPELINE]
                data = b"".join(
                    struct.pack("!I", len(packet)) + packet
                    for packet in (
                        Packet.request(name, Message.serialize(message)) for name, message in chunk
                    )
                )
                session.transport.socket.sendall(data)
                for _ in chunk:
                    response = Packet.parse(session.transport.receive())
                    if response.response_type != Packet.CMD_RESPONSE:
                        raise vici.exception.SessionException(
                            f"unexpected VICI response type {response.response_type}"
                        )
                    answer = Message.deserialize(response.payload)
                    if text(answer.get("success", b"yes")) == "yes":
                        out.append(None)
                    else:
                        out.append(text(answer.get("errmsg", b"failed")))
            return out

        with self._lock:
            if self._session is None:
                self._session = self.open_session()
            try:
                return run(self._session)
            except OSError:
                # Not retried (unlike call()): some of the commands may have been done.
                _close(self._session)
                self._session = None
                raise
            except vici.exception.SessionException as exc:
                _close(self._session)
                self._session = None
                raise CharonError(f"VICI session broken: {exc}") from None

    def streamed(self, name: str, event: str, message: Mapping[str, Any]) -> list[Any]:
        """A streaming VICI command (list-sas, initiate, terminate): its events."""

        def run(session: Any) -> list[Any]:
            try:
                return list(session.streamed_request(name, event, message))
            except vici.exception.CommandException as exc:
                raise CharonError(str(exc).removeprefix("Command failed: ")) from None

        return list(self.call(run))

    def terminate(self, *, ike: str | None = None, ike_id: str | None = None) -> None:
        """Delete the IKE_SAs of connection ``ike``, or the one IKE_SA ``ike_id``, and
        wait until charon has (a delete exchange; CharonError if none matched)."""
        selector = {"ike": ike} if ike is not None else {"ike-id": str(ike_id)}
        self.streamed("terminate", "control-log", {**selector, "timeout": "-1", "loglevel": "-1"})

    def list_sas(self, conn: str | None = None) -> dict[str, list[dict[str, Any]]]:
        """IKE_SAs by connection name (several when both ends initiated)."""
        message = {"ike": conn} if conn else {}
        found: dict[str, list[dict[str, Any]]] = {}
        for entry in self.streamed("list-sas", "list-sa", message):
            for name, sa in entry.items():
                found.setdefault(text(name), []).append(sa)
        return found


class EventListener:
    """A thread registered for charon's events, handing each to ``deliver`` (thread-safe
    callable); ``deliver("closed", {})`` when the session ends."""

    def __init__(self, charon: Charon, deliver: Callable[[str, Any], None]) -> None:
        self.charon = charon
        self.deliver = deliver
        self._stop = threading.Event()
        self._session: Any = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="charon-events", daemon=True)

    def start(self, timeout: float = 10.0) -> None:
        self._thread.start()
        self._ready.wait(timeout)

    def stop(self) -> None:
        self._stop.set()
        if self._session is not None:
            with contextlib.suppress(OSError):
                self._session.transport.socket.shutdown(socket.SHUT_RDWR)

    def _run(self) -> None:
        try:
            self._session = self.charon.open_session()
            for event in EVENTS:
                self._session._register_unregister(event, True)
            self._ready.set()
            while not self._stop.is_set():
                try:
                    packet = Packet.parse(self._session.transport.receive(1.0))
                except TimeoutError:
                    continue
                if packet.response_type == Packet.EVENT:
                    self.deliver(text(packet.event_type), Message.deserialize(packet.payload))
        except Exception as exc:  # the daemon went away: the supervisor restarts it
            if not self._stop.is_set():
                log.debug("charon event session ended: %s", exc)
        finally:
            self._ready.set()
            if not self._stop.is_set():
                self.deliver("closed", {})
