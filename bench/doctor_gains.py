"""Benchmark: what each pattern the query doctor reports costs, and what its suggested fix gains.

For every finding kind of ``pgpilot.nplusone`` there is a *before* (the pattern, written as
application code writes it) and an *after* (the fix the finding suggests), on tables sized like
a small production database: 2,000 customers with a 2 KB ``bio`` column, 200,000 orders. Each
pair is first run once inside ``detect()`` to check that the doctor reports the before and is
silent on the after (so the timings below are of the pattern the doctor means), then timed
``--repeats`` times with before and after alternating (which one runs first alternates too), each
repeat in a fresh ``Session``. Reported per kind: the median wall time of each side, the ratio,
the statements each sends (counted by a SQLAlchemy ``before_cursor_execute`` listener), and for
``large_result`` the peak Python memory of each side (``tracemalloc``, in a separate untimed run).
``unlocked_read_modify_write`` is about correctness rather than time: four threads increment one
row 50 times each, and the result counts the increments lost.

Usage: ``python bench/doctor_gains.py [--repeats 9] [--dsn URL]``; writes
``bench/results/doctor-gains.json`` and ``.md``. The database (default ``PGPILOT_TEST_DSN`` or
``postgresql://postgres@127.0.0.1:5432/test``) gets a schema ``pgp_doctor_gains``, dropped at
the end.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

from sqlalchemy import (
    ForeignKey,
    Numeric,
    String,
    Text,
    create_engine,
    delete,
    event,
    exists,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    contains_eager,
    load_only,
    mapped_column,
    relationship,
    selectinload,
)

from pgpilot.nplusone import detect

SCHEMA = "pgp_doctor_gains"
DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/test"
RESULTS = Path(__file__).resolve().parent / "results" / "doctor-gains"
CUSTOMERS = 2_000
ORDERS = 200_000
WRITE_ROWS = 500  # rows each write-loop pair writes
FIRST_WRITE_ID = 10_000_000  # ids the write pairs use, above the seeded orders


class Base(DeclarativeBase):
    pass


class Customer(Base):
    __tablename__ = "customers"
    __table_args__ = {"schema": SCHEMA}  # noqa: RUF012

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(60))
    email: Mapped[str] = mapped_column(String(120))
    city: Mapped[str] = mapped_column(String(40))
    country: Mapped[str] = mapped_column(String(2))
    phone: Mapped[str] = mapped_column(String(20))
    bio: Mapped[str] = mapped_column(Text)
    orders: Mapped[list[Order]] = relationship(back_populates="customer")


class Order(Base):
    __tablename__ = "orders"
    __table_args__ = {"schema": SCHEMA}  # noqa: RUF012

    id: Mapped[int] = mapped_column(primary_key=True)
    customer_id: Mapped[int] = mapped_column(ForeignKey(f"{SCHEMA}.customers.id"), index=True)
    status: Mapped[str] = mapped_column(String(10))
    total: Mapped[Decimal] = mapped_column(Numeric(12, 2))
    note: Mapped[str] = mapped_column(Text)
    customer: Mapped[Customer] = relationship(back_populates="orders")


def seed(engine: Engine) -> None:
    with engine.begin() as conn:
        conn.execute(text(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE"))
        conn.execute(text(f"CREATE SCHEMA {SCHEMA}"))
    Base.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(
            text(
                f"INSERT INTO {SCHEMA}.customers (id, name, email, city, country, phone, bio) "
                "SELECT i, 'customer ' || i, 'c' || i || '@example.com', 'city ' || (i % 50), "
                "'FR', '+33 1 00 00 ' || i, repeat('bio text ', 230) "
                f"FROM generate_series(1, {CUSTOMERS}) i"
            )
        )
        conn.execute(
            text(
                f"INSERT INTO {SCHEMA}.orders (id, customer_id, status, total, note) "
                f"SELECT i, 1 + i % {CUSTOMERS}, "
                "CASE WHEN i % 10 = 0 THEN 'open' ELSE 'shipped' END, (i % 1000) / 10.0, "
                f"repeat('n', 200) FROM generate_series(1, {ORDERS}) i"
            )
        )
        conn.execute(text(f"ANALYZE {SCHEMA}.customers"))
        conn.execute(text(f"ANALYZE {SCHEMA}.orders"))


def remove_written_rows(session: Session) -> None:
    session.execute(delete(Order).where(Order.id >= FIRST_WRITE_ID))
    session.commit()


def write_rows(start: int) -> list[dict[str, Any]]:
    return [
        {"id": i, "customer_id": 1 + i % CUSTOMERS, "status": "new", "total": 1, "note": ""}
        for i in range(start, start + WRITE_ROWS)
    ]


# Each pair: (before, after, prepare). prepare runs untimed before each side (write pairs need
# their rows); the functions return something so the work cannot be skipped.
page_of_customers = select(Customer).order_by(Customer.id).limit(50)


def n_plus_one_before(s: Session) -> object:
    return sum(len(c.orders) for c in s.scalars(page_of_customers))


def n_plus_one_after(s: Session) -> object:
    query = page_of_customers.options(selectinload(Customer.orders))
    return sum(len(c.orders) for c in s.scalars(query))


orders_in_city = (
    select(Order)
    .join(Order.customer)
    .where(Customer.city == "city 7")
    .order_by(Order.id)
    .limit(200)
)


def missing_contains_eager_before(s: Session) -> object:
    return [o.customer.name for o in s.scalars(orders_in_city)]


def missing_contains_eager_after(s: Session) -> object:
    return [
        o.customer.name for o in s.scalars(orders_in_city.options(contains_eager(Order.customer)))
    ]


def insert_loop_before(s: Session) -> object:
    for row in write_rows(FIRST_WRITE_ID):
        s.add(Order(**row))
        s.commit()
    return WRITE_ROWS


def insert_loop_after(s: Session) -> object:
    s.execute(insert(Order), write_rows(FIRST_WRITE_ID))
    s.commit()
    return WRITE_ROWS


def insert_written_rows(s: Session) -> None:
    remove_written_rows(s)
    s.execute(insert(Order), write_rows(FIRST_WRITE_ID))
    s.commit()


written_ids = list(range(FIRST_WRITE_ID, FIRST_WRITE_ID + WRITE_ROWS))


def update_loop_before(s: Session) -> object:
    for order_id in written_ids:
        s.execute(update(Order).where(Order.id == order_id).values(status="paid"))
    s.commit()
    return WRITE_ROWS


def update_loop_after(s: Session) -> object:
    s.execute(update(Order).where(Order.id.in_(written_ids)).values(status="paid"))
    s.commit()
    return WRITE_ROWS


def delete_loop_before(s: Session) -> object:
    for order_id in written_ids:
        s.execute(delete(Order).where(Order.id == order_id))
    s.commit()
    return WRITE_ROWS


def delete_loop_after(s: Session) -> object:
    s.execute(delete(Order).where(Order.id.in_(written_ids)))
    s.commit()
    return WRITE_ROWS


# customer 11 has 100 orders, 10 of them open
open_orders = select(Order).where(Order.customer_id == 11, Order.status == "open")


def duplicate_before(s: Session) -> object:
    first = s.scalars(open_orders).all()
    return len(first) + len(s.scalars(open_orders).all())


def duplicate_after(s: Session) -> object:
    first = s.scalars(open_orders).all()
    return len(first) + len(first)


def duplicate_get_before(s: Session) -> object:
    return s.get(Customer, CUSTOMERS + 1) is None and s.get(Customer, CUSTOMERS + 1) is None


def duplicate_get_after(s: Session) -> object:
    missing = s.get(Customer, CUSTOMERS + 1)
    return missing is None and missing is None


def existence_load_before(s: Session) -> object:
    return s.query(Customer).filter_by(city="city 49").first() is not None


def existence_load_after(s: Session) -> object:
    return s.scalar(select(exists().where(Customer.city == "city 49")))


def overfetch_before(s: Session) -> object:
    return [c.email for c in s.scalars(select(Customer).order_by(Customer.id))]


def overfetch_after(s: Session) -> object:
    query = select(Customer).order_by(Customer.id).options(load_only(Customer.email))
    return [c.email for c in s.scalars(query)]


all_order_ids = select(Order).options(load_only(Order.id, Order.total))


def large_result_before(s: Session) -> object:
    return sum(o.total for o in s.scalars(all_order_ids).all())


def large_result_after(s: Session) -> object:
    return sum(o.total for o in s.scalars(all_order_ids.execution_options(yield_per=1000)))


def deep_offset_before(s: Session) -> object:
    return s.scalars(select(Order.id).order_by(Order.id).offset(150_000).limit(20)).all()


def deep_offset_after(s: Session) -> object:
    # the last id of the previous page is what a keyset cursor carries
    query = select(Order.id).where(Order.id > 150_000).order_by(Order.id).limit(20)
    return s.scalars(query).all()


def wrong_type_comparison_before(s: Session) -> object:
    return s.execute(
        text(f"SELECT count(*) FROM {SCHEMA}.orders WHERE customer_id = '42'")
    ).scalar()


def wrong_type_comparison_after(s: Session) -> object:
    return s.execute(text(f"SELECT count(*) FROM {SCHEMA}.orders WHERE customer_id = 42")).scalar()


def correlated_subquery_before(s: Session) -> object:
    return s.execute(
        text(
            f"SELECT c.id, (SELECT count(*) FROM {SCHEMA}.orders o WHERE o.customer_id = c.id) "
            f"FROM {SCHEMA}.customers c"
        )
    ).all()


def correlated_subquery_after(s: Session) -> object:
    return s.execute(
        text(
            f"SELECT c.id, count(o.id) FROM {SCHEMA}.customers c "
            f"LEFT JOIN {SCHEMA}.orders o ON o.customer_id = c.id GROUP BY c.id"
        )
    ).all()


def unused_eager_load_before(s: Session) -> object:
    query = page_of_customers.options(selectinload(Customer.orders))
    return [(c.name, c.email, c.city) for c in s.scalars(query)]


def unused_eager_load_after(s: Session) -> object:
    return [(c.name, c.email, c.city) for c in s.scalars(page_of_customers)]


@dataclass
class Pair:
    kind: str
    before: Callable[[Session], object]
    after: Callable[[Session], object]
    prepare: Callable[[Session], None] | None = None
    what: str = ""


PAIRS = [
    Pair(
        "n_plus_one",
        n_plus_one_before,
        n_plus_one_after,
        what="50 customers, a lazy load of each one's orders / selectinload",
    ),
    Pair(
        "missing_contains_eager",
        missing_contains_eager_before,
        missing_contains_eager_after,
        what="200 orders joined to their customer, then order.customer lazy / contains_eager",
    ),
    Pair(
        "insert_loop",
        insert_loop_before,
        insert_loop_after,
        remove_written_rows,
        what=f"{WRITE_ROWS} rows, add() + commit() per row / insert(Order) with the list",
    ),
    Pair(
        "update_loop",
        update_loop_before,
        update_loop_after,
        insert_written_rows,
        what=f"{WRITE_ROWS} rows, update() per id / one update() with IN",
    ),
    Pair(
        "delete_loop",
        delete_loop_before,
        delete_loop_after,
        insert_written_rows,
        what=f"{WRITE_ROWS} rows, delete() per id / one delete() with IN",
    ),
    Pair(
        "duplicate",
        duplicate_before,
        duplicate_after,
        what="a customer's open orders read twice / reused",
    ),
    Pair(
        "duplicate_get",
        duplicate_get_before,
        duplicate_get_after,
        what="get() of a missing key twice / kept",
    ),
    Pair(
        "existence_load",
        existence_load_before,
        existence_load_after,
        what="first() of a wide row to test it exists / select(exists())",
    ),
    Pair(
        "overfetch",
        overfetch_before,
        overfetch_after,
        what=f"{CUSTOMERS} customers, 7 columns (2 KB bio) loaded, email read / load_only",
    ),
    Pair(
        "large_result",
        large_result_before,
        large_result_after,
        what=f"{ORDERS} orders held by .all() / yield_per(1000)",
    ),
    Pair(
        "deep_offset",
        deep_offset_before,
        deep_offset_after,
        what="20 orders at OFFSET 150,000 / keyset WHERE id > last",
    ),
    Pair(
        "wrong_type_comparison",
        wrong_type_comparison_before,
        wrong_type_comparison_after,
        what="customer_id = '42' / customer_id = 42 (raw SQL)",
    ),
    Pair(
        "correlated_subquery",
        correlated_subquery_before,
        correlated_subquery_after,
        what="order count per customer: scalar subquery per row / LEFT JOIN + GROUP BY",
    ),
    Pair(
        "unused_eager_load",
        unused_eager_load_before,
        unused_eager_load_after,
        what="selectinload(Customer.orders) never read / dropped",
    ),
]


@contextmanager
def counting(engine: Engine) -> Iterator[list[int]]:
    count = [0]

    def note(*_args: Any) -> None:
        count[0] += 1

    event.listen(engine, "before_cursor_execute", note)
    try:
        yield count
    finally:
        event.remove(engine, "before_cursor_execute", note)


def prepare(engine: Engine, pair: Pair) -> None:
    """The rows a write pair's side needs, written before it runs (untimed, unwatched)."""
    if pair.prepare:
        with Session(engine) as session:
            pair.prepare(session)


