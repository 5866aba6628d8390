"""The CE's NETCONF Call Home settings (RFC 8071), read from its pre-configuration.

``pre-configuration/management/call-home`` (cevpn-types) lists the VPN
server's call-home endpoints; nc_core.call_home dials them.  A CE without
the container does not dial: its server reaches it on its management port.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from nc_core.call_home import CallHomeEndpoint


@dataclass(frozen=True)
class CallHomeSettings:
    endpoints: tuple[CallHomeEndpoint, ...]
    """In the order they are tried; empty: do not dial."""
    max_wait: float


def call_home_settings(pre_configuration: Mapping[str, Any]) -> CallHomeSettings:
    """The settings in a pre-configuration (RFC 7951 JSON, defaults included)."""
    call_home = pre_configuration.get("management", {}).get("call-home")
    if call_home is None:
        return CallHomeSettings((), 0.0)
    endpoints = tuple(
        CallHomeEndpoint(str(e["address"]), int(e["port"])) for e in call_home.get("endpoint", [])
    )
    return CallHomeSettings(endpoints, float(call_home["max-wait"]))
