"""Benchmark for pgpilot.batch: N+1 loops vs batch loading on a real PostgreSQL, and the
per-load overhead of pgpilot's DataLoader against aiodataloader and strawberry's DataLoader.

    python bench/batch.py [--dsn postgresql://postgres@127.0.0.1:5432/test] [--quick]

Part 1, customers with orders (N = 10, 50, 200 customers, 10 orders each): for each strategy
the statements really sent are counted by driver hooks (SQLAlchemy ``before_cursor_execute``,
asyncpg's query logger) and the wall time per request is the median of the repeats.

Part 2, overhead: 100k loads of distinct keys with an in-memory batch function, the three
loaders interleaved in the same process, best of the repeats, CPU time of the process
(``time.process_time``: robust to other processes on the machine) and wall time. The ratio is
pgpilot / the faster of the two others (< 1.0 means pgpilot is faster).

Writes bench/results/batch.json and bench/results/batch.md.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiodataloader
import asyncpg
import sqlalchemy as sa
import strawberry.dataloader
import uvloop
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship, selectinload

from pgpilot.batch import DataLoader
from pgpilot.batch.sql import rows_grouped_by_key

SCHEMA = "pgp_batch_bench"
ORDERS_PER_CUSTOMER = 10
CUSTOMERS = 200
RESULTS = Path(__file__).parent / "results"


# -- schema ------------------------------------------------------------------------------------


class Base(DeclarativeBase):
    pass


class Customer(Base):
    __tablename__ = "customers"
    __table_args__ = {"schema": SCHEMA}  # noqa: RUF012
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str]
    orders: Mapped[list[Order]] = relationship(order_by="Order.id")


class Order(Base):
    __tablename__ = "orders"
    __table_args__ = {"schema": SCHEMA}  # noqa: RUF012
    id: Mapped[int] = mapped_column(primary_key=True)
    customer_id: Mapped[int] = mapped_column(sa.ForeignKey(Customer.id), index=True)
    total: Mapped[int]


async def create_data(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE; CREATE SCHEMA {SCHEMA}")
        await conn.execute(
            f"CREATE TABLE {SCHEMA}.customers (id int PRIMARY KEY, name text NOT NULL);"
            f"CREATE TABLE {SCHEMA}.orders (id int PRIMARY KEY,"
            f" customer_id int NOT NULL REFERENCES {SCHEMA}.customers, total int NOT NULL);"
            f"CREATE INDEX ON {SCHEMA}.orders (customer_id)"
        )
        await conn.copy_records_to_table(
            "customers",
            schema_name=SCHEMA,
            records=[(c, f"customer {c}") for c in range(1, CUSTOMERS + 1)],
        )
        await conn.copy_records_to_table(
            "orders",
            schema_name=SCHEMA,
            records=[
                (c * 100 + i, c, c * 10 + i)
                for c in range(1, CUSTOMERS + 1)
                for i in range(ORDERS_PER_CUSTOMER)
            ],
        )
        await conn.execute(f"ANALYZE {SCHEMA}.customers; ANALYZE {SCHEMA}.orders")
    finally:
        await conn.close()


async def drop_data(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE")
    finally:
        await conn.close()


# -- part 1: strategies ----------------------------------------------------------------------
# Each returns {customer_id: [order totals]} for the first n customers.

CUSTOMERS_SQL = sa.text(f"SELECT id, name FROM {SCHEMA}.customers ORDER BY id LIMIT :n")
ORDERS_OF_SQL = sa.text(f"SELECT id, total FROM {SCHEMA}.orders WHERE customer_id = :c ORDER BY id")
JOIN_SQL = sa.text(
    f"SELECT c.id, c.name, o.total FROM (SELECT id, name FROM {SCHEMA}.customers ORDER BY id"
    f" LIMIT :n) c LEFT JOIN {SCHEMA}.orders o ON o.customer_id = c.id ORDER BY c.id, o.id"
)
ORDERS_BY_CUSTOMER = rows_grouped_by_key(
    "orders", "customer_id", ["id", "total"], schema=SCHEMA, order_by="id"
)


async def sa_naive(conn: AsyncConnection, n: int) -> dict[int, list[int]]:
    customers = (await conn.execute(CUSTOMERS_SQL, {"n": n})).all()
    out = {}
    for customer in customers:
        rows = (await conn.execute(ORDERS_OF_SQL, {"c": customer.id})).all()
        out[customer.id] = [row.total for row in rows]
    return out


async def sa_dataloader(conn: AsyncConnection, n: int) -> dict[int, list[int]]:
    customers = (await conn.execute(CUSTOMERS_SQL, {"n": n})).all()
    orders = DataLoader(ORDERS_BY_CUSTOMER.sqlalchemy_async(conn))

    async def resolve(customer: Any) -> tuple[int, list[int]]:
        return customer.id, [row.total for row in await orders.load(customer.id)]

    return dict(await asyncio.gather(*(resolve(c) for c in customers)))


async def sa_join(conn: AsyncConnection, n: int) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for row in (await conn.execute(JOIN_SQL, {"n": n})).all():
        totals = out.setdefault(row.id, [])
        if row.total is not None:
            totals.append(row.total)
    return out


async def sa_selectinload(session: AsyncSession, n: int) -> dict[int, list[int]]:
    statement = (
        sa.select(Customer).options(selectinload(Customer.orders)).order_by(Customer.id).limit(n)
    )
    customers = (await session.execute(statement)).scalars().all()
    result = {c.id: [o.total for o in c.orders] for c in customers}
    session.expunge_all()  # each repeat loads afresh
    return result


async def pg_naive(conn: asyncpg.Connection, n: int) -> dict[int, list[int]]:
    customers = await conn.fetch(f"SELECT id, name FROM {SCHEMA}.customers ORDER BY id LIMIT $1", n)
    out = {}
    for customer in customers:
        rows = await conn.fetch(
            f"SELECT id, total FROM {SCHEMA}.orders WHERE customer_id = $1 ORDER BY id",
            customer["id"],
        )
        out[customer["id"]] = [row["total"] for row in rows]
    return out


async def pg_dataloader(conn: asyncpg.Connection, n: int) -> dict[int, list[int]]:
    customers = await conn.fetch(f"SELECT id, name FROM {SCHEMA}.customers ORDER BY id LIMIT $1", n)
    orders = DataLoader(ORDERS_BY_CUSTOMER.asyncpg(conn))

    async def resolve(customer: Any) -> tuple[int, list[int]]:
        return customer["id"], [row["total"] for row in await orders.load(customer["id"])]

    return dict(await asyncio.gather(*(resolve(c) for c in customers)))


def expected(n: int) -> dict[int, list[int]]:
    return {c: [c * 10 + i for i in range(ORDERS_PER_CUSTOMER)] for c in range(1, n + 1)}


async def measure(
    run: Callable[[int], Awaitable[dict[int, list[int]]]],
    counter: list[int],
    n: int,
    repeats: int,
) -> dict[str, Any]:
    assert await run(n) == expected(n)  # warm-up (prepared statements, type caches) + check
    queries = []
    times = []
    for _ in range(repeats):
        counter[0] = 0
        start = time.perf_counter()
        result = await run(n)
        times.append(time.perf_counter() - start)
        queries.append(counter[0])
        assert result == expected(n)
    assert len(set(queries)) == 1, queries
    return {
        "queries": queries[0],
        "median_ms": round(statistics.median(times) * 1000, 3),
        "min_ms": round(min(times) * 1000, 3),
    }


async def part1(dsn: str, sizes: list[int], repeats: int) -> list[dict[str, Any]]:
    engine = create_async_engine(dsn.replace("postgresql://", "postgresql+asyncpg://", 1))
    sa_count = [0]

    def count_statement(*_: Any) -> None:
        sa_count[0] += 1

    sa.event.listen(engine.sync_engine, "before_cursor_execute", count_statement)
    raw = await asyncpg.connect(dsn)
    pg_count = [0]
    raw.add_query_logger(lambda _record: pg_count.__setitem__(0, pg_count[0] + 1))
    rows = []
    try:
        async with engine.connect() as conn, AsyncSession(engine) as session:
            strategies: list[tuple[str, str, Callable[[int], Awaitable[Any]], list[int]]] = [
                ("SQLAlchemy Core", "naive loop", lambda n: sa_naive(conn, n), sa_count),
                (
                    "SQLAlchemy Core",
                    "pgpilot DataLoader",
                    lambda n: sa_dataloader(conn, n),
                    sa_count,
                ),
                ("SQLAlchemy Core", "JOIN", lambda n: sa_join(conn, n), sa_count),
                ("SQLAlchemy ORM", "selectinload", lambda n: sa_selectinload(session, n), sa_count),
                ("asyncpg", "naive loop", lambda n: pg_naive(raw, n), pg_count),
                ("asyncpg", "pgpilot DataLoader", lambda n: pg_dataloader(raw, n), pg_count),
            ]
            for n in sizes:
                for driver, strategy, run, counter in strategies:
                    row = {"n": n, "driver": driver, "strategy": strategy}
                    row.update(await measure(run, counter, n, repeats))
                    rows.append(row)
                    print(f"  N={n:>3} {driver:<16} {strategy:<20} {row}", flush=True)
    finally:
        await raw.close()
        await engine.dispose()
    return rows


# -- part 2: per-load overhead ---------------------------------------------------------------


async def identity_batch(keys: list[int]) -> list[int]:
    return keys


class HarnessOnly:
    """The harness with no loader: ``load`` returns an already-completed future.

    Subtracting its time from a loader's gives that loader's own per-load overhead.
    """

    def load(self, key: int) -> asyncio.Future[int]:
        future = asyncio.get_running_loop().create_future()
        future.set_result(key)
        return future


def make_loaders() -> dict[str, Callable[[], Any]]:
    return {
        "harness": HarnessOnly,
        "pgpilot": lambda: DataLoader(identity_batch),
        "aiodataloader": lambda: aiodataloader.DataLoader(identity_batch),
        "strawberry": lambda: strawberry.dataloader.DataLoader(identity_batch),
    }


async def one_run(
    make: Callable[[], Any], loads: int, per_tick: int, shape: str
) -> tuple[float, float]:
    loader = make()
    gc.collect()  # every run starts with the same (empty) garbage
    cpu, wall = time.process_time(), time.perf_counter()
    if shape == "futures":
        # Loads issued in bulk, then awaited: the loader's own cost, little else.
        for start in range(0, loads, per_tick):
            futures = [loader.load(key) for key in range(start, start + per_tick)]
            for future in futures:
                await future
    else:
        # Each load in its own resolver coroutine under gather (GraphQL-like): Task costs too.
        async def resolve(key: int) -> Any:
            return await loader.load(key)

        for start in range(0, loads, per_tick):
            await asyncio.gather(*(resolve(key) for key in range(start, start + per_tick)))
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    # Every loader must have produced the same values; check one.
    assert await loader.load(loads - 1) == loads - 1
    return cpu, wall


async def part2(loads: int, repeats: int) -> list[dict[str, Any]]:
    scenarios = [
        ("futures", loads, f"{loads // 1000}k loads in one tick, awaited"),
        ("futures", 100, f"{loads // 1000}k loads, 100 per tick"),
        ("tasks", 1000, f"{loads // 1000}k loads from resolver tasks, 1000 per tick"),
    ]
    loop_name = type(asyncio.get_running_loop()).__module__.split(".")[0]
    rows = []
    for shape, per_tick, label in scenarios:
        cpu_runs: dict[str, list[float]] = {name: [] for name in make_loaders()}
        wall_runs: dict[str, list[float]] = {name: [] for name in make_loaders()}
        for _ in range(repeats):
            for name, make in make_loaders().items():  # interleaved: same conditions for all
                cpu, wall = await one_run(make, loads, per_tick, shape)
                cpu_runs[name].append(cpu)
                wall_runs[name].append(wall)
        best_cpu = {name: min(runs) for name, runs in cpu_runs.items()}
        best_wall = {name: min(runs) for name, runs in wall_runs.items()}
        median_cpu = {name: statistics.median(runs) for name, runs in cpu_runs.items()}
        anchor_cpu = min(best_cpu["aiodataloader"], best_cpu["strawberry"])
        anchor_wall = min(best_wall["aiodataloader"], best_wall["strawberry"])
        own = {k: v - best_cpu["harness"] for k, v in best_cpu.items() if k != "harness"}
        row = {
            "loop": loop_name,
            "scenario": label,
            "loads": loads,
            "per_tick": per_tick,
            "cpu_us_per_load": {k: round(v * 1e6 / loads, 3) for k, v in best_cpu.items()},
            "wall_us_per_load": {k: round(v * 1e6 / loads, 3) for k, v in best_wall.items()},
            "ratio_cpu": round(best_cpu["pgpilot"] / anchor_cpu, 3),
            "ratio_wall": round(best_wall["pgpilot"] / anchor_wall, 3),
            "median_cpu_us_per_load": {k: round(v * 1e6 / loads, 3) for k, v in median_cpu.items()},
            "ratio_median_cpu": round(
                median_cpu["pgpilot"] / min(median_cpu["aiodataloader"], median_cpu["strawberry"]),
                3,
            ),
            # The loaders' own cost: CPU time above the harness alone.
            "own_cpu_us_per_load": {k: round(v * 1e6 / loads, 3) for k, v in own.items()},
            "ratio_own_cpu": round(
                own["pgpilot"] / min(own["aiodataloader"], own["strawberry"]), 3
            ),
        }
        rows.append(row)
        print(
            f"  {loop_name:<8} {label:<48} {row['cpu_us_per_load']} ratio_cpu={row['ratio_cpu']}"
            f" ratio_wall={row['ratio_wall']} ratio_own_cpu={row['ratio_own_cpu']}",
            flush=True,
        )
    return rows


# -- report ----------------------------------------------------------------------------------


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "# pgpilot.batch benchmark",
        "",
        f"Run {report['when']} on {report['machine']} (Python {report['python']},"
        f" load average at start {report['load_average']}). Command: `{report['command']}`.",
        "",
        "## Customers with orders: queries sent and wall time per request",
        "",
        f"{ORDERS_PER_CUSTOMER} orders per customer; median of {report['repeats_db']} repeats"
        " after a warm-up; queries counted by driver hooks (SQLAlchemy `before_cursor_execute`,"
        " asyncpg query logger).",
        "",
        "| N | driver | strategy | queries | median ms | min ms |",
        "|---:|---|---|---:|---:|---:|",
    ]
    for row in report["customers_with_orders"]:
        lines.append(
            f"| {row['n']} | {row['driver']} | {row['strategy']} | {row['queries']} |"
            f" {row['median_ms']} | {row['min_ms']} |"
        )
    lines += [
        "",
        "## Per-load overhead: pgpilot DataLoader vs aiodataloader vs strawberry",
        "",
        "In-memory batch function, distinct keys, loaders interleaved in one process, best of"
        f" {report['repeats_overhead']} runs. Microseconds per load (CPU time of the process;"
        " wall time in the JSON); `harness` is the same loop with no loader (an already"
        " completed future per load), and *own* is a loader's time above it. ratio = pgpilot /"
        " faster of the other two (< 1 is faster).",
        "",
        "| loop | scenario | harness | pgpilot | aiodataloader | strawberry | ratio (CPU)"
        " | ratio (median CPU) | ratio (own CPU) | ratio (wall) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in report["overhead"]:
        cpu = row["cpu_us_per_load"]
        lines.append(
            f"| {row['loop']} | {row['scenario']} | {cpu['harness']} | {cpu['pgpilot']} |"
            f" {cpu['aiodataloader']} | {cpu['strawberry']} | {row['ratio_cpu']} |"
            f" {row['ratio_median_cpu']} | {row['ratio_own_cpu']} | {row['ratio_wall']} |"
        )
    versions = report["versions"]
    lines += ["", "Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()), ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--dsn",
        default=os.environ.get("PGPILOT_TEST_DSN", "postgresql://postgres@127.0.0.1:5432/test"),
    )
    parser.add_argument("--quick", action="store_true", help="fewer repeats, 20k loads")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    repeats_db = 3 if args.quick else 15
    repeats_overhead = 2 if args.quick else 15
    loads = 20_000 if args.quick else 100_000

    print("customers with orders:")

    async def db_part() -> list[dict[str, Any]]:
        await create_data(args.dsn)
        try:
            return await part1(args.dsn, [10, 50, 200], repeats_db)
        finally:
            await drop_data(args.dsn)

    customers = asyncio.run(db_part())
    print("per-load overhead:")
    overhead = asyncio.run(part2(loads, repeats_overhead))
    overhead += uvloop.run(part2(loads, repeats_overhead))

    from importlib.metadata import version

    report = {
        "when": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "python": platform.python_version(),
        "load_average": round(os.getloadavg()[0], 2),
        "command": "python bench/batch.py" + (" --quick" if args.quick else ""),
        "repeats_db": repeats_db,
        "repeats_overhead": repeats_overhead,
        "versions": {
            name: version(name)
            for name in ("aiodataloader", "strawberry-graphql", "asyncpg", "SQLAlchemy", "uvloop")
        },
        "customers_with_orders": customers,
        "overhead": overhead,
    }
    if not args.no_write:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "batch.json").write_text(json.dumps(report, indent=2) + "\n")
        (RESULTS / "batch.md").write_text(markdown(report))
        print(f"wrote {RESULTS / 'batch.json'} and {RESULTS / 'batch.md'}")


if __name__ == "__main__":
    sys.exit(main())
