"""Shared fixtures for the cevpn test suite."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

EXAMPLES = ROOT / "tests" / "examples"

# Tests open ncclient (paramiko) sessions from several threads: PyNaCl's cffi types are
# realized once here, in the main thread (nc_core.client.realize_pynacl_types says why).
import nc_core.client  # noqa: E402,F401


@pytest.fixture(scope="session")
def ce_schema():
    from nc_core.schema import ce_schema

    return ce_schema()


@pytest.fixture(scope="session")
def service_schema():
    from nc_core.schema import service_schema

    return service_schema()


# A real PostgreSQL (tests/postgres.py), started only when a test asks for it.
from tests.postgres import postgres, postgres_url, replicated_postgres  # noqa: E402, F401
