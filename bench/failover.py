"""Failover through the pooler's read/write split, measured on the replication test bed
(pgpilot.testbed: a primary and two streaming replicas on this machine), with the pooler as a
separate process (``pgpilot proxy``), for each ``replica_check_interval`` given:

- ``replica-stop``: 20 reader threads run ``SELECT inet_server_port()`` without pause through
  the pooler; replica1 is stopped (``pg_ctl -m fast``). Measured: client errors (and their
  SQLSTATEs), how long after the stop began the last error and the last read served by
  replica1 came, and that no error came once the stop had returned plus one health interval.
- ``primary-failover``: 10 writer threads insert numbered rows through the pooler, each in its
  own autocommit statement (a thread reconnects after an error, and never retries a row that
  got an error); the primary is stopped (``pg_ctl -m fast``) and replica1 promoted
  (``pg_promote``, as an orchestrator would). Measured: the time from the stop until the first
  write that succeeded on the new primary (the recovery time: Pgpool-II documents 3-10 s), the
  part of it after the promotion returned (the pooler's own detection), the errors, and, on the
  new primary, that every acknowledged row is there exactly once (nothing lost, nothing retried).

    python bench/failover.py [--rounds 3] [--intervals 0.1,0.5,1.0]

Writes bench/results/failover.json and bench/results/failover.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psycopg

from pgpilot.embedded import free_port
from pgpilot.testbed import ReplicationCluster, default_bin_dir

RESULTS = Path(__file__).resolve().parent / "results"
PORT_SQL = "SELECT inet_server_port()"


def _bin(name: str) -> Path:
    found = default_bin_dir()
    return (found / name) if found else Path(name)


def _start_pooler(cluster: ReplicationCluster, folder: Path,
                  interval: float) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    primary = cluster.nodes[cluster.primary_name]
    replicas = ",".join(f"127.0.0.1:{cluster.port(n)}" for n in cluster.replica_names)
    (folder / "userlist.txt").write_text('"postgres" ""\n')
    ini = folder / "pgpilot.ini"
    ini.write_text(
        "[databases]\n"
        f"app = host=127.0.0.1 port={primary.port} dbname=postgres user=postgres "
        f"replicas={replicas}\n"
        "[pgbouncer]\n"
        f"listen_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n"
        f"auth_type = trust\nauth_file = {folder / 'userlist.txt'}\n"
        "pool_mode = transaction\ndefault_pool_size = 20\nmax_client_conn = 1000\n"
        f"read_write_split = 1\nreplica_check_interval = {interval}\n"
        "server_login_retry = 0.1\nserver_connect_timeout = 2\n"
        "log_connections = 0\nlog_disconnections = 0\n")
    proc = subprocess.Popen([sys.executable, "-m", "pgpilot", "proxy", "--config", str(ini)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with psycopg.connect(f"postgresql://postgres@127.0.0.1:{port}/app",
                                 autocommit=True, connect_timeout=2) as conn:
                # both replicas in the read set: reads reach each of them
                seen = {conn.execute(PORT_SQL).fetchone()[0] for _ in range(20)}  # type: ignore[index]
                if seen == {cluster.port(n) for n in cluster.replica_names}:
                    return proc, port
        except psycopg.Error:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("pgpilot proxy did not start")


def _replica_stop(cluster: ReplicationCluster, port: int, interval: float) -> dict[str, Any]:
    dsn = f"postgresql://postgres@127.0.0.1:{port}/app"
    first = cluster.replica_names[0]
    first_port = cluster.port(first)
    stop = threading.Event()
    lock = threading.Lock()
    reads: list[tuple[float, int]] = []
    errors: list[tuple[float, str]] = []

    def reader() -> None:
        conn: psycopg.Connection[Any] | None = None
        while not stop.is_set():
            try:
                if conn is None or conn.closed:
                    conn = psycopg.connect(dsn, autocommit=True, connect_timeout=5)
                row = conn.execute(PORT_SQL).fetchone()
                with lock:
                    reads.append((time.monotonic(), int(row[0])))  # type: ignore[index]
            except psycopg.Error as exc:
                with lock:
                    errors.append((time.monotonic(), str(exc.sqlstate)))
                conn = None
        if conn is not None:
            conn.close()

    threads = [threading.Thread(target=reader) for _ in range(20)]
    for t in threads:
        t.start()
    time.sleep(2)
    started = time.monotonic()
    cluster.stop_node(first)
    stopped = time.monotonic()
    time.sleep(max(2.0, interval * 4))
    stop.set()
    for t in threads:
        t.join()
    on_first = [t for t, p in reads if p == first_port and t >= started]
    after = [e for e in errors if e[0] > stopped + interval]
    return {
        "stop_seconds": stopped - started,
        "errors": len(errors),
        "sqlstates": sorted({s for _, s in errors}),
        "last_error_after": max((t - started for t, _ in errors), default=0.0),
        "last_read_on_stopped_after": max((t - started for t in on_first), default=0.0),
        "errors_after_stop_plus_interval": len(after),
        "reads_during": sum(1 for t, _ in reads if t >= started),
    }


def _primary_failover(cluster: ReplicationCluster, port: int) -> dict[str, Any]:
    dsn = f"postgresql://postgres@127.0.0.1:{port}/app"
    cluster.execute(cluster.primary_name, "DROP TABLE IF EXISTS failover_rows")
    cluster.execute(cluster.primary_name,
                    "CREATE TABLE failover_rows (writer int, n int, PRIMARY KEY (writer, n))")
    cluster.wait_caught_up()
    first = cluster.replica_names[0]
    new_port = cluster.port(first)
    stop = threading.Event()
    lock = threading.Lock()
    acked: list[tuple[int, int]] = []
    errors: list[tuple[float, str]] = []
    writes_on_new: list[float] = []
    messages: dict[str, str] = {}

    def writer(w: int) -> None:
        conn: psycopg.Connection[Any] | None = None
        n = 0
        while not stop.is_set():
            n += 1
            try:
                if conn is None or conn.closed:
                    conn = psycopg.connect(dsn, autocommit=True, connect_timeout=5)
                row = conn.execute("INSERT INTO failover_rows VALUES (%s, %s) "
                                   "RETURNING inet_server_port()", (w, n)).fetchone()
                with lock:
                    acked.append((w, n))
                    if row is not None and int(row[0]) == new_port:
                        writes_on_new.append(time.monotonic())
            except psycopg.Error as exc:
                with lock:
                    errors.append((time.monotonic(), str(exc.sqlstate)))
                    messages.setdefault(str(exc.sqlstate), str(exc).strip()[:160])
                conn = None
                time.sleep(0.01)
        if conn is not None:
            conn.close()

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(10)]
    for t in threads:
        t.start()
    time.sleep(2)
    started = time.monotonic()
    cluster.stop_node("primary")
    stopped = time.monotonic()
    cluster.promote(first)
    promoted = time.monotonic()
    deadline = promoted + 60
    while time.monotonic() < deadline:
        with lock:
            if writes_on_new:
                break
        time.sleep(0.01)
    time.sleep(1)
    stop.set()
    for t in threads:
        t.join()
    resumed = min(writes_on_new) if writes_on_new else float("nan")
    rows = psycopg.connect(cluster.dsn(first), autocommit=True).execute(
        "SELECT writer, n FROM failover_rows").fetchall()
    present = {(int(w), int(n)) for w, n in rows}
    return {
        "stop_seconds": stopped - started,
        "promote_seconds": promoted - stopped,
        "recovery_seconds": resumed - started,
        "after_promotion_seconds": resumed - promoted,
        "errors": len(errors),
        "sqlstates": sorted({s for _, s in errors}),
        "messages": messages,
        "acknowledged": len(acked),
        "lost": len(set(acked) - present),
        "rows_without_ack": len(present - set(acked)),
        "duplicates": len(rows) - len(present),
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--intervals", default="0.1,0.5,1.0")
    parser.add_argument("--markdown-only", action="store_true",
                        help="rewrite failover.md from failover.json, measuring nothing")
    args = parser.parse_args()
    if args.markdown_only:
        results = json.loads((RESULTS / "failover.json").read_text())
        args.rounds, args.intervals = results["rounds"], ",".join(results["intervals"])
        _markdown(results, args)
        return 0
    intervals = [float(x) for x in args.intervals.split(",")]
    results = {"rounds": args.rounds, "intervals": {}}
    with tempfile.TemporaryDirectory(prefix="pgpilot-bench-failover-") as tmp, \
            ReplicationCluster(2) as cluster:
        for interval in intervals:
            out: dict[str, list[dict[str, Any]]] = {"replica-stop": [], "primary-failover": []}
            for r in range(args.rounds):
                for case in out:
                    cluster.reset()
                    folder = Path(tmp) / f"{interval}-{r}-{case}"
                    folder.mkdir()
                    proc, port = _start_pooler(cluster, folder, interval)
                    try:
                        got = (_replica_stop(cluster, port, interval) if case == "replica-stop"
                               else _primary_failover(cluster, port))
                    finally:
                        proc.terminate()
                        proc.wait(10)
                    out[case].append(got)
                    print(f"interval {interval}: {case}", got, flush=True)
            results["intervals"][str(interval)] = out
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "failover.json").write_text(json.dumps(results, indent=2) + "\n")
    _markdown(results, args)
    return 0


def _markdown(results: dict[str, Any], args: argparse.Namespace) -> None:
    med = statistics.median
    lines = [
        "# Failover through the read/write split", "",
        f"`python bench/failover.py --rounds {args.rounds} --intervals {args.intervals}`: one "
        "primary and two streaming replicas on this 2-core machine (pgpilot.testbed), the "
        "pooler as its own process, `pool_mode = transaction`; medians (min-max) of the rounds.",
        "", "**A replica stopped under 20 readers**", "",
        "| replica_check_interval (s) | errors | SQLSTATEs | last error after the stop began (s) "
        "| last read on it (s) | errors later than stop + interval | reads meanwhile |",
        "|---|---|---|---|---|---|---|"]

    def span(values: list[float], fmt: str = "{:.2f}") -> str:
        return (fmt.format(med(values)) + " (" + fmt.format(min(values)) + "-"
                + fmt.format(max(values)) + ")")

    for interval, out in results["intervals"].items():
        rs = out["replica-stop"]
        lines.append(
            f"| {interval} | {span([r['errors'] for r in rs], '{:.0f}')} | "
            f"{', '.join(sorted({s for r in rs for s in r['sqlstates']})) or '-'} | "
            f"{span([r['last_error_after'] for r in rs])} | "
            f"{span([r['last_read_on_stopped_after'] for r in rs])} | "
            f"{sum(r['errors_after_stop_plus_interval'] for r in rs)} | "
            f"{span([r['reads_during'] for r in rs], '{:.0f}')} |")
    lines += ["", "**The primary stopped, replica1 promoted, under 10 writers**", "",
              "| replica_check_interval (s) | recovery: stop began -> first write on the new "
              "primary (s) | of which after the promotion returned (s) | promotion (s) | "
              "errors | SQLSTATEs | acknowledged writes | lost | duplicated |",
              "|---|---|---|---|---|---|---|---|---|"]
    for interval, out in results["intervals"].items():
        fs = out["primary-failover"]
        lines.append(
            f"| {interval} | {span([f['recovery_seconds'] for f in fs])} | "
            f"{span([f['after_promotion_seconds'] for f in fs])} | "
            f"{span([f['promote_seconds'] for f in fs])} | "
            f"{span([f['errors'] for f in fs], '{:.0f}')} | "
            f"{', '.join(sorted({s for f in fs for s in f['sqlstates']})) or '-'} | "
            f"{span([f['acknowledged'] for f in fs], '{:.0f}')} | "
            f"{sum(f['lost'] for f in fs)} | {sum(f['duplicates'] for f in fs)} |")
    (RESULTS / "failover.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
