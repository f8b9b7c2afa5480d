"""Protocol-level prepared statements under transaction pooling.

A client that prepares ``stmt1`` expects to find it on "its" connection, but in transaction
mode each transaction may run on another server. So the pooler keeps, per client, what each of
its statement names means (the Parse it sent), and gives every distinct statement (SQL text,
parameter types, the client's search_path) one server-side name per catalog generation,
``pgpilot_<hash>_<generation>``, shared by all clients. The generation (:class:`Catalog`, one per
upstream database) moves on at every schema change the pooler relays and at every error that
shows one it did not see, so a client's Parse never maps onto a server statement parsed against
an older catalog: it parses against today's, as on a direct connection. Per server the pooler
remembers which of those names exist there (at most ``max_prepared_statements``, least recently
used closed first).

Then, message by message:

- Parse "stmt1": remembered. Sent as Parse "pgpilot_<hash>_<generation>" only if this server
  lacks it; otherwise not sent at all and the client gets its ParseComplete from the pooler.
  Between transactions, a request of only such Parses and a Sync whose statements some server
  has parsed in this generation (``Catalog.parsed``) needs no server at all: the pooler
  answers it (client._prepare_without_server), and the statement is parsed where first bound.
- Bind / Describe of "stmt1": renamed; if the server lacks the statement, a Parse is slipped in
  before, whose ParseComplete the client never sees.
- Close "stmt1": forgotten and answered by the pooler (the server's copy stays for others).
- DEALLOCATE ALL / DISCARD ALL, however sent: known by the CommandComplete tag the server
  answers with (as PgBouncer does), so only a drop that happened counts. The server's
  statements and the client's are gone then, but for those Parsed after it.
- A statement whose table or type changed since the client parsed it fails as it would on a
  direct connection (``cached plan must not change result type``), and keeps failing until the
  client prepares it again; that Parse gets a server statement of the new generation. On a
  server that kept its copy, PostgreSQL says so itself. Where the pooler must parse it again,
  it compares the new copy with what the client was told (``ClientStatement.shape``: from the
  pooler's own Describe after the client's Parse, or the client's Describe) before the
  client's Bind runs (CHECK_DESCRIBE: the client's requests wait for the answer), and answers
  PostgreSQL's error itself (ChangedStatement) if the result differs.
- Parse of a name the client has not closed: refused (42P05), as PostgreSQL refuses it.
- The unnamed statement: the client's last unnamed Parse is sent again before a Bind of it in
  a later request, which may run on another server.
- SQL ``EXECUTE name`` of a protocol-level statement, sent as a Parse: run under the shared
  name, prepared there first.
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
import itertools
import logging
import re
import sys
from typing import TYPE_CHECKING, NamedTuple

from pgpilot.wire import messages as m

if TYPE_CHECKING:
    from pgpilot.proxy.server import ServerConnection

F = m.F
B = m.B
log = logging.getLogger("pgpilot.proxy")

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
# The pooler's own Describe of a statement it just had parsed for a client's Parse: its answer
# (ParameterDescription, RowDescription | NoData) is dropped, and is what the client's statement
# is (ClientStatement.shape).
RECORD_DESCRIBE = 11
# The pooler's own Describe of a statement it parsed again on this server for a client's Bind
# or Describe: its answer is dropped and compared with what the client was told; the client's
# requests wait for it (StatementRouter.paused).
CHECK_DESCRIBE = 12
# A request the pooler refuses as PostgreSQL would: sent as a Describe of a statement that
# never exists, so that the server fails it and skips to the Sync as it would have; its
# error is replaced by the entry's (extra: the ErrorResponse the client gets).
REFUSED = 13

_ENDS: dict[int, frozenset[int]] = {
    QUERY: frozenset({B.READY_FOR_QUERY}),
    PARSE: frozenset({B.PARSE_COMPLETE}),
    SWALLOW_PARSE: frozenset({B.PARSE_COMPLETE}),
    BIND: frozenset({B.BIND_COMPLETE}),
    DESCRIBE: frozenset({B.ROW_DESCRIPTION, B.NO_DATA}),
    EXECUTE: frozenset({B.COMMAND_COMPLETE, B.EMPTY_QUERY, B.PORTAL_SUSPENDED}),
    CLOSE: frozenset({B.CLOSE_COMPLETE}),
    SWALLOW_CLOSE: frozenset({B.CLOSE_COMPLETE}),
    RECORD_DESCRIBE: frozenset({B.ROW_DESCRIPTION, B.NO_DATA}),
    CHECK_DESCRIBE: frozenset({B.ROW_DESCRIPTION, B.NO_DATA}),
    SYNC: frozenset({B.READY_FOR_QUERY}),
}
# What the messages the router never renames are owed.
_OWED = {F.QUERY: QUERY, F.FUNCTION_CALL: QUERY, F.SYNC: SYNC, F.EXECUTE: EXECUTE,
         F.PARSE: PARSE, F.BIND: BIND, F.DESCRIBE: DESCRIBE, F.CLOSE: CLOSE}
_SPECIAL = frozenset({FAKE_PARSE, FAKE_CLOSE, SWALLOW_PARSE, SWALLOW_CLOSE})
_POOLERS_DESCRIBE = frozenset({RECORD_DESCRIBE, CHECK_DESCRIBE})
_DESCRIBES = frozenset({DESCRIBE, RECORD_DESCRIBE, CHECK_DESCRIBE})
# A statement name no server ever has: a Describe of it is how a refused request fails there.
_NEVER_PREPARED = "pgpilot_refused"
_FAKE_REPLY = {FAKE_PARSE: m.parse_complete(), FAKE_CLOSE: m.close_complete()}
# Messages a server may send at any time, answering nothing.
_ASYNC = frozenset({B.NOTICE_RESPONSE, B.NOTIFICATION, B.PARAMETER_STATUS})
_RESULT_CHANGED = "cached plan must not change result type"
# CommandComplete bodies of the commands that drop every prepared statement of the session.
DROP_TAGS = frozenset({b"DEALLOCATE ALL\x00", b"DISCARD ALL\x00"})
# SQL-level EXECUTE and the statement name it runs (maybe one the client prepared in the
# protocol, which the server knows under its shared name only).
_EXECUTE = re.compile(r'\s*execute\s+("(?:[^"]|"")+"|[a-z_][a-z0-9_$]*)', re.IGNORECASE)
_DUPLICATE_STATEMENT = "42P05"  # prepared statement ... already exists
_UNDEFINED_STATEMENT = "26000"  # prepared statement ... does not exist


class Shape(NamedTuple):
    """What a statement was described as: its parameter types, and its result columns' names
    and types (type OID, length, modifier; None: it returns no rows). Table OIDs and column
    numbers are left out, as PostgreSQL leaves them out when it decides whether a statement's
    result type changed (a table dropped and made again alike is the same result)."""

    params: tuple[int, ...]
    result: bytes | None


def described_shape(params: bytes | None, row_description: bytes | None) -> Shape | None:
    """The Shape of a ParameterDescription body and a RowDescription body (None: NoData);
    None if either is malformed."""
    try:
        types: tuple[int, ...] = ()
        if params is not None:
            count = int.from_bytes(params[:2], "big")
            types = tuple(int.from_bytes(params[2 + 4 * i:6 + 4 * i], "big")
                          for i in range(count))
        if row_description is None:
            return Shape(types, None)
        body = row_description
        count = int.from_bytes(body[:2], "big")
        pos = 2
        out = bytearray()
        for _ in range(count):
            end = body.index(b"\x00", pos)
            # name, then (skipping table OID and column number) type OID, length, modifier
            out += body[pos:end + 1] + body[end + 7:end + 17]
            pos = end + 19
            if pos > len(body):
                return None
        return Shape(types, bytes(out))
    except ValueError:
        return None


class ClientStatement(NamedTuple):
    """What a client's statement name means. A tuple: the compiled fast path reads
    ``server_name`` (item 0) on every Bind it renames (engine/statements.c)."""

    server_name: str  # ASCII: pgpilot_<hex>
    server_parse: bytes  # the whole Parse message under the server-side name
    # What the client was told the statement is (by the server its Parse went to, or by its
    # own Describe): a copy parsed later on another server must be the same (CHECK_DESCRIBE).
    # None: told nothing yet.
    shape: Shape | None = None


class SessionStatement:
    """A client's statement whose runs may change session settings or pinned state
    (``StatementRouter.session_sql``): as a ClientStatement, but not a tuple, so the compiled
    fast path does not find it and hands every Bind of it to Python, which notes the run
    (client._note_session) as it notes the Parse. Also a statement that runs another of the
    client's by SQL ``EXECUTE`` (``inner``), which Python prepares first wherever it runs."""

    __slots__ = ("inner", "server_name", "server_parse", "shape")

    def __init__(self, server_name: str, server_parse: bytes,
                 inner: ClientStatement | None = None) -> None:
        self.server_name = server_name
        self.server_parse = server_parse
        self.shape: Shape | None = None  # (not checked: its runs go to Python anyway)
        # The client's statement this one runs by SQL ``EXECUTE`` (prepared on the server
        # first, wherever this one runs), or None.
        self.inner = inner


