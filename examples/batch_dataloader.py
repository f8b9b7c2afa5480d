"""DataLoader over asyncpg: a page of 100 customers, their orders and products in 2 queries.

A request handler renders 100 customers, each with its orders and each order's product. Written
the obvious way (one query per customer for its orders, one per order for its product) that is
1 + 100 + 500 round trips. With one ``DataLoader`` per relation, made per request by
``request_scope()`` / ``scoped()`` from the ready-made batch functions of ``pgpilot.batch.sql``,
the code still loads one customer's orders at a time (``await loader.load(customer_id)``), and
the loads of all 100 concurrent views leave as one ``WHERE customer_id = ANY($1)`` query; their
products as one more. The script counts the statements asyncpg really sent (its query logger),
checks that both versions render the same page, and drops its tables.

    python examples/batch_dataloader.py [DSN]

DSN: default ``$PGPILOT_DSN``, else postgresql://postgres@127.0.0.1:5432/test.
"""

from __future__ import annotations

import asyncio
import os
import sys
import uuid
from typing import Any

import asyncpg

from pgpilot.batch import DataLoader, request_scope, scoped
from pgpilot.batch.sql import rows_by_key, rows_grouped_by_key

DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/test"
SCHEMA = f"pgpilot_example_batch_{uuid.uuid4().hex[:8]}"

SETUP = f"""
CREATE SCHEMA {SCHEMA};
CREATE TABLE {SCHEMA}.customers (id int PRIMARY KEY, name text NOT NULL);
CREATE TABLE {SCHEMA}.products (id int PRIMARY KEY, title text NOT NULL, price numeric NOT NULL);
CREATE TABLE {SCHEMA}.orders (
    id int PRIMARY KEY,
    customer_id int NOT NULL REFERENCES {SCHEMA}.customers,
    product_id int NOT NULL REFERENCES {SCHEMA}.products,
    quantity int NOT NULL
);
CREATE INDEX ON {SCHEMA}.orders (customer_id);
INSERT INTO {SCHEMA}.customers SELECT g, 'customer ' || g FROM generate_series(1, 300) g;
INSERT INTO {SCHEMA}.products SELECT g, 'product ' || g, g % 50 + 0.99
FROM generate_series(1, 80) g;
INSERT INTO {SCHEMA}.orders SELECT g, g % 300 + 1, g % 80 + 1, g % 4 + 1
FROM generate_series(1, 1500) g;
ANALYZE {SCHEMA}.customers, {SCHEMA}.products, {SCHEMA}.orders;
"""

PAGE = f"SELECT id, name FROM {SCHEMA}.customers ORDER BY id LIMIT 100"

# The batch queries, described once: table, key column, and for a one-to-many relation the
# order of each key's rows.
ORDERS = rows_grouped_by_key("orders", key="customer_id", schema=SCHEMA, order_by="id")
PRODUCTS = rows_by_key("products", key="id", columns=["id", "title", "price"], schema=SCHEMA)


class QueryCounter:
    """Counts the statements on the example's tables that asyncpg sends, through its query
    logger (the pool's own reset statement on each release is not one of them)."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, record: Any) -> None:
        if SCHEMA in record.query:
            self.count += 1

    async def attach(self, conn: asyncpg.Connection) -> None:
        conn.add_query_logger(self)


# -- the obvious version: a query per customer, then per order ------------------------------------


async def render_one_by_one(pool: asyncpg.Pool) -> list[dict[str, Any]]:
    page = []
    for customer in await pool.fetch(PAGE):
        orders = await pool.fetch(
            f"SELECT * FROM {SCHEMA}.orders WHERE customer_id = $1 ORDER BY id", customer["id"]
        )
        lines = []
        for order in orders:
            product = await pool.fetchrow(
                f"SELECT id, title, price FROM {SCHEMA}.products WHERE id = $1",
                order["product_id"],
            )
            lines.append((product["title"], order["quantity"], product["price"]))
        page.append({"customer": customer["name"], "lines": lines})
    return page


# -- the batched version: the same shape of code, one query per relation -------------------------


POOL: asyncpg.Pool | None = None


def orders_loader() -> DataLoader[int, list[asyncpg.Record]]:
    """One loader per request (``scoped`` calls this on first use within the request)."""
    assert POOL is not None
    return DataLoader(ORDERS.asyncpg(POOL), max_batch_size=500)


def products_loader() -> DataLoader[int, asyncpg.Record | None]:
    assert POOL is not None
    return DataLoader(PRODUCTS.asyncpg(POOL))


async def customer_view(customer: asyncpg.Record) -> dict[str, Any]:
    """Renders one customer: called for every customer of the page, concurrently."""
    orders = await scoped(orders_loader).load(customer["id"])
    products = await scoped(products_loader).load_many([o["product_id"] for o in orders])
    lines = []
    for order, product in zip(orders, products, strict=True):
        assert product is not None  # orders.product_id is a foreign key
        lines.append((product["title"], order["quantity"], product["price"]))
    return {"customer": customer["name"], "lines": lines}


async def render_batched(pool: asyncpg.Pool) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    with request_scope():
        page = await pool.fetch(PAGE)
        views = await asyncio.gather(*(customer_view(customer) for customer in page))
        stats = {"orders": scoped(orders_loader).stats, "products": scoped(products_loader).stats}
    return list(views), stats


async def main(dsn: str) -> None:
    global POOL
    counter = QueryCounter()
    setup = await asyncpg.connect(dsn)
    try:
        await setup.execute(SETUP)
        async with asyncpg.create_pool(dsn, min_size=2, max_size=4, init=counter.attach) as pool:
            POOL = pool
            counter.count = 0
            slow = await render_one_by_one(pool)
            one_by_one = counter.count

            counter.count = 0
            fast, stats = await render_batched(pool)
            batched = counter.count

        assert fast == slow, "the batched page differs from the one loaded row by row"
        lines = sum(len(view["lines"]) for view in fast)
        print(f"page: {len(fast)} customers, {lines} order lines")
        print(f"one by one:      {one_by_one} queries")
        print(f"with DataLoader: {batched} queries (1 for the page, then the batches)")
        for name, loader_stats in stats.items():
            print(
                f"  {name} loader: {loader_stats.loads} loads in {loader_stats.batches} "
                f"batch(es), {loader_stats.keys_dispatched} distinct keys"
            )
        print(f"batch queries: {batched - 1}")
        print(f"  orders batch:   {ORDERS.text()}")
        print(f"  products batch: {PRODUCTS.text()}")
    finally:
        await setup.execute(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE")
        await setup.close()


if __name__ == "__main__":
    asyncio.run(
        main(sys.argv[1] if len(sys.argv) > 1 else os.environ.get("PGPILOT_DSN", DEFAULT_DSN))
    )
