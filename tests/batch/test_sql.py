"""pgpilot.batch.sql against a real PostgreSQL, through every supported driver.

Each test counts the statements the driver really sent (asyncpg query logger, SQLAlchemy
cursor events, a psycopg cursor wrapper) and checks the values loaded.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from typing import Any, ClassVar

import asyncpg
import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from pgpilot.batch import DataLoader, SyncDataLoader
from pgpilot.batch.keys import catalog_query
from pgpilot.batch.sql import (
    BatchQuery,
    orm_rows,
    orm_rows_async,
    quote_identifier,
    rows_by_key,
    rows_grouped_by_key,
)

SCHEMA = "pgp_batch"
SUFFIX = uuid.uuid4().hex[:8]
CUSTOMERS = f"customers_{SUFFIX}"
ORDERS = f'Orders "{SUFFIX}" %:x'  # quoting, psycopg's % and SQLAlchemy's : all exercised

# customer id -> order totals
ORDERS_OF = {1: [10, 11, 12], 2: [20], 3: [], 4: [40, 41], 5: [50]}


@pytest.fixture(scope="module")
def tables(pg_dsn: str) -> Iterator[None]:
    customers, orders = quote_identifier(CUSTOMERS), quote_identifier(ORDERS)
    orders_escaped = orders.replace("%", "%%")  # psycopg placeholders
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}")
        conn.execute(f"CREATE TABLE {SCHEMA}.{customers} (id int PRIMARY KEY, name text)")
        conn.execute(
            f"CREATE TABLE {SCHEMA}.{orders} (id serial PRIMARY KEY,"
            f' "customer id" int NOT NULL, total int NOT NULL)'
        )
        for cid, totals in ORDERS_OF.items():
            conn.execute(
                f"INSERT INTO {SCHEMA}.{customers} VALUES (%s, %s)", (cid, f"customer {cid}")
            )
            for total in totals:
                conn.execute(
                    f'INSERT INTO {SCHEMA}.{orders_escaped} ("customer id", total) VALUES (%s, %s)',
                    (cid, total),
                )
    try:
        yield
    finally:
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute(f"DROP TABLE IF EXISTS {SCHEMA}.{customers}, {SCHEMA}.{orders}")


CUSTOMER_BY_ID = rows_by_key(CUSTOMERS, "id", ["name"], schema=SCHEMA)
ORDERS_BY_CUSTOMER = rows_grouped_by_key(
    ORDERS, "customer id", ["total"], schema=SCHEMA, order_by="total"
)


def test_text_quotes_names_and_uses_one_array_parameter() -> None:
    assert ORDERS_BY_CUSTOMER.text() == (
        f'SELECT "total", "customer id" FROM "pgp_batch"."Orders ""{SUFFIX}"" %:x"'
        ' WHERE "customer id" = ANY($1) ORDER BY "total"'
    )
    with pytest.raises(ValueError):
        BatchQuery("t", "id\x00")
    with pytest.raises(ValueError):
        rows_by_key("", "id")


async def test_asyncpg_two_queries_whatever_n(pg_dsn: str, tables: None) -> None:
    conn = await asyncpg.connect(pg_dsn)
    sent: list[str] = []
    conn.add_query_logger(lambda record: sent.append(record.query))
    try:
        customers = DataLoader(CUSTOMER_BY_ID.asyncpg(conn))
        orders = DataLoader(ORDERS_BY_CUSTOMER.asyncpg(conn))

        async def customer_with_orders(cid: int) -> tuple[Any, list[int]]:
            customer = await customers.load(cid)
            rows = await orders.load(cid)
            return (customer and customer["name"]), [row["total"] for row in rows]

        results = await asyncio.gather(*(customer_with_orders(c) for c in (1, 2, 3, 4, 5, 99)))
        assert results == [
            *((f"customer {c}", ORDERS_OF[c]) for c in (1, 2, 3, 4, 5)),
            (None, []),  # no such customer: None, and no orders: []
        ]
        # asyncpg also logs its own type-introspection queries; ours are those on our tables.
        ours = [query for query in sent if '"pgp_batch".' in query]
        assert len(ours) == 2
        assert all("= ANY($1)" in query for query in ours)
    finally:
        await conn.close()


def test_batch_statements_leaves_out_only_the_catalog_lookup() -> None:
    lookup = catalog_query("$1", "$2")
    assert batch_statements([lookup, ORDERS_BY_CUSTOMER.text()]) == [ORDERS_BY_CUSTOMER.text()]


class CountingCursor(psycopg.Cursor[Any]):
    executed: ClassVar[list[str]] = []

    def execute(self, query: Any, params: Any = None, **kwargs: Any) -> Any:
        CountingCursor.executed.append(str(query))
        return super().execute(query, params, **kwargs)


def test_psycopg_sync_with_threads_and_sync_loader(pg_dsn: str, tables: None) -> None:
    CountingCursor.executed = []
    with psycopg.connect(pg_dsn, cursor_factory=CountingCursor) as conn:
        orders = SyncDataLoader(ORDERS_BY_CUSTOMER.psycopg(conn))
        handles = [orders.load(cid) for cid in range(1, 6)]
        assert orders.dispatch() == 1
        assert [[row["total"] for row in h.result()] for h in handles] == [
            ORDERS_OF[c] for c in range(1, 6)
        ]
        # One batch statement; the key column's type is read from the catalog at most once.
        assert len(batch_statements(CountingCursor.executed)) == 1


async def test_psycopg_async(pg_dsn: str, tables: None) -> None:
    async with await psycopg.AsyncConnection.connect(pg_dsn) as conn:
        customers = DataLoader(CUSTOMER_BY_ID.psycopg_async(conn))
        rows = await customers.load_many([5, 1, 42])
        assert [row and row["name"] for row in rows] == ["customer 5", "customer 1", None]
        assert customers.stats.batches == 1


def batch_statements(statements: list[str]) -> list[str]:
    """The batch statements, without the catalog look-up of the key column's type."""
    return [text for text in statements if "pg_catalog.pg_attribute" not in text]


