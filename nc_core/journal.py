"""Datastores kept in one append-only journal: one fdatasync per commit.

A commit used to replace ``running.xml`` the safe way: write a staged file, fsync it,
rename it over the old one, fsync the directory.  Two fsyncs, a rename and a directory
update per commit were 0.6 ms of a 1.5 ms small ``<edit-config>`` here, more than
everything else the server does for it.  The journal keeps the same promise (a
``kill -9`` at any instant leaves the last acknowledged configuration, never a torn
one) with one ``fdatasync`` of an append:

* :meth:`Journal.stage` appends the new document as a STAGE record, without syncing.
  The write itself still fails at once on a full disk, before the application has
  touched the world.
* :meth:`Journal.publish` appends a COMMIT record naming the STAGE record's offset and
  syncs the file: from then on the document is the document.  A STAGE record with no
  COMMIT (the process died during apply, or the change was discarded) counts for
  nothing, as the staged file did.
* Every record carries a CRC-32.  Reading stops at the first record that is short or
  does not match (a write a crash tore); the server, which owns the file, cuts it there.
  Everything before was synced by the commit that acknowledged it, since one
  ``fdatasync`` flushes the whole file.
* When the journal grows past :data:`COMPACT_FACTOR` times the documents it holds
  (and :data:`COMPACT_MIN` bytes), it is rewritten with one STAGE and one COMMIT per
  document, the old safe way (temporary file, fsync, rename, directory fsync).

* A document staged while its name has a committed document of
  :data:`DELTA_MIN` bytes or more is appended as a PATCH record when that is smaller:
  the bytes the two documents share at their start and at their end are not written
  again.  A one-peer change of a CE holding 1,000 peers (an 820 KB document) appends
  about 1 KB instead of 820 KB.  A PATCH is a stage like any other (it counts once a
  COMMIT names it), applied to the document committed when it was written; it carries
  that document's length and CRC, and a scan that finds another (not something this
  code writes) stops there, as at a torn record.
* :meth:`Journal.copy` makes one document a copy of another with a COPY record
  naming the source, durable with the next sync (the confirmed-commit rollback
  document is the running configuration the commit then replaces: the commit's own
  sync makes both durable, in the order they were written).

Record layout (big-endian): magic ``b"CJ"``, kind (``S`` stage, ``P`` patch, ``C``
commit, ``D`` delete, ``K`` copy), name length (2 bytes), payload length (4 bytes),
CRC-32 of kind, name and payload (4 bytes), then the name (UTF-8) and the payload:
the document for ``S``; for ``P`` the base document's length (8 bytes) and CRC-32
(4 bytes), the length of the part kept from its start (8 bytes) and from its end
(8 bytes), then the new bytes in between; the STAGE or PATCH record's offset (8 bytes)
for ``C``; nothing for ``D``; the source document's name (UTF-8) for ``K``.

A state directory of an older cevpn (``running.xml``, ``startup.xml`` ...) is taken
over at first start: the documents go into a new journal, then the files are removed.
The file is 0600 and the directory 0700: configuration holds keys.
"""

from __future__ import annotations

import os
import struct
import zlib
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

from nc_core.datastore import write_atomically

JOURNAL_FILE = "datastores.journal"
FILE_MAGIC = b"CEVPN-JOURNAL-1\n"
RECORD_MAGIC = b"CJ"
_HEADER = struct.Struct(">2scHII")
_OFFSET = struct.Struct(">Q")
_PATCH = struct.Struct(">QIQQ")
STAGE, PATCH, COMMIT, DELETE, COPY = b"S", b"P", b"C", b"D", b"K"

DELTA_MIN = 4096
"""Documents smaller than this are always staged whole."""
_CHUNK = 65536

COMPACT_FACTOR = 4
"""Rewrite the journal once it is this many times the size of the documents it holds..."""
COMPACT_MIN = 1 << 20
"""...and at least this large (a few hundred small commits)."""
COMPACT_PATCHES = 256
"""Rewrite it too once it holds this many PATCH records, which a start applies one by one."""

LEGACY_NAMES = ("running", "startup", "confirmed-commit-rollback")
"""The documents an older cevpn kept as ``<name>.xml`` in the state directory."""


@dataclass(frozen=True)
class Scan:
    """What a journal holds: the committed documents, and where its valid part ends."""

    documents: dict[str, bytes]
    valid_end: int
    """Offset just after the last whole record; anything beyond was torn by a crash."""
    patches: int = 0
    """PATCH records read (each costs a copy of its document at the next start)."""


def _record(kind: bytes, name: str, payload: bytes) -> bytes:
    encoded = name.encode()
    crc = zlib.crc32(payload, zlib.crc32(encoded, zlib.crc32(kind)))
    return _HEADER.pack(RECORD_MAGIC, kind, len(encoded), len(payload), crc) + encoded + payload