class ChangedStatement:
    """A client's statement whose result type changed since the client was told it (the
    server it was parsed on again describes it otherwise): every Bind or Describe of it fails
    with PostgreSQL's own error, ``cached plan must not change result type``, until the client
    closes it or prepares the name again, as on a direct connection. Not a tuple, so the
    compiled fast path hands every use of it to Python."""

    __slots__ = ("server_name", "server_parse", "shape")

    def __init__(self) -> None:
        self.server_name = _NEVER_PREPARED
        self.server_parse = b""
        self.shape: Shape | None = None


# CommandComplete tags of schema changes (CREATE TABLE, ALTER TYPE, DROP SCHEMA ...): the
# compiled fast path hands a transaction to Python at one of them (engine/statements.c, is_ddl_tag).
DDL_TAG_PREFIXES = (b"CREATE", b"ALTER ", b"DROP ")
_CACHE_LOOKUP_FAILED = "cache lookup failed"  # XX000: an object a plan named is gone


_PARSED_MAX = 10_000  # Catalog.parsed: at most this many names remembered


class Catalog:
    """What the pooler knows of one upstream database's catalog: a generation that moves on
    at every schema change it relays (a CREATE, ALTER or DROP, and again at the end of the
    transaction that made it, when others can see it) and at every error that shows a shared
    statement outlived one made elsewhere (DDL run outside the pooler). Shared server-side
    statement names carry the generation of the client's Parse, so a Parse never maps onto
    a server statement parsed against an older catalog."""

    __slots__ = ("generation", "parsed")

    def __init__(self) -> None:
        self.generation = 0
        # Server-side names of this generation some server has parsed (a ParseComplete came
        # back): a client's Parse + Sync of one, between transactions, is answered without a
        # server (client._prepare_without_server).
        self.parsed: set[str] = set()

    def changed(self) -> None:
        self.generation += 1
        self.parsed.clear()  # names of the old generation: no Parse maps onto them now

    def note_parsed(self, name: str) -> None:
        parsed = self.parsed
        if len(parsed) >= _PARSED_MAX:
            parsed.clear()  # bounded: a name forgotten only goes to a server again
        parsed.add(name)