def _sqlalchemy_url(pg_dsn: str, driver: str) -> str:
    return pg_dsn.replace("postgresql://", f"postgresql+{driver}://", 1)


def test_sqlalchemy_sync_engine_and_session(pg_dsn: str, tables: None) -> None:
    engine = sa.create_engine(_sqlalchemy_url(pg_dsn, "psycopg"))
    statements: list[str] = []
    sa.event.listen(engine, "before_cursor_execute", lambda *a: statements.append(a[2]))
    try:
        orders = SyncDataLoader(ORDERS_BY_CUSTOMER.sqlalchemy(engine))
        many = orders.load_many([1, 2, 3])
        assert [[row.total for row in rows] for rows in many.result()] == [
            ORDERS_OF[1],
            ORDERS_OF[2],
            [],
        ]
        with Session(engine) as session:
            customers = SyncDataLoader(CUSTOMER_BY_ID.sqlalchemy(session))
            assert customers.load(4).result().name == "customer 4"
        assert len(batch_statements(statements)) == 2
    finally:
        engine.dispose()


async def test_sqlalchemy_async_engine(pg_dsn: str, tables: None) -> None:
    engine = create_async_engine(_sqlalchemy_url(pg_dsn, "asyncpg"))
    statements: list[str] = []
    sa.event.listen(engine.sync_engine, "before_cursor_execute", lambda *a: statements.append(a[2]))
    try:
        orders = DataLoader(ORDERS_BY_CUSTOMER.sqlalchemy_async(engine))
        lists = await asyncio.gather(*(orders.load(c) for c in range(1, 6)))
        assert [[row.total for row in rows] for rows in lists] == [
            ORDERS_OF[c] for c in range(1, 6)
        ]
        assert len(batch_statements(statements)) == 1
    finally:
        await engine.dispose()


class Base(DeclarativeBase):
    pass


class Customer(Base):
    __tablename__ = CUSTOMERS
    __table_args__ = {"schema": SCHEMA}  # noqa: RUF012
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str]


async def test_orm_rows_sync_and_async(pg_dsn: str, tables: None) -> None:
    engine = sa.create_engine(_sqlalchemy_url(pg_dsn, "psycopg"))
    try:
        with Session(engine) as session:
            loader = SyncDataLoader(orm_rows(session, Customer.id))
            got = loader.load_many([3, 1, 77]).result()
            assert [c and c.name for c in got] == ["customer 3", "customer 1", None]
            assert isinstance(got[0], Customer)
    finally:
        engine.dispose()

    from sqlalchemy.ext.asyncio import AsyncSession

    async_engine = create_async_engine(_sqlalchemy_url(pg_dsn, "asyncpg"))
    try:
        async with AsyncSession(async_engine) as session:
            by_name = DataLoader(orm_rows_async(session, Customer.name, many=True))
            lists = await by_name.load_many(["customer 2", "nobody"])
            assert [[c.id for c in group] for group in lists] == [[2], []]
    finally:
        await async_engine.dispose()


async def test_hostile_column_name_is_an_identifier_not_sql(pg_dsn: str, tables: None) -> None:
    hostile = rows_by_key(CUSTOMERS, "id", ['name" FROM x; DROP TABLE y; --'], schema=SCHEMA)
    conn = await asyncpg.connect(pg_dsn)
    try:
        with pytest.raises(asyncpg.UndefinedColumnError):
            await hostile.asyncpg(conn)([1])
        # The table is still there.
        assert (
            await conn.fetchval(f"SELECT count(*) FROM {SCHEMA}.{quote_identifier(CUSTOMERS)}") == 5
        )
    finally:
        await conn.close()
