"""Fault injection at named steps, for tests only: a process fails or stops exactly where a
test asks, instead of being killed after a sleep that may come too early or too late.

The server and the agent call :func:`point` at the steps a crash test needs
(``point("agent-apply-kernel-done")``).  Nothing happens unless the
environment variable ``CEVPN_FAULTS`` names the step, which only tests set:

    CEVPN_FAULTS="compile=raise"               the step raises InjectedFault
    CEVPN_FAULTS="agent-apply-kernel-done=stop" the process reports the step, then stops

``stop`` writes the step's name (and its qualifier, if any) to the file
``CEVPN_FAULTS_REPORT`` names (one line per step reached) and sends itself
SIGSTOP: the test waits for that line, then kills the process with -9 at
exactly that point.  With
``CEVPN_FAULTS_ARMED`` naming a file, faults act only while that file exists.  A step may carry a
qualifier after a colon (``compile:acme=raise``: only for VPN acme).

The variable is read once, at import; a production process never sets it, so
each point costs one dictionary look-up.
"""

from __future__ import annotations

import os
import signal

ENV = "CEVPN_FAULTS"
REPORT_ENV = "CEVPN_FAULTS_REPORT"
ARMED_ENV = "CEVPN_FAULTS_ARMED"
"""If set, a file: the faults act only while it exists (a test arms them at the moment it
wants, after the process started and did what must not be interrupted)."""


class InjectedFault(RuntimeError):
    """Raised at a step the environment asked to fail (tests only)."""


def _parse(text: str) -> dict[str, str]:
    actions: dict[str, str] = {}
    for item in text.split(","):
        step, sep, action = item.strip().partition("=")
        if step and sep and action in ("raise", "stop"):
            actions[step] = action
    return actions


_ACTIONS = _parse(os.environ.get(ENV, ""))


def active() -> bool:
    """Does this process inject any fault?"""
    return bool(_ACTIONS)


def point(step: str, qualifier: str | None = None) -> None:
    """A named step: fail or stop here if the environment says so (else nothing)."""
    if not _ACTIONS:
        return
    action = _ACTIONS.get(f"{step}:{qualifier}") if qualifier is not None else None
    action = action or _ACTIONS.get(step)
    if action is None:
        return
    armed = os.environ.get(ARMED_ENV)
    if armed and not os.path.exists(armed):
        return
    if action == "raise":
        raise InjectedFault(f"fault injected at step {step!r}")
    report = os.environ.get(REPORT_ENV)
    if report:
        with open(report, "a") as out:
            out.write(f"{step} {qualifier}\n" if qualifier is not None else f"{step}\n")
            out.flush()
            os.fsync(out.fileno())
    os.kill(os.getpid(), signal.SIGSTOP)
