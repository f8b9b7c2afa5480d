"""Builders and parsers of protocol messages: round trips, and malformed bodies.

Every builder's output is framed by :class:`MessageReader` (so it is exactly one well-formed
message of the right type) and read back by its parser. Parsers given malformed or random
bodies raise :class:`ProtocolError` and nothing else.
"""

from __future__ import annotations

import contextlib
import struct
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pgpilot.wire import messages as m
from pgpilot.wire.errors import ProtocolError
from pgpilot.wire.framing import (
    PROTOCOL_V3,
    CancelRequest,
    GSSENCRequest,
    MessageReader,
    SSLRequest,
    StartupMessage,
    StartupReader,
    parse_startup_packet,
)

FAST = settings(max_examples=40, deadline=None)

INT32 = st.integers(-(2**31), 2**31 - 1)
TEXT = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=30)
NAME = TEXT.filter(bool)


def body_of(wire: bytes, mtype: int) -> bytes:
    """The body of the single message ``wire``, checked by the framer."""
    got = MessageReader().feed(wire)
    assert len(got) == 1, got
    assert got[0][0] == mtype
    body = got[0][1]
    assert body is not None
    assert wire == bytes([mtype]) + struct.pack("!i", len(body) + 4) + body
    return body


def auth_body(wire: bytes) -> m.AuthRequest:
    return m.parse_auth_request(body_of(wire, m.B.AUTHENTICATION))


# -- startup phase -----------------------------------------------------------------------------

@FAST
@given(user=NAME, rest=st.dictionaries(NAME, TEXT, max_size=5), minor=st.integers(0, 3))
def test_startup_message_round_trip(user: str, rest: dict[str, str], minor: int) -> None:
    params = {**rest, "user": user}
    raw = m.startup_message(params, PROTOCOL_V3 | minor)
    assert parse_startup_packet(raw) == StartupMessage(PROTOCOL_V3 | minor, params)
    reader = StartupReader()
    reader.feed(raw)
    assert reader.next_packet() == StartupMessage(PROTOCOL_V3 | minor, params)
    assert reader.take_rest() == b""


def test_startup_message_default_protocol_and_database() -> None:
    pkt = parse_startup_packet(m.startup_message({"user": "u", "database": "d"}))
    assert pkt == StartupMessage(PROTOCOL_V3, {"user": "u", "database": "d"})
    assert isinstance(pkt, StartupMessage) and pkt.database == "d"


def test_startup_message_refuses_what_would_corrupt_it() -> None:
    with pytest.raises(ValueError):
        m.startup_message({"user": "u", "": "x"})
    with pytest.raises(ValueError):
        m.startup_message({"user": "u\x00v"})


def test_ssl_and_gssenc_requests() -> None:
    assert parse_startup_packet(m.ssl_request()) == SSLRequest()
    assert parse_startup_packet(m.gssenc_request()) == GSSENCRequest()
    assert len(m.ssl_request()) == len(m.gssenc_request()) == 8


@FAST
@given(pid=INT32, key=INT32)
def test_cancel_request_round_trip(pid: int, key: int) -> None:
    assert parse_startup_packet(m.cancel_request(pid, key)) == CancelRequest(pid, key)


# -- authentication ------------------------------------------------------------------------------

def test_simple_auth_requests() -> None:
    assert auth_body(m.auth_ok()) == m.AuthRequest(m.AUTH_OK, b"")
    assert auth_body(m.auth_cleartext()) == m.AuthRequest(m.AUTH_CLEARTEXT, b"")


@FAST
@given(salt=st.binary(min_size=4, max_size=4), data=st.binary(max_size=100))
def test_auth_requests_with_data(salt: bytes, data: bytes) -> None:
    assert auth_body(m.auth_md5(salt)) == m.AuthRequest(m.AUTH_MD5, salt)
    assert auth_body(m.auth_sasl_continue(data)) == m.AuthRequest(m.AUTH_SASL_CONTINUE, data)
    assert auth_body(m.auth_sasl_final(data)) == m.AuthRequest(m.AUTH_SASL_FINAL, data)


