"""Transaction-pooling hazards (pin_session_state = 0: PgBouncer's behaviour, reported): detected
through the pooler in transaction mode, with real
PostgreSQL and psycopg; never in session mode; the safe variants never flagged."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row
from tests.proxy.conftest import RunningProxy

from pgpilot.proxy.hazards import HINTS, classify, might_be_hazard

# kind -> statements that create that hazard (and, where needed, the statement undoing it).
HAZARDS: dict[str, tuple[str, str | None]] = {
    "listen": ("LISTEN pgpilot_jobs", "UNLISTEN pgpilot_jobs"),
    "temp_table": ("CREATE TEMP TABLE hazard_tmp (x int)", "DROP TABLE hazard_tmp"),
    "advisory_lock": ("SELECT pg_advisory_lock(424242)", "SELECT pg_advisory_unlock(424242)"),
    "sql_prepare": ("PREPARE hazard_stmt AS SELECT 1", "DEALLOCATE hazard_stmt"),
    "with_hold_cursor": ("DECLARE hazard_cur CURSOR WITH HOLD FOR SELECT 1",
                         "CLOSE hazard_cur"),
}

SAFE = [
    "BEGIN; SET LOCAL statement_timeout = '5s'; SELECT 1; COMMIT",
    "SELECT set_config('statement_timeout', '5s', true)",
    "SET application_name = 'renamed'",  # kept per client by the pooler
    "SET TIME ZONE 'UTC'",
    "BEGIN; CREATE TEMP TABLE gone_at_commit (x int) ON COMMIT DROP; COMMIT",
    "BEGIN; SELECT pg_advisory_xact_lock(7); COMMIT",
    "BEGIN; DECLARE plain_cur CURSOR FOR SELECT 1; CLOSE plain_cur; COMMIT",
    "UPDATE pg_catalog.pg_class SET relname = relname WHERE false",
    "SELECT 'SET search_path = x; LISTEN y'",
]


def hazards(proxy: RunningProxy) -> list[dict[str, Any]]:
    with psycopg.connect(proxy.dsn(dbname="pgbouncer"), autocommit=True,
                         row_factory=dict_row) as conn:
        return conn.execute("SHOW HAZARDS").fetchall()


def app_client(proxy: RunningProxy, app: str = "hazard-app") -> psycopg.Connection[Any]:
    return psycopg.connect(proxy.dsn(), autocommit=True, prepare_threshold=None,
                           application_name=app)


@pytest.mark.parametrize("kind", sorted(HAZARDS))
def test_each_hazard_is_detected_in_transaction_mode(
        proxy_factory: Callable[..., RunningProxy], kind: str) -> None:
    proxy = proxy_factory(pool_mode="transaction", pin_session_state=0, default_pool_size=1)
    statement, undo = HAZARDS[kind]
    with app_client(proxy) as conn:
        conn.execute(statement)
        if undo:
            conn.execute(undo)
    rows = hazards(proxy)
    assert [(r["database"], r["user"], r["application_name"], r["hazard"], r["count"])
            for r in rows] == [("test", "postgres", "hazard-app", kind, 1)]
    assert rows[0]["hint"] == HINTS[kind]
    assert rows[0]["example"]


def test_hazards_in_statement_mode_and_through_parse(
        proxy_factory: Callable[..., RunningProxy]) -> None:
    proxy = proxy_factory(pool_mode="statement", pin_session_state=0, default_pool_size=1)
    with app_client(proxy) as conn:
        # With a parameter, psycopg sends Parse/Bind/Execute: detected on the Parse.
        conn.execute("SELECT pg_advisory_lock(%s)", [99])
        conn.execute("SELECT pg_advisory_unlock(%s)", [99])
    assert [(r["hazard"], r["count"]) for r in hazards(proxy)] == [("advisory_lock", 1)]


def test_nothing_is_flagged_in_session_mode(proxy_factory: Callable[..., RunningProxy]) -> None:
    proxy = proxy_factory(pool_mode="session")
    with app_client(proxy) as conn:
        for statement, undo in HAZARDS.values():
            conn.execute(statement)
            if undo:
                conn.execute(undo)
    assert hazards(proxy) == []
    assert proxy.call(lambda: proxy.pooler.hazards.total()) == 0


def test_safe_statements_are_not_flagged(proxy_factory: Callable[..., RunningProxy]) -> None:
    proxy = proxy_factory(pool_mode="transaction", pin_session_state=0)
    with app_client(proxy) as conn:
        for statement in SAFE:
            conn.execute(statement)
    assert hazards(proxy) == []


def test_counted_per_application_and_logged_once_per_kind_and_client(
        proxy_factory: Callable[..., RunningProxy], caplog: pytest.LogCaptureFixture) -> None:
    proxy = proxy_factory(pool_mode="transaction", pin_session_state=0)
    with caplog.at_level(logging.WARNING, logger="pgpilot.proxy"), \
            app_client(proxy, "worker") as first, app_client(proxy, "web") as second:
        for _ in range(3):
            first.execute("LISTEN worker_jobs")
        first.execute("SET statement_timeout = '1min'")  # carried by the pooler: no hazard
        second.execute("CREATE TEMP TABLE web_tmp (x int); SELECT 1")
        second.execute("DROP TABLE web_tmp")
        first.execute("UNLISTEN *")
    counts = {(r["application_name"], r["hazard"]): r["count"] for r in hazards(proxy)}
    assert counts == {("worker", "listen"): 3, ("web", "temp_table"): 1}
    warnings = [r.getMessage() for r in caplog.records if "hazard" in r.getMessage()]
    assert len(warnings) == 2  # listen for "worker", temp_table for "web"
    assert any("LISTEN worker_jobs" in w and "session-mode pool" in w for w in warnings)


def test_garbage_and_huge_queries_do_not_break_the_client(
        proxy_factory: Callable[..., RunningProxy]) -> None:
    proxy = proxy_factory(pool_mode="transaction", pin_session_state=0)
    with app_client(proxy) as conn:
        with pytest.raises(psycopg.errors.SyntaxError):
            conn.execute("SET SET SET ;;; LISTEN (")
        big = "SELECT 1 /* " + "set listen " * 20_000 + " */"
        assert conn.execute(big).fetchone() == (1,)
        assert conn.execute("select 'ok'").fetchone() == ("ok",)
    assert hazards(proxy) == []


# ---------------------------------------------------------------------------------------
# The classifier itself (no PostgreSQL needed)
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("sql,expected", [
    ("set search_path = a", ["session_set"]),
    ("/* orm */ SET work_mem = '1MB'", ["session_set"]),
    ("SET SESSION statement_timeout = 0", ["session_set"]),
    ("SET ROLE reporting", ["session_set"]),
    ("SELECT set_config('search_path', 'a', false)", ["session_set"]),
    ("begin; set lock_timeout = 1; commit", ["session_set"]),
    ("SELECT 1 INTO TEMP TABLE t", ["temp_table"]),
    ("CREATE TEMPORARY TABLE t AS SELECT 1", ["temp_table"]),
    ("select pg_try_advisory_lock_shared(1)", ["advisory_lock"]),
    ("SELECT pg_catalog.pg_advisory_lock(1, 2)", ["advisory_lock"]),
    ("listen a; listen b", ["listen", "listen"]),
    ("SET LOCAL search_path = a", []),
    ("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE", []),
    ("SET DateStyle = ISO", []),
    ("PREPARE TRANSACTION 'x'", []),
    ("update t\nset x = 1", []),
    ("not even sql", []),
])
def test_classify(sql: str, expected: list[str]) -> None:
    assert [kind for kind, _ in classify(sql)] == expected


def test_prefilter_lets_ordinary_traffic_through_without_parsing() -> None:
    for sql in (b"select * from users where id = $1", b"UPDATE t SET x = 1",
                b"INSERT INTO settings (k) VALUES ('set') ON CONFLICT (k) DO UPDATE SET k = 1",
                b"SELECT pg_advisory_xact_lock(1)", b"BEGIN", b"COMMIT", b"",
                b"select 1; select 2; update t\nset a = 1", b"/* app */ SELECT 1",
                b"SELECT 1 OFFSET 10", b"select settings from t; reset all"):
        assert not might_be_hazard(sql), sql
    for sql in (b"SET search_path = a", b"LISTEN x", b"select 1; set x = 1",
                b"SELECT pg_advisory_lock(1)", b"/* a */ -- b\n SeT x = 1",
                b"create temp table t (x int)", b"declare c cursor with hold for select 1",
                b"select set_config('a', 'b', false)", b"PREPARE p AS SELECT 1",
                b"set"):
        assert might_be_hazard(sql), sql


def test_per_client_application_names_are_capped(monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    from pgpilot.proxy import hazards as hazards_module

    class FakeClient:
        def __init__(self, app: str) -> None:
            self.database, self.user, self.application_name = "db", "u", app
            self.params = {"application_name": app}
            self.pool = None

    monkeypatch.setattr(hazards_module, "MAX_HAZARD_KEYS", 3)
    tracker = hazards_module.HazardTracker(
        SimpleNamespace(query_observers=[], parse_observers=[]))  # type: ignore[arg-type]
    for n in range(10):
        tracker.record(FakeClient(f"app - 10.0.0.1:{n}"), "listen", "LISTEN x")  # type: ignore[arg-type]
    assert len(tracker.counts) == 4
    assert tracker.counts[("db", "u", hazards_module.OTHER_APPLICATIONS, "listen")].count == 7
    assert tracker.total() == 10
