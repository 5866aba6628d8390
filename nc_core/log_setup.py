"""How both daemons log: plain lines for a terminal or systemd's journal, JSON for pipelines.

- On a terminal (or a file): ``2026-12-06 15:20:01,123 cevpn-server INFO cevpn.commit: ...``.
- Under systemd, whose journal stamps, names and ranks each line itself (stderr is the
  journal's stream: ``JOURNAL_STREAM`` names its device and inode), the line is
  ``<6>cevpn.commit: ...``: the ``<N>`` prefix is the syslog priority the journal reads
  (sd-daemon(3)), so ``journalctl -p warning`` works; no timestamp, no program name.
- ``--log-format json``: one JSON object a line, ``time`` (RFC 3339, UTC), ``level``,
  ``logger``, ``message``, and every structured field the call passed in ``extra``
  (a commit's ``user``, ``session_id``, ``source``, ``paths``...).

asyncssh, paramiko and ncclient narrate every packet, channel and message at INFO or
DEBUG (and messages may carry keys): they log at WARNING unless ``--debug-libraries``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from datetime import UTC, datetime
from typing import Any, TextIO

LIBRARY_LOGGERS = ("asyncssh", "paramiko", "ncclient")
LOG_FORMATS = ("text", "json")

_STANDARD = frozenset(
    logging.LogRecord("", 0, "", 0, "", None, None).__dict__.keys()
    | {"message", "asctime", "taskName"}
)
_SYSLOG_PRIORITY = {"DEBUG": 7, "INFO": 6, "WARNING": 4, "ERROR": 3, "CRITICAL": 2}


def under_journal(stream: TextIO = sys.stderr) -> bool:
    """Whether ``stream`` is connected to systemd's journal (systemd.exec(5), JOURNAL_STREAM)."""
    value = os.environ.get("JOURNAL_STREAM", "")
    device, sep, inode = value.partition(":")
    if not sep:
        return False
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return f"{st.st_dev}:{st.st_ino}" == value or (
        device.isdigit() and inode.isdigit() and (st.st_dev, st.st_ino) == (int(device), int(inode))
    )


def structured_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The fields a logging call passed in ``extra``."""
    return {
        k: v for k, v in record.__dict__.items() if k not in _STANDARD and not k.startswith("_")
    }


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in structured_fields(record).items():
            entry.setdefault(key, value)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


class JournalFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        priority = _SYSLOG_PRIORITY.get(record.levelname, 6)
        # Each line of a traceback gets the priority too, or the journal files it at INFO.
        return "\n".join(f"<{priority}>{line}" for line in text.splitlines())


def configure_logging(
    level: str,
    program: str,
    log_format: str = "text",
    debug_libraries: bool = False,
    stream: TextIO | None = None,
) -> None:
    """Set up the root logger once for a daemon (replacing any handler it had)."""
    out = sys.stderr if stream is None else stream
    handler = logging.StreamHandler(out)
    formatter: logging.Formatter
    if log_format == "json":
        formatter = JsonFormatter()
    elif under_journal(out):
        formatter = JournalFormatter()
    else:
        formatter = logging.Formatter(f"%(asctime)s {program} %(levelname)s %(name)s: %(message)s")
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper()))
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG if debug_libraries else logging.WARNING)
