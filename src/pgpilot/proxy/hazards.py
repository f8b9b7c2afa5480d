"""Transaction-pooling hazards: session state a client creates where it will not keep it.

In ``transaction`` and ``statement`` pooling a client gets *some* server connection for each
transaction. Whatever it leaves behind on that connection outlives the transaction and goes to
the next client, while the client itself lands elsewhere next time: a session-level ``SET``,
``LISTEN``, a temporary table, a session advisory lock, an SQL-level ``PREPARE`` or a
``WITH HOLD`` cursor. PgBouncer lets these pass silently; pgpilot counts them per
(database, user, application_name, kind), logs each kind once per client, and shows them with a
hint in ``SHOW HAZARDS`` and the ``pgpilot_hazards_total`` metric.

Cost on the hot path: every Query / Parse text is lower-cased and scanned for a few words that
can make a hazard (``SET`` only at a statement's start, so ``UPDATE ... SET`` passes), a few
hundred nanoseconds. Only when that says "maybe" is the text parsed with pglast, and the verdict
is cached per text, so an application that issues the same statements again parses nothing.

Not hazards: ``SET LOCAL`` and ``set_config(..., true)`` (they end with the transaction),
``SET`` of the parameters the pooler itself keeps per client (``client_encoding``, ``DateStyle``,
``TimeZone``, ``IntervalStyle``, ``standard_conforming_strings``, ``application_name``),
``SET TRANSACTION``, ``CREATE TEMP TABLE ... ON COMMIT DROP``, ``pg_advisory_xact_lock`` and a
cursor without ``WITH HOLD``.
"""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from pgpilot.proxy.server import TRACKED_BY_LOWER

if TYPE_CHECKING:
    from pgpilot.proxy.client import ClientConnection
    from pgpilot.proxy.pooler import Pooler

log = logging.getLogger("pgpilot.proxy")

# Hazard kinds, as SHOW HAZARDS and the metrics name them.
SESSION_SET = "session_set"
LISTEN = "listen"
TEMP_TABLE = "temp_table"
ADVISORY_LOCK = "advisory_lock"
SQL_PREPARE = "sql_prepare"
WITH_HOLD_CURSOR = "with_hold_cursor"

HINTS: dict[str, str] = {
    SESSION_SET: (
        "A session-level SET stays on the server connection after the transaction: the next "
        "client there inherits it, and this client may not see it on its next transaction. "
        "Use SET LOCAL (or set_config(name, value, true)) inside the transaction, set it for "
        "the role or database (ALTER ROLE ... SET), or run this application in a session-mode "
        "pool."),
    LISTEN: (
        "LISTEN registers the server connection, not the client: notifications reach whichever "
        "client holds that connection later, or nobody. Run listeners in a session-mode pool "
        "(pool_mode=session for this user or database) or connect them to PostgreSQL directly."),
    TEMP_TABLE: (
        "A temporary table lives as long as the server connection: other clients see it, and "
        "this client may not find it on its next transaction. Create it inside a transaction "
        "with ON COMMIT DROP, or run this application in a session-mode pool."),
    ADVISORY_LOCK: (
        "A session-level advisory lock stays held by the server connection after the "
        "transaction, and the unlock may run on another connection. Use pg_advisory_xact_lock "
        "(released at commit or rollback), or run this application in a session-mode pool."),
    SQL_PREPARE: (
        "SQL-level PREPARE creates the statement on one server connection; EXECUTE may land on "
        "another. Use protocol-level prepared statements (the driver's, which pgpilot tracks "
        "across connections), or run this application in a session-mode pool."),
    WITH_HOLD_CURSOR: (
        "A WITH HOLD cursor outlives its transaction on one server connection; the next FETCH "
        "may land on another. Fetch within the transaction (a cursor without WITH HOLD), or run "
        "this application in a session-mode pool."),
}

# The cheap pre-filter, on the lower-cased text (a few C-speed substring scans, no regex; on
# str, whose `in` is several times cheaper than bytes'): words that mark a hazard wherever
# they appear ("temp" covers CREATE TEMP TABLE and SELECT INTO TEMP, "hold" covers
# DECLARE ... WITH HOLD) ...
_ANYWHERE = ("advisory_lock", "set_config", "temp", "hold", "listen", "prepare")
# ... and SET, which only counts at the start of a statement (not in UPDATE ... SET).
# PostgreSQL's whitespace (scan.l): form feed too, and vertical tab since PostgreSQL 16.
_BLANKS = " \t\r\n\f\v"
_MAX_STATEMENT_STARTS = 64  # a text with more ';' than this is simply parsed

# Session-level advisory lock functions (the _xact_ variants end with the transaction).
_SESSION_ADVISORY = frozenset({"pg_advisory_lock", "pg_advisory_lock_shared",
                               "pg_try_advisory_lock", "pg_try_advisory_lock_shared"})
