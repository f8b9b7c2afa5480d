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
without rows loads as []).

Keys are converted to the key column's type where that is unambiguous, the same way through
every driver: ``load("1")`` on an integer column loads the row of id 1, a UUID column takes
UUIDs or their text; a key that cannot be converted (``"abc"`` for an integer) fails its own
load with a :class:`~pgpilot.batch.errors.BatchKeyError` naming the key and the column type
(see :mod:`pgpilot.batch.keys`). The column's type is read from the catalog once per
:class:`BatchQuery`, on its first batch.

Table, schema and column names are always quoted as identifiers (psycopg.sql.Identifier rules:
double quotes, embedded quotes doubled), never pasted in as SQL, so a name cannot inject SQL;
it can only fail to match a column. For ORM models, :func:`orm_rows` and
:func:`orm_rows_async` batch-load mapped entities by an attribute.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from operator import attrgetter, itemgetter
from typing import Any, TypeAlias

from psycopg import sql as pgsql

from pgpilot.batch.keys import (
    KeyPlan,
    KeyType,
    catalog_query,
    key_type_from_catalog,
    key_type_from_python,
)

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
    # The key column's type, once read from the catalog (a one-item list: the dataclass is
    # frozen, the cache is not part of its value).
    _key_type: list[KeyType] = field(
        default_factory=list, init=False, repr=False, compare=False, hash=False
    )

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
        table = self.relation()
        where = f"{quote_identifier(self.key)} = ANY({_KEYS})"
        text = f"SELECT {select} FROM {table} WHERE {where}"
        if self.order_by:
            text += " ORDER BY " + ", ".join(quote_identifier(c) for c in self.order_by)
        if escape is not None:
            text = escape(text)
        return text.replace(_KEYS, placeholder)

    def relation(self) -> str:
        """The table as quoted SQL, schema-qualified when a schema was given."""
        table = quote_identifier(self.table)
        if self.schema is not None:
            table = f"{quote_identifier(self.schema)}.{table}"
        return table

    # -- key types -----------------------------------------------------------------------------

    def _catalog_args(self) -> tuple[str, str]:
        return self.relation(), self.key

    def _known_key_type(self) -> KeyType | None:
        return self._key_type[0] if self._key_type else None

    def _remember_key_type(self, row: Sequence[Any] | None) -> KeyType | None:
        column = f"{self.relation()}.{quote_identifier(self.key)}"
        key_type = key_type_from_catalog(column, row)
        if key_type is not None and not self._key_type:  # no such column yet: ask again
            self._key_type.append(key_type)
        return key_type

    def _plan(self, key_type: KeyType | None, keys: list[Any]) -> KeyPlan:
        return KeyPlan(keys, keys) if key_type is None else key_type.plan(keys)

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
        catalog = catalog_query("$1", "$2")

        async def fetch(keys: list[Any]) -> Mapping[Any, Any]:
            key_type = self._known_key_type()
            if key_type is None:
                row = await conn.fetchrow(catalog, *self._catalog_args())
                key_type = self._remember_key_type(row)
            plan = self._plan(key_type, keys)
            rows = await conn.fetch(query, plan.send) if plan.send else []
            return plan.mapping(self.shape, rows, lambda row: row[key], self.many)

        fetch.__qualname__ = f"{self._label()} via asyncpg"
        return fetch

    def psycopg(self, conn: Any, row_factory: Any = None) -> SyncRowsFn:
        """Batch function over a psycopg Connection or ConnectionPool (rows are dicts)."""
        from psycopg.rows import dict_row, tuple_row

        query = self.text("%s", _escape_percent)
        key = self.key
        factory = row_factory or dict_row
        catalog = catalog_query("%s", "%s")

        def run(connection: Any, keys: list[Any]) -> Mapping[Any, Any]:
            key_type = self._known_key_type()
            if key_type is None:
                with connection.cursor(row_factory=tuple_row) as cursor:
                    cursor.execute(catalog, self._catalog_args())
                    key_type = self._remember_key_type(cursor.fetchone())
            plan = self._plan(key_type, keys)
            rows: list[Any] = []
            if plan.send:
                with connection.cursor(row_factory=factory) as cursor:
                    cursor.execute(query, (plan.send,))
                    rows = list(cursor.fetchall())
            return plan.mapping(self.shape, rows, lambda row: row[key], self.many)

        def fetch(keys: list[Any]) -> Mapping[Any, Any]:
            if hasattr(conn, "cursor"):
                return run(conn, keys)
            with conn.connection() as connection:  # a pool
                return run(connection, keys)

        fetch.__qualname__ = f"{self._label()} via psycopg"
        return fetch

    def psycopg_async(self, conn: Any, row_factory: Any = None) -> AsyncRowsFn:
        """Batch function over a psycopg AsyncConnection or AsyncConnectionPool (dict rows)."""
        from psycopg.rows import dict_row, tuple_row

        query = self.text("%s", _escape_percent)
        key = self.key
        factory = row_factory or dict_row
        catalog = catalog_query("%s", "%s")

        async def run(connection: Any, keys: list[Any]) -> Mapping[Any, Any]:
            key_type = self._known_key_type()
            if key_type is None:
                async with connection.cursor(row_factory=tuple_row) as cursor:
                    await cursor.execute(catalog, self._catalog_args())
                    key_type = self._remember_key_type(await cursor.fetchone())
            plan = self._plan(key_type, keys)
            rows: list[Any] = []
            if plan.send:
                async with connection.cursor(row_factory=factory) as cursor:
                    await cursor.execute(query, (plan.send,))
                    rows = list(await cursor.fetchall())
            return plan.mapping(self.shape, rows, lambda row: row[key], self.many)

        async def fetch(keys: list[Any]) -> Mapping[Any, Any]:
            if hasattr(conn, "cursor"):
                return await run(conn, keys)
            async with conn.connection() as connection:  # a pool
                return await run(connection, keys)

        fetch.__qualname__ = f"{self._label()} via psycopg async"
        return fetch

    def sqlalchemy(self, bind: Any) -> SyncRowsFn:
        """Batch function over a SQLAlchemy Engine, Connection or Session (rows are Rows)."""
        import sqlalchemy as sa

        statement = sa.text(self.text(":keys", _escape_colon))
        catalog = sa.text(catalog_query(":relation", ":column"))
        key = self.key

        def run(connection: Any, keys: list[Any]) -> Mapping[Any, Any]:
            key_type = self._known_key_type()
            if key_type is None:
                relation, column = self._catalog_args()
                found = connection.execute(catalog, {"relation": relation, "column": column})
                key_type = self._remember_key_type(found.first())
            plan = self._plan(key_type, keys)
            if not plan.send:
                return plan.mapping(self.shape, [], lambda row: None, self.many)
            result = connection.execute(statement, {"keys": plan.send})
            return self._shape_rows(plan, result, key)

        def fetch(keys: list[Any]) -> Mapping[Any, Any]:
            if isinstance(bind, sa.Engine):
                with bind.connect() as connection:
                    return run(connection, keys)
            return run(bind, keys)

        fetch.__qualname__ = f"{self._label()} via SQLAlchemy"
        return fetch

    def sqlalchemy_async(self, bind: Any) -> AsyncRowsFn:
        """Batch function over an AsyncEngine, AsyncConnection or AsyncSession."""
        import sqlalchemy as sa
        from sqlalchemy.ext.asyncio import AsyncEngine

        statement = sa.text(self.text(":keys", _escape_colon))
        catalog = sa.text(catalog_query(":relation", ":column"))
        key = self.key

        async def run(connection: Any, keys: list[Any]) -> Mapping[Any, Any]:
            key_type = self._known_key_type()
            if key_type is None:
                relation, column = self._catalog_args()
                found = await connection.execute(catalog, {"relation": relation, "column": column})
                key_type = self._remember_key_type(found.first())
            plan = self._plan(key_type, keys)
            if not plan.send:
                return plan.mapping(self.shape, [], lambda row: None, self.many)
            result = await connection.execute(statement, {"keys": plan.send})
            return self._shape_rows(plan, result, key)

        async def fetch(keys: list[Any]) -> Mapping[Any, Any]:
            if isinstance(bind, AsyncEngine):
                async with bind.connect() as connection:
                    return await run(connection, keys)
            return await run(bind, keys)

        fetch.__qualname__ = f"{self._label()} via SQLAlchemy async"
        return fetch

    def _shape_rows(self, plan: KeyPlan, result: Any, key: str) -> dict[Any, Any]:
        # Index the key column once: row._mapping would build a mapping object per row.
        index = list(result.keys()).index(key)
        return plan.mapping(self.shape, result.all(), itemgetter(index), self.many)

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


