"""Batch keys are converted to the key column's type the same way through every driver.

URL parameters are strings: ``load("1")`` on an integer column must load the row of id 1
whether the batch function runs on asyncpg, psycopg (sync and async), SQLAlchemy (sync and
async) or the ORM helpers, and a key that cannot be an integer must fail its own load with an
error naming the key and the column type. Real PostgreSQL, real drivers.
"""

from __future__ import annotations

import asyncio
import datetime
import uuid
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import asyncpg
import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from pgpilot.batch import BatchKeyError, DataLoader, SyncDataLoader
from pgpilot.batch.sql import (
    BatchQuery,
    orm_rows,
    orm_rows_async,
    rows_by_key,
    rows_grouped_by_key,
)

SCHEMA = f"pgp_keys_{uuid.uuid4().hex[:8]}"
U1 = uuid.UUID("0b9e6a57-12c4-4f3e-9d5a-3f2a1c7e8b90")
U2 = uuid.UUID("5d1f0c3a-7e2b-4a9c-8f61-2b7d9e4c1a05")
DAY = datetime.date(2024, 3, 1)
AT = datetime.datetime(2024, 3, 1, 12, 0, tzinfo=datetime.UTC)


@pytest.fixture(scope="module")
def keyed(pg_dsn: str) -> Iterator[None]:
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {SCHEMA}")
        conn.execute(f"CREATE DOMAIN {SCHEMA}.account_id AS bigint CHECK (VALUE > 0)")
        conn.execute(f"CREATE DOMAIN {SCHEMA}.account_ref AS {SCHEMA}.account_id")
        conn.execute(f"CREATE TYPE {SCHEMA}.mood AS ENUM ('happy', 'sad')")
        conn.execute(
            f"CREATE TABLE {SCHEMA}.items (id int PRIMARY KEY, small smallint, big bigint,"
            f" ref uuid, code char(4), name varchar(20), day date, at timestamptz,"
            f" price numeric(8, 2), account {SCHEMA}.account_ref, mood {SCHEMA}.mood)"
        )
        conn.execute(f"CREATE TABLE {SCHEMA}.notes (item_id int NOT NULL, body text NOT NULL)")
        conn.execute(
            f"INSERT INTO {SCHEMA}.items VALUES"
            " (1, 1, 5000000000, %s, 'ab', 'one', %s, %s, 1.50, 7, 'happy'),"
            " (2, 2, 2, %s, 'cd', 'two', NULL, NULL, 2, 8, 'sad')",
            (U1, DAY, AT, U2),
        )
        conn.execute(f"INSERT INTO {SCHEMA}.notes VALUES (1, 'first'), (1, 'second'), (2, 'third')")
    try:
        yield
    finally:
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {SCHEMA} CASCADE")


def by(key: str) -> BatchQuery:
    """A fresh query on ``items`` keyed by ``key`` (reads the column type on its first batch);
    rows hold ``id`` and the key column."""
    return rows_by_key("items", key, ["id"], schema=SCHEMA)


def notes() -> BatchQuery:
    return rows_grouped_by_key("notes", "item_id", ["body"], schema=SCHEMA, order_by="body")


Outcome = Any  # the loaded value, or the exception the load raised

# Each driver: (dsn, query, keys) -> the outcome of each key's load, all keys in one batch.
Loads = Callable[[str, BatchQuery, list[Any]], Awaitable[list[Outcome]]]


def _url(pg_dsn: str, driver: str) -> str:
    return pg_dsn.replace("postgresql://", f"postgresql+{driver}://", 1)


async def _async_loads(fetch: Callable[[list[Any]], Any], keys: list[Any]) -> list[Outcome]:
    loader: DataLoader[Any, Any] = DataLoader(fetch)
    outcomes = await asyncio.gather(*(loader.load(k) for k in keys), return_exceptions=True)
    assert loader.stats.batches == 1
    return list(outcomes)


def _sync_loads(fetch: Callable[[list[Any]], Any], keys: list[Any]) -> list[Outcome]:
    loader: SyncDataLoader[Any, Any] = SyncDataLoader(fetch)
    handles = [loader.load(k) for k in keys]
    assert loader.dispatch() == 1
    outcomes: list[Outcome] = []
    for handle in handles:
        try:
            outcomes.append(handle.result())
        except Exception as exc:
            outcomes.append(exc)
    return outcomes


async def via_asyncpg(dsn: str, query: BatchQuery, keys: list[Any]) -> list[Outcome]:
    conn = await asyncpg.connect(dsn)
    try:
        return [_plain(v) for v in await _async_loads(query.asyncpg(conn), keys)]
    finally:
        await conn.close()


