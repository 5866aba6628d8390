"""NETCONF message framing over SSH (RFC 6242).

An SSH channel is a byte stream, so NETCONF needs framing to find where one XML
message ends.  RFC 6242 Section 4.1 frames each message by appending
``]]>]]>`` ("end-of-message"); that is the only framing both peers know before
they have seen each other's capabilities, so the hello is always framed that
way (Section 4.1).  When both hellos advertise ``urn:ietf:params:netconf:base:1.1``
the session switches to chunked framing (Section 4.2), which does not forbid any
byte sequence inside a message: each chunk is ``LF # chunk-size LF`` followed by
that many octets, and ``LF # # LF`` ends the message.

The peer is untrusted and its bytes arrive in arbitrary pieces, so the parser
works incrementally, touches every byte a bounded number of times, and refuses a
message as soon as it is known to exceed the configured maximum (before
buffering it, for a chunk header announcing too much).  Section 4.2 tells the
receiver to terminate the session on malformed chunked framing; after raising,
a :class:`Framer` therefore refuses further input.
"""

from __future__ import annotations

DELIMITER = b"]]>]]>"
END_OF_CHUNKS = b"\n##\n"
MAX_CHUNK_SIZE = 4294967295  # RFC 6242 Section 4.2, chunk-size ABNF
MAX_SIZE_DIGITS = len(str(MAX_CHUNK_SIZE))
DEFAULT_OUTGOING_CHUNK = 1 << 20


class FramingError(Exception):
    """Malformed framing: the session must be closed."""


class MessageTooBig(FramingError):
    """A message exceeds the configured maximum size."""


def find_delimiter(buf: bytearray, start: int) -> int:
    """Index of the first end-of-message delimiter in ``buf[start:]``, or -1.

    A separate function so tests can check how much of the buffer is searched.
    """
    return buf.find(DELIMITER, start)


def _partial_delimiter(buf: bytearray) -> int:
    """Length of the longest proper prefix of the delimiter that ``buf`` ends with."""
    for length in range(len(DELIMITER) - 1, 0, -1):
        if buf.endswith(DELIMITER[:length]):
            return length
    return 0


