"""Keyset pagination: the fix for ``deep_offset``, with NULLs in the ordering handled.

``OFFSET n`` makes PostgreSQL produce and throw away ``n`` rows for every page, so page 1,000
costs a thousand pages. A keyset page asks for the rows *after the last one shown* instead
(``WHERE (created_at, id) > (:c, :i) ORDER BY created_at, id LIMIT n``), which an index on the
ordering answers in the time of one page, wherever the page is.

sqlakeyset (``select_page``) does this for sync and async sessions, several columns and mixed
directions, but refuses ordering columns that may hold NULLs ("results will be wrong": rows
with NULL keys are skipped). :func:`paginate` is the small piece that adds them: for each
ordering column it reads the direction and where its NULLs sort (PostgreSQL's default: last
when ascending, first when descending; or ``nulls_first()`` / ``nulls_last()``), and builds the
"after this row" condition with ``IS NULL`` / ``IS NOT NULL`` terms where a NULL can come next.
When every column sorts the same way and none can be NULL it is the row comparison above, which
a multi-column index serves directly.

Cursors are opaque strings (URL-safe base64 of typed JSON) holding the boundary row's key
values and a digest of the ordering: a cursor made for another query is refused with a
``ValueError`` instead of paging from a wrong place.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import decimal
import hashlib
import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from sqlalchemy import Select, and_, false, or_, tuple_
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession
from sqlalchemy.orm import Session
from sqlalchemy.sql import operators
from sqlalchemy.sql.elements import ColumnElement, UnaryExpression

__all__ = ["Page", "paginate", "paginate_async"]

T = TypeVar("T")
_CURSOR_VERSION = 1
_KEY_LABEL = "_pgpilot_keyset_{}"


@dataclass(frozen=True)
class Page(Generic[T]):
    """One page of a keyset pagination."""

    items: list[T]
    """The rows of the page: the entity (or value) when the statement selects one thing,
    else a tuple of what it selects, in the statement's order."""
    next_cursor: str | None
    """Pass as ``after=`` for the next page; None on the last page."""
    previous_cursor: str | None
    """Pass as ``before=`` for the previous page; None on the first page."""

    @property
    def has_next(self) -> bool:
        return self.next_cursor is not None

    @property
    def has_previous(self) -> bool:
        return self.previous_cursor is not None


@dataclass(frozen=True)
class _Key:
    """One ORDER BY term: its expression, direction, where its NULLs go, whether it may be
    NULL at all."""

    expression: ColumnElement[Any]
    descending: bool
    nulls_first: bool
    nullable: bool

    def reversed(self) -> _Key:
        return _Key(self.expression, not self.descending, not self.nulls_first, self.nullable)

    def order_by(self) -> ColumnElement[Any]:
        term = self.expression.desc() if self.descending else self.expression.asc()
        return term.nulls_first() if self.nulls_first else term.nulls_last()

    def equal(self, value: Any) -> ColumnElement[bool]:
        return self.expression.is_(None) if value is None else self.expression == value

    def after(self, value: Any) -> ColumnElement[bool] | None:
        """Rows whose value of this term sorts strictly after ``value`` (None: no row can)."""
        if value is None:
            # NULLs first: every non-NULL comes after; NULLs last: nothing does
            return self.expression.is_not(None) if self.nulls_first else None
        beyond: ColumnElement[bool] = (
            self.expression < value if self.descending else self.expression > value
        )
        if self.nullable and not self.nulls_first:
            return or_(beyond, self.expression.is_(None))
        return beyond


