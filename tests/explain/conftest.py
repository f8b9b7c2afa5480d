"""Fixtures for the EXPLAIN analyzer tests: the ``pgp_explain`` schema with small, shaped data.

Each table is built to provoke one kind of plan deterministically (planner settings are set
per statement with SET LOCAL, inside a transaction that is rolled back). Tables are small so
the whole suite stays fast; none of the tests asserts a time.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

SCHEMA = "pgp_explain"

BUILD = f"""
DROP SCHEMA IF EXISTS {SCHEMA} CASCADE;
CREATE SCHEMA {SCHEMA};
SET search_path = {SCHEMA};
CREATE TABLE customers (id int PRIMARY KEY, name text NOT NULL, region text NOT NULL);
INSERT INTO customers SELECT g, 'customer ' || g, 'r' || (g % 5) FROM generate_series(1, 2000) g;
CREATE TABLE regions (code text, label text);
INSERT INTO regions SELECT 'r' || g, 'region ' || g FROM generate_series(0, 4) g;
CREATE TABLE tiers (lo int, hi int, label text);
INSERT INTO tiers SELECT g * 100, g * 100 + 99, 'tier ' || g FROM generate_series(0, 19) g;
CREATE TABLE orders (
    id int PRIMARY KEY, customer_id int NOT NULL, status text NOT NULL,
    amount numeric NOT NULL, created date NOT NULL, note text
);
INSERT INTO orders
SELECT g, g % 2000 + 1, CASE WHEN g % 100 = 0 THEN 'open' ELSE 'done' END, g % 997,
       date '2024-01-01' + g % 300, 'note ' || g
FROM generate_series(1, 50000) g;
CREATE INDEX orders_created_idx ON orders (created);
CREATE TABLE payments (id int PRIMARY KEY, customer_id int NOT NULL, amount numeric NOT NULL);
INSERT INTO payments SELECT g, g % 2000 + 1, g % 500 FROM generate_series(1, 5000) g;
-- a and b always equal: independent-column estimates are 100x too low
CREATE TABLE correlated (a int NOT NULL, b int NOT NULL, pad text);
INSERT INTO correlated SELECT g % 100, g % 100, 'x' FROM generate_series(1, 20000) g;
-- never vacuumed, so its visibility map is empty and index-only scans visit the heap
CREATE TABLE unvacuumed (id int, v int) WITH (autovacuum_enabled = false);
INSERT INTO unvacuumed SELECT g, g FROM generate_series(1, 20000) g;
CREATE INDEX unvacuumed_v_idx ON unvacuumed (v);
-- spread over ~1500 pages so a 64kB bitmap has to go lossy
CREATE TABLE events (id int, k int, payload text) WITH (autovacuum_enabled = false);
INSERT INTO events SELECT g, (g * 7919) % 100, repeat('p', 60) FROM generate_series(1, 120000) g;
CREATE INDEX events_k_idx ON events (k);
ANALYZE customers, regions, tiers, orders, payments, correlated, events;
ANALYZE unvacuumed;
"""


@pytest.fixture(scope="session")
def explain_dsn(pg_dsn: str) -> Iterator[str]:
    """A DSN whose search_path is the freshly built ``pgp_explain`` schema."""
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(BUILD.encode())
    yield make_conninfo(pg_dsn, options=f"-c search_path={SCHEMA},public")
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE".encode())


ExplainFn = Callable[..., str]


@pytest.fixture(scope="session")
def explain(explain_dsn: str) -> ExplainFn:
    """``explain(sql, fmt="json"|"text", settings=[...], analyze=True)`` -> EXPLAIN output."""

    def run(sql: str, fmt: str = "json", settings: tuple[str, ...] | list[str] = (),
            analyze: bool = True) -> str:
        options = ["ANALYZE, BUFFERS" if analyze else "COSTS"]
        if fmt == "json":
            options.append("FORMAT JSON")
        with psycopg.connect(explain_dsn) as conn:
            for setting in settings:
                conn.execute(f"SET LOCAL {setting}".encode())
            rows = conn.execute(f"EXPLAIN ({', '.join(options)}) {sql}".encode()).fetchall()
            conn.rollback()
        if fmt == "json":
            import json

            return json.dumps(rows[0][0])
        return "\n".join(str(r[0]) for r in rows)

    return run


@pytest.fixture(scope="session")
def psql_explain(explain_dsn: str) -> ExplainFn:
    """Like ``explain`` but through psql, so the text carries psql's header, ``+`` and footer."""

    def run(sql: str, fmt: str = "text", settings: tuple[str, ...] | list[str] = ()) -> str:
        options = "ANALYZE, BUFFERS" + (", FORMAT JSON" if fmt == "json" else "")
        script = "".join(f"SET {s};\n" for s in settings) + f"EXPLAIN ({options}) {sql};\n"
        done = subprocess.run(
            ["psql", "-X", "-q", "-d", explain_dsn, "-v", "ON_ERROR_STOP=1"],
            input=script, capture_output=True, text=True, check=True, timeout=60,
        )
        return done.stdout

    return run
