"""A real PostgreSQL for tests: a throw-away cluster, one database per test.

The cluster is made with Debian's postgresql binaries (``initdb``, ``pg_ctl``)
in a temporary directory, owned by an unprivileged user when the tests run as
root (postgres refuses to run as root).  It listens on a Unix socket in that
directory, where the superuser connects without a password, and on a free TCP
port of 127.0.0.1, where the test role must give its password
(scram-sha-256): the storage under test always connects that way, so the
password redaction is exercised by every test.

Without PostgreSQL installed the fixture fails, never skips: CI installs it
(packaging/debian/development.txt).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.netconf_server import free_port

ROLE = "cevpn_test"
PASSWORD = "Pw-never-shown-7q3x"
"""Distinctive, so that any message holding it is found by a plain substring search."""

SUPERUSER = "postgres"


def postgresql_bin() -> Path:
    """The newest installed PostgreSQL's bin directory; fails the test without one."""
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"),
        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
    )
    if not found:
        pytest.fail(
            "PostgreSQL is not installed (/usr/lib/postgresql/*/bin/initdb): the storage "
            "tests need it; `tools/install-debian-packages development` installs it"
        )
    return found[-1].parent


def _run_as_user() -> tuple[str, ...]:
    """The prefix that runs a command as an unprivileged user when we are root."""
    if os.geteuid() != 0:
        return ()
    for user in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            pwd.getpwnam(user)
            return ("runuser", "-u", user, "--")
    pytest.fail("running as root with neither a 'postgres' nor a 'nobody' user for PostgreSQL")


@dataclass
class PostgresCluster:
    """One running PostgreSQL cluster; :meth:`database` makes a fresh database."""

    directory: Path
    bin: Path
    port: int = field(default_factory=free_port)
    as_user: tuple[str, ...] = field(default_factory=_run_as_user)
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

    def database(self) -> str:
        """The URL of a new, empty database owned by the test role."""
        name = f"test_{next(self._names)}"
        with self.superuser() as conn:
            conn.execute(f"CREATE DATABASE {name} OWNER {ROLE}")
        return self.url(name)


@contextlib.contextmanager
def postgres_cluster() -> Iterator[PostgresCluster]:
    binaries = postgresql_bin()
    # Not under pytest's tmp_path: its parents are 0700 root, closed to the postgres user.
    directory = Path(tempfile.mkdtemp(prefix="cevpn-pg-"))
    cluster = PostgresCluster(directory, binaries)
    if cluster.as_user:
        user = cluster.as_user[2]
        shutil.chown(directory, user, pwd.getpwnam(user).pw_gid)
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


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresCluster]:
    """A PostgreSQL cluster for the whole session (per xdist worker)."""
    with postgres_cluster() as cluster:
        yield cluster


@pytest.fixture
def postgres_url(postgres: PostgresCluster) -> str:
    """A fresh database of its own for one test, as the URL a server is given."""
    return postgres.database()