def server_statement_name(parse: m.Parse, generation: int = 0, search_path: str = "") -> str:
    """The shared server-side name of a statement: a hash of its text, its parameter types
    and the search_path it is parsed under (which decides what its names mean), and the
    catalog generation it was parsed in."""
    digest = hashlib.blake2b(digest_size=12)
    digest.update(parse.sql.encode())
    digest.update(b"\x00" + ",".join(map(str, parse.param_types)).encode())
    if search_path:
        digest.update(b"\x00" + search_path.encode())
    # Interned: every client's statement of this name holds the same str, by which the
    # engine's statistics find the statement's key (engine/querystats.c, QsNames).
    return sys.intern(f"pgpilot_{digest.hexdigest()}_{generation}")


# What undoes a change the router made to the client's names when PostgreSQL skips the
# request that made it (an error came first): (client's name, what it meant before or None).
Undo = tuple[str, "ClientStatement | SessionStatement | ChangedStatement | None"]
# (what answers it, server-side statement name or None, more): more is an Undo (a named
# Parse, a Close answered by the pooler), the client's name of a renamed Bind or Describe
# (errors are told under it), for the pooler's own Close what the statement was before it
# (server.prepared's value, or STALE), or None.
# (str: a client's name, STALE, ABSENT; bytes: a REFUSED request's error)
Entry = tuple[int, str | None, Undo | str | bool | bytes | None]
STALE = "stale"  # a Close of a statement whose table changed (server.stale_statements)
ABSENT = "absent"  # a Close of a statement whose Parse, on its way then, turned out to fail