def _keys(statement: Select[Any]) -> list[_Key]:
    clauses = list(getattr(statement, "_order_by_clauses", ()))
    if not clauses:
        raise ValueError(
            "paginate needs a statement with ORDER BY, ending with a unique column "
            "(e.g. .order_by(Event.created_at, Event.id))"
        )
    keys: list[_Key] = []
    for clause in clauses:
        element: Any = clause
        descending = False
        nulls: bool | None = None
        while isinstance(element, UnaryExpression) and element.modifier is not None:
            modifier = element.modifier
            if modifier is operators.desc_op:
                descending = True
            elif modifier is operators.nulls_first_op:
                nulls = True
            elif modifier is operators.nulls_last_op:
                nulls = False
            elif modifier is not operators.asc_op:
                break
            element = element.element
        element = getattr(element, "element", element) if _is_label_reference(element) else element
        if not isinstance(element, ColumnElement):
            raise TypeError(f"paginate cannot order by {clause!r}: use a column or expression")
        nullable = getattr(element, "nullable", True) is not False
        # PostgreSQL's default: NULLs sort as larger than any value
        keys.append(_Key(element, descending, descending if nulls is None else nulls, nullable))
    if not any(_is_unique(key.expression) for key in keys):
        raise ValueError(
            "paginate needs the ORDER BY to include a unique column (the primary key, last): "
            "with ties between rows, pages would skip or repeat them"
        )
    return keys


def _is_label_reference(element: Any) -> bool:
    return type(element).__name__ in {"_label_reference", "_textual_label_reference"}


def _is_unique(expression: Any) -> bool:
    return bool(getattr(expression, "primary_key", False) or getattr(expression, "unique", False))


