"""Per-query statistics (proxy/stats.py): SHOW QUERIES, /queries, pgpilot_query_* metrics, with
the fast path on and off, in every pool mode and with workers = N."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import Any

import psycopg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.proxy.conftest import RunningProxy, wait_until
from tests.proxy.test_metrics import scrape
from tests.proxy.test_workers import run_workers

from pgpilot.embedded import free_port
from pgpilot.proxy import fastpath
from pgpilot.proxy.stats import (
    MAX_BUCKET,
    LatencySketch,
    QueryEntry,
    bucket_of,
    bucket_value,
)

SECRET = "hunter2-do-not-log"


def show_queries(proxy: RunningProxy) -> list[dict[str, Any]]:
    with psycopg.connect(proxy.dsn(dbname="pgbouncer"), autocommit=True) as console:
        cur = console.execute("SHOW QUERIES")
        names = [d.name for d in cur.description or ()]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


def by_query(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {row["query"]: row for row in rows}


# -- the engine's statement keys -----------------------------------------------------------
def test_engine_text_keys_ignore_literal_values_only() -> None:
    engine = pytest.importorskip("pgpilot.proxy._fastpath")

    def key(text: bytes) -> int:
        return int(engine.text_key(text)[0])

    assert key(b"select * from t where a = 1") == key(b"select * from t where a = 22.5e3")
    assert key(b"select 'x'") == key(b"select 'it''s'")
    assert key(b'select "q1" = 1') == key(b'select "q1" = 2')
    assert key(b"select 1 /* trace=0123456789abcdef */") == key(
        b"select 2 /* trace=fedcba9876543210 */")
    assert key(b"select 1 /* a */") != key(b"select 1 /* b */")
    assert key(b"select a from b") != key(b"select a from c")
    assert key(b"select 1 from b") != key(b"select 1, 2 from b")
    # Plain text is skipped eight bytes at a time: a digit that ends an identifier is part of
    # it, and a number is a literal, wherever they fall in the word.
    for pad in range(1, 12):
        name = b"x" * pad
        assert key(b"select " + name + b"1 from t") != key(b"select " + name + b"2 from t")
        assert key(b"select " + name + b" 1 from t") == key(b"select " + name + b" 22 from t")
        assert key(b"select " + name + b" 'a' from \"q1\" where 3") == key(
            b"select " + name + b" 'bb' from \"q1\" where 4.5")
    # The raw hash is the text's own: different values, different parameters.
    assert engine.text_key(b"select 1")[1] != engine.text_key(b"select 2")[1]


# What the engine's key keeps of a text (engine/querystats.c, qs_text_key), written plainly, byte
# by byte: the bytes taken as they are, and each literal value (a string, a number outside a
# name, a run of 8 or more hex digits in a comment) as one marker.
_DIGITS = frozenset(b"0123456789")
_NAME = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_$0123456789") | frozenset(
    range(0x80, 0x100))
_HEXISH = frozenset(b"0123456789abcdefABCDEF-")


def reference_tokens(s: bytes) -> list[tuple[str, bytes]]:
    out: list[tuple[str, bytes]] = []
    i, n = 0, len(s)
    while i < n:
        ch = s[i]
        if ch == ord("/") and i + 1 < n and s[i + 1] == ord("*"):  # a comment
            end = s.find(b"*/", i + 2)
            stop = end + 2 if end >= 0 else n
            while i < stop:
                run = 0
                while i + run < stop and s[i + run] in _HEXISH:
                    run += 1
                step = run or 1
                out += [("literal", s[i:i + run])] if run >= 8 else [
                    ("text", s[k:k + 1]) for k in range(i, i + step)]
                i += step
        elif ch == ord('"'):  # a quoted name, as it is
            close = s.find(b'"', i + 1)
            j = close + 1 if close >= 0 else n
            out += [("text", s[k:k + 1]) for k in range(i, j)]
            i = j
        elif ch == ord("'"):  # a string literal ('' inside it)
            j = i + 1
            while True:
                q = s.find(b"'", j)
                j = q if q >= 0 else n
                if j + 1 < n and s[j + 1] == ord("'"):
                    j += 2
                    continue
                break
            if j >= n:  # no end: the text as it is
                return [("raw", s)]
            out.append(("literal", s[i:j + 1]))
            i = j + 1
        elif ch in _DIGITS and not (i and s[i - 1] in _NAME):  # a number
            j = i
            while j < n and (s[j] in _DIGITS or s[j] == ord(".")):
                j += 1
            if j + 1 < n and s[j] in b"eE" and (s[j + 1] in _DIGITS or s[j + 1] in b"-+"):
                j += 2
                while j < n and s[j] in _DIGITS:
                    j += 1
            out.append(("literal", s[i:j]))
            i = j
        else:
            out.append(("text", s[i:i + 1]))
            i += 1
    return out


def reference_shape(s: bytes) -> list[tuple[str, bytes]]:
    return [(kind, b"" if kind == "literal" else value) for kind, value in reference_tokens(s)]


def with_other_values(s: bytes) -> bytes:
    """``s`` with other literal values of the same form (each digit a 7, each letter of a
    string or hex run a 0, quotes, '.', 'e', signs and '-' kept): the same shape."""
    tokens = reference_tokens(s)
    if tokens and tokens[0][0] == "raw":
        return s
    out = b""
    for kind, value in tokens:
        if kind == "literal":
            if value[:1] == b"'":
                value = bytes(c if c == ord("'") else ord("0") for c in value)
            else:
                value = bytes(ord("7") if c in _DIGITS else c for c in value)
        out += value
    return out


_PIECES = [b"select ", b"t1", b"x", b"e", b"E", b"12", b"3.5e+2", b"9", b".", b"-", b"+", b",",
           b" ", b"\n", b"'a''b'", b"'", b'"q1"', b'"', b"/*", b"*/", b"/", b"0123456789abcdef",
           b"deadbeef-", b"$1", b"_", b"\xc3\xa9", b"("]
texts = st.lists(st.sampled_from(_PIECES), max_size=24).map(b"".join)


@settings(max_examples=400, deadline=None)
@given(texts, texts)
def test_engine_text_keys_match_the_reference(a: bytes, b: bytes) -> None:
    """The engine's key (it skips plain bytes a word at a time) tells two texts apart exactly
    when the byte-by-byte reference does, and its parameters hash tells two texts of one key
    apart exactly when their literal values differ."""
    engine = pytest.importorskip("pgpilot.proxy._fastpath")
    key_a, params_a = engine.text_key(a)
    key_b, params_b = engine.text_key(b)
    assert (key_a == key_b) == (reference_shape(a) == reference_shape(b))
    other = with_other_values(a)
    assert reference_shape(other) == reference_shape(a)
    key_other, params_other = engine.text_key(other)
    assert key_other == key_a
    assert (params_other == params_a) == (reference_tokens(other) == reference_tokens(a))
    if key_a == key_b:
        assert (params_a == params_b) == (reference_tokens(a) == reference_tokens(b))


# -- the sketch ------------------------------------------------------------------------------
def test_buckets_report_a_value_within_their_width() -> None:
    for seconds in (0.9e-6, 1e-6, 3.3e-6, 1e-4, 0.00123, 0.05, 0.2, 1.0, 7.5, 3600.0):
        index = bucket_of(seconds)
        assert 0 <= index <= MAX_BUCKET
        if seconds >= 1e-6:
            assert abs(bucket_value(index) - seconds) <= 0.0626 * seconds
    assert [bucket_of(x) for x in (1e-6, 2e-6, 4e-6)] == [1, 9, 17]  # 8 per power of two
    assert bucket_of(1e9) == MAX_BUCKET


def test_engine_buckets_are_the_sketchs() -> None:
    """The engine files a duration (integer nanoseconds) in the bucket stats.bucket_of gives
    it: 8 per power of two of microseconds, counted exactly at the edges."""
    engine = pytest.importorskip("pgpilot.proxy._fastpath")

    def exact(ns: int) -> int:  # bucket_of in rationals: no rounding at an edge
        if ns < 1000:
            return 0
        us = Fraction(ns, 1000)
        k = int(us).bit_length() - 1  # 2**k <= us < 2**(k + 1)
        return min(k * 8 + int((us / 2**k - 1) * 8) + 1, MAX_BUCKET)

    edges = [int(1000 * 2**k * (1 + j / 8)) for k in range(40) for j in range(8)]
    for ns in [0, 1, 999, 1000, 1001, 2250, 123_456, 10**12, 2**62, *edges,
               *(e - 1 for e in edges), *(e + 1 for e in edges)]:
        assert engine.bucket_of_ns(ns) == exact(ns), ns
    for seconds in (1.5e-6, 3.3e-6, 1e-4 * 1.03, 0.00123, 0.05 * 1.01, 0.2 * 1.01, 7.7, 5000.3):
        assert engine.bucket_of_ns(round(seconds * 1e9)) == bucket_of(seconds)


def test_sketch_quantiles_and_merge() -> None:
    fast, slow = LatencySketch(), LatencySketch()
    for _ in range(98):
        fast.add(0.001)
    for _ in range(2):
        slow.add(0.5)
    fast.merge(slow)
    assert fast.count == 100
    assert abs(fast.quantile(0.5) - 0.001) <= 0.0625 * 0.001
    assert abs(fast.quantile(0.99) - 0.5) <= 0.0625 * 0.5
    again = LatencySketch.from_json(json.loads(json.dumps(fast.to_json())))
    assert again.buckets == fast.buckets and again.count == 100
    assert LatencySketch().quantile(0.99) == 0.0


def test_entries_merge_and_round_trip() -> None:
    a = QueryEntry("db", "u", "fp", "select $1")
    a.calls, a.total, a.rows, a.first_seen, a.last_seen = 3, 0.3, 3, 10.0, 20.0
    a.note_error("23505")
    a.note_app("web", 3)
    b = QueryEntry.from_json(a.to_json())
    b.first_seen, b.last_seen = 5.0, 30.0
    a.merge(b)
    assert (a.calls, a.rows, a.errors, a.apps) == (6, 6, {"23505": 2}, {"web": 6})
    assert (a.first_seen, a.last_seen) == (5.0, 30.0)


# -- through the pooler ----------------------------------------------------------------------
MODES = [("transaction", True), ("transaction", False), ("session", True),
         ("statement", True), ("statement", False)]


@pytest.mark.parametrize(("mode", "fast"), MODES,
                         ids=[f"{m}-{'fast' if f else 'python'}" for m, f in MODES])
def test_show_queries_counts_what_clients_ran(proxy_factory: Callable[..., RunningProxy],
                                              mode: str, fast: bool) -> None:
    proxy = proxy_factory(pool_mode=mode, fast_path=int(fast), default_pool_size=2)
    with psycopg.connect(proxy.dsn(), autocommit=True, application_name="orders-svc",
                         prepare_threshold=None) as conn:
        for i in range(12):
            assert conn.execute("select %s::int as n", [i]).fetchone() == (i,)
        conn.execute(f"select length('{SECRET}')")
        assert len(conn.execute("select * from generate_series(1, 7)").fetchall()) == 7
        conn.execute("select pg_sleep(0.05)")
        for _ in range(3):
            with pytest.raises(psycopg.errors.DivisionByZero):
                conn.execute("select 1 / (0 * %s::int)", [1])
    # Named prepared statements (psycopg prepares from the first run with threshold 0).
    with psycopg.connect(proxy.dsn(), autocommit=True, application_name="batch-job",
                         prepare_threshold=0) as conn:
        for i in range(6):
            conn.execute("select %s::int + 100 as m", [i]).fetchone()
    rows = wait_until(lambda: (r := by_query(show_queries(proxy)))
                      .get("select $1::int + $2 as m", {}).get("calls") == 6 and r)
    simple = rows["select $1::int as n"]
    assert simple["calls"] == 12 and simple["rows"] == 12 and simple["errors"] == 0
    assert simple["database"] == "test" and simple["user"] == "postgres"
    assert simple["application_names"] == "orders-svc"
    assert simple["mean_ms"] * 12 == pytest.approx(simple["total_ms"], abs=Decimal("0.02"))
    assert simple["first_seen"] and simple["last_seen"]
    assert rows["select $1::int + $2 as m"]["application_names"] == "batch-job"
    assert rows["select * from generate_series($1, $2)"]["rows"] == 7
    failing = rows["select $2 / ($3 * $1::int)"]
    assert failing["calls"] == 3 and failing["errors"] == 3
    assert failing["errors_by_sqlstate"] == "22012:3"
    slept = rows["select pg_sleep($1)"]
    # Run time is at least the sleep (a lower bound: the statement cannot be quicker).
    assert slept["mean_ms"] >= 50 and slept["p99_ms"] >= 50 * 0.9375
    # The sample text has its constants stripped: no value a client sent is kept.
    assert all(SECRET not in str(row) for row in rows.values())
    assert "select length($1)" in rows
    ordered = [row["total_ms"] for row in show_queries(proxy)]
    assert ordered == sorted(ordered, reverse=True)
    engine_timed = proxy.call(lambda: proxy.pooler.query_stats.engine_statements)
    if fast and mode != "session" and fastpath.available():
        assert engine_timed >= 12  # the compiled fast path timed the steady state itself
    elif not fast:
        assert engine_timed == 0


@pytest.mark.skipif(not fastpath.available(), reason="needs the compiled fast path")
def test_named_statements_are_counted_across_the_engines_batches(
        proxy_factory: Callable[..., RunningProxy]) -> None:
    """The engine keeps where a named statement's counts go (its entry in the batch Python
    takes about once a second) per pool; a batch taken between two Binds of the statement
    must not lose or misfile the calls after it (the entry found before is gone then), nor
    its text. Batches are taken here after every fourth execution."""
    proxy = proxy_factory(fast_path=1, default_pool_size=2)
    with psycopg.connect(proxy.dsn(), autocommit=True, prepare_threshold=0) as conn:
        for _ in range(3):
            for i in range(4):
                assert conn.execute("select %s::int + 7 as k", [i]).fetchone() == (i + 7,)
            proxy.call(proxy.pooler.query_stats.fold_engine)
    row = wait_until(lambda: by_query(show_queries(proxy)).get("select $1::int + $2 as k"))
    assert row["calls"] == 12 and row["rows"] == 12 and row["errors"] == 0
    assert proxy.call(lambda: proxy.pooler.query_stats.engine_statements) >= 12


def test_statements_in_flight_when_the_engine_hands_back_are_counted(
        proxy_factory: Callable[..., RunningProxy]) -> None:
    # A DDL's CommandComplete makes the engine hand its client to Python (the catalog changed:
    # prepared.Catalog) with the DDL still in flight; Python times it to its answer. Before,
    # such statements were not counted at all on the fast path.
    from tests.proxy.conftest import read_types
    from tests.proxy.test_fastpath_prepared import login

    from pgpilot.wire import messages as m

    proxy = proxy_factory(default_pool_size=1, fast_path=1)
    with login(proxy) as sock:
        # In one write: a statement answered in the engine, then the DDL, then another.
        sock.sendall(m.query("select 1 as handback_probe")
                     + m.query("create table if not exists handback_t (a int)")
                     + m.query("select 2 as handback_probe"))
        for _ in range(3):
            assert read_types(sock)[-1] == "Z"
        sock.sendall(m.query("drop table handback_t"))
        assert read_types(sock)[-1] == "Z"
    with psycopg.connect(proxy.dsn(dbname="pgbouncer"), autocommit=True) as console:
        calls = {row[3]: row[4] for row in console.execute("SHOW QUERIES").fetchall()}
    assert calls.get("create table if not exists handback_t (a int)") == 1, calls
    assert calls.get("drop table handback_t") == 1, calls
    assert calls.get("select $1 as handback_probe") == 2, calls  # none lost, none twice


def test_pipelined_statements_are_each_timed(proxy_factory: Callable[..., RunningProxy]) -> None:
    proxy = proxy_factory(default_pool_size=1)
    with psycopg.connect(proxy.dsn(), autocommit=True, prepare_threshold=None) as conn, \
            conn.pipeline():
        for i in range(20):
            conn.execute("select %s::int * 2 as p", [i])
        for i in range(5):
            conn.execute("select %s::text || 'x' as q", [str(i)])
    rows = wait_until(lambda: (r := by_query(show_queries(proxy)))
                      .get("select $1::text || $2 as q", {}).get("calls") == 5 and r)
    assert rows["select $1::int * $2 as p"]["calls"] == 20


def test_setting_off_records_nothing(proxy_factory: Callable[..., RunningProxy]) -> None:
    proxy = proxy_factory(query_stats=0)
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        for i in range(5):
            conn.execute("select %s::int", [i])
    assert show_queries(proxy) == []
    assert proxy.call(lambda: proxy.pooler.query_stats.engine_statements) == 0


def test_table_is_bounded_and_the_rest_is_other(
        proxy_factory: Callable[..., RunningProxy]) -> None:
    proxy = proxy_factory(query_stats_max=3)
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        for shape in range(30):  # 30 fingerprints
            conn.execute("select 1" + " union all select 1" * shape)
    proxy.call(lambda: proxy.pooler.query_stats.tick())
    rows = show_queries(proxy)
    named = [row for row in rows if row["fingerprint"] != "other"]
    other = [row for row in rows if row["fingerprint"] == "other"]
    assert len(named) <= 3 and len(other) == 1
    assert sum(row["calls"] for row in rows) == 30  # nothing lost, only folded


def test_metrics_and_json_endpoint(proxy_factory: Callable[..., RunningProxy]) -> None:
    port = free_port()
    proxy = proxy_factory(metrics_port=port, query_stats_metrics=2)
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        for i in range(4):
            conn.execute("select %s::int as a", [i])
        conn.execute("select pg_sleep(0.02)")
        conn.execute("select count(*) from pg_class")
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/queries", timeout=10) as response:
        assert response.headers["Content-Type"] == "application/json"
        document = json.loads(response.read())
    assert document["enabled"] is True
    queries = {q["query"]: q for q in document["queries"]}
    assert queries["select $1::int as a"]["calls"] == 4
    assert sum(queries["select $1::int as a"]["histogram"].values()) == 4
    scraped = scrape(port)
    series = [key for key in scraped.samples if key[0] == "pgpilot_query_calls_total"]
    assert len(series) == 2  # bounded: query_stats_metrics shapes
    slept = queries["select pg_sleep($1)"]["fingerprint"]
    assert scraped.get("pgpilot_query_calls_total", database="test", user="postgres",
                       fingerprint=slept) == 1
    assert scraped.get("pgpilot_query_seconds_total", database="test", user="postgres",
                       fingerprint=slept) >= 0.02


def test_workers_show_every_workers_queries(tmp_path: Path, pg_params: dict[str, str],
                                            pg_dsn: str) -> None:
    gen = run_workers(tmp_path, pg_params, pg_dsn,
                      settings="auth_type = trust\nadmin_users = postgres\n")
    _proc, dsn, _tmp = next(gen)
    try:
        console_dsn = dsn.rsplit("/", 1)[0] + "/pgbouncer"

        def show_workers() -> list[tuple[Any, ...]]:
            with psycopg.connect(console_dsn, autocommit=True) as console:
                return console.execute("SHOW WORKERS").fetchall()

        def clients_per_worker() -> list[int]:
            return [row[2] for row in show_workers()]

        # The first worker answers before the second is up on a loaded machine: only workers
        # that accept are balanced to.
        deadline = time.monotonic() + 30
        while not (len(rows := show_workers()) == 2 and all(r[3] == "yes" for r in rows)):
            assert time.monotonic() < deadline, rows
            time.sleep(0.1)
        # Held open together, the clients are balanced over both workers (workers.Balance).
        conns = [psycopg.connect(dsn, autocommit=True) for _ in range(16)]
        try:
            shares = clients_per_worker()
            assert len(shares) == 2 and min(shares) >= 4, shares  # both run statements
            for i, conn in enumerate(conns):
                conn.execute("select %s::int as workers_q", [i])
        finally:
            for conn in conns:
                conn.close()

        def total_calls() -> int:
            with psycopg.connect(console_dsn, autocommit=True) as console:
                rows = console.execute("SHOW QUERIES").fetchall()
            return sum(row[4] for row in rows if row[3] == "select $1::int as workers_q")

        # Each worker publishes its table about once a second; any console sums them all.
        deadline = time.monotonic() + 15
        while total_calls() != 16:
            assert time.monotonic() < deadline, total_calls()
            time.sleep(0.3)
    finally:
        for _ in gen:
            pass


def test_pgpilot_top_prints_the_queries(proxy: RunningProxy) -> None:
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        for i in range(3):
            conn.execute("select %s::int as top_q", [i])
    done = subprocess.run(
        [sys.executable, "-m", "pgpilot", "top", "--once", "-p", str(proxy.port),
         "-U", "postgres"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    line = next((line for line in done.stdout.splitlines()
                 if "select $1::int as top_q" in line), done.stdout)
    assert line.split()[1] == "3"  # calls
    refused = subprocess.run(
        [sys.executable, "-m", "pgpilot", "top", "--once", "-p", str(free_port())],
        capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1 and "cannot reach the admin console" in refused.stderr
