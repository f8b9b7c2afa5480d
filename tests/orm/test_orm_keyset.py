"""pgpilot.orm.paginate against real PostgreSQL: keyset pages over orderings with several
columns, mixed directions and NULLs (where sqlakeyset gives wrong pages), walked forwards and
backwards, on psycopg (Session and Connection) and asyncpg (AsyncSession); bad cursors and
orderings refused; the query doctor's deep_offset gone once a paging loop uses it."""

from __future__ import annotations

import asyncio
import datetime
import os
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Engine, Select, String, create_engine, select, text
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column
from tests.orm.test_orm_helpers import url

from pgpilot.nplusone import detect
from pgpilot.orm import Page, paginate, paginate_async
from pgpilot.orm.keyset import _plan

SCHEMA = f"pgp_keyset_{os.getpid()}"
ROWS = 137


class Base(DeclarativeBase):
    pass


class Event(Base):
    __tablename__ = "events"
    __table_args__ = {"schema": SCHEMA}  # noqa: RUF012

    id: Mapped[int] = mapped_column(primary_key=True)
    created_at: Mapped[datetime.datetime | None]
    score: Mapped[int | None]
    name: Mapped[str] = mapped_column(String(20))


@pytest.fixture(scope="module")
def engine(pg_dsn: str) -> Iterator[Engine]:
    engine = create_engine(url(pg_dsn, "psycopg"))
    with engine.begin() as conn:
        conn.execute(text(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE"))
        conn.execute(text(f"CREATE SCHEMA {SCHEMA}"))
    Base.metadata.create_all(engine)
    start = datetime.datetime(2026, 1, 1)
    with Session(engine) as session:
        session.add_all(
            [
                Event(
                    id=i,
                    # ties (i // 3), and a NULL every 7th row
                    created_at=None if i % 7 == 0 else start + datetime.timedelta(hours=i // 3),
                    score=None if i % 5 == 0 else i % 4,
                    name=f"e{i}",
                )
                for i in range(1, ROWS + 1)
            ]
        )
        session.commit()
    yield engine
    with engine.begin() as conn:
        conn.execute(text(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE"))
    engine.dispose()


ORDERINGS = {
    "nullable column, then key": lambda: select(Event).order_by(Event.created_at, Event.id),
    "mixed directions and NULL placements": lambda: select(Event).order_by(
        Event.score.desc().nulls_last(), Event.created_at.asc().nulls_first(), Event.id.desc()
    ),
    "descending, PostgreSQL's default NULLs first": lambda: select(Event).order_by(
        Event.score.desc(), Event.id
    ),
    "one direction, no NULLs (row comparison)": lambda: select(Event).order_by(
        Event.name, Event.id
    ),
}


def walk(session: Session, statement: Select[Any], per_page: int) -> list[Page[Any]]:
    pages = [paginate(session, statement, per_page)]
    while pages[-1].next_cursor is not None:
        pages.append(paginate(session, statement, per_page, after=pages[-1].next_cursor))
    return pages


@pytest.mark.parametrize("ordering", sorted(ORDERINGS))
def test_pages_forwards_and_backwards_give_every_row_once_in_order(
    engine: Engine, ordering: str
) -> None:
    statement = ORDERINGS[ordering]()
    with Session(engine) as session:
        expected = [event.id for event in session.scalars(statement)]
        pages = walk(session, statement, 10)
        assert [event.id for page in pages for event in page.items] == expected
        assert len(pages) == -(-ROWS // 10)
        assert pages[0].previous_cursor is None and pages[-1].next_cursor is None
        assert all(len(page.items) == 10 for page in pages[:-1])

        # back from the last page to the first, each page the same as on the way forwards
        back = [pages[-1]]
        while back[-1].previous_cursor is not None:
            back.append(paginate(session, statement, 10, before=back[-1].previous_cursor))
        assert [[e.id for e in page.items] for page in reversed(back)] == [
            [e.id for e in page.items] for page in pages
        ]
        assert back[-1].next_cursor == pages[0].next_cursor


def test_the_row_comparison_serves_an_index(engine: Engine) -> None:
    statement = ORDERINGS["one direction, no NULLs (row comparison)"]()
    with Session(engine) as session:
        session.execute(text(f"CREATE INDEX events_name_id ON {SCHEMA}.events (name, id)"))
        cursor = paginate(session, statement, 5).next_cursor
        assert cursor is not None
        query = _plan(statement, 5, cursor, None).statement.compile(
            dialect=engine.dialect, compile_kwargs={"literal_binds": True}
        )
        session.execute(text("SET LOCAL enable_seqscan = off"))
        plan = "\n".join(session.scalars(text(f"EXPLAIN {query}")))
        session.rollback()
    # the page starts where the index says, no row before it read and filtered out
    assert "Index Cond: (ROW((name)::text, id) > ROW(" in plan, plan
    assert "Filter" not in plan, plan


def test_core_connection_gives_tuples_of_the_selected_columns(engine: Engine) -> None:
    table = Event.__table__
    statement = select(table.c.id, table.c.name).order_by(table.c.created_at, table.c.id)
    with engine.connect() as conn:
        expected = [tuple(row) for row in conn.execute(statement)]
        page = paginate(conn, statement, 50)
        rest = paginate(conn, statement, 200, after=page.next_cursor)
    assert page.items + rest.items == expected
    assert rest.next_cursor is None


def test_async_session_on_asyncpg(pg_dsn: str, engine: Engine) -> None:
    statement = ORDERINGS["mixed directions and NULL placements"]()
    with Session(engine) as session:
        expected = [event.id for event in session.scalars(statement)]

    async def run() -> list[int]:
        async_engine = create_async_engine(url(pg_dsn, "asyncpg"))
        try:
            async with AsyncSession(async_engine) as session:
                page = await paginate_async(session, statement, 25)
                seen = [event.id for event in page.items]
                while page.next_cursor is not None:
                    page = await paginate_async(session, statement, 25, after=page.next_cursor)
                    seen += [event.id for event in page.items]
                return seen
        finally:
            await async_engine.dispose()

    assert asyncio.run(run()) == expected


def test_bad_input_is_refused_with_a_clear_error(engine: Engine) -> None:
    statement = select(Event).order_by(Event.created_at, Event.id)
    with Session(engine) as session:
        cursor = paginate(session, statement, 10).next_cursor
        assert cursor is not None
        with pytest.raises(ValueError, match="another query"):
            paginate(session, select(Event).order_by(Event.score, Event.id), 10, after=cursor)
        with pytest.raises(ValueError, match="not a paginate"):
            paginate(session, statement, 10, after="garbage!")
        with pytest.raises(ValueError, match="unique column"):
            paginate(session, select(Event).order_by(Event.created_at), 10)
        with pytest.raises(ValueError, match="ORDER BY"):
            paginate(session, select(Event), 10)
        with pytest.raises(ValueError, match="per_page"):
            paginate(session, statement, 0)
        with pytest.raises(ValueError, match="not both"):
            paginate(session, statement, 10, after=cursor, before=cursor)
        with pytest.raises(ValueError, match="LIMIT"):
            paginate(session, statement.limit(5), 10)
        # nothing was changed by the refusals: the cursor still gives the second page
        assert [e.id for e in paginate(session, statement, 10, after=cursor).items] == [
            e.id for e in session.scalars(statement.offset(10).limit(10))
        ]


def test_the_doctors_deep_offset_goes_away_with_paginate(engine: Engine) -> None:
    statement = select(Event).order_by(Event.created_at, Event.id)
    with Session(engine) as session:
        with detect() as offsets:
            for number in range(5):
                session.scalars(statement.offset(number * 10).limit(10)).all()
        assert [finding.kind for finding in offsets.findings] == ["deep_offset"]

        with detect() as keyset:
            page = paginate(session, statement, 10)
            for _ in range(4):
                page = paginate(session, statement, 10, after=page.next_cursor)
        assert keyset.findings == []
