"""Where a server's datastores are persisted: files by default, anything with these five calls.

The commit path needs one thing from persistence: a change written *before*
the application touches the world and published *after* it succeeded, so a
crash in between leaves the old configuration (``stage`` / ``publish`` /
``discard``).  Files do that with a flushed temporary file renamed into
place; a database does it with one transaction at publish time.  The CE agent
keeps files; the VPN server keeps its datastores in SQLite next to its key
material (nc_server.storage).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from nc_core.datastore import commit_staged, write_atomically, write_staged


class DatastorePersistence(Protocol):
    """Named documents (``running``, ``startup``, ``confirmed-commit-rollback``)."""

    def read(self, name: str) -> bytes | None: ...

    def write(self, name: str, data: bytes) -> None:
        """Replace the document atomically and durably."""
        ...

    def delete(self, name: str) -> None: ...

    def stage(self, name: str, data: bytes) -> None:
        """Make ``data`` durable without publishing it: a crash before publish discards it."""
        ...

    def publish(self, name: str) -> None:
        """Make the staged document the document."""
        ...

    def discard(self, name: str) -> None:
        """Forget a staged document (also called at start-up for one a crash left behind)."""
        ...


class FilePersistence:
    """Each document is ``<state_dir>/<name>.xml``, 0600, replaced by fsync + rename."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir

    def path(self, name: str) -> Path:
        return self.state_dir / f"{name}.xml"

    def _staged(self, name: str) -> Path:
        path = self.path(name)
        return path.with_name(f".{path.name}.staged")

    def read(self, name: str) -> bytes | None:
        path = self.path(name)
        return path.read_bytes() if path.exists() else None

    def write(self, name: str, data: bytes) -> None:
        write_atomically(self.path(name), data)

    def delete(self, name: str) -> None:
        self.path(name).unlink(missing_ok=True)

    def stage(self, name: str, data: bytes) -> None:
        write_staged(self.path(name), data)

    def publish(self, name: str) -> None:
        commit_staged(self._staged(name), self.path(name))

    def discard(self, name: str) -> None:
        self._staged(name).unlink(missing_ok=True)
