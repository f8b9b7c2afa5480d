"""Fingerprints, normalized text and statement shapes (pglast), checked against PostgreSQL."""

from __future__ import annotations

import ast as python_ast
from pathlib import Path

import psycopg
import pytest

import pgpilot.insight.detector
from pgpilot.insight.fingerprint import (
    COMMAND_OTHER,
    COMMAND_READ,
    COMMAND_WRITE,
    batch_rewrite,
    describe,
    fingerprint,
    normalize,
    to_dollar_params,
)


def test_values_do_not_change_the_fingerprint() -> None:
    a = fingerprint("SELECT * FROM orders WHERE customer_id = 1")
    assert a == fingerprint("select *  from orders where customer_id = 42")
    assert a == fingerprint("SELECT * FROM orders WHERE customer_id = $1")
    assert a == fingerprint("SELECT * FROM orders WHERE customer_id = %s")
    assert a == fingerprint("SELECT * FROM orders WHERE customer_id = %(customer_id_1)s")
    assert fingerprint("SELECT * FROM t WHERE a IN (1, 2)") == fingerprint(
        "SELECT * FROM t WHERE a IN (1, 2, 3, 4)"
    )


def test_different_statements_have_different_fingerprints() -> None:
    prints = {
        fingerprint("SELECT * FROM orders WHERE customer_id = $1"),
        fingerprint("SELECT * FROM orders WHERE id = $1"),
        fingerprint("SELECT * FROM items WHERE customer_id = $1"),
        fingerprint("DELETE FROM orders WHERE customer_id = $1"),
    }
    assert len(prints) == 4


def test_psycopg_placeholders_become_dollar_params() -> None:
    assert to_dollar_params("a = %(x)s AND b = %(y)s OR c = %(x)s") == "a = $1 AND b = $2 OR c = $1"
    assert to_dollar_params("a = %s AND b = %b") == "a = $1 AND b = $2"
    assert to_dollar_params("a LIKE 'x%s' AND b = %s AND c LIKE 'y%%'") == (
        "a LIKE 'x%s' AND b = $1 AND c LIKE 'y%%'"
    )
    assert to_dollar_params("a % 2 = %s") == "a % 2 = $1"
    assert to_dollar_params("a %% 2") == "a % 2"
    assert to_dollar_params("SELECT $1") == "SELECT $1"


def test_normalized_text_replaces_constants() -> None:
    assert normalize("SELECT * FROM t WHERE a = 5 AND b = 'x'") == (
        "SELECT * FROM t WHERE a = $1 AND b = $2"
    )


@pytest.mark.parametrize(
    ("sql", "command"),
    [
        ("SELECT * FROM orders", COMMAND_READ),
        ("WITH x AS (SELECT 1) SELECT * FROM orders JOIN x ON true", COMMAND_READ),
        ("SELECT a FROM t1 UNION SELECT a FROM t2", COMMAND_READ),
        ("INSERT INTO orders (id) VALUES ($1)", COMMAND_WRITE),
        ("UPDATE orders SET total = $1 WHERE id = $2", COMMAND_WRITE),
        ("DELETE FROM orders WHERE id = $1", COMMAND_WRITE),
        ("SELECT 1", COMMAND_OTHER),
        ("SELECT nextval('orders_id_seq')", COMMAND_OTHER),
        ("BEGIN", COMMAND_OTHER),
        ("SAVEPOINT sa_savepoint_1", COMMAND_OTHER),
        ("SET search_path = x", COMMAND_OTHER),
    ],
)
def test_commands_are_classified(sql: str, command: str) -> None:
    assert describe(sql).command == command


def test_tables_and_filter_columns() -> None:
    shape = describe(
        "SELECT o.id FROM orders o JOIN items i ON i.order_id = o.id "
        "WHERE o.customer_id = %(c)s AND $2 = o.status AND o.total > $3"
    )
    assert shape.tables == ("orders", "items")
    assert shape.filter_columns == ("customer_id", "status")
    assert shape.parsed


def test_text_that_does_not_parse_still_groups() -> None:
    first = describe("SELEC oops FROM t")
    assert not first.parsed
    assert first.fingerprint.startswith("text:")
    assert first.fingerprint == describe("SELEC   oops from t").fingerprint
    assert first.fingerprint != describe("SELEC other FROM t").fingerprint


def test_describe_is_cached() -> None:
    sql = "SELECT * FROM cached_table_for_this_test WHERE id = $1"
    before = describe.cache_info()
    describe(sql)
    describe(sql)
    after = describe.cache_info()
    assert after.hits - before.hits >= 1
    assert after.misses - before.misses == 1


def test_batch_rewrite_runs_on_postgresql_and_returns_the_loops_rows(pg_dsn: str) -> None:
    loop_sql = "SELECT id, customer_id FROM pg_temp.orders WHERE customer_id = %(cid)s"
    rewrite = batch_rewrite(loop_sql)
    assert rewrite is not None
    column, batch_sql = rewrite
    assert column == "customer_id"
    assert batch_sql == "SELECT id, customer_id FROM pg_temp.orders WHERE customer_id = ANY(:ids)"
    with psycopg.connect(pg_dsn) as conn:
        conn.execute("CREATE TEMP TABLE orders (id int, customer_id int)")
        conn.execute("INSERT INTO orders SELECT g, g % 4 FROM generate_series(1, 20) AS g")
        looped = sorted(
            row for cid in (1, 2, 3) for row in conn.execute(loop_sql, {"cid": cid}).fetchall()
        )
        batched = sorted(
            conn.execute(batch_sql.replace(":ids", "%(ids)s"), {"ids": [1, 2, 3]}).fetchall()
        )
    assert batched == looped
    assert len(batched) == 15


def test_batch_rewrite_needs_an_equality_on_a_parameter() -> None:
    assert batch_rewrite("SELECT * FROM t WHERE a > $1") is None
    assert batch_rewrite("UPDATE t SET a = 1 WHERE id = $1") is None
    assert batch_rewrite("SELECT * FROM t") is None


def test_detector_imports_nothing_of_pgpilot_outside_insight() -> None:
    source = Path(pgpilot.insight.detector.__file__).read_text()
    imported: list[str] = []
    for node in python_ast.walk(python_ast.parse(source)):
        if isinstance(node, python_ast.Import):
            imported.extend(alias.name for alias in node.names)
        elif isinstance(node, python_ast.ImportFrom):
            imported.append(node.module or "")
    assert imported, "the parse found the imports"
    outside = [
        name
        for name in imported
        if name.startswith("pgpilot") and not name.startswith("pgpilot.insight.")
    ]
    assert outside == []
    assert "pgpilot.insight.shape" in imported  # the statement rules read the text's shape
