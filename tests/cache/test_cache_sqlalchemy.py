"""Invalidation that follows writes, as a user would notice it: a request writes an order and
reads the customer's orders back (in the same and the next request): never stale; another
process sees the new rows after the commit, never before."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from decimal import Decimal

import psycopg
import pytest
from sqlalchemy import ForeignKey, String, create_engine, func, insert, select, text, update
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from pgpilot.cache import Cache, MemoryBackend, RedisBackend


class Base(DeclarativeBase):
    pass


class Customer(Base):
    __tablename__ = "customers"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50))
    order_count: Mapped[int] = mapped_column(default=0)


class Order(Base):
    __tablename__ = "orders"
    id: Mapped[int] = mapped_column(primary_key=True)
    customer_id: Mapped[int] = mapped_column(ForeignKey("customers.id"))
    total: Mapped[Decimal]


SCHEMA_SQL = """
CREATE TABLE customers (id int PRIMARY KEY, name varchar(50) NOT NULL,
                        order_count int NOT NULL DEFAULT 0);
CREATE TABLE orders (id serial PRIMARY KEY, customer_id int NOT NULL REFERENCES customers,
                     total numeric(10, 2) NOT NULL);
CREATE FUNCTION count_order() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  UPDATE customers SET order_count = order_count + 1 WHERE id = NEW.customer_id;
  RETURN NEW;
