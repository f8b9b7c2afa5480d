"""COPY rows into a model's table, inside the caller's transaction.

``session.execute(insert(Model), rows)`` (SQLAlchemy 2's insertmanyvalues) is the one-line fix
for most insert loops; COPY is for the bulk loads where even that is too slow. The rows go
through the connection the caller's Session or Connection already holds, so they commit or
roll back with the rest of its transaction.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from itertools import islice
from typing import Any

from sqlalchemy import Table, inspect
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession
from sqlalchemy.orm import Session

__all__ = ["bulk_load", "bulk_load_async"]

DEFAULT_BATCH = 10_000

Row = Mapping[str, Any] | Sequence[Any]


def _table_and_names(target: Any) -> tuple[Table, dict[str, str]]:
    """The table, and attribute key -> column name (for rows keyed by ORM attributes)."""
    if isinstance(target, Table):
        return target, {column.key: column.name for column in target.columns}
    mapper = inspect(target, raiseerr=False)
    table = getattr(mapper, "local_table", None)
    if not isinstance(table, Table):
        raise TypeError(f"bulk_load takes a mapped class or a Table, not {target!r}")
    names = {prop.key: prop.columns[0].name for prop in mapper.column_attrs if prop.columns}
    names.update({column.name: column.name for column in table.columns})
    return table, names


def _columns_and_rows(
    target: Any, rows: Iterable[Row]
) -> tuple[Table, list[str], Iterator[Sequence[Any]]]:
    table, names = _table_and_names(target)
    iterator = iter(rows)
    first = next(iterator, None)
    if first is None:
        return table, [], iter(())
    if isinstance(first, Mapping):
        keys = list(first)
        unknown = [key for key in keys if key not in names]
        if unknown:
            raise KeyError(f"{table.name} has no column for {', '.join(unknown)}")
        columns = [names[key] for key in keys]

        head: Any = first

        def values() -> Iterator[Sequence[Any]]:
            yield [head[key] for key in keys]
            mapping: Any
            for mapping in iterator:
                yield [mapping[key] for key in keys]

        return table, columns, values()
    columns = [column.name for column in table.columns][: len(first)]

    def tuples() -> Iterator[Sequence[Any]]:
        yield first  # type: ignore[misc]
        yield from iterator  # type: ignore[misc]

    return table, columns, tuples()


def _copy_sql(table: Table, columns: list[str]) -> str:
    from psycopg import sql

    target = (
        sql.Identifier(table.schema, table.name) if table.schema else sql.Identifier(table.name)
    )
    return str(
        sql.SQL("COPY {} ({}) FROM STDIN")
        .format(target, sql.SQL(", ").join(map(sql.Identifier, columns)))
        .as_string(None)
    )


def bulk_load(
    session_or_connection: Session | Connection,
    model_or_table: Any,
    rows: Iterable[Row],
    *,
    batch_size: int = DEFAULT_BATCH,
) -> int:
    """COPY ``rows`` (dicts keyed by attribute or column name, or tuples in column order)
    into the table of ``model_or_table``, ``batch_size`` rows per COPY, on a psycopg 3 engine,
    in the caller's transaction (commit it as usual). Returns the number of rows."""
    connection = (
        session_or_connection.connection()
        if isinstance(session_or_connection, Session)
        else session_or_connection
    )
    driver: Any = connection.connection.driver_connection
    if type(driver).__module__.split(".")[0] != "psycopg":
        raise TypeError(
            "bulk_load needs a psycopg 3 engine (postgresql+psycopg://); on asyncpg use "
            "bulk_load_async, elsewhere session.execute(insert(Model), rows)"
        )
    table, columns, values = _columns_and_rows(model_or_table, rows)
    if not columns:
        return 0
    statement = _copy_sql(table, columns)
    count = 0
    with driver.cursor() as cursor:
        while batch := list(islice(values, batch_size)):
            with cursor.copy(statement) as copy:
                for row in batch:
                    copy.write_row(row)
            count += len(batch)
    return count


async def bulk_load_async(
    session_or_connection: AsyncSession | AsyncConnection,
    model_or_table: Any,
    rows: Iterable[Row],
    *,
    batch_size: int = DEFAULT_BATCH,
) -> int:
    """:func:`bulk_load` for an asyncio engine: asyncpg's ``copy_records_to_table`` (or
    psycopg's async ``copy``), in the caller's transaction. Returns the number of rows."""
    connection = (
        await session_or_connection.connection()
        if isinstance(session_or_connection, AsyncSession)
        else session_or_connection
    )
    # Make the driver's transaction begin, so that the COPY is part of it.
    await connection.exec_driver_sql("SELECT 1")
    raw = await connection.get_raw_connection()
    driver: Any = raw.driver_connection
    table, columns, values = _columns_and_rows(model_or_table, rows)
    if not columns:
        return 0
    count = 0
    module = type(driver).__module__.split(".")[0]
    while batch := list(islice(values, batch_size)):
        if module == "asyncpg":
            await driver.copy_records_to_table(
                table.name,
                records=[tuple(row) for row in batch],
                columns=columns,
                schema_name=table.schema,
            )
        elif module == "psycopg":
            async with driver.cursor() as cursor, cursor.copy(_copy_sql(table, columns)) as copy:
                for row in batch:
                    await copy.write_row(row)
        else:
            raise TypeError(
                "bulk_load_async needs an asyncpg or psycopg 3 engine; elsewhere "
                "await session.execute(insert(Model), rows)"
            )
        count += len(batch)
    return count
