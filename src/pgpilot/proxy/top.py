"""``pgpilot top``: the pooler's per-query statistics in the terminal, refreshed every second.

It connects to a running pooler's admin console (``SHOW QUERIES``, proxy/stats.py), so it sees
every worker's queries, and prints the query shapes with the most time first, with calls per
second over the last refresh, as pg_top does for backends. ``--once`` prints one screen and
exits (for scripts). Ctrl-C quits.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from typing import Any, TextIO

SORT_KEYS = ("total_ms", "calls", "mean_ms", "p99_ms", "errors", "rows", "rate")
CLEAR = "\x1b[H\x1b[2J"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dsn", nargs="?", default=None,
                        help="admin console connection string (default: host 127.0.0.1, port "
                        "6432, database pgbouncer, user $USER)")
    parser.add_argument("-H", "--host", default="127.0.0.1")
    parser.add_argument("-p", "--port", type=int, default=6432)
    parser.add_argument("-U", "--user", default=os.environ.get("PGUSER") or None)
    parser.add_argument("-d", "--delay", type=float, default=1.0,
                        help="seconds between refreshes (default 1)")
    parser.add_argument("-s", "--sort", choices=SORT_KEYS, default="total_ms",
                        help="order of the rows (rate: calls per second now)")
    parser.add_argument("-n", "--rows", type=int, default=0,
                        help="rows shown (default: what fits the terminal)")
    parser.add_argument("--once", action="store_true", help="print one screen and exit")


def fetch(conn: Any) -> list[dict[str, Any]]:
    cur = conn.execute("SHOW QUERIES")
    names = [d.name for d in cur.description or ()]
    return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


def _key(row: dict[str, Any]) -> tuple[str, str, str]:
    return (row["database"], row["user"], row["fingerprint"])


def render(rows: list[dict[str, Any]], previous: dict[tuple[str, str, str], int] | None,
           elapsed: float, sort: str = "total_ms", limit: int = 0, width: int = 120) -> str:
    """One screen: a summary line, then one line per query shape."""
    for row in rows:
        before = previous.get(_key(row)) if previous is not None else None
        row["rate"] = (row["calls"] - before) / elapsed if before is not None and elapsed > 0 \
            else 0.0
    rows = sorted(rows, key=lambda r: float(r[sort]), reverse=True)
    total_calls = sum(r["calls"] for r in rows)
    rate = sum(r["rate"] for r in rows)
    lines = [f"pgpilot top  {time.strftime('%H:%M:%S')}  {len(rows)} query shapes, "
             f"{total_calls} calls, {rate:.1f} calls/s  (sorted by {sort})",
             f"{'calls/s':>8} {'calls':>9} {'total_ms':>11} {'mean_ms':>9} {'p99_ms':>9} "
             f"{'errors':>6} {'rows':>9} {'db/user':<18} query"]
    shown = rows[:limit] if limit > 0 else rows
    for r in shown:
        head = (f"{r['rate']:8.1f} {r['calls']:9d} {float(r['total_ms']):11.1f} "
                f"{float(r['mean_ms']):9.3f} {float(r['p99_ms']):9.3f} {r['errors']:6d} "
                f"{r['rows']:9d} {(r['database'] + '/' + r['user'])[:18]:<18} ")
        query = " ".join(str(r["query"] or f"({r['fingerprint']})").split())
        lines.append(head + query[:max(width - len(head), 10)])
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    import psycopg

    out = out or sys.stdout
    if args.dsn:
        conninfo: dict[str, Any] = {"conninfo": args.dsn}
    else:
        conninfo = {"host": args.host, "port": args.port, "dbname": "pgbouncer"}
        if args.user:
            conninfo["user"] = args.user
    try:
        conn = psycopg.connect(autocommit=True, **conninfo)
    except psycopg.Error as exc:
        print(f"pgpilot top: cannot reach the admin console: {exc}", file=sys.stderr)
        return 1
    previous: dict[tuple[str, str, str], int] | None = None
    last = time.monotonic()
    try:
        with conn:
            while True:
                rows = fetch(conn)
                now = time.monotonic()
                size = shutil.get_terminal_size((120, 40))
                limit = args.rows or (0 if args.once else max(size.lines - 3, 1))
                width = size.columns if out.isatty() else 1_000_000  # a file: whole lines
                screen = render(rows, previous, now - last, args.sort, limit, width)
                previous = {_key(r): r["calls"] for r in rows}
                last = now
                if args.once:
                    out.write(screen)
                    return 0
                out.write(CLEAR + screen)
                out.flush()
                time.sleep(max(args.delay, 0.1))
    except psycopg.Error as exc:
        print(f"pgpilot top: {exc}", file=sys.stderr)
        return 1


__all__ = ["add_arguments", "fetch", "render", "run"]
