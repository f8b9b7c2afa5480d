"""Slow queries, explained (proxy/slow.py): SHOW SLOW, GET /slow, EXPLAIN on a separate
connection, ANALYZE only inside BEGIN ... ROLLBACK, parameter values kept out."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from tests.proxy.conftest import RunningProxy, wait_until

from pgpilot.embedded import free_port
from pgpilot.proxy.slow import mask, parse_bind

SLOW_READ = ("select name, (select 1 from pg_sleep(0.12)) as s from slow_items "
             "where id = %s and name <> 'none'")


@pytest.fixture
def slow_items(pg_dsn: str) -> None:
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("drop table if exists slow_items")
        conn.execute("create table slow_items (id int, name text)")  # no index: a seq scan
        conn.execute("insert into slow_items select g, 'item ' || g "
                     "from generate_series(1, 2000) g")
        conn.execute("analyze slow_items")


def show_slow(proxy: RunningProxy) -> list[dict[str, Any]]:
    with psycopg.connect(proxy.dsn(dbname="pgbouncer"), autocommit=True) as console:
        cur = console.execute("SHOW SLOW")
        names = [d.name for d in cur.description or ()]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


def slow_document(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/slow", timeout=10) as response:
        assert response.headers["Content-Type"] == "application/json"
        return json.loads(response.read())  # type: ignore[no-any-return]


def test_mask_and_bind_parsing() -> None:
    assert mask("Filter: ((name)::text = 'secret'::text) AND (id = 42)") == \
        "Filter: ((name)::text = '?'::text) AND (id = ?)"
    body = (b"\x00\x00" + b"\x00\x01\x00\x00" + b"\x00\x02" + b"\x00\x00\x00\x02" + b"42"
            + b"\xff\xff\xff\xff" + b"\x00\x00")
    assert parse_bind(body, [23]) == ([b"42", None], [23, 0], [0, 0])
    assert parse_bind(b"\x00", []) is None


def strings_in(document: Any) -> Iterator[str]:
    """Every string of a JSON document, keys included."""
    if isinstance(document, str):
        yield document
    elif isinstance(document, dict):
        for key, value in document.items():
            yield key
            yield from strings_in(value)
    elif isinstance(document, list):
        for value in document:
            yield from strings_in(value)


@pytest.mark.parametrize(("fast", "literal"), [(False, False), (True, True), (False, True)],
                         ids=["python-bound", "fast-literal", "python-literal"])
def test_a_slow_read_is_explained_without_its_values(
        proxy_factory: Callable[..., RunningProxy], slow_items: None, fast: bool,
        literal: bool) -> None:
    port = free_port()
    proxy = proxy_factory(fast_path=int(fast), metrics_port=port, slow_query_threshold=0.1)
    cursor = psycopg.ClientCursor if literal else psycopg.Cursor
    with psycopg.connect(proxy.dsn(), autocommit=True, prepare_threshold=None,
                         cursor_factory=cursor) as conn:
        conn.execute("select name from slow_items where id = %s", [7]).fetchall()  # quick
        assert conn.execute(SLOW_READ, [1717]).fetchall() == [("item 1717", 1)]
    proxy.call(lambda: proxy.pooler.query_stats.tick())
    rows = wait_until(lambda: (r := show_slow(proxy)) and r[0]["explained"] == 1 and r,
                      timeout=20)
    assert len(rows) == 1  # the quick statement is not there
    row = rows[0]
    assert row["slow_calls"] == 1 and float(row["max_ms"]) >= 120
    assert "slow_items" in row["query"] and "1717" not in row["query"]
    assert "seq_scan" in row["findings"] or row["findings"] == "", row
    # No parameter value in any text of the document (its numbers are timings, which may
    # contain the digits by chance: 122.3575180001717 ms did once).
    assert not [t for t in strings_in(slow_document(port)) if "1717" in t]
    report = slow_document(port)["slow"][0]["reports"][0]
    assert report["analyzed"] is False and report["with_parameters"] is (not literal)
    assert "plan" not in report


def test_log_parameters_keeps_the_plan(proxy_factory: Callable[..., RunningProxy],
                                       slow_items: None) -> None:
    port = free_port()
    proxy = proxy_factory(fast_path=0, metrics_port=port, slow_query_threshold=0.1,
                          log_parameters=1)
    with psycopg.connect(proxy.dsn(), autocommit=True, prepare_threshold=None) as conn:
        conn.execute(SLOW_READ, [1717]).fetchall()
    wait_until(lambda: show_slow(proxy)[0]["explained"] == 1, timeout=20)
    report = slow_document(port)["slow"][0]["reports"][0]
    assert "1717" in json.dumps(report["plan"])  # the plan, with the value it ran with


def test_analyze_of_a_write_is_rolled_back(proxy_factory: Callable[..., RunningProxy],
                                           slow_items: None, pg_dsn: str) -> None:
    proxy = proxy_factory(fast_path=0, slow_query_threshold=0.1, slow_query_explain_analyze=1)
    with psycopg.connect(proxy.dsn(), autocommit=True, prepare_threshold=None) as conn:
        conn.execute("update slow_items set name = name || '+' where id = %s "
                     "and (select true from pg_sleep(0.12))", [5])
    wait_until(lambda: (r := show_slow(proxy)) and r[0]["explained"] == 1, timeout=20)
    with psycopg.connect(pg_dsn) as direct:
        assert direct.execute("select name from slow_items where id = 5").fetchone() == \
            ("item 5+",)  # the client's update once; the EXPLAIN ANALYZE's was rolled back


def test_off_by_default_and_statements_it_cannot_explain(
        proxy_factory: Callable[..., RunningProxy], slow_items: None) -> None:
    proxy = proxy_factory()
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        conn.execute(SLOW_READ, [3]).fetchall()
    proxy.call(lambda: proxy.pooler.query_stats.tick())
    assert show_slow(proxy) == []
    fast = proxy_factory(slow_query_threshold=0.1)
    with psycopg.connect(fast.dsn(), autocommit=True, prepare_threshold=None) as conn:
        conn.execute(SLOW_READ, [3]).fetchall()  # $1 on the fast path, PostgreSQL 15
        conn.execute("select pg_sleep(0.12)")  # reads no table: nothing to explain
    fast.call(lambda: fast.pooler.query_stats.tick())
    rows = wait_until(lambda: (r := show_slow(fast)) and len(r) == 2 and all(
        x["note"] for x in r) and r, timeout=20)
    notes = sorted(row["note"] for row in rows)
    assert any("not a single read or write" in n for n in notes)
    assert any("GENERIC_PLAN" in n for n in notes)  # PostgreSQL 15: parameters needed
