"""``pgpilot advise``: candidates from the parse tree, proven with HypoPG and with real
indexes built inside a rolled-back transaction; CREATE STATISTICS for correlated columns."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from pgpilot.cli import main
from pgpilot.explain.advisor import PAYS_MIN_IMPROVEMENT, Advice, advise

MISSING_INDEX_SQL = "SELECT id, amount FROM orders WHERE customer_id = 42"


def _catalog_state(dsn: str) -> tuple[int, int, bool]:
    """Indexes and statistics objects in the schema, and whether hypopg is installed."""
    with psycopg.connect(dsn) as conn:
        indexes = conn.execute(
            "SELECT count(*) FROM pg_indexes WHERE schemaname = 'pgp_explain'").fetchone()
        stats = conn.execute(
            "SELECT count(*) FROM pg_statistic_ext e JOIN pg_namespace n "
            "ON n.oid = e.stxnamespace WHERE n.nspname = 'pgp_explain'").fetchone()
        hypopg = conn.execute("SELECT 1 FROM pg_extension WHERE extname = 'hypopg'").fetchone()
    assert indexes is not None and stats is not None
    return int(indexes[0]), int(stats[0]), hypopg is not None


def _hypopg_available(dsn: str) -> bool:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT 1 FROM pg_available_extensions WHERE name = 'hypopg'").fetchone()
    return row is not None


@pytest.fixture(scope="module")
def hypopg_dsn(explain_dsn: str) -> str:
    if not _hypopg_available(explain_dsn):
        # .ci/run installs postgresql-<version>-hypopg: under CI its absence is a failure.
        message = "the hypopg extension is not available on this server"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message)
        pytest.skip(message)
    return explain_dsn


def _recommended(advice: Advice) -> list[str]:
    return [r.candidate.ddl(name=r.candidate.name) for r in advice.recommendations]


def test_hypopg_proves_missing_index(hypopg_dsn: str) -> None:
    state = _catalog_state(hypopg_dsn)
    advice = advise(hypopg_dsn, MISSING_INDEX_SQL, validate="hypopg")
    assert advice.validation == "hypopg"
    paying = [r for r in advice.results if r.pays]
    assert paying, advice.render()
    best = advice.recommendations[0]
    assert best.candidate.columns[0] == "customer_id"
    assert best.used and best.cost_after is not None
    assert best.cost_after <= best.cost_before * (1 - PAYS_MIN_IMPROVEMENT)
    assert _recommended(advice)[0].startswith(
        "CREATE INDEX CONCURRENTLY orders_customer_id_idx ON pgp_explain.orders (customer_id")
    assert any(line.startswith("Index") or "Bitmap" in line for line in best.plan_after)
    assert _catalog_state(hypopg_dsn) == state  # nothing built, extension not left behind


def test_real_validation_builds_inside_rollback(explain_dsn: str) -> None:
    state = _catalog_state(explain_dsn)
    advice = advise(explain_dsn, MISSING_INDEX_SQL, validate="real")
    assert advice.validation == "real"
    best = advice.recommendations[0]
    assert best.candidate.columns[0] == "customer_id"
    assert best.pays
    assert best.time_before_ms is not None and best.time_after_ms is not None
    assert any("pgpilot_candidate_" in line for line in best.plan_after)
    assert _catalog_state(explain_dsn) == state


def test_covered_candidate_is_skipped(explain_dsn: str) -> None:
    advice = advise(explain_dsn, "SELECT * FROM orders WHERE id = 42", validate="real")
    assert advice.recommendations == []
    assert any("orders_pkey" in s["reason"] for s in advice.skipped)


def test_equality_then_range_then_order_by(explain_dsn: str) -> None:
    sql = ("SELECT id FROM orders WHERE created > '2024-06-01' AND customer_id = 5 "
           "ORDER BY created")
    advice = advise(explain_dsn, sql, validate="real", analyze=False)
    keys = [r.candidate.columns for r in advice.results]
    assert keys[0] == ["customer_id", "created"]


def test_include_and_partial_candidates(explain_dsn: str) -> None:
    sql = "SELECT amount FROM orders WHERE status = 'open' AND customer_id = 100"
    advice = advise(explain_dsn, sql, validate="real", analyze=False)
    ddls = [r.candidate.ddl(concurrently=False) for r in advice.results]
    assert "CREATE INDEX ON pgp_explain.orders (status, customer_id)" in ddls
    assert ("CREATE INDEX ON pgp_explain.orders (status, customer_id) INCLUDE (amount)"
            in ddls)
    assert ("CREATE INDEX ON pgp_explain.orders (customer_id) WHERE status = 'open'" in ddls)
    assert advice.recommendations


def test_correlated_subquery_gets_index_on_inner_table(explain_dsn: str) -> None:
    sql = ("SELECT c.id, (SELECT sum(p.amount) FROM payments p WHERE p.customer_id = c.id) "
           "FROM customers c WHERE c.id <= 150")
    advice = advise(explain_dsn, sql, validate="real")
    assert "correlated_subplan" in {f.rule for f in advice.baseline.findings}
    assert any("payments (customer_id)" in ddl for ddl in _recommended(advice))


def test_statistics_for_correlated_columns(explain_dsn: str) -> None:
    state = _catalog_state(explain_dsn)
    advice = advise(explain_dsn, "SELECT * FROM correlated WHERE a = 1 AND b = 1",
                    validate="real")
    assert advice.statistics, advice.render()
    proposal = advice.statistics[0]
    assert proposal.ddl.startswith(
        "CREATE STATISTICS correlated_a_b_stats (dependencies, mcv) ON a, b FROM "
        "pgp_explain.correlated;")
    assert proposal.actual == 200
    assert proposal.estimate_before < 20
    assert proposal.estimate_after is not None and proposal.estimate_after > 100
    assert proposal.helps
    assert _catalog_state(explain_dsn) == state


def test_data_modifying_statement_is_rolled_back(explain_dsn: str) -> None:
    with psycopg.connect(explain_dsn) as conn:
        before = conn.execute("SELECT count(*) FROM orders WHERE note = 'x'").fetchone()
    advice = advise(explain_dsn, "UPDATE orders SET note = 'x' WHERE customer_id = 7",
                    validate="real")
    assert any("BEGIN ... ROLLBACK" in note for note in advice.notes)
    assert advice.recommendations
    with psycopg.connect(explain_dsn) as conn:
        after = conn.execute("SELECT count(*) FROM orders WHERE note = 'x'").fetchone()
    assert before == after == (0,)


def test_advise_cli_json_and_text(explain_dsn: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["advise", MISSING_INDEX_SQL, "--dsn", explain_dsn, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["validation"] in ("hypopg", "none")
    assert data["pays_threshold"] == PAYS_MIN_IMPROVEMENT
    if data["validation"] == "hypopg":
        assert data["recommendations"][0].startswith("CREATE INDEX CONCURRENTLY")
    assert main(["advise", MISSING_INDEX_SQL, "--dsn", explain_dsn, "--validate", "real"]) == 0
    out = capsys.readouterr().out
    assert "Recommended:\n  CREATE INDEX CONCURRENTLY orders_customer_id_idx" in out
    assert "PAYS" in out


def test_advise_cli_errors(explain_dsn: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["advise", "SELECT * FROM nope", "--dsn", explain_dsn]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "42P01" in err[0]
    assert main(["advise", "not sql at all", "--dsn", explain_dsn]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot parse" in err[0]


def test_like_prefix_candidate_uses_text_pattern_ops(explain_dsn: str) -> None:
    advice = advise(explain_dsn, "SELECT id FROM orders WHERE note LIKE 'note 4242%'",
                    validate="real", analyze=False)
    ddls = [r.candidate.ddl(concurrently=False) for r in advice.results]
    assert "CREATE INDEX ON pgp_explain.orders (note text_pattern_ops)" in ddls
    assert advice.recommendations  # 1 row in 50000: the pattern index pays


@pytest.fixture
def no_hypopg_dsn(pg_dsn: str) -> Iterator[str]:
    """A fresh database where HypoPG is not created, reached by a role that cannot create it.

    HypoPG is not a trusted extension: only a superuser can CREATE EXTENSION it, so for this
    ordinary role the advisor truly finds HypoPG unavailable, whether or not the server has it
    installed.
    """
    name = f"pgp_nohypopg_{uuid.uuid4().hex[:8]}"
    password = uuid.uuid4().hex
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {name} LOGIN PASSWORD '{password}'".encode())
        conn.execute(f"CREATE DATABASE {name}".encode())
    owner_dsn = make_conninfo(pg_dsn, dbname=name)
    try:
        with psycopg.connect(owner_dsn, autocommit=True) as conn:
            conn.execute(
                "CREATE TABLE orders (id int PRIMARY KEY, customer_id int NOT NULL, amount int)"
            )
            conn.execute(
                "INSERT INTO orders SELECT g, g % 2000, g % 97 FROM generate_series(1, 20000) g"
            )
            conn.execute("ANALYZE orders")
            conn.execute(f"GRANT SELECT ON orders TO {name}".encode())
            hypopg = conn.execute("SELECT 1 FROM pg_extension WHERE extname = 'hypopg'")
            assert hypopg.fetchone() is None
        yield make_conninfo(owner_dsn, user=name, password=password)
    finally:
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)".encode())
            conn.execute(f"DROP ROLE IF EXISTS {name}".encode())


def test_without_hypopg_nothing_is_proven_and_the_advice_says_how_to_prove(
    no_hypopg_dsn: str, capsys: pytest.CaptureFixture[str]
) -> None:
    advice = advise(no_hypopg_dsn, "SELECT id FROM orders WHERE customer_id = 42")
    assert advice.validation == "none"
    assert advice.results == [] and advice.unproven  # candidates found, none tested
    assert advice.unproven_reason is not None and "HypoPG" in advice.unproven_reason
    text = advice.render()
    assert "no index pays" not in text  # nothing was tested, so that would be unfounded
    assert "Recommended: nothing could be proven" in text
    assert "CREATE EXTENSION hypopg" in text and "--validate real" in text
    assert advice.to_dict()["unproven_reason"] == advice.unproven_reason

    sql = "SELECT id FROM orders WHERE customer_id = 42"
    assert main(["advise", sql, "--dsn", no_hypopg_dsn]) == 0
    out = capsys.readouterr().out
    assert "nothing could be proven" in out and "CREATE EXTENSION hypopg" in out
    # Asked for HypoPG by name: an error that says why and what to do.
    assert main(["advise", sql, "--dsn", no_hypopg_dsn, "--validate", "hypopg"]) == 2
    err = capsys.readouterr().err
    assert "HypoPG" in err and "CREATE EXTENSION hypopg" in err and "--validate real" in err


def test_a_tested_candidate_that_does_not_pay_still_says_no_index_pays(explain_dsn: str) -> None:
    # 99% of the rows are 'done': an index on status does not pay, and it *was* tested (real
    # validation), so "no index pays" is right there.
    advice = advise(explain_dsn, "SELECT id FROM orders WHERE status = 'done'", validate="real",
                    analyze=False)
    assert advice.results and not advice.recommendations, advice.render()
    assert "Recommended: no index pays for this statement." in advice.render()
