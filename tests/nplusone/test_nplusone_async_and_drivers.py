"""Async SQLAlchemy, raw psycopg 3 and asyncpg loops, and scope isolation across tasks and
threads, against real PostgreSQL."""

from __future__ import annotations

import asyncio
import sys
import threading

import asyncpg
import psycopg
import pytest
from nplusone_models import CUSTOMERS, Customer, Database, Order
from sqlalchemy import Engine, select
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.orm import Session, selectinload

from pgpilot.nplusone import Report, detect, unwatch, watch

THIS_FILE = "test_nplusone_async_and_drivers.py"


def next_line() -> int:
    return sys._getframe(1).f_lineno + 1


async def test_async_sqlalchemy_n_plus_one_with_callsite(async_engine: AsyncEngine) -> None:
    async with AsyncSession(async_engine) as session:
        with detect() as report:
            customers = (await session.scalars(select(Customer))).all()
            for customer in customers:
                line = next_line()
                orders = await customer.awaitable_attrs.orders
                assert orders
    [finding] = report.findings
    assert finding.kind == "n_plus_one"
    assert finding.count == CUSTOMERS
    assert finding.suggestion == "selectinload(Customer.orders)"
    # the lazy load runs in SQLAlchemy's greenlet; the line is the awaiting coroutine's
    assert finding.callsite.endswith(f"{THIS_FILE}:{line}")


async def test_async_sqlalchemy_fix_removes_the_finding(async_engine: AsyncEngine) -> None:
    async with AsyncSession(async_engine) as session:
        await session.connection()  # connect (and let the dialect initialize) first
        with detect() as report:
            query = select(Customer).options(selectinload(Customer.orders))
            for customer in (await session.scalars(query)).all():
                assert customer.orders
    assert report.findings == []
    assert report.queries == 2


async def test_concurrent_tasks_keep_their_own_scopes(async_engine: AsyncEngine) -> None:
    async with async_engine.connect():
        pass  # the dialect's first-connect queries, before any scope
    started = asyncio.Event()
    release = asyncio.Event()

    async def with_n_plus_one() -> Report:
        async with AsyncSession(async_engine) as session:
            with detect() as report:
                started.set()
                for customer_id in range(1, CUSTOMERS + 1):
                    await session.scalars(select(Order).where(Order.customer_id == customer_id))
                    await asyncio.sleep(0)
                await release.wait()
        return report

    async def clean() -> Report:
        await started.wait()
        async with AsyncSession(async_engine) as session:
            with detect() as report:
                await session.scalars(select(Customer))
        release.set()
        return report

    looping, tidy = await asyncio.gather(with_n_plus_one(), clean())
    assert [finding.kind for finding in looping.findings] == ["n_plus_one"]
    assert looping.queries == CUSTOMERS
    assert tidy.findings == []
    assert tidy.queries == 1