_CURSOR_OPT_HOLD = 0x0020  # PostgreSQL's CURSOR_OPT_HOLD (parsenodes.h)
_ONCOMMIT_DROP = 3  # PostgreSQL's ONCOMMIT_DROP (primnodes.h)
_CLASSIFY_CACHE_SIZE = 2048
_CACHE_MAX_TEXT = 8192  # longer texts are classified without caching (they rarely repeat)
_EXAMPLE_LENGTH = 200
# Distinct (database, user, application_name, kind) rows kept; past it, new application names
# are counted under OTHER_APPLICATIONS (per-client names, e.g. application_name_add_host,
# must not grow memory or metric labels without bound).
MAX_HAZARD_KEYS = 5000
OTHER_APPLICATIONS = "(other)"


_TRAILING = _BLANKS + ";"


def might_be_hazard(sql: bytes) -> bool:
    """The cheap test on a statement text: False means it certainly holds no hazard."""
    low = sql.decode("latin-1").lower()  # latin-1: any bytes, no validation cost
    for word in _ANYWHERE:
        if word in low:
            return True
    if 'u&"' in low:
        return True  # a Unicode-escaped identifier may spell any word: the parser reads it
    if _starts_with_set(low):
        return True
    # A single statement's own terminator (pgbench, most drivers) starts nothing new.
    if ";" not in low.rstrip(_TRAILING):
        return False
    pieces = low.split(";", _MAX_STATEMENT_STARTS)
    if len(pieces) > _MAX_STATEMENT_STARTS:
        return True
    return any(_starts_with_set(piece) for piece in pieces[1:])


def _starts_with_set(low: str) -> bool:
    """Does this lower-cased text begin (after blanks and comments) with the word SET?"""
    while True:
        low = low.lstrip(_BLANKS)
        if low.startswith("/*"):
            end = low.find("*/")
            if end < 0:
                return False
            low = low[end + 2:]
        elif low.startswith("--"):
            end = low.find("\n")
            if end < 0:
                return False
            low = low[end + 1:]
        else:
            return low.startswith("set") and not (low[3:4].isalnum() or low[3:4] == "_")


Finding = tuple[str, str]  # (kind, what exactly: "SET search_path", "LISTEN jobs" ...)


def classify(sql: str) -> tuple[Finding, ...]:
    """The hazards in ``sql`` (one or more statements), in order; () if none or unparsable."""
    if len(sql) > _CACHE_MAX_TEXT:
        return _classify(sql)
    return _classify_cached(sql)


@lru_cache(maxsize=_CLASSIFY_CACHE_SIZE)
def _classify_cached(sql: str) -> tuple[Finding, ...]:
    return _classify(sql)


def _classify(sql: str) -> tuple[Finding, ...]:
    from pglast import parse_sql
    from pglast.parser import ParseError

    try:
        statements = parse_sql(sql)
    except (ParseError, ValueError, RecursionError):
        return ()  # PostgreSQL will reject it with a better message than ours
    found: list[Finding] = []
    for raw in statements:
        found.extend(_statement_hazards(raw.stmt))
    return tuple(found)


def _statement_hazards(stmt: Any) -> Iterator[Finding]:
    from pglast import ast
    from pglast.enums import VariableSetKind

    if isinstance(stmt, ast.VariableSetStmt):
        name = (stmt.name or "").lower()
        if stmt.is_local or stmt.kind in (VariableSetKind.VAR_RESET,
                                          VariableSetKind.VAR_RESET_ALL):
            return
        if stmt.kind == VariableSetKind.VAR_SET_MULTI and name.startswith("transaction"):
            return  # SET TRANSACTION ... applies to the current transaction only
        if name in TRACKED_BY_LOWER:
            return  # the pooler re-applies these per client
        yield SESSION_SET, f"SET {stmt.name}"
    elif isinstance(stmt, ast.ListenStmt):
        yield LISTEN, f"LISTEN {stmt.conditionname}"
    elif isinstance(stmt, ast.CreateStmt):
        if _is_temp(stmt.relation, stmt.oncommit):
            yield TEMP_TABLE, f"CREATE TEMP TABLE {_relname(stmt.relation)}"
    elif isinstance(stmt, ast.CreateTableAsStmt):
        into = stmt.into
        if into is not None and _is_temp(into.rel, into.onCommit):
            yield TEMP_TABLE, f"CREATE TEMP TABLE {_relname(into.rel)} AS"
    elif isinstance(stmt, ast.PrepareStmt):
        yield SQL_PREPARE, f"PREPARE {stmt.name}"
    elif isinstance(stmt, ast.DeclareCursorStmt) and int(stmt.options or 0) & _CURSOR_OPT_HOLD:
        yield WITH_HOLD_CURSOR, f"DECLARE {stmt.portalname} CURSOR WITH HOLD"
    elif isinstance(stmt, ast.SelectStmt):
        into = stmt.intoClause
        if into is not None and _is_temp(into.rel, into.onCommit):
            yield TEMP_TABLE, f"SELECT INTO TEMP {_relname(into.rel)}"
    yield from _function_hazards(stmt)


