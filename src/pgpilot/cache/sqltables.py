"""Which tables a SQL statement reads and which it writes (pglast's parser, cached per text).

Driver placeholders (``%(name)s``, ``%s``) are turned into ``$n`` first, so the statements
SQLAlchemy sends through psycopg parse as they do through asyncpg. A statement pglast cannot
parse reads and writes "unknown" tables: callers treat that as "maybe anything".
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

__all__ = ["StatementTables", "statement_tables"]

_PLACEHOLDER = re.compile(r"%\(\w+\)s|%s")


@dataclass(frozen=True, slots=True)
class StatementTables:
    """``reads`` / ``writes``: bare table names; ``known``: whether the text parsed; ``select``:
    whether every statement in it is a SELECT (no writes, no utility commands)."""

    reads: frozenset[str]
    writes: frozenset[str]
    known: bool
    select: bool


_UNKNOWN = StatementTables(frozenset(), frozenset(), False, False)
_WRITE_STATEMENTS = ("InsertStmt", "UpdateStmt", "DeleteStmt", "MergeStmt")


def _walk(node: Any, reads: set[str], ctes: set[str]) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "RangeVar" and isinstance(value, dict):
                if value.get("relname"):
                    reads.add(str(value["relname"]) if value.get("schemaname")
                              else "\0" + str(value["relname"]))
            elif key == "CommonTableExpr" and isinstance(value, dict) and value.get("ctename"):
                ctes.add(str(value["ctename"]))
            _walk(value, reads, ctes)
    elif isinstance(node, list):
        for item in node:
            _walk(item, reads, ctes)


def _relname(range_var: Any) -> str | None:
    if isinstance(range_var, dict):
        inner = range_var.get("RangeVar", range_var)
        name = inner.get("relname") if isinstance(inner, dict) else None
        return str(name) if name else None
    return None


@lru_cache(maxsize=2048)
def statement_tables(sql: str) -> StatementTables:
    """The tables ``sql`` reads and writes (writes are reads too)."""
    try:
        from pglast.parser import parse_sql_json

        tree = json.loads(parse_sql_json(_PLACEHOLDER.sub("$1", sql).replace("%%", "%")))
    except Exception:
        return _UNKNOWN
    reads: set[str] = set()
    writes: set[str] = set()
    ctes: set[str] = set()
    select = True
    for raw in tree.get("stmts", ()):
        stmt = raw.get("stmt", {})
        kind = next(iter(stmt), "")
        body = stmt.get(kind, {})
        if kind != "SelectStmt" or body.get("intoClause") or body.get("lockingClause"):
            select = False
        if kind in _WRITE_STATEMENTS:
            name = _relname(body.get("relation"))
            if name:
                writes.add(name)
        elif kind == "TruncateStmt":
            writes.update(n for n in map(_relname, body.get("relations", ())) if n)
        elif kind == "CopyStmt" and body.get("is_from"):
            name = _relname(body.get("relation"))
            if name:
                writes.add(name)
        elif kind == "SelectStmt" and body.get("intoClause"):
            name = _relname(body["intoClause"].get("IntoClause", body["intoClause"]).get("rel"))
            if name:
                writes.add(name)
        _walk(stmt, reads, ctes)
        # data-modifying CTEs: WITH x AS (UPDATE t ...) SELECT ...
        for cte in body.get("withClause", {}).get("ctes", ()) if isinstance(body, dict) else ():
            query = cte.get("CommonTableExpr", {}).get("ctequery", {})
            inner_kind = next(iter(query), "")
            if inner_kind in _WRITE_STATEMENTS:
                select = False
                name = _relname(query[inner_kind].get("relation"))
                if name:
                    writes.add(name)
    names = {n[1:] for n in reads if n.startswith("\0") and n[1:] not in ctes}
    names |= {n for n in reads if not n.startswith("\0")}
    return StatementTables(frozenset(names | writes), frozenset(writes), True, select)
