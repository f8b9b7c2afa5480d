"""Incremental framing of PostgreSQL protocol v3 byte streams, whatever the chunking.

Two readers, both sans-IO (bytes in, messages out):

- :class:`StartupReader` reads the untyped packets of the startup phase (StartupMessage,
  SSLRequest, GSSENCRequest, CancelRequest): ``int32 length`` then ``int32 code``.
- :class:`MessageReader` reads typed messages: ``byte type``, ``int32 length`` (which counts
  itself, not the type byte), body.

The pooler forwards most messages unchanged and needs the content of only a few, so
:class:`MessageReader` keeps the body of the types it is told are *interesting* and merely counts
its way past the others: an uninteresting message is never buffered, whatever its size, which is
what lets a 500 MB COPY stream through with constant memory. Interesting bodies are bounded by
``max_body``; a length that is negative, too small or beyond the limit is a
:class:`ProtocolError`, raised before anything is buffered.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass

from pgpilot.wire.errors import ProtocolError

# PostgreSQL's own ceilings: startup packets (MAX_STARTUP_PACKET_LENGTH) and any message body
# (PQ_LARGE_MESSAGE_LIMIT, 1 GiB - 1).
MAX_STARTUP_LENGTH = 10_000
MAX_MESSAGE_LENGTH = 0x3FFF_FFFF
# The bodies the pooler keeps (Parse, Bind, Query ...) are bounded well below that by default.
DEFAULT_MAX_BODY = 64 * 1024 * 1024

PROTOCOL_V3 = 196608  # 3 << 16
SSL_REQUEST_CODE = 80877103
GSSENC_REQUEST_CODE = 80877104
CANCEL_REQUEST_CODE = 80877102

_INT32 = struct.Struct("!i")
_TWO_INT32 = struct.Struct("!ii")
_HEADER = struct.Struct("!Bi")


@dataclass(frozen=True, slots=True)
class StartupMessage:
    """The first packet of a normal connection: protocol version and parameters."""

    protocol: int
    params: dict[str, str]

    @property
    def user(self) -> str:
        return self.params.get("user", "")

    @property
    def database(self) -> str:
        return self.params.get("database") or self.user


@dataclass(frozen=True, slots=True)
class SSLRequest:
    """The client asks whether TLS is available; answered with one byte, S or N."""


@dataclass(frozen=True, slots=True)
class GSSENCRequest:
    """The client asks for GSSAPI encryption; the pooler always answers N."""


@dataclass(frozen=True, slots=True)
class CancelRequest:
    """Cancel the query running on the connection whose BackendKeyData is (pid, key)."""

    pid: int
    key: int


StartupPacket = StartupMessage | SSLRequest | GSSENCRequest | CancelRequest


def parse_startup_packet(packet: bytes) -> StartupPacket:
    """Decode one whole untyped packet (length prefix included)."""
    if len(packet) < 8:
        raise ProtocolError(f"startup packet too short ({len(packet)} bytes)")
    (code,) = _INT32.unpack_from(packet, 4)
    if code == SSL_REQUEST_CODE:
        if len(packet) != 8:
            raise ProtocolError("malformed SSLRequest")
        return SSLRequest()
    if code == GSSENC_REQUEST_CODE:
        if len(packet) != 8:
            raise ProtocolError("malformed GSSENCRequest")
        return GSSENCRequest()
    if code == CANCEL_REQUEST_CODE:
        if len(packet) != 16:
            raise ProtocolError("malformed CancelRequest")
        pid, key = _TWO_INT32.unpack_from(packet, 8)
        return CancelRequest(pid, key)
    major = code >> 16
    if major != 3:
        raise ProtocolError(f"unsupported frontend protocol {major}.{code & 0xFFFF}: "
                            "server supports 3.0")
    # name\0value\0 ... name\0value\0 then \0: as PostgreSQL reads it, an empty name ends
    # the list, and that terminator must be the packet's last byte.
    body = packet[8:]
    if not body or body[-1] != 0:
        raise ProtocolError("startup packet is not terminated")
    parts = body[:-1].split(b"\x00")
    if parts.pop() != b"":
        raise ProtocolError("startup packet is not terminated")
    if len(parts) % 2:
        raise ProtocolError("startup packet has a parameter without a value")
    if not all(parts[0::2]):
        raise ProtocolError("invalid startup packet layout: terminator before the last byte")
    params: dict[str, str] = {}
    try:
        for i in range(0, len(parts), 2):
            params[parts[i].decode()] = parts[i + 1].decode()
    except UnicodeDecodeError as exc:
        raise ProtocolError("startup packet is not valid UTF-8") from exc
    if not params.get("user"):
        raise ProtocolError('no PostgreSQL user name specified in startup packet')
    return StartupMessage(code, params)


class StartupReader:
    """Reads untyped startup-phase packets from a byte stream, one at a time."""

    __slots__ = ("_buf", "_negotiated")

    def __init__(self) -> None:
        self._buf = bytearray()
        # SSLRequest / GSSENCRequest seen: one of each is allowed, as PostgreSQL
        # (ProcessStartupPacket); a second is a protocol violation, not answered again.
        self._negotiated: set[type] = set()

    def feed(self, data: bytes) -> None:
        self._buf += data

    def next_packet(self) -> StartupPacket | None:
        """The next whole packet, or None until enough bytes have arrived."""
        buf = self._buf
        if len(buf) < 4:
            return None
        (length,) = _INT32.unpack_from(buf, 0)
        if length < 8 or length > MAX_STARTUP_LENGTH:
            raise ProtocolError(f"invalid startup packet length {length}")
        if len(buf) < length:
            return None
        packet = bytes(buf[:length])
        del buf[:length]
        parsed = parse_startup_packet(packet)
        if isinstance(parsed, SSLRequest | GSSENCRequest):
            if type(parsed) in self._negotiated:
                raise ProtocolError(f"a second {type(parsed).__name__}")
            self._negotiated.add(type(parsed))
        return parsed

    def take_rest(self) -> bytes:
        """Bytes received after the last packet (a client may pipeline its first messages)."""
        rest = bytes(self._buf)
        self._buf.clear()
        return rest


Message = tuple[int, bytes | None]
"""A typed message as the reader reports it: (type byte, body), body None when skipped."""


class MessageReader:
    """Incremental reader of typed protocol messages.

    ``feed(data)`` returns every message that ``data`` completes, in order, as
    ``(type, body)``: ``body`` is the message's content for interesting types and ``None``
    for the others, whose bytes are counted past without being kept.
    """

    __slots__ = ("_buf", "_interesting", "_max_body", "_skip_remaining", "_skip_type", "ends")

    def __init__(self, interesting: Iterable[int] | None = None,
                 max_body: int = DEFAULT_MAX_BODY) -> None:
        # None means "keep every body": the reader then behaves as a plain framer.
        self._interesting: frozenset[int] | None = (
            None if interesting is None else frozenset(interesting))
        self._max_body = max_body
        self._buf = bytearray()
        self._skip_remaining = 0  # body bytes still to pass of a skipped message
        self._skip_type = 0
        # After each feed(): where in the fed data each returned message ends. A proxy that
        # must drop, insert or rewrite messages cuts the data at these offsets.
        self.ends: list[int] = []

    @property
    def buffered(self) -> int:
        """Bytes held for an incomplete message (bounded by max_body + 5)."""
        return len(self._buf)

    @property
    def mid_message(self) -> bool:
        """True while a message has started but not ended."""
        return bool(self._buf) or self._skip_remaining > 0

    @property
    def skipping(self) -> bool:
        """True while inside the body of a message that passes without being kept."""
        return self._skip_remaining > 0

    def feed(self, data: bytes | bytearray | memoryview) -> list[Message]:
        # The hot path of the pooler (every chunk either way goes through here): locals
        # only, the header checked inline, and ``bytes`` input sliced directly (one copy
        # per kept body, no memoryview objects).
        out: list[Message] = []
        ends: list[int] = []
        self.ends = ends
        src: bytes | memoryview = data if type(data) is bytes else memoryview(data)
        pos = 0
        end = len(src)
        if self._skip_remaining or self._buf:
            pos = self._feed_carried(src, end, out, ends)
            if pos < 0:
                return out
        buf = self._buf
        interesting = self._interesting
        unpack = _HEADER.unpack_from
        append = out.append
        append_end = ends.append
        copy = type(src) is not bytes
        while pos < end:
            if end - pos < 5:
                buf += src[pos:end]
                return out
            mtype, length = unpack(src, pos)
            total = length + 1
            if interesting is not None and mtype not in interesting:
                if length < 4 or length > MAX_MESSAGE_LENGTH + 4:
                    self._check_header(src, pos)  # raises, naming the problem
                if end - pos < total:
                    self._skip_remaining = total - (end - pos)
                    self._skip_type = mtype
                    return out
                append((mtype, None))
            else:
                if length < 4 or length > self._max_body + 4:
                    self._check_header(src, pos)
                if end - pos < total:
                    buf += src[pos:end]
                    return out
                body = src[pos + 5:pos + total]
                append((mtype, bytes(body) if copy else body))  # type: ignore[arg-type]
            pos += total
            append_end(pos)
        return out

    def _feed_carried(self, src: bytes | memoryview, end: int, out: list[Message],
                      ends: list[int]) -> int:
        """Finish what the previous chunk left open (a skipped body, a partial header or a
        kept body); the position to go on from, or -1 if ``src`` is used up."""
        pos = 0
        if self._skip_remaining:
            take = min(self._skip_remaining, end)
            self._skip_remaining -= take
            pos = take
            if self._skip_remaining:
                return -1
            out.append((self._skip_type, None))
            ends.append(pos)
        buf = self._buf
        interesting = self._interesting
        if buf:
            need = 5 - len(buf)
            if need > 0:
                buf += src[pos:pos + need]
                pos += min(need, end - pos)
                if len(buf) < 5:
                    return -1
                mtype, length = self._check_header(buf, 0)
                if interesting is not None and mtype not in interesting:
                    buf.clear()
                    remaining = length - 4
                    take = min(remaining, end - pos)
                    pos += take
                    if take < remaining:
                        self._skip_remaining = remaining - take
                        self._skip_type = mtype
                        return -1
                    out.append((mtype, None))
                    ends.append(pos)
            if buf:
                mtype, length = _HEADER.unpack_from(buf, 0)
                need = length + 1 - len(buf)
                take = min(need, end - pos)
                buf += src[pos:pos + take]
                pos += take
                if take < need:
                    return -1
                out.append((mtype, bytes(buf[5:])))
                ends.append(pos)
                buf.clear()
        return pos

    def _check_header(self, data: bytes | bytearray | memoryview, pos: int) -> tuple[int, int]:
        mtype, length = _HEADER.unpack_from(data, pos)
        if length < 4:
            raise ProtocolError(f"invalid message length {length} for message type "
                                f"{chr(mtype)!r}")
        limit = (MAX_MESSAGE_LENGTH if self._interesting is not None
                 and mtype not in self._interesting else self._max_body)
        if length - 4 > limit:
            raise ProtocolError(f"message type {chr(mtype)!r} of {length - 4} bytes exceeds "
                                f"the limit of {limit} bytes")
        return mtype, length
