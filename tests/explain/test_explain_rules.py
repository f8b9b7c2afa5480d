"""Each rule fires on a live plan built to show its problem, in JSON and in text; good plans
stay clean."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest

from pgpilot.explain import RULE_IDS, analyze_plan
from pgpilot.explain.rules import Finding

NO_PARALLEL = "max_parallel_workers_per_gather = 0"
# Estimating 100000 IN values takes the planner ~100+ ms, far above the 30 ms threshold.
IN_LIST = ", ".join(str(i) for i in range(100000))

# rule id -> (statement, planner settings, a fragment the fix must contain)
CASES: dict[str, tuple[str, list[str], str]] = {
    "seq_scan_filter": (
        "SELECT * FROM orders WHERE status = 'open'", [],
        "CREATE INDEX CONCURRENTLY ON orders (status)"),
    "row_misestimate": (
        "SELECT * FROM correlated WHERE a = 1 AND b = 1", [],
        "CREATE STATISTICS correlated_a_b_stats (dependencies, mcv) ON a, b FROM correlated"),
    "sort_spill": (
        "SELECT * FROM orders ORDER BY amount DESC, id", ["work_mem = '64kB'"],
        "SET LOCAL work_mem = '"),
    "hash_spill": (
        "SELECT count(c.name) FROM orders o JOIN customers c ON c.id = o.customer_id",
        ["work_mem = '64kB'", "hash_mem_multiplier = 1", "enable_mergejoin = off",
         "enable_nestloop = off"],
        "SET LOCAL work_mem = '"),
    "nested_loop_many_loops": (
        "SELECT * FROM customers c LEFT JOIN regions r ON r.code = c.region",
        ["enable_hashjoin = off", "enable_mergejoin = off", "enable_material = off"],
        "CREATE INDEX CONCURRENTLY ON regions (code)"),
    "correlated_subplan": (
        "SELECT c.id, (SELECT sum(p.amount) FROM payments p WHERE p.customer_id = c.id) "
        "FROM customers c WHERE c.id <= 150", [],
        "LEFT JOIN (SELECT p.customer_id"),
    "heap_fetches": (
        "SELECT v FROM unvacuumed WHERE v <= 5000",
        ["enable_seqscan = off", "enable_bitmapscan = off"],
        "VACUUM (ANALYZE) unvacuumed"),
    "lossy_bitmap": (
        "SELECT count(*) FROM events WHERE k < 50",
        ["work_mem = '64kB'", "enable_seqscan = off", "enable_indexscan = off"],
        "SET LOCAL work_mem = '"),
    "jit_overhead": (
        "SELECT sum(amount) FROM payments",
        ["jit = on", "jit_above_cost = 0", "jit_inline_above_cost = 0",
         "jit_optimize_above_cost = 0"],
        "SET LOCAL jit = off"),
    "cast_prevents_index": (
        "SELECT * FROM orders WHERE id::text = '4242'", [],
        "WHERE id = '4242'"),
    "large_offset": (
        "SELECT * FROM orders ORDER BY id LIMIT 10 OFFSET 20000", [],
        "keyset pagination"),
    "workers_not_launched": (
        "SELECT count(*) FROM orders",
        ["max_parallel_workers = 0", "max_parallel_workers_per_gather = 2",
         "parallel_setup_cost = 0", "parallel_tuple_cost = 0",
         "min_parallel_table_scan_size = 0"],
        "max_parallel_workers"),
    "high_planning_time": (
        f"SELECT count(*) FROM orders WHERE customer_id IN ({IN_LIST}) AND id < 0", [],
        "prepared statement"),
    "index_filter_inefficient": (
        "SELECT * FROM orders WHERE created BETWEEN '2024-01-01' AND '2024-03-01' "
        "AND status = 'open'", ["enable_seqscan = off"],
        "CREATE INDEX CONCURRENTLY ON orders (status, created)"),
    "join_filter_removed": (
        "SELECT * FROM customers c LEFT JOIN tiers t ON c.id BETWEEN t.lo AND t.hi",
        ["enable_material = off"],
        "CREATE INDEX CONCURRENTLY ON tiers (lo, hi)"),
}

HEALTHY = [
    "SELECT * FROM orders WHERE id = 42",
    "SELECT name FROM customers WHERE id = 7",
    "SELECT * FROM orders ORDER BY id LIMIT 10",
    "SELECT o.id, c.name FROM orders o JOIN customers c ON c.id = o.customer_id "
    "WHERE o.id BETWEEN 100 AND 110",
]

ExplainFn = Callable[..., str]  # the conftest fixtures that return EXPLAIN output


def test_every_rule_has_a_live_case() -> None:
    assert set(CASES) == set(RULE_IDS)
    assert len(RULE_IDS) == 15


def _jit_available(dsn: str) -> bool:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT pg_jit_available()").fetchone()
    return bool(row and row[0])


@pytest.mark.parametrize("fmt", ["json", "text"])
@pytest.mark.parametrize("rule_id", sorted(CASES))
def test_rule_fires_on_live_plan(rule_id: str, fmt: str, explain: ExplainFn,
                                 explain_dsn: str) -> None:
    sql, settings, fix_fragment = CASES[rule_id]
    if rule_id == "jit_overhead" and not _jit_available(explain_dsn):
        # A server built without LLVM cannot JIT: check a saved PostgreSQL 17 plan instead.
        saved = (Path(__file__).parent / "plans" / "pg17_jit.json").read_text()
        assert "jit_overhead" in analyze_plan(saved).rules_fired
        return
    if not any(s.startswith("max_parallel_workers_per_gather") for s in settings):
        settings = [*settings, NO_PARALLEL]
    # (pglast needs seconds for the 100000-value IN list, and the plan alone suffices.)
    given_sql = None if rule_id == "high_planning_time" else sql
    report = analyze_plan(explain(sql, fmt=fmt, settings=settings), sql=given_sql)
    assert report.plan.source_format == fmt
    found: list[Finding] = [f for f in report.findings if f.rule == rule_id]
    assert found, f"{rule_id} did not fire; findings: {[f.rule for f in report.findings]}"
    finding = found[0]
    assert finding.severity in ("critical", "warning", "info")
    assert fix_fragment in finding.fix, finding.fix
    assert finding.message


@pytest.mark.parametrize("fmt", ["json", "text"])
@pytest.mark.parametrize("sql", HEALTHY)
def test_healthy_plans_have_no_findings(sql: str, fmt: str, explain: ExplainFn) -> None:
    report = analyze_plan(explain(sql, fmt=fmt, settings=[NO_PARALLEL]))
    assert report.findings == [], [f.to_dict() for f in report.findings]


def test_same_findings_from_json_and_text(explain: ExplainFn) -> None:
    sql, settings, _ = CASES["correlated_subplan"]
    from_json = analyze_plan(explain(sql, fmt="json", settings=[*settings, NO_PARALLEL]))
    from_text = analyze_plan(explain(sql, fmt="text", settings=[*settings, NO_PARALLEL]))
    assert [(f.rule, f.node_label) for f in from_json.findings] == [
        (f.rule, f.node_label) for f in from_text.findings]


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_psql_decorated_output(fmt: str, psql_explain: ExplainFn) -> None:
    sql, settings, _ = CASES["sort_spill"]
    raw = psql_explain(sql, fmt=fmt, settings=[*settings, NO_PARALLEL])
    assert "QUERY PLAN" in raw and ("row)" in raw or "rows)" in raw)
    report = analyze_plan(raw)
    assert "sort_spill" in report.rules_fired


def test_trivial_node_is_not_reported() -> None:
    # The customers scan discards 1999 of 2000 rows (enough for seq_scan_filter by count)
    # but takes 0.1% of the time, so it is not reported.
    plan = (Path(__file__).parent / "plans" / "pg15_trivial_filter.txt").read_text()
    report = analyze_plan(plan)
    scan = report.plan.nodes[-1]
    assert scan.relation == "customers" and scan.rows_removed_by_filter == 1999
    assert report.plan.share(scan) < 0.05
    assert report.findings == []


def test_severity_follows_share_of_time(explain: ExplainFn) -> None:
    sql, _, _ = CASES["seq_scan_filter"]
    report = analyze_plan(explain(sql, settings=[NO_PARALLEL]))
    finding = next(f for f in report.findings if f.rule == "seq_scan_filter")
    assert finding.impact > 0.5
    assert finding.severity == "critical"


def test_no_analyze_plan_has_costs_only(explain: ExplainFn) -> None:
    report = analyze_plan(explain("SELECT * FROM orders WHERE status = 'open'", analyze=False))
    assert not report.plan.analyzed
    assert report.summary()["analyzed"] is False
    assert "Estimated cost" in report.render()


def test_correlated_subquery_fix_is_an_equivalent_join(explain: ExplainFn,
                                                       explain_dsn: str) -> None:
    sql = ("SELECT c.id, (SELECT count(*) FROM payments p WHERE p.customer_id = c.id "
           "AND p.amount > 100) AS n FROM customers c WHERE c.id <= 150 ORDER BY c.id")
    report = analyze_plan(explain(sql, settings=[NO_PARALLEL]), sql=sql)
    finding = next(f for f in report.findings if f.rule == "correlated_subplan")
    assert finding.fix.startswith("rewrite it as a join, computed in one pass: SELECT")
    rewritten = finding.fix.split(": ", 1)[1]
    assert "LEFT JOIN (SELECT p.customer_id, count(*) AS value" in rewritten
    assert "COALESCE(sub1.value, 0) AS n" in rewritten
    with psycopg.connect(explain_dsn) as conn:
        original_rows = conn.execute(sql.encode()).fetchall()
        rewritten_rows = conn.execute(rewritten.encode()).fetchall()
    assert original_rows == rewritten_rows
    assert any(n == 0 for _, n in original_rows)  # rows without a match keep their 0
    fixed = analyze_plan(explain(rewritten, settings=[NO_PARALLEL]), sql=rewritten)
    assert "correlated_subplan" not in fixed.rules_fired


def test_timing_off_plan_weighs_by_cost(explain_dsn: str) -> None:
    sql = "EXPLAIN (ANALYZE, TIMING OFF, FORMAT JSON) SELECT * FROM orders WHERE status = 'open'"
    with psycopg.connect(explain_dsn) as conn:
        row = conn.execute(sql.encode()).fetchone()
    assert row is not None
    report = analyze_plan(row[0])
    assert report.plan.analyzed and not report.plan.timed
    assert "seq_scan_filter" in report.rules_fired
    assert "Analyzed without timing" in report.render()