async def via_psycopg(dsn: str, query: BatchQuery, keys: list[Any]) -> list[Outcome]:
    with psycopg.connect(dsn) as conn:
        return [_plain(v) for v in _sync_loads(query.psycopg(conn), keys)]


async def via_psycopg_async(dsn: str, query: BatchQuery, keys: list[Any]) -> list[Outcome]:
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        return [_plain(v) for v in await _async_loads(query.psycopg_async(conn), keys)]


async def via_sqlalchemy(dsn: str, query: BatchQuery, keys: list[Any]) -> list[Outcome]:
    engine = sa.create_engine(_url(dsn, "psycopg"))
    try:
        with Session(engine) as session:
            return [_plain(v) for v in _sync_loads(query.sqlalchemy(session), keys)]
    finally:
        engine.dispose()


async def via_sqlalchemy_async(dsn: str, query: BatchQuery, keys: list[Any]) -> list[Outcome]:
    engine = create_async_engine(_url(dsn, "asyncpg"))
    try:
        return [_plain(v) for v in await _async_loads(query.sqlalchemy_async(engine), keys)]
    finally:
        await engine.dispose()


def _plain(value: Outcome) -> Outcome:
    """A row as a dict (Record, dict or SQLAlchemy Row alike), lists of rows as lists."""
    if value is None or isinstance(value, Exception):
        return value
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, sa.Row):
        return dict(value._mapping)
    return dict(value)


DRIVERS = pytest.mark.parametrize(
    "loads",
    [via_asyncpg, via_psycopg, via_psycopg_async, via_sqlalchemy, via_sqlalchemy_async],
    ids=["asyncpg", "psycopg", "psycopg_async", "sqlalchemy", "sqlalchemy_async"],
)


@DRIVERS
async def test_a_string_key_loads_the_integer_row(pg_dsn: str, keyed: None, loads: Loads) -> None:
    got = await loads(pg_dsn, by("id"), ["1", 2, " 2 ", "99"])
    assert [row and row["id"] for row in got] == [1, 2, 2, None]


@DRIVERS
async def test_a_key_that_is_no_integer_fails_alone_naming_key_and_type(
    pg_dsn: str, keyed: None, loads: Loads
) -> None:
    got = await loads(pg_dsn, by("id"), ["abc", "1", True, 1.5])
    assert got[1]["id"] == 1  # the batch's other keys load
    for bad, outcome in zip(["abc", True, 1.5], [got[0], got[2], got[3]], strict=True):
        assert isinstance(outcome, BatchKeyError), outcome
        assert outcome.key == bad
        assert outcome.column_type == "integer"
        assert repr(bad) in str(outcome)
        assert "(integer)" in str(outcome) and '"items"."id"' in str(outcome)


@DRIVERS
async def test_grouped_rows_by_a_string_key(pg_dsn: str, keyed: None, loads: Loads) -> None:
    got = await loads(pg_dsn, notes(), ["1", 2, "3", "x"])
    bodies = [[row["body"] for row in rows] for rows in got[:3]]
    assert bodies == [["first", "second"], ["third"], []]
    assert isinstance(got[3], BatchKeyError)


# column -> (keys, what each loads: an id, None for no row, or the column type of its error)
BY_TYPE: dict[str, tuple[list[Any], list[Any]]] = {
    "ref": ([str(U1), U2, str(U2).upper(), "not-a-uuid", 7], [1, 2, 2, "uuid", "uuid"]),
    "small": (["2", "70000"], [2, None]),  # out of smallint's range: no row can have it
    "big": (["5000000000", 2, "9223372036854775808"], [1, 2, None]),
    "code": (["ab", "ab  ", "cd", "zz"], [1, 1, 2, None]),  # char(4): trailing blanks
    "name": (["one", "two", 1], [1, 2, None]),  # an int key on a text column: its text
    "day": (["2024-03-01", DAY, "March 1st"], [1, 1, "date"]),
    "at": (
        ["2024-03-01T13:00:00+01:00", AT, "2024-03-01T12:00:00"],
        [1, 1, "timestamp with time zone"],  # a naive time for timestamptz is ambiguous
    ),
    "price": (["1.5", "2.00", 2, "cheap"], [1, 2, 2, "numeric(8,2)"]),
    "account": (["7", 8, "seven"], [1, 2, f"{SCHEMA}.account_ref"]),  # domain of a domain
    "mood": (["happy", "sad", 1], [1, 2, f"{SCHEMA}.mood"]),
}


