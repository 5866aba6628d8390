"""A real, throw-away PostgreSQL on this machine: one cluster, or a primary with a
synchronous streaming-replication standby (the tests and `make demo-ha` use both).

A cluster is made with Debian's postgresql binaries (``initdb``, ``pg_ctl``) in a
temporary directory, owned by an unprivileged user when we run as root (postgres
refuses to run as root).  It listens on a Unix socket in that directory, where the
superuser connects without a password, and on a free TCP port of 127.0.0.1, where
the role :data:`ROLE` must give its password (scram-sha-256): cevpn servers always
connect that way.

A primary with a synchronous standby (:func:`replicated_cluster`) is two such
clusters: the standby made by ``pg_basebackup -R`` from the primary, with a
replication slot of its own, and named by the primary's ``synchronous_standby_names``
(set once the standby is copied, so that the standby does not inherit it: once
promoted it has no standby, and would otherwise wait for one forever).

Without PostgreSQL installed, :class:`PostgresUnavailable` says what to install.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lab.waiting import wait_until

ROLE = "cevpn_test"
PASSWORD = "Pw-never-shown-7q3x"
"""Distinctive, so that any message holding it is found by a plain substring search."""

SUPERUSER = "postgres"

STANDBY_NAME = "cevpn_standby"
"""The standby's application_name and replication slot, named in synchronous_standby_names."""


class PostgresUnavailable(RuntimeError):
    """PostgreSQL cannot run here (not installed, or no user to run it as)."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(check: Callable[[], Any], timeout: float, what: str) -> None:
    if wait_until(check, timeout) is None:
        raise TimeoutError(f"timed out after {timeout} s waiting for {what}")


def postgresql_bin() -> Path:
    """The newest installed PostgreSQL's bin directory."""
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"),
        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
    )
    if not found:
        raise PostgresUnavailable(
            "PostgreSQL is not installed (/usr/lib/postgresql/*/bin/initdb): "
            "`tools/install-debian-packages development` installs it"
        )
    return found[-1].parent


def run_as_user() -> tuple[str, ...]:
    """The prefix that runs a command as an unprivileged user when we are root."""
    if os.geteuid() != 0:
        return ()
    for user in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            pwd.getpwnam(user)
            return ("runuser", "-u", user, "--")
    raise PostgresUnavailable(
        "running as root with neither a 'postgres' nor a 'nobody' user for PostgreSQL"
    )


@dataclass
class PostgresCluster:
    """One running PostgreSQL cluster; :meth:`database` makes a fresh database."""

    directory: Path
    bin: Path
    port: int = field(default_factory=free_port)
    as_user: tuple[str, ...] = field(default_factory=run_as_user)
    _names: Iterator[int] = field(default_factory=itertools.count)

    @property
    def data(self) -> Path:
        return self.directory / "data"

    @property
    def log(self) -> Path:
        return self.directory / "postgres.log"

    def _pg(self, tool: str, *args: str) -> None:
        done = subprocess.run(
            [*self.as_user, str(self.bin / tool), *args], capture_output=True, text=True
        )
        if done.returncode != 0:
            tail = self.log.read_text()[-2000:] if self.log.exists() else ""
            raise RuntimeError(f"{tool} {' '.join(args)}: {done.stdout}{done.stderr}{tail}")

    def init(self) -> None:
        self._pg(
            "initdb",
            "--pgdata", str(self.data),
            "--username", SUPERUSER,
            "--encoding", "UTF8",
            "--locale", "C",
            "--auth-local", "trust",
            "--auth-host", "scram-sha-256",
            "--no-sync",
        )  # fmt: skip

    def start(self) -> None:
        options = (
            f"-c listen_addresses=127.0.0.1 -c port={self.port} "
            f"-c unix_socket_directories={self.directory} -c max_connections=200"
        )
        self._pg("pg_ctl", "start", "-w", "-D", str(self.data), "-l", str(self.log), "-o", options)

    def stop(self, mode: str = "fast") -> None:
        self._pg("pg_ctl", "stop", "-w", "-D", str(self.data), "-m", mode)

    def postmaster_pid(self) -> int:
        return int((self.data / "postmaster.pid").read_text().split()[0])

    def kill9(self) -> None:
        """Die as its machine would: SIGKILL to the postmaster, then to every process of it
        (a postmaster killed alone leaves its backends to notice, one by one)."""
        postmaster = self.postmaster_pid()
        children = [pid for pid in _pids() if _parent(pid) == postmaster]
        os.kill(postmaster, signal.SIGKILL)
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def dead(self) -> bool:
        try:
            os.kill(self.postmaster_pid(), 0)
        except (ProcessLookupError, FileNotFoundError):
            return True
        return False

    def in_recovery(self) -> bool:
        with self.superuser() as conn:
            row = conn.execute("SELECT pg_is_in_recovery()").fetchone()
        return bool(row and row[0])

    def restart_after_crash(self) -> None:
        """Stop as a crash would (``-m immediate``: no checkpoint, WAL replay on start)."""
        self.stop("immediate")
        self.start()

    def superuser(self, dbname: str = "postgres"):  # type: ignore[no-untyped-def]
        import psycopg

        return psycopg.connect(
            host=str(self.directory),
            port=self.port,
            user=SUPERUSER,
            dbname=dbname,
            autocommit=True,
        )

    def create_role(self) -> None:
        with self.superuser() as conn:
            conn.execute(f"CREATE ROLE {ROLE} LOGIN PASSWORD '{PASSWORD}'")

    def url(self, dbname: str, *, port: int | None = None, password: str = PASSWORD) -> str:
        return f"postgresql://{ROLE}:{password}@127.0.0.1:{port or self.port}/{dbname}"

    def database(self, name: str | None = None) -> str:
        """The URL of a new, empty database owned by :data:`ROLE`."""
        name = name or f"test_{next(self._names)}"
        with self.superuser() as conn:
            conn.execute(f"CREATE DATABASE {name} OWNER {ROLE}")
        return self.url(name)