@FAST
@given(mechs=st.lists(NAME, max_size=4))
def test_auth_sasl_round_trip(mechs: list[str]) -> None:
    req = auth_body(m.auth_sasl(mechs))
    assert req.code == m.AUTH_SASL
    assert req.mechanisms == mechs


def test_sasl_mechanisms_that_do_not_decode_are_not_an_error() -> None:
    req = m.AuthRequest(m.AUTH_SASL, b"\xff\xfe\x00SCRAM-SHA-256\x00\x00")
    assert req.mechanisms[1] == "SCRAM-SHA-256"
    assert "SCRAM-SHA-256" not in req.mechanisms[:1]


@FAST
@given(password=TEXT)
def test_password_message_round_trip(password: str) -> None:
    body = body_of(m.password_message(password), m.F.PASSWORD)
    assert m.parse_password_message(body) == password
    body = body_of(m.password_message(password.encode()), m.F.PASSWORD)
    assert m.parse_password_message(body) == password


@FAST
@given(mech=NAME, data=st.binary(max_size=200))
def test_sasl_initial_response_round_trip(mech: str, data: bytes) -> None:
    body = body_of(m.sasl_initial_response(mech, data), m.F.PASSWORD)
    assert m.parse_sasl_initial_response(body) == (mech, data)


def test_sasl_initial_response_without_data() -> None:
    body = m.cstr("SCRAM-SHA-256") + struct.pack("!i", -1)
    assert m.parse_sasl_initial_response(body) == ("SCRAM-SHA-256", b"")


@FAST
@given(data=st.binary(max_size=200))
def test_sasl_response_carries_data_as_is(data: bytes) -> None:
    assert body_of(m.sasl_response(data), m.F.PASSWORD) == data


# -- session set-up and status ---------------------------------------------------------------

@FAST
@given(name=NAME, value=TEXT)
def test_parameter_status_round_trip(name: str, value: str) -> None:
    body = body_of(m.parameter_status(name, value), m.B.PARAMETER_STATUS)
    assert m.parse_parameter_status(body) == (name, value)


@FAST
@given(pid=INT32, key=INT32)
def test_backend_key_data_round_trip(pid: int, key: int) -> None:
    body = body_of(m.backend_key_data(pid, key), m.B.BACKEND_KEY_DATA)
    assert m.parse_backend_key_data(body) == (pid, key)


@pytest.mark.parametrize("status", ["I", "T", "E"])
def test_ready_for_query_round_trip(status: str) -> None:
    body = body_of(m.ready_for_query(status), m.B.READY_FOR_QUERY)
    assert m.parse_ready_for_query(body) == status
    assert m.ready_for_query() == m.READY_IDLE
    assert m.parse_ready_for_query(body_of(m.READY_IDLE, m.B.READY_FOR_QUERY)) == "I"


@pytest.mark.parametrize("body", [b"", b"X", b"II", b"i"])
def test_ready_for_query_malformed(body: bytes) -> None:
    with pytest.raises(ProtocolError):
        m.parse_ready_for_query(body)


# -- errors and notices ----------------------------------------------------------------------

@FAST
@given(sqlstate=st.text("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ", min_size=5, max_size=5),
       text=TEXT, severity=st.sampled_from(["ERROR", "FATAL", "PANIC"]),
       detail=st.none() | TEXT, hint=st.none() | TEXT)
def test_error_response_round_trip(sqlstate: str, text: str, severity: str,
                                   detail: str | None, hint: str | None) -> None:
    wire = m.error_response(sqlstate, text, severity=severity, detail=detail, hint=hint)
    fields = m.parse_error_fields(body_of(wire, m.B.ERROR_RESPONSE))
    want = {"S": severity, "V": severity, "C": sqlstate, "M": text}
    if detail:
        want["D"] = detail
    if hint:
        want["H"] = hint
    assert fields == want


