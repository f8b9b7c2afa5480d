"""Protocol-level prepared statements under transaction pooling.

A client that prepares ``stmt1`` expects to find it on "its" connection, but in transaction
mode each transaction may run on another server. So the pooler keeps, per client, what each of
its statement names means (the Parse it sent), and gives every distinct statement (SQL text and
parameter types) one server-side name, ``pgpilot_<hash>``, shared by all clients. Per server it
remembers which of those names exist there (at most ``max_prepared_statements``, least recently
used closed first).

Then, message by message:

- Parse "stmt1": remembered. Sent as Parse "pgpilot_<hash>" only if this server lacks it;
  otherwise not sent at all and the client gets its ParseComplete from the pooler.
- Bind / Describe of "stmt1": renamed; if the server lacks the statement, a Parse is slipped in
  before, whose ParseComplete the client never sees.
- Close "stmt1": forgotten and answered by the pooler (the server's copy stays for others).
- DEALLOCATE ALL / DISCARD ALL, however sent: known by the CommandComplete tag the server
  answers with (as PgBouncer does), so only a drop that happened counts. The server's
  statements and the client's are gone then, but for those Parsed after it.
- If the pooler's record of a server ever disagrees with the server (it says a statement
  is missing, or already exists), the record is corrected at that error, so the next attempt
  works.

Answers the pooler makes up, or swallows, must sit exactly where the client expects them in the
response stream, so the router keeps a queue of what each forwarded message will be answered
with (PostgreSQL answers strictly in order, and after an error skips to the next Sync).
"""

from __future__ import annotations

import collections
import hashlib
from typing import TYPE_CHECKING, NamedTuple

from pgpilot.wire import messages as m

if TYPE_CHECKING:
    from pgpilot.proxy.server import ServerConnection

F = m.F
B = m.B

# What a forwarded (or made-up) request is answered with.
QUERY = 0  # simple Query or FunctionCall: everything up to ReadyForQuery
PARSE = 1  # ParseComplete
BIND = 2  # BindComplete
DESCRIBE = 3  # [ParameterDescription] RowDescription | NoData
EXECUTE = 4  # rows, then CommandComplete | EmptyQueryResponse | PortalSuspended
CLOSE = 5  # CloseComplete
SYNC = 6  # ReadyForQuery
FAKE_PARSE = 7  # the pooler answers ParseComplete itself
FAKE_CLOSE = 8  # the pooler answers CloseComplete itself
SWALLOW_PARSE = 9  # the pooler's own Parse: its ParseComplete is dropped
SWALLOW_CLOSE = 10  # the pooler's own Close: its CloseComplete is dropped

_ENDS: dict[int, frozenset[int]] = {
    QUERY: frozenset({B.READY_FOR_QUERY}),
    PARSE: frozenset({B.PARSE_COMPLETE}),
    SWALLOW_PARSE: frozenset({B.PARSE_COMPLETE}),
    BIND: frozenset({B.BIND_COMPLETE}),
    DESCRIBE: frozenset({B.ROW_DESCRIPTION, B.NO_DATA}),
    EXECUTE: frozenset({B.COMMAND_COMPLETE, B.EMPTY_QUERY, B.PORTAL_SUSPENDED}),
    CLOSE: frozenset({B.CLOSE_COMPLETE}),
    SWALLOW_CLOSE: frozenset({B.CLOSE_COMPLETE}),
    SYNC: frozenset({B.READY_FOR_QUERY}),
}
# What the messages the router never renames are owed.
_OWED = {F.QUERY: QUERY, F.FUNCTION_CALL: QUERY, F.SYNC: SYNC, F.EXECUTE: EXECUTE,
         F.PARSE: PARSE, F.BIND: BIND, F.DESCRIBE: DESCRIBE, F.CLOSE: CLOSE}
_SPECIAL = frozenset({FAKE_PARSE, FAKE_CLOSE, SWALLOW_PARSE, SWALLOW_CLOSE})
_FAKE_REPLY = {FAKE_PARSE: m.parse_complete(), FAKE_CLOSE: m.close_complete()}
# Messages a server may send at any time, answering nothing.
_ASYNC = frozenset({B.NOTICE_RESPONSE, B.NOTIFICATION, B.PARAMETER_STATUS})
_RESULT_CHANGED = "cached plan must not change result type"
# CommandComplete bodies of the commands that drop every prepared statement of the session.
DROP_TAGS = frozenset({b"DEALLOCATE ALL\x00", b"DISCARD ALL\x00"})
_DUPLICATE_STATEMENT = "42P05"  # prepared statement ... already exists
_UNDEFINED_STATEMENT = "26000"  # prepared statement ... does not exist


