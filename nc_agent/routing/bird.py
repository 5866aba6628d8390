"""BIRD 2, run by the agent in the CE's VPN space and spoken to on its control socket.

One BIRD per CE agent: its own bird.conf, log, pid file and control socket
under ``<state-dir>/routing/`` (directory 0700, configuration and log 0600), so
several CEs can run on one machine (the lab runs one per network namespace).
BIRD runs in the VPN space (``ip netns exec``) and nowhere else: the routes it
learns and announces stay there (seed 4).

The control socket is named relatively, ``bird.ctl``, and BIRD runs with
``<state-dir>/routing`` as its working directory: a Unix socket path is limited
to 107 bytes, and the agent's state directory may be longer than that allows.
The agent reaches it through the directory's descriptor and speaks BIRD's CLI
protocol itself (what birdc relays), for queries and reconfigurations alike.
By hand: ``cd <state-dir>/routing && birdc -s bird.ctl``.

BIRD is the agent's child: it gets SIGKILL if the agent dies (PR_SET_PDEATHSIG,
as charon does), so a killed agent never leaves a routing daemon behind that
nobody supervises.  A daemon that died that way leaves its pid file and its
kernel routes (``proto bird``): the next start, or apply(None), removes both.

A reconfiguration is all or nothing: the new file is handed to the running
BIRD as ``configure "bird.conf.new"``, so BIRD's own parser judges it; only
when BIRD accepted it does it replace bird.conf, and a refused one leaves the
previous configuration running (BIRD keeps it on a parse error).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

from nc_agent.children import die_with_parent, terminate
from nc_agent.routing.bird_config import PROTOCOL_NAME, RoutingPlan, reaches_kernel, render

log = logging.getLogger("cevpn.routing")

BIRD = os.environ.get("CEVPN_BIRD", "/usr/sbin/bird")
CONTROL_SOCKET = "bird.ctl"
"""Relative to the routing directory (BIRD's and birdc's working directory)."""
LOG_LIMIT = 16 << 20
"""bird.log is moved to bird.log.1 at a start when it is bigger than this."""
COMMAND_TIMEOUT = 15.0
"""birdc normally answers at once; a reconfiguration is synchronous up to its parse."""
ACCEPTED = {3, 4, 5}
"""birdc 'configure' replies that mean the configuration was taken: Reconfigured,
Reconfiguration in progress, Reconfiguration already in progress, queueing."""


class RoutingError(RuntimeError):
    """BIRD could not be started, or refused a command (the message is BIRD's)."""


@dataclass(frozen=True)
class Neighbor:
    """An OSPF neighbour as BIRD sees it (``show ospf neighbors``)."""

    router_id: str
    priority: int
    state: str
    """For example 'Full/PtP' (adjacent), 'Init/PtP', 'ExStart/PtP'."""
    interface: str
    address: str


def reply_lines(output: str) -> list[tuple[int, str]]:
    """birdc -v output as (reply code, text), continuation lines carrying their code.

    BIRD's CLI protocol: ``DDDD-text`` (more follows), ``DDDD text`` (last line),
    `` text`` (continuation of the previous code)."""
    lines: list[tuple[int, str]] = []
    code = 0
    for line in output.splitlines():
        m = re.match(r"(\d{4})[ -](.*)$", line)
        if m:
            code = int(m.group(1))
            lines.append((code, m.group(2)))
        elif line.startswith(" "):
            lines.append((code, line[1:]))
        elif line.strip():  # birdc's own messages ("Unable to connect ...")
            lines.append((-1, line))
    return lines


def failure(output: str) -> str | None:
    """The error in a birdc reply (codes 8000-9999, or birdc's own), None if none."""
    errors = [text.strip() for code, text in reply_lines(output) if code >= 8000 or code < 0]
    return "; ".join(errors) or None


_NEIGHBOR = re.compile(r"(\S+)\s+(\d+)\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)")


def _complete(reply: bytes) -> bool:
    """Whether a CLI reply has its last line: ``DDDD text`` (a space after the code)."""
    if not reply.endswith(b"\n"):
        return False
    last = reply.rstrip(b"\n").rpartition(b"\n")[2]
    return re.match(rb"\d{4} ", last) is not None


def parse_neighbors(output: str) -> list[Neighbor]:
    """The neighbours in ``birdc -v show ospf neighbors`` output (code 1013 rows)."""
    found = []
    for code, text in reply_lines(output):
        m = _NEIGHBOR.fullmatch(text.strip())
        if code != 1013 or not m:
            continue
        try:
            ipaddress.IPv4Address(m.group(1))
        except ValueError:
            continue  # the header row
        found.append(Neighbor(m.group(1), int(m.group(2)), m.group(3), m.group(5), m.group(6)))
    return found


def parse_routes(output: str) -> list[str]:
    """The prefixes in ``birdc -v show route ...`` output, once each, in BIRD's order."""
    found: list[str] = []
    for code, text in reply_lines(output):
        words = text.split()
        if code != 1007 or not words:
            continue
        try:
            prefix = str(ipaddress.ip_network(words[0]))
        except ValueError:
            continue  # "Table master4:", next-hop lines
        if prefix not in found:
            found.append(prefix)
    return found


def _own_group_dying_with_parent() -> None:
    """BIRD's own process group (a signal to the agent's group, e.g. a service manager's
    SIGTERM, must not stop it behind the agent's back: the agent stops it itself), and
    SIGKILL when the agent dies."""
    os.setpgid(0, 0)
    die_with_parent()


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write(text)


class Bird:
    """The BIRD process of one CE, in its VPN space."""

    def __init__(self, state_dir: Path, vpn_netns: str) -> None:
        self.dir = state_dir / "routing"
        self.conf = self.dir / "bird.conf"
        self.new_conf = self.dir / "bird.conf.new"
        self.log_file = self.dir / "bird.log"
        self.stdout_file = self.dir / "bird.stdout"
        self.pid_file = self.dir / "bird.pid"
        self.socket = self.dir / CONTROL_SOCKET
        self.vpn_netns = vpn_netns
        self.proc: asyncio.subprocess.Process | None = None
        self.plan: RoutingPlan | None = None
        """The plan the running daemon has (None: not running)."""
        self.on_exit: Callable[[int], None] | None = None
        """Called with the exit status when BIRD ends without stop() (a crash):
        the caller decides whether to start it again."""
        self.started_at = 0.0
        self._lock = asyncio.Lock()
        self._watcher: asyncio.Task[None] | None = None

    # -- files -------------------------------------------------------------------

    def _prepare_dir(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)
        if not self.log_file.exists():  # BIRD would create it world-readable
            os.close(os.open(self.log_file, os.O_CREAT | os.O_WRONLY, 0o600))

    def _rotate_log(self) -> None:
        """BIRD appends to its log for ever: at each start keep one older file."""
        with contextlib.suppress(OSError):
            if self.log_file.stat().st_size > LOG_LIMIT:
                os.replace(self.log_file, self.log_file.with_suffix(".log.1"))

    # -- process -----------------------------------------------------------------

    def command(self) -> list[str]:
        """How BIRD is run: in the VPN namespace, in the foreground (it stays our child)."""
        return [
            "ip", "netns", "exec", self.vpn_netns,
            BIRD, "-f", "-c", str(self.conf), "-s", CONTROL_SOCKET, "-P", str(self.pid_file),
        ]  # fmt: skip

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    @property
    def pid(self) -> int | None:
        """BIRD's pid (``ip netns exec`` execs it, so the child is BIRD itself)."""
        return self.proc.pid if self.proc is not None and self.running else None

    def kill_stale(self) -> None:
        """A BIRD left by an earlier agent run (its pid file is ours): kill it, and
        remove the routes it left in the VPN space (blocking)."""
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return  # BIRD removes its pid file when it ends cleanly (and its routes)
        with contextlib.suppress(OSError):
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if Path(f"/proc/{pid}/comm").read_text().strip() == "bird" and (
                os.fsencode(self.conf) in cmdline
            ):
                os.kill(pid, signal.SIGKILL)
                for _ in range(100):
                    if not Path(f"/proc/{pid}").exists():
                        break
                    time.sleep(0.02)
        for leftover in (self.pid_file, self.socket):
            with contextlib.suppress(OSError):
                leftover.unlink()
        # A killed BIRD cannot withdraw its kernel routes; proto bird is only ever its.
        flushed = subprocess.run(
            ["ip", "-n", self.vpn_netns, "route", "flush", "proto", "bird"],
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT,
            check=False,
        )
        if flushed.returncode != 0:
            log.warning("could not flush BIRD's leftover routes: %s", flushed.stderr.strip())

    async def start(self, plan: RoutingPlan, timeout: float = 30.0) -> None:
        """Start BIRD with ``plan`` (on the event loop's thread: the death signal follows
        the thread that made the child)."""
        async with self._lock:
            await self._start(plan, timeout)

    async def _start(self, plan: RoutingPlan, timeout: float) -> None:
        await self._stop()
        await asyncio.to_thread(self.kill_stale)
        self._prepare_dir()
        self._rotate_log()
        _write_private(self.new_conf, render(plan, self.log_file))
        await self._check(self.new_conf)
        os.replace(self.new_conf, self.conf)
        fd = os.open(self.stdout_file, os.O_CREAT | os.O_WRONLY | os.O_APPEND, 0o600)
        os.fchmod(fd, 0o600)
        out = os.fdopen(fd, "ab")  # handed to the child
        seen = out.seek(0, os.SEEK_END)
        try:
            proc = await asyncio.create_subprocess_exec(
                *self.command(),
                cwd=self.dir,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=asyncio.subprocess.STDOUT,
                preexec_fn=_own_group_dying_with_parent,
            )
        finally:
            out.close()
        self.proc = proc
        self.started_at = time.monotonic()
        deadline = self.started_at + timeout
        while not await self._answers():
            if proc.returncode is not None:
                self.proc = None
                said = self._stdout_since(seen) or f"see {self.log_file}"
                raise RoutingError(f"BIRD exited with status {proc.returncode} at start: {said}")
            if time.monotonic() > deadline:
                await self._stop()
                raise RoutingError(f"BIRD did not open its control socket within {timeout:.0f} s")
            await asyncio.sleep(0.05)
        self.plan = plan
        self._watcher = asyncio.create_task(self._watch(proc))
        log.info("BIRD started in %s (pid %d)", self.vpn_netns, proc.pid)

    async def _check(self, conf: Path) -> None:
        """BIRD's parse-only run on ``conf``: a refused file is removed, never installed."""
        status, output = await self._run(BIRD, "-p", "-c", str(conf))
        if status != 0:
            with contextlib.suppress(OSError):
                conf.unlink()
            said = output.strip().removeprefix("bird: ")
            raise RoutingError(f"BIRD refused the configuration: {said}")

    def _stdout_since(self, offset: int) -> str:
        """What BIRD printed (a parse error at start goes there) since ``offset``."""
        try:
            with self.stdout_file.open("rb") as f:
                f.seek(offset)
                return f.read(4096).decode(errors="replace").strip()
        except OSError:
            return ""

    @contextlib.asynccontextmanager
    async def _control(self) -> AsyncIterator[socket.socket]:
        """BIRD's control socket, connected through the directory's descriptor (whatever
        the length of its path), non-blocking for the event loop."""
        loop = asyncio.get_running_loop()
        dirfd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, f"/proc/self/fd/{dirfd}/{CONTROL_SOCKET}")
            yield sock
        finally:
            sock.close()
            os.close(dirfd)

    async def _answers(self) -> bool:
        """Whether BIRD greets on its control socket."""
        loop = asyncio.get_running_loop()
        try:
            async with self._control() as sock:
                greeting = await asyncio.wait_for(loop.sock_recv(sock, 256), 2.0)
        except (OSError, TimeoutError):
            return False
        return greeting.startswith(b"0001 ")

    async def _watch(self, proc: asyncio.subprocess.Process) -> None:
        status = await proc.wait()
        if proc is self.proc:  # not stopped by us
            self.plan = None
            log.warning("BIRD (pid %d) exited with status %d", proc.pid, status)
            if self.on_exit is not None:
                self.on_exit(status)

    async def stop(self) -> None:
        async with self._lock:
            await self._stop()

    async def _stop(self) -> None:
        """SIGTERM: BIRD withdraws its kernel routes and flushes its LSAs, so the
        neighbours drop this site's routes at once rather than after the dead interval."""
        proc, self.proc, self.plan = self.proc, None, None
        await terminate(proc)

    async def apply(self, plan: RoutingPlan | None) -> None:
        """Make BIRD run ``plan``: None stops it, a running BIRD is reconfigured in
        place (no restart: adjacencies and routes stay), a stopped one is started.

        RoutingError when BIRD refuses the new configuration; the previous one
        then keeps running, and bird.conf still holds it."""
        async with self._lock:
            if plan is None:
                await self._stop()
                await asyncio.to_thread(self.kill_stale)
                return
            if not self.running:
                await self._start(plan, 30.0)
                return
            if plan == self.plan:
                return
            _write_private(self.new_conf, render(plan, self.log_file))
            try:
                output = await self._reply(f'configure "{self.new_conf}"')
            except RoutingError:
                with contextlib.suppress(OSError):
                    self.new_conf.unlink()
                raise
            error = failure(output)
            if error is not None or not {code for code, _ in reply_lines(output)} & ACCEPTED:
                with contextlib.suppress(OSError):
                    self.new_conf.unlink()
                raise RoutingError(
                    f"BIRD refused the new configuration (the previous one stays): "
                    f"{error or output.strip()}"
                )
            os.replace(self.new_conf, self.conf)
            self.plan = plan

    # -- queries -----------------------------------------------------------------

    async def _run(self, *argv: str) -> tuple[int, str]:
        """A short command in the routing directory: its exit status and output."""
        proc = await asyncio.create_subprocess_exec(
            *argv,
            cwd=self.dir,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), COMMAND_TIMEOUT)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            raise RoutingError(
                f"{' '.join(argv)}: no answer within {COMMAND_TIMEOUT:.0f} s"
            ) from None
        return proc.returncode or 0, out.decode(errors="replace")

    async def birdc(self, *command: str) -> str:
        """One CLI command's raw reply (the form ``birdc -v`` prints); RoutingError with
        BIRD's message if it fails."""
        output = await self._reply(" ".join(command))
        error = failure(output)
        if error is not None:
            raise RoutingError(f"birdc {' '.join(command)}: {error}")
        return output

    async def _reply(self, command: str) -> str:
        """One CLI command spoken on BIRD's control socket directly (queries and
        ``configure`` alike): a process start per question is what a slow machine feels.
        RoutingError when the socket does not answer."""
        try:
            return await asyncio.wait_for(self._ask(command), COMMAND_TIMEOUT)
        except (OSError, TimeoutError) as exc:
            raise RoutingError(f"{command}: BIRD's control socket: {exc}") from None

    async def _ask(self, command: str) -> str:
        """Greeting, one command, its reply up to the final ``DDDD `` line."""
        loop = asyncio.get_running_loop()
        async with self._control() as sock:
            data = b""
            while b"\n" not in data:
                chunk = await loop.sock_recv(sock, 4096)
                if not chunk:
                    raise OSError("closed before its greeting")
                data += chunk
            await loop.sock_sendall(sock, command.encode() + b"\n")
            reply = data.partition(b"\n")[2]
            while not _complete(reply):
                chunk = await loop.sock_recv(sock, 65536)
                if not chunk:
                    break
                reply += chunk
        return reply.decode(errors="replace")

    async def neighbors(self) -> list[Neighbor]:
        """The OSPF neighbours (empty when BIRD is not running)."""
        if not self.running:
            return []
        return parse_neighbors(await self.birdc("show", "ospf", "neighbors", PROTOCOL_NAME))

    async def routes(self) -> list[str]:
        """The prefixes learned through OSPF that the kernel gets, for diagnostics
        (empty when BIRD is not running): the other sites' prefixes and router-ID /32s,
        not this router's own router ID nor anything inside its announced prefixes."""
        plan = self.plan
        if not self.running or plan is None:
            return []
        output = await self.birdc("show", "route", "protocol", PROTOCOL_NAME)
        return [prefix for prefix in parse_routes(output) if reaches_kernel(plan, prefix)]
