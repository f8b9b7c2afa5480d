"""Ready-made SQL batch functions for asyncpg, psycopg 3 and SQLAlchemy (sync and async).

Describe the query once, then bind it to a driver:

    customers = rows_by_key("customers", key="id", columns=["id", "name"])
    orders = rows_grouped_by_key("orders", key="customer_id", order_by=["id"])

    DataLoader(customers.asyncpg(pool))          # await .load(7) -> Record | None
    DataLoader(orders.asyncpg(pool))             # await .load(7) -> list[Record] ([] if none)
    DataLoader(orders.psycopg_async(aconn))      # rows as dicts
    SyncDataLoader(orders.psycopg(conn))
    SyncDataLoader(orders.sqlalchemy(engine))    # Engine, Connection or Session
    DataLoader(orders.sqlalchemy_async(engine))  # AsyncEngine, AsyncConnection or AsyncSession

Each batch is one statement, ``SELECT cols FROM table WHERE key = ANY($1)`` with the keys as one
array parameter: the same SQL text whatever the number of keys, so prepared-statement caches
hit. "One row per key" returns a mapping key -> row (a key without a row loads as None); "many
rows per key" returns key -> list of rows, built with a dict in one pass over the result (a key
without rows loads as []). Keys must be of the column's Python type (int for integer columns).

Table, schema and column names are always quoted as identifiers (psycopg.sql.Identifier rules:
double quotes, embedded quotes doubled), never pasted in as SQL, so a name cannot inject SQL;
it can only fail to match a column. For ORM models, :func:`orm_rows` and
:func:`orm_rows_async` batch-load mapped entities by an attribute.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from operator import itemgetter
from typing import Any, TypeAlias

from psycopg import sql as pgsql

SyncRowsFn: TypeAlias = Callable[[list[Any]], Mapping[Any, Any]]
AsyncRowsFn: TypeAlias = Callable[[list[Any]], Awaitable[Mapping[Any, Any]]]

# Stands for the keys parameter while the text is built; NUL cannot occur in a name.
_KEYS = "\x00keys\x00"


def _escape_percent(text: str) -> str:
    return text.replace("%", "%%")


def _escape_colon(text: str) -> str:
    return text.replace(":", "\\:")


def quote_identifier(name: str) -> str:
    """``name`` as a quoted SQL identifier (as psycopg.sql.Identifier renders it)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"an identifier must be a non-empty string, got {name!r}")
    if "\x00" in name:
        raise ValueError(f"an identifier cannot contain NUL: {name!r}")
    return pgsql.Identifier(name).as_string(None)


