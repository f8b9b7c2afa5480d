"""Wake-ups and CPU per connection or transaction: pgpilot and PgBouncer, alternating.

`bench/pooler.py` says how fast each pooler is; this says why. For each round it starts a
fresh PgBouncer and a fresh pgpilot (the same `pgbouncer.ini`, as `bench/pooler.py` writes it)
and counts, in the pooler process only, its `epoll_wait` calls and context switches (under
`perf stat`) and its CPU time, user and system apart (`/proc/<pid>/stat`); for the pgbench
modes also the TCP segments the machine sent per transaction or connection (`/proc/net/snmp`):

- ``logins``: the scale case's first phase, 10,000 clients logging in (trust) from one
  uvloop process (``bench/pooler.py --loadgen``), then 100 of them querying for 8 s;
- ``churn``: ``pgbench -S -C`` (a new connection per transaction), SCRAM, 10 clients;
- ``churn-logged``: the same with log_connections / log_disconnections on;
- ``select``: ``pgbench -S -M simple``, 10 clients on a pool of 20 (a server per client):
  per transaction, where both poolers do the same system calls.

Needs ``perf`` (Debian: linux-perf) for the counts; without it, CPU time alone is printed.

    python bench/pooler_wakeups.py logins --rounds 3
    python bench/pooler_wakeups.py churn churn-logged --rounds 3 --seconds 6
    python bench/pooler_wakeups.py select --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import pooler as bench  # this folder's pooler.py: one set of poolers and settings

EVENTS = "syscalls:sys_enter_epoll_wait,context-switches"
CASE_OF = {"logins": "scale-10k", "churn": "churn-scram-10",
           "churn-logged": "churn-scram-10-logged", "select": "select-simple-10"}


class Counting:
    """``perf stat`` on one process from now until stop(); stop() returns the counts."""

    def __init__(self, pid: int, out: Path) -> None:
        self.out = out
        self.proc: subprocess.Popen[bytes] | None = None
        if shutil.which("perf"):
            self.proc = subprocess.Popen(
                ["perf", "stat", "-x,", "-e", EVENTS, "-p", str(pid), "-o", str(out)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(0.3)  # attached before the clients come

    def stop(self) -> dict[str, float]:
        if self.proc is None:
            return {}
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait(10)
        counts: dict[str, float] = {}
        for line in self.out.read_text().splitlines():
            fields = line.split(",")
            if len(fields) > 2 and re.fullmatch(r"\d+", fields[0]):
                counts[fields[2]] = float(fields[0])
        return counts


def tcp_segments_sent() -> int:
    """TCP segments sent by the whole machine so far (/proc/net/snmp, Tcp OutSegs): the
    clients, the pooler and PostgreSQL all talk over loopback TCP, so per transaction this
    counts the messages each way and any bare ACKs the poolers' sockets cause."""
    lines = [ln.split() for ln in Path("/proc/net/snmp").read_text().splitlines()
             if ln.startswith("Tcp:")]
    header, values = lines[0], lines[1]
    return int(values[header.index("OutSegs")])


def per_unit(counts: dict[str, float], n: int, unit: str) -> str:
    if not counts or not n:
        return ""
    wait = counts.get("syscalls:sys_enter_epoll_wait", float("nan")) / n
    switches = counts.get("context-switches", float("nan")) / n
    return f"  epoll_wait/{unit} {wait:6.3f}  context switches/{unit} {switches:6.3f}"


def cpu_split(before: tuple[float, float], after: tuple[float, float], n: int,
              unit: str) -> str:
    user = (after[0] - before[0]) / max(n, 1) * 1e6
    system = (after[1] - before[1]) / max(n, 1) * 1e6
    return f"CPU {user + system:6.1f} us/{unit} (user {user:5.1f}, system {system:6.1f})"


