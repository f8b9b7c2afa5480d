"""``pgpilot explain``: analyze a plan from a live statement, a saved file, or compare two.

    pgpilot explain "SELECT ..." --dsn postgresql://...     run EXPLAIN (ANALYZE, BUFFERS)
    pgpilot explain "UPDATE ..." --dsn ... --no-analyze     plan only, nothing executed
    pgpilot explain --plan plan.json | --plan - (stdin)     a saved plan, JSON or psql text
    pgpilot explain --compare before.txt after.json         what changed between two plans

Exit status: 0 no finding, 1 findings, 2 bad input (one line on stderr, no traceback).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import psycopg

from pgpilot.explain.live import first_line
from pgpilot.explain.model import ExplainError
from pgpilot.explain.report import Report, analyze_plan

EXIT_CLEAN, EXIT_FINDINGS, EXIT_ERROR = 0, 1, 2


def default_dsn() -> str | None:
    return os.environ.get("PGPILOT_DSN") or os.environ.get("DATABASE_URL")


def add_dsn_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dsn", default=default_dsn(),
                        help="PostgreSQL connection string (default: $PGPILOT_DSN, "
                             "$DATABASE_URL, else libpq's PG* variables)")
    parser.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                        help="statement_timeout for the analyzed statement")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = ("A statement is explained inside BEGIN ... ROLLBACK. Exit status: 0 no "
                     "finding, 1 findings, 2 error.")
    parser.add_argument("sql", nargs="?", help="the statement to explain (needs --dsn)")
    parser.add_argument("--plan", metavar="FILE",
                        help="read a saved plan (JSON or psql text) from FILE, '-' for stdin")
    parser.add_argument("--compare", nargs=2, metavar=("A", "B"),
                        help="compare two saved plans of one query")
    parser.add_argument("--no-analyze", action="store_true",
                        help="plan the statement without running it")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    add_dsn_arguments(parser)


def read_plan_source(name: str) -> str:
    if name == "-":
        return sys.stdin.read()
    try:
        return Path(name).read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise ExplainError(f"cannot read {name}: {exc.strerror or exc}") from None


def report_for_statement(sql: str, dsn: str | None, *, analyze: bool,
                         timeout: float | None) -> Report:
    """Run EXPLAIN on the live statement (always rolled back) and analyze the result."""
    from pgpilot.explain.live import explain_statement

    result = explain_statement(dsn or "", sql, analyze=analyze,
                               statement_timeout_ms=int(timeout * 1000) if timeout else None)
    report = analyze_plan(result.plan_json, sql=sql, schemas=result.schemas)
    if result.modifies and analyze:
        report.rolled_back = True
        report.notes.append(f"data-modifying statement ({result.kind.upper()}): analyzed inside "
                            "BEGIN ... ROLLBACK, no change was kept")
    if not analyze:
        report.notes.append("--no-analyze: planned only, not executed (estimates, no times)")
    return report


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except ExplainError as exc:
        print(f"pgpilot explain: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except psycopg.Error as exc:  # anything the specific handlers did not name
        print(f"pgpilot explain: error: database error: {first_line(exc)}", file=sys.stderr)
        return EXIT_ERROR


def _run(args: argparse.Namespace) -> int:
    if args.compare:
        from pgpilot.explain.compare import compare_reports

        before = analyze_plan(read_plan_source(args.compare[0]))
        after = analyze_plan(read_plan_source(args.compare[1]))
        comparison = compare_reports(before, after)
        print(comparison.to_json() if args.json else comparison.render())
        return EXIT_CLEAN
    if args.plan:
        if args.sql:
            raise ExplainError("give either a statement or --plan, not both")
        report = analyze_plan(read_plan_source(args.plan))
    elif args.sql:
        report = report_for_statement(args.sql, args.dsn, analyze=not args.no_analyze,
                                      timeout=args.timeout)
    else:
        raise ExplainError("nothing to explain: give a statement (with --dsn), --plan FILE, "
                           "or --compare A B")
    print(report.to_json() if args.json else report.render())
    return EXIT_FINDINGS if report.findings else EXIT_CLEAN