def _names(value: str | Iterable[str] | None, what: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    names = tuple(value)
    for name in names:
        if not isinstance(name, str):
            raise TypeError(f"{what} must be strings, got {name!r}")
    return names


@dataclass(frozen=True)
class BatchQuery:
    """A keyed SELECT, ready to be bound to a driver as a batch function.

    ``columns=None`` selects every column; otherwise the key column is added if missing, since
    it is needed to match rows to keys. ``order_by`` orders the rows (the lists of a grouped
    query keep that order).
    """

    table: str
    key: str
    columns: tuple[str, ...] | None = None
    schema: str | None = None
    many: bool = False
    order_by: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # Validate every name up front: a bad name fails here, not on the first request.
        for name in (self.table, self.key, *(self.columns or ()), *self.order_by):
            quote_identifier(name)
        if self.schema is not None:
            quote_identifier(self.schema)

    def text(self, placeholder: str = "$1", escape: Callable[[str], str] | None = None) -> str:
        """The statement, with ``placeholder`` for the array of keys.

        ``escape`` is applied to everything but the placeholder: a quoted name may contain
        ``%`` (special to psycopg) or ``:`` (special to SQLAlchemy's text()).
        """
        columns = self.columns
        if columns is None:
            select = "*"
        else:
            if self.key not in columns:
                columns = (*columns, self.key)
            select = ", ".join(quote_identifier(c) for c in columns)
        table = quote_identifier(self.table)
        if self.schema is not None:
            table = f"{quote_identifier(self.schema)}.{table}"
        where = f"{quote_identifier(self.key)} = ANY({_KEYS})"
        text = f"SELECT {select} FROM {table} WHERE {where}"
        if self.order_by:
            text += " ORDER BY " + ", ".join(quote_identifier(c) for c in self.order_by)
        if escape is not None:
            text = escape(text)
        return text.replace(_KEYS, placeholder)

    def shape(
        self, keys: Sequence[Any], rows: Iterable[Any], key_of: Callable[[Any], Any]
    ) -> dict[Any, Any]:
        """Rows -> {key: row} or {key: [rows]} in one pass."""
        if not self.many:
            return {key_of(row): row for row in rows}
        grouped: dict[Any, list[Any]] = {key: [] for key in keys}
        for row in rows:
            row_key = key_of(row)
            bucket = grouped.get(row_key)
            if bucket is None:
                bucket = grouped[row_key] = []
            bucket.append(row)
        return grouped

    # -- drivers -------------------------------------------------------------------------------

    def asyncpg(self, conn: Any) -> AsyncRowsFn:
        """Batch function over an asyncpg Connection or Pool (rows are asyncpg Records)."""
        query = self.text("$1")
        key = self.key

        async def fetch(keys: list[Any]) -> Mapping[Any, Any]:
            rows = await conn.fetch(query, keys)
            return self.shape(keys, rows, lambda row: row[key])

        fetch.__qualname__ = f"{self._label()} via asyncpg"
        return fetch

    def psycopg(self, conn: Any, row_factory: Any = None) -> SyncRowsFn:
        """Batch function over a psycopg Connection or ConnectionPool (rows are dicts)."""
        from psycopg.rows import dict_row

        query = self.text("%s", _escape_percent)
        key = self.key
        factory = row_factory or dict_row

        def run(connection: Any, keys: list[Any]) -> list[Any]:
            with connection.cursor(row_factory=factory) as cursor:
                cursor.execute(query, (keys,))
                return list(cursor.fetchall())

        def fetch(keys: list[Any]) -> Mapping[Any, Any]:
            if hasattr(conn, "cursor"):
                rows = run(conn, keys)
            else:  # a pool
                with conn.connection() as connection:
                    rows = run(connection, keys)
            return self.shape(keys, rows, lambda row: row[key])

        fetch.__qualname__ = f"{self._label()} via psycopg"
        return fetch

    def psycopg_async(self, conn: Any, row_factory: Any = None) -> AsyncRowsFn:
        """Batch function over a psycopg AsyncConnection or AsyncConnectionPool (dict rows)."""
        from psycopg.rows import dict_row

        query = self.text("%s", _escape_percent)
        key = self.key
        factory = row_factory or dict_row

        async def run(connection: Any, keys: list[Any]) -> list[Any]:
            async with connection.cursor(row_factory=factory) as cursor:
                await cursor.execute(query, (keys,))
                return list(await cursor.fetchall())

        async def fetch(keys: list[Any]) -> Mapping[Any, Any]:
            if hasattr(conn, "cursor"):
                rows = await run(conn, keys)
            else:  # a pool
                async with conn.connection() as connection:
                    rows = await run(connection, keys)
            return self.shape(keys, rows, lambda row: row[key])

        fetch.__qualname__ = f"{self._label()} via psycopg async"
        return fetch

    def sqlalchemy(self, bind: Any) -> SyncRowsFn:
        """Batch function over a SQLAlchemy Engine, Connection or Session (rows are Rows)."""
        import sqlalchemy as sa

        statement = sa.text(self.text(":keys", _escape_colon))
        key = self.key

        def fetch(keys: list[Any]) -> Mapping[Any, Any]:
            if isinstance(bind, sa.Engine):
                with bind.connect() as connection:
                    result = connection.execute(statement, {"keys": keys})
            else:
                result = bind.execute(statement, {"keys": keys})
            return self._shape_rows(keys, result, key)

        fetch.__qualname__ = f"{self._label()} via SQLAlchemy"
        return fetch

    def sqlalchemy_async(self, bind: Any) -> AsyncRowsFn:
        """Batch function over an AsyncEngine, AsyncConnection or AsyncSession."""
        import sqlalchemy as sa
        from sqlalchemy.ext.asyncio import AsyncEngine

        statement = sa.text(self.text(":keys", _escape_colon))
        key = self.key

        async def fetch(keys: list[Any]) -> Mapping[Any, Any]:
            if isinstance(bind, AsyncEngine):
                async with bind.connect() as connection:
                    result = await connection.execute(statement, {"keys": keys})
            else:
                result = await bind.execute(statement, {"keys": keys})
            return self._shape_rows(keys, result, key)

        fetch.__qualname__ = f"{self._label()} via SQLAlchemy async"
        return fetch

    def _shape_rows(self, keys: list[Any], result: Any, key: str) -> dict[Any, Any]:
        # Index the key column once: row._mapping would build a mapping object per row.
        index = list(result.keys()).index(key)
        return self.shape(keys, result.all(), itemgetter(index))

    def _label(self) -> str:
        kind = "rows_grouped_by_key" if self.many else "rows_by_key"
        return f"{kind}({self.table}.{self.key})"


def rows_by_key(
    table: str,
    key: str = "id",
    columns: Iterable[str] | None = None,
    *,
    schema: str | None = None,
) -> BatchQuery:
    """One row per key: loads give the row or None."""
    return BatchQuery(
        table, key, None if columns is None else _names(columns, "columns"), schema, False
    )


def rows_grouped_by_key(
    table: str,
    key: str,
    columns: Iterable[str] | None = None,
    *,
    schema: str | None = None,
    order_by: str | Iterable[str] = (),
) -> BatchQuery:
    """Many rows per key: loads give the list of rows ([] when there are none)."""
    return BatchQuery(
        table,
        key,
        None if columns is None else _names(columns, "columns"),
        schema,
        True,
        _names(order_by, "order_by"),
    )


def _orm_statement(attribute: Any, keys: list[Any], order_by: Sequence[Any]) -> Any:
    import sqlalchemy as sa
    from sqlalchemy.dialects.postgresql import ARRAY

    entity = attribute.class_
    array = sa.bindparam("keys", keys, type_=ARRAY(attribute.type))
    return sa.select(entity).where(attribute == sa.any_(array)).order_by(*order_by)


def _orm_shape(
    keys: list[Any], entities: Iterable[Any], attribute: Any, many: bool
) -> dict[Any, Any]:
    name = attribute.key
    if not many:
        return {getattr(entity, name): entity for entity in entities}
    grouped: dict[Any, list[Any]] = {key: [] for key in keys}
    for entity in entities:
        grouped.setdefault(getattr(entity, name), []).append(entity)
    return grouped


def orm_rows(
    session: Any, attribute: Any, *, many: bool = False, order_by: Sequence[Any] = ()
) -> SyncRowsFn:
    """Batch function loading ORM entities where ``attribute = ANY(keys)`` (sync Session).

    ``orm_rows(session, Order.customer_id, many=True)`` -> {customer_id: [Order, ...]}.
    """

    def fetch(keys: list[Any]) -> Mapping[Any, Any]:
        entities = session.execute(_orm_statement(attribute, keys, order_by)).scalars().all()
        return _orm_shape(keys, entities, attribute, many)

    fetch.__qualname__ = f"orm_rows({attribute})"
    return fetch


def orm_rows_async(
    session: Any, attribute: Any, *, many: bool = False, order_by: Sequence[Any] = ()
) -> AsyncRowsFn:
    """:func:`orm_rows` for an AsyncSession."""

    async def fetch(keys: list[Any]) -> Mapping[Any, Any]:
        result = await session.execute(_orm_statement(attribute, keys, order_by))
        return _orm_shape(keys, result.scalars().all(), attribute, many)

    fetch.__qualname__ = f"orm_rows_async({attribute})"
    return fetch
