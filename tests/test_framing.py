"""NETCONF-over-SSH framing (RFC 6242 Sections 4.1 and 4.2): messages arrive in
arbitrary pieces, malformed framing is refused with a readable reason, and
oversized messages are refused before they are buffered."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator

import pytest

from nc_core import framing
from nc_core.framing import Framer, FramingError, MessageTooBig

DELIM = b"]]>]]>"
HELLO = b"<hello/>"  # short, so that tests can use small size limits
KIB = 1024
MIB = 1024 * KIB


def payload(size: int) -> bytes:
    """Every byte value, repeated; never contains the end-of-message delimiter."""
    return (bytes(range(256)) * (size // 256 + 1))[:size]


# RFC 6242 Section 4.2, the example message, byte for byte.
RFC_EXAMPLE_STREAM = (
    b"\n#4\n<rpc"
    b'\n#18\n message-id="102"\n'
    b'\n#79\n     xmlns="urn:ietf:params:xml:ns:netconf:base:1.0">\n'
    b"  <close-session/>\n"
    b"</rpc>"
    b"\n##\n"
)
RFC_EXAMPLE_MESSAGE = (
    b'<rpc message-id="102"\n'
    b'     xmlns="urn:ietf:params:xml:ns:netconf:base:1.0">\n'
    b"  <close-session/>\n"
    b"</rpc>"
)


def framer_after_hello(
    *, chunked: bool, max_message_size: int = MIB, outgoing_chunk_size: int = MIB
) -> Framer:
    """A framer that has delivered the peer's hello, switched to chunked if asked."""
    framer = Framer(max_message_size, outgoing_chunk_size=outgoing_chunk_size)
    assert framer.feed(HELLO + DELIM) == [HELLO]
    if chunked:
        framer.switch_to_chunked()
    return framer


def receive(framer: Framer, pieces: Iterable[bytes]) -> list[bytes]:
    return [message for piece in pieces for message in framer.feed(piece)]


def three_way_splits(stream: bytes) -> Iterator[list[bytes]]:
    """The stream cut into three pieces at every pair of byte boundaries."""
    for i, j in itertools.combinations_with_replacement(range(len(stream) + 1), 2):
        yield [stream[:i], stream[i:j], stream[j:]]


def slices(stream: bytes, size: int) -> Iterator[bytes]:
    return (stream[start : start + size] for start in range(0, len(stream), size))


# -- end-of-message framing (Section 4.1) -----------------------------------------------


def test_framer_starts_with_end_of_message_framing_for_the_hello() -> None:
    framer = Framer(MIB)
    assert not framer.chunked
    assert framer.feed(HELLO + DELIM) == [HELLO]


def test_end_of_message_split_at_every_byte_boundary_is_reassembled() -> None:
    messages = [b'<rpc message-id="1"/>', b'<rpc message-id="2"/>']
    stream = b"".join(message + DELIM for message in messages)
    for pieces in three_way_splits(stream):
        framer = framer_after_hello(chunked=False)
        assert receive(framer, pieces) == messages, pieces
        assert framer.buffered() == 0


def test_several_end_of_message_messages_in_one_feed_are_returned_in_order() -> None:
    framer = framer_after_hello(chunked=False)
    assert framer.feed(b"<a/>" + DELIM + b"<b/>" + DELIM + b"<c/>" + DELIM + b"<d") == [
        b"<a/>",
        b"<b/>",
        b"<c/>",
    ]
    assert framer.buffered() == len(b"<d")


def test_partial_delimiters_inside_a_message_are_message_content() -> None:
    framer = framer_after_hello(chunked=False)
    assert framer.feed(b"]]>]]]]>]>" + DELIM) == [b"]]>]]]]>]>"]


def test_bare_delimiter_yields_an_empty_message() -> None:
    framer = framer_after_hello(chunked=False)
    assert framer.feed(DELIM) == [b""]


def test_feed_stops_after_the_hello_so_the_caller_can_choose_the_framing() -> None:
    framer = Framer(MIB)
    assert framer.feed(HELLO + DELIM + b"<rpc/>" + DELIM) == [HELLO]
    assert framer.buffered() == len(b"<rpc/>" + DELIM)
    assert framer.feed(b"") == [b"<rpc/>"]


