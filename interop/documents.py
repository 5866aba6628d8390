"""Documents the interop tests send with every client: the same edit, so each client's
result can be compared with the others'."""

from __future__ import annotations

SYS = "urn:ietf:params:xml:ns:yang:ietf-system"
NC = "urn:ietf:params:xml:ns:netconf:base:1.0"


def user_config(name: str, operation: str = "") -> str:
    """A ``<config>`` with one ietf-system user, the edit operation on it if given."""
    op = f' xmlns:nc="{NC}" nc:operation="{operation}"' if operation else ""
    return (
        f'<config xmlns="{NC}"><system xmlns="{SYS}"><authentication>'
        f"<user{op}><name>{name}</name></user></authentication></system></config>"
    )