@FAST
@given(text=TEXT, detail=st.none() | TEXT, hint=st.none() | TEXT)
def test_notice_response_round_trip(text: str, detail: str | None, hint: str | None) -> None:
    wire = m.notice_response(text, detail=detail, hint=hint)
    fields = m.parse_error_fields(body_of(wire, m.B.NOTICE_RESPONSE))
    assert fields["S"] == fields["V"] == "NOTICE"
    assert (fields["C"], fields["M"]) == ("00000", text)
    assert fields.get("D") == (detail or None)
    assert fields.get("H") == (hint or None)
    wire = m.notice_response(text, sqlstate="01000", severity="WARNING")
    fields = m.parse_error_fields(body_of(wire, m.B.NOTICE_RESPONSE))
    assert (fields["S"], fields["C"]) == ("WARNING", "01000")


def test_builders_refuse_nul_in_strings() -> None:
    with pytest.raises(ValueError):
        m.error_response("08P01", "bad\x00text")
    with pytest.raises(ValueError):
        m.query("SELECT 1\x00; DROP TABLE t")
    with pytest.raises(ValueError):
        m.parse_message("s\x001", "SELECT 1")


# -- queries and results ---------------------------------------------------------------------

@FAST
@given(sql=TEXT)
def test_query_round_trip(sql: str) -> None:
    assert m.parse_query(body_of(m.query(sql), m.F.QUERY)) == sql


@FAST
@given(tag=TEXT)
def test_command_complete_round_trip(tag: str) -> None:
    body = body_of(m.command_complete(tag), m.B.COMMAND_COMPLETE)
    assert m.parse_command_complete(body) == tag


@pytest.mark.parametrize(("builder", "mtype"), [
    (m.terminate, m.F.TERMINATE), (m.sync, m.F.SYNC), (m.flush, m.F.FLUSH),
    (m.empty_query_response, m.B.EMPTY_QUERY), (m.parse_complete, m.B.PARSE_COMPLETE),
    (m.close_complete, m.B.CLOSE_COMPLETE),
])
def test_empty_messages(builder: Callable[[], bytes], mtype: int) -> None:
    assert body_of(builder(), mtype) == b""


@FAST
@given(columns=st.lists(st.tuples(TEXT, INT32), max_size=8))
def test_row_description_round_trip(columns: list[tuple[str, int]]) -> None:
    body = body_of(m.row_description(columns), m.B.ROW_DESCRIPTION)
    assert m.parse_row_description(body) == columns


@FAST
@given(values=st.lists(st.none() | TEXT | st.binary(max_size=40), max_size=10))
def test_data_row_round_trip(values: list[str | bytes | None]) -> None:
    body = body_of(m.data_row(values), m.B.DATA_ROW)
    assert m.parse_data_row(body) == [
        v.encode() if isinstance(v, str) else v for v in values]


# -- extended query protocol --------------------------------------------------------------------

@FAST
@given(name=TEXT, sql=TEXT, types=st.lists(INT32, max_size=10))
def test_parse_round_trip(name: str, sql: str, types: list[int]) -> None:
    body = body_of(m.parse_message(name, sql, types), m.F.PARSE)
    assert m.parse_parse(body) == m.Parse(name, sql, tuple(types))


@FAST
@given(portal=TEXT, stmt=TEXT, rest=st.binary(max_size=100))
def test_bind_round_trip(portal: str, stmt: str, rest: bytes) -> None:
    body = body_of(m.bind_message(portal, stmt, rest), m.F.BIND)
    assert m.parse_bind(body) == m.Bind(portal, stmt, rest)


def decode_bind_rest(rest: bytes) -> tuple[list[int], list[bytes | None], list[int]]:
    """Parameter formats, values and result formats, decoded here independently."""
    pos = 0

    def i16() -> int:
        nonlocal pos
        (v,) = struct.unpack_from("!h", rest, pos)
        pos += 2
        return int(v)

    formats = [i16() for _ in range(i16())]
    values: list[bytes | None] = []
    for _ in range(i16()):
        (n,) = struct.unpack_from("!i", rest, pos)
        pos += 4
        values.append(None if n == -1 else rest[pos:pos + n])
        pos += max(n, 0)
    results = [i16() for _ in range(i16())]
    assert pos == len(rest)
    return formats, values, results