class StatementRouter:
    """One client's statement names, and the answers owed to it on its current server.

    With ``max_prepared`` 0 (``max_prepared_statements = 0``) nothing is renamed: statement
    names pass as the client sent them, and the router only keeps count of the answers owed
    (what PostgreSQL skips after an error is owed nothing)."""

    __slots__ = ("described_params", "held", "max_prepared", "outstanding", "paused",
                 "renaming", "resume_due", "search_path", "session_sql", "skipped_queries",
                 "skipping", "statements", "surgery", "to_close", "unnamed_parse")

    def __init__(self, max_prepared: int) -> None:
        self.max_prepared = max_prepared
        # The client's own search_path when it set one (session state that follows it):
        # part of the shared names, as it decides what a statement's names refer to.
        self.search_path = ""
        self.renaming = max_prepared > 0
        self.statements: dict[str, ClientStatement | SessionStatement | ChangedStatement] = {}
        # The client's statements ('' the unnamed one) whose runs may change its session's
        # settings or pinned state, by name, with their text: each Bind of one is noted.
        self.session_sql: dict[str, bytes] = {}
        self.outstanding: collections.deque[Entry] = collections.deque()
        self.held = b""  # server bytes of a message not yet complete
        # True from the first made-up or swallowed answer queued until the queue empties:
        # until then server bytes must be cut and pieced, otherwise they pass untouched.
        self.surgery = False
        # True from an error in the extended protocol, when the client had not sent its Sync
        # yet, until it does: PostgreSQL skips what comes in between, so nothing is owed for
        # it and nothing it would have prepared exists.
        self.skipping = False
        # Queries (and function calls) PostgreSQL skipped that way: each had been counted as
        # owed a ReadyForQuery, which will not come; the client takes them off its count.
        self.skipped_queries = 0
        # The client's requests (type, body, bytes) held back while a statement parsed again
        # on this server is described (CHECK_DESCRIBE): sent on (resume) once its answer
        # says whether they may run. None: nothing held.
        self.paused: list[tuple[int, bytes | None, bytes]] | None = None
        self.resume_due = False  # the answer came: the client calls resume()
        self.to_close: str | None = None  # a copy found changed: closed at the resume
        self.described_params: bytes | None = None  # a ParameterDescription, until its Row-
        # The client's last Parse of the unnamed statement (the whole message), which
        # PostgreSQL keeps until the next one or a simple query: parsed again before a Bind or
        # Describe of it in a later request, as the client may be on another server by then.
        # None: none, or one carried by the engine (client.py drops the record then).
        self.unnamed_parse: bytes | None = None

    def limit_changed(self, max_prepared: int) -> None:
        """``max_prepared_statements`` changed (RELOAD, console SET), as PgBouncer applies it
        to the clients connected: the new bound holds from the next statement made room for
        on a server; 0 turns renaming off from the next message (names pass as the client
        sends them, so the statements it prepared before are unknown to the servers: 26000),
        and a value above 0 turns it back on, with the statements the client had then (but
        those it prepared or closed again meanwhile: ``_forget``)."""
        self.max_prepared = max_prepared
        self.renaming = max_prepared > 0

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
        if self.paused is not None:
            return b"", self._hold(data, msgs, ends, continued)
        if not renamable and not continued and ends and ends[-1] == len(data) \
                and not self.skipping and (self.unnamed_parse is None
                                           or not _uses_unnamed_first(msgs)) \
                and not (self.statements and _parses_execute(msgs)):
            # Nothing to rename (the common case): only note what each message is owed.
            prev = 0
            for (mtype, _body), end in zip(msgs, ends, strict=True):
                owed = _OWED.get(mtype)
                if owed is not None:
                    outstanding.append((owed, None, None))
                    if mtype == F.PARSE:
                        self.unnamed_parse = data[prev:end]
                    elif mtype == F.QUERY:
                        self.unnamed_parse = None
                prev = end
            return data, b""
        parsed_unnamed = False  # in this chunk, before the message at hand
        out = bytearray()
        prev = 0
        for (mtype, body), end in zip(msgs, ends, strict=True):
            raw = data[prev:end]
            if prev == 0 and continued:
                raw = continued + raw
            prev = end
            if self.paused is not None:
                # A statement is being checked (CHECK_DESCRIBE): what follows waits for it.
                self.paused.append((mtype, body, raw))
                continue
            if self.skipping:
                if mtype != F.SYNC:
                    out += raw  # skipped by the server as well: owed nothing
                    if mtype in (F.QUERY, F.FUNCTION_CALL):
                        self.skipped_queries += 1
                    continue
                self.skipping = False
            if mtype == F.SYNC:
                outstanding.append((SYNC, None, None))
                out += raw
            elif mtype == F.BIND and body is not None:
                bind = m.parse_bind(body)
                stmt = self.statements.get(bind.statement) \
                    if bind.statement and self.renaming else None
                if stmt is None:
                    if not bind.statement and not parsed_unnamed:
                        out += self._unnamed_again()
                    outstanding.append((BIND, None, None))
                    out += raw
                elif isinstance(stmt, ChangedStatement):
                    out += self._refuse(_result_changed_error())
                elif self._must_check(stmt, server):
                    out += self._check_on_server(stmt, bind.statement, server)
                    self.paused = [(mtype, body, raw)]
                else:
                    out += self._ensure_on_server(stmt, server)
                    outstanding.append((BIND, stmt.server_name, bind.statement))
                    out += m.bind_message(bind.portal, stmt.server_name, bind.rest)
            elif mtype == F.EXECUTE:
                outstanding.append((EXECUTE, None, None))
                out += raw
            elif mtype == F.PARSE and body is not None:
                if body[:1] == b"\x00":
                    self.unnamed_parse = raw
                    parsed_unnamed = True
                out += self._parse(body, raw, server)
            elif mtype == F.DESCRIBE and body is not None:
                target, name = m.parse_close_or_describe(body, "Describe")
                stmt = self.statements.get(name) \
                    if target == "S" and name and self.renaming else None
                if stmt is None:
                    if target == "S" and not name and not parsed_unnamed:
                        out += self._unnamed_again()
                    outstanding.append((DESCRIBE, None, None))
                    out += raw
                elif isinstance(stmt, ChangedStatement):
                    out += self._refuse(_result_changed_error())
                elif self._must_check(stmt, server):
                    out += self._check_on_server(stmt, name, server)
                    self.paused = [(mtype, body, raw)]
                else:
                    out += self._ensure_on_server(stmt, server)
                    outstanding.append((DESCRIBE, stmt.server_name, name))
                    out += m.describe_message("S", stmt.server_name)
            elif mtype == F.CLOSE and body is not None:
                target, name = m.parse_close_or_describe(body, "Close")
                if target == "S" and name and self.renaming:
                    # Answered here: the server's copy stays for the other clients.
                    before = self.statements.pop(name, None)
                    outstanding.append((FAKE_CLOSE, None, (name, before)))
                    self.surgery = True
                else:
                    if target == "S" and name:
                        self._forget(name)
                    outstanding.append((CLOSE, None, None))
                    out += raw
            elif mtype in (F.QUERY, F.FUNCTION_CALL):
                outstanding.append((QUERY, None, None))
                out += raw
                if mtype == F.QUERY:
                    self.unnamed_parse = None  # a simple query drops the unnamed statement
            else:
                out += raw  # Flush, CopyData/Done/Fail: no answer of their own
        return bytes(out), data[prev:] if prev < len(data) else b""

    def _parse(self, body: bytes, raw: bytes, server: ServerConnection) -> bytes:
        parse = m.parse_parse(body)
        inner = self._executed(parse.sql) if self.statements and self.renaming else None
        if inner is not None:
            # EXECUTE of the client's own statement: under its shared name, there first.
            found = _EXECUTE.match(parse.sql)
            assert found is not None
            parse = m.Parse(parse.name, parse.sql[:found.start(1)] + inner.server_name
                            + parse.sql[found.end(1):], parse.param_types)
            if not parse.name:
                self.unnamed_parse = None  # (not parsed again elsewhere: it needs the other)
                self.outstanding.append((PARSE, None, None))
                return self._ensure_on_server(inner, server) + m.parse_message(
                    "", parse.sql, parse.param_types)
        if not parse.name or not self.renaming:
            if parse.name:
                self._forget(parse.name)
            self.outstanding.append((PARSE, None, None))
            return raw
        if parse.name in self.statements and not any(
                kind == QUERY for kind, _n, _m in self.outstanding):
            # As PostgreSQL: a name is defined once until closed. (Not while a simple query
            # is on its way: a DEALLOCATE ALL or DISCARD ALL in it may free the name.)
            log.warning("prepared statement '%s' was already prepared", parse.name)
            return self._refuse(m.error_response(
                _DUPLICATE_STATEMENT, f'prepared statement "{parse.name}" already exists'))
        server_name = server_statement_name(parse, server.pool.catalog.generation,
                                            self.search_path)
        server_parse = m.parse_message(server_name, parse.sql, parse.param_types)
        stmt: ClientStatement | SessionStatement
        if inner is not None:
            stmt = SessionStatement(server_name, server_parse, inner)
        elif parse.name in self.session_sql:
            stmt = SessionStatement(server_name, server_parse)
        else:
            stmt = ClientStatement(server_name, server_parse)
        undo = (parse.name, self.statements.get(parse.name))
        before = self._ensure_on_server(inner, server) if inner is not None else b""
        return before + self._parse_as(stmt, server_name, undo, server)

    def _executed(self, sql: str) -> ClientStatement | None:
        """The client's protocol-level statement that ``sql`` runs by SQL EXECUTE, if any."""
        found = _EXECUTE.match(sql)
        if found is None:
            return None
        word = found.group(1)
        name = word[1:-1].replace('""', '"') if word[:1] == '"' else word.lower()
        stmt = self.statements.get(name)
        return stmt if isinstance(stmt, ClientStatement) else None

    def _parse_as(self, stmt: ClientStatement | SessionStatement, server_name: str,
                  undo: Undo, server: ServerConnection) -> bytes:
        """The client's named Parse, as ``stmt`` (its server-side statement)."""
        parse_name = undo[0]
        self.statements[parse_name] = stmt
        known = server.prepared.get(server_name)
        if known is not None and (known or not self._synced_since_parse(server_name)):
            # There (or its Parse is in this same pipeline segment: should that fail, the
            # server skips this one too, and so does the made-up answer).
            server.prepared.move_to_end(server_name)
            self.outstanding.append((FAKE_PARSE, server_name, undo))
            self.surgery = True
            return b""
        if known is not None:
            # Its Parse is still on its way, and a Sync since: whether it works decides what
            # this one answers, so this one goes to the server too (closed first, in case).
            server.prepared.move_to_end(server_name)
            server.prepared[server_name] = False
            self.outstanding.append((SWALLOW_CLOSE, server_name, known))
            self.outstanding.append((PARSE, server_name, undo))
            self.surgery = True
            return m.close_message("S", server_name) + stmt.server_parse
        out = self._make_room(server)
        server.prepared[server_name] = False
        self.outstanding.append((PARSE, server_name, undo))
        # Described at once (the answer dropped): what the client's statement is, which a
        # copy parsed later elsewhere must be too (CHECK_DESCRIBE).
        self.outstanding.append((RECORD_DESCRIBE, server_name, parse_name))
        self.surgery = True
        return out + stmt.server_parse + m.describe_message("S", server_name)

    def _forget(self, name: str) -> None:
        """Renaming is off (max_prepared_statements = 0 at run time) and the client prepares
        or closes ``name`` as sent: what the router recorded for the name is not what it means
        any more, so renaming, once back on, must not run the old statement under it."""
        self.statements.pop(name, None)

    def _synced_since_parse(self, server_name: str) -> bool:
        """Was a Sync (or Query) sent after the Parse of ``server_name`` still owed an answer?
        True as well when no such Parse is owed (the statement's state is not known)."""
        synced = False
        for kind, name, _undo in reversed(self.outstanding):
            if kind in (SYNC, QUERY):
                synced = True
            elif kind in (PARSE, SWALLOW_PARSE) and name == server_name:
                return synced
        return True

    def _ensure_on_server(self, stmt: ClientStatement | SessionStatement,
                          server: ServerConnection) -> bytes:
        """The Parse to slip in first when ``server`` lacks the statement (else nothing);
        first that of the statement it runs by SQL EXECUTE, if any."""
        inner = stmt.inner if isinstance(stmt, SessionStatement) else None
        if inner is not None:
            return self._ensure_on_server(inner, server) + self._ensure_on_server(
                SessionStatement(stmt.server_name, stmt.server_parse), server)
        if stmt.server_name in server.prepared:
            server.prepared.move_to_end(stmt.server_name)
            return b""
        out = self._make_room(server)
        server.prepared[stmt.server_name] = False
        self.outstanding.append((SWALLOW_PARSE, stmt.server_name, None))
        self.surgery = True
        return out + stmt.server_parse

    def _must_check(self, stmt: ClientStatement | SessionStatement,
                    server: ServerConnection) -> bool:
        """Is ``stmt`` to be parsed again on ``server`` (it lacks it), and was the client told
        what it is (so the new copy must be the same before the client runs it)?"""
        return stmt.shape is not None and stmt.server_name not in server.prepared

    def _check_on_server(self, stmt: ClientStatement | SessionStatement, client_name: str,
                         server: ServerConnection) -> bytes:
        """Parse ``stmt`` on ``server`` with the parameter types the client was told (as
        PostgreSQL keeps a prepared statement's), describe it, and flush: the client's
        requests wait (``paused``) until the answer says whether its result is the same."""
        assert stmt.shape is not None
        parse = m.parse_parse(stmt.server_parse[5:])
        out = self._make_room(server)
        server.prepared[stmt.server_name] = False
        self.outstanding.append((SWALLOW_PARSE, stmt.server_name, None))
        self.outstanding.append((CHECK_DESCRIBE, stmt.server_name, client_name))
        self.surgery = True
        return out + m.parse_message(stmt.server_name, parse.sql, stmt.shape.params) \
            + m.describe_message("S", stmt.server_name) + m.flush()

    def _unnamed_again(self) -> bytes:
        """The client's last unnamed Parse, to go first (its answer dropped) before a use of
        the unnamed statement in a later request, which directly finds it still there."""
        parse = self.unnamed_parse
        if parse is None:
            return b""
        self.outstanding.append((SWALLOW_PARSE, None, None))
        self.surgery = True
        return parse

    def _refuse(self, error: bytes) -> bytes:
        """A request PostgreSQL would fail with ``error``: the server fails a stand-in (and
        skips to the Sync, as it would have), the client reads ``error``."""
        self.outstanding.append((REFUSED, None, error))
        return m.describe_message("S", _NEVER_PREPARED)

    def _hold(self, data: bytes, msgs: list[tuple[int, bytes | None]], ends: list[int],
              continued: bytes) -> bytes:
        """While paused: the whole messages of a chunk join those waiting; returns the
        start of a message not complete yet."""
        paused = self.paused
        assert paused is not None
        prev = 0
        for (mtype, body), end in zip(msgs, ends, strict=True):
            raw = data[prev:end]
            if prev == 0 and continued:
                raw = continued + raw
            paused.append((mtype, body, raw))
            prev = end
        return data[prev:] if prev < len(data) else b""

    def resume(self, server: ServerConnection) -> bytes:
        """The check the client's requests waited for is answered: what goes to the server
        now (a changed copy closed, then those requests, rewritten as ever; they may pause
        again at another statement)."""
        self.resume_due = False
        paused, self.paused = self.paused, None
        out = b""
        name, self.to_close = self.to_close, None
        if name is not None and name in server.prepared and self._next_claim(name) is None:
            # The copy parsed here has another result: not for the clients told the old one.
            before = server.prepared.pop(name)
            self.outstanding.append((SWALLOW_CLOSE, name, before))
            self.surgery = True
            out += m.close_message("S", name)
        if not paused:
            return out
        data = b"".join(raw for _t, _b, raw in paused)
        msgs = [(t, b) for t, b, _raw in paused]
        ends = list(itertools.accumulate(len(raw) for _t, _b, raw in paused))
        more, tail = self.client_chunk(data, msgs, ends, b"", server)
        assert not tail
        return out + more

    def _make_room(self, server: ServerConnection) -> bytes:
        """Close statements the server must drop: stale ones, then the least recently used."""
        out = b""
        while server.stale_statements:
            name = server.stale_statements.pop()
            out += m.close_message("S", name)
            self.outstanding.append((SWALLOW_CLOSE, name, STALE))
            self.surgery = True
        while self.max_prepared and len(server.prepared) >= self.max_prepared:
            name, confirmed = server.prepared.popitem(last=False)
            out += m.close_message("S", name)
            self.outstanding.append((SWALLOW_CLOSE, name, confirmed))
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
            kind, name, _undo = outstanding[0]
            if mtype == B.ERROR_RESPONSE:
                out += self._error(kind, name, body, raw, server)
                continue
            answered = self._answered(mtype, body, server)
            if kind in _POOLERS_DESCRIBE or (answered and kind in (SWALLOW_PARSE, SWALLOW_CLOSE)):
                continue  # the pooler's own request: the client never sees its answers
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
            self._answered(mtype, body, server)

    def _answered(self, mtype: int, body: bytes | None, server: ServerConnection) -> bool:
        """A server message (not an error) for the request heading the queue: note what it
        tells of the server's statements, and pop the request if it is its last answer."""
        if mtype == B.COMMAND_COMPLETE and body in DROP_TAGS:
            self._statements_dropped(server)
        kind = self.outstanding[0][0]
        if mtype not in _ENDS.get(kind, ()):
            if mtype == B.PARAMETER_DESCRIPTION and kind in _DESCRIBES:
                self.described_params = body
            return False
        _kind, name, more = self.outstanding.popleft()
        if mtype == B.PARSE_COMPLETE and name is not None:
            self._parse_done(name, server)
        elif kind in _DESCRIBES and name is not None:
            params, self.described_params = self.described_params, None
            shape = described_shape(params, body if mtype == B.ROW_DESCRIPTION else None)
            if shape is not None:
                self._described(kind, name, more, shape, server)
        return True

    def _described(self, kind: int, name: str, more: Undo | str | bool | bytes | None,
                   shape: Shape, server: ServerConnection) -> None:
        """A Describe of the shared statement ``name`` for the client's ``more`` is answered
        with ``shape``."""
        if kind == CHECK_DESCRIBE:
            self.resume_due = True
        if not isinstance(more, str):
            return
        stmt = self.statements.get(more)
        if not isinstance(stmt, ClientStatement) or stmt.server_name != name:
            return
        if stmt.shape is None:
            self.statements[more] = stmt._replace(shape=shape)  # (Python's turn: no engine)
        elif kind == CHECK_DESCRIBE and stmt.shape.result != shape.result:
            # Parsed again here after a schema change, it returns other columns: the client
            # gets PostgreSQL's error for it until it prepares it again, the copy goes, and
            # new Parses get a name of their own.
            server.pool.catalog.changed()
            self.to_close = name
            self.statements[more] = ChangedStatement()

    def _next_claim(self, name: str) -> int | None:
        """Where in the queue the first request still owed that parses or closes ``name`` is
        (the record of ``name`` is that request's from its sending on), if any."""
        for i, (kind, n, _more) in enumerate(self.outstanding):
            if n == name and kind in (PARSE, SWALLOW_PARSE, SWALLOW_CLOSE):
                return i
        return None

    def _parse_done(self, name: str, server: ServerConnection) -> None:
        """The server created ``name`` for a Parse the router sent. If a later Close or Parse
        of ``name`` is still owed, the record is that one's: a Close then learns what it will
        find (should it be skipped in turn); otherwise the record says the server has it."""
        server.pool.catalog.note_parsed(name)
        i = self._next_claim(name)
        if i is None:
            server.prepared[name] = True
            return
        kind, n, more = self.outstanding[i]
        if kind == SWALLOW_CLOSE and more is False:
            self.outstanding[i] = (kind, n, True)

    def _pass_on_state(self, name: str, before: bool | str) -> None:
        """Requests for ``name`` were skipped: the first Close of it still owed will find it
        as it was before them."""
        i = self._next_claim(name)
        if i is not None and self.outstanding[i][0] == SWALLOW_CLOSE:
            kind, n, _more = self.outstanding[i]
            self.outstanding[i] = (kind, n, before)

    def take_skipped_queries(self) -> int:
        """Queries PostgreSQL skipped (behind an error, before the Sync) since last asked:
        the client owes itself that many fewer ReadyForQuery."""
        skipped, self.skipped_queries = self.skipped_queries, 0
        return skipped

    def _statements_dropped(self, server: ServerConnection) -> None:
        """The server has just run DEALLOCATE ALL or DISCARD ALL: its prepared statements are
        gone, and so are the client's, but for those whose Parse is still owed an answer:
        sent after the drop, they are there (or, answered by the pooler, remain the
        client's and get prepared where next needed)."""
        outstanding = self.outstanding
        later = {name for kind, name, _more in outstanding
                 if kind in (PARSE, SWALLOW_PARSE, FAKE_PARSE) and name is not None}
        prepared = server.prepared
        prepared.clear()
        server.stale_statements.clear()
        # What the requests sent after it do, replayed on the empty server: a Close of the
        # pooler's now finds what a Parse before it made, or nothing.
        for i, (kind, name, more) in enumerate(outstanding):
            if name is None:
                continue
            if kind in (PARSE, SWALLOW_PARSE):
                prepared[name] = False
            elif kind == SWALLOW_CLOSE:
                before = prepared.pop(name, ABSENT)
                if more != STALE:
                    outstanding[i] = (kind, name, before)
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
        # PostgreSQL skips everything up to the next Sync, simple queries too: so do the
        # answers owed.
        raw_fields = _raw_fields(body) if body is not None else None
        code = raw_fields.get(ord("C"), b"").decode("ascii", "replace") if raw_fields else None
        skipped: list[Entry] = []  # the failed request and those PostgreSQL skips after it
        while outstanding and outstanding[0][0] != SYNC:
            skipped.append(outstanding.popleft())
        if not skipped:
            return raw
        failed = skipped[0]
        k, n, _extra = failed
        hint = None
        # A statement a request behind the Sync parses or closes again is that one's to
        # record: of those, only the state before the skipped ones is passed on to it.
        owned_later = {name for kind, name, _more in outstanding
                       if name is not None and kind in (PARSE, SWALLOW_PARSE, SWALLOW_CLOSE)}
        if n is not None and k in (BIND, DESCRIBE) and code == _UNDEFINED_STATEMENT \
                and n in server.prepared and n not in owned_later:
            # Not there after all (the record was out of date): prepared again at the
            # client's next attempt. (Otherwise its Parse failed, as the client was told: as
            # on a direct connection.)
            server.prepared.pop(n, None)
            server.stale_statements.discard(n)
            hint = _RECORD_CORRECTED
        elif n is not None and k in (BIND, DESCRIBE) and (
                _RESULT_CHANGED in text or (code == "XX000" and _CACHE_LOOKUP_FAILED in text)):
            # A table or type changed under the statement since it was parsed (DDL the
            # pooler did not see, or made after this client's Parse): the client gets
            # PostgreSQL's error as it would directly, and the server's copy stays (so do
            # the other clients of that copy). The catalog moves on, so that no new Parse
            # maps onto a copy parsed before the change.
            server.pool.catalog.changed()
        # What the failed and the skipped requests did to the record of the server's
        # statements and to the client's names when they were sent, undone newest first,
        # as if never sent: a Parse (the statement was not there before it), a Close of the
        # pooler's (it was as the entry says), a Close answered by the pooler or a Parse of
        # the client's (its name meant what the entry says).
        statements = self.statements
        prepared = server.prepared
        state_before: dict[str, bool | str] = {}
        for i in range(len(skipped) - 1, -1, -1):
            k, n, extra = skipped[i]
            if k == QUERY:
                self.skipped_queries += 1
            elif k in (PARSE, SWALLOW_PARSE) and n is not None:
                if i == 0 and code == _DUPLICATE_STATEMENT:
                    state_before[n] = True  # there after all: the record was out of date
                    hint = _RECORD_CORRECTED
                    if n not in owned_later:
                        prepared[n] = True
                else:
                    state_before[n] = ABSENT  # a Parse is sent only for what is not there
                    if n not in owned_later:
                        prepared.pop(n, None)
            elif k == SWALLOW_CLOSE and n is not None:
                if extra == STALE:
                    server.stale_statements.add(n)
                    continue
                before = extra if isinstance(extra, bool) or extra == ABSENT else False
                state_before[n] = before
                if n in owned_later:
                    continue
                if before == ABSENT:
                    prepared.pop(n, None)
                else:
                    prepared[n] = bool(before)
            if isinstance(extra, tuple):
                client_name, meant = extra
                if meant is None:
                    statements.pop(client_name, None)
                else:
                    statements[client_name] = meant
        for n, state in state_before.items():
            if n in owned_later:
                self._pass_on_state(n, state)
        if not outstanding:
            # No Sync sent yet: what the client sends until it is skipped too.
            self.skipping = True
        if self.paused is not None:
            # The check they waited for failed (the statement does not parse any more): they
            # go on, to be skipped up to their Sync, as the server skips them.
            self.resume_due = True
        if failed[0] == REFUSED and isinstance(failed[2], bytes) \
                and code == _UNDEFINED_STATEMENT:
            return failed[2]
        if body is None:
            return raw
        return _in_clients_words(failed, body, hint) or raw