class ClientStatement(NamedTuple):
    """What a client's statement name means. A tuple: the compiled fast path reads
    ``server_name`` (item 0) on every Bind it renames (_fastpath.c, "named statements")."""

    server_name: str  # ASCII: pgpilot_<hex>
    server_parse: bytes  # the whole Parse message under the server-side name


def server_statement_name(parse: m.Parse) -> str:
    digest = hashlib.blake2b(digest_size=12)
    digest.update(parse.sql.encode())
    digest.update(b"\x00" + ",".join(map(str, parse.param_types)).encode())
    return "pgpilot_" + digest.hexdigest()


Entry = tuple[int, str | None]  # (what answers it, server-side statement name or None)


class StatementRouter:
    """One client's statement names, and the answers owed to it on its current server."""

    __slots__ = ("held", "max_prepared", "outstanding", "skipping", "statements", "surgery")

    def __init__(self, max_prepared: int) -> None:
        self.max_prepared = max_prepared
        self.statements: dict[str, ClientStatement] = {}
        self.outstanding: collections.deque[Entry] = collections.deque()
        self.held = b""  # server bytes of a message not yet complete
        # True from the first made-up or swallowed answer queued until the queue empties:
        # until then server bytes must be cut and pieced, otherwise they pass untouched.
        self.surgery = False
        # True from an error in the extended protocol, when the client had not sent its Sync
        # yet, until it does: PostgreSQL skips what comes in between, so nothing is owed for
        # it and nothing it would have prepared exists.
        self.skipping = False

    # -- client to server -----------------------------------------------------------------
    def client_chunk(self, data: bytes, msgs: list[tuple[int, bytes | None]],
                     ends: list[int], continued: bytes, server: ServerConnection,
                     renamable: bool = True) -> tuple[bytes, bytes]:
        """Rewrite a client chunk for ``server``.

        ``continued`` holds the bytes of the first message that arrived in earlier chunks and
        were not sent yet; ``renamable`` is False when no Parse, Bind, Describe or Close in
        ``msgs`` names a statement (unnamed ones pass as they are). Returns (bytes for the
        server, bytes held back: the start of a message not complete yet).
        """
        outstanding = self.outstanding
        if not renamable and not continued and ends and ends[-1] == len(data) \
                and not self.skipping:
            # Nothing to rename (the common case): only note what each message is owed.
            for mtype, _body in msgs:
                owed = _OWED.get(mtype)
                if owed is not None:
                    outstanding.append((owed, None))
            return data, b""
        out = bytearray()
        prev = 0
        for (mtype, body), end in zip(msgs, ends, strict=True):
            raw = data[prev:end]
            if prev == 0 and continued:
                raw = continued + raw
            prev = end
            if self.skipping:
                if mtype != F.SYNC:
                    out += raw  # skipped by the server as well: owed nothing
                    continue
                self.skipping = False
            if mtype == F.SYNC:
                outstanding.append((SYNC, None))
                out += raw
            elif mtype == F.BIND and body is not None:
                bind = m.parse_bind(body)
                stmt = self.statements.get(bind.statement) if bind.statement else None
                if stmt is None:
                    outstanding.append((BIND, None))
                    out += raw
                else:
                    out += self._ensure_on_server(stmt, server)
                    outstanding.append((BIND, stmt.server_name))
                    out += m.bind_message(bind.portal, stmt.server_name, bind.rest)
            elif mtype == F.EXECUTE:
                outstanding.append((EXECUTE, None))
                out += raw
            elif mtype == F.PARSE and body is not None:
                out += self._parse(body, raw, server)
            elif mtype == F.DESCRIBE and body is not None:
                target, name = m.parse_close_or_describe(body, "Describe")
                stmt = self.statements.get(name) if target == "S" and name else None
                if stmt is None:
                    outstanding.append((DESCRIBE, None))
                    out += raw
                else:
                    out += self._ensure_on_server(stmt, server)
                    outstanding.append((DESCRIBE, stmt.server_name))
                    out += m.describe_message("S", stmt.server_name)
            elif mtype == F.CLOSE and body is not None:
                target, name = m.parse_close_or_describe(body, "Close")
                if target == "S" and name:
                    # Answered here: the server's copy stays for the other clients.
                    self.statements.pop(name, None)
                    outstanding.append((FAKE_CLOSE, None))
                    self.surgery = True
                else:
                    outstanding.append((CLOSE, None))
                    out += raw
            elif mtype in (F.QUERY, F.FUNCTION_CALL):
                outstanding.append((QUERY, None))
                out += raw
            else:
                out += raw  # Flush, CopyData/Done/Fail: no answer of their own
        return bytes(out), data[prev:] if prev < len(data) else b""

    def _parse(self, body: bytes, raw: bytes, server: ServerConnection) -> bytes:
        parse = m.parse_parse(body)
        if not parse.name:
            self.outstanding.append((PARSE, None))
            return raw
        server_name = server_statement_name(parse)
        stmt = ClientStatement(server_name, m.parse_message(server_name, parse.sql,
                                                            parse.param_types))
        # PostgreSQL would refuse to redefine a name; the pooler lets the newest Parse win.
        self.statements[parse.name] = stmt
        if server_name in server.prepared:
            server.prepared.move_to_end(server_name)
            self.outstanding.append((FAKE_PARSE, server_name))
            self.surgery = True
            return b""
        out = self._make_room(server)
        server.prepared[server_name] = None
        self.outstanding.append((PARSE, server_name))
        return out + stmt.server_parse

    def _ensure_on_server(self, stmt: ClientStatement, server: ServerConnection) -> bytes:
        """The Parse to slip in first when ``server`` lacks the statement (else nothing)."""
        if stmt.server_name in server.prepared:
            server.prepared.move_to_end(stmt.server_name)
            return b""
        out = self._make_room(server)
        server.prepared[stmt.server_name] = None
        self.outstanding.append((SWALLOW_PARSE, stmt.server_name))
        self.surgery = True
        return out + stmt.server_parse

    def _make_room(self, server: ServerConnection) -> bytes:
        """Close statements the server must drop: stale ones, then the least recently used."""
        out = b""
        while server.stale_statements:
            name = server.stale_statements.pop()
            out += m.close_message("S", name)
            self.outstanding.append((SWALLOW_CLOSE, name))
            self.surgery = True
        while self.max_prepared and len(server.prepared) >= self.max_prepared:
            name, _ = server.prepared.popitem(last=False)
            out += m.close_message("S", name)
            self.outstanding.append((SWALLOW_CLOSE, name))
            self.surgery = True
        return out

    def replies_due(self) -> bytes:
        """Answers the pooler owes the client right now (nothing is pending before them)."""
        out = b""
        outstanding = self.outstanding
        while outstanding and outstanding[0][0] in _FAKE_REPLY:
            out += _FAKE_REPLY[outstanding.popleft()[0]]
        return out

    # -- server to client -----------------------------------------------------------------
    def server_chunk(self, data: bytes, msgs: list[tuple[int, bytes | None]],
                     ends: list[int], server: ServerConnection,
                     streaming: bool, error_seen: bool) -> bytes:
        """What the client gets of a server chunk: in order, with made-up answers added and
        the pooler's own answers removed. ``streaming`` says the chunk ends inside a message
        that passes without being kept (its bytes can go now); ``error_seen`` that ``msgs``
        hold an ErrorResponse."""
        outstanding = self.outstanding
        if not outstanding and not self.held:
            return data
        if not self.held and not self.surgery and not error_seen:
            # No answer to add or drop: pass the bytes as they are and only keep count.
            self._count_only(msgs, server)
            return data
        out = bytearray()
        prev = 0
        for (mtype, body), end in zip(msgs, ends, strict=True):
            raw = data[prev:end]
            if prev == 0 and self.held:
                raw = self.held + raw
                self.held = b""
            prev = end
            if mtype == B.DATA_ROW or mtype in _ASYNC or not outstanding:
                out += raw
                continue
            out += self.replies_due()
            if not outstanding:
                out += raw
                continue
            kind, name = outstanding[0]
            if mtype == B.ERROR_RESPONSE:
                out += self._error(kind, name, body, raw, server)
                continue
            if mtype == B.COMMAND_COMPLETE and body in DROP_TAGS:
                self._statements_dropped(server)
            if mtype in _ENDS.get(kind, ()):
                outstanding.popleft()
                if kind in (SWALLOW_PARSE, SWALLOW_CLOSE):
                    continue
            out += raw
            out += self.replies_due()
        tail = data[prev:]
        if tail:
            if streaming:
                out += self.held + tail
                self.held = b""
            else:
                self.held += tail
        if not outstanding:
            self.surgery = False
        return bytes(out)

    def _count_only(self, msgs: list[tuple[int, bytes | None]],
                    server: ServerConnection) -> None:
        """Advance the queue over ``msgs`` (no errors among them, nothing to add or drop)."""
        outstanding = self.outstanding
        for mtype, body in msgs:
            if mtype == B.DATA_ROW or mtype in _ASYNC or not outstanding:
                continue
            if mtype == B.COMMAND_COMPLETE and body in DROP_TAGS:
                self._statements_dropped(server)
            if mtype in _ENDS[outstanding[0][0]]:
                outstanding.popleft()

    def _statements_dropped(self, server: ServerConnection) -> None:
        """The server has just run DEALLOCATE ALL or DISCARD ALL: its prepared statements are
        gone, and so are the client's, but for those whose Parse is still owed an answer:
        sent after the drop, they are there (or, answered by the pooler, remain the
        client's and get prepared where next needed)."""
        later = {name for kind, name in self.outstanding
                 if kind in (PARSE, SWALLOW_PARSE, FAKE_PARSE) and name is not None}
        sent_later = [name for kind, name in self.outstanding
                      if kind in (PARSE, SWALLOW_PARSE) and name is not None]
        server.prepared.clear()
        server.stale_statements.clear()
        for name in sent_later:
            server.prepared[name] = None
        statements = self.statements
        for client_name in [k for k, v in statements.items() if v.server_name not in later]:
            del statements[client_name]

    def _error(self, kind: int, name: str | None, body: bytes | None, raw: bytes,
               server: ServerConnection) -> bytes:
        outstanding = self.outstanding
        text = body.decode(errors="replace") if body is not None else ""
        if kind == QUERY:
            if _RESULT_CHANGED in text:
                server.prepared.clear()
            return raw
        # PostgreSQL skips everything up to the next Sync: so do the answers owed.
        first = True
        reply = raw
        code = m.parse_error_fields(body).get("C") if body is not None else None
        while outstanding and outstanding[0][0] not in (SYNC, QUERY):
            k, n = outstanding.popleft()
            if first and n is not None and k in (PARSE, SWALLOW_PARSE) \
                    and code == _DUPLICATE_STATEMENT:
                server.prepared[n] = None  # there after all: the record was out of date
                reply = _corrected(body, "prepared statement already exists")
            elif k in (PARSE, SWALLOW_PARSE) and n is not None:
                server.prepared.pop(n, None)  # never created
            elif k == SWALLOW_CLOSE and n is not None and not first:
                server.prepared[n] = None  # never closed: still there
            elif first and n is not None and k in (BIND, DESCRIBE) \
                    and code == _UNDEFINED_STATEMENT:
                # Not there after all (the record was out of date): prepared again at the
                # client's next attempt.
                server.prepared.pop(n, None)
                server.stale_statements.discard(n)
                reply = _corrected(body, "prepared statement does not exist")
            elif first and n is not None and k in (BIND, DESCRIBE, EXECUTE) \
                    and _RESULT_CHANGED in text and body is not None:
                # A table changed under the statement: drop the server's copy, so the
                # client's next attempt re-prepares it, and say so.
                server.prepared.pop(n, None)
                server.stale_statements.add(n)
                fields = m.parse_error_fields(body)
                reply = m.error_response(
                    fields.get("C", "0A000"), fields.get("M", _RESULT_CHANGED),
                    severity=fields.get("S", "ERROR"),
                    hint="A table used by this prepared statement changed since it was "
                         "prepared. pgpilot has dropped the server's copy: run the statement "
                         "again (or prepare it again) and it will be planned afresh.")
            first = False
        if not outstanding:
            # No Sync sent yet: what the client sends until it is skipped too.
            self.skipping = True
        return reply


def _corrected(body: bytes | None, default: str) -> bytes:
    """The server's error, with a hint that the pooler has put its record right."""
    fields = m.parse_error_fields(body) if body is not None else {}
    return m.error_response(
        fields.get("C", "XX000"), fields.get("M", default), severity=fields.get("S", "ERROR"),
        hint="pgpilot's record of this server's prepared statements was out of date; it is "
             "corrected now: run the statement again.")
