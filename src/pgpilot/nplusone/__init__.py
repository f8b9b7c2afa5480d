"""pgpilot's N+1 detector: find the loops that hammer the database, and say how to fix them.

::

    from pgpilot.nplusone import detect, watch, NPlusOneError

    with detect() as report:            # threshold=3, mode="collect" | "warn" | "raise"
        run_the_code()
    for finding in report.findings:
        print(finding.kind, finding.count, finding.callsite, finding.suggestion)

Every SQLAlchemy engine (sync and async) is watched while a ``detect()`` block is open; raw
psycopg 3 and asyncpg connections are watched once handed to :func:`watch`. Scopes follow
``contextvars``: each request, task or thread sees only its own queries. The detection itself
lives in :mod:`pgpilot.insight`, shared with the pooler.
"""

from __future__ import annotations

from typing import TypeVar

from pgpilot.insight.detector import DEFAULT_DUPLICATE_THRESHOLD, DEFAULT_THRESHOLD, Finding
from pgpilot.nplusone.core import (
    Detection,
    Mode,
    NPlusOneError,
    NPlusOneWarning,
    Report,
    detach,
    detect,
)
from pgpilot.nplusone.middleware import ASGIMiddleware, WSGIMiddleware

__all__ = [
    "DEFAULT_DUPLICATE_THRESHOLD",
    "DEFAULT_THRESHOLD",
    "ASGIMiddleware",
    "Detection",
    "Finding",
    "Mode",
    "NPlusOneError",
    "NPlusOneWarning",
    "Report",
    "WSGIMiddleware",
    "detach",
    "detect",
    "unwatch",
    "watch",
]

Connection = TypeVar("Connection")


def watch(conn: Connection) -> Connection:
    """Report the statements of a psycopg 3 (sync or async) or asyncpg connection to whatever
    ``detect()`` scope is open where they run. Returns ``conn``; watching twice is harmless.

    SQLAlchemy engines need no ``watch()``: they are seen while any scope is open.
    """
    from pgpilot.nplusone import asyncpg_feed, psycopg_feed

    if psycopg_feed.is_psycopg_connection(conn):
        return psycopg_feed.watch_psycopg(conn)  # type: ignore[no-any-return]
    if asyncpg_feed.is_asyncpg_connection(conn):
        return asyncpg_feed.watch_asyncpg(conn)  # type: ignore[no-any-return]
    raise TypeError(
        f"watch() takes a psycopg 3 or asyncpg connection, not {type(conn).__name__}; "
        "SQLAlchemy engines are watched without it"
    )


def unwatch(conn: Connection) -> Connection:
    """Stop reporting a connection's statements."""
    from pgpilot.nplusone import asyncpg_feed, psycopg_feed

    if psycopg_feed.is_psycopg_connection(conn):
        return psycopg_feed.unwatch_psycopg(conn)  # type: ignore[no-any-return]
    if asyncpg_feed.is_asyncpg_connection(conn):
        return asyncpg_feed.unwatch_asyncpg(conn)  # type: ignore[no-any-return]
    raise TypeError(f"unwatch() takes a psycopg 3 or asyncpg connection, not {type(conn).__name__}")