def _parses_execute(msgs: list[tuple[int, bytes | None]]) -> bool:
    """Is one of ``msgs`` a Parse of a SQL ``EXECUTE``?"""
    for mtype, body in msgs:
        if mtype == F.PARSE and body is not None:
            start = body.find(b"\x00") + 1
            if _EXECUTE.match(body[start:start + 200].decode(errors="replace")):
                return True
    return False


def _uses_unnamed_first(msgs: list[tuple[int, bytes | None]]) -> bool:
    """Does a Bind or Describe of the unnamed statement come before any Parse in ``msgs``?"""
    for mtype, body in msgs:
        if mtype == F.PARSE:
            return False
        if body is not None and ((mtype == F.BIND and body.find(b"\x00") + 1 < len(body)
                                  and body[body.find(b"\x00") + 1] == 0)
                                 or (mtype == F.DESCRIBE and body[:2] == b"S\x00")):
            return True
    return False


def _result_changed_error() -> bytes:
    """PostgreSQL's error for a statement whose result type changed, with the fields it
    sends: drivers know it by them (asyncpg by the routine, RevalidateCachedQuery)."""
    fields = ((b"S", b"ERROR"), (b"V", b"ERROR"), (b"C", b"0A000"),
              (b"M", _RESULT_CHANGED.encode()), (b"F", b"plancache.c"),
              (b"R", b"RevalidateCachedQuery"))
    return m.message(B.ERROR_RESPONSE,
                     b"".join(code + value + b"\x00" for code, value in fields) + b"\x00")


