"""Every lab test (marked ``lab``) needs the User-Mode Linux lab: prepared, or skipped."""

from __future__ import annotations

import pytest

from lab.uml import LabUnavailable, prepare_host


@pytest.fixture(autouse=True)
def lab(request: pytest.FixtureRequest) -> None:
    if request.node.get_closest_marker("lab") is None:
        return  # plain unit tests living next to lab tests
    try:
        prepare_host()
    except LabUnavailable as exc:
        pytest.skip(str(exc))