def kinds_found(engine: Engine, pair: Pair, side: Callable[[Session], object]) -> list[str]:
    prepare(engine, pair)
    with Session(engine) as session, detect() as report:
        side(session)
    return sorted({finding.kind for finding in report.findings})


def run_side(engine: Engine, pair: Pair, side: Callable[[Session], object]) -> tuple[float, int]:
    prepare(engine, pair)
    with Session(engine) as session, counting(engine) as count:
        start = time.perf_counter()
        side(session)
        return time.perf_counter() - start, count[0]


def peak_memory(engine: Engine, side: Callable[[Session], object]) -> int:
    with Session(engine) as session:
        tracemalloc.start()
        try:
            side(session)
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()


def lost_updates(engine: Engine, locked: bool, threads: int = 4, each: int = 50) -> dict[str, Any]:
    """Increments of one row from several threads: read, add one, write back, commit."""
    with Session(engine) as session:
        session.execute(update(Order).where(Order.id == 1).values(total=0))
        session.commit()

    def work() -> None:
        with Session(engine) as session:
            for _ in range(each):
                order = session.get(Order, 1, with_for_update=locked, populate_existing=True)
                assert order is not None
                order.total = order.total + 1
                session.commit()

    start = time.perf_counter()
    workers = [threading.Thread(target=work) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    seconds = time.perf_counter() - start
    with Session(engine) as session:
        total = session.scalar(select(Order.total).where(Order.id == 1))
    expected = threads * each
    return {
        "increments": expected,
        "lost": expected - int(total or 0),
        "seconds": round(seconds, 3),
    }


def read_modify_write_found(engine: Engine) -> dict[str, list[str]]:
    found = {}
    for side, locked in (("before", False), ("after", True)):
        with Session(engine) as session, detect() as report:
            order = session.get(Order, 2, with_for_update=locked)
            assert order is not None
            order.total = order.total + 1
            session.commit()
        found[side] = sorted({finding.kind for finding in report.findings})
    return found


def measure(engine: Engine, pair: Pair, repeats: int) -> dict[str, Any]:
    found = {
        "before": kinds_found(engine, pair, pair.before),
        "after": kinds_found(engine, pair, pair.after),
    }
    times: dict[str, list[float]] = {"before": [], "after": []}
    statements: dict[str, int] = {}
    sides = {"before": pair.before, "after": pair.after}
    # warm the statement caches of both sides; the quick pairs run more often (up to about two
    # seconds in all), so that a millisecond's noise on a loaded machine does not decide them
    warm = run_side(engine, pair, pair.before)[0] + run_side(engine, pair, pair.after)[0]
    repeats = max(repeats, min(201, int(2.0 / max(warm, 1e-6))))
    for repeat in range(repeats):
        order = ("before", "after") if repeat % 2 == 0 else ("after", "before")
        for name in order:
            seconds, count = run_side(engine, pair, sides[name])
            times[name].append(seconds)
            statements[name] = count
    before_ms = statistics.median(times["before"]) * 1e3
    after_ms = statistics.median(times["after"]) * 1e3
    result: dict[str, Any] = {
        "kind": pair.kind,
        "what": pair.what,
        "found_before": found["before"],
        "found_after": found["after"],
        "before_ms": round(before_ms, 2),
        "after_ms": round(after_ms, 2),
        "ratio": round(before_ms / after_ms, 2),
        "statements_before": statements["before"],
        "statements_after": statements["after"],
        "repeats": repeats,
    }
    if pair.kind == "large_result":
        result["peak_bytes_before"] = peak_memory(engine, pair.before)
        result["peak_bytes_after"] = peak_memory(engine, pair.after)
    if pair.prepare:
        with Session(engine) as session:
            remove_written_rows(session)
    return result


def render(result: dict[str, Any]) -> str:
    lines = [
        "# What the doctor's findings cost, and what their fixes gain (bench/doctor_gains.py)",
        "",
        f"{result['machine']}; PostgreSQL {result['postgres']} via psycopg 3; "
        f"{CUSTOMERS:,} customers (2 KB bio), {ORDERS:,} orders; median of at least "
        f"{result['repeats']} runs of each side (more for the quick pairs), before and after "
        "alternating. `found` is what `detect()` reported for each side.",
        "",
        "| kind | pattern / fix | before | after | gain | statements | found before / after |",
        "| --- | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for row in result["pairs"]:
        found_after = ", ".join(row["found_after"]) or "nothing"
        lines.append(
            f"| `{row['kind']}` | {row['what']} | {row['before_ms']:.2f} ms | "
            f"{row['after_ms']:.2f} ms | {row['ratio']:.2f}x | "
            f"{row['statements_before']} / {row['statements_after']} | "
            f"{', '.join(row['found_before']) or 'nothing'} / {found_after} |"
        )
    large = next(row for row in result["pairs"] if row["kind"] == "large_result")
    lines += [
        "",
        "`large_result` peak Python memory (tracemalloc): "
        f"{large['peak_bytes_before'] / 2**20:.1f} MiB with `.all()`, "
        f"{large['peak_bytes_after'] / 2**20:.1f} MiB with `yield_per(1000)`.",
        "",
    ]
    rmw = result["unlocked_read_modify_write"]
    lines += [
        "`unlocked_read_modify_write` (correctness, not speed): "
        f"{rmw['before']['increments']} increments of one row from 4 threads lost "
        f"{rmw['before']['lost']} without a lock ({rmw['before']['seconds']:.2f} s) and "
        f"{rmw['after']['lost']} with `with_for_update=True` ({rmw['after']['seconds']:.2f} s); "
        f"found before / after: {', '.join(rmw['found']['before']) or 'nothing'} / "
        f"{', '.join(rmw['found']['after']) or 'nothing'}.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--dsn", default=os.environ.get("PGPILOT_TEST_DSN") or DEFAULT_DSN)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--kinds", nargs="*", help="only these kinds")
    args = parser.parse_args()
    engine = create_engine(
        make_url(args.dsn).set(drivername="postgresql+psycopg").render_as_string(False)
    )
    try:
        seed(engine)
        pairs = [
            measure(engine, pair, args.repeats)
            for pair in PAIRS
            if not args.kinds or pair.kind in args.kinds
        ]
        rmw = {
            "before": lost_updates(engine, locked=False),
            "after": lost_updates(engine, locked=True),
            "found": read_modify_write_found(engine),
        }
        with engine.connect() as conn:
            postgres = conn.execute(text("SHOW server_version")).scalar()
    finally:
        with engine.begin() as conn:
            conn.execute(text(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE"))
        engine.dispose()
    result = {
        "machine": f"CPython {platform.python_version()} on {platform.machine()}, "
        f"{os.cpu_count()} cores, 1-minute load {os.getloadavg()[0]:.1f}",
        "postgres": postgres,
        "repeats": args.repeats,
        "pairs": pairs,
        "unlocked_read_modify_write": rmw,
    }
    if args.kinds:
        print(json.dumps(result, indent=2))
        return
    RESULTS.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    markdown = render(result)
    RESULTS.with_suffix(".md").write_text(markdown)
    print(markdown)


if __name__ == "__main__":
    main()
