"""The servers the interop scripts talk to, shared by every module that needs no other.

``server`` is a cevpn-server with the admin account of tests.netconf_server; ``agent`` a
cevpn-agent without a data plane (``--dataplane none``); ``either`` runs a test once
against each.  All three are per module: each test file gets fresh servers.  A module
that needs a server prepared otherwise (test_nmda, test_get_with_defaults) defines its
own ``server``, which ``either`` then uses.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.netconf_server import ServerProcess, running_server


@pytest.fixture(scope="module")
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    with running_server(tmp_path_factory.mktemp(f"{request.module.__name__}-server")) as srv:
        yield srv


@pytest.fixture(scope="module")
def agent(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    with running_server(
        tmp_path_factory.mktemp(f"{request.module.__name__}-agent"),
        "cevpn-agent",
        "--dataplane",
        "none",
    ) as srv:
        yield srv


@pytest.fixture(params=["cevpn-server", "cevpn-agent"])
def either(request: pytest.FixtureRequest) -> ServerProcess:
    fixture = "server" if request.param == "cevpn-server" else "agent"
    return request.getfixturevalue(fixture)  # type: ignore[no-any-return]
