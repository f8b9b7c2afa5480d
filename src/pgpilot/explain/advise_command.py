"""``pgpilot advise``: propose indexes and statistics for one statement, and prove them.

    pgpilot advise "SELECT ..." --dsn postgresql://...            HypoPG when available
    pgpilot advise "SELECT ..." --dsn ... --validate real          build, measure, roll back

Exit status: 0 done (whether or not an index pays), 2 bad input or a database error.
"""

from __future__ import annotations

import argparse
import sys

import psycopg

from pgpilot.explain.command import EXIT_CLEAN, EXIT_ERROR, add_dsn_arguments
from pgpilot.explain.live import first_line
from pgpilot.explain.model import ExplainError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from pgpilot.explain.advisor import PAYS_MIN_IMPROVEMENT

    parser.epilog = ("An index is recommended only when the planner uses it and the plan's cost "
                     f"falls by at least {PAYS_MIN_IMPROVEMENT:.0%}. Exit status: 0 done, 2 error.")
    parser.add_argument("sql", help="the statement to find indexes for")
    parser.add_argument("--validate", choices=("auto", "hypopg", "real"), default="auto",
                        help="prove candidates with HypoPG (auto: when installed) or by building "
                             "them inside BEGIN ... ROLLBACK (real)")
    parser.add_argument("--no-analyze", action="store_true",
                        help="compare planner costs only; do not run the statement")
    parser.add_argument("--json", action="store_true", help="print the advice as JSON")
    add_dsn_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from pgpilot.explain.advisor import advise

    try:
        advice = advise(args.dsn or "", args.sql, validate=args.validate,
                        analyze=not args.no_analyze,
                        statement_timeout_ms=int(args.timeout * 1000) if args.timeout else None)
    except ExplainError as exc:
        print(f"pgpilot advise: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except psycopg.Error as exc:  # anything the specific handlers did not name
        print(f"pgpilot advise: error: database error: {first_line(exc)}", file=sys.stderr)
        return EXIT_ERROR
    print(advice.to_json() if args.json else advice.render())
    return EXIT_CLEAN
