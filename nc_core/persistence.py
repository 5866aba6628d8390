"""Where a server's datastores are persisted: a journal by default, anything with these calls.

The commit path needs one thing from persistence: a change written *before*
the application touches the world and published *after* it succeeded, so a
crash in between leaves the old configuration (``stage`` / ``publish`` /
``discard``).  The journal does that with a STAGE record appended before and a
COMMIT record synced after (nc_core.journal); a database does it with one
transaction at publish time.  The CE agent keeps a journal; the VPN server
keeps its datastores in SQLite next to its key material (nc_server.storage).
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Protocol


class DatastorePersistence(Protocol):
    """Named documents (``running``, ``startup``, ``confirmed-commit-rollback``)."""

    def read(self, name: str) -> bytes | None: ...

    def peek(self, name: str) -> bytes | None:
        """The committed document, read without changing anything (no repair, no take-over):
        for a tool looking at the state of a server that may be running."""
        ...

    def write(self, name: str, data: bytes) -> None:
        """Replace the document atomically and durably."""
        ...

    def delete(self, name: str) -> None: ...

    def stage(
        self, name: str, data: bytes, *, base: bytes | None = None, shared: tuple[int, int] = (0, 0)
    ) -> None:
        """Write ``data`` without publishing it: a crash before publish discards it.

        ``base``/``shared``: a hint, ``data`` shares ``shared`` bytes at its start and
        end with the document ``base`` (the one last staged and published, when it is the
        very same object), so a journal need not compare them; others ignore it."""
        ...

    def publish(self, name: str) -> None:
        """Make the staged document the document, durably, before returning."""
        ...

    def discard(self, name: str) -> None:
        """Forget a staged document (also called at start-up for one a crash left behind)."""
        ...

    def exclusive(self) -> AbstractContextManager[None]:
        """Hold every other writer off for a read-modify-write made without a server
        (``adduser``).  The state directory's lock is enough for a journal or SQLite; a
        database shared by running servers needs their commit lock as well."""
        ...