@FAST
@given(portal=TEXT, stmt=TEXT, params=st.lists(st.none() | TEXT, max_size=8))
def test_bind_simple_round_trip(portal: str, stmt: str, params: list[str | None]) -> None:
    bind = m.parse_bind(body_of(m.bind_simple(portal, stmt, params), m.F.BIND))
    assert (bind.portal, bind.statement) == (portal, stmt)
    formats, values, results = decode_bind_rest(bind.rest)
    assert formats == [] and results == []
    assert values == [None if p is None else p.encode() for p in params]


@FAST
@given(kind=st.sampled_from(["S", "P"]), name=TEXT)
def test_close_and_describe_round_trip(kind: str, name: str) -> None:
    body = body_of(m.close_message(kind, name), m.F.CLOSE)
    assert m.parse_close_or_describe(body) == (kind, name)
    body = body_of(m.describe_message(kind, name), m.F.DESCRIBE)
    assert m.parse_close_or_describe(body, "Describe") == (kind, name)


@FAST
@given(portal=TEXT, max_rows=INT32)
def test_execute_round_trip(portal: str, max_rows: int) -> None:
    body = body_of(m.execute_message(portal, max_rows), m.F.EXECUTE)
    assert m.parse_execute(body) == (portal, max_rows)
    assert m.parse_execute(body_of(m.execute_message(), m.F.EXECUTE)) == ("", 0)


# -- malformed bodies -----------------------------------------------------------------------

PARSERS: dict[str, Callable[[bytes], Any]] = {
    "auth_request": m.parse_auth_request,
    "auth_mechanisms": lambda b: m.parse_auth_request(b).mechanisms,
    "password": m.parse_password_message,
    "sasl_initial_response": m.parse_sasl_initial_response,
    "parameter_status": m.parse_parameter_status,
    "backend_key_data": m.parse_backend_key_data,
    "ready_for_query": m.parse_ready_for_query,
    "error_fields": m.parse_error_fields,
    "query": m.parse_query,
    "command_complete": m.parse_command_complete,
    "row_description": m.parse_row_description,
    "data_row": m.parse_data_row,
    "parse": m.parse_parse,
    "bind": m.parse_bind,
    "close": m.parse_close_or_describe,
    "describe": lambda b: m.parse_close_or_describe(b, "Describe"),
    "execute": m.parse_execute,
    "startup_packet": parse_startup_packet,
}

# A valid body per parser: the seeds the malformed ones are derived from.
VALID_BODIES: dict[str, bytes] = {
    "auth_request": m.auth_md5(b"salt")[5:],
    "auth_mechanisms": m.auth_sasl(["SCRAM-SHA-256", "SCRAM-SHA-256-PLUS"])[5:],
    "password": m.password_message("hunter2")[5:],
    "sasl_initial_response": m.sasl_initial_response("SCRAM-SHA-256", b"n,,n=,r=abc")[5:],
    "parameter_status": m.parameter_status("TimeZone", "UTC")[5:],
    "backend_key_data": m.backend_key_data(1234, -5678)[5:],
    "ready_for_query": m.ready_for_query("T")[5:],
    "error_fields": m.error_response("28P01", "no", detail="d", hint="h")[5:],
    "query": m.query("SELECT 1")[5:],
    "command_complete": m.command_complete("SELECT 1")[5:],
    "row_description": m.row_description([("a", 23), ("bé", 25)])[5:],
    "data_row": m.data_row(["1", None, b"\x00\x01"])[5:],
    "parse": m.parse_message("s1", "SELECT $1, $2", [23, 25])[5:],
    "bind": m.bind_simple("p", "s1", ["1", None])[5:],
    "close": m.close_message("S", "s1")[5:],
    "describe": m.describe_message("P", "")[5:],
    "execute": m.execute_message("p", 10)[5:],
    "startup_packet": m.startup_message({"user": "bob", "database": "db"}),
}