def _expected(outcome: Outcome, want: Any) -> bool:
    if isinstance(want, str):
        return isinstance(outcome, BatchKeyError) and outcome.column_type == want
    if want is None:
        return outcome is None
    return isinstance(outcome, dict) and outcome["id"] == want


@DRIVERS
@pytest.mark.parametrize("column", sorted(BY_TYPE))
async def test_keys_of_each_column_type(
    pg_dsn: str, keyed: None, loads: Loads, column: str
) -> None:
    keys, wanted = BY_TYPE[column]
    got = await loads(pg_dsn, by(column), keys)
    assert [_expected(o, w) for o, w in zip(got, wanted, strict=True)] == [True] * len(keys), got


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "items"
    __table_args__ = {"schema": SCHEMA}  # noqa: RUF012
    id: Mapped[int] = mapped_column(primary_key=True)
    ref: Mapped[uuid.UUID]


class Note(Base):
    __tablename__ = "notes"
    __table_args__ = {"schema": SCHEMA}  # noqa: RUF012
    item_id: Mapped[int] = mapped_column(primary_key=True)
    body: Mapped[str] = mapped_column(primary_key=True)


def test_orm_rows_convert_keys_by_the_attribute_type(pg_dsn: str, keyed: None) -> None:
    engine = sa.create_engine(_url(pg_dsn, "psycopg"))
    try:
        with Session(engine) as session:
            got = _sync_loads(orm_rows(session, Item.id), ["1", 2, "99", "one"])
            assert [item.id for item in got[:2]] == [1, 2]
            assert got[2] is None
            assert isinstance(got[3], BatchKeyError) and got[3].key == "one"
            assert "Item.id" in str(got[3]) and "INTEGER" in str(got[3])
            by_ref = _sync_loads(orm_rows(session, Item.ref), [str(U2), "nope"])
            assert by_ref[0].id == 2 and isinstance(by_ref[1], BatchKeyError)
    finally:
        engine.dispose()


async def test_orm_rows_async_convert_keys(pg_dsn: str, keyed: None) -> None:
    engine = create_async_engine(_url(pg_dsn, "asyncpg"))
    try:
        async with AsyncSession(engine) as session:
            fetch = orm_rows_async(session, Note.item_id, many=True, order_by=[Note.body])
            got = await _async_loads(fetch, ["1", 2, "3", "x"])
            assert [[n.body for n in notes] for notes in got[:3]] == [
                ["first", "second"],
                ["third"],
                [],
            ]
            assert isinstance(got[3], BatchKeyError)
    finally:
        await engine.dispose()


def test_the_column_type_is_read_once_per_query(pg_dsn: str, keyed: None) -> None:
    sent: list[str] = []

    class Counting(psycopg.Cursor[Any]):
        def execute(self, query: Any, params: Any = None, **kwargs: Any) -> Any:
            sent.append(str(query))
            return super().execute(query, params, **kwargs)

    query = by("id")
    with psycopg.connect(pg_dsn, cursor_factory=Counting) as conn:
        assert _plain(_sync_loads(query.psycopg(conn), ["1"])[0]) == {"id": 1}
        # A second bound function (a request-scoped loader's) asks the catalog no more.
        assert _plain(_sync_loads(query.psycopg(conn), ["2"])[0]) == {"id": 2}
        # Keys that cannot be sent send nothing at all.
        assert isinstance(_sync_loads(query.psycopg(conn), ["two"])[0], BatchKeyError)
    catalog = [q for q in sent if "pg_catalog.pg_attribute" in q]
    assert len(catalog) == 1
    assert len(sent) == 3


async def test_a_missing_table_still_fails_with_postgresql_error(pg_dsn: str, keyed: None) -> None:
    missing = rows_by_key("no_such_table", "id", schema=SCHEMA)
    conn = await asyncpg.connect(pg_dsn)
    try:
        with pytest.raises(asyncpg.UndefinedTableError):
            await missing.asyncpg(conn)(["1"])
        await conn.execute(f"CREATE TABLE {SCHEMA}.no_such_table (id int)")
        await conn.execute(f"INSERT INTO {SCHEMA}.no_such_table VALUES (1)")
        # Not remembered as "no type": once the table exists, keys are converted.
        assert (await missing.asyncpg(conn)(["1"]))["1"]["id"] == 1
    finally:
        await conn.execute(f"DROP TABLE IF EXISTS {SCHEMA}.no_such_table")
        await conn.close()