def logins(kind: str, case: bench.Case, up: bench.Upstream, secret: str, tmp: Path,
           clients: int, seconds: float, rows: int) -> str:
    pooler = bench.start_pooler(kind, case, up, secret, tmp)
    try:
        bench.warm_up(pooler)
        cpu0 = bench.user_system_seconds(pooler.pid)
        counting = Counting(pooler.pid, tmp / f"stat-{kind}.txt")
        gen = bench.start_loadgen(pooler, clients, 100, seconds, rows)
        assert gen.stdin is not None and gen.stdout is not None
        connected = json.loads(gen.stdout.readline())
        counts = counting.stop()
        cpu1 = bench.user_system_seconds(pooler.pid)
        gen.stdin.write("go\n")
        gen.stdin.flush()
        done = json.loads(gen.stdout.readline())
        cpu2 = bench.user_system_seconds(pooler.pid)
        gen.stdin.write("close\n")
        gen.stdin.flush()
        gen.wait(60)
        ok = int(connected["ok"])
        return (f"{ok} logins in {connected['seconds']:.2f} s, {connected['errors']} errors, "
                + cpu_split(cpu0, cpu1, ok, "login")
                + per_unit(counts, ok, "login")
                + f" | then {done['tps']:.0f} tps, "
                + cpu_split(cpu1, cpu2, int(done["txns"]), "tx"))
    finally:
        pooler.stop()
        shutil.rmtree(pooler.workdir, ignore_errors=True)


def pgbench_run(kind: str, case: bench.Case, up: bench.Upstream, secret: str, tmp: Path,
                seconds: float) -> str:
    """One pgbench run through a fresh pooler: per transaction (with ``-C``, per connection)."""
    unit, rate = ("conn", "connections/s") if "-C" in case.args else ("tx", "tps")
    pooler = bench.start_pooler(kind, case, up, secret, tmp)
    try:
        bench.run_pgbench(case, pooler.port, 1, tmp, with_log=False)  # warm-up
        cpu0 = bench.user_system_seconds(pooler.pid)
        counting = Counting(pooler.pid, tmp / f"stat-{kind}.txt")
        segments0 = tcp_segments_sent()
        out, err, rc, _ = bench.run_pgbench(case, pooler.port, seconds, tmp, with_log=False)
        segments = tcp_segments_sent() - segments0
        counts = counting.stop()
        cpu1 = bench.user_system_seconds(pooler.pid)
        res = bench.RunResult(kind, 0)
        bench.parse_pgbench(out, err, rc, res)
        n = res.txns
        return (f"{res.tps:8.1f} {rate}, " + cpu_split(cpu0, cpu1, n, unit)
                + per_unit(counts, n, unit) + f"  TCP segments/{unit} {segments / max(n, 1):5.2f}")
    finally:
        pooler.stop()
        shutil.rmtree(pooler.workdir, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", nargs="+", choices=sorted(CASE_OF))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=6.0, help="measured seconds")
    parser.add_argument("--clients", type=int, default=10_000, help="logins: how many")
    parser.add_argument("--dsn", help="use this PostgreSQL instead of an embedded one")
    parser.add_argument("--data-dir", help="embedded PostgreSQL data folder (kept, reused)")
    args = parser.parse_args()
    bench.raise_nofile()
    os.environ["PYTHONPATH"] = str(bench.ROOT / "src") + os.pathsep + os.environ.get(
        "PYTHONPATH", "")
    tmp = Path(tempfile.mkdtemp(prefix="pgpilot-wakeups-"))
    tmp.chmod(0o755)
    up = bench.start_upstream(argparse.Namespace(dsn=args.dsn, data_dir=args.data_dir), tmp)
    try:
        scale = 10
        secret = bench.prepare_data(up, scale, reuse=bool(args.data_dir or args.dsn))
        for what in args.what:
            case = next(c for c in bench.CASES if c.name == CASE_OF[what])
            print(f"== {what}: {case.title}", flush=True)
            for rnd in range(1, args.rounds + 1):
                for kind in bench.POOLERS:
                    if what == "logins":
                        line = logins(kind, case, up, secret, tmp, args.clients, args.seconds,
                                      scale * 100_000)
                    else:
                        line = pgbench_run(kind, case, up, secret, tmp, args.seconds)
                    print(f"r{rnd} {kind:9s} {line}", flush=True)
    finally:
        if up.embedded is not None:
            up.embedded.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
