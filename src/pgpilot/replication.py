"""Read replicas, sans-IO: what the pooler (``proxy/routing.py``) and the in-app router
(``orm/routing.py``) share. No sockets, no drivers; it imports nothing else of pgpilot.

* **LSNs**: :func:`parse_lsn` / :func:`format_lsn` between PostgreSQL's ``X/Y`` text and ints.
* **Statements**: :func:`classify` says, from the text alone (pglast, cached), whether a
  statement may run on a hot standby: it reads, or it writes, locks (``FOR UPDATE/SHARE``),
  uses a data-modifying CTE, ``SELECT INTO``, or calls a function the caller does not know to
  be safe there (:class:`FunctionSafety`), or it begins a transaction (``READ ONLY`` or not),
  or carries a routing hint (a ``/* pgpilot:primary */`` comment, or ``SET`` of the
  pooler's custom ``route`` setting to ``primary`` or ``replica``).
* **Health**: :class:`ReplicaState` is one replica as last polled (``HEALTH_SQL``) and
  :class:`ReplicaSet` chooses among them: eligible replicas are reachable, in recovery, within
  the lag bounds, and have replayed at least the caller's ``min_lsn``; among those, the one with
  the least outstanding work (ties in turn). None eligible: the primary.

Read-your-writes rests on one fact of PostgreSQL: once ``COMMIT`` has returned, the primary's
``pg_current_wal_insert_lsn()`` is at or past the end of that commit's WAL record, and a
standby's ``pg_last_wal_replay_lsn()`` at or past it means the commit is visible there. Both
only grow, so a replay position polled a moment ago is a safe lower bound of today's.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import Enum
from functools import lru_cache
from typing import Any

__all__ = [
    "HEALTH_SQL",
    "PRIMARY_LSN_SQL",
    "SAFE_FUNCTIONS_SQL",
    "SAFE_VOLATILE_FUNCTIONS",
    "FunctionSafety",
    "ReplicaSet",
    "ReplicaState",
    "Route",
    "Statement",
    "classify",
    "format_lsn",
    "parse_lsn",
]

# One round trip per replica per health check: is it a standby, how far has it replayed, and
# how old is the last transaction it replayed when it still has WAL to replay (0 when idle and
# caught up: an idle primary makes no new transactions, which is not lag).
HEALTH_SQL = (
    "SELECT pg_is_in_recovery(), "
    "COALESCE(pg_last_wal_replay_lsn(), pg_current_wal_insert_lsn())::text, "
    "CASE WHEN NOT pg_is_in_recovery() "
    "OR pg_last_wal_receive_lsn() = pg_last_wal_replay_lsn() THEN 0 "
    "ELSE COALESCE(EXTRACT(EPOCH FROM now() - pg_last_xact_replay_timestamp()) * 1000, 0) "
    "END::float8"
)
# After a commit returned: a WAL position at or past that commit's record.
PRIMARY_LSN_SQL = "SELECT pg_current_wal_insert_lsn()::text"
# Function names every overload of which is immutable or stable (the catalog's own word).
SAFE_FUNCTIONS_SQL = (
    "SELECT proname FROM pg_catalog.pg_proc GROUP BY proname HAVING bool_and(provolatile <> 'v')"
)
# Volatile built-ins that neither write nor need the primary's state: fine on a standby.
SAFE_VOLATILE_FUNCTIONS = frozenset({
    "random", "random_normal", "setseed", "clock_timestamp", "timeofday", "statement_timestamp",
    "transaction_timestamp", "now", "gen_random_uuid", "uuid_generate_v4", "pg_sleep",
    "pg_sleep_for", "pg_sleep_until", "pg_is_in_recovery", "pg_last_wal_replay_lsn",
    "pg_last_wal_receive_lsn", "pg_last_xact_replay_timestamp", "pg_backend_pid",
    "pg_relation_size", "pg_total_relation_size", "pg_table_size", "pg_indexes_size",
    "pg_database_size", "pg_size_pretty", "pg_typeof", "version", "current_setting",
})


def parse_lsn(text: str) -> int:
    """``'16/B374D848'`` -> its byte position as an int."""
    high, _, low = text.strip().partition("/")
    if not low:
        raise ValueError(f"not an LSN: {text!r}")
    return (int(high, 16) << 32) | int(low, 16)


def format_lsn(lsn: int) -> str:
    """An int byte position -> PostgreSQL's ``X/Y`` text."""
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


# -- statements ------------------------------------------------------------------------------
class Route(Enum):
    """Where a statement may go: a replica, or the primary only."""

    REPLICA = "replica"
    PRIMARY = "primary"


