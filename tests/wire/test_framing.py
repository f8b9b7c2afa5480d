"""Framing of protocol v3 streams: any chunking of a valid stream reads the same.

Sans-IO, bytes only. The property tests build a stream from messages, cut it at points chosen
by hypothesis, feed the pieces and compare what comes out with what went in. The rejection
tests check that a bad length is refused from the header alone, before any body is buffered.
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Iterable, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pgpilot.wire import messages as m
from pgpilot.wire.errors import ProtocolError
from pgpilot.wire.framing import (
    CANCEL_REQUEST_CODE,
    GSSENC_REQUEST_CODE,
    MAX_MESSAGE_LENGTH,
    MAX_STARTUP_LENGTH,
    PROTOCOL_V3,
    SSL_REQUEST_CODE,
    CancelRequest,
    GSSENCRequest,
    Message,
    MessageReader,
    SSLRequest,
    StartupMessage,
    StartupPacket,
    StartupReader,
    parse_startup_packet,
)

FAST = settings(max_examples=40, deadline=None)

FRONTEND_TYPES = [v for k, v in vars(m.F).items() if k.isupper()]
BACKEND_TYPES = [v for k, v in vars(m.B).items() if k.isupper()]

INT32 = st.integers(-(2**31), 2**31 - 1)
TEXT = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=20)
NAME = TEXT.filter(bool)


def frame(mtype: int, body: bytes) -> bytes:
    """A typed message, built here independently of the code under test."""
    return bytes([mtype]) + struct.pack("!i", len(body) + 4) + body


def messages_of(types: Sequence[int]) -> st.SearchStrategy[list[tuple[int, bytes]]]:
    # Mostly the protocol's own types, sometimes any byte: framing must not care.
    mtype = st.sampled_from(types) | st.integers(0, 255)
    return st.lists(st.tuples(mtype, st.binary(max_size=300)), max_size=12)


def split(data: bytes, cuts: Iterable[int]) -> list[bytes]:
    points = sorted({c for c in cuts if 0 < c < len(data)})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


@st.composite
def chunked(draw: st.DrawFn, data: bytes) -> list[bytes]:
    """``data`` cut anywhere, including one byte at a time and not at all."""
    how = draw(st.sampled_from(["random", "bytewise", "whole"]))
    if how == "bytewise":
        return [data[i:i + 1] for i in range(len(data))]
    if how == "whole":
        return [data]
    cuts = draw(st.lists(st.integers(0, max(len(data), 1)), max_size=20))
    return split(data, cuts)


def expected(msgs: Sequence[tuple[int, bytes]],
             interesting: frozenset[int] | None) -> list[Message]:
    return [(t, b if interesting is None or t in interesting else None) for t, b in msgs]


def read_all(reader: MessageReader, chunks: Sequence[bytes], wrap: str = "bytes",
             boundaries: Sequence[int] | None = None) -> list[Message]:
    """Feed every chunk; after each, check the reader's view of where it stands.

    ``boundaries``: where each message of the stream ends; ``reader.ends`` (offsets in the
    data just fed) must point at exactly those.
    """
    out: list[Message] = []
    fed = 0
    ends: list[int] = []
    for chunk in chunks:
        data: bytes | bytearray | memoryview = (
            bytearray(chunk) if wrap == "bytearray"
            else memoryview(chunk) if wrap == "memoryview" else chunk)
        got = reader.feed(data)
        out.extend(got)
        assert len(reader.ends) == len(got)
        assert all(0 < e <= len(chunk) for e in reader.ends)
        ends.extend(fed + e for e in reader.ends)
        fed += len(chunk)
        if boundaries is not None:
            assert reader.mid_message == (fed not in {0, *boundaries})
    if boundaries is not None:
        assert ends == list(boundaries)
    return out


def check_stream(msgs: list[tuple[int, bytes]], interesting: frozenset[int] | None,
                 data: st.DataObject) -> None:
    stream = b"".join(frame(t, b) for t, b in msgs)
    boundaries = list(itertools.accumulate(len(frame(t, b)) for t, b in msgs))
    chunks = data.draw(chunked(stream))
    wrap = data.draw(st.sampled_from(["bytes", "bytearray", "memoryview"]))
    reader = MessageReader(interesting)
    assert read_all(reader, chunks, wrap, boundaries) == expected(msgs, interesting)
    assert reader.buffered == 0
    assert not reader.mid_message


# -- MessageReader: any split, same messages ----------------------------------------------

FRONTEND_SUBSETS: list[frozenset[int] | None] = [
    None,
    frozenset(),
    frozenset({m.F.QUERY}),
    frozenset({m.F.QUERY, m.F.PARSE, m.F.BIND, m.F.CLOSE, m.F.SYNC, m.F.TERMINATE}),
    frozenset(FRONTEND_TYPES),
]
BACKEND_SUBSETS: list[frozenset[int] | None] = [
    None,
    frozenset(),
    frozenset({m.B.READY_FOR_QUERY}),
    frozenset({m.B.READY_FOR_QUERY, m.B.ERROR_RESPONSE, m.B.COMMAND_COMPLETE,
               m.B.PARAMETER_STATUS, m.B.PARSE_COMPLETE}),
    frozenset(BACKEND_TYPES),
]


@pytest.mark.parametrize("interesting", FRONTEND_SUBSETS)
@FAST
@given(msgs=messages_of(FRONTEND_TYPES), data=st.data())
def test_frontend_stream_any_split(interesting: frozenset[int] | None,
                                   msgs: list[tuple[int, bytes]], data: st.DataObject) -> None:
    check_stream(msgs, interesting, data)


@pytest.mark.parametrize("interesting", BACKEND_SUBSETS)
@FAST
@given(msgs=messages_of(BACKEND_TYPES), data=st.data())
def test_backend_stream_any_split(interesting: frozenset[int] | None,
                                  msgs: list[tuple[int, bytes]], data: st.DataObject) -> None:
    check_stream(msgs, interesting, data)


@FAST
@given(msgs=messages_of(FRONTEND_TYPES + BACKEND_TYPES),
       interesting=st.sets(st.sampled_from(FRONTEND_TYPES + BACKEND_TYPES)).map(frozenset),
       data=st.data())
def test_random_interesting_subset(msgs: list[tuple[int, bytes]],
                                   interesting: frozenset[int], data: st.DataObject) -> None:
    check_stream(msgs, interesting, data)


@FAST
@given(msgs=messages_of(FRONTEND_TYPES), data=st.data())
def test_buffered_holds_only_what_an_interesting_message_needs(
        msgs: list[tuple[int, bytes]], data: st.DataObject) -> None:
    """Skipped messages hold at most a partial header; kept ones at most header + body."""
    interesting = frozenset({m.F.QUERY, m.F.PARSE})
    stream = b"".join(frame(t, b) for t, b in msgs)
    reader = MessageReader(interesting, max_body=300)
    longest = max((len(b) for t, b in msgs if t in interesting), default=0)
    for chunk in data.draw(chunked(stream)):
        reader.feed(chunk)
        assert reader.buffered <= max(4, 5 + longest)


def test_real_builders_frame_as_one_message_each() -> None:
    wire = [m.query("SELECT 1"), m.parse_message("s1", "SELECT $1", [23]),
            m.bind_simple("", "s1", ["1"]), m.describe_message("P", ""), m.execute_message(),
            m.sync(), m.flush(), m.close_message("S", "s1"), m.terminate()]
    stream = b"".join(wire)
    for size in (1, 2, 3, 5, 7, len(stream)):
        reader = MessageReader()
        got = read_all(reader, [stream[i:i + size] for i in range(0, len(stream), size)])
        assert [(t, frame(t, b or b"")) for t, b in got] == [(w[0], w) for w in wire]


def test_empty_feed_changes_nothing() -> None:
    reader = MessageReader({m.F.QUERY})
    assert reader.feed(b"") == []
    big = frame(m.F.COPY_DATA, b"x" * 100)
    assert reader.feed(big[:10]) == []
    assert reader.feed(b"") == []
    assert reader.mid_message
    assert reader.feed(big[10:]) == [(m.F.COPY_DATA, None)]
    q = frame(m.F.QUERY, b"SELECT 1\x00")
    assert reader.feed(q[:3]) == []
    assert reader.feed(b"") == []
    assert reader.feed(q[3:]) == [(m.F.QUERY, b"SELECT 1\x00")]


def test_zero_length_bodies() -> None:
    stream = frame(m.F.SYNC, b"") + frame(m.F.FLUSH, b"") + frame(m.F.QUERY, b"")
    for interesting in (None, frozenset({m.F.QUERY}), frozenset({m.F.SYNC})):
        for size in (1, 4, 5, 6, len(stream)):
            reader = MessageReader(interesting)
            chunks = [stream[i:i + size] for i in range(0, len(stream), size)]
            got = read_all(reader, chunks)
            assert got == expected([(m.F.SYNC, b""), (m.F.FLUSH, b""), (m.F.QUERY, b"")],
                                   interesting)


# -- MessageReader: bad lengths are refused from the header --------------------------------

def header(mtype: int, length: int) -> bytes:
    return bytes([mtype]) + struct.pack("!i", length)


@pytest.mark.parametrize("length", [-(2**31), -1, 0, 1, 2, 3])
@pytest.mark.parametrize("interesting", [None, frozenset(), frozenset({ord("Q")})])
def test_length_below_four_is_refused(length: int, interesting: frozenset[int] | None) -> None:
    for chunks in ([header(ord("Q"), length)],
                   [bytes([b]) for b in header(ord("Q"), length)],
                   [frame(ord("Q"), b"ok\x00") + header(ord("Q"), length)[:2],
                    header(ord("Q"), length)[2:]]):
        reader = MessageReader(interesting)
        with pytest.raises(ProtocolError):
            for chunk in chunks:
                reader.feed(chunk)


def test_interesting_body_beyond_max_body_is_refused_before_buffering() -> None:
    reader = MessageReader({ord("Q")}, max_body=100)
    assert reader.feed(frame(ord("Q"), b"x" * 100)) == [(ord("Q"), b"x" * 100)]
    with pytest.raises(ProtocolError, match="exceeds"):
        reader.feed(header(ord("Q"), 4 + 101))
    # The same, the header arriving a byte at a time after a message.
    reader = MessageReader({ord("Q")}, max_body=100)
    reader.feed(frame(ord("Q"), b""))
    with pytest.raises(ProtocolError):
        for b in header(ord("Q"), 4 + 101):
            reader.feed(bytes([b]))
            assert reader.buffered < 5


def test_without_interesting_set_every_body_is_bounded_by_max_body() -> None:
    reader = MessageReader(None, max_body=10)
    assert reader.feed(frame(ord("d"), b"0123456789")) == [(ord("d"), b"0123456789")]
    with pytest.raises(ProtocolError):
        reader.feed(header(ord("d"), 4 + 11))


def test_skipped_type_is_bounded_by_max_message_length() -> None:
    reader = MessageReader({ord("Q")}, max_body=10)
    # At the ceiling: accepted and skipped (only the header is fed).
    assert reader.feed(header(ord("d"), MAX_MESSAGE_LENGTH + 4)) == []
    assert reader.mid_message and reader.buffered == 0
    reader = MessageReader({ord("Q")}, max_body=10)
    with pytest.raises(ProtocolError):
        reader.feed(header(ord("d"), MAX_MESSAGE_LENGTH + 5))
    reader = MessageReader({ord("Q")})
    with pytest.raises(ProtocolError):
        reader.feed(header(ord("d"), 2**31 - 1))


def test_huge_uninteresting_message_streams_with_constant_memory() -> None:
    """A 1 GiB COPY row goes through in 1 MiB pieces; nothing of it is held."""
    body_len = MAX_MESSAGE_LENGTH
    reader = MessageReader({m.F.QUERY, m.F.SYNC}, max_body=1024)
    assert reader.feed(header(m.F.COPY_DATA, body_len + 4)[:3]) == []
    assert reader.buffered == 3
    assert reader.feed(header(m.F.COPY_DATA, body_len + 4)[3:]) == []
    assert reader.buffered == 0
    piece = bytes(1024 * 1024)
    remaining = body_len
    while remaining > len(piece):
        assert reader.feed(piece) == []
        assert reader.buffered == 0
        assert reader.mid_message
        remaining -= len(piece)
    tail = piece[:remaining] + m.sync() + m.query("SELECT 1")[:4]
    assert reader.feed(tail) == [(m.F.COPY_DATA, None), (m.F.SYNC, b"")]
    assert reader.buffered == 4
    assert reader.feed(m.query("SELECT 1")[4:]) == [(m.F.QUERY, b"SELECT 1\x00")]
    assert not reader.mid_message


@settings(max_examples=100, deadline=None)
@given(data=st.binary(max_size=400), interesting=st.sampled_from(FRONTEND_SUBSETS),
       cuts=st.lists(st.integers(0, 400), max_size=6))
def test_garbage_only_ever_raises_protocol_error(data: bytes,
                                                 interesting: frozenset[int] | None,
                                                 cuts: list[int]) -> None:
    reader = MessageReader(interesting, max_body=200)
    try:
        for chunk in split(data, cuts):
            reader.feed(chunk)
            assert reader.buffered <= 205
    except ProtocolError:
        pass


# -- StartupReader ---------------------------------------------------------------------------

def params_strategy() -> st.SearchStrategy[dict[str, str]]:
    return st.builds(lambda user, rest: {**rest, "user": user},
                     NAME, st.dictionaries(NAME, TEXT, max_size=5))


def startup_bytes(params: dict[str, str], protocol: int = PROTOCOL_V3) -> bytes:
    """A StartupMessage built independently of ``messages.startup_message``."""
    body = struct.pack("!i", protocol)
    for k, v in params.items():
        body += k.encode() + b"\x00" + v.encode() + b"\x00"
    body += b"\x00"
    return struct.pack("!i", len(body) + 4) + body


def code_packet(code: int, extra: bytes = b"") -> bytes:
    return struct.pack("!ii", 8 + len(extra), code) + extra


STARTUP_PACKETS: st.SearchStrategy[tuple[StartupPacket, bytes]] = st.one_of(
    st.builds(lambda p, minor: (StartupMessage(PROTOCOL_V3 | minor, p),
                                startup_bytes(p, PROTOCOL_V3 | minor)),
              params_strategy(), st.integers(0, 2)),
    st.just((SSLRequest(), code_packet(SSL_REQUEST_CODE))),
    st.just((GSSENCRequest(), code_packet(GSSENC_REQUEST_CODE))),
    st.builds(lambda pid, key: (CancelRequest(pid, key),
                                code_packet(CANCEL_REQUEST_CODE, struct.pack("!ii", pid, key))),
              INT32, INT32),
)


def _one_request_of_each_kind(packets: list[tuple[StartupPacket, bytes]]) -> bool:
    """As PostgreSQL: a connection asks for SSL at most once, and for GSSAPI at most once."""
    kinds = [type(pkt) for pkt, _ in packets if isinstance(pkt, SSLRequest | GSSENCRequest)]
    return len(kinds) == len(set(kinds))


@settings(max_examples=80, deadline=None)
@given(packets=st.lists(STARTUP_PACKETS, min_size=1, max_size=4).filter(
           _one_request_of_each_kind),
       rest=st.binary(max_size=50), data=st.data())
def test_startup_packets_any_split(packets: list[tuple[StartupPacket, bytes]], rest: bytes,
                                   data: st.DataObject) -> None:
    stream = b"".join(raw for _, raw in packets) + rest
    reader = StartupReader()
    got: list[StartupPacket] = []
    for chunk in data.draw(chunked(stream)):
        reader.feed(chunk)
        # The caller asks for a packet only while it expects one (after SSLRequest, the
        # next one; after a StartupMessage, the typed messages begin).
        while len(got) < len(packets):
            pkt = reader.next_packet()
            if pkt is None:
                break
            got.append(pkt)
    assert got == [pkt for pkt, _ in packets]
    assert reader.take_rest() == rest
    assert reader.take_rest() == b""
    assert reader.next_packet() is None


@pytest.mark.parametrize("code", [SSL_REQUEST_CODE, GSSENC_REQUEST_CODE])
def test_a_second_encryption_request_is_a_protocol_error(code: int) -> None:
    reader = StartupReader()
    reader.feed(code_packet(code) + code_packet(code))
    assert reader.next_packet() is not None
    with pytest.raises(ProtocolError, match="second"):
        reader.next_packet()


def test_startup_message_fields() -> None:
    pkt = parse_startup_packet(startup_bytes({"user": "bob", "application_name": "x"}))
    assert isinstance(pkt, StartupMessage)
    assert (pkt.user, pkt.database, pkt.protocol) == ("bob", "bob", PROTOCOL_V3)
    pkt = parse_startup_packet(startup_bytes({"database": "db", "user": "bob", "é": "ü"}))
    assert isinstance(pkt, StartupMessage)
    assert (pkt.user, pkt.database, pkt.params["é"]) == ("bob", "db", "ü")
    # An empty value is a value.
    pkt = parse_startup_packet(startup_bytes({"user": "bob", "options": ""}))
    assert isinstance(pkt, StartupMessage) and pkt.params["options"] == ""


def test_pipelined_bytes_after_startup_are_kept() -> None:
    reader = StartupReader()
    reader.feed(startup_bytes({"user": "bob"}) + m.query("SELECT 1"))
    assert isinstance(reader.next_packet(), StartupMessage)
    assert reader.take_rest() == m.query("SELECT 1")


@pytest.mark.parametrize("length", [-(2**31), -1, 0, 3, 4, 7, MAX_STARTUP_LENGTH + 1, 2**31 - 1])
def test_startup_length_out_of_range_is_refused_from_four_bytes(length: int) -> None:
    reader = StartupReader()
    reader.feed(struct.pack("!i", length)[:3])
    assert reader.next_packet() is None
    reader.feed(struct.pack("!i", length)[3:])
    with pytest.raises(ProtocolError, match="length"):
        reader.next_packet()


def test_startup_length_at_the_limit_is_accepted() -> None:
    params = {"user": "bob", "big": "x" * (MAX_STARTUP_LENGTH - 23)}
    raw = startup_bytes(params)
    assert len(raw) == MAX_STARTUP_LENGTH
    reader = StartupReader()
    reader.feed(raw)
    assert reader.next_packet() == StartupMessage(PROTOCOL_V3, params)


def raw_startup(body: bytes, protocol: int = PROTOCOL_V3) -> bytes:
    return struct.pack("!ii", len(body) + 8, protocol) + body


BAD_STARTUP = {
    "protocol 2.0": startup_bytes({"user": "bob"}, 2 << 16),
    "protocol 4.0": startup_bytes({"user": "bob"}, 4 << 16),
    "protocol 1234.5678 (unknown code)": startup_bytes({"user": "bob"}, (1234 << 16) | 5678),
    "negative protocol": startup_bytes({"user": "bob"}, -1),
    "no body": raw_startup(b""),
    "no terminator at all": raw_startup(b"user\x00bob"),
    "pairs without the final terminator": raw_startup(b"user\x00bob\x00"),
    "terminator before the end": raw_startup(b"\x00user\x00bob\x00\x00"),
    "empty name in the middle": raw_startup(b"user\x00bob\x00\x00x\x00y\x00\x00"),
    "name without value": raw_startup(b"user\x00bob\x00application_name\x00\x00"),
    "no user": startup_bytes({"database": "db"}),
    "empty user": startup_bytes({"user": "", "database": "db"}),
    "no parameters": raw_startup(b"\x00"),
    "invalid UTF-8": raw_startup(b"user\x00\xff\xfe\x00\x00"),
    "SSLRequest with a body": code_packet(SSL_REQUEST_CODE, b"\x00\x00\x00\x00"),
    "GSSENCRequest with a body": code_packet(GSSENC_REQUEST_CODE, b"\x00"),
    "short CancelRequest": code_packet(CANCEL_REQUEST_CODE, b"\x00" * 4),
    "long CancelRequest": code_packet(CANCEL_REQUEST_CODE, b"\x00" * 12),
}


@pytest.mark.parametrize("raw", BAD_STARTUP.values(), ids=BAD_STARTUP.keys())
def test_malformed_startup_packet_is_refused(raw: bytes) -> None:
    reader = StartupReader()
    for i in range(len(raw) - 1):
        reader.feed(raw[i:i + 1])
        assert reader.next_packet() is None
    reader.feed(raw[-1:])
    with pytest.raises(ProtocolError):
        reader.next_packet()


@settings(max_examples=100, deadline=None)
@given(data=st.binary(max_size=200), cuts=st.lists(st.integers(0, 200), max_size=5))
def test_startup_garbage_only_ever_raises_protocol_error(data: bytes, cuts: list[int]) -> None:
    reader = StartupReader()
    try:
        for chunk in split(data, cuts):
            reader.feed(chunk)
            while reader.next_packet() is not None:
                pass
    except ProtocolError:
        pass
