"""N+1 at the wire (proxy/wire_nplusone.py): SHOW NPLUSONE, the log line, the metric, the
sqlcommenter origin, with the fast path on and off."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
from tests.proxy.conftest import RunningProxy, wait_until
from tests.proxy.test_metrics import scrape

from pgpilot.embedded import free_port
from pgpilot.proxy.wire_nplusone import origin_of

COMMENT = "/*controller='orders',action='index',traceparent='00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01'*/"  # noqa: E501


def show_nplusone(proxy: RunningProxy) -> list[dict[str, Any]]:
    with psycopg.connect(proxy.dsn(dbname="pgbouncer"), autocommit=True) as console:
        cur = console.execute("SHOW NPLUSONE")
        names = [d.name for d in cur.description or ()]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


def test_origin_from_a_sqlcommenter_comment() -> None:
    assert origin_of(f"select 1 {COMMENT}") == "controller='orders',action='index'"
    assert origin_of("select 1 /*route='%2Fapi%2Forders'*/") == "route='/api/orders'"
    assert origin_of("select 1 /* just a note */") == ""
    assert origin_of("select 1") == ""


@pytest.fixture
def items(pg_dsn: str) -> None:
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("create table if not exists nplus_items (id int primary key, name text)")
        conn.execute("insert into nplus_items select g, 'item ' || g from generate_series(1, 50) g"
                     " on conflict do nothing")


def loop(proxy: RunningProxy, n: int, *, literal: bool = False, same: bool = False,
         gap: float = 0.0, app: str = "shop") -> None:
    cursor_factory = psycopg.ClientCursor if literal else psycopg.Cursor
    with psycopg.connect(proxy.dsn(), autocommit=True, application_name=app,
                         prepare_threshold=None, cursor_factory=cursor_factory) as conn:
        for i in range(n):
            conn.execute(f"select name from nplus_items where id = %s {COMMENT}",
                         [1 if same else i + 1]).fetchall()
            if gap:
                time.sleep(gap)


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "python"])
@pytest.mark.parametrize("literal", [False, True], ids=["bound", "literal"])
def test_a_loop_is_reported_once_with_its_fix(proxy_factory: Callable[..., RunningProxy],
                                              items: None, caplog: pytest.LogCaptureFixture,
                                              fast: bool, literal: bool) -> None:
    port = free_port()
    proxy = proxy_factory(fast_path=int(fast), metrics_port=port, nplusone_threshold=5)
    caplog.set_level(logging.WARNING, logger="pgpilot.proxy")
    loop(proxy, 3, literal=literal)  # below the threshold: no loop
    time.sleep(0.3)  # a gap longer than nplusone_window ends the burst
    proxy.call(lambda: proxy.pooler.query_stats.tick())  # the engine learns the shapes
    assert show_nplusone(proxy) == []
    loop(proxy, 8, literal=literal)
    time.sleep(0.3)
    loop(proxy, 12, literal=literal)
    time.sleep(0.3)
    proxy.call(lambda: proxy.pooler.query_stats.tick())
    rows = wait_until(lambda: (r := show_nplusone(proxy)) and r[0]["bursts"] == 2 and r)
    assert len(rows) == 1
    row = rows[0]
    assert (row["database"], row["user"], row["application_name"]) == ("test", "postgres", "shop")
    assert row["origin"] == "controller='orders',action='index'"
    assert row["max_n"] == 12
    assert "id = ANY(:ids)" in row["suggestion"]
    assert row["query"].startswith("select name from nplus_items where id = $1"), row["query"]
    engine_loops = proxy.call(lambda: proxy.pooler.query_stats.nplusone.engine_loops)
    assert engine_loops == (2 if fast else 0)  # the fast path counted them itself
    lines = [r.getMessage() for r in caplog.records if "N+1 at the wire" in r.getMessage()]
    assert len(lines) == 1 and "application_name=shop" in lines[0]  # once per (shape, app)
    assert scrape(port).get("pgpilot_nplusone_bursts_total", database="test", user="postgres",
                            application_name="shop", fingerprint=row["fingerprint"]) == 2


@pytest.mark.parametrize("literal", [False, True], ids=["bound", "literal"])
def test_the_first_loop_of_a_shape_never_seen_is_counted_by_the_fast_path(
        proxy_factory: Callable[..., RunningProxy], items: None, literal: bool) -> None:
    """The engine learns a key's shape from Python about once a second; a loop of a shape it
    has not been told yet (a new request's first queries) is counted by its key meanwhile,
    and Python names its shape when it takes the event. Before, the engine skipped statements
    of unknown shape: this loop, run before any fold, was not reported."""
    proxy = proxy_factory(fast_path=1, nplusone_threshold=5)
    loop(proxy, 8, literal=literal)
    time.sleep(0.3)  # the burst ends
    loop(proxy, 1, literal=literal)  # the next statement after the gap closes it in the engine
    proxy.call(lambda: proxy.pooler.query_stats.tick())
    rows = wait_until(lambda: (r := show_nplusone(proxy)) and r)
    assert len(rows) == 1
    assert (rows[0]["bursts"], rows[0]["max_n"], rows[0]["executions"]) == (1, 8, 8)
    assert rows[0]["query"].startswith("select name from nplus_items where id = $1")
    assert proxy.call(lambda: proxy.pooler.query_stats.nplusone.engine_loops) == 1


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "python"])
def test_repeats_gaps_and_settings_are_not_loops(proxy_factory: Callable[..., RunningProxy],
                                                 items: None, fast: bool) -> None:
    proxy = proxy_factory(fast_path=int(fast), nplusone_window=0.05)
    loop(proxy, 2)
    proxy.call(lambda: proxy.pooler.query_stats.tick())
    loop(proxy, 10, same=True)  # the same parameters: a duplicate, not a loop over items
    loop(proxy, 8, gap=0.15)  # quiet between statements: separate bursts
    time.sleep(0.2)
    proxy.call(lambda: proxy.pooler.query_stats.tick())
    assert show_nplusone(proxy) == []
    off = proxy_factory(fast_path=int(fast), nplusone_threshold=0)
    loop(off, 2)
    off.call(lambda: off.pooler.query_stats.tick())
    loop(off, 10)
    time.sleep(0.2)
    off.call(lambda: off.pooler.query_stats.tick())
    assert show_nplusone(off) == []
