"""The pooler's read/write split, measured on a real primary and two streaming replicas
(pgpilot.testbed), split on against split off (``read_write_split = 0``: the same pooler,
everything to the primary) and against a plain pooler (no ``replicas=``), rounds alternating:

- ``select-only``: ``pgbench -S -M simple`` (autocommit reads): tps, and the share of
  transactions the split sent to each node (``pgpilot_routed_transactions_total`` deltas on
  the pooler's metrics port);
- ``read-heavy``: 9 ``select-only`` to 1 ``simple-update`` (a read-write transaction) per
  client: tps and shares (a client's reads after its own write go to the primary until a
  replica has replayed it: the price of read-your-writes, shown here);
- ``write-only``: ``simple-update`` alone, a primary-only case: tps with the split on pays one
  ``pg_current_wal_insert_lsn()`` per transaction (read-your-writes), which this measures.

The poolers, pgbench and the three PostgreSQL servers share the machine's cores: the ratios,
not the absolute numbers, are what carries over.

    python bench/replicas.py [--rounds 3] [--seconds 8] [--clients 20]

Writes bench/results/replicas.json and bench/results/replicas.md.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from pgpilot.embedded import free_port
from pgpilot.testbed import ReplicationCluster, default_bin_dir

RESULTS = Path(__file__).resolve().parent / "results"
CASES = {
    "select-only": ["-b", "select-only", "-M", "simple"],
    "read-heavy": ["-b", "select-only@9", "-b", "simple-update@1", "-M", "simple"],
    "write-only": ["-b", "simple-update", "-M", "simple"],
}


METRICS_PORT = [0]


def _routed(metrics_port: int) -> dict[str, float]:
    """Transactions the split sent per target so far (the pooler's Prometheus counters)."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        found = re.match(r'pgpilot_routed_transactions_total\{database="postgres",'
                         r'target="(\w+)"\} ([\d.e+]+)', line)
        if found:
            out[found.group(1)] = float(found.group(2))
    return out


def _start_pooler(cluster: ReplicationCluster, folder: Path, variant: str) -> tuple[Any, int]:
    """variant: "on" (split), "off" (replicas named, read_write_split = 0), "plain" (no
    replicas= at all: the pooler as without this feature, fast path included), "python"
    (plain with fast_path = 0: what the split's own work costs, apart from the fast path)."""
    port = free_port()
    primary = cluster.nodes[cluster.primary_name]
    replicas = ",".join(f"127.0.0.1:{cluster.port(n)}" for n in cluster.replica_names)
    (folder / "userlist.txt").write_text('"postgres" ""\n')
    ini = folder / f"pgpilot-{variant}.ini"
    named = f" replicas={replicas}" if variant in ("on", "off") else ""
    ini.write_text(
        "[databases]\n"
        f"postgres = host=127.0.0.1 port={primary.port} dbname=postgres user=postgres"
        f"{named}\n"
        "[pgbouncer]\n"
        f"listen_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n"
        f"auth_type = trust\nauth_file = {folder / 'userlist.txt'}\n"
        "pool_mode = transaction\ndefault_pool_size = 20\nmax_client_conn = 1000\n"
        f"read_write_split = {int(variant == 'on')}\nreplica_check_interval = 0.05\n"
        "log_connections = 0\nlog_disconnections = 0\n"
        f"fast_path = {int(variant != 'python')}\n"
        + (f"metrics_port = {METRICS_PORT[0]}\n" if variant == "on" else ""))
    proc = subprocess.Popen([sys.executable, "-m", "pgpilot", "proxy", "--config", str(ini)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        done = subprocess.run([str(_bin("pg_isready")), "-h", "127.0.0.1", "-p", str(port)],
                              capture_output=True)
        if done.returncode == 0:
            return proc, port
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError("pgpilot proxy did not start")


def _bin(name: str) -> Path:
    found = default_bin_dir()
    return (found / name) if found else Path(name)


def _pgbench(port: int, args: list[str], clients: int, seconds: int) -> float:
    done = subprocess.run(
        [str(_bin("pgbench")), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "-n",
         "-c", str(clients), "-j", "2", "-T", str(seconds), *args, "postgres"],
        capture_output=True, text=True, timeout=seconds + 120)
    match = re.search(r"tps = ([\d.]+)", done.stdout)
    if done.returncode != 0 or match is None:
        raise RuntimeError(f"pgbench failed: {done.stderr[-500:]}")
    return float(match.group(1))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--clients", type=int, default=20)
    args = parser.parse_args()
    results: dict[str, Any] = {"rounds": args.rounds, "seconds": args.seconds,
                               "clients": args.clients, "cases": {}}
    with tempfile.TemporaryDirectory(prefix="pgpilot-bench-replicas-") as tmp, \
            ReplicationCluster(2) as cluster:
        dsn = cluster.primary_dsn
        subprocess.run([str(_bin("pgbench")), "-i", "-q", "-s", "2", dsn], check=True,
                       capture_output=True)
        cluster.wait_caught_up()
        variants = ("on", "off", "plain", "python")
        METRICS_PORT[0] = free_port()
        poolers = {v: _start_pooler(cluster, Path(tmp), v) for v in variants}
        try:
            for case, case_args in CASES.items():
                runs: dict[str, list[float]] = {v: [] for v in variants}
                shares: dict[str, list[float]] = {n: [] for n in cluster.nodes}
                _pgbench(poolers["on"][1], case_args, args.clients, 2)  # warm-up
                for _ in range(args.rounds):
                    for variant in variants:
                        if variant == "on":
                            before = _routed(METRICS_PORT[0])
                        tps = _pgbench(poolers[variant][1], case_args, args.clients,
                                       args.seconds)
                        runs[variant].append(tps)
                        if variant == "on":
                            after = _routed(METRICS_PORT[0])
                            total = sum(after.get(n, 0) - before.get(n, 0)
                                        for n in cluster.nodes) or 1
                            for n in cluster.nodes:
                                shares[n].append((after.get(n, 0) - before.get(n, 0)) / total)
                on, off = statistics.median(runs["on"]), statistics.median(runs["off"])
                plain = statistics.median(runs["plain"])
                python = statistics.median(runs["python"])
                results["cases"][case] = {
                    "tps_on": runs["on"], "tps_off": runs["off"], "tps_plain": runs["plain"],
                    "tps_python": runs["python"], "ratio": on / off, "ratio_plain": on / plain,
                    "ratio_python": on / python,
                    "share_on": {n: statistics.median(v) for n, v in shares.items()}}
                print(case, f"on {on:.0f} tps, off {off:.0f}, plain {plain:.0f}; "
                      f"python {python:.0f}; on/off {on / off:.2f}, on/plain {on / plain:.2f}, "
                      f"on/python {on / python:.2f}",
                      {n: f"{statistics.median(v):.0%}" for n, v in shares.items()},
                      flush=True)
        finally:
            for proc, _port in poolers.values():
                proc.terminate()
                proc.wait(10)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "replicas.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = ["# Read/write split: split on vs off", "",
             f"`python bench/replicas.py --rounds {args.rounds} --seconds {args.seconds} "
             f"--clients {args.clients}`: pgbench -M simple, scale 2, {args.clients} clients, "
             "one primary and two streaming replicas on this machine, medians of the rounds.",
             "Split off: the same `replicas=` line with `read_write_split = 0`; plain: no "
             "`replicas=` (the pooler without this feature, its fast path included); python: "
             "plain with `fast_path = 0`, the same Python path the split runs on.",
             "", "| case | split on (tps) | split off (tps) | plain (tps) | python (tps) | "
             "on / plain | on / python | share of transactions, split on (primary / replica1 "
             "/ replica2) |", "|---|---|---|---|---|---|---|---|"]
    for case, r in results["cases"].items():
        on, off = statistics.median(r["tps_on"]), statistics.median(r["tps_off"])
        plain = statistics.median(r["tps_plain"])
        python = statistics.median(r["tps_python"])
        share = " / ".join(f"{r['share_on'][n]:.0%}" for n in ("primary", "replica1",
                                                              "replica2"))
        lines.append(f"| {case} | {on:.0f} | {off:.0f} | {plain:.0f} | {python:.0f} | "
                     f"{r['ratio_plain']:.2f}x | {r['ratio_python']:.2f}x | {share} |")
    (RESULTS / "replicas.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