def _digest(keys: Sequence[_Key]) -> str:
    text = "|".join(f"{key.expression}:{key.descending}:{key.nulls_first}" for key in keys)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _encode_value(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return {"f": repr(value)}
    if isinstance(value, datetime.datetime):
        return {"dt": value.isoformat()}
    if isinstance(value, datetime.date):
        return {"d": value.isoformat()}
    if isinstance(value, datetime.time):
        return {"t": value.isoformat()}
    if isinstance(value, datetime.timedelta):
        return {"td": [value.days, value.seconds, value.microseconds]}
    if isinstance(value, decimal.Decimal):
        return {"dec": str(value)}
    if isinstance(value, uuid.UUID):
        return {"uuid": str(value)}
    if isinstance(value, bytes | bytearray | memoryview):
        return {"b": base64.b64encode(bytes(value)).decode()}
    raise TypeError(
        f"paginate cannot put a {type(value).__name__} ordering value in a cursor: order by "
        "columns of simple types (numbers, text, dates and times, UUID, bytes)"
    )


_DECODERS: dict[str, Any] = {
    "f": float,
    "dt": datetime.datetime.fromisoformat,
    "d": datetime.date.fromisoformat,
    "t": datetime.time.fromisoformat,
    "td": lambda parts: datetime.timedelta(*parts),
    "dec": decimal.Decimal,
    "uuid": uuid.UUID,
    "b": base64.b64decode,
}


def _decode_value(value: Any) -> Any:
    if isinstance(value, dict):
        ((tag, payload),) = value.items()
        return _DECODERS[tag](payload)
    return value


def _encode_cursor(keys: Sequence[_Key], values: Sequence[Any]) -> str:
    payload = [_CURSOR_VERSION, _digest(keys), [_encode_value(value) for value in values]]
    raw = json.dumps(payload, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(keys: Sequence[_Key], cursor: str) -> list[Any]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        version, digest, values = json.loads(raw)
        decoded = [_decode_value(value) for value in values]
    except (ValueError, TypeError, KeyError, binascii.Error, UnicodeDecodeError) as exc:
        raise ValueError(f"not a paginate() cursor: {cursor[:40]!r}") from exc
    if version != _CURSOR_VERSION or digest != _digest(keys) or len(decoded) != len(keys):
        raise ValueError(
            "this cursor was made for another query (its ORDER BY differs): start again "
            "from the first page"
        )
    return decoded


def _after(keys: Sequence[_Key], values: Sequence[Any]) -> ColumnElement[bool]:
    """Rows sorting strictly after the row whose key values are ``values``."""
    if (
        len({key.descending for key in keys}) == 1
        and not any(key.nullable for key in keys)
        and all(value is not None for value in values)
    ):
        # one direction, no NULLs: a row comparison, which a multi-column index serves
        columns = tuple_(*(key.expression for key in keys))
        bound = tuple_(*values)
        return columns < bound if keys[0].descending else columns > bound
    alternatives: list[ColumnElement[bool]] = []
    for i, key in enumerate(keys):
        step = key.after(values[i])
        if step is not None:
            alternatives.append(
                and_(*(k.equal(v) for k, v in zip(keys, values[:i], strict=False)), step)
            )
    return or_(*alternatives) if alternatives else false()


@dataclass(frozen=True)
class _Plan:
    statement: Select[Any]
    keys: list[_Key]
    per_page: int
    backwards: bool
    had_cursor: bool


def _plan(statement: Select[Any], per_page: int, after: str | None, before: str | None) -> _Plan:
    if not isinstance(statement, Select):
        raise TypeError(f"paginate takes a select(), not {type(statement).__name__}")
    if isinstance(per_page, bool) or not isinstance(per_page, int) or per_page < 1:
        raise ValueError(f"per_page must be a positive integer, not {per_page!r}")
    if after is not None and before is not None:
        raise ValueError("give after= or before=, not both")
    if (
        getattr(statement, "_limit_clause", None) is not None
        or getattr(statement, "_offset_clause", None) is not None
    ):
        raise ValueError("paginate sets LIMIT itself: pass the statement without LIMIT/OFFSET")
    keys = _keys(statement)
    backwards = before is not None
    cursor = before if backwards else after
    walk = [key.reversed() for key in keys] if backwards else keys
    query = statement.order_by(None).order_by(*(key.order_by() for key in walk))
    if cursor is not None:
        query = query.where(_after(walk, _decode_cursor(keys, cursor)))
    query = query.add_columns(
        *(key.expression.label(_KEY_LABEL.format(i)) for i, key in enumerate(keys))
    ).limit(per_page + 1)
    return _Plan(query, keys, per_page, backwards, cursor is not None)


def _page(plan: _Plan, rows: Sequence[Any]) -> Page[Any]:
    more = len(rows) > plan.per_page
    rows = list(rows[: plan.per_page])
    if plan.backwards:
        rows.reverse()
    count = len(plan.keys)
    if not rows:
        return Page([], None, None)
    width = len(rows[0]) - count  # what the statement selects: one entity, or columns
    items = [row[0] if width == 1 else tuple(row[:width]) for row in rows]
    first = _encode_cursor(plan.keys, tuple(rows[0][-count:]))
    last = _encode_cursor(plan.keys, tuple(rows[-1][-count:]))
    if plan.backwards:
        # the cursor row itself comes after this page; more rows before it if we got them
        return Page(items, last, first if more else None)
    return Page(items, last if more else None, first if plan.had_cursor else None)


def paginate(
    session: Session | Connection,
    statement: Select[Any],
    per_page: int,
    *,
    after: str | None = None,
    before: str | None = None,
) -> Page[Any]:
    """One page of ``statement`` (a ``select()`` with an ``ORDER BY`` that includes a unique
    column) by keyset: the ``per_page`` rows after the cursor ``after`` (or before ``before``),
    the first page without either.

    Directions may differ between columns, and columns may hold NULLs (sorted where the
    ORDER BY puts them: ``nulls_first()`` / ``nulls_last()``, else PostgreSQL's default).
    Runs one query, in the caller's session or connection.
    """
    plan = _plan(statement, per_page, after, before)
    return _page(plan, session.execute(plan.statement).all())


async def paginate_async(
    session: AsyncSession | AsyncConnection,
    statement: Select[Any],
    per_page: int,
    *,
    after: str | None = None,
    before: str | None = None,
) -> Page[Any]:
    """:func:`paginate` for an ``AsyncSession`` or ``AsyncConnection`` (asyncpg, psycopg)."""
    plan = _plan(statement, per_page, after, before)
    result = await session.execute(plan.statement)
    return _page(plan, result.all())