@dataclass(frozen=True)
class Statement:
    """What :func:`classify` read from one query string (all its statements).

    ``writes``: it writes or locks or could (anything but a plain read); ``functions``: the
    functions it calls, lower-case, ``schema.name`` when qualified; ``begin``: it starts a
    transaction (``begin_read_only``: ``BEGIN READ ONLY`` / ``START TRANSACTION READ ONLY``);
    ``ends``: it ends one; ``hint``: a routing hint's target; ``sets_route``: it is
    a ``SET`` of the pooler's own ``route`` setting (never sent to a server)."""

    writes: bool
    functions: frozenset[str] = frozenset()
    begin: bool = False
    begin_read_only: bool = False
    ends: bool = False
    hint: Route | None = None
    sets_route: bool = False
    reason: str = ""

    def route(self, is_safe: Callable[[str], bool]) -> Route:
        """The hint if any, else the primary for writes and for functions not known safe."""
        if self.hint is not None:
            return self.hint
        if self.writes:
            return Route.PRIMARY
        if any(not is_safe(name) for name in self.functions):
            return Route.PRIMARY
        return Route.REPLICA


_HINT = re.compile(r"/\*\s*pgpilot:\s*(primary|replica)\s*\*/", re.IGNORECASE)
_SET_ROUTE = re.compile(
    r"^\s*SET\s+(?:SESSION\s+|LOCAL\s+)?pgpilot\.route\s*(?:=|TO)\s*'?(\w+)'?\s*;?\s*$",
    re.IGNORECASE,
)
# A plain SELECT without a function call, a lock, INTO, a comment or a second statement: a read,
# known without parsing (pgbench -S's statement, "SELECT ... FROM t WHERE id = 42").
_PLAIN_SELECT = re.compile(r"\s*select\b[^;()'\"/-]*;?\s*", re.IGNORECASE)
_PLAIN_EXCLUDED = re.compile(r"\b(?:for|into)\b", re.IGNORECASE)
_READ_NODES = {"SelectStmt", "VariableShowStmt", "ExplainStmt"}
_WRITE_NODES = {"InsertStmt", "UpdateStmt", "DeleteStmt", "MergeStmt", "IntoClause",
                "LockingClause"}


def _walk(node: Any) -> Iterator[dict[str, Any]]:
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            yield item
            stack.extend(v for v in item.values() if isinstance(v, (dict, list, tuple)))
        elif isinstance(item, (list, tuple)):
            stack.extend(item)


def _func_name(call: dict[str, Any]) -> str:
    parts = [p.get("sval", "") for p in call.get("funcname") or () if isinstance(p, dict)]
    if parts and parts[0] == "pg_catalog":
        parts = parts[1:]
    return ".".join(parts).lower()


def classify(sql: str) -> Statement:
    """What ``sql`` (one query string, any number of statements) needs, from its text alone.
    Text pglast cannot parse is a write (the primary will say what is wrong with it)."""
    if _PLAIN_SELECT.fullmatch(sql) and not _PLAIN_EXCLUDED.search(sql):
        return _READ
    return _classify(sql)


_READ = Statement(writes=False, reason="plain select")


@lru_cache(maxsize=4096)
def _classify(sql: str) -> Statement:
    hint_match = _HINT.search(sql)
    hint = Route(hint_match.group(1).lower()) if hint_match else None
    set_route = _SET_ROUTE.match(sql)
    if set_route:
        value = set_route.group(1).lower()
        target = Route(value) if value in ("primary", "replica") else None
        return Statement(writes=False, hint=target, sets_route=True, reason="SET pgpilot.route")
    from pglast import parse_sql
    from pglast.parser import ParseError

    try:
        raws = parse_sql(sql)
    except ParseError:
        return Statement(writes=True, hint=hint, reason="unparsable")
    writes = False
    reason = ""
    functions: set[str] = set()
    begin = begin_read_only = ends = False
    for raw in raws:
        node: Any = raw.stmt
        tree: dict[str, Any] = node()
        kind = str(tree.get("@"))
        if kind == "TransactionStmt":
            name = tree["kind"]["name"]
            if name in ("TRANS_STMT_BEGIN", "TRANS_STMT_START"):
                begin = True
                for opt in tree.get("options") or ():
                    if opt.get("defname") == "transaction_read_only":
                        begin_read_only = bool(opt["arg"]["val"].get("ival"))
            elif name in ("TRANS_STMT_COMMIT", "TRANS_STMT_ROLLBACK", "TRANS_STMT_PREPARE",
                          "TRANS_STMT_COMMIT_PREPARED", "TRANS_STMT_ROLLBACK_PREPARED"):
                ends = True
            continue
        if kind not in _READ_NODES:
            writes, reason = True, reason or kind
            continue
        if kind == "ExplainStmt":
            analyze = any(o.get("defname") == "analyze" for o in tree.get("options") or ())
            if not analyze:
                continue
        for node in _walk(tree):
            at = node.get("@")
            if at in _WRITE_NODES:
                writes, reason = True, reason or at
            elif at == "FuncCall":
                functions.add(_func_name(node))
    return Statement(writes=writes, functions=frozenset(functions), begin=begin,
                     begin_read_only=begin_read_only, ends=ends, hint=hint, reason=reason)


