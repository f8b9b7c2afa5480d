"""What per-query statistics cost the pooler: pgpilot with ``query_stats = 1`` against itself with
``query_stats = 0``, side by side, in one run.

``python bench/stats_cost.py [--abba] [--rounds N] [--cases NAME ...] [pooler.py's options]``

It runs ``bench/pooler.py``'s pgbench cases with its machinery unchanged (fresh pooler per run,
warm-up, the A/B alternation round by round, the paired ratio and its 95 % interval), with
the anchor's slot taken by pgpilot with statistics off: "pgbouncer" in that run's
``pooler.json`` is pgpilot ``query_stats = 0``, "pgpilot" is ``query_stats = 1``. The cases
PgBouncer runs differently (``-M extended`` for the prepared case, two processes for the
reuseport case) run the same for both here. The scale case (not pgbench) is left out unless
named. Writes ``bench/results/stats-cost/pooler.json`` and ``bench/results/stats-cost.md``:
per case the tps with statistics off and on and the paired ratio (on / off) with its
interval; the goal is every ratio's interval reaching 0.97 or above. ``--abba``: the side that
runs first alternates round by round (pooler.py always runs the anchor first), written to
``bench/results/stats-cost-abba/`` and ``stats-cost-abba.md``.

On a machine whose cores are all busy (pgbench, PostgreSQL and the pooler share 2 cores), tps
follows the CPU every process spends per transaction, and tps itself moves by 10 % or more from
run to run with the machine's other load. So each measured run also records, over the same
window: the pooler's CPU (its process tree), pgbench's (the bench's reaped children), the
PostgreSQL server's (the postmaster's process tree, plus what its exited children used) and
the whole machine's busy time (``/proc/stat``: every process, other users' included), each per
transaction in microseconds; the Markdown shows each one's on / off ratio paired by round, as
the geometric mean of the per-round ratios with a 95 % bootstrap interval (10,000 resamples of
the rounds, a fixed seed). "all processes" is pooler + pgbench + PostgreSQL.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import math
import os
import random
import resource
import statistics
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def load_pooler_bench() -> Any:
    spec = importlib.util.spec_from_file_location("bench_pooler", HERE / "pooler.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_pooler"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


# -- CPU per transaction of every process, not only the pooler's ---------------------------

# Seconds of CPU (each a sum of utime + stime) by what spent them, per measured run.
CPU_PARTS = ("pooler", "pgbench", "postgres", "all", "machine")


def machine_busy_seconds() -> float:
    """The machine's busy CPU time since boot (all cores, /proc/stat: user, nice, system,
    irq, softirq and steal; not idle nor iowait)."""
    with open("/proc/stat") as fh:
        fields = [int(x) for x in fh.readline().split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def postmaster_pid(bench: Any, up: Any) -> int | None:
    """The PostgreSQL server's postmaster (the first line of its data folder's postmaster.pid)."""
    with contextlib.suppress(Exception):
        data_dir = Path(up.psql("SHOW data_directory"))
        return int((data_dir / "postmaster.pid").read_text().split()[0])
    return None


def server_seconds(bench: Any, pid: int | None) -> float:
    """CPU of the postmaster, its live processes and the children it has reaped (a backend
    that ended: cutime + cstime), in seconds."""
    if pid is None:
        return float("nan")
    total = bench.cpu_seconds(pid)
    with contextlib.suppress(OSError, ValueError, IndexError), open(f"/proc/{pid}/stat") as fh:
        stat = fh.read()
        fields = stat[stat.rindex(")") + 2:].split()
        total += (int(fields[13]) + int(fields[14])) / bench.TICKS  # cutime, cstime
    return total


def children_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def patch_cpu(bench: Any) -> None:
    """Each measured run (pooler.py's measure_pgbench, its logged pgbench run) also records
    the CPU seconds of pgbench, of PostgreSQL and of the machine over the run, in
    ``extra["cpu"]`` (with the pooler's, which pooler.py measures), and per transaction in
    microseconds in ``extra["cpu_us_per_tx"]``."""
    original_measure, original_run = bench.measure_pgbench, bench.run_pgbench
    window: dict[str, Any] = {}

    def run_pgbench(case: Any, port: int, seconds: float, tmp: Path, with_log: bool = True,
                    user: str = bench.BENCH_USER) -> Any:
        if not with_log:  # the warm-up
            return original_run(case, port, seconds, tmp, with_log, user)
        pid = window.get("postmaster")
        before = (children_seconds(), server_seconds(bench, pid), machine_busy_seconds())
        try:
            return original_run(case, port, seconds, tmp, with_log, user)
        finally:
            after = (children_seconds(), server_seconds(bench, pid), machine_busy_seconds())
            window["measured"] = {"pgbench": after[0] - before[0],
                                  "postgres": after[1] - before[1],
                                  "machine": after[2] - before[2]}

    def measure_pgbench(case: Any, target: str, rnd: int, up: Any, secret: str, st: Any,
                        tmp: Path) -> Any:
        if "postmaster" not in window:
            window["postmaster"] = postmaster_pid(bench, up)
        window.pop("measured", None)
        res = original_measure(case, target, rnd, up, secret, st, tmp)
        measured = window.pop("measured", None)
        if measured is not None and res.ok and res.txns:
            cpu = {"pooler": res.cpu_s, **measured}
            cpu["all"] = cpu["pooler"] + cpu["pgbench"] + cpu["postgres"]
            res.extra["cpu"] = cpu
            res.extra["cpu_us_per_tx"] = {k: v / res.txns * 1e6 for k, v in cpu.items()}
            bench.log("    cpu us/tx: " + "  ".join(
                f"{k} {v:.1f}" for k, v in res.extra["cpu_us_per_tx"].items()))
        return res

    bench.run_pgbench = run_pgbench
    bench.measure_pgbench = measure_pgbench


def bootstrap_interval(ratios: list[float], resamples: int = 10_000,
                       seed: int = 29) -> tuple[float, float, float]:
    """Geometric mean of paired ratios and its 95 % percentile bootstrap interval (the rounds
    resampled with replacement)."""
    logs = [math.log(r) for r in ratios if r == r and r > 0]
    if len(logs) < 2:  # no interval: the geometric mean alone (or nothing), as pooler.py's
        return load_pooler_bench().ratio_interval(ratios)
    mean = statistics.fmean(logs)
    rng = random.Random(seed)
    means = sorted(statistics.fmean(rng.choices(logs, k=len(logs))) for _ in range(resamples))
    lo, hi = means[int(0.025 * resamples)], means[int(0.975 * resamples) - 1]
    return math.exp(mean), math.exp(lo), math.exp(hi)


def paired_cpu(case: dict[str, Any], part: str) -> tuple[float, float, list[float]]:
    """Median CPU per transaction (us) off and on of ``part``, and the per-round on/off
    ratios."""
    runs = case.get("runs", {})
    off = {r["round"]: r for r in runs.get("pgbouncer", [])
           if r.get("ok") and "cpu_us_per_tx" in r.get("extra", {})}
    pairs = [(off[r["round"]]["extra"]["cpu_us_per_tx"][part], r["extra"]["cpu_us_per_tx"][part])
             for r in runs.get("pgpilot", [])
             if r.get("ok") and "cpu_us_per_tx" in r.get("extra", {}) and r["round"] in off]
    pairs = [(a, b) for a, b in pairs if a == a and b == b and a > 0]
    if not pairs:
        return float("nan"), float("nan"), []
    return (statistics.median(a for a, _ in pairs), statistics.median(b for _, b in pairs),
            [b / a for a, b in pairs])


def patch(bench: Any, order: str = "abab") -> None:
    """The anchor's slot runs pgpilot with query_stats = 0; pgpilot's with query_stats = 1."""
    original_ini, original_start = bench.pooler_ini, bench.start_pooler
    anchor = {"on": False}

    def pooler_ini(kind: str, case: Any, port: int, up: Any, userlist: Path) -> str:
        text = original_ini("pgpilot", case, port, up, userlist)
        return text + f"query_stats = {0 if anchor['on'] else 1}\n"

    def start_pooler(kind: str, case: Any, up: Any, secret: str, base: Path) -> Any:
        anchor["on"] = kind == "pgbouncer"
        try:
            return original_start("pgpilot", case, up, secret, base)
        finally:
            anchor["on"] = False

    bench.pooler_ini = pooler_ini
    bench.start_pooler = start_pooler
    # PgBouncer itself is not run: its absence must not stop the run.
    which = bench.shutil.which

    class _Shutil:
        def __getattr__(self, name: str) -> Any:
            return getattr(bench_shutil, name)

        @staticmethod
        def which(tool: str) -> str | None:
            return which(tool) or ("(not needed)" if tool == "pgbouncer" else None)

    bench_shutil = bench.shutil
    bench.shutil = _Shutil()
    # (no direct pgbench run: nothing here compares with it)
    bench.CASES = tuple(dataclasses.replace(c, pgbouncer_args=None, pgbouncer_processes=1,
                                            direct=False) for c in bench.CASES)
    if order == "abba":
        def iter_order(case: Any, rounds: int) -> Any:
            """Off then on in odd rounds, on then off in even ones: a run that leaves the
            next one a slower database (tpcb's dead rows) does not always hit the same side."""
            if case.direct:
                yield "direct", 1
            for rnd in range(1, rounds + 1):
                pair = ("pgbouncer", "pgpilot") if rnd % 2 else ("pgpilot", "pgbouncer")
                for target in pair:
                    yield target, rnd

        bench.iter_order = iter_order


def cpu_cells(case: dict[str, Any]) -> str:
    """The pooler's CPU per 100k transactions off and on (medians) and the paired ratio."""
    runs = case.get("runs", {})
    off = {r["round"]: r for r in runs.get("pgbouncer", []) if r.get("ok")}
    on = [r for r in runs.get("pgpilot", []) if r.get("ok") and r["round"] in off]
    pairs = [(off[r["round"]]["cpu_per_100k"], r["cpu_per_100k"]) for r in on]
    pairs = [(a, b) for a, b in pairs if a == a and b == b and a > 0]
    if not pairs:
        return "– | – | –"
    mean, lo, hi = load_pooler_bench().ratio_interval([b / a for a, b in pairs])
    return (f"{statistics.median(a for a, _ in pairs):.2f} s | "
            f"{statistics.median(b for _, b in pairs):.2f} s | {mean:.3f} ({lo:.3f} – {hi:.3f})")


def render(report: dict[str, Any]) -> str:
    lines = [
        "# Cost of per-query statistics (`query_stats`)",
        "",
        f"`{report.get('command', '')}` (bench/stats_cost.py), started {report.get('started')}, "
        f"{report.get('elapsed_s')} s.",
        "",
        "pgpilot against itself: statistics off (`query_stats = 0`) and on (the default), "
        "alternated round by round, each run a fresh pooler process. Ratio: on / off, the "
        "geometric mean of the per-round tps ratios with its 95 % interval (1.00 = no cost). "
        "CPU on/off: the pooler's CPU seconds per 100k transactions, the same paired way "
        "(1.00 = no cost; above: statistics cost CPU).",
        "",
        "| case | tps off | tps on | tps on/off (95 % interval) | rounds | p99 on/off "
        "| CPU/100k off | CPU/100k on | CPU on/off (95 % interval) |",
        "|---|---:|---:|---|---:|---:|---:|---:|---|",
    ]
    for case in report.get("cases", []):
        summary = case.get("summary", {})
        off, on = summary.get("pgbouncer", {}), summary.get("pgpilot", {})
        paired = case.get("paired", {})
        lo, hi = paired.get("tps_ci95", [float("nan")] * 2)
        lines.append(
            f"| {case['name']} | {off.get('tps', float('nan')):.0f} | "
            f"{on.get('tps', float('nan')):.0f} | {paired.get('tps_geomean', float('nan')):.3f} "
            f"({lo:.3f} – {hi:.3f}) | {paired.get('rounds', 0)} | "
            f"{paired.get('p99_geomean', float('nan')):.3f} | {cpu_cells(case)} |")
    lines += [
        "",
        "CPU per transaction (microseconds, medians over the rounds) off and on, and on/off "
        "paired by round: the geometric mean of the per-round ratios with its 95 % bootstrap "
        "interval. pooler: pgpilot's process; pgbench; postgres: the PostgreSQL server's "
        "processes; all: the three summed; machine: every process on the machine "
        "(/proc/stat), other users' load included.",
        "",
        "| case | part | off us/tx | on us/tx | on/off (95 % bootstrap interval) | rounds |",
        "|---|---|---:|---:|---|---:|",
    ]
    for case in report.get("cases", []):
        for part in CPU_PARTS:
            off_us, on_us, ratios = paired_cpu(case, part)
            if not ratios:
                continue
            mean, lo, hi = bootstrap_interval(ratios)
            lines.append(f"| {case['name']} | {part} | {off_us:.1f} | {on_us:.1f} | "
                         f"{mean:.3f} ({lo:.3f} – {hi:.3f}) | {len(ratios)} |")
    env = report.get("environment", {})
    lines += ["", "Environment: " + ", ".join(f"{k}: {v}" for k, v in env.items()), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    bench = load_pooler_bench()
    args = list(sys.argv[1:] if argv is None else argv)
    order = "abab"
    if "--abba" in args:  # alternate which side runs first, round by round
        args.remove("--abba")
        order = "abba"
    patch(bench, order)
    patch_cpu(bench)
    if "--output" not in args:
        args += ["--output", str(RESULTS / ("stats-cost-abba" if order == "abba"
                                            else "stats-cost"))]
    if "--cases" not in args:
        args += ["--cases", *[c.name for c in bench.CASES if c.kind == "pgbench"]]
    status = int(bench.main(args))
    out = Path(args[args.index("--output") + 1])
    report = json.loads((out / "pooler.json").read_text())
    report["command"] = "python bench/stats_cost.py " + " ".join(
        sys.argv[1:] if argv is None else argv)
    # The Markdown beside the run's folder, named after it (stats-cost.md, stats-cost-abba.md).
    (out.parent / (out.name + ".md")).write_text(render(report))
    return status


if __name__ == "__main__":
    raise SystemExit(main())
