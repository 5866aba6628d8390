"""Why an IKE negotiation failed, in words an operator can act on (seed 3.4, 5).

charon reports a failed negotiation only as an IKE_SA that went down while
still connecting; the why is in its log messages for that IKE_SA.  The
agent reads that IKE_SA's last lines back from charon's log
(nc_agent.ike.charon.Charon.lines_of) and this module turns them into one
sentence, naming the IKEv2 notify where there is one
(AUTHENTICATION_FAILED, NO_PROPOSAL_CHOSEN, TS_UNACCEPTABLE) so it can be
looked up in RFC 7296.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

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
            r"received NO_PROPOSAL_CHOSEN|no acceptable proposal found|"
            r"received proposals unacceptable|no proposal chosen",
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