class FunctionSafety:
    """Which function names may run on a standby: the catalog's non-volatile names (fed with
    the rows of ``SAFE_FUNCTIONS_SQL`` by whoever holds a connection), the volatile built-ins
    that neither write nor need the primary (:data:`SAFE_VOLATILE_FUNCTIONS`), and the caller's
    allowlist. Any other name, a user function of unknown volatility included, is not safe:
    its statement goes to the primary."""

    def __init__(self, allow: Iterable[str] = ()) -> None:
        self.allow = frozenset(name.lower() for name in allow) | SAFE_VOLATILE_FUNCTIONS
        self.catalog: frozenset[str] = frozenset()
        self.loaded = False

    def load(self, names: Iterable[str]) -> None:
        self.catalog = frozenset(name.lower() for name in names)
        self.loaded = True

    def __call__(self, name: str) -> bool:
        if name in self.allow:
            return True
        base = name.rpartition(".")[2]
        return base == name and base in self.catalog


# -- health and choice -----------------------------------------------------------------------
@dataclass
class ReplicaState:
    """One replica as last seen. ``up``: its last health check answered; ``in_recovery``:
    it is a standby (False once promoted); ``replay_lsn``: how far it had replayed;
    ``lag_bytes``: the primary's insert position minus that, at the same check; ``lag_ms``:
    age of its last replayed transaction while it has WAL left to replay; ``outstanding``:
    transactions or statements the router has on it now."""

    name: str
    up: bool = False
    in_recovery: bool = False
    replay_lsn: int = 0
    lag_bytes: int = 0
    lag_ms: float = 0.0
    outstanding: int = 0
    checks: int = 0
    error: str = ""

    def record(self, row: Sequence[Any] | None, primary_lsn: int | None,
               error: str = "") -> None:
        """One health check's answer: ``row`` from ``HEALTH_SQL``, or None and why not."""
        self.checks += 1
        if row is None:
            self.up, self.error = False, error
            return
        self.up, self.error = True, ""
        self.in_recovery = bool(row[0])
        self.replay_lsn = max(self.replay_lsn, parse_lsn(str(row[1])))
        self.lag_ms = float(row[2] or 0.0)
        if primary_lsn is not None:
            self.lag_bytes = max(0, primary_lsn - self.replay_lsn)


@dataclass
class ReplicaSet:
    """The replicas of one primary and the rule choosing one of them for a read."""

    names: Sequence[str]
    max_lag_bytes: int | None = None
    max_lag_ms: float | None = None
    states: dict[str, ReplicaState] = field(init=False)
    _turn: int = field(default=0, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def __post_init__(self) -> None:
        self.states = {name: ReplicaState(name) for name in self.names}

    def eligible(self, name: str, min_lsn: int = 0) -> bool:
        """May replica ``name`` serve a read that must see everything up to ``min_lsn``?"""
        s = self.states[name]
        if not (s.up and s.in_recovery) or s.replay_lsn < min_lsn:
            return False
        if self.max_lag_bytes is not None and s.lag_bytes > self.max_lag_bytes:
            return False
        return self.max_lag_ms is None or s.lag_ms <= self.max_lag_ms

    def choose(self, min_lsn: int = 0) -> str | None:
        """The eligible replica with the least outstanding work (ties in turn), counted as
        taken (give it back with :meth:`release`); None: read from the primary."""
        with self._lock:
            candidates = [n for n in self.names if self.eligible(n, min_lsn)]
            if not candidates:
                return None
            self._turn += 1
            least = min(self.states[n].outstanding for n in candidates)
            tied = [n for n in candidates if self.states[n].outstanding == least]
            chosen = tied[self._turn % len(tied)]
            self.states[chosen].outstanding += 1
            return chosen

    def release(self, name: str) -> None:
        with self._lock:
            state = self.states[name]
            state.outstanding = max(0, state.outstanding - 1)
