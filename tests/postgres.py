"""A real PostgreSQL for tests: a throw-away cluster, one database per test.

The clusters themselves are lab/postgres.py's (also used by `make demo-ha`): Debian's
postgresql binaries in a temporary directory, owned by an unprivileged user when the
tests run as root, a Unix socket for the superuser and a TCP port of 127.0.0.1 where
the test role must give its password (scram-sha-256): the storage under test always
connects that way, so the password redaction is exercised by every test.

A primary with a synchronous streaming-replication standby is
:func:`replicated_postgres`.

Without PostgreSQL installed the fixtures fail, never skip: CI installs it
(packaging/debian/development.txt).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from lab import postgres as lab_postgres
from lab.postgres import (
    PASSWORD,
    ROLE,
    STANDBY_NAME,
    SUPERUSER,
    PostgresCluster,
    PostgresUnavailable,
    ReplicatedPostgres,
)

__all__ = [
    "PASSWORD",
    "ROLE",
    "STANDBY_NAME",
    "SUPERUSER",
    "PostgresCluster",
    "ReplicatedPostgres",
    "postgres",
    "postgres_url",
    "replicated_postgres",
]


def _installed() -> tuple[Path, tuple[str, ...]]:
    """The binaries and the user to run them as; fails the test without them."""
    try:
        return lab_postgres.postgresql_bin(), lab_postgres.run_as_user()
    except PostgresUnavailable as exc:
        pytest.fail(f"{exc} (the storage tests need it)")


@pytest.fixture
def replicated_postgres() -> Iterator[ReplicatedPostgres]:
    """A primary and a synchronous standby of its own for one test (it may kill the
    primary)."""
    binaries, as_user = _installed()
    with lab_postgres.replicated_cluster(binaries, as_user) as replicated:
        yield replicated


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresCluster]:
    """A PostgreSQL cluster for the whole session (per xdist worker)."""
    binaries, as_user = _installed()
    with lab_postgres.postgres_cluster(binaries, as_user) as cluster:
        yield cluster


@pytest.fixture
def postgres_url(postgres: PostgresCluster) -> str:
    """A fresh database of its own for one test, as the URL a server is given."""
    return postgres.database()