class Framer:
    """Splits incoming bytes into NETCONF messages and frames outgoing ones.

    ``feed()`` stops after the first message (the hello), so that the caller can
    pick the framing of what follows: after handling the hello, call
    :meth:`switch_to_chunked` if both peers advertised base:1.1, then ``feed(b"")``
    to collect any messages the peer already sent behind its hello.

    Any :class:`FramingError` (including :class:`MessageTooBig`) leaves the
    framer unusable: later ``feed()`` calls raise again, and the session must be
    closed.  ``encode()`` keeps working so a last reply can still be framed.
    """

    def __init__(
        self, max_message_size: int, *, outgoing_chunk_size: int = DEFAULT_OUTGOING_CHUNK
    ) -> None:
        if max_message_size < 1:
            raise ValueError("max_message_size must be positive")
        if not 1 <= outgoing_chunk_size <= MAX_CHUNK_SIZE:
            raise ValueError(f"outgoing_chunk_size must be in 1..{MAX_CHUNK_SIZE}")
        self.max_message_size = max_message_size
        self.outgoing_chunk_size = outgoing_chunk_size
        self._chunked = False
        self._hello_seen = False
        self._error: FramingError | None = None
        self._buf = bytearray()  # received bytes not yet consumed
        # End-of-message framing: the delimiter cannot start before this index.
        self._search_from = 0
        # Chunked framing: the message so far and the octets left in the current chunk.
        self._message = bytearray()
        self._chunks = 0
        self._chunk_left = 0

    @property
    def chunked(self) -> bool:
        """False until switch_to_chunked(); the hello is always end-of-message framed."""
        return self._chunked

    def switch_to_chunked(self) -> None:
        """Parse everything from here on, including bytes already buffered, as chunked."""
        self._chunked = True
        self._hello_seen = True

    def buffered(self) -> int:
        """Bytes held for an incomplete message."""
        return len(self._buf) + len(self._message)

    def feed(self, data: bytes) -> list[bytes]:
        """Add received bytes; return the messages now complete, in order."""
        if self._error is not None:
            raise FramingError(
                f"framer unusable after an earlier error: {self._error}"
            ) from self._error
        self._buf += data
        try:
            return self._parse_chunked() if self._chunked else self._parse_end_of_message()
        except FramingError as exc:
            self._error = exc
            self._buf.clear()
            self._message.clear()
            raise

    def encode(self, message: bytes) -> bytes:
        """Frame one outgoing message in the current framing."""
        if not self._chunked:
            if DELIMITER in message:
                raise ValueError(
                    f"message contains {DELIMITER!r}: end-of-message framing cannot carry it"
                )
            return message + DELIMITER
        if not message:
            raise ValueError("chunked framing cannot carry an empty message")
        step = self.outgoing_chunk_size
        parts: list[bytes] = []
        for start in range(0, len(message), step):
            chunk = message[start : start + step]
            parts += (b"\n#%d\n" % len(chunk), chunk)
        parts.append(END_OF_CHUNKS)
        return b"".join(parts)

    # -- end-of-message framing (RFC 6242 Section 4.1) --------------------------------

    def _parse_end_of_message(self) -> list[bytes]:
        buf, pos = self._buf, 0
        messages: list[bytes] = []
        while True:
            if messages and not self._hello_seen:
                # Leave what follows the hello unsearched: it may be chunked.
                self._hello_seen = True
                del buf[:pos]
                self._search_from = 0
                return messages
            end = find_delimiter(buf, max(pos, self._search_from))
            if end < 0:
                break
            self._check_size(end - pos)
            with memoryview(buf) as view:
                messages.append(view[pos:end].tobytes())
            pos = end + len(DELIMITER)
        del buf[:pos]
        # Only a delimiter split across feeds can start in the bytes already searched.
        self._search_from = max(0, len(buf) - (len(DELIMITER) - 1))
        self._check_size(len(buf) - _partial_delimiter(buf))
        return messages

    def _check_size(self, size: int) -> None:
        if size > self.max_message_size:
            raise MessageTooBig(
                f"message of at least {size} octets exceeds the limit of "
                f"{self.max_message_size} octets"
            )

    # -- chunked framing (RFC 6242 Section 4.2) ---------------------------------------

    def _parse_chunked(self) -> list[bytes]:
        buf, pos = self._buf, 0
        messages: list[bytes] = []
        while pos < len(buf):
            if self._chunk_left:
                take = min(self._chunk_left, len(buf) - pos)
                with memoryview(buf) as view:
                    self._message += view[pos : pos + take]
                self._chunk_left -= take
                pos += take
                continue
            header = self._parse_header(buf, pos)
            if header is None:
                break
            size, header_len = header
            pos += header_len
            if size == 0:  # end-of-chunks
                messages.append(bytes(self._message))
                self._message.clear()
                self._chunks = 0
            else:
                self._chunks += 1
                self._chunk_left = size
        del buf[:pos]
        return messages

    def _parse_header(self, buf: bytearray, pos: int) -> tuple[int, int] | None:
        """Parse the chunk header or end-of-chunks marker at ``pos``.

        Returns (chunk-size, header length), with size 0 for end-of-chunks, or
        None if more bytes are needed.  Never looks past the longest valid header.
        """
        head = bytes(buf[pos : pos + 3 + MAX_SIZE_DIGITS])
        if head[:1] != b"\n" or head[1:2] not in (b"#", b""):
            expected = "a chunk header" if not self._chunks else "a chunk header or end-of-chunks"
            raise FramingError(
                f"expected {expected} (LF '#'), got {head[:2]!r}: RFC 6242 Section 4.2 "
                "allows nothing else between chunks"
            )
        if head[2:3] == b"#":
            if head[3:4] not in (b"\n", b""):
                raise FramingError(f"end-of-chunks marker must be LF '#' '#' LF, got {head[:4]!r}")
            if len(head) < 4:
                return None
            if not self._chunks:
                raise FramingError("end-of-chunks marker with no chunk before it")
            return 0, 4
        digits, lf, _ = head[2:].partition(b"\n")
        if digits and not digits.isdigit():
            raise FramingError(f"chunk size must be decimal digits, got {digits!r}")
        if digits.startswith(b"0"):
            if digits == b"0" and lf:
                raise FramingError("chunk header announces 0 octets; chunk-size must be at least 1")
            if len(digits) > 1:
                raise FramingError(f"chunk size {digits!r} has a leading zero")
        if len(digits) > MAX_SIZE_DIGITS:
            raise FramingError(
                f"chunk size {digits[:MAX_SIZE_DIGITS]!r}... is longer than "
                f"{MAX_SIZE_DIGITS} digits, more than RFC 6242 allows"
            )
        if not lf:
            return None
        if not digits:
            raise FramingError("chunk header has no chunk size")
        size = int(digits)
        if size > MAX_CHUNK_SIZE:
            raise FramingError(
                f"chunk header announces {size} octets, more than RFC 6242 allows "
                f"({MAX_CHUNK_SIZE})"
            )
        if len(self._message) + size > self.max_message_size:
            raise MessageTooBig(
                f"chunk header announces {size} octets, making the message "
                f"{len(self._message) + size} octets, over the limit of {self.max_message_size}"
            )
        return size, len(digits) + 3
