"""Statements about whole databases: the pooler's idle servers must not stand in their way.

``DROP DATABASE x``, ``ALTER DATABASE x RENAME`` and ``CREATE DATABASE y TEMPLATE x`` fail while
any other session is connected to ``x`` ("database "x" is being accessed by other users"). A
direct client that closed its last connection to ``x`` has none left, but a pooler keeps idle
server connections to ``x`` for the next client, so through PgBouncer such a statement fails
where it works directly (test suites that create and drop their databases meet it first). So
when a client sends one, the servers of every pool on ``x`` are marked to close (``RECONNECT x``,
in effect): the idle ones close at once, before the statement reaches PostgreSQL, which waits up
to five seconds for backends of ``x`` to exit; busy ones close when their client releases them.

The compiled fast path hands any text that starts with CREATE, ALTER or DROP and names
``database`` to Python (engine/proto.c, sql_needs_python), so every such statement passes here.
"""

from __future__ import annotations

import logging
from functools import lru_cache
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pgpilot.proxy.client import ClientConnection
    from pgpilot.proxy.pooler import Pooler

log = logging.getLogger("pgpilot.proxy")

_BLANKS = " \t\n\r\f\v"


class DatabaseStatements:
    """Watches Query and Parse texts (the pooler's observers) for statements that need a
    database free of other sessions."""

    def __init__(self, pooler: Pooler) -> None:
        self.pooler = pooler
        pooler.query_observers.append(self.observe_query)
        pooler.parse_observers.append(self.observe_parse)

    def observe_query(self, client: ClientConnection, body: bytes) -> None:
        self._check(client, body[:-1] if body.endswith(b"\x00") else body)

    def observe_parse(self, client: ClientConnection, body: bytes) -> None:
        start = body.find(b"\x00") + 1
        end = body.find(b"\x00", start)
        self._check(client, body[start:end] if end >= 0 else body[start:])

    def _check(self, client: ClientConnection, sql: bytes) -> None:
        low = sql.lstrip(_BLANKS.encode()).lower()
        if not low.startswith((b"drop", b"alter", b"create")) or b"database" not in low:
            return
        try:
            names = databases_needed(sql.decode("utf-8", errors="replace"))
            for name in names:
                closed = self.pooler.release_database(name)
                if closed:
                    log.info("%r %s database %s: closed %d idle server connections to it",
                             client, "needs", name, closed)
        except Exception:  # an observer must never break the client's traffic
            log.exception("database statement check failed for %r", client)


@lru_cache(maxsize=256)
def databases_needed(sql: str) -> tuple[str, ...]:
    """The databases ``sql`` needs free of other sessions: the one it drops, renames or
    alters the tablespace of, the template it copies."""
    from pglast import ast, parse_sql
    from pglast.enums import ObjectType
    from pglast.parser import ParseError

    try:
        statements = parse_sql(sql)
    except (ParseError, ValueError, RecursionError):
        return ()
    found: list[str] = []
    for raw in statements:
        stmt: Any = raw.stmt
        if isinstance(stmt, ast.DropdbStmt | ast.AlterDatabaseStmt):
            found.append(str(stmt.dbname))
        elif isinstance(stmt, ast.RenameStmt) and stmt.renameType == ObjectType.OBJECT_DATABASE:
            found.append(str(stmt.subname))
        elif isinstance(stmt, ast.CreatedbStmt):
            for option in stmt.options or ():
                if option.defname == "template" and option.arg is not None:
                    value = getattr(option.arg, "sval", None)
                    if value:
                        found.append(str(value))
    return tuple(found)
