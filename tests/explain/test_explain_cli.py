"""``pgpilot explain``: live statements, saved plans, --json shape, --compare, DML rollback,
and bad input (one line on stderr, exit 2, no traceback)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest

from pgpilot.cli import main

PLANS = Path(__file__).parent / "plans"

ExplainFn = Callable[..., str]  # the conftest fixtures that return EXPLAIN output


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def run_subprocess(*argv: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pgpilot", *argv], input=stdin,
                          capture_output=True, text=True, timeout=60)


def test_json_output_shape(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "explain", "--plan", str(PLANS / "pg18_seq_scan.json"),
                           "--json")
    assert code == 1  # findings
    data = json.loads(out)
    assert set(data) == {"findings", "summary"}
    assert data["findings"], data
    for finding in data["findings"]:
        assert set(finding) == {"rule", "severity", "node", "message", "fix"}
    assert data["findings"][0]["rule"] == "seq_scan_filter"
    assert data["summary"]["analyzed"] is True
    assert data["summary"]["execution_time_ms"] == pytest.approx(4.133)


def test_text_report_shows_tree_shares_and_findings(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "explain", "--plan",
                           str(PLANS / "pg18_initplan_subplan.txt"))
    assert code == 1
    assert "98.9%" in out and "Seq Scan on payments p" in out
    assert "rows 2 est / 2.50 actual x1,000 loops" in out
    assert "Findings, most expensive first (2):" in out
    assert "fix: LEFT JOIN (SELECT customer_id" in out


def test_plan_from_stdin() -> None:
    done = run_subprocess("explain", "--plan", "-", "--json",
                          stdin=(PLANS / "pg17_lossy_bitmap.txt").read_text())
    assert done.returncode == 1, done.stderr
    assert json.loads(done.stdout)["findings"][0]["rule"] == "lossy_bitmap"


def test_live_statement(capsys: pytest.CaptureFixture[str], explain_dsn: str) -> None:
    code, out, _ = run_cli(capsys, "explain", "SELECT * FROM orders WHERE status = 'open'",
                           "--dsn", explain_dsn, "--json")
    data = json.loads(out)
    assert code == 1
    assert data["findings"][0]["rule"] == "seq_scan_filter"
    # Qualified as advise qualifies it: the plan says "orders", the table is pgp_explain.orders.
    assert data["findings"][0]["fix"] == "CREATE INDEX CONCURRENTLY ON pgp_explain.orders (status);"
    assert data["summary"]["rolled_back"] is False


def test_live_primary_key_lookup_is_clean(capsys: pytest.CaptureFixture[str],
                                          explain_dsn: str) -> None:
    code, out, _ = run_cli(capsys, "explain", "SELECT * FROM orders WHERE id = 42",
                           "--dsn", explain_dsn)
    assert code == 0, out
    assert "No findings" in out


def _open_total(dsn: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT sum(amount)::int FROM orders WHERE status = 'open'").fetchone()
    assert row is not None
    return int(row[0])


def test_data_modifying_statement_is_rolled_back(capsys: pytest.CaptureFixture[str],
                                                 explain_dsn: str) -> None:
    before = _open_total(explain_dsn)
    _, out, _ = run_cli(capsys, "explain",
                        "UPDATE orders SET amount = amount + 1 WHERE status = 'open'",
                           "--dsn", explain_dsn, "--json")
    data = json.loads(out)
    assert data["summary"]["rolled_back"] is True
    assert "BEGIN ... ROLLBACK" in data["summary"]["notes"][0]
    assert data["summary"]["analyzed"] is True
    assert _open_total(explain_dsn) == before
    _, out, _ = run_cli(capsys, "explain", "DELETE FROM orders WHERE status = 'open'",
                        "--dsn", explain_dsn)
    assert "analyzed inside BEGIN ... ROLLBACK" in out
    assert _open_total(explain_dsn) == before


def test_no_analyze(capsys: pytest.CaptureFixture[str], explain_dsn: str) -> None:
    _, out, _ = run_cli(capsys, "explain", "DELETE FROM orders WHERE status = 'open'",
                        "--dsn", explain_dsn, "--no-analyze", "--json")
    data = json.loads(out)
    assert data["summary"]["analyzed"] is False
    assert data["summary"]["execution_time_ms"] is None
    assert data["summary"]["rolled_back"] is False


def test_compare_two_plans(capsys: pytest.CaptureFixture[str], explain: ExplainFn,
                           tmp_path: Path) -> None:
    sql = "SELECT * FROM orders WHERE customer_id = 7 AND status = 'done'"
    before = tmp_path / "before.json"
    after = tmp_path / "after.txt"
    before.write_text(explain(sql, settings=["max_parallel_workers_per_gather = 0"]))
    after.write_text(explain(
        "SELECT * FROM orders WHERE id = 7", fmt="text",
        settings=["max_parallel_workers_per_gather = 0"]))
    code, out, _ = run_cli(capsys, "explain", "--compare", str(before), str(after), "--json")
    assert code == 0
    data = json.loads(out)
    summary = data["summary"]
    assert summary["shape_changed"] is True
    assert "seq_scan_filter" in summary["rules_fixed"]
    assert summary["speedup"] > 1
    paths = {p["table"]: p for p in data["access_paths"]}
    assert paths["orders"]["before"] == "Seq Scan on orders"
    assert paths["orders"]["after"] == "Index Scan using orders_pkey on orders"
    code, out, _ = run_cli(capsys, "explain", "--compare", str(before), str(after))
    assert "Shape: changed" in out and "faster" in out


def test_compare_identical_plans_unchanged(capsys: pytest.CaptureFixture[str]) -> None:
    plan = str(PLANS / "pg17_lossy_bitmap.txt")
    _, out, _ = run_cli(capsys, "explain", "--compare", plan, plan, "--json")
    assert json.loads(out)["summary"]["shape_changed"] is False


def _assert_clean_error(done: subprocess.CompletedProcess[str], fragment: str) -> None:
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert fragment in lines[0]


def test_bad_input_in_a_real_process_has_no_traceback(tmp_path: Path) -> None:
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('[{"Plan": {"Node Type": "Seq Scan",')
    _assert_clean_error(run_subprocess("explain", "--plan", str(bad_json)), "invalid JSON")
    _assert_clean_error(
        run_subprocess("advise", "SELECT 1", "--dsn",
                       "postgresql://postgres@127.0.0.1:1/test?connect_timeout=2"),
        "cannot connect to 127.0.0.1:1/test")


def test_bad_inputs_give_one_line_and_exit_2(tmp_path: Path, explain_dsn: str,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    not_plan = tmp_path / "notes.txt"
    not_plan.write_text("these are my notes\nnot a plan\n")
    unreachable = "postgresql://postgres@127.0.0.1:1/test?connect_timeout=2"
    cases = [
        (["--plan", str(not_plan)], "not a plan"),
        (["--plan", str(tmp_path / "missing.json")], "cannot read"),
        (["SELECT 1", "--dsn", unreachable], "cannot connect to 127.0.0.1:1/test"),
        (["SELECT * FROM no_such_table", "--dsn", explain_dsn], "the statement failed [42P01]"),
        (["SELECT 1/0", "--dsn", explain_dsn], "the statement failed [22012]"),
        (["SELEC oops", "--dsn", explain_dsn], "cannot parse"),
        ([], "nothing to explain"),
    ]
    for argv, fragment in cases:
        code, out, err = run_cli(capsys, "explain", *argv)
        assert code == 2, (argv, out, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and fragment in lines[0], (argv, err)
