"""Why an IKE negotiation failed, in words an operator can act on (seed 3.4, 5).

charon reports a failed negotiation only as an IKE_SA that went down while
still connecting; the why is in its log messages for that IKE_SA.  The
agent reads that IKE_SA's last lines back from charon's log
(nc_agent.ike.charon.Charon.lines_of) and this module turns them into one
sentence, naming the IKEv2 notify where there is one
(AUTHENTICATION_FAILED, NO_PROPOSAL_CHOSEN, TS_UNACCEPTABLE) so it can be
looked up in RFC 7296.  One answer is ambiguous on the wire: see NOT_PROVISIONED.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

NOT_PROVISIONED = (
    "the peer has no configuration for this CE (not provisioned yet?), or no IKE proposal "
    "is acceptable to both ends: it refused IKE_SA_INIT with NO_PROPOSAL_CHOSEN, which is "
    "charon's answer to both; if the peer is provisioned, compare the SA information of "
    "both CEs"
)
"""The initiator's reason when the peer answered IKE_SA_INIT with NO_PROPOSAL_CHOSEN.

A responder charon without a connection for this CE's address logs "no IKE config
found for ..., sending NO_PROPOSAL_CHOSEN" and answers exactly as it does to
proposals it cannot accept (a bare NO_PROPOSAL_CHOSEN notify either way: task
manager's send_notify_response, ike_init's build_r with its payloads flushed), so
the initiator cannot tell the two apart on the wire.  Between CEs provisioned by
one VPN server the first is the usual one (the peer's configuration is still on
its way), so the reason names it first, and the retry treats it as such
(nc_agent.ike.retry.RetryPolicy.unprovisioned_delay).  A real mismatch also shows
on the other end, whose own log then says "received proposals unacceptable"."""

_RULES: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(pattern, re.IGNORECASE), text)
    for pattern, text in (
        (
            r"received AUTHENTICATION_FAILED",
            "the peer refused this CE's authentication (AUTHENTICATION_FAILED): check the "
            "pre-shared key or this CE's certificate",
        ),
        (
            r"MAC mismatched|verification of AUTH payload .* failed",
            "the peer's authentication failed here: its pre-shared key differs from this CE's",
        ),
        (
            r"no shared key found",
            "no pre-shared key for this peer's identity",
        ),
        (
            r"no trusted .* public key found|constraint check failed|"
            r"certificate .* (not trusted|has expired|revoked)|no issuer certificate found",
            "the peer's certificate was not accepted (untrusted issuer, wrong identity or "
            "expired): check the CA certificates and the peer-identity",
        ),
        (
            # ike_init.c, this CE initiating: the peer refused IKE_SA_INIT
            r"received NO_PROPOSAL_CHOSEN notify error",
            NOT_PROVISIONED,
        ),
        (
            # child_create.c: IKE_SA_INIT passed, so the peer knows this CE; ESP differs
            r"received NO_PROPOSAL_CHOSEN notify, no CHILD_SA built",
            "no ESP proposal acceptable to both ends (NO_PROPOSAL_CHOSEN for the CHILD_SA): "
            "compare the ESP SA information of both CEs",
        ),
        (
            # this CE's own charon judged the peer's proposals (it had a configuration)
            r"no acceptable proposal found|received proposals unacceptable|no proposal chosen",
            "no proposal acceptable to both ends (NO_PROPOSAL_CHOSEN): compare the SA "
            "information of both CEs",
        ),
        (
            r"received TS_UNACCEPTABLE|traffic selectors .* unacceptable",
            "the peer refused the traffic selectors (TS_UNACCEPTABLE): the two ends disagree "
            "on the encapsulation or the addresses",
        ),
        (
            r"no IKE config found|no matching peer config found|peer config .* not found",
            "the peer has no configuration for this CE (is this CE in its peer list?)",
        ),
        (
            r"giving up after (\d+) retransmits|peer not responding",
            "the peer did not answer",
        ),
    )
)


def failure_reason(messages: Sequence[str]) -> str:
    """The most telling reason in an IKE_SA's log messages (newest last)."""
    for message in reversed(messages):
        for pattern, text in _RULES:
            match = pattern.search(message)
            if match is None:
                continue
            if text == "the peer did not answer":
                return _with_retransmits(messages)
            return text
    for message in reversed(messages):
        if "fail" in message.lower() or "error" in message.lower():
            return message
    return "the negotiation failed (no reason in the IKE daemon's log)"


def _with_retransmits(messages: Sequence[str]) -> str:
    """charon logs the count ('giving up after 3 retransmits') before its summary line
    ('peer not responding'): keep the count wherever it is."""
    for message in reversed(messages):
        found = re.search(r"giving up after (\d+) retransmits", message)
        if found:
            return f"the peer did not answer ({found.group(1)} retransmits)"
    return "the peer did not answer"
