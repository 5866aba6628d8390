"""yuma123 netconfd behind a private OpenSSH sshd: the benchmark's reference server.

::

    with NetconfdReference(Path(tmp), 18830, target="running") as ref:
        ThinNetconfClient.connect(ref.host, ref.port, ref.username,
                                  ref.client_key_path, ref.host_key_pub)

What it does (see bench/README.md for the why):

* installs the Debian packages ``netconfd`` and ``openssh-server`` if
  ``dpkg-query`` says they are missing (needs root);
* starts ``netconfd`` with its YUMA home, data directory, log and UNIX socket
  inside ``workdir``, loading ``bench/yang/cevpn-bench.yang`` as its only
  non-base module (schema only, no SIL), ``--target=running`` or
  ``--target=candidate`` (netconfd offers one or the other per instance, never
  both), ``--port`` equal to the SSH port (netconf-subsystem tells netconfd
  which port the client came in on, and netconfd refuses other ports);
* starts a private ``sshd -D`` on ``127.0.0.1:port`` with its own config, a
  fresh Ed25519 host key and a fresh Ed25519 client key authorised for the
  current user, and ``Subsystem netconf`` running ``netconf-subsystem`` against
  this instance's socket;
* on exit (or on any exception while starting) stops sshd, every sshd child
  (per-connection processes and netconf-subsystem leave sshd's process group),
  and netconfd: SIGTERM, then SIGKILL after a grace period.  Both servers are
  also started through ``setpriv --pdeathsig KILL`` so they die with the
  thread that started them even if this process is killed outright.

Everything listens on loopback only.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Literal, Self

BENCH_DIR = Path(__file__).resolve().parent
BENCH_YANG = BENCH_DIR / "yang" / "cevpn-bench.yang"
BENCH_MODULE = "cevpn-bench"

NETCONFD = "/usr/sbin/netconfd"
NETCONF_SUBSYSTEM = "/usr/sbin/netconf-subsystem"
SSHD = "/usr/sbin/sshd"
SSH_KEYGEN = "/usr/bin/ssh-keygen"
SETPRIV = "/usr/bin/setpriv"
YUMA_MODULES = "/usr/share/yuma/modules"
DEBIAN_PACKAGES = ("netconfd", "openssh-server")

Target = Literal["running", "candidate"]

# Paths end up in sshd_config and in a shell command line (sshd runs the
# Subsystem through the user's shell): allow only characters that need no
# quoting anywhere.
_SAFE_PATH = re.compile(r"^[A-Za-z0-9._/@+=:,-]+$")
# sun_path is 108 bytes including the terminating NUL.
_MAX_SOCKET_PATH = 100


class ReferenceServerError(RuntimeError):
    """The reference server could not be installed, started or stopped."""


def ensure_debian_packages(packages: Sequence[str] = DEBIAN_PACKAGES) -> list[str]:
    """Install the packages that ``dpkg-query`` reports as not installed.

    Returns the packages that were installed (empty if all were present).
    """
    missing = [p for p in packages if not _dpkg_installed(p)]
    if not missing:
        return []
    if os.geteuid() != 0:
        raise ReferenceServerError(
            f"Debian packages missing: {' '.join(missing)}; "
            f"run `apt-get install -y {' '.join(missing)}` as root"
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (
        ["apt-get", "update", "-qq"],
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing],
    ):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise ReferenceServerError(
                f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}"
            )
    still = [p for p in missing if not _dpkg_installed(p)]
    if still:
        raise ReferenceServerError(f"still not installed after apt-get: {' '.join(still)}")
    return missing


def _dpkg_installed(package: str) -> bool:
    proc = subprocess.run(
        ["dpkg-query", "-W", "-f=${Status}", package],
        capture_output=True,
        text=True,
        check=False,
    )
    return proc.returncode == 0 and proc.stdout.strip().endswith("install ok installed")


# ------------------------------------------------------------ process tree


def _proc_stat(pid: int) -> tuple[int, int] | None:
    """(ppid, starttime) of a live, non-zombie process, or None."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    fields = raw[raw.rindex(b")") + 2 :].split()
    if fields[0] in (b"Z", b"X"):
        return None
    return int(fields[1]), int(fields[19])


