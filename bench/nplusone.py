"""Benchmark: what N+1 detection costs on a SQLAlchemy ORM workload against real PostgreSQL.

Three variants run the same "request" (a list page that lazy-loads a collection per row, then a
page that eager-loads one), each in its own fresh process because the ``nplusone`` package
patches SQLAlchemy for the whole process as soon as it is imported:

* ``baseline``  no detection;
* ``pgpilot``   each request inside ``pgpilot.nplusone.detect()``;
* ``nplusone``  each request inside ``nplusone``'s ``Profiler`` (the PyPI package), with its
  findings collected instead of raised, when the package is installed and runs.

Rounds alternate the variants so drift in the machine or the database hits all of them; the
figure compared is the median time per request. A separate in-process measurement gives the
cost of one ``record_query`` call (what every statement pays while a scope is open).

Usage: ``python bench/nplusone.py [--rounds 5] [--requests 150] [--dsn URL]``; writes
``bench/results/nplusone.json`` and ``bench/results/nplusone.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
# This file is named like the PyPI package it compares with: keep its folder off the import
# path so that "import nplusone" finds the package, not this script.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != BENCH_DIR]

from sqlalchemy import ForeignKey, String, create_engine, text  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402
from sqlalchemy.orm import (  # noqa: E402
    DeclarativeBase,
    Mapped,
    Session,
    mapped_column,
    relationship,
    selectinload,
)

SCHEMA = "pgp_nplusone_bench"
CUSTOMERS = 200
ORDERS_PER_CUSTOMER = 5
ITEMS_PER_ORDER = 2
PAGE = 20
VARIANTS = ("baseline", "pgpilot", "nplusone")
DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/test"


class Base(DeclarativeBase):
    pass


class Customer(Base):
    __tablename__ = "customers"
    __table_args__ = {"schema": SCHEMA}  # noqa: RUF012

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50))
    orders: Mapped[list[Order]] = relationship(back_populates="customer")


class Order(Base):
    __tablename__ = "orders"
    __table_args__ = {"schema": SCHEMA}  # noqa: RUF012

    id: Mapped[int] = mapped_column(primary_key=True)
    customer_id: Mapped[int] = mapped_column(ForeignKey(f"{SCHEMA}.customers.id"))
    total: Mapped[int]
    customer: Mapped[Customer] = relationship(back_populates="orders")
    items: Mapped[list[Item]] = relationship()


class Item(Base):
    __tablename__ = "items"
    __table_args__ = {"schema": SCHEMA}  # noqa: RUF012

    id: Mapped[int] = mapped_column(primary_key=True)
    order_id: Mapped[int] = mapped_column(ForeignKey(f"{SCHEMA}.orders.id"))
    sku: Mapped[str] = mapped_column(String(20))


def sqlalchemy_url(dsn: str) -> str:
    return make_url(dsn).set(drivername="postgresql+psycopg").render_as_string(False)


def seed(dsn: str) -> None:
    engine = create_engine(sqlalchemy_url(dsn))
    with engine.begin() as conn:
        conn.execute(text(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE"))
        conn.execute(text(f"CREATE SCHEMA {SCHEMA}"))
    Base.metadata.create_all(engine)
    with Session(engine) as session:
        for c in range(1, CUSTOMERS + 1):
            customer = Customer(id=c, name=f"customer {c}")
            for o in range(ORDERS_PER_CUSTOMER):
                order_id = c * 100 + o
                customer.orders.append(
                    Order(
                        id=order_id,
                        total=o + c,
                        items=[
                            Item(id=order_id * 10 + i, sku=f"s{order_id}-{i}")
                            for i in range(ITEMS_PER_ORDER)
                        ],
                    )
                )
            session.add(customer)
        session.commit()
    engine.dispose()


def drop(dsn: str) -> None:
    engine = create_engine(sqlalchemy_url(dsn))
    with engine.begin() as conn:
        conn.execute(text(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE"))
    engine.dispose()


def one_request(session: Session, page: int, read_columns: bool = False) -> int:
    """A list page with an N+1 (lazy collection per row), then a page loaded eagerly.

    Written with ``session.query()``: nplusone only sees loads made through ``Query``.
    ``read_columns``: also read a column of each customer and order, as a page that shows
    them would (the doctor notes the first read of each).
    """
    offset = (page * PAGE) % CUSTOMERS
    seen = 0
    customers = session.query(Customer).order_by(Customer.id).offset(offset).limit(PAGE).all()
    for customer in customers:
        seen += len(customer.orders)
        if read_columns:
            seen += len(customer.name)
    orders = (
        session.query(Order)
        .options(selectinload(Order.items))
        .order_by(Order.id)
        .offset(offset)
        .limit(PAGE)
        .all()
    )
    for order in orders:
        seen += len(order.items)
        if read_columns:
            seen += order.total
    return seen


def run_variant(variant: str, dsn: str, requests: int, warmup: int) -> dict[str, Any]:
    """Runs in a child process: time ``requests`` requests under one variant."""
    engine = create_engine(sqlalchemy_url(dsn), pool_size=1)
    enter: Any
    findings: list[str] = []
    if variant == "baseline":
        from contextlib import nullcontext

        def enter() -> Any:
            return nullcontext()

    elif variant == "pgpilot":
        from pgpilot.nplusone import detect

        def enter() -> Any:
            return detect()

    elif variant == "nplusone":
        from sqlalchemy.orm import strategies

        if not hasattr(strategies, "LazyLoader"):
            # nplusone 1.0 patches strategies.LazyLoader, which SQLAlchemy 2.1 renamed
            # _LazyLoader: the one alias it needs to run at all.
            strategies.LazyLoader = strategies._LazyLoader  # type: ignore[attr-defined]
        import nplusone.ext.sqlalchemy  # noqa: F401 - patches SQLAlchemy on import
        from nplusone.core.profiler import Profiler

        class CollectingProfiler(Profiler):  # type: ignore[misc]
            def notify(self, message: Any) -> None:
                findings.append(message.message)

        def enter() -> Any:
            return CollectingProfiler()

    else:
        raise SystemExit(f"unknown variant {variant}")

    queries = 0

    def count(*args: Any) -> None:
        nonlocal queries
        queries += 1

    from sqlalchemy import event

    event.listen(engine, "after_cursor_execute", count)
    wall: list[float] = []
    cpu: list[float] = []
    pgpilot_findings: list[str] = []
    for n in range(warmup + requests):
        with Session(engine) as session:
            session.connection()  # check a connection out before the clock starts
            start, start_cpu = time.perf_counter(), time.process_time()
            with enter() as report:
                one_request(session, n)
            elapsed, elapsed_cpu = time.perf_counter() - start, time.process_time() - start_cpu
        if n >= warmup:
            wall.append(elapsed)
            cpu.append(elapsed_cpu)
        if n == warmup and variant == "pgpilot":
            pgpilot_findings = [f.describe() for f in report.findings]
    engine.dispose()
    return {
        "variant": variant,
        "wall": wall,
        "cpu": cpu,
        "queries_per_request": queries / (warmup + requests),
        "findings_first_request": sorted(set(pgpilot_findings or findings)),
    }


def run_paired(
    dsn: str,
    pairs: int,
    warmup: int,
    overfetch_columns: int | None = None,
    read_columns: bool = False,
) -> dict[str, Any]:
    """Runs in a child process: requests alternate without and with ``detect()``.

    Pairing cancels what the loaded machine and database do between two neighbouring
    requests, which a comparison across processes cannot. ``overfetch_columns``: passed to
    ``detect()`` (2 makes every load of this workload one whose use the doctor follows, as
    an entity of six columns or more is by default); ``read_columns``: see ``one_request``.
    """
    options: dict[str, Any] = {}
    if overfetch_columns is not None:
        options["overfetch_columns"] = overfetch_columns
    from pgpilot.nplusone import detach, detect
    from pgpilot.nplusone.core import _install_feeds

    engine = create_engine(sqlalchemy_url(dsn), pool_size=1)
    samples: dict[str, list[float]] = {
        "wall_without": [],
        "wall_with": [],
        "cpu_without": [],
        "cpu_with": [],
    }
    for n in range(warmup + pairs):
        # alternate which goes first, so neither always runs on a warmer cache
        for with_detection in (n % 2 == 1, n % 2 == 0):
            # Without: no trace of pgpilot (no listener, attributes as SQLAlchemy made them).
            # With: the listeners in place, as in an application that has opened a scope
            # before; neither change is timed.
            if with_detection:
                _install_feeds()
            else:
                detach()
            with Session(engine) as session:
                session.connection()  # check a connection out before the clock starts
                start, start_cpu = time.perf_counter(), time.process_time()
                if with_detection:
                    with detect(**options):
                        one_request(session, n, read_columns)
                else:
                    one_request(session, n, read_columns)
                elapsed, elapsed_cpu = time.perf_counter() - start, time.process_time() - start_cpu
            if n >= warmup:
                suffix = "with" if with_detection else "without"
                samples[f"wall_{suffix}"].append(elapsed)
                samples[f"cpu_{suffix}"].append(elapsed_cpu)
    engine.dispose()
    return samples


def record_query_cost(iterations: int = 20000) -> dict[str, float]:
    """Microseconds per statement that ``record_query`` adds while a scope is open."""
    from pgpilot.nplusone import detect
    from pgpilot.nplusone.core import record_query

    sql = (
        "SELECT orders.id, orders.customer_id, orders.total FROM orders "
        "WHERE %(param_1)s::INTEGER = orders.customer_id"
    )

    def deep(level: int) -> float:
        # a stack ~25 frames deep, as in an ORM lazy load
        if level:
            return deep(level - 1)
        start = time.perf_counter()
        for i in range(iterations):
            record_query(sql, {"param_1": i % 50})
        return time.perf_counter() - start

    with detect():
        in_scope = deep(25)
    start = time.perf_counter()
    for i in range(iterations):
        record_query(sql, {"param_1": i % 50})
    outside = time.perf_counter() - start
    return {
        "record_query_in_scope_us": in_scope / iterations * 1e6,
        "record_query_no_scope_us": outside / iterations * 1e6,
    }


def available(variant: str) -> str | None:
    if variant != "nplusone":
        return None
    try:
        import nplusone  # noqa: F401
    except ImportError:
        return "the nplusone package is not installed (pip install -e '.[bench]')"
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--dsn",
        default=os.environ.get("PGPILOT_BENCH_DSN")
        or os.environ.get("PGPILOT_TEST_DSN")
        or DEFAULT_DSN,
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=150)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--pairs", type=int, default=600)
    parser.add_argument("--child", choices=(*VARIANTS, "paired"), help=argparse.SUPPRESS)
    parser.add_argument("--overfetch-columns", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--read-columns", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(BENCH_DIR / "results" / "nplusone"))
    args = parser.parse_args()

    if args.child == "paired":
        json.dump(
            run_paired(
                args.dsn, args.pairs, args.warmup, args.overfetch_columns, args.read_columns
            ),
            sys.stdout,
        )
        return
    if args.child:
        json.dump(run_variant(args.child, args.dsn, args.requests, args.warmup), sys.stdout)
        return

    load_at_start = round(os.getloadavg()[0], 1) if hasattr(os, "getloadavg") else None
    seed(args.dsn)
    try:
        wall: dict[str, list[float]] = {v: [] for v in VARIANTS}
        cpu: dict[str, list[float]] = {v: [] for v in VARIANTS}
        process_cpu: dict[str, list[float]] = {v: [] for v in VARIANTS}  # one per process
        details: dict[str, dict[str, Any]] = {}
        skipped: dict[str, str] = {}
        for variant in VARIANTS:
            reason = available(variant)
            if reason:
                skipped[variant] = reason
        active = [v for v in VARIANTS if v not in skipped]
        for round_number in range(args.rounds):
            order = active[round_number % len(active) :] + active[: round_number % len(active)]
            for variant in order:
                child = subprocess.run(
                    [
                        sys.executable,
                        __file__,
                        "--child",
                        variant,
                        "--dsn",
                        args.dsn,
                        "--requests",
                        str(args.requests),
                        "--warmup",
                        str(args.warmup),
                    ],
                    capture_output=True,
                    text=True,
                    check=False,
                )
                if child.returncode != 0:
                    skipped[variant] = f"failed: {child.stderr.strip().splitlines()[-1:]}"
                    continue
                result = json.loads(child.stdout)
                wall[variant].extend(result["wall"])
                cpu[variant].extend(result["cpu"])
                process_cpu[variant].append(statistics.median(result["cpu"]))
                details[variant] = result
            active = [v for v in active if v not in skipped]
        paired_child = subprocess.run(
            [
                sys.executable,
                __file__,
                "--child",
                "paired",
                "--dsn",
                args.dsn,
                "--pairs",
                str(args.pairs),
                "--warmup",
                str(args.warmup),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        paired = json.loads(paired_child.stdout)
        micro = record_query_cost()
    finally:
        drop(args.dsn)

    median = statistics.median
    base_wall, base_cpu = median(wall["baseline"]), median(cpu["baseline"])
    queries = details["baseline"]["queries_per_request"]
    rows: list[dict[str, Any]] = []
    for variant in VARIANTS:
        if variant in skipped or not wall[variant]:
            continue
        rows.append(
            {
                "variant": variant,
                "requests": len(wall[variant]),
                "median_wall_ms": round(median(wall[variant]) * 1e3, 3),
                "median_cpu_ms": round(median(cpu[variant]) * 1e3, 3),
                "wall_overhead_pct": round((median(wall[variant]) / base_wall - 1) * 100, 2),
                "cpu_overhead_pct": round((median(cpu[variant]) / base_cpu - 1) * 100, 2),
                "process_cpu_ms_range": [
                    round(min(process_cpu[variant]) * 1e3, 3),
                    round(max(process_cpu[variant]) * 1e3, 3),
                ],
                "findings": details[variant]["findings_first_request"],
            }
        )
    wall_ratios = [
        w / wo for w, wo in zip(paired["wall_with"], paired["wall_without"], strict=True)
    ]
    cpu_ratios = [c / co for c, co in zip(paired["cpu_with"], paired["cpu_without"], strict=True)]
    cpu_deltas = [c - co for c, co in zip(paired["cpu_with"], paired["cpu_without"], strict=True)]
    paired_summary = {
        "pairs": len(wall_ratios),
        "median_wall_without_ms": round(median(paired["wall_without"]) * 1e3, 3),
        "median_wall_with_ms": round(median(paired["wall_with"]) * 1e3, 3),
        "wall_overhead_pct": round((median(wall_ratios) - 1) * 100, 2),
        "median_cpu_without_ms": round(median(paired["cpu_without"]) * 1e3, 3),
        "median_cpu_with_ms": round(median(paired["cpu_with"]) * 1e3, 3),
        "cpu_overhead_pct": round((median(cpu_ratios) - 1) * 100, 2),
        "cpu_per_query_us": round(median(cpu_deltas) / queries * 1e6, 2),
    }
    result = {
        "benchmark": "N+1 detection overhead on a SQLAlchemy ORM workload",
        "workload": (
            f"per request: 1 page query of {PAGE} customers + {PAGE} lazy loads of "
            f"Customer.orders (an N+1) + 1 page of {PAGE} orders with selectinload(Order.items) "
            f"(2 queries) = {queries:.0f} queries, PostgreSQL via psycopg 3"
        ),
        "machine": f"{platform.python_implementation()} {platform.python_version()} "
        f"on {platform.machine()}",
        "load_average_at_start": load_at_start,
        "rounds": args.rounds,
        "requests_per_round": args.requests,
        "results": rows,
        "paired": paired_summary,
        "skipped": skipped,
        **{key: round(value, 3) for key, value in micro.items()},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(render_markdown(result))
    print(render_markdown(result))


def render_markdown(result: dict[str, Any]) -> str:
    paired = result["paired"]
    lines = [
        "# N+1 detection overhead (bench/nplusone.py)",
        "",
        f"Workload: {result['workload']}. {result['machine']}, 1-minute load average "
        f"{result['load_average_at_start']} at the start (a shared machine: wall times are "
        "noisy; client CPU time, which is where detection costs, much less so).",
        "",
        f"## Paired, one process ({paired['pairs']} request pairs, without/with `detect()`)",
        "",
        "Neighbouring requests share the machine's state; the figure is the median of the "
        "per-pair ratios. Before each request without detection pgpilot is detached "
        "entirely (no listener, relationship attributes restored), so the comparison is "
        "with an application that never imported it.",
        "",
        "| | without | with detect() | overhead |",
        "| --- | ---: | ---: | ---: |",
        f"| wall time per request | {paired['median_wall_without_ms']:.3f} ms "
        f"| {paired['median_wall_with_ms']:.3f} ms | **{paired['wall_overhead_pct']:+.2f}%** |",
        f"| client CPU per request | {paired['median_cpu_without_ms']:.3f} ms "
        f"| {paired['median_cpu_with_ms']:.3f} ms | **{paired['cpu_overhead_pct']:+.2f}%** |",
        "",
        f"Client CPU added per query: {paired['cpu_per_query_us']:+.1f} us. `record_query` alone "
        f"(what each statement pays in an open scope, 25 frames deep): "
        f"{result['record_query_in_scope_us']:.2f} us; with no scope open: "
        f"{result['record_query_no_scope_us']:.2f} us.",
        "",
        f"## Side by side, fresh process per variant ({result['rounds']} alternating rounds x "
        f"{result['requests_per_round']} requests)",
        "",
        "The `nplusone` package patches SQLAlchemy for the whole process on import, so each "
        "variant runs in its own process. Processes differ from one another by more than "
        "pgpilot's cost (see the spread of the per-process medians): this table compares "
        "with nplusone; the paired figure above is pgpilot's overhead.",
        "",
        "| variant | median wall (ms) | wall vs baseline | median client CPU (ms) "
        "| CPU vs baseline | per-process CPU medians (ms) |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in result["results"]:
        low, high = row["process_cpu_ms_range"]
        lines.append(
            f"| {row['variant']} | {row['median_wall_ms']:.3f} | {row['wall_overhead_pct']:+.2f}% "
            f"| {row['median_cpu_ms']:.3f} | {row['cpu_overhead_pct']:+.2f}% "
            f"| {low:.1f} to {high:.1f} |"
        )
    lines += ["", "What each detector reported for one request:", ""]
    for row in result["results"]:
        if row["variant"] != "baseline":
            found = "; ".join(row["findings"]) or "nothing"
            lines.append(f"- {row['variant']}: {found}")
    for variant, reason in result["skipped"].items():
        lines.append(f"- {variant}: not run ({reason})")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
