"""Talking to PostgreSQL: connect, run EXPLAIN on a statement, and never keep its effects.

Every statement is explained inside a transaction that is rolled back, so ``EXPLAIN ANALYZE``
of an UPDATE or DELETE runs it for real (to measure it) and then undoes it. Connection and
statement failures become ``ExplainError`` with one line a person can act on.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict

from pgpilot.explain.model import ExplainError
from pgpilot.explain.sqlinfo import query_shape, statement_kind


def describe_dsn(dsn: str) -> str:
    """``host:port/dbname`` of a DSN, without its password."""
    try:
        info = conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "the given DSN"
    host = info.get("host") or "localhost"
    port = info.get("port") or "5432"
    return f"{host}:{port}/{info.get('dbname') or info.get('user') or ''}"


def first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


@contextmanager
def connect(dsn: str, *, timeout: float = 10.0) -> Iterator[psycopg.Connection[Any]]:
    """A connection, or ``ExplainError`` naming the server and why it could not be reached."""
    try:
        conn = psycopg.connect(dsn, connect_timeout=max(1, int(timeout)), autocommit=False)
    except (psycopg.Error, OSError) as exc:
        raise ExplainError(f"cannot connect to {describe_dsn(dsn)}: {first_line(exc)}") from None
    try:
        yield conn
    finally:
        conn.close()


def statement_error(exc: psycopg.Error) -> ExplainError:
    sqlstate = getattr(exc, "sqlstate", None)
    code = f" [{sqlstate}]" if sqlstate else ""
    return ExplainError(f"the statement failed{code}: {first_line(exc)}")


@dataclass
class ExplainResult:
    plan_json: Any
    modifies: bool
    kind: str
    schemas: Mapping[str, str] | None = None
    """Schema of each table the plan scans, by the plan's alias (see ``relation_schemas``)."""


def _plan_relations(plan_json: Any) -> list[tuple[str, str]]:
    """(alias, relation name) of every node of a JSON plan that scans a table."""
    found: list[tuple[str, str]] = []
    stack = [plan_json]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, dict):
            name = item.get("Relation Name")
            if isinstance(name, str) and "Schema" not in item:
                found.append((str(item.get("Alias") or name), name))
            stack.extend(v for v in item.values() if isinstance(v, list | dict))
    return found


def relation_schemas(conn: psycopg.Connection[Any], plan_json: Any,
                     sql: str | None = None) -> dict[str, str]:
    """The schema of each table a JSON plan scans, by the plan's alias for it.

    EXPLAIN without VERBOSE prints ``Seq Scan on events``, not ``newcomer.events``; a fix must
    name the table the statement used. A table the statement names with its schema takes that
    schema (matched by alias); any other (unqualified in the statement, or reached through a
    view or a partition) is the one of that name visible on the search_path, else the only
    table of that name. A name found in several schemas, none visible, is left unqualified.
    """
    relations = _plan_relations(plan_json)
    if not relations:
        return {}
    by_alias: dict[str, str] = {}
    if sql:
        try:
            tables = query_shape(sql).tables
        except ExplainError:
            tables = []
        by_alias = {t.alias: t.schema for t in tables if t.schema}
    names = sorted({name for _, name in relations})
    with conn.cursor() as cur:
        cur.execute(
            "SELECT c.relname, n.nspname, pg_catalog.pg_table_is_visible(c.oid) "
            "FROM pg_catalog.pg_class AS c "
            "JOIN pg_catalog.pg_namespace AS n ON n.oid = c.relnamespace "
            "WHERE c.relname = ANY(%s)", (names,))
        rows = cur.fetchall()
    visible: dict[str, str] = {}
    anywhere: dict[str, set[str]] = {}
    for relname, nspname, is_visible in rows:
        anywhere.setdefault(str(relname), set()).add(str(nspname))
        if is_visible:
            visible[str(relname)] = str(nspname)
    schemas: dict[str, str] = {}
    for alias, name in relations:
        schema = by_alias.get(alias) or visible.get(name)
        if schema is None and len(anywhere.get(name, ())) == 1:
            (schema,) = anywhere[name]
        if schema is not None:
            schemas[alias] = schema
    return schemas


def explain_json(conn: psycopg.Connection[Any], sql: str, *, analyze: bool,
                 settings: dict[str, str] | None = None,
                 statement_timeout_ms: int | None = None) -> Any:
    """``EXPLAIN (FORMAT JSON)`` of ``sql`` on ``conn``, in the current transaction."""
    options = "ANALYZE, BUFFERS, FORMAT JSON" if analyze else "FORMAT JSON"
    try:
        with conn.cursor() as cur:
            if statement_timeout_ms:
                cur.execute(f"SET LOCAL statement_timeout = {int(statement_timeout_ms)}")
            for name, value in (settings or {}).items():
                cur.execute("SELECT set_config(%s, %s, true)", (name, value))
            cur.execute(f"EXPLAIN ({options}) {sql}".encode())
            row = cur.fetchone()
    except psycopg.Error as exc:
        conn.rollback()
        raise statement_error(exc) from None
    if row is None:
        raise ExplainError("EXPLAIN returned nothing")
    return row[0]


def explain_statement(dsn: str, sql: str, *, analyze: bool = True,
                      settings: dict[str, str] | None = None,
                      statement_timeout_ms: int | None = None) -> ExplainResult:
    """Explain ``sql`` inside BEGIN ... ROLLBACK; whether it modifies data comes from pglast."""
    kind, modifies = statement_kind(sql)
    with connect(dsn) as conn:
        try:
            plan = explain_json(conn, sql, analyze=analyze, settings=settings,
                                statement_timeout_ms=statement_timeout_ms)
            # In the same transaction: the same search_path (settings may change it).
            schemas = relation_schemas(conn, plan, sql)
        finally:
            conn.rollback()
    return ExplainResult(plan_json=plan, modifies=modifies, kind=kind, schemas=schemas)