def _pids() -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]


def _parent(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


def own_directory(as_user: tuple[str, ...]) -> Path:
    """A new temporary directory the PostgreSQL user owns (under /tmp: a test's or a
    demo's work directory may have parents closed to that user)."""
    directory = Path(tempfile.mkdtemp(prefix="cevpn-pg-"))
    if as_user:
        user = as_user[2]
        shutil.chown(directory, user, pwd.getpwnam(user).pw_gid)
    return directory


@dataclass
class ReplicatedPostgres:
    """A primary and its synchronous standby, and the multi-host URL servers are given."""

    primary: PostgresCluster
    standby: PostgresCluster
    _names: Iterator[int] = field(default_factory=itertools.count)

    def url(self, dbname: str, *, password: str = PASSWORD) -> str:
        hosts = f"127.0.0.1:{self.primary.port},127.0.0.1:{self.standby.port}"
        return f"postgresql://{ROLE}:{password}@{hosts}/{dbname}?target_session_attrs=read-write"

    def database(self, name: str | None = None) -> str:
        """A new database owned by :data:`ROLE`, made on the primary (and so on the
        standby): its multi-host URL."""
        name = name or f"test_{next(self._names)}"
        with self.primary.superuser() as conn:
            conn.execute(f"CREATE DATABASE {name} OWNER {ROLE}")
        return self.url(name)

    def sync_state(self) -> str | None:
        """The standby as the primary's pg_stat_replication sees it (``sync`` wanted)."""
        with self.primary.superuser() as conn:
            row = conn.execute(
                "SELECT sync_state FROM pg_stat_replication WHERE application_name = %s",
                (STANDBY_NAME,),
            ).fetchone()
        return None if row is None else str(row[0])

    def fail_over(self) -> None:
        """The primary dies (kill -9, every process of it), the standby is promoted (as an
        operator or an HA tool does) and accepts writes before this returns."""
        self.primary.kill9()
        self.promote()

    def promote(self) -> None:
        self.standby._pg("pg_ctl", "promote", "-w", "-D", str(self.standby.data))
        wait_for(
            lambda: not self.standby.in_recovery(), 60, "the promoted standby to leave recovery"
        )


@contextlib.contextmanager
def replicated_cluster(
    binaries: Path | None = None, as_user: tuple[str, ...] | None = None
) -> Iterator[ReplicatedPostgres]:
    """A primary and its synchronous standby, running until the block ends (then
    stopped, whatever was killed meanwhile, and their directories removed)."""
    binaries = binaries or postgresql_bin()
    as_user = run_as_user() if as_user is None else as_user
    directories = [own_directory(as_user), own_directory(as_user)]
    primary = PostgresCluster(directories[0], binaries, as_user=as_user)
    standby = PostgresCluster(directories[1], binaries, as_user=as_user)
    try:
        primary.init()
        primary.start()
        try:
            primary.create_role()
            primary._pg(
                "pg_basebackup",
                "--pgdata", str(standby.data),
                "--host", str(primary.directory),
                "--port", str(primary.port),
                "--username", SUPERUSER,
                "--write-recovery-conf",
                "--wal-method", "stream",
                "--create-slot", "--slot", STANDBY_NAME,
                "--no-sync",
            )  # fmt: skip
            # Who the standby is to the primary: the name synchronous_standby_names gives.
            with (standby.data / "postgresql.auto.conf").open("a") as auto:
                auto.write(
                    f"primary_conninfo = 'host={primary.directory} port={primary.port} "
                    f"user={SUPERUSER} application_name={STANDBY_NAME}'\n"
                )
            standby.start()
            try:
                replicated = ReplicatedPostgres(primary, standby)
                with primary.superuser() as conn:
                    conn.execute(f"ALTER SYSTEM SET synchronous_standby_names = '{STANDBY_NAME}'")
                    conn.execute("SELECT pg_reload_conf()")
                wait_for(lambda: replicated.sync_state() == "sync", 60, "a synchronous standby")
                yield replicated
            finally:
                with contextlib.suppress(FileNotFoundError, RuntimeError):
                    if not standby.dead():
                        standby.stop()
        finally:
            with contextlib.suppress(FileNotFoundError, RuntimeError):
                if not primary.dead():
                    primary.stop("immediate")
    finally:
        for directory in directories:
            shutil.rmtree(directory, ignore_errors=True)


@contextlib.contextmanager
def postgres_cluster(
    binaries: Path | None = None, as_user: tuple[str, ...] | None = None
) -> Iterator[PostgresCluster]:
    """One cluster with :data:`ROLE`, running until the block ends."""
    binaries = binaries or postgresql_bin()
    as_user = run_as_user() if as_user is None else as_user
    directory = own_directory(as_user)
    cluster = PostgresCluster(directory, binaries, as_user=as_user)
    try:
        cluster.init()
        cluster.start()
        try:
            cluster.create_role()
            yield cluster
        finally:
            cluster.stop()
    finally:
        shutil.rmtree(directory, ignore_errors=True)
