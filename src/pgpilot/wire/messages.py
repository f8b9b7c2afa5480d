"""Builders and parsers for the protocol messages the pooler reads or writes.

Builders return the complete wire bytes of one message. Parsers take the *body* of a message
(what :class:`pgpilot.wire.framing.MessageReader` reports, without type byte and length) and
raise :class:`ProtocolError` on malformed content. Type bytes are named in :class:`F` (frontend,
client to server) and :class:`B` (backend, server to client).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from pgpilot.wire.errors import ProtocolError
from pgpilot.wire.framing import (
    CANCEL_REQUEST_CODE,
    GSSENC_REQUEST_CODE,
    PROTOCOL_V3,
    SSL_REQUEST_CODE,
)

_I32 = struct.Struct("!i")
_I16 = struct.Struct("!h")


class F:
    """Frontend message type bytes."""

    QUERY = ord("Q")
    PARSE = ord("P")
    BIND = ord("B")
    EXECUTE = ord("E")
    DESCRIBE = ord("D")
    CLOSE = ord("C")
    SYNC = ord("S")
    FLUSH = ord("H")
    TERMINATE = ord("X")
    COPY_DATA = ord("d")
    COPY_DONE = ord("c")
    COPY_FAIL = ord("f")
    PASSWORD = ord("p")  # also SASLInitialResponse / SASLResponse
    FUNCTION_CALL = ord("F")


class B:
    """Backend message type bytes."""

    AUTHENTICATION = ord("R")
    BACKEND_KEY_DATA = ord("K")
    PARAMETER_STATUS = ord("S")
    READY_FOR_QUERY = ord("Z")
    ERROR_RESPONSE = ord("E")
    NOTICE_RESPONSE = ord("N")
    NOTIFICATION = ord("A")
    COMMAND_COMPLETE = ord("C")
    ROW_DESCRIPTION = ord("T")
    DATA_ROW = ord("D")
    EMPTY_QUERY = ord("I")
    PARSE_COMPLETE = ord("1")
    BIND_COMPLETE = ord("2")
    CLOSE_COMPLETE = ord("3")
    NO_DATA = ord("n")
    PORTAL_SUSPENDED = ord("s")
    PARAMETER_DESCRIPTION = ord("t")
    COPY_IN = ord("G")
    COPY_OUT = ord("H")
    COPY_BOTH = ord("W")
    COPY_DATA = ord("d")
    COPY_DONE = ord("c")
    NEGOTIATE_PROTOCOL = ord("v")


# Authentication request codes (the int32 after 'R').
AUTH_OK = 0
AUTH_CLEARTEXT = 3
AUTH_MD5 = 5
AUTH_SASL = 10
AUTH_SASL_CONTINUE = 11
AUTH_SASL_FINAL = 12


def message(mtype: int, body: bytes = b"") -> bytes:
    """One typed message: type byte, int32 length (counting itself), body."""
    return bytes((mtype,)) + _I32.pack(len(body) + 4) + body


def cstr(text: str) -> bytes:
    """A NUL-terminated string; an embedded NUL would corrupt the message, so it is refused."""
    if "\x00" in text:
        raise ValueError(f"a protocol string cannot contain NUL: {text[:60]!r}")
    return text.encode() + b"\x00"


class _Cursor:
    """Reads fields off a message body, raising ProtocolError past its end."""

    __slots__ = ("data", "pos", "what")

    def __init__(self, data: bytes, what: str) -> None:
        self.data = data
        self.pos = 0
        self.what = what

    def _fail(self, detail: str) -> ProtocolError:
        return ProtocolError(f"malformed {self.what} message: {detail}")

    def cstr(self) -> str:
        end = self.data.find(b"\x00", self.pos)
        if end < 0:
            raise self._fail("unterminated string")
        raw = self.data[self.pos:end]
        self.pos = end + 1
        try:
            return raw.decode()
        except UnicodeDecodeError as exc:
            raise self._fail("invalid UTF-8") from exc

    def int32(self) -> int:
        if self.pos + 4 > len(self.data):
            raise self._fail("truncated")
        (value,) = _I32.unpack_from(self.data, self.pos)
        self.pos += 4
        return int(value)

    def int16(self) -> int:
        if self.pos + 2 > len(self.data):
            raise self._fail("truncated")
        (value,) = _I16.unpack_from(self.data, self.pos)
        self.pos += 2
        return int(value)

    def byte(self) -> int:
        if self.pos >= len(self.data):
            raise self._fail("truncated")
        value = self.data[self.pos]
        self.pos += 1
        return value

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise self._fail("truncated")
        value = self.data[self.pos:self.pos + n]
        self.pos += n
        return value

    def rest(self) -> bytes:
        value = self.data[self.pos:]
        self.pos = len(self.data)
        return value

    def count(self) -> int:
        """An int16 count of what follows, which cannot be negative."""
        n = self.int16()
        if n < 0:
            raise self._fail(f"negative count {n}")
        return n

    def end(self) -> None:
        """The body must end here (PostgreSQL rejects trailing bytes in what clients send)."""
        if self.pos != len(self.data):
            raise self._fail(f"{len(self.data) - self.pos} unexpected bytes at the end")


# ---------------------------------------------------------------------------------------
# Startup phase (untyped packets)
# ---------------------------------------------------------------------------------------

def startup_message(params: Mapping[str, str], protocol: int = PROTOCOL_V3) -> bytes:
    if "" in params:
        raise ValueError("a startup parameter name cannot be empty (it ends the list)")
    body = _I32.pack(protocol) + b"".join(cstr(k) + cstr(v) for k, v in params.items()) + b"\x00"
    return _I32.pack(len(body) + 4) + body


def ssl_request() -> bytes:
    return _I32.pack(8) + _I32.pack(SSL_REQUEST_CODE)


def gssenc_request() -> bytes:
    return _I32.pack(8) + _I32.pack(GSSENC_REQUEST_CODE)


def cancel_request(pid: int, key: int) -> bytes:
    return _I32.pack(16) + _I32.pack(CANCEL_REQUEST_CODE) + _I32.pack(pid) + _I32.pack(key)


# ---------------------------------------------------------------------------------------
# Authentication
# ---------------------------------------------------------------------------------------

def auth_ok() -> bytes:
    return message(B.AUTHENTICATION, _I32.pack(AUTH_OK))


def auth_cleartext() -> bytes:
    return message(B.AUTHENTICATION, _I32.pack(AUTH_CLEARTEXT))


def auth_md5(salt: bytes) -> bytes:
    return message(B.AUTHENTICATION, _I32.pack(AUTH_MD5) + salt)


def auth_sasl(mechanisms: Sequence[str]) -> bytes:
    return message(B.AUTHENTICATION,
                   _I32.pack(AUTH_SASL) + b"".join(cstr(m) for m in mechanisms) + b"\x00")


def auth_sasl_continue(data: bytes) -> bytes:
    return message(B.AUTHENTICATION, _I32.pack(AUTH_SASL_CONTINUE) + data)


def auth_sasl_final(data: bytes) -> bytes:
    return message(B.AUTHENTICATION, _I32.pack(AUTH_SASL_FINAL) + data)


@dataclass(frozen=True, slots=True)
class AuthRequest:
    """An Authentication message from a server: its code and what follows it."""

    code: int
    data: bytes = b""

    @property
    def mechanisms(self) -> list[str]:
        # Undecodable names cannot match a mechanism the pooler knows; they are not an error.
        return [m.decode(errors="replace") for m in self.data.split(b"\x00") if m]


def parse_auth_request(body: bytes) -> AuthRequest:
    cur = _Cursor(body, "Authentication")
    return AuthRequest(cur.int32(), cur.rest())


def password_message(password: str | bytes) -> bytes:
    raw = password.encode() if isinstance(password, str) else password
    return message(F.PASSWORD, raw + b"\x00")


def parse_password_message(body: bytes) -> str:
    cur = _Cursor(body, "PasswordMessage")
    password = cur.cstr()
    cur.end()
    return password


def sasl_initial_response(mechanism: str, data: bytes) -> bytes:
    return message(F.PASSWORD, cstr(mechanism) + _I32.pack(len(data)) + data)


def parse_sasl_initial_response(body: bytes) -> tuple[str, bytes]:
    cur = _Cursor(body, "SASLInitialResponse")
    mech = cur.cstr()
    length = cur.int32()
    data = b"" if length == -1 else cur.take(length)
    cur.end()
    return mech, data


def sasl_response(data: bytes) -> bytes:
    return message(F.PASSWORD, data)


# ---------------------------------------------------------------------------------------
# Session set-up and status
# ---------------------------------------------------------------------------------------

def parameter_status(name: str, value: str) -> bytes:
    return message(B.PARAMETER_STATUS, cstr(name) + cstr(value))


def parse_parameter_status(body: bytes) -> tuple[str, str]:
    cur = _Cursor(body, "ParameterStatus")
    return cur.cstr(), cur.cstr()


def backend_key_data(pid: int, key: int) -> bytes:
    return message(B.BACKEND_KEY_DATA, _I32.pack(pid) + _I32.pack(key))


def parse_backend_key_data(body: bytes) -> tuple[int, int]:
    cur = _Cursor(body, "BackendKeyData")
    return cur.int32(), cur.int32()


def ready_for_query(status: str = "I") -> bytes:
    return message(B.READY_FOR_QUERY, status.encode())


READY_IDLE = ready_for_query("I")


def parse_ready_for_query(body: bytes) -> str:
    """The transaction status: 'I' idle, 'T' in a transaction, 'E' in a failed one."""
    if len(body) != 1 or body not in (b"I", b"T", b"E"):
        raise ProtocolError(f"malformed ReadyForQuery message: status {body[:8]!r}")
    return chr(body[0])


# ---------------------------------------------------------------------------------------
# Errors and notices
# ---------------------------------------------------------------------------------------

def _fields(severity: str, sqlstate: str, text: str, detail: str | None,
            hint: str | None) -> bytes:
    parts = [b"S" + cstr(severity), b"V" + cstr(severity), b"C" + cstr(sqlstate),
             b"M" + cstr(text)]
    if detail:
        parts.append(b"D" + cstr(detail))
    if hint:
        parts.append(b"H" + cstr(hint))
    return b"".join(parts) + b"\x00"


def error_response(sqlstate: str, text: str, *, severity: str = "ERROR",
                   detail: str | None = None, hint: str | None = None) -> bytes:
    return message(B.ERROR_RESPONSE, _fields(severity, sqlstate, text, detail, hint))


def notice_response(text: str, *, sqlstate: str = "00000", severity: str = "NOTICE",
                    detail: str | None = None, hint: str | None = None) -> bytes:
    return message(B.NOTICE_RESPONSE, _fields(severity, sqlstate, text, detail, hint))


def parse_error_fields(body: bytes) -> dict[str, str]:
    """ErrorResponse / NoticeResponse fields by their one-letter code (S, C, M, D, H ...)."""
    cur = _Cursor(body, "ErrorResponse")
    fields: dict[str, str] = {}
    while True:
        code = cur.byte()
        if code == 0:
            return fields
        fields[chr(code)] = cur.cstr()


# ---------------------------------------------------------------------------------------
# Queries and results
# ---------------------------------------------------------------------------------------

def query(sql: str) -> bytes:
    return message(F.QUERY, cstr(sql))


def parse_query(body: bytes) -> str:
    cur = _Cursor(body, "Query")
    sql = cur.cstr()
    cur.end()
    return sql


def terminate() -> bytes:
    return message(F.TERMINATE)


def sync() -> bytes:
    return message(F.SYNC)


def flush() -> bytes:
    return message(F.FLUSH)


def command_complete(tag: str) -> bytes:
    return message(B.COMMAND_COMPLETE, cstr(tag))


def parse_command_complete(body: bytes) -> str:
    return _Cursor(body, "CommandComplete").cstr()


def empty_query_response() -> bytes:
    return message(B.EMPTY_QUERY)


def row_description(columns: Sequence[tuple[str, int]]) -> bytes:
    """Columns as (name, type oid), all in text format."""
    body = _I16.pack(len(columns))
    for name, oid in columns:
        body += cstr(name) + struct.pack("!ihihih", 0, 0, oid, -1, -1, 0)
    return message(B.ROW_DESCRIPTION, body)


def parse_row_description(body: bytes) -> list[tuple[str, int]]:
    cur = _Cursor(body, "RowDescription")
    cols = []
    for _ in range(cur.count()):
        name = cur.cstr()
        cur.take(6)
        oid = cur.int32()
        cur.take(8)
        cols.append((name, oid))
    return cols


def data_row(values: Iterable[str | bytes | None]) -> bytes:
    vals = list(values)
    parts = [_I16.pack(len(vals))]
    for value in vals:
        if value is None:
            parts.append(_I32.pack(-1))
        else:
            raw = value.encode() if isinstance(value, str) else value
            parts.append(_I32.pack(len(raw)) + raw)
    return message(B.DATA_ROW, b"".join(parts))


def parse_data_row(body: bytes) -> list[bytes | None]:
    cur = _Cursor(body, "DataRow")
    out: list[bytes | None] = []
    for _ in range(cur.count()):
        n = cur.int32()
        out.append(None if n == -1 else cur.take(n))
    return out


# ---------------------------------------------------------------------------------------
# Extended query protocol
# ---------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Parse:
    name: str
    sql: str
    param_types: tuple[int, ...]


def parse_parse(body: bytes) -> Parse:
    cur = _Cursor(body, "Parse")
    name = cur.cstr()
    sql = cur.cstr()
    types = tuple(cur.int32() for _ in range(cur.count()))
    cur.end()
    return Parse(name, sql, types)


def parse_message(name: str, sql: str, param_types: Sequence[int] = ()) -> bytes:
    body = cstr(name) + cstr(sql) + _I16.pack(len(param_types))
    body += b"".join(_I32.pack(t) for t in param_types)
    return message(F.PARSE, body)


@dataclass(frozen=True, slots=True)
class Bind:
    portal: str
    statement: str
    rest: bytes  # parameter formats, values and result formats, kept as they came


def parse_bind(body: bytes) -> Bind:
    cur = _Cursor(body, "Bind")
    portal = cur.cstr()
    stmt = cur.cstr()
    return Bind(portal, stmt, cur.rest())


def bind_message(portal: str, statement: str, rest: bytes) -> bytes:
    return message(F.BIND, cstr(portal) + cstr(statement) + rest)


def bind_simple(portal: str, statement: str, params: Sequence[str | None] = ()) -> bytes:
    """Bind with text parameters and text results."""
    body = _I16.pack(0) + _I16.pack(len(params))
    for p in params:
        if p is None:
            body += _I32.pack(-1)
        else:
            raw = p.encode()
            body += _I32.pack(len(raw)) + raw
    body += _I16.pack(0)
    return bind_message(portal, statement, body)


def parse_close_or_describe(body: bytes, what: str = "Close") -> tuple[str, str]:
    """(kind, name) of Close or Describe: kind 'S' (statement) or 'P' (portal)."""
    cur = _Cursor(body, what)
    kind = chr(cur.byte())
    if kind not in ("S", "P"):
        raise ProtocolError(f"malformed {what} message: unknown kind {kind!r}")
    name = cur.cstr()
    cur.end()
    return kind, name


def close_message(kind: str, name: str) -> bytes:
    return message(F.CLOSE, kind.encode() + cstr(name))


def describe_message(kind: str, name: str) -> bytes:
    return message(F.DESCRIBE, kind.encode() + cstr(name))


def execute_message(portal: str = "", max_rows: int = 0) -> bytes:
    return message(F.EXECUTE, cstr(portal) + _I32.pack(max_rows))


def parse_execute(body: bytes) -> tuple[str, int]:
    """(portal, max_rows) of Execute; max_rows 0 means all."""
    cur = _Cursor(body, "Execute")
    portal = cur.cstr()
    max_rows = cur.int32()
    cur.end()
    return portal, max_rows


def parse_complete() -> bytes:
    return message(B.PARSE_COMPLETE)


def close_complete() -> bytes:
    return message(B.CLOSE_COMPLETE)