def _is_temp(relation: Any, on_commit: Any) -> bool:
    """A temporary relation that outlives the transaction (not ON COMMIT DROP)."""
    return (relation is not None and relation.relpersistence == "t"
            and int(on_commit or 0) != _ONCOMMIT_DROP)


def _relname(relation: Any) -> str:
    return str(getattr(relation, "relname", "?"))


def _function_hazards(stmt: Any) -> list[Finding]:
    """Session advisory locks and set_config(..., false) anywhere in the statement."""
    from pglast import ast
    from pglast.visitors import Visitor

    found: list[Finding] = []

    class Calls(Visitor):  # type: ignore[misc]
        def visit_FuncCall(self, _ancestors: Any, node: Any) -> None:
            name = str(node.funcname[-1].sval or "").lower() if node.funcname else ""
            if name in _SESSION_ADVISORY:
                found.append((ADVISORY_LOCK, f"{name}()"))
            elif name == "set_config" and node.args and len(node.args) == 3:
                setting, is_local = node.args[0], node.args[2]
                if (isinstance(is_local, ast.A_Const)
                        and isinstance(is_local.val, ast.Boolean)
                        and not is_local.val.boolval):
                    param = (setting.val.sval if isinstance(setting, ast.A_Const)
                             and isinstance(setting.val, ast.String) else "?")
                    if str(param).lower() not in TRACKED_BY_LOWER:
                        found.append((SESSION_SET, f"set_config('{param}', ..., false)"))

    Calls()(stmt)
    return found


@dataclass(slots=True)
class HazardCount:
    """How often one kind of hazard came from one (database, user, application_name)."""

    count: int
    first_seen: float  # time.time()
    last_seen: float
    example: str  # what the last one was, e.g. "SET search_path"


HazardKey = tuple[str, str, str, str]  # (database, user, application_name, kind)


class HazardTracker:
    """Watches Query / Parse bodies through the pooler's observer hooks and counts hazards."""

    def __init__(self, pooler: Pooler) -> None:
        self.pooler = pooler
        self.counts: dict[HazardKey, HazardCount] = {}
        # Kinds already logged for each client (logged once per kind and client).
        self._logged: weakref.WeakKeyDictionary[ClientConnection, set[str]] = (
            weakref.WeakKeyDictionary())
        pooler.query_observers.append(self.observe_query)
        pooler.parse_observers.append(self.observe_parse)

    # -- observers (hot path: the common case is one lower() and a few substring scans) --
    def observe_query(self, client: ClientConnection, body: bytes) -> None:
        sql = body[:-1] if body.endswith(b"\x00") else body
        if might_be_hazard(sql):
            self._check(client, sql)

    def observe_parse(self, client: ClientConnection, body: bytes) -> None:
        # Parse: statement name, NUL, SQL text, NUL, parameter types.
        start = body.find(b"\x00") + 1
        end = body.find(b"\x00", start)
        sql = body[start:end] if end >= 0 else body[start:]
        if might_be_hazard(sql):
            self._check(client, sql)

    def _check(self, client: ClientConnection, sql: bytes) -> None:
        try:
            pool = client.pool
            if pool is None or client.is_admin or pool.mode == "session":
                return
            findings = classify(sql.decode("utf-8", errors="replace"))
            for kind, what in findings:
                if kind == SESSION_SET or self.pooler.config.pin_session_state:
                    # No hazard any more: a setting follows its client, other state keeps
                    # the client on its server (session.py).
                    continue
                self.record(client, kind, what)
        except Exception:  # an observer must never break the client's traffic
            log.exception("hazard check failed for %r", client)

    # -- bookkeeping ----------------------------------------------------------------------
    def record(self, client: ClientConnection, kind: str, what: str) -> None:
        app = client.params.get("application_name", client.application_name)
        key = (client.database, client.user, app, kind)
        what = what[:_EXAMPLE_LENGTH]
        now = time.time()
        entry = self.counts.get(key)
        if entry is None and len(self.counts) >= MAX_HAZARD_KEYS:
            key = (client.database, client.user, OTHER_APPLICATIONS, kind)
            entry = self.counts.get(key)
        if entry is None:
            self.counts[key] = HazardCount(1, now, now, what)
        else:
            entry.count += 1
            entry.last_seen = now
            entry.example = what
        logged = self._logged.setdefault(client, set())
        if kind not in logged:
            logged.add(kind)
            mode = client.pool.mode if client.pool is not None else "?"
            log.warning("%r transaction-pooling hazard (%s) in %s mode: %s. Hint: %s",
                        client, kind, mode, what, HINTS[kind])

    def total(self) -> int:
        return sum(entry.count for entry in self.counts.values())
