"""Processes in the User-Mode Linux lab (run inside a guest): start one in a namespace with
its output in $WORK, wait until it listens, stop it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from contextlib import suppress
from pathlib import Path

WORK = Path(os.environ.get("WORK", "/tmp"))


_LOGS: dict[int, str] = {}
"""Each started process's log file name, by pid (stop() shows it when the process hangs)."""


def start(argv: list[str], log: str, netns: str | None = None) -> subprocess.Popen[bytes]:
    prefix = ["ip", "netns", "exec", netns] if netns else []
    out = (WORK / log).open("ab")
    proc = subprocess.Popen([*prefix, *argv], stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True)  # fmt: skip
    _LOGS[proc.pid] = log
    return proc


def wait_port(host: str, port: int, proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with status {proc.returncode}")
        with suppress(OSError), socket.create_connection((host, port), 0.5):
            return
        time.sleep(0.2)
    raise RuntimeError(f"{what} did not listen on {host} port {port}")


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM and wait; a daemon still running 30 s later has its threads' stacks written
    to its log, is killed, and fails the caller with the end of that log."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        hung = wait_exit(proc, _LOGS.get(proc.pid, "unknown.log"))
        if hung is not None:
            raise RuntimeError(hung)


STACKS_DUMPED = "most recent call first"
"""What Python's faulthandler writes for each thread (the daemons dump on SIGUSR2)."""


def wait_exit(proc: subprocess.Popen[bytes], log: str, timeout: float = 30) -> str | None:
    """Wait for a daemon told to stop; None once it exited.  A daemon still running after
    ``timeout`` is a failure: its threads' stacks are asked for (SIGUSR2, written to its
    log), it is killed, and the message returned holds the end of its log."""
    try:
        proc.wait(timeout)
        return None
    except subprocess.TimeoutExpired:
        pass
    path = WORK / log
    with suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGUSR2)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and STACKS_DUMPED not in _read(path):
        time.sleep(0.2)
    with suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    tail = _read(path)[-8000:]
    return f"{log}: still running {timeout:.0f} s after SIGTERM; its end:\n{tail}"


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""
