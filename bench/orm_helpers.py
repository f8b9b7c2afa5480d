"""Benchmark: the fixes the query doctor suggests, against what they replace, on real PostgreSQL.

* Inserting N rows (default 100,000) of a 4-column model: an ORM ``add()`` loop (one commit),
  ``bulk_insert_mappings``, ``session.execute(insert(Model), rows)`` (insertmanyvalues), plain
  psycopg ``executemany``, and ``pgpilot.orm.bulk_load`` (COPY). Rows per second, and each
  one's ratio to the ``add()`` loop.
* Page 1,000 (100 rows a page) of a 1M-row table: ``OFFSET`` against keyset
  (``sqlakeyset.select_page`` when installed, else the keyset WHERE it generates), median of
  ``--repeats`` reads each.

Usage: ``python bench/orm_helpers.py [--rows 100000] [--table-rows 1000000] [--dsn URL]``;
writes ``bench/results/orm-helpers.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import String, create_engine, insert, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from pgpilot.orm import bulk_load

SCHEMA = "pgp_orm_bench"
DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/test"
RESULTS = Path(__file__).resolve().parent / "results" / "orm-helpers"


class Base(DeclarativeBase):
    pass


class Event(Base):
    __tablename__ = "events"
    __table_args__ = {"schema": SCHEMA}  # noqa: RUF012

    id: Mapped[int] = mapped_column(primary_key=True)
    account_id: Mapped[int]
    kind: Mapped[str] = mapped_column(String(20))
    amount: Mapped[int]


def rows(n: int) -> list[dict[str, Any]]:
    return [
        {"id": i, "account_id": i % 997, "kind": f"k{i % 7}", "amount": i % 1000} for i in range(n)
    ]


def reset(engine: Any) -> None:
    with engine.begin() as conn:
        conn.execute(text(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE"))
        conn.execute(text(f"CREATE SCHEMA {SCHEMA}"))
    Base.metadata.create_all(engine)


def timed(
    engine: Any, load: Callable[[Session, list[dict[str, Any]]], None], data: list[dict[str, Any]]
) -> float:
    reset(engine)
    with Session(engine) as session:
        start = time.perf_counter()
        load(session, data)
        session.commit()
        return time.perf_counter() - start


def add_loop(session: Session, data: list[dict[str, Any]]) -> None:
    for row in data:
        session.add(Event(**row))


def insert_mappings(session: Session, data: list[dict[str, Any]]) -> None:
    session.bulk_insert_mappings(Event, data)  # type: ignore[arg-type]


def insertmanyvalues(session: Session, data: list[dict[str, Any]]) -> None:
    session.execute(insert(Event), data)


def executemany(session: Session, data: list[dict[str, Any]]) -> None:
    driver: Any = session.connection().connection.driver_connection
    with driver.cursor() as cursor:
        cursor.executemany(
            f"INSERT INTO {SCHEMA}.events (id, account_id, kind, amount) "
            "VALUES (%(id)s, %(account_id)s, %(kind)s, %(amount)s)",
            data,
        )


def copy(session: Session, data: list[dict[str, Any]]) -> None:
    bulk_load(session, Event, data)


def pagination(
    engine: Any, table_rows: int, page: int, per_page: int, repeats: int
) -> dict[str, Any]:
    reset(engine)
    with Session(engine) as session:
        bulk_load(session, Event, rows(table_rows), batch_size=100_000)
        session.commit()
    with engine.begin() as conn:
        conn.execute(text(f"ANALYZE {SCHEMA}.events"))
    query = select(Event).order_by(Event.account_id, Event.id)
    with engine.begin() as conn:
        conn.execute(text(f"CREATE INDEX ON {SCHEMA}.events (account_id, id)"))
    offset_times: list[float] = []
    keyset_times: list[float] = []
    with Session(engine) as session:
        boundary = session.execute(
            select(Event.account_id, Event.id)
            .order_by(Event.account_id, Event.id)
            .offset((page - 1) * per_page - 1)
            .limit(1)
        ).one()
        try:
            from sqlakeyset import select_page
        except ImportError:  # pragma: no cover - optional
            select_page = None
        keyset_how = "sqlakeyset.select_page" if select_page else "keyset WHERE"
        for _ in range(repeats):
            session.expunge_all()
            start = time.perf_counter()
            by_offset = session.scalars(query.offset((page - 1) * per_page).limit(per_page)).all()
            offset_times.append(time.perf_counter() - start)
            session.expunge_all()
            start = time.perf_counter()
            if select_page is not None:
                by_keyset = list(
                    select_page(
                        session, query, per_page=per_page, page=((boundary[0], boundary[1]), False)
                    )
                )
                by_keyset = [row[0] if not isinstance(row, Event) else row for row in by_keyset]
            else:
                by_keyset = session.scalars(
                    query.where((Event.account_id, Event.id) > tuple(boundary)).limit(per_page)  # type: ignore[operator]
                ).all()
            keyset_times.append(time.perf_counter() - start)
            assert [e.id for e in by_offset] == [e.id for e in by_keyset]
    offset_ms = statistics.median(offset_times) * 1e3
    keyset_ms = statistics.median(keyset_times) * 1e3
    return {
        "table_rows": table_rows,
        "page": page,
        "per_page": per_page,
        "keyset": keyset_how,
        "offset_ms": round(offset_ms, 2),
        "keyset_ms": round(keyset_ms, 2),
        "ratio": round(offset_ms / keyset_ms, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", default=os.environ.get("PGPILOT_TEST_DSN") or DEFAULT_DSN)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--table-rows", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    engine = create_engine(
        make_url(args.dsn).set(drivername="postgresql+psycopg").render_as_string(False)
    )
    data = rows(args.rows)
    methods = {
        "ORM add() loop, one commit": add_loop,
        "bulk_insert_mappings": insert_mappings,
        "session.execute(insert(Model), rows)": insertmanyvalues,
        "psycopg executemany": executemany,
        "pgpilot.orm.bulk_load (COPY)": copy,
    }
    inserts = []
    try:
        seconds = {name: timed(engine, load, data) for name, load in methods.items()}
        base = seconds["ORM add() loop, one commit"]
        for name, value in seconds.items():
            inserts.append(
                {
                    "method": name,
                    "seconds": round(value, 2),
                    "rows_per_s": round(args.rows / value),
                    "vs_add_loop": round(base / value, 1),
                }
            )
        paging = pagination(engine, args.table_rows, 1000, 100, args.repeats)
    finally:
        with engine.begin() as conn:
            conn.execute(text(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE"))
        engine.dispose()
    result = {
        "machine": f"CPython {platform.python_version()} on {platform.machine()}, "
        f"{os.cpu_count()} cores, 1-minute load {os.getloadavg()[0]:.1f}",
        "rows": args.rows,
        "inserts": inserts,
        "pagination": paging,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# ORM fixes (bench/orm_helpers.py)",
        "",
        f"{result['machine']}; PostgreSQL via psycopg 3, one run.",
        "",
        f"## Inserting {args.rows:,} rows (4 columns)",
        "",
        "| method | seconds | rows/s | vs the add() loop |",
        "| --- | ---: | ---: | ---: |",
    ]
    lines += [
        f"| {row['method']} | {row['seconds']:.2f} | {row['rows_per_s']:,} | {row['vs_add_loop']:.1f}x |"
        for row in inserts
    ]
    lines += [
        "",
        f"## Page {paging['page']:,} of {paging['table_rows']:,} rows ({paging['per_page']} a page)",
        "",
        "| OFFSET | keyset | ratio |",
        "| ---: | ---: | ---: |",
        f"| {paging['offset_ms']:.2f} ms | {paging['keyset_ms']:.2f} ms ({paging['keyset']}) | {paging['ratio']:.1f}x |",
        "",
    ]
    RESULTS.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
