"""Real PostgreSQL seeded through the real SQLAlchemy models of ``nplusone_models``.

The schema is created once per session and dropped at the end.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
from nplusone_models import (
    ACCOUNTS,
    CUSTOMERS,
    ITEMS_PER_ORDER,
    ORDERS_PER_CUSTOMER,
    SCHEMA,
    Account,
    Base,
    Customer,
    Database,
    Item,
    Order,
)
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.orm import Session


def _url(pg_dsn: str, driver: str) -> str:
    return (
        make_url(pg_dsn)
        .set(drivername=f"postgresql+{driver}")
        .render_as_string(hide_password=False)
    )


@pytest.fixture(scope="session")
def database(pg_dsn: str) -> Iterator[Database]:
    url = _url(pg_dsn, "psycopg")
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE"))
        conn.execute(text(f"CREATE SCHEMA {SCHEMA}"))
    Base.metadata.create_all(engine)
    with Session(engine) as session:
        for c in range(1, CUSTOMERS + 1):
            customer = Customer(id=c, name=f"customer {c}")
            for o in range(ORDERS_PER_CUSTOMER):
                order_id = c * 100 + o
                order = Order(id=order_id, total=10 * o + c)
                order.items = [
                    Item(id=order_id * 10 + i, sku=f"sku-{order_id}-{i}")
                    for i in range(ITEMS_PER_ORDER)
                ]
                customer.orders.append(order)
            session.add(customer)
        session.flush()
        for a in range(1, ACCOUNTS + 1):
            session.add(
                Account(
                    id=a,
                    customer_id=a,
                    owner=f"owner {a}",
                    email=f"owner{a}@example.com",
                    balance=100,
                    currency="EUR",
                    notes="x" * 500,
                    created="2026-01-01",
                )
            )
        session.commit()
    try:
        yield Database(SCHEMA, url, _url(pg_dsn, "asyncpg"), pg_dsn, engine)
    finally:
        with engine.begin() as conn:
            conn.execute(text(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE"))
        engine.dispose()


@pytest.fixture
def engine(database: Database) -> Engine:
    return database.engine


@pytest.fixture
def session(engine: Engine) -> Iterator[Session]:
    with Session(engine) as session:
        yield session


@pytest.fixture
async def async_engine(database: Database) -> AsyncIterator[AsyncEngine]:
    engine = create_async_engine(database.async_sqlalchemy_url)
    try:
        yield engine
    finally:
        await engine.dispose()
