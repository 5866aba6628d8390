"""NETCONF rpc-error (RFC 6241 Section 4.3 and Appendix A).

Every failure a client sees is an :class:`RpcError`: the error-type, error-tag
and severity Appendix A prescribes, an error-path in the client's terms, an
error-message a person understands, and error-info where the RFC asks for it
(bad-element, bad-attribute, session-id, ...).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from lxml import etree

from nc_core.xmlutil import NC_NS, default_ns_element, qn

ErrorType = Literal["transport", "rpc", "protocol", "application"]

# Appendix A: each tag with the error-types it may be used with.
ERROR_TAGS: Mapping[str, frozenset[str]] = {
    "in-use": frozenset({"protocol", "application"}),
    "invalid-value": frozenset({"protocol", "application"}),
    "too-big": frozenset({"transport", "rpc", "protocol", "application"}),
    "missing-attribute": frozenset({"rpc", "protocol", "application"}),
    "bad-attribute": frozenset({"rpc", "protocol", "application"}),
    "unknown-attribute": frozenset({"rpc", "protocol", "application"}),
    "missing-element": frozenset({"protocol", "application"}),
    "bad-element": frozenset({"protocol", "application"}),
    "unknown-element": frozenset({"protocol", "application"}),
    "unknown-namespace": frozenset({"protocol", "application"}),
    "access-denied": frozenset({"protocol", "application"}),
    "lock-denied": frozenset({"protocol"}),
    "resource-denied": frozenset({"transport", "rpc", "protocol", "application"}),
    "rollback-failed": frozenset({"protocol", "application"}),
    "data-exists": frozenset({"application"}),
    "data-missing": frozenset({"application"}),
    "operation-not-supported": frozenset({"protocol", "application"}),
    "operation-failed": frozenset({"rpc", "protocol", "application"}),
    "partial-operation": frozenset({"application"}),
    "malformed-message": frozenset({"rpc"}),
}


@dataclass
class RpcError(Exception):
    """One <rpc-error>.  Raise it; the session turns it into the reply."""

    tag: str
    message: str
    type: ErrorType = "application"
    severity: Literal["error", "warning"] = "error"
    path: str | None = None
    """An XPath absolute location path; prefixes must be declared in ``path_ns``."""
    path_ns: Mapping[str, str] = field(default_factory=dict)
    app_tag: str | None = None
    info: list[tuple[str, str]] = field(default_factory=list)
    """error-info children, as (element name in the base namespace, text)."""

    def __post_init__(self) -> None:
        allowed = ERROR_TAGS.get(self.tag)
        if allowed is None:
            raise ValueError(f"unknown error-tag {self.tag!r}")
        if self.type not in allowed:
            raise ValueError(f"error-tag {self.tag!r} is not used with error-type {self.type!r}")
        super().__init__(self.message)

    def __str__(self) -> str:
        where = f" at {self.path}" if self.path else ""
        return f"{self.tag}: {self.message}{where}"

    def to_xml(self) -> etree._Element:
        err = default_ns_element(NC_NS, "rpc-error")
        etree.SubElement(err, qn(NC_NS, "error-type")).text = self.type
        etree.SubElement(err, qn(NC_NS, "error-tag")).text = self.tag
        etree.SubElement(err, qn(NC_NS, "error-severity")).text = self.severity
        if self.app_tag:
            etree.SubElement(err, qn(NC_NS, "error-app-tag")).text = self.app_tag
        if self.path:
            path = etree.SubElement(err, qn(NC_NS, "error-path"), nsmap=dict(self.path_ns))
            path.text = self.path
        msg = etree.SubElement(err, qn(NC_NS, "error-message"))
        msg.set("{http://www.w3.org/XML/1998/namespace}lang", "en")
        msg.text = self.message
        if self.info:
            info = etree.SubElement(err, qn(NC_NS, "error-info"))
            for name, text in self.info:
                etree.SubElement(info, qn(NC_NS, name)).text = text
        return err


class RpcErrors(Exception):
    """Several rpc-errors for one reply (continue-on-error, validation)."""

    def __init__(self, errors: Iterable[RpcError]) -> None:
        self.errors = list(errors)
        super().__init__("; ".join(str(e) for e in self.errors))


def malformed(message: str) -> RpcError:
    return RpcError("malformed-message", message, type="rpc")


def missing_element(
    name: str, message: str | None = None, *, type: ErrorType = "protocol"
) -> RpcError:
    return RpcError(
        "missing-element",
        message or f"The <{name}> element is required here.",
        type=type,
        info=[("bad-element", name)],
    )


def bad_element(name: str, message: str, *, type: ErrorType = "protocol") -> RpcError:
    return RpcError("bad-element", message, type=type, info=[("bad-element", name)])


def unknown_element(name: str, message: str, *, type: ErrorType = "protocol") -> RpcError:
    return RpcError("unknown-element", message, type=type, info=[("bad-element", name)])


def operation_not_supported(message: str) -> RpcError:
    return RpcError("operation-not-supported", message, type="protocol")
