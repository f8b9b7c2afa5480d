"""The pooler's read/write split, measured on a real primary and two streaming replicas
(pgpilot.testbed), split on against split off (``read_write_split = 0``: the same pooler,
everything to the primary) and against a plain pooler (no ``replicas=``), rounds alternating:

- ``select-only``: ``pgbench -S -M simple`` (autocommit reads): tps, and the share of
  transactions the split sent to each node (``pgpilot_routed_transactions_total`` deltas on
  the pooler's metrics port);
- ``read-heavy``: 9 ``select-only`` to 1 ``simple-update`` (a read-write transaction) per
  client: tps and shares (a client's reads after its own write go to the primary until a
  replica has replayed it: the price of read-your-writes, shown here);
- ``readers-and-writers``: 18 clients ``select-only`` and 2 ``simple-update`` at once, two
  pgbench processes (tps summed): readers that never write read from the replicas;
- ``write-only``: ``simple-update`` alone, a primary-only case: with the split on, the
  compiled fast path serves these transactions itself (they begin with a read-write
  ``BEGIN``), and read-your-writes needs no query per transaction (the health check samples
  the primary's position).

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
    # readers and writers apart (a web app's many pages that only read, a few that write):
    # 90% of the clients run select-only, the others simple-update, two pgbench at once
    "readers-and-writers": ["-b", "select-only", "-M", "simple", "+", "-b", "simple-update",
                            "-M", "simple"],
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
        found = re.match(r'pgpilot_routed_to_primary_total\{database="postgres",'
                         r'reason="may_write"\} ([\d.e+]+)', line)
        if found:
            out["writes"] = float(found.group(1))
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
    """tps of one pgbench run; ``args`` with a ``+``: two pgbench at once (the first with 90%
    of the clients), their tps summed."""
    if "+" in args:
        cut = args.index("+")
        parts = [(args[:cut], clients - max(1, clients // 10)),
                 (args[cut + 1:], max(1, clients // 10))]
    else:
        parts = [(args, clients)]
    procs = [subprocess.Popen(
        [str(_bin("pgbench")), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "-n",
         "-c", str(n), "-j", str(min(2, n)), "-T", str(seconds), *part, "postgres"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for part, n in parts]
    total = 0.0
    for proc in procs:
        out, err = proc.communicate(timeout=seconds + 120)
        match = re.search(r"tps = ([\d.]+)", out)
        if proc.returncode != 0 or match is None:
            raise RuntimeError(f"pgbench failed: {err[-500:]}")
        total += float(match.group(1))
    return total


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--cases", default=",".join(CASES),
                        help="comma-separated, of: " + ", ".join(CASES))
    parser.add_argument("--label", default="",
                        help="write replicas-LABEL.json/.md (the default run keeps its files)")
    args = parser.parse_args()
    cases = {name: CASES[name] for name in args.cases.split(",")}
    stem = f"replicas-{args.label}" if args.label else "replicas"
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
            for case, case_args in cases.items():
                runs: dict[str, list[float]] = {v: [] for v in variants}
                shares: dict[str, list[float]] = {n: [] for n in cluster.nodes}
                replica_reads: list[float] = []
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
                            # reads: what did not go to the primary because it may write
                            delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
                            reads = total - delta.get("writes", 0)
                            replica_reads.append(sum(delta.get(n, 0) for n in cluster.nodes
                                                     if n != "primary") / (reads or 1))
                on, off = statistics.median(runs["on"]), statistics.median(runs["off"])
                plain = statistics.median(runs["plain"])
                python = statistics.median(runs["python"])
                results["cases"][case] = {
                    "tps_on": runs["on"], "tps_off": runs["off"], "tps_plain": runs["plain"],
                    "tps_python": runs["python"], "ratio": on / off, "ratio_plain": on / plain,
                    "ratio_python": on / python,
                    "share_on": {n: statistics.median(v) for n, v in shares.items()},
                    "reads_on_replicas": statistics.median(replica_reads)}
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
    (RESULTS / f"{stem}.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = ["# Read/write split: split on vs off", "",
             f"`python bench/replicas.py --rounds {args.rounds} --seconds {args.seconds} "
             f"--clients {args.clients}"
             + (f" --cases {args.cases} --label {args.label}" if args.label else "")
             + f"`: pgbench -M simple, scale 2, {args.clients} clients, "
             "one primary and two streaming replicas on this machine, medians of the rounds.",
             "Split off: the same `replicas=` line with `read_write_split = 0`; plain: no "
             "`replicas=` (the pooler without this feature, its fast path included); python: "
             "plain with `fast_path = 0`, the same Python path the split runs on.",
             "", "| case | split on (tps) | split off (tps) | plain (tps) | python (tps) | "
             "on / plain | on / python | share of transactions, split on (primary / replica1 "
             "/ replica2) | reads served by replicas |", "|---|---|---|---|---|---|---|---|---|"]
    for case, r in results["cases"].items():
        on, off = statistics.median(r["tps_on"]), statistics.median(r["tps_off"])
        plain = statistics.median(r["tps_plain"])
        python = statistics.median(r["tps_python"])
        share = " / ".join(f"{r['share_on'][n]:.0%}" for n in ("primary", "replica1",
                                                              "replica2"))
        reads = r.get("reads_on_replicas")
        lines.append(f"| {case} | {on:.0f} | {off:.0f} | {plain:.0f} | {python:.0f} | "
                     f"{r['ratio_plain']:.2f}x | {r['ratio_python']:.2f}x | {share} | "
                     + ("-" if reads is None or case == "write-only" else f"{reads:.0%}")
                     + " |")
    lines += ["", "Paired per round (the variants of a round run one after another): on / off "
              "and on / plain, median (min-max) of the rounds.", "",
              "| case | on / off | on / plain |", "|---|---|---|"]
    for case, r in results["cases"].items():
        pairs = [[a / b for a, b in zip(r["tps_on"], r[f"tps_{v}"], strict=True)]
                 for v in ("off", "plain")]
        lines.append(f"| {case} | " + " | ".join(
            f"{statistics.median(x):.2f} ({min(x):.2f}-{max(x):.2f})" for x in pairs) + " |")
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