def test_end_of_message_at_exactly_the_limit_is_accepted_while_its_delimiter_is_partial() -> None:
    framer = framer_after_hello(chunked=False, max_message_size=10)
    assert framer.feed(b"0123456789" + DELIM[:-1]) == []
    assert framer.feed(DELIM[-1:]) == [b"0123456789"]


def test_complete_end_of_message_over_the_limit_raises_message_too_big() -> None:
    framer = framer_after_hello(chunked=False, max_message_size=10)
    with pytest.raises(MessageTooBig, match="limit of 10 octets"):
        framer.feed(b"01234567890" + DELIM)


def test_hello_over_the_limit_raises_message_too_big() -> None:
    framer = Framer(len(HELLO) - 1)
    with pytest.raises(MessageTooBig):
        framer.feed(HELLO + DELIM)


def test_100mb_end_of_message_stream_is_refused_once_past_the_limit_without_buffering_it() -> None:
    limit, piece = MIB, b"x" * (4 * KIB)
    framer = framer_after_hello(chunked=False, max_message_size=limit)
    fed = 0
    with pytest.raises(MessageTooBig):
        for _ in range(100 * MIB // len(piece)):
            framer.feed(piece)
            fed += len(piece)
            assert framer.buffered() <= limit + len(DELIM)
    assert fed <= limit
    assert framer.buffered() == 0


def test_end_of_message_search_looks_at_each_byte_a_bounded_number_of_times(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    size, piece = 20 * MIB, b"x" * (4 * KIB)
    framer = framer_after_hello(chunked=False, max_message_size=size)
    searched = 0
    real_find = framing.find_delimiter

    def counting_find(buf: bytearray, start: int) -> int:
        nonlocal searched
        searched += len(buf) - start
        return real_find(buf, start)

    monkeypatch.setattr(framing, "find_delimiter", counting_find)
    feeds = size // len(piece)
    for _ in range(feeds):
        assert framer.feed(piece) == []
    [message] = framer.feed(DELIM)
    assert len(message) == size
    assert searched <= size + len(DELIM) + (feeds + 1) * (len(DELIM) - 1)


# -- switching framing after the hellos ---------------------------------------------------


def test_switch_to_chunked_parses_the_bytes_already_buffered_after_the_hello() -> None:
    framer = Framer(MIB)
    assert framer.feed(HELLO + DELIM + b"\n#6\n<rpc/>\n##\n\n#4\n<rp") == [HELLO]
    framer.switch_to_chunked()
    assert framer.chunked
    assert framer.feed(b"") == [b"<rpc/>"]
    assert framer.feed(b"c\n#3\n/>\n\n##\n") == [b"<rpc/>\n"]


def test_chunked_data_behind_the_hello_is_not_split_at_an_end_of_message_delimiter() -> None:
    framer = Framer(MIB)
    chunked_rpc = b"\n#13\n<a>]]>]]></a>\n##\n"
    assert framer.feed(HELLO + DELIM + chunked_rpc) == [HELLO]
    framer.switch_to_chunked()
    assert framer.feed(b"") == [b"<a>]]>]]></a>"]


def test_staying_with_end_of_message_framing_parses_the_bytes_after_the_hello() -> None:
    framer = Framer(MIB)
    assert framer.feed(HELLO + DELIM + b"<a/>" + DELIM + b"<b/>" + DELIM) == [HELLO]
    assert framer.feed(b"") == [b"<a/>", b"<b/>"]


# -- chunked framing (Section 4.2) --------------------------------------------------------


def test_rfc6242_section_4_2_example_is_one_message() -> None:
    framer = framer_after_hello(chunked=True)
    assert framer.feed(RFC_EXAMPLE_STREAM) == [RFC_EXAMPLE_MESSAGE]
    assert framer.buffered() == 0


def test_multi_chunk_message_is_the_concatenation_of_its_chunks() -> None:
    framer = framer_after_hello(chunked=True)
    assert framer.feed(b"\n#1\n<\n#3\nrpc\n#2\n/>\n##\n") == [b"<rpc/>"]


def test_several_chunked_messages_in_one_feed_are_returned_in_order() -> None:
    framer = framer_after_hello(chunked=True)
    assert framer.feed(b"\n#4\n<a/>\n##\n\n#4\n<b/>\n##\n\n#2\n<c") == [b"<a/>", b"<b/>"]
    assert framer.buffered() == len(b"<c")


def test_chunk_header_split_across_reads_is_reassembled() -> None:
    stream = b"\n#12\n<rpc>\n</rpc>\n#1\n\n\n##\n" + RFC_EXAMPLE_STREAM
    expected = [b"<rpc>\n</rpc>\n", RFC_EXAMPLE_MESSAGE]
    for pieces in three_way_splits(stream):
        framer = framer_after_hello(chunked=True)
        assert receive(framer, pieces) == expected, pieces
        assert framer.buffered() == 0


def test_chunked_stream_fed_one_byte_at_a_time_is_reassembled() -> None:
    framer = framer_after_hello(chunked=True)
    pieces = [RFC_EXAMPLE_STREAM[i : i + 1] for i in range(len(RFC_EXAMPLE_STREAM))]
    assert receive(framer, pieces) == [RFC_EXAMPLE_MESSAGE]


def test_buffered_counts_the_chunks_of_an_incomplete_message() -> None:
    framer = framer_after_hello(chunked=True)
    assert framer.feed(b"\n#4\n<rpc\n#10\n/>") == []
    assert framer.buffered() == len(b"<rpc/>")


MALFORMED_CHUNKED = [
    pytest.param(b"\n#1a\n", "must be decimal digits", id="bad-digit"),
    pytest.param(b"\n#-1\n", "must be decimal digits", id="negative-size"),
    pytest.param(b"\n#01\nx", "leading zero", id="leading-zero"),
    pytest.param(b"\n#0\n", "0 octets", id="zero-size"),
    pytest.param(b"\n#\n", "no chunk size", id="empty-size"),
    pytest.param(b"\n#4294967296\n", "4294967296 octets, more than RFC 6242 allows", id="2**32"),
    pytest.param(b"\n#12345678901", "longer than 10 digits", id="eleven-digits-no-lf"),
    pytest.param(b"\n#4 <rpc", "must be decimal digits", id="missing-lf-after-size"),
    pytest.param(b"#4\n<rpc\n##\n", "expected a chunk header", id="missing-lf-before-hash"),
    pytest.param(b"\n4\n<rpc\n##\n", "expected a chunk header", id="missing-hash"),
    pytest.param(b"\n#4\n<rpc>\n##\n", "chunk header or end-of-chunks", id="garbage-after-chunk"),
    pytest.param(b"\n#4\n<a/>\n##\nx", "expected a chunk header", id="garbage-between-messages"),
    pytest.param(b"\n##\n", "no chunk before it", id="end-of-chunks-without-chunk"),
    pytest.param(b"\n#4\n<a/>\n##x", "end-of-chunks marker must be", id="end-of-chunks-no-lf"),
    pytest.param(b"<rpc/>]]>]]>", "expected a chunk header", id="end-of-message-framed"),
]


@pytest.mark.parametrize(("stream", "reason"), MALFORMED_CHUNKED)
def test_malformed_chunked_framing_raises_framing_error_with_the_reason(
    stream: bytes, reason: str
) -> None:
    framer = framer_after_hello(chunked=True, max_message_size=16)
    with pytest.raises(FramingError, match=reason) as raised:
        framer.feed(stream)
    assert not isinstance(raised.value, MessageTooBig)


@pytest.mark.parametrize(("stream", "reason"), MALFORMED_CHUNKED)
def test_malformed_chunked_framing_is_detected_when_fed_byte_by_byte(
    stream: bytes, reason: str
) -> None:
    framer = framer_after_hello(chunked=True, max_message_size=16)
    with pytest.raises(FramingError, match=reason):
        receive(framer, (stream[i : i + 1] for i in range(len(stream))))


def test_chunk_header_parsing_waits_for_at_most_the_longest_valid_header() -> None:
    framer = framer_after_hello(chunked=True)
    assert framer.feed(b"\n#4294967295") == []  # may still become a valid 13-byte header
    assert framer.buffered() == 12
    with pytest.raises(FramingError, match="longer than 10 digits"):
        framer.feed(b"5")


def test_4gib_chunk_header_raises_message_too_big_before_any_chunk_data() -> None:
    framer = framer_after_hello(chunked=True, max_message_size=MIB)
    with pytest.raises(MessageTooBig, match="4294967295 octets"):
        framer.feed(b"\n#4294967295\n")


def test_chunk_making_the_message_exceed_the_limit_raises_message_too_big_at_its_header() -> None:
    framer = framer_after_hello(chunked=True, max_message_size=10)
    assert framer.feed(b"\n#6\n<rpc/>") == []
    with pytest.raises(MessageTooBig, match="limit of 10"):
        framer.feed(b"\n#5\n")


def test_chunked_message_at_exactly_the_limit_is_accepted() -> None:
    framer = framer_after_hello(chunked=True, max_message_size=10)
    assert framer.feed(b"\n#6\n<rpc/>\n#4\n    \n##\n") == [b"<rpc/>    "]


def test_20mb_chunked_message_in_4kib_pieces_is_received() -> None:
    message = payload(20 * MIB)
    sender = framer_after_hello(chunked=True)
    receiver = framer_after_hello(chunked=True, max_message_size=len(message))
    assert receive(receiver, slices(sender.encode(message), 4 * KIB)) == [message]
    assert receiver.buffered() == 0


# -- after an error -------------------------------------------------------------------------


def test_framer_refuses_further_input_after_a_framing_error() -> None:
    framer = framer_after_hello(chunked=True)
    with pytest.raises(FramingError):
        framer.feed(b"garbage")
    with pytest.raises(FramingError, match="unusable"):
        framer.feed(b"\n#4\n<a/>\n##\n")


def test_framer_refuses_further_input_after_message_too_big() -> None:
    framer = framer_after_hello(chunked=False, max_message_size=len(HELLO))
    with pytest.raises(MessageTooBig):
        framer.feed(b"<rpc></rpc>")
    with pytest.raises(FramingError, match="unusable"):
        framer.feed(DELIM)


# -- encoding -----------------------------------------------------------------------------


def test_end_of_message_encode_appends_the_delimiter() -> None:
    assert Framer(MIB).encode(HELLO) == HELLO + DELIM


def test_end_of_message_encode_refuses_a_message_containing_the_delimiter() -> None:
    with pytest.raises(ValueError, match="cannot carry"):
        Framer(MIB).encode(b"<a>]]>]]></a>")


def test_chunked_encode_splits_large_messages_into_several_chunks() -> None:
    framer = framer_after_hello(chunked=True, outgoing_chunk_size=4)
    assert framer.encode(b"<rpc/>") == b"\n#4\n<rpc\n#2\n/>\n##\n"


def test_chunked_encode_of_a_message_up_to_the_chunk_size_is_one_chunk() -> None:
    framer = framer_after_hello(chunked=True, outgoing_chunk_size=6)
    assert framer.encode(b"<rpc/>") == b"\n#6\n<rpc/>\n##\n"


def test_chunked_encode_refuses_an_empty_message() -> None:
    with pytest.raises(ValueError, match="empty"):
        framer_after_hello(chunked=True).encode(b"")


ROUND_TRIP_PAYLOADS = [
    pytest.param(b"x", id="one-byte"),
    pytest.param(b"\n", id="newline"),
    pytest.param(b"<ok/>", id="small"),
    pytest.param(b"\n##\n\n#4\n", id="looks-like-chunk-headers"),
    pytest.param(payload(3 * MIB + 17), id="3mib"),
]


@pytest.mark.parametrize("payload", ROUND_TRIP_PAYLOADS)
@pytest.mark.parametrize("chunked", [False, True], ids=["end-of-message", "chunked"])
def test_encode_then_feed_round_trips(payload: bytes, chunked: bool) -> None:
    sender = framer_after_hello(chunked=chunked)
    receiver = framer_after_hello(chunked=chunked, max_message_size=4 * MIB)
    wire = sender.encode(payload) + sender.encode(payload)
    assert receive(receiver, slices(wire, 4 * KIB)) == [payload, payload]


def test_empty_message_round_trips_in_end_of_message_framing() -> None:
    sender, receiver = Framer(MIB), framer_after_hello(chunked=False)
    assert receiver.feed(sender.encode(b"")) == [b""]


def test_chunked_encode_of_a_large_message_uses_several_chunks_that_round_trip() -> None:
    message = payload(3 * MIB)
    wire = framer_after_hello(chunked=True).encode(message)
    assert wire.count(b"\n#1048576\n") == 3
    assert framer_after_hello(chunked=True, max_message_size=3 * MIB).feed(wire) == [message]


def test_chunked_payload_containing_the_end_of_message_delimiter_round_trips() -> None:
    sender = framer_after_hello(chunked=True)
    receiver = framer_after_hello(chunked=True)
    assert receiver.feed(sender.encode(b"<a>]]>]]></a>")) == [b"<a>]]>]]></a>"]
