"""``pgpilot explain`` fixes name the table the statement used, with its schema.

EXPLAIN without VERBOSE prints ``Seq Scan on events`` for ``newcomer.events``; a fix that says
``CREATE INDEX ... ON events`` would index another table (or fail) on the user's search_path.
The tables here share names across schemas so that a wrong guess shows.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from pgpilot.cli import main
from pgpilot.explain.advisor import advise
from pgpilot.explain.live import explain_statement, relation_schemas
from pgpilot.explain.report import analyze_plan

TAG = uuid.uuid4().hex[:8]
HIDDEN = f"pgp_q_hidden_{TAG}"  # not on the search_path
VISIBLE = f"pgp_q_visible_{TAG}"  # first on the search_path


@pytest.fixture(scope="module")
def qualified_dsn(pg_dsn: str) -> Iterator[str]:
    """Two schemas with an ``events`` table each, a mixed-case table and a partitioned one."""
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        for schema in (HIDDEN, VISIBLE):
            conn.execute(f"CREATE SCHEMA {schema}".encode())
            conn.execute(f"CREATE TABLE {schema}.events (id int, kind text)".encode())
            conn.execute(
                f"INSERT INTO {schema}.events SELECT g, 'k' || (g % 50) "
                "FROM generate_series(1, 20000) g".encode()
            )
            conn.execute(f"ANALYZE {schema}.events".encode())
        conn.execute(f'CREATE TABLE {HIDDEN}."Mixed Case" (id int, kind text)'.encode())
        conn.execute(
            f"INSERT INTO {HIDDEN}.\"Mixed Case\" SELECT g, 'k' || (g % 50) "
            "FROM generate_series(1, 20000) g".encode()
        )
        conn.execute(
            f"CREATE TABLE {HIDDEN}.parted (id int, kind text) PARTITION BY RANGE (id)".encode()
        )
        conn.execute(
            f"CREATE TABLE {HIDDEN}.parted_low_{TAG} PARTITION OF {HIDDEN}.parted "
            "FOR VALUES FROM (0) TO (100000)".encode()
        )
        conn.execute(
            f"INSERT INTO {HIDDEN}.parted SELECT g, 'k' || (g % 50) "
            "FROM generate_series(1, 20000) g".encode()
        )
        conn.execute(f'ANALYZE {HIDDEN}."Mixed Case", {HIDDEN}.parted'.encode())
    try:
        yield make_conninfo(pg_dsn, options=f"-c search_path={VISIBLE},public")
    finally:
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {HIDDEN}, {VISIBLE} CASCADE".encode())


def fixes(dsn: str, sql: str) -> list[str]:
    result = explain_statement(dsn, sql, analyze=True)
    report = analyze_plan(result.plan_json, sql=sql, schemas=result.schemas)
    return [finding.fix for finding in report.findings if finding.rule == "seq_scan_filter"]


def test_a_schema_off_the_search_path_is_kept(qualified_dsn: str) -> None:
    got = fixes(qualified_dsn, f"SELECT id FROM {HIDDEN}.events WHERE kind = 'k7'")
    # Not "ON events", and not the visible schema's events, which the bare name would index.
    assert got == [f"CREATE INDEX CONCURRENTLY ON {HIDDEN}.events (kind);"]


def test_an_unqualified_table_is_the_one_on_the_search_path(qualified_dsn: str) -> None:
    got = fixes(qualified_dsn, "SELECT id FROM events WHERE kind = 'k7'")
    assert got == [f"CREATE INDEX CONCURRENTLY ON {VISIBLE}.events (kind);"]


def test_same_name_in_two_schemas_in_one_statement(qualified_dsn: str) -> None:
    sql = (
        f"SELECT h.id FROM {HIDDEN}.events h WHERE h.kind = 'k7' "
        "UNION ALL SELECT id FROM events WHERE kind = 'k8'"
    )
    assert sorted(fixes(qualified_dsn, sql)) == [
        f"CREATE INDEX CONCURRENTLY ON {HIDDEN}.events (kind);",
        f"CREATE INDEX CONCURRENTLY ON {VISIBLE}.events (kind);",
    ]


def test_quoted_names_and_partitions(qualified_dsn: str) -> None:
    mixed = fixes(qualified_dsn, f"SELECT id FROM {HIDDEN}.\"Mixed Case\" WHERE kind = 'k7'")
    assert mixed == [f'CREATE INDEX CONCURRENTLY ON {HIDDEN}."Mixed Case" (kind);']
    # The plan scans the partition, which the statement never names: found by its name.
    parted = fixes(qualified_dsn, f"SELECT id FROM {HIDDEN}.parted WHERE kind = 'k7'")
    assert parted == [f"CREATE INDEX CONCURRENTLY ON {HIDDEN}.parted_low_{TAG} (kind);"]


def test_relation_schemas_by_plan_alias(qualified_dsn: str) -> None:
    sql = f"SELECT e.id FROM {HIDDEN}.events e JOIN events v ON v.id = e.id"
    result = explain_statement(qualified_dsn, sql, analyze=False)
    with psycopg.connect(qualified_dsn) as conn:
        assert relation_schemas(conn, result.plan_json, sql) == {"e": HIDDEN, "v": VISIBLE}
        # Without the statement, the visible table wins for both: the statement is what
        # tells the hidden one apart.
        assert relation_schemas(conn, result.plan_json) == {"e": VISIBLE, "v": VISIBLE}


def test_cli_explain_and_advise_agree_on_the_name(
    qualified_dsn: str, capsys: pytest.CaptureFixture[str]
) -> None:
    sql = f"SELECT id FROM {HIDDEN}.events WHERE kind = 'k7'"
    assert main(["explain", sql, "--dsn", qualified_dsn, "--json"]) == 1
    fix = json.loads(capsys.readouterr().out)["findings"][0]["fix"]
    assert fix == f"CREATE INDEX CONCURRENTLY ON {HIDDEN}.events (kind);"
    advice = advise(qualified_dsn, sql, validate="real")
    assert advice.recommendations[0].candidate.table.qualified == f"{HIDDEN}.events"
    # advise's own findings on the current plan are qualified the same way.
    assert any(f"{HIDDEN}.events" in finding.fix for finding in advice.baseline.findings)
