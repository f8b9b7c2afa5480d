"""pgpilot.orm against real PostgreSQL: COPY bulk loads (psycopg and asyncpg), materialized
view refreshes (the unique-index check, the advisory lock), and pool sizing."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from sqlalchemy import Engine, ForeignKey, String, create_engine, func, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from pgpilot.orm import (
    bulk_load,
    bulk_load_async,
    pool_settings,
    refresh_materialized_view,
    refresh_materialized_view_async,
)

SCHEMA = f"pgp_orm_{os.getpid()}"


class Base(DeclarativeBase):
    pass


class Author(Base):
    __tablename__ = "authors"
    __table_args__ = {"schema": SCHEMA}  # noqa: RUF012

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column("full_name", String(50))


class Book(Base):
    __tablename__ = "books"
    __table_args__ = {"schema": SCHEMA}  # noqa: RUF012

    id: Mapped[int] = mapped_column(primary_key=True)
    author_id: Mapped[int] = mapped_column(ForeignKey(f"{SCHEMA}.authors.id"))
    title: Mapped[str]


def url(pg_dsn: str, driver: str) -> str:
    return make_url(pg_dsn).set(drivername=f"postgresql+{driver}").render_as_string(False)


@pytest.fixture(scope="module")
def engine(pg_dsn: str) -> Iterator[Engine]:
    engine = create_engine(url(pg_dsn, "psycopg"))
    with engine.begin() as conn:
        conn.execute(text(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE"))
        conn.execute(text(f"CREATE SCHEMA {SCHEMA}"))
    Base.metadata.create_all(engine)
    with Session(engine) as session:
        session.add_all([Author(id=i, name=f"author {i}") for i in range(1, 4)])
        session.commit()
    yield engine
    with engine.begin() as conn:
        conn.execute(text(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE"))
    engine.dispose()


def count_books(engine: Engine) -> int:
    with Session(engine) as session:
        return int(session.scalar(select(func.count()).select_from(Book)) or 0)


def test_bulk_load_copies_rows_in_the_callers_transaction(engine: Engine) -> None:
    rows = [{"id": i, "author_id": 1 + i % 3, "title": f"book {i}"} for i in range(2500)]
    with Session(engine) as session:
        assert bulk_load(session, Book, rows, batch_size=1000) == 2500
        assert session.scalar(select(func.count()).select_from(Book)) == 2500
        session.rollback()  # the COPY was part of the session's transaction
    assert count_books(engine) == 0

    with Session(engine) as session:
        # attribute keys mapped to their column names (Author.name is "full_name")
        assert bulk_load(session, Author, [{"id": 10, "name": "Ada"}]) == 1
        session.commit()
        assert session.get(Author, 10).name == "Ada"  # type: ignore[union-attr]
        session.execute(text(f"DELETE FROM {SCHEMA}.authors WHERE id = 10"))
        session.commit()


def test_bulk_load_takes_tuples_and_refuses_unknown_keys(engine: Engine) -> None:
    with engine.connect() as conn:
        assert bulk_load(conn, Book.__table__, [(1, 1, "a"), (2, 2, "b")]) == 2
        assert conn.scalar(select(func.count()).select_from(Book)) == 2
        conn.rollback()
        with pytest.raises(KeyError, match="no column for colour"):
            bulk_load(conn, Book, [{"id": 3, "colour": "red"}])
        assert bulk_load(conn, Book, []) == 0


async def test_bulk_load_async_on_asyncpg(pg_dsn: str, engine: Engine) -> None:
    async_engine = create_async_engine(url(pg_dsn, "asyncpg"))
    try:
        async with AsyncSession(async_engine) as session:
            rows = [{"id": i, "author_id": 2, "title": f"t{i}"} for i in range(300)]
            assert await bulk_load_async(session, Book, rows, batch_size=128) == 300
            assert await session.scalar(select(func.count()).select_from(Book)) == 300
            await session.rollback()
    finally:
        await async_engine.dispose()
    assert count_books(engine) == 0


@pytest.fixture
def view(engine: Engine) -> Iterator[str]:
    name = f"{SCHEMA}.books_per_author"
    with engine.begin() as conn:
        conn.execute(
            text(
                f"CREATE MATERIALIZED VIEW {name} AS SELECT author_id, count(*) AS n "
                f"FROM {SCHEMA}.books GROUP BY author_id"
            )
        )
    yield name
    with engine.begin() as conn:
        conn.execute(text(f"DROP MATERIALIZED VIEW IF EXISTS {name}"))


def test_concurrently_needs_a_unique_index_and_says_which_view(engine: Engine, view: str) -> None:
    with engine.connect() as conn:
        with pytest.raises(ValueError, match=f"unique index on {SCHEMA}.books_per_author"):
            refresh_materialized_view(conn, view)
        conn.rollback()
        result = refresh_materialized_view(conn, view, concurrently=False)
        conn.commit()
    assert (result.refreshed, result.concurrently) == (True, False)
    assert result.view == view
    with engine.begin() as conn:
        conn.execute(text(f"CREATE UNIQUE INDEX ON {view} (author_id)"))
        conn.execute(text(f"INSERT INTO {SCHEMA}.books VALUES (900, 1, 'x')"))
    with engine.connect() as conn:
        result = refresh_materialized_view(conn, view)
        conn.commit()
        assert conn.scalar(text(f"SELECT n FROM {view} WHERE author_id = 1")) == 1
    assert (result.refreshed, result.concurrently) == (True, True)
    assert result.seconds >= 0
    with engine.begin() as conn:
        conn.execute(text(f"DELETE FROM {SCHEMA}.books"))


def test_a_second_refresher_of_the_same_view_skips(engine: Engine, view: str) -> None:
    with engine.connect() as first, engine.connect() as second:
        assert refresh_materialized_view(first, view, concurrently=False).refreshed
        # the first transaction still holds the view's lock
        skipped = refresh_materialized_view(second, view, concurrently=False)
        assert (skipped.refreshed, skipped.seconds) == (False, 0.0)
        first.commit()
        assert refresh_materialized_view(second, view, concurrently=False).refreshed
        second.commit()


async def test_refresh_async_and_a_missing_view(pg_dsn: str, view: str) -> None:
    async_engine = create_async_engine(url(pg_dsn, "asyncpg"))
    try:
        async with async_engine.connect() as conn:
            result = await refresh_materialized_view_async(conn, view, concurrently=False)
            assert result.refreshed
            with pytest.raises(LookupError, match="no materialized view"):
                await refresh_materialized_view_async(conn, f"{SCHEMA}.nope")
            with pytest.raises(ValueError, match="is not a materialized view"):
                await refresh_materialized_view_async(conn, f"{SCHEMA}.books", False)
    finally:
        await async_engine.dispose()


def test_pool_settings_worked_example() -> None:
    # 8 cores; a request holds its connection 20 ms outside the database for 5 ms inside
    settings = pool_settings(cores=8, wait_ms=20, service_ms=5)
    assert settings.pool_size + settings.max_overflow == 40  # 8 x (1 + 20/5)
    assert (settings.pool_size, settings.max_overflow) == (27, 13)
    assert "8 x (1 + 20/5) = 40.0" in settings.reasoning
    # three instances sharing max_connections = 100
    capped = pool_settings(8, 20, 5, max_connections=100, instances=3)
    assert capped.pool_size + capped.max_overflow == 32  # (100 - 3) // 3
    # a CPU-bound workload still gets HikariCP's floor
    floor = pool_settings(4, 0, 10)
    assert floor.pool_size + floor.max_overflow == 9  # 4 x 2 + 1
    assert floor.kwargs()["pool_pre_ping"] is True
    with pytest.raises(ValueError):
        pool_settings(0, 1, 1)
