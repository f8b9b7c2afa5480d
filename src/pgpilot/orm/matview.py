"""Refresh a materialized view safely: the right index for CONCURRENTLY, one refresher at a time.

``REFRESH MATERIALIZED VIEW CONCURRENTLY`` keeps the view readable while it refreshes, but
PostgreSQL accepts it only when the view has a unique index on plain columns and without a
WHERE clause; the helper checks first and says which view lacks one. Two schedulers refreshing
the same view would do the work twice and queue behind each other: the helper takes a
transaction-level advisory lock keyed on the view, and the second one returns at once
(``refreshed=False``) unless ``wait=True``. The refresh runs in the caller's transaction, and
the lock is held until it ends.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession
from sqlalchemy.orm import Session

__all__ = ["RefreshResult", "refresh_materialized_view", "refresh_materialized_view_async"]

_LOOKUP = text(
    "SELECT c.oid::bigint, c.relkind::text, "
    "quote_ident(n.nspname) || '.' || quote_ident(c.relname), "
    "EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisunique "
    "AND i.indisvalid AND i.indpred IS NULL AND i.indexprs IS NULL) "
    "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
    "WHERE c.oid = to_regclass(:name)"
)
# The advisory lock's two keys: this helper's namespace, and the view's OID.
_LOCK_NAMESPACE = 0x70677076  # "pgpv"


@dataclass(frozen=True, slots=True)
class RefreshResult:
    """What a refresh did."""

    view: str
    """The view's qualified name."""
    concurrently: bool
    refreshed: bool
    """False when another session held the view's lock and ``wait`` was False."""
    seconds: float
    """How long the refresh took (0.0 when it did not run)."""


def _check(row: Any, name: str, concurrently: bool) -> tuple[int, str]:
    if row is None:
        raise LookupError(f"no materialized view named {name!r}")
    oid, relkind, qualified, unique = row
    if relkind != "m":
        raise ValueError(f"{qualified} is not a materialized view")
    if concurrently and not unique:
        raise ValueError(
            f"REFRESH MATERIALIZED VIEW CONCURRENTLY needs a unique index on {qualified} "
            "(plain columns, no WHERE): CREATE UNIQUE INDEX ON "
            f"{qualified} (<key columns>), or refresh with concurrently=False"
        )
    return int(oid), str(qualified)


def _statements(qualified: str, concurrently: bool, wait: bool) -> tuple[Any, Any]:
    lock = (
        "SELECT pg_advisory_xact_lock(:ns, CAST(:oid AS int4)), true"
        if wait
        else "SELECT true, pg_try_advisory_xact_lock(:ns, CAST(:oid AS int4))"
    )
    how = "CONCURRENTLY " if concurrently else ""
    return text(lock), text(f"REFRESH MATERIALIZED VIEW {how}{qualified}")


def refresh_materialized_view(
    conn: Connection | Session, name: str, concurrently: bool = True, *, wait: bool = False
) -> RefreshResult:
    """Refresh materialized view ``name`` in ``conn``'s transaction (commit it to publish).

    Raises ``ValueError`` for CONCURRENTLY on a view without a usable unique index, and
    ``LookupError`` when there is no such view.
    """
    row = conn.execute(_LOOKUP, {"name": name}).first()
    oid, qualified = _check(row, name, concurrently)
    lock, refresh = _statements(qualified, concurrently, wait)
    locked = conn.execute(lock, {"ns": _LOCK_NAMESPACE, "oid": oid % 2**31}).one()[1]
    if not locked:
        return RefreshResult(qualified, concurrently, False, 0.0)
    start = time.perf_counter()
    conn.execute(refresh)
    return RefreshResult(qualified, concurrently, True, time.perf_counter() - start)


async def refresh_materialized_view_async(
    conn: AsyncConnection | AsyncSession,
    name: str,
    concurrently: bool = True,
    *,
    wait: bool = False,
) -> RefreshResult:
    """:func:`refresh_materialized_view` for an asyncio connection or session."""
    row = (await conn.execute(_LOOKUP, {"name": name})).first()
    oid, qualified = _check(row, name, concurrently)
    lock, refresh = _statements(qualified, concurrently, wait)
    locked = (await conn.execute(lock, {"ns": _LOCK_NAMESPACE, "oid": oid % 2**31})).one()[1]
    if not locked:
        return RefreshResult(qualified, concurrently, False, 0.0)
    start = time.perf_counter()
    await conn.execute(refresh)
    return RefreshResult(qualified, concurrently, True, time.perf_counter() - start)