def parse_or_protocol_error(parser: Callable[[bytes], Any], body: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        parser(body)


@pytest.mark.parametrize("name", PARSERS)
def test_valid_seed_bodies_parse(name: str) -> None:
    PARSERS[name](VALID_BODIES[name])


@pytest.mark.parametrize("name", PARSERS)
def test_every_truncation_is_parsed_or_refused(name: str) -> None:
    body = VALID_BODIES[name]
    for n in range(len(body)):
        parse_or_protocol_error(PARSERS[name], body[:n])


@pytest.mark.parametrize("name", PARSERS)
@settings(max_examples=40, deadline=None)
@given(data=st.binary(max_size=120))
def test_random_bytes_only_ever_raise_protocol_error(name: str, data: bytes) -> None:
    parse_or_protocol_error(PARSERS[name], data)


@pytest.mark.parametrize("name", PARSERS)
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_mutated_bodies_only_ever_raise_protocol_error(name: str, data: st.DataObject) -> None:
    body = bytearray(VALID_BODIES[name])
    for _ in range(data.draw(st.integers(1, 4))):
        action = data.draw(st.sampled_from(["flip", "insert", "delete"]))
        pos = data.draw(st.integers(0, len(body)))
        value = data.draw(st.sampled_from([0x00, 0xFF, 0x80, 0x7F, 0x01, ord("S")]))
        if action == "flip" and pos < len(body):
            body[pos] = value
        elif action == "insert":
            body.insert(pos, value)
        elif pos < len(body):
            del body[pos]
    parse_or_protocol_error(PARSERS[name], bytes(body))


MALFORMED = [
    ("password", b"hunter2"),  # unterminated
    ("password", b"hunter2\x00junk"),  # trailing bytes: PostgreSQL refuses them too
    ("password", b"\xff\xfe\x00"),  # not UTF-8
    ("sasl_initial_response", m.cstr("SCRAM-SHA-256") + struct.pack("!i", 10) + b"short"),
    ("sasl_initial_response", m.cstr("SCRAM-SHA-256") + struct.pack("!i", -2)),
    ("sasl_initial_response", m.cstr("SCRAM-SHA-256") + struct.pack("!i", 1) + b"ab"),
    ("parameter_status", b"TimeZone\x00"),
    ("backend_key_data", b"\x00\x00\x00\x01\x00\x00"),
    ("error_fields", b"SERROR\x00CXX000"),
    ("error_fields", b"SERROR\x00"),  # no final terminator
    ("query", b"SELECT 1"),
    ("query", b"SELECT 1\x00; SELECT 2\x00"),
    ("row_description", struct.pack("!h", -1)),
    ("row_description", struct.pack("!h", 2) + b"a\x00" + bytes(18)),
    ("data_row", struct.pack("!h", -1)),
    ("data_row", struct.pack("!hi", 1, 5) + b"abc"),
    ("data_row", struct.pack("!hi", 1, -2)),
    ("parse", b"s\x00SELECT 1\x00" + struct.pack("!h", -1)),
    ("parse", b"s\x00SELECT 1\x00" + struct.pack("!hi", 2, 23)),
    ("parse", b"s\x00SELECT 1\x00" + struct.pack("!h", 0) + b"x"),
    ("bind", b"portal\x00"),
    ("close", b"X\x00"),
    ("close", b"S"),
    ("close", b"Sname\x00extra"),
    ("describe", b""),
    ("execute", b"p\x00\x00\x00"),
    ("execute", b"p\x00" + struct.pack("!i", 0) + b"x"),
    ("auth_request", b"\x00\x00"),
]


@pytest.mark.parametrize(("name", "body"), MALFORMED)
def test_malformed_bodies_are_refused(name: str, body: bytes) -> None:
    with pytest.raises(ProtocolError):
        PARSERS[name](body)


def test_protocol_error_carries_sqlstate_and_message() -> None:
    with pytest.raises(ProtocolError) as info:
        m.parse_query(b"SELECT 1")
    assert info.value.sqlstate == "08P01"
    assert "Query" in info.value.message