_RECORD_CORRECTED = ("pgpilot's record of this server's prepared statements was out of date; "
                     "it is corrected now: run the statement again.")


def _in_clients_words(failed: Entry, body: bytes, hint: str | None) -> bytes | None:
    """The server's error for ``failed`` as the client should read it: the statement under
    the client's name, not the pooler's, and ``hint`` added. None: as it is. Worked on as
    bytes: the server's text is in the client's encoding, whatever that is."""
    _kind, server_name, extra = failed
    client_name = extra if isinstance(extra, str) else \
        extra[0] if isinstance(extra, tuple) else None
    fields = _raw_fields(body)
    if fields is None:
        return None
    message = fields.get(ord("M"), b"")
    quoted = f'"{server_name}"'.encode()
    renamed = server_name is not None and client_name is not None and quoted in message
    if not renamed and hint is None:
        return None
    if renamed:
        assert client_name is not None
        fields[ord("M")] = message.replace(quoted, b'"' + client_name.encode() + b'"')
    if hint is not None:
        fields[ord("H")] = hint.encode()
    return m.message(B.ERROR_RESPONSE, b"".join(bytes([code]) + value + b"\x00"
                                                for code, value in fields.items()) + b"\x00")


def _raw_fields(body: bytes) -> dict[int, bytes] | None:
    """An ErrorResponse body's fields, by code, as bytes (None: malformed)."""
    fields: dict[int, bytes] = {}
    pos = 0
    while pos < len(body):
        code = body[pos]
        if code == 0:
            return fields
        end = body.find(b"\x00", pos + 1)
        if end < 0:
            return None
        fields[code] = body[pos + 1:end]
        pos = end + 1
    return None