def _descendants(root: int) -> dict[int, int]:
    """All live descendants of ``root``: pid -> starttime (to detect reuse)."""
    children: dict[int, list[tuple[int, int]]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        st = _proc_stat(int(entry.name))
        if st is not None:
            children.setdefault(st[0], []).append((int(entry.name), st[1]))
    found: dict[int, int] = {}
    stack = [root]
    while stack:
        for pid, start in children.get(stack.pop(), ()):
            if pid not in found:
                found[pid] = start
                stack.append(pid)
    return found


def _signal_same(procs: dict[int, int], sig: signal.Signals) -> None:
    """Signal each pid whose start time still matches (no pid reuse)."""
    for pid, start in procs.items():
        st = _proc_stat(pid)
        if st is not None and st[1] == start:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass


def _alive_same(procs: dict[int, int]) -> dict[int, int]:
    out = {}
    for pid, start in procs.items():
        st = _proc_stat(pid)
        if st is not None and st[1] == start:
            out[pid] = start
    return out


def _stop_tree(proc: subprocess.Popen[bytes] | None, grace: float) -> None:
    """Stop ``proc`` (the leader of its own session), its process group and
    every descendant, even those that left the group or were re-parented
    once ``proc`` died."""
    if proc is None:
        return
    if proc.poll() is not None:
        # Already gone; its group may still hold children.
        _killpg(proc.pid, signal.SIGKILL)
        return
    tree = _descendants(proc.pid)
    _killpg(proc.pid, signal.SIGTERM)
    # Children may fork grandchildren until they get the signal: look again.
    tree.update({p: s for pid in list(tree) for p, s in _descendants(pid).items()})
    _signal_same(tree, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if proc.poll() is not None and not _alive_same(tree):
            break
        time.sleep(0.02)
    if proc.poll() is None:  # not reaped yet, so its pid is still its group's id
        _killpg(proc.pid, signal.SIGKILL)
    _signal_same(tree, signal.SIGKILL)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired as exc:
        raise ReferenceServerError(f"pid {proc.pid} survived SIGKILL") from exc
    # Give the kernel a moment to reap re-parented children (we are not their parent).
    deadline = time.monotonic() + grace
    while _alive_same(tree) and time.monotonic() < deadline:
        time.sleep(0.02)
    left = _alive_same(tree)
    if left:
        raise ReferenceServerError(f"processes left behind: {sorted(left)}")


def _killpg(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _tail(path: Path, limit: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-limit:]
    except OSError:
        return "(no log)"


def port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def free_loopback_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now on ``host`` (racy by nature)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


# ---------------------------------------------------------------- the server


class NetconfdReference:
    """yuma123 netconfd + private sshd on ``127.0.0.1:port``; a context manager.

    Attributes for a client: :attr:`host`, :attr:`port`, :attr:`username`,
    :attr:`client_key_path`, :attr:`host_key_pub` (the server's host public key
    line, to pin) and :attr:`target` (the datastore edit-config must name).
    """

    host = "127.0.0.1"

    def __init__(
        self,
        workdir: Path,
        port: int,
        *,
        target: Target = "running",
        log_level: str = "warn",
        start_timeout: float = 30.0,
        stop_grace: float = 5.0,
        install: bool = True,
        extra_args: Sequence[str] = (),
    ) -> None:
        if target not in ("running", "candidate"):
            raise ValueError(f"target must be 'running' or 'candidate', not {target!r}")
        if not 0 < port < 65536:
            raise ValueError(f"bad port {port}")
        self.workdir = Path(workdir).resolve()
        if not _SAFE_PATH.match(str(self.workdir)):
            raise ValueError(f"workdir path needs quoting, use a plainer one: {self.workdir}")
        self.port = port
        self.target: Target = target
        self.log_level = log_level
        self.start_timeout = start_timeout
        self.stop_grace = stop_grace
        self.install = install
        self.extra_args = tuple(extra_args)  # more netconfd options, e.g. for experiments
        self.username = pwd.getpwuid(os.geteuid()).pw_name

        self.yuma_home = self.workdir / "yuma-home"
        self.modules_dir = self.workdir / "modules"
        self.netconfd_log = self.workdir / "netconfd.log"
        self.netconfd_stdout = self.workdir / "netconfd.stdout"  # errors before --log opens
        self.sshd_log = self.workdir / "sshd.log"
        self.sshd_config = self.workdir / "sshd_config"
        self.host_key_path = self.workdir / "ssh_host_ed25519_key"
        self.client_key_path = self.workdir / "client_ed25519_key"
        self.authorized_keys = self.workdir / "authorized_keys"
        self.socket_path = self.workdir / f"ncxserver-{port}.sock"
        self._socket_tmpdir: Path | None = None

        self._netconfd: subprocess.Popen[bytes] | None = None
        self._sshd: subprocess.Popen[bytes] | None = None
        self._host_key_pub: str | None = None
        # netconfd creates ~/.yuma (from the passwd entry, whatever $HOME and
        # --home say); remove it afterwards if it was not there before.
        self._dot_yuma = Path(pwd.getpwuid(os.geteuid()).pw_dir) / ".yuma"
        self._dot_yuma_existed = self._dot_yuma.exists()

    # ------------------------------------------------------------- public

    @property
    def host_key_pub(self) -> str:
        """The server's host public key, ``"ssh-ed25519 AAAA... comment"``."""
        if self._host_key_pub is None:
            raise ReferenceServerError("server not started")
        return self._host_key_pub

    @property
    def edit_target(self) -> Target:
        return self.target

    def __enter__(self) -> Self:
        try:
            self._start()
        except BaseException:
            self._stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop()

    def __repr__(self) -> str:
        return f"NetconfdReference({self.host}:{self.port}, target={self.target})"

    # --------------------------------------------------------------- start

    def _start(self) -> None:
        if self.install:
            ensure_debian_packages()
        for exe in (NETCONFD, NETCONF_SUBSYSTEM, SSHD, SSH_KEYGEN, SETPRIV):
            if not os.access(exe, os.X_OK):
                raise ReferenceServerError(f"{exe} not found: install {DEBIAN_PACKAGES}")
        if port_in_use(self.host, self.port):
            raise ReferenceServerError(f"{self.host}:{self.port} is already in use")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._prepare_files()
        self._start_netconfd()
        self._start_sshd()

    def _prepare_files(self) -> None:
        # A fresh YUMA home: no startup config or transaction id from an earlier run.
        shutil.rmtree(self.yuma_home, ignore_errors=True)
        (self.yuma_home / "data").mkdir(parents=True)
        self.modules_dir.mkdir(exist_ok=True)
        shutil.copyfile(BENCH_YANG, self.modules_dir / BENCH_YANG.name)

        if len(str(self.socket_path)) > _MAX_SOCKET_PATH:
            self._socket_tmpdir = Path(tempfile.mkdtemp(prefix="ncxbench-"))
            self.socket_path = self._socket_tmpdir / f"ncxserver-{self.port}.sock"
        self.socket_path.unlink(missing_ok=True)  # stale socket: netconfd would fail

        for key, comment in (
            (self.host_key_path, f"cevpn-bench-host-{self.port}"),
            (self.client_key_path, f"cevpn-bench-client-{self.port}"),
        ):
            key.unlink(missing_ok=True)
            key.with_name(key.name + ".pub").unlink(missing_ok=True)
            subprocess.run(
                [SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(key)],
                check=True,
                capture_output=True,
            )
        self._host_key_pub = (
            self.host_key_path.with_name(self.host_key_path.name + ".pub").read_text().strip()
        )
        client_pub = self.client_key_path.with_name(self.client_key_path.name + ".pub")
        self.authorized_keys.write_text(client_pub.read_text())
        self.authorized_keys.chmod(0o600)

        subsystem = f"{NETCONF_SUBSYSTEM} --ncxserver-sockname={self.port}@{self.socket_path}"
        self.sshd_config.write_text(
            "\n".join(
                [
                    "# Private sshd for the cevpn NETCONF benchmark (bench/reference_netconfd.py)",
                    f"ListenAddress {self.host}:{self.port}",
                    "AddressFamily inet",
                    f"HostKey {self.host_key_path}",
                    f"PidFile {self.workdir / 'sshd.pid'}",
                    f"AuthorizedKeysFile {self.authorized_keys}",
                    f"AllowUsers {self.username}",
                    "PermitRootLogin prohibit-password",
                    "PubkeyAuthentication yes",
                    "PasswordAuthentication no",
                    "KbdInteractiveAuthentication no",
                    "HostbasedAuthentication no",
                    "UsePAM no",
                    # authorized_keys may sit below a world-writable /tmp
                    "StrictModes no",
                    "UseDNS no",
                    "PermitTTY no",
                    "AllowTcpForwarding no",
                    "AllowAgentForwarding no",
                    "AllowStreamLocalForwarding no",
                    "X11Forwarding no",
                    "PermitTunnel no",
                    "PrintMotd no",
                    "PrintLastLog no",
                    "LoginGraceTime 30",
                    "MaxStartups 100:30:200",
                    "MaxSessions 10",
                    "LogLevel INFO",
                    f'Subsystem netconf "{subsystem}"',
                    "",
                ]
            )
        )
        self.sshd_config.chmod(0o600)

    def _spawn(self, argv: list[str], log: Path) -> subprocess.Popen[bytes]:
        env = {
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": str(self.yuma_home),
            "YUMA_HOME": str(self.yuma_home),
            "LANG": "C.UTF-8",
        }
        # setpriv (util-linux) sets PR_SET_PDEATHSIG and execs: the server gets
        # SIGKILL when the thread that started it exits, even on a SIGKILL of
        # the bench (a preexec_fn would do the same but is unsafe with threads).
        with log.open("ab") as out:
            return subprocess.Popen(
                [SETPRIV, "--pdeathsig", "KILL", "--", *argv],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                env=env,
                start_new_session=True,
            )

    def _start_netconfd(self) -> None:
        argv = [
            NETCONFD,
            f"--home={self.yuma_home}",
            f"--yuma-home={self.yuma_home}",
            f"--modpath={self.modules_dir}:{YUMA_MODULES}",
            f"--module={BENCH_MODULE}",
            f"--target={self.target}",
            f"--port={self.port}",
            f"--ncxserver-sockname={self.socket_path}",
            f"--superuser={self.username}",
            "--no-startup",
            f"--log-level={self.log_level}",
            f"--log={self.netconfd_log}",
            *self.extra_args,
        ]
        self.netconfd_log.unlink(missing_ok=True)
        self.netconfd_stdout.unlink(missing_ok=True)
        self._netconfd = self._spawn(argv, self.netconfd_stdout)
        deadline = time.monotonic() + self.start_timeout
        while not self.socket_path.is_socket():
            if self._netconfd.poll() is not None:
                raise ReferenceServerError(
                    f"netconfd exited with {self._netconfd.returncode}:\n"
                    f"{_tail(self.netconfd_stdout)}\n{_tail(self.netconfd_log)}"
                )
            if time.monotonic() > deadline:
                raise ReferenceServerError(
                    f"netconfd did not open {self.socket_path} within {self.start_timeout} s:\n"
                    f"{_tail(self.netconfd_log)}"
                )
            time.sleep(0.02)

    def _start_sshd(self) -> None:
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # privilege separation dir
        check = subprocess.run(
            [SSHD, "-t", "-f", str(self.sshd_config)], capture_output=True, text=True
        )
        if check.returncode != 0:
            raise ReferenceServerError(f"sshd -t rejected the config:\n{check.stderr}")
        self.sshd_log.unlink(missing_ok=True)
        # -D: stay in the foreground (our child), -e: log to stderr (the log file)
        self._sshd = self._spawn([SSHD, "-D", "-e", "-f", str(self.sshd_config)], self.sshd_log)
        deadline = time.monotonic() + self.start_timeout
        while not self._ssh_banner_ok():
            if self._sshd.poll() is not None:
                raise ReferenceServerError(
                    f"sshd exited with {self._sshd.returncode}:\n{_tail(self.sshd_log)}"
                )
            if time.monotonic() > deadline:
                raise ReferenceServerError(
                    f"sshd not answering on {self.host}:{self.port} within "
                    f"{self.start_timeout} s:\n{_tail(self.sshd_log)}"
                )
            time.sleep(0.02)

    def _ssh_banner_ok(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=2.0) as s:
                return s.recv(64).startswith(b"SSH-2.0-")
        except OSError:
            return False

    # ---------------------------------------------------------------- stop

    def _stop(self) -> None:
        errors: list[str] = []
        # sshd first: its sessions hold netconf-subsystem processes.
        for name in ("_sshd", "_netconfd"):
            proc = getattr(self, name)
            try:
                _stop_tree(proc, self.stop_grace)
            except ReferenceServerError as exc:
                errors.append(f"{name[1:]}: {exc}")
            setattr(self, name, None)
        self.socket_path.unlink(missing_ok=True)
        if self._socket_tmpdir is not None:
            shutil.rmtree(self._socket_tmpdir, ignore_errors=True)
            self._socket_tmpdir = None
        if not self._dot_yuma_existed:
            try:
                self._dot_yuma.rmdir()  # only if empty
            except OSError:
                pass
        if errors:
            raise ReferenceServerError("; ".join(errors))