def scan(data: bytes) -> Scan:
    """The committed documents of a journal's bytes (read-only: nothing is cut)."""
    if not data.startswith(FILE_MAGIC):
        raise ValueError("not a cevpn datastore journal")
    documents: dict[str, bytes] = {}
    staged: dict[int, tuple[str, bytes]] = {}
    latest_stage: dict[str, int] = {}
    pos = len(FILE_MAGIC)
    patches = 0
    view = memoryview(data)
    while pos + _HEADER.size <= len(data):
        magic, kind, name_len, payload_len, crc = _HEADER.unpack_from(data, pos)
        start = pos + _HEADER.size
        end = start + name_len + payload_len
        if magic != RECORD_MAGIC or end > len(data):
            break
        name_bytes = bytes(view[start : start + name_len])
        payload = bytes(view[start + name_len : end])
        if zlib.crc32(payload, zlib.crc32(name_bytes, zlib.crc32(kind))) != crc:
            break
        try:
            name = name_bytes.decode()
        except UnicodeDecodeError:
            break
        if kind == PATCH:
            patched = _apply_patch(documents.get(name), payload)
            if patched is None:
                break  # not a patch of the document it was written against
            kind, payload = STAGE, patched
            patches += 1
        if kind == STAGE:
            previous = latest_stage.pop(name, None)
            if previous is not None:
                staged.pop(previous, None)  # only a name's latest stage can be committed
            staged[pos] = (name, payload)
            latest_stage[name] = pos
        elif kind == COMMIT and len(payload) == _OFFSET.size:
            target = staged.get(_OFFSET.unpack(payload)[0])
            if target is None or target[0] != name:
                break  # a commit of nothing: not something this code writes
            documents[name] = target[1]
        elif kind == DELETE:
            documents.pop(name, None)
        elif kind == COPY:
            source = documents.get(payload.decode(errors="replace"))
            if source is None:
                break  # a copy of nothing: not something this code writes
            documents[name] = source
        else:
            break
        pos = end
    return Scan(documents, pos, patches)


def _shared_ends(old: bytes, new: bytes) -> tuple[int, int]:
    """How many bytes ``new`` shares with ``old`` at its start, and then at its end (the
    two never overlap in either document)."""
    limit = min(len(old), len(new))
    start = 0
    while start < limit:  # chunk by chunk in C, then byte by byte in the chunk that differs
        step = min(_CHUNK, limit - start)
        if old[start : start + step] == new[start : start + step]:
            start += step
            continue
        while old[start] == new[start]:
            start += 1
        break
    limit -= start
    end = 0
    while end < limit:
        step = min(_CHUNK, limit - end)
        if (
            old[len(old) - end - step : len(old) - end]
            == new[len(new) - end - step : len(new) - end]
        ):
            end += step
            continue
        while old[len(old) - end - 1] == new[len(new) - end - 1]:
            end += 1
        break
    return start, end


def _patch_payload(old: bytes, new: bytes, shared: tuple[int, int] | None = None) -> bytes | None:
    """A PATCH payload turning ``old`` into ``new``, or None when the whole document is
    smaller; ``shared``: what the two share at their start and end, when known."""
    if len(old) < DELTA_MIN:
        return None
    start, end = _shared_ends(old, new) if shared is None else shared
    if start + end > min(len(old), len(new)):
        return None
    middle = new[start : len(new) - end]
    if _PATCH.size + len(middle) >= len(new):
        return None
    return _PATCH.pack(len(old), zlib.crc32(old), start, end) + middle


def _apply_patch(base: bytes | None, payload: bytes) -> bytes | None:
    """The document a PATCH payload makes of ``base``; None if it was not written
    against ``base``."""
    if base is None or len(payload) < _PATCH.size:
        return None
    length, crc, start, end = _PATCH.unpack_from(payload)
    if length != len(base) or start + end > length or zlib.crc32(base) != crc:
        return None
    return base[:start] + payload[_PATCH.size :] + base[length - end :]


def read_document(state_dir: Path, name: str) -> bytes | None:
    """A committed document of a state directory, read without taking it over: for
    tools and tests that look at what a running server or agent keeps."""
    path = state_dir / JOURNAL_FILE
    if path.exists():
        return scan(path.read_bytes()).documents.get(name)
    legacy = state_dir / f"{name}.xml"
    return legacy.read_bytes() if legacy.exists() else None


