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
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
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
    bench.CASES = tuple(dataclasses.replace(c, pgbouncer_args=None, pgbouncer_processes=1)
                        for c in bench.CASES)
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
    name = "stats-cost-abba.md" if order == "abba" else "stats-cost.md"
    (RESULTS / name).write_text(render(report))
    return status


if __name__ == "__main__":
    raise SystemExit(main())
