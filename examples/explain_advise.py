"""EXPLAIN analyzer and index advisor: a slow query, what makes it slow, the index that fixes it.

The script fills an ``orders`` table (100,000 rows, 2,000 customers, no index but the primary
key) and looks at "a customer's 10 latest orders":

1. it runs ``EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON)`` itself and hands the plan to
   ``pgpilot.explain.analyze_plan``: the report names the Seq Scan that throws away almost every
   row, with a fix;
2. ``pgpilot.explain.advisor.advise`` (what ``pgpilot advise "SELECT ..." --dsn ...`` prints)
   builds index candidates from the statement and proves each with a HypoPG hypothetical index
   (or, without HypoPG, by building it inside BEGIN ... ROLLBACK): the recommended index is on
   ``(customer_id, created_at)``;
3. it creates that index and runs ``pgpilot explain "SELECT ..." --dsn ...``: exit status 0, no
   finding left.

    python examples/explain_advise.py [DSN]

DSN: default ``$PGPILOT_DSN``, else postgresql://postgres@127.0.0.1:5432/test. The table lives
in a schema of its own, dropped at the end.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from typing import Any

import psycopg

from pgpilot.explain import analyze_plan
from pgpilot.explain.advisor import advise

DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/test"


def setup(conn: psycopg.Connection[Any], schema: str) -> None:
    conn.execute(f"CREATE SCHEMA {schema}")
    conn.execute(
        f"""CREATE TABLE {schema}.orders (
            id int PRIMARY KEY,
            customer_id int NOT NULL,
            status text NOT NULL,
            total numeric(10, 2) NOT NULL,
            created_at timestamptz NOT NULL
        )"""
    )
    conn.execute(
        f"""INSERT INTO {schema}.orders
            SELECT g, (g * 7919) % 2000 + 1,
                   (ARRAY['new', 'paid', 'shipped', 'done'])[g % 4 + 1],
                   (g % 500) + 0.99,
                   timestamptz '2025-01-01' + g * interval '5 minutes'
            FROM generate_series(1, 100000) g"""
    )
    conn.execute(f"ANALYZE {schema}.orders")


def main(dsn: str) -> None:
    schema = f"pgpilot_example_explain_{uuid.uuid4().hex[:8]}"
    sql = (
        f"SELECT id, status, total, created_at FROM {schema}.orders "
        "WHERE customer_id = 42 ORDER BY created_at DESC LIMIT 10"
    )
    with psycopg.connect(dsn, autocommit=True) as conn:
        setup(conn, schema)
        try:
            # 1. The Python API on an EXPLAIN ANALYZE the application ran itself.
            row = conn.execute(f"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {sql}").fetchone()
            assert row is not None
            report = analyze_plan(json.dumps(row[0]), sql=sql)
            print("== pgpilot.explain.analyze_plan")
            print(report.render())
            print(
                "explain findings:",
                ", ".join(f"{f.rule} ({f.severity})" for f in report.findings) or "none",
            )

            # 2. The advisor: candidates proven on the database, nothing left behind.
            advice = advise(dsn, sql)
            if advice.validation == "none":  # no HypoPG on this server: build them for real
                advice = advise(dsn, sql, validate="real")
            print()
            print(f"== pgpilot advise (validated with {advice.validation})")
            print(advice.render())
            # The statements as --json gives them: CREATE INDEX CONCURRENTLY name ON ... (...);
            recommended = advice.to_dict()["recommendations"]
            if not recommended:
                raise SystemExit("the advisor recommended no index")
            print(f"recommended: {recommended[0]}")

            # 3. Apply it, and ask the command line again.
            conn.execute(recommended[0])
            conn.execute(f"ANALYZE {schema}.orders")
            print()
            print(f'== pgpilot explain "{sql}" --dsn ...')
            after = subprocess.run(
                [sys.executable, "-m", "pgpilot", "explain", sql, "--dsn", dsn],
                capture_output=True,
                text=True,
                timeout=120,
            )
            print(after.stdout + after.stderr)
            verdict = {0: "no finding", 1: "findings", 2: "error"}.get(after.returncode, "?")
            print(f"after the index: pgpilot explain exit status {after.returncode} ({verdict})")
        finally:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else os.environ.get("PGPILOT_DSN", DEFAULT_DSN))