def _orm_plan(attribute: Any, keys: list[Any]) -> KeyPlan:
    """Keys converted to the attribute's Python type (``"1"`` -> 1 for an Integer column)."""
    column = f"{attribute.class_.__name__}.{attribute.key}"
    return key_type_from_python(column, attribute.type).plan(keys)


def _orm_shaper(
    many: bool,
) -> Callable[[Sequence[Any], Iterable[Any], Callable[[Any], Any]], dict[Any, Any]]:
    def shape(
        keys: Sequence[Any], entities: Iterable[Any], key_of: Callable[[Any], Any]
    ) -> dict[Any, Any]:
        if not many:
            return {key_of(entity): entity for entity in entities}
        grouped: dict[Any, list[Any]] = {key: [] for key in keys}
        for entity in entities:
            grouped.setdefault(key_of(entity), []).append(entity)
        return grouped

    return shape


def orm_rows(
    session: Any, attribute: Any, *, many: bool = False, order_by: Sequence[Any] = ()
) -> SyncRowsFn:
    """Batch function loading ORM entities where ``attribute = ANY(keys)`` (sync Session).

    ``orm_rows(session, Order.customer_id, many=True)`` -> {customer_id: [Order, ...]}. Keys
    are converted to the attribute's Python type as :mod:`pgpilot.batch.keys` describes.
    """
    key_of = attrgetter(attribute.key)
    shape = _orm_shaper(many)

    def fetch(keys: list[Any]) -> Mapping[Any, Any]:
        plan = _orm_plan(attribute, keys)
        entities: Sequence[Any] = []
        if plan.send:
            statement = _orm_statement(attribute, plan.send, order_by)
            entities = session.execute(statement).scalars().all()
        return plan.mapping(shape, entities, key_of, many)

    fetch.__qualname__ = f"orm_rows({attribute})"
    return fetch


def orm_rows_async(
    session: Any, attribute: Any, *, many: bool = False, order_by: Sequence[Any] = ()
) -> AsyncRowsFn:
    """:func:`orm_rows` for an AsyncSession."""
    key_of = attrgetter(attribute.key)
    shape = _orm_shaper(many)

    async def fetch(keys: list[Any]) -> Mapping[Any, Any]:
        plan = _orm_plan(attribute, keys)
        entities: Sequence[Any] = []
        if plan.send:
            result = await session.execute(_orm_statement(attribute, plan.send, order_by))
            entities = result.scalars().all()
        return plan.mapping(shape, entities, key_of, many)

    fetch.__qualname__ = f"orm_rows_async({attribute})"
    return fetch