def test_threads_keep_their_own_scopes(engine: Engine) -> None:
    reports: dict[str, Report] = {}
    barrier = threading.Barrier(2, timeout=60)

    def run(name: str, loop: bool) -> None:
        with Session(engine) as session, detect() as report:
            barrier.wait()
            customer_ids = range(1, CUSTOMERS + 1) if loop else [1]
            for customer_id in customer_ids:
                session.scalars(select(Order).where(Order.customer_id == customer_id)).all()
            barrier.wait()
        reports[name] = report

    threads = [
        threading.Thread(target=run, args=("loop", True)),
        threading.Thread(target=run, args=("single", False)),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert reports["loop"].queries == CUSTOMERS
    assert [f.kind for f in reports["loop"].findings] == ["n_plus_one"]
    assert reports["single"].queries == 1
    assert reports["single"].findings == []


def test_psycopg_loop_on_a_watched_connection(database: Database) -> None:
    with psycopg.connect(database.dsn) as conn:
        watch(conn)
        with detect() as report:
            for customer_id in range(1, CUSTOMERS + 1):
                line = next_line()
                conn.execute(
                    f"SELECT id, total FROM {database.schema}.orders WHERE customer_id = %s",
                    (customer_id,),
                ).fetchall()
            with conn.cursor() as cursor:
                for _ in range(3):
                    cursor.execute(
                        f"SELECT name FROM {database.schema}.customers WHERE id = %s", (1,)
                    )
        unwatch(conn)
        with detect() as unwatched:
            conn.execute("SELECT 1").fetchall()
    kinds = {finding.kind: finding for finding in report.findings}
    assert set(kinds) == {"n_plus_one", "duplicate"}
    n_plus_one = kinds["n_plus_one"]
    assert n_plus_one.count == CUSTOMERS
    assert n_plus_one.callsite.endswith(f"{THIS_FILE}:{line}")
    assert "WHERE customer_id = ANY(:ids)" in n_plus_one.suggestion
    assert kinds["duplicate"].count == 3
    assert unwatched.queries == 0


async def test_psycopg_async_loop_on_a_watched_connection(database: Database) -> None:
    async with await psycopg.AsyncConnection.connect(database.dsn) as conn:
        watch(conn)
        with detect() as report:
            for customer_id in range(1, CUSTOMERS + 1):
                cursor = await conn.execute(
                    f"SELECT id FROM {database.schema}.orders WHERE customer_id = %(c)s",
                    {"c": customer_id},
                )
                await cursor.fetchall()
    [finding] = report.findings
    assert finding.kind == "n_plus_one"
    assert finding.count == CUSTOMERS


async def test_asyncpg_loop_on_a_watched_connection(database: Database) -> None:
    conn = await asyncpg.connect(database.dsn)
    try:
        watch(conn)
        with detect() as report:
            for customer_id in range(1, CUSTOMERS + 1):
                line = next_line()
                rows = await conn.fetch(
                    f"SELECT id FROM {database.schema}.orders WHERE customer_id = $1", customer_id
                )
                assert rows
            for _ in range(2):
                await conn.fetchval(f"SELECT count(*) FROM {database.schema}.items")
            await conn.execute("SELECT 1")
        unwatch(conn)
        with detect() as unwatched:
            await conn.fetch(f"SELECT id FROM {database.schema}.orders WHERE customer_id = $1", 1)
    finally:
        await conn.close()
    kinds = {finding.kind: finding for finding in report.findings}
    assert set(kinds) == {"n_plus_one", "duplicate"}
    assert kinds["n_plus_one"].count == CUSTOMERS
    assert kinds["n_plus_one"].callsite.endswith(f"{THIS_FILE}:{line}")
    assert "customer_id = ANY(:ids)" in kinds["n_plus_one"].suggestion
    assert kinds["duplicate"].count == 2
    assert report.queries == CUSTOMERS + 3
    assert unwatched.queries == 0


async def test_asyncpg_connections_not_watched_are_not_counted(database: Database) -> None:
    watched = await asyncpg.connect(database.dsn)
    other = await asyncpg.connect(database.dsn)
    try:
        watch(watched)
        with detect() as report:
            for n in range(4):
                await other.fetchval("SELECT $1::int + 1", n)
    finally:
        await watched.close()
        await other.close()
    assert report.queries == 0


def test_watch_refuses_what_it_cannot_watch(engine: Engine) -> None:
    with pytest.raises(TypeError, match="SQLAlchemy engines are watched without it"):
        watch(engine)


def test_a_long_loop_is_counted_whole_and_read_live(database: Database) -> None:
    executions = 552
    with psycopg.connect(database.dsn) as conn:
        watch(conn)
        with detect() as report:
            for n in range(executions):
                line = next_line()
                conn.execute(
                    f"SELECT name FROM {database.schema}.customers WHERE id = %s",
                    (n % CUSTOMERS + 1,),
                ).fetchone()
                if n == 2:
                    # the report is live: the loop is found from its third execution on
                    [early] = report.findings
                    assert early.kind == "n_plus_one" and early.count == 3
    [finding] = report.findings
    assert finding.kind == "n_plus_one"
    assert finding.count == executions
    assert finding.distinct_params == CUSTOMERS
    assert finding.callsite.endswith(f"{THIS_FILE}:{line}")
    assert report.queries == executions