class Journal:
    """The datastores of one state directory (nc_core.persistence.DatastorePersistence).

    Used by one process at a time, holding the state directory's lock: the file is
    opened (and a torn tail cut, an older state directory taken over) on first use, which
    comes after the lock is taken, never when the server object is made.
    """

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.path = state_dir / JOURNAL_FILE
        self._staged: dict[str, tuple[int, bytes]] = {}
        self._documents: dict[str, bytes] = {}
        self._fd = -1
        self._size = 0
        self._patches = 0

    def _open(self) -> None:
        if self._fd >= 0:
            return
        if not self.path.exists():
            self._take_over_legacy_files()
        with self.path.open("rb") as stored:
            found = scan(stored.read())
        self._documents = found.documents
        self._patches = found.patches
        self._fd = os.open(self.path, os.O_RDWR)
        self._size = os.fstat(self._fd).st_size
        if found.valid_end < self._size:
            os.ftruncate(self._fd, found.valid_end)  # a record a crash tore
            os.fsync(self._fd)
            self._size = found.valid_end
        self._remove_legacy_files()

    # -- DatastorePersistence ----------------------------------------------------------

    def read(self, name: str) -> bytes | None:
        self._open()
        return self._documents.get(name)

    def peek(self, name: str) -> bytes | None:
        return read_document(self.state_dir, name)  # never cuts or rewrites the file

    def write(self, name: str, data: bytes) -> None:
        self._open()
        offset = self._size
        self._append(_record(STAGE, name, data) + _record(COMMIT, name, _OFFSET.pack(offset)))
        self._sync()
        self._documents[name] = data
        self._compact_if_large()

    def delete(self, name: str) -> None:
        self._open()
        if name not in self._documents:
            return
        self._append(_record(DELETE, name, b""))
        self._sync()
        del self._documents[name]
        self._compact_if_large()

    def stage(
        self, name: str, data: bytes, *, base: bytes | None = None, shared: tuple[int, int] = (0, 0)
    ) -> None:
        """Append ``data`` as the next document of ``name`` (a PATCH record when smaller).

        ``base`` and ``shared``: ``data`` is known to share ``shared`` bytes at its start
        and end with ``base`` (nc_core.document_splice made it so), used instead of
        comparing the two when ``base`` is the very committed document."""
        self._open()
        offset = self._size
        committed = self._documents.get(name)
        if committed is None:
            patch = None
        elif committed is base:
            patch = _patch_payload(committed, data, shared)
        else:
            patch = _patch_payload(committed, data)
        if patch is None:
            self._append(_record(STAGE, name, data))
        else:
            self._append(_record(PATCH, name, patch))
            self._patches += 1
        self._staged[name] = (offset, data)

    def copy(self, source: str, name: str) -> None:
        """Make ``name`` a copy of the committed document ``source``, durably from the next
        sync on (a publish, write or delete): a crash before it may leave ``name`` as it
        was.  KeyError if there is no ``source``."""
        self._open()
        data = self._documents[source]
        self._append(_record(COPY, name, source.encode()))
        self._documents[name] = data

    def publish(self, name: str) -> None:
        offset, data = self._staged.pop(name)
        self._append(_record(COMMIT, name, _OFFSET.pack(offset)))
        self._sync()
        self._documents[name] = data
        self._compact_if_large()

    def discard(self, name: str) -> None:
        self._open()
        self._staged.pop(name, None)  # its STAGE record stays, and counts for nothing

    def exclusive(self) -> AbstractContextManager[None]:
        return nullcontext()  # one process writes a journal: the state directory's lock

    # -- the file ----------------------------------------------------------------------

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _append(self, record: bytes) -> None:
        view = memoryview(record)
        os.lseek(self._fd, self._size, os.SEEK_SET)
        try:
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
        except OSError:
            # A full disk or an I/O error part-way: cut the partial record, so that
            # the next one is not appended after garbage, and report the failure.
            os.ftruncate(self._fd, self._size)
            raise
        self._size += len(record)

    def _sync(self) -> None:
        os.fdatasync(self._fd)

    def _compact_if_large(self) -> None:
        if self._staged:
            return  # a staged record's offset must stay valid until its commit
        live = sum(len(d) for d in self._documents.values())
        if self._size > max(COMPACT_MIN, COMPACT_FACTOR * live) or (
            self._patches >= COMPACT_PATCHES
        ):
            self.compact()

    def compact(self) -> None:
        """Rewrite the journal with the committed documents only."""
        write_atomically(self.path, self._image(self._documents))
        self.close()
        self._fd = os.open(self.path, os.O_RDWR)
        self._size = os.fstat(self._fd).st_size
        self._patches = 0

    @staticmethod
    def _image(documents: dict[str, bytes]) -> bytes:
        parts = [FILE_MAGIC]
        offset = len(FILE_MAGIC)
        for name, data in documents.items():
            stage = _record(STAGE, name, data)
            parts += [stage, _record(COMMIT, name, _OFFSET.pack(offset))]
            offset += len(stage) + len(parts[-1])
        return b"".join(parts)

    # -- state directories of older versions -------------------------------------------

    def _legacy_files(self) -> dict[str, Path]:
        found = {name: self.state_dir / f"{name}.xml" for name in LEGACY_NAMES}
        return {name: path for name, path in found.items() if path.is_file()}

    def _take_over_legacy_files(self) -> None:
        documents = {name: path.read_bytes() for name, path in self._legacy_files().items()}
        write_atomically(self.path, self._image(documents))

    def _remove_legacy_files(self) -> None:
        """Once the journal holds them (now, or at a start a crash cut short)."""
        staged = [self.state_dir / f".{name}.xml.staged" for name in LEGACY_NAMES]
        stale = [*self._legacy_files().values(), *(p for p in staged if p.exists())]
        for path in stale:
            path.unlink(missing_ok=True)
        if stale:
            dir_fd = os.open(self.state_dir, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)


def stored_running(state_dir: Path) -> bytes:
    """The committed running configuration of a state directory (:func:`read_document`);
    FileNotFoundError if there is none."""
    data = read_document(state_dir, "running")
    if data is None:
        raise FileNotFoundError(f"no running configuration in {state_dir}")
    return data
