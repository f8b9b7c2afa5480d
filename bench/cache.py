"""Benchmark: pgpilot.cache's hit path and stampede protection against dogpile.cache and cashews.

A read-heavy endpoint, ``customer_with_orders(customer_id)``: two queries on real PostgreSQL
(the customer, then their orders), returning a dict with a list of order dicts (``Decimal``
totals). Each variant caches it in the same Redis with its own decorator:

* ``uncached``          the function itself (the anchor for queries saved);
* ``pgpilot``           ``@cache.cached`` on a ``RedisBackend`` (msgpack, the default);
* ``pgpilot-pickle``    the same with ``SignedPickleSerializer`` (pickle + HMAC-SHA256);
* ``dogpile``           dogpile.cache's ``redis`` backend, ``@region.cache_on_arguments()``
                        (pickle): the same serializer family as ``pgpilot-pickle``;
* ``pgpilot-async`` / ``cashews``: the ``async def`` twin on ``redis.asyncio``; cashews
  with its default (pickle) serializer.

Hit path: after one call per customer fills the cache, calls cycle over the customers; rounds
alternate the variants, and the figure is the median per-call time over rounds, reported as a
ratio to the fastest other library of the same kind (sync: dogpile; async: cashews).

Stampede: 200 concurrent callers (asyncio tasks; threads for the sync variants) on a hot key
just invalidated, whose fill takes a 50 ms query: fills executed and the callers' p99.

Usage: ``python bench/cache.py [--rounds 7] [--calls 2000] [--dsn URL] [--redis URL]``;
writes ``bench/results/cache.json`` and ``bench/results/cache.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import redis

RESULTS = Path(__file__).resolve().parent / "results"
SCHEMA = "pgp_cache_bench"
CUSTOMERS = 50
ORDERS_PER_CUSTOMER = 10
DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/test"
DEFAULT_REDIS = "redis://127.0.0.1:6379/14"
QUERIES = (
    f"SELECT id, name FROM {SCHEMA}.customers WHERE id = %s",
    f"SELECT id, total, status FROM {SCHEMA}.orders WHERE customer_id = %s ORDER BY id",
)
AQUERIES = tuple(q.replace("%s", "$1") for q in QUERIES)


def setup(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE")
        conn.execute(f"CREATE SCHEMA {SCHEMA}")
        conn.execute(f"CREATE TABLE {SCHEMA}.customers (id int PRIMARY KEY, name text)")
        conn.execute(f"CREATE TABLE {SCHEMA}.orders (id int PRIMARY KEY, customer_id int, "
                     "total numeric(10, 2), status text)")
        conn.execute(f"CREATE INDEX ON {SCHEMA}.orders (customer_id)")
        conn.execute(f"INSERT INTO {SCHEMA}.customers SELECT i, 'customer ' || i "
                     f"FROM generate_series(1, {CUSTOMERS}) i")
        conn.execute(f"INSERT INTO {SCHEMA}.orders SELECT i, 1 + i % {CUSTOMERS}, 10 + i % 90, "
                     f"'done' FROM generate_series(1, {CUSTOMERS * ORDERS_PER_CUSTOMER}) i")


class Endpoint:
    """The uncached endpoint, counting its queries."""

    def __init__(self, dsn: str) -> None:
        self.conn = psycopg.connect(dsn, autocommit=True)
        self.queries = 0
        self.lock = threading.Lock()
        self.slow = False

    def __call__(self, customer_id: int) -> dict[str, Any]:
        with self.lock:
            self.queries += 2
            if self.slow:
                self.conn.execute("SELECT pg_sleep(0.05)")
            cid, name = self.conn.execute(QUERIES[0], (customer_id,)).fetchone()  # type: ignore[misc]
            orders = [{"id": i, "total": t, "status": s}
                      for i, t, s in self.conn.execute(QUERIES[1], (customer_id,))]
        return {"id": cid, "name": name, "orders": orders}


class AsyncEndpoint:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        self.queries = 0
        self.slow = False

    async def __call__(self, customer_id: int) -> dict[str, Any]:
        self.queries += 2
        async with self.pool.acquire() as conn:
            if self.slow:
                await conn.execute("SELECT pg_sleep(0.05)")
            row = await conn.fetchrow(AQUERIES[0], customer_id)
            orders = [{"id": r["id"], "total": r["total"], "status": r["status"]}
                      for r in await conn.fetch(AQUERIES[1], customer_id)]
        return {"id": row["id"], "name": row["name"], "orders": orders}


def sync_variants(dsn: str, redis_url: str) -> dict[str, tuple[Callable[[int], Any], Endpoint,
                                                               Callable[[], None]]]:
    from dogpile.cache import make_region

    from pgpilot.cache import Cache, RedisBackend, SignedPickleSerializer

    made: dict[str, tuple[Callable[[int], Any], Endpoint, Callable[[], None]]] = {}
    plain = Endpoint(dsn)
    made["uncached"] = (plain, plain, lambda: None)
    for name, serializer in (("pgpilot", None),
                             ("pgpilot-pickle", SignedPickleSerializer(b"bench-secret-key-0123"))):
        endpoint = Endpoint(dsn)
        cache = Cache(RedisBackend(redis_url, timeout=2.0), namespace=f"bench-{name}",
                      serializer=serializer, follow_writes=False)
        cached = cache.cached(ttl=600, name="customer_with_orders")(endpoint)
        cache.clear()
        made[name] = (cached, endpoint, cache.clear)
    endpoint = Endpoint(dsn)
    region = make_region().configure(
        "dogpile.cache.redis", expiration_time=600,
        arguments={"connection_pool": redis.BlockingConnectionPool.from_url(
            redis_url, max_connections=64, timeout=5), "distributed_lock": True,
            "thread_local_lock": False})  # the same pool size as pgpilot's
    client = redis.Redis.from_url(redis_url)

    def clear_dogpile() -> None:
        keys = list(client.scan_iter(match="*customer_with_orders*"))
        if keys:
            client.delete(*keys)

    @region.cache_on_arguments()
    def customer_with_orders(customer_id: int) -> dict[str, Any]:
        return endpoint(customer_id)

    clear_dogpile()
    made["dogpile"] = (customer_with_orders, endpoint, clear_dogpile)
    return made


def time_calls(fn: Callable[[int], Any], calls: int) -> float:
    started = time.perf_counter()
    for i in range(calls):
        fn(1 + i % CUSTOMERS)
    return (time.perf_counter() - started) / calls * 1e6


async def atime_calls(fn: Callable[[int], Awaitable[Any]], calls: int) -> float:
    started = time.perf_counter()
    for i in range(calls):
        await fn(1 + i % CUSTOMERS)
    return (time.perf_counter() - started) / calls * 1e6


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]


def sync_stampede(fn: Callable[[int], Any], endpoint: Endpoint, clear: Callable[[], None],
                  callers: int = 200) -> dict[str, float]:
    clear()
    endpoint.slow = True
    before = endpoint.queries
    barrier = threading.Barrier(callers)
    latencies: list[float] = []

    def worker() -> None:
        barrier.wait()
        started = time.perf_counter()
        fn(7)
        latencies.append((time.perf_counter() - started) * 1000)

    threads = [threading.Thread(target=worker) for _ in range(callers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    endpoint.slow = False
    return {"fills": (endpoint.queries - before) / 2, "p99_ms": p99(latencies)}


async def async_part(dsn: str, redis_url: str, rounds: int, calls: int) -> dict[str, Any]:
    from cashews import Cache as Cashews

    from pgpilot.cache import Cache, RedisBackend

    pool = await asyncpg.create_pool(dsn, min_size=4, max_size=4)
    ours_endpoint, theirs_endpoint = AsyncEndpoint(pool), AsyncEndpoint(pool)
    cache = Cache(RedisBackend(redis_url, timeout=2.0), namespace="bench-pgpilot-async",
                  follow_writes=False)
    ours = cache.cached(ttl=600, name="customer_with_orders")(ours_endpoint)
    cashews = Cashews()
    cashews.setup(redis_url, client_side=False)

    @cashews(ttl="10m", prefix="bench-cashews", lock=True)
    async def customer_with_orders(customer_id: int) -> dict[str, Any]:
        return await theirs_endpoint(customer_id)

    await cache.aclear()
    await cashews.delete_match("bench-cashews*")
    for i in range(1, CUSTOMERS + 1):
        await ours(i)
        await customer_with_orders(i)
    times: dict[str, list[float]] = {"pgpilot-async": [], "cashews": []}
    for _ in range(rounds):
        times["pgpilot-async"].append(await atime_calls(ours, calls))
        times["cashews"].append(await atime_calls(customer_with_orders, calls))
    hits = {"pgpilot-async": ours_endpoint.queries, "cashews": theirs_endpoint.queries}

    async def stampede(fn: Callable[[int], Awaitable[Any]], endpoint: AsyncEndpoint,
                       clear: Callable[[], Awaitable[Any]]) -> dict[str, float]:
        await clear()
        endpoint.slow = True
        before = endpoint.queries

        async def one() -> float:
            started = time.perf_counter()
            await fn(7)
            return (time.perf_counter() - started) * 1000

        latencies = await asyncio.gather(*(one() for _ in range(200)))
        endpoint.slow = False
        return {"fills": (endpoint.queries - before) / 2, "p99_ms": p99(list(latencies))}

    stampedes = {
        "pgpilot-async": await stampede(ours, ours_endpoint, cache.aclear),
        "cashews": await stampede(customer_with_orders, theirs_endpoint,
                                  lambda: cashews.delete_match("bench-cashews*")),
    }
    await cache.aclear()
    await cashews.delete_match("bench-cashews*")
    await pool.close()
    return {"times": times, "queries_after_warmup": hits, "stampede": stampedes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--dsn", default=os.environ.get("PGPILOT_BENCH_DSN", DEFAULT_DSN))
    parser.add_argument("--redis", default=os.environ.get("PGPILOT_BENCH_REDIS", DEFAULT_REDIS))
    args = parser.parse_args()
    setup(args.dsn)
    variants = sync_variants(args.dsn, args.redis)
    uncached_calls = max(200, args.calls // 10)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _, (fn, _endpoint, _clear) in variants.items():
        for i in range(1, CUSTOMERS + 1):
            fn(i)  # fill (the uncached one just warms PostgreSQL)
    warm_queries = {name: endpoint.queries for name, (_, endpoint, _) in variants.items()}
    for _ in range(args.rounds):
        for name, (fn, _endpoint, _clear) in variants.items():
            times[name].append(time_calls(fn, uncached_calls if name == "uncached"
                                          else args.calls))
    sync_calls = {name: (uncached_calls if name == "uncached" else args.calls) * args.rounds
                  for name in variants}
    queries = {name: (endpoint.queries - warm_queries[name]) / sync_calls[name]
               for name, (_, endpoint, _) in variants.items()}
    sync_stampedes = {name: sync_stampede(fn, endpoint, clear)
                      for name, (fn, endpoint, clear) in variants.items() if name != "uncached"}
    async_results = asyncio.run(async_part(args.dsn, args.redis, args.rounds, args.calls))
    times.update(async_results["times"])
    medians = {name: statistics.median(v) for name, v in times.items()}
    result = {
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                    "load": os.getloadavg()},
        "rounds": args.rounds, "calls": args.calls,
        "per_call_us": medians, "all_rounds_us": times,
        "queries_per_call": queries,
        "async_queries_after_warmup": async_results["queries_after_warmup"],
        "stampede": {**sync_stampedes, **async_results["stampede"]},
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "cache.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    (RESULTS / "cache.md").write_text(render(result))
    print(render(result))
    with psycopg.connect(args.dsn, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE")


def render(result: dict[str, Any]) -> str:
    us = result["per_call_us"]
    lines = [
        "# Query cache: hit path and stampede",
        "",
        f"`python bench/cache.py --rounds {result['rounds']} --calls {result['calls']}`: "
        f"Python {result['machine']['python']}, {result['machine']['cpus']} CPUs, load "
        f"{', '.join(f'{x:.2f}' for x in result['machine']['load'])}; PostgreSQL and Redis on "
        "127.0.0.1. Endpoint: a customer and their 10 orders (2 queries).",
        "",
        "## Hit path (median per call over rounds, alternating)",
        "",
        "| variant | per call | vs the anchor | queries per call |",
        "|---|---|---|---|",
    ]
    anchors = {"pgpilot": "dogpile", "pgpilot-pickle": "dogpile", "dogpile": "dogpile",
               "pgpilot-async": "cashews", "cashews": "cashews", "uncached": "uncached"}
    for name in ("uncached", "dogpile", "pgpilot", "pgpilot-pickle", "cashews",
                 "pgpilot-async"):
        anchor = anchors[name]
        ratio = us[name] / us[anchor]
        queries = result["queries_per_call"].get(name)
        if queries is None:
            queries = result["async_queries_after_warmup"][name] / (
                result["rounds"] * result["calls"])
        lines.append(f"| {name} | {us[name]:.1f} µs | {ratio:.2f}x {anchor} | {queries:.3f} |")
    lines += [
        "",
        "Ratios below 1.00 are faster than the anchor (sync: dogpile.cache; async: cashews).",
        "",
        "## Stampede: 200 concurrent callers on a hot key just invalidated (50 ms fill)",
        "",
        "| variant | callers | fills executed | p99 |",
        "|---|---|---|---|",
    ]
    for name, row in result["stampede"].items():
        kind = "tasks" if name in ("pgpilot-async", "cashews") else "threads"
        lines.append(f"| {name} | 200 {kind} | {row['fills']:.0f} | {row['p99_ms']:.1f} ms |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
