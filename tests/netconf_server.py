"""Start real cevpn servers for tests: a subprocess, a state directory, real SSH.

Used by the interop scripts and the robustness tests.  Accounts are created
with the same `adduser` command an operator uses; clients pin the server's
host key read from the state directory.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

ADMIN = ("admin", "admin-secret-1")
OPERATOR = ("operator", "operator-secret-1")
VIEWER = ("viewer", "viewer-secret-1")


def wait_listening(
    proc: subprocess.Popen[bytes], host: str, port: int, what: str, log: Path | None = None
) -> None:
    """Until ``proc`` accepts TCP connections on ``port``; fail if it exits first."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text()[-2000:] if log is not None and log.exists() else ""
            raise RuntimeError(f"{what} exited: {tail}")
        with contextlib.suppress(OSError), socket.create_connection((host, port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on port {port}")


_HANDED_OUT: set[int] = set()
"""Every port free_port() returned in this process: never given twice."""


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now, and never returned before by this process.

    The kernel may give a port just closed to the next bind to port 0: two agents of
    one test were once told the same port, and the server met one's host key on the
    other's port."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


@dataclass
class ServerProcess:
    command: str
    state_dir: Path
    port: int
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path = field(init=False)
    host: str = "127.0.0.1"
    database: str | None = None
    """cevpn-server's --database (None: SQLite in the state directory)."""

    def __post_init__(self) -> None:
        self.log_path = self.state_dir.parent / f"{self.state_dir.name}.log"

    @property
    def host_key_line(self) -> str:
        return (self.state_dir / "ssh_host_ed25519_key.pub").read_text().strip()

    @property
    def host_key_b64(self) -> str:
        return self.host_key_line.split()[1]

    def adduser(
        self,
        name: str,
        password: str | None = None,
        groups: tuple[str, ...] = (),
        key: Path | None = None,
    ) -> None:
        args = [str(BIN / self.command), "adduser", "--state-dir", str(self.state_dir), name]
        args += self.database_args()
        if password is not None:
            pw = self.state_dir.parent / f".{name}.pw"
            pw.write_text(password + "\n")
            pw.chmod(0o600)
            args += ["--password-file", str(pw)]
        if key is not None:
            args += ["--key", str(key)]
        for group in groups:
            args += ["--group", group]
        subprocess.run(args, check=True, capture_output=True)

    def start(self, *extra: str) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [
                str(BIN / self.command),
                "--state-dir",
                str(self.state_dir),
                "--listen",
                f"{self.host}:{self.port}",
                *self.database_args(),
                *extra,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        wait_listening(self.proc, self.host, self.port, self.command, self.log_path)

    def database_args(self) -> list[str]:
        return [] if self.database is None else ["--database", self.database]

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.proc = None

    def kill9(self) -> None:
        self.stop(signal.SIGKILL)

    def cpu_seconds(self) -> float:
        assert self.proc is not None
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks = os.sysconf("SC_CLK_TCK")
        return (int(fields[11]) + int(fields[12])) / ticks


@contextlib.contextmanager
def running_server(
    tmp: Path, command: str = "cevpn-server", *extra: str
) -> Iterator[ServerProcess]:
    server = ServerProcess(command, tmp / "state", free_port())
    server.adduser(ADMIN[0], ADMIN[1], ("admin",))
    server.adduser(OPERATOR[0], OPERATOR[1], ("operators",))
    server.adduser(VIEWER[0], VIEWER[1])
    server.start(*extra)
    try:
        yield server
    finally:
        server.stop()


def ncclient_connect(server: ServerProcess, user: tuple[str, str] = ADMIN, **kw: object):  # type: ignore[no-untyped-def]
    from ncclient import manager

    return manager.connect(
        host=server.host,
        port=server.port,
        username=user[0],
        password=user[1],
        hostkey_verify=True,
        hostkey_b64=server.host_key_b64,
        allow_agent=False,
        look_for_keys=False,
        timeout=30,
        **kw,
    )