END $$;
CREATE TRIGGER orders_count AFTER INSERT ON orders FOR EACH ROW EXECUTE FUNCTION count_order();
INSERT INTO customers (id, name) SELECT i, 'customer ' || i FROM generate_series(1, 3) AS i;
INSERT INTO orders (customer_id, total) SELECT 1 + i % 3, 10 + i FROM generate_series(1, 9) AS i;
UPDATE customers SET order_count = 3;
"""


@pytest.fixture(scope="module")
def db_url(pg_dsn: str) -> Iterator[str]:
    """A database of this module's own, with the two tables (URL without a driver)."""
    name = f"pgpilot_cache_{os.getpid()}"
    with psycopg.connect(pg_dsn, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.execute(f'CREATE DATABASE "{name}"')
    url = make_url(pg_dsn.replace("postgresql://", "postgresql+psycopg://", 1)).set(
        database=name)
    with psycopg.connect(url.set(drivername="postgresql").render_as_string(False)) as conn:
        conn.execute(SCHEMA_SQL)
    try:
        yield url.set(drivername="postgresql").render_as_string(hide_password=False)
    finally:
        with psycopg.connect(pg_dsn, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    made = create_engine(db_url.replace("postgresql://", "postgresql+psycopg://", 1))
    yield made
    made.dispose()


@pytest.fixture(params=["redis", "memory"])
def cache(request: pytest.FixtureRequest, namespace: str) -> Iterator[Cache]:
    backend = (RedisBackend(request.getfixturevalue("redis_url"), timeout=2.0)
               if request.param == "redis" else MemoryBackend())
    made = Cache(backend, namespace=namespace)
    yield made
    made.clear()


def customer_orders(session: Session, cache: Cache, customer_id: int) -> list[Decimal]:
    stmt = select(Order).where(Order.customer_id == customer_id).order_by(Order.id)
    return [o.total for o in session.execute(stmt.options(cache.from_cache(ttl=600))).scalars()]


def write_behind_the_cache(db_url: str, sql: str) -> None:
    """Change the database without telling the cache (to show where an answer came from)."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(sql)


def test_from_cache_answers_the_second_time_without_the_database(
        engine: Engine, cache: Cache, db_url: str) -> None:
    with Session(engine) as session:
        first = customer_orders(session, cache, 2)
    write_behind_the_cache(db_url, "UPDATE orders SET total = total + 1000 WHERE customer_id = 2")
    try:
        with Session(engine) as session:
            second = customer_orders(session, cache, 2)
            rows = session.execute(
                select(Customer.name, func.count(Order.id)).join(Order)
                .where(Customer.id == 2).group_by(Customer.name)
                .options(cache.from_cache(ttl=600))).all()
            again = session.execute(
                select(Customer.name, func.count(Order.id)).join(Order)
                .where(Customer.id == 2).group_by(Customer.name)
                .options(cache.from_cache(ttl=600))).all()
        assert len(first) == 3 and second == first  # the cached rows, not the new totals
        assert rows == again == [("customer 2", 3)] and again[0].name == "customer 2"
        stats = cache.stats()["sql"]
        assert (stats.hits, stats.misses) == (2, 2)
    finally:
        write_behind_the_cache(db_url,
                               "UPDATE orders SET total = total - 1000 WHERE customer_id = 2")


def test_a_request_that_writes_reads_its_own_order_and_the_next_request_too(
        engine: Engine, cache: Cache) -> None:
    with Session(engine) as session:  # request 0 warms the cache
        before = customer_orders(session, cache, 1)
    with Session(engine) as session:  # request 1 writes an order, then reads the list back
        session.add(Order(customer_id=1, total=Decimal("77.00")))
        session.flush()
        inside = customer_orders(session, cache, 1)  # same transaction: its own write
        session.commit()
        after_commit = customer_orders(session, cache, 1)  # same request, next transaction
    with Session(engine) as session:  # request 2
        next_request = customer_orders(session, cache, 1)
    assert inside == after_commit == next_request == [*before, Decimal("77.00")]
    assert cache.stats()["sql"].bypasses == 1
    with Session(engine) as session:  # clean up, through the ORM: invalidated too
        session.execute(text("DELETE FROM orders WHERE total = 77"))
        session.commit()
        assert customer_orders(session, cache, 1) == before


def test_a_rollback_keeps_the_cache_and_invalidates_nothing(
        engine: Engine, namespace: str, redis_url: str) -> None:
    sent: list[tuple[str, ...]] = []

    class Spy(Cache):
        def invalidate_tags(self, *tags: str) -> int:
            sent.append(tags)
            return super().invalidate_tags(*tags)

    cache = Spy(RedisBackend(redis_url), namespace=namespace)
    with Session(engine) as session:
        before = customer_orders(session, cache, 3)
        session.add(Order(customer_id=3, total=Decimal("5.00")))
        session.flush()
        session.rollback()
    with Session(engine) as session:
        assert customer_orders(session, cache, 3) == before
    assert sent == []
    assert cache.stats()["sql"].hits == 1
    with Session(engine) as session:  # one commit that wrote twice: one invalidation
        session.add(Order(customer_id=3, total=Decimal("6.00")))
        session.flush()
        session.execute(update(Order).where(Order.total == 6).values(total=Decimal("6.50")))
        session.commit()
        session.execute(text("DELETE FROM orders WHERE total = 6.5"))
        session.commit()
    assert len(sent) == 2  # one per committed transaction, none twice
    assert set(sent[0]) == {"table:orders", "table:customers"}  # the trigger's table too
    cache.clear()


@pytest.mark.parametrize("write", ["core_update", "bulk_insert", "text", "orm_delete"])
def test_every_kind_of_write_invalidates_on_commit_and_not_before(
        engine: Engine, cache: Cache, db_url: str, write: str) -> None:
    with Session(engine) as session:
        before = customer_orders(session, cache, 2)
    with Session(engine) as session:
        if write == "core_update":
            session.execute(update(Order).where(Order.customer_id == 2)
                            .values(total=Order.total + 1))
        elif write == "bulk_insert":
            session.execute(insert(Order), [{"customer_id": 2, "total": Decimal("1.25")},
                                            {"customer_id": 2, "total": Decimal("2.25")}])
        elif write == "text":
            session.execute(text("UPDATE orders SET total = total + 1 WHERE customer_id = 2"))
        else:
            victim = session.scalars(select(Order).where(Order.customer_id == 2)).first()
            session.delete(victim)
        session.flush()
        with Session(engine) as other:  # another session, before the commit: the old rows
            assert customer_orders(other, cache, 2) == before
        session.commit()
    with Session(engine) as session:
        after = customer_orders(session, cache, 2)
    assert after != before
    with psycopg.connect(db_url) as conn:
        fresh = [r[0] for r in conn.execute(
            "SELECT total FROM orders WHERE customer_id = 2 ORDER BY id")]
    assert after == fresh
    with psycopg.connect(db_url, autocommit=True) as conn:  # back to 3 orders of 11, 14, 17
        conn.execute("DELETE FROM orders WHERE customer_id = 2")
        conn.execute("INSERT INTO orders (customer_id, total) VALUES (2, 11), (2, 14), (2, 17)")
    cache.invalidate_tables("orders", "customers")


def test_rows_a_trigger_wrote_are_invalidated_too(engine: Engine, cache: Cache) -> None:
    def order_count(session: Session) -> int:
        stmt = select(Customer.order_count).where(Customer.id == 3)
        return int(session.execute(stmt.options(cache.from_cache())).scalar_one())

    with Session(engine) as session:
        before = order_count(session)
    with Session(engine) as session:  # only orders is written by the application
        session.add(Order(customer_id=3, total=Decimal("1.00")))
        session.commit()
        assert order_count(session) == before + 1


READER = """
import sys
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session
from pgpilot.cache import Cache, RedisBackend
sys.path.insert(0, sys.argv[3])
from test_cache_sqlalchemy import Order

cache = Cache(RedisBackend(sys.argv[1]), namespace=sys.argv[2])
engine = create_engine(sys.argv[4])
for line in sys.stdin:
    with Session(engine) as session:
        stmt = select(Order).where(Order.customer_id == 1).order_by(Order.id)
        rows = session.execute(stmt.options(cache.from_cache(ttl=600))).scalars().all()
        print(len(rows), flush=True)
"""


def test_another_process_sees_the_write_after_commit_never_before(
        engine: Engine, redis_url: str, namespace: str) -> None:
    cache = Cache(RedisBackend(redis_url), namespace=namespace)
    url = engine.url.render_as_string(hide_password=False)
    reader = subprocess.Popen(
        [sys.executable, "-c", READER, redis_url, namespace, os.path.dirname(__file__), url],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert reader.stdin is not None and reader.stdout is not None

    def read() -> int:
        assert reader.stdin is not None and reader.stdout is not None
        reader.stdin.write("read\n")
        reader.stdin.flush()
        return int(reader.stdout.readline())

    try:
        before = read()
        assert read() == before  # cached in Redis now
        with Session(engine) as session:
            session.add(Order(customer_id=1, total=Decimal("42.00")))
            session.flush()
            assert read() == before  # not committed: the other process must not see it
            session.commit()
        assert read() == before + 1  # committed and invalidated: the next read is fresh
        with Session(engine) as session:
            session.execute(text("DELETE FROM orders WHERE total = 42"))
            session.commit()
        assert read() == before
    finally:
        reader.kill()
        cache.clear()


def test_a_fill_that_read_before_a_commit_is_not_stored_after_it(
        engine: Engine, cache: Cache, db_url: str) -> None:
    """The race every naive cache loses: a reader reads the old row, a writer commits and
    invalidates, then the reader stores what it read. The guard discards that store."""
    calls: list[str] = []

    @cache.cached(ttl=600, tags=["table:customers"])
    def customer_name(customer_id: int) -> str:
        with psycopg.connect(db_url) as conn:
            row = conn.execute("SELECT name FROM customers WHERE id = %s", (customer_id,))
            name = str(row.fetchone()[0])  # type: ignore[index]
        if not calls:  # meanwhile, a writer commits and invalidates
            with Session(engine) as session:
                session.execute(update(Customer).where(Customer.id == customer_id)
                                .values(name="renamed"))
                session.commit()
        calls.append(name)
        return name

    try:
        assert customer_name(2) == "customer 2"  # the caller gets what it read...
        assert customer_name(2) == "renamed"  # ...but it was not kept: the next is fresh
        assert customer_name.stats().fills_discarded == 1
    finally:
        write_behind_the_cache(db_url, "UPDATE customers SET name = 'customer 2' WHERE id = 2")


def test_async_session_on_asyncpg(db_url: str, cache: Cache) -> None:
    async def main() -> tuple[list[int], list[int], list[int]]:
        engine = create_async_engine(db_url.replace("postgresql://", "postgresql+asyncpg://"))
        stmt = (select(Order.id).where(Order.customer_id == 3).order_by(Order.id)
                .options(cache.from_cache(ttl=600)))
        try:
            async with AsyncSession(engine) as session:
                first = list((await session.execute(stmt)).scalars())
                hit = list((await session.execute(stmt)).scalars())
            async with AsyncSession(engine) as session:
                session.add(Order(customer_id=3, total=Decimal("3.00")))
                await session.commit()
                after = list((await session.execute(stmt)).scalars())
                await session.execute(text("DELETE FROM orders WHERE total = 3"))
                await session.commit()
            return first, hit, after
        finally:
            await engine.dispose()

    first, hit, after = asyncio.run(main())
    assert hit == first and len(after) == len(first) + 1
    assert cache.stats()["sql"].hits >= 1


def test_raw_psycopg_transaction_invalidates_what_it_wrote_on_commit(
        db_url: str, cache: Cache) -> None:
    calls: list[int] = []

    @cache.cached(ttl=600, tags=["table:orders"])
    def total(customer_id: int) -> Decimal:
        calls.append(customer_id)
        with psycopg.connect(db_url) as conn:
            found = conn.execute("SELECT sum(total) FROM orders WHERE customer_id = %s",
                                 (customer_id,)).fetchone()
        return Decimal(found[0])  # type: ignore[index]

    before = total(1)
    with psycopg.connect(db_url, autocommit=True) as conn:
        with pytest.raises(RuntimeError, match="boom"), cache.transaction(conn):
            conn.execute("INSERT INTO orders (customer_id, total) VALUES (1, 100)")
            raise RuntimeError("boom")  # rolled back: nothing to invalidate
        assert total(1) == before and calls == [1]
        with cache.transaction(conn) as tx:
            conn.execute("INSERT INTO orders (customer_id, total) VALUES (1, 100)")
            assert total(1) == before  # not committed yet: still the old value
        assert tx.invalidated == {"orders", "customers"}  # customers: the trigger
        assert total(1) == before + 100
        with cache.transaction(conn):
            conn.execute("DELETE FROM orders WHERE total = 100")
    assert total(1) == before


def test_raw_asyncpg_transaction_invalidates_what_it_wrote_on_commit(
        db_url: str, cache: Cache) -> None:
    import asyncpg

    async def main() -> None:
        conn = await asyncpg.connect(db_url)
        try:
            @cache.cached(ttl=600, tags=["table:customers"])
            async def name(customer_id: int) -> str:
                return str(await conn.fetchval("SELECT name FROM customers WHERE id = $1",
                                               customer_id))

            assert await name(1) == "customer 1"
            async with cache.transaction(conn) as tx:
                await conn.execute("UPDATE customers SET name = 'first' WHERE id = 1")
            assert tx.invalidated == {"customers"}
            assert await name(1) == "first"
            async with cache.transaction(conn):
                await conn.execute("UPDATE customers SET name = 'customer 1' WHERE id = 1")
            assert await name(1) == "customer 1"
        finally:
            await conn.close()

    asyncio.run(main())


def test_the_tables_a_statement_reads_are_its_tags(engine: Engine, cache: Cache) -> None:
    with Session(engine) as session:
        session.execute(select(Customer.name).join(Order).where(Order.total > 1000)
                        .options(cache.from_cache()))
        session.execute(select(Customer.name).where(Customer.id == 1)
                        .options(cache.from_cache()))
    assert cache.invalidate_tables("orders") == 1  # only the join read orders
    assert cache.invalidate_tables("public.customers") == 1
