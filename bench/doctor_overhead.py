"""Benchmark: the query doctor's overhead, two versions of pgpilot compared in one session.

Runs ``bench/nplusone.py --child paired`` (requests alternating without pgpilot and inside
``detect()``, every kind on, one process per run) once per round for each source tree given,
the trees alternating round by round so that the machine's load drifts over all of them alike.
Each run's figure is the median of its per-pair ratios (with / without) with a 95% bootstrap
interval; the pooled line per tree does the same over the pairs of all its runs.

Usage::

    python bench/doctor_overhead.py --dsn URL --rounds 3 --pairs 300 --warmup 20 \\
        before=/path/to/old/src after=src

Each ``NAME=PATH`` is a directory put first on ``PYTHONPATH`` for that tree's runs. The
schema ``bench/nplusone.py`` uses is seeded at the start and dropped at the end. Prints a
Markdown table (and writes it to ``--out`` when given).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import statistics
import subprocess
import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/test"
RESAMPLES = 2_000


def median_ratio_interval(
    with_: list[float], without: list[float], seed: int = 1
) -> tuple[float, float, float]:
    """Median of the per-pair ratios minus 1, and its 95% bootstrap interval, in percent."""
    ratios = [a / b for a, b in zip(with_, without, strict=True) if b > 0]
    rng = random.Random(seed)
    medians = sorted(
        statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(RESAMPLES)
    )
    low, high = medians[int(RESAMPLES * 0.025)], medians[int(RESAMPLES * 0.975) - 1]
    return (
        (statistics.median(ratios) - 1) * 100,
        (low - 1) * 100,
        (high - 1) * 100,
    )


def run_child(
    src: str,
    dsn: str,
    pairs: int,
    warmup: int,
    overfetch_columns: int | None = None,
    read_columns: bool = False,
) -> dict[str, list[float]]:
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")]))
    )
    child = subprocess.run(
        [
            sys.executable,
            str(BENCH_DIR / "nplusone.py"),
            "--child",
            "paired",
            "--dsn",
            dsn,
            "--pairs",
            str(pairs),
            "--warmup",
            str(warmup),
            *(() if overfetch_columns is None else ("--overfetch-columns", str(overfetch_columns))),
            *(("--read-columns",) if read_columns else ()),
        ],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    )
    samples: dict[str, list[float]] = json.loads(child.stdout)
    return samples


def row(name: str, run: str, samples: dict[str, list[float]]) -> str:
    wall = median_ratio_interval(samples["wall_with"], samples["wall_without"])
    cpu = median_ratio_interval(samples["cpu_with"], samples["cpu_without"])
    return (
        f"| {name} | {run} | {statistics.median(samples['wall_without']) * 1e3:.1f} ms "
        f"| {wall[0]:+.1f}% [{wall[1]:+.1f}, {wall[2]:+.1f}] "
        f"| {statistics.median(samples['cpu_without']) * 1e3:.1f} ms "
        f"| {cpu[0]:+.1f}% [{cpu[1]:+.1f}, {cpu[2]:+.1f}] |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trees", nargs="+", help="NAME=PATH of a pgpilot source tree")
    parser.add_argument("--dsn", default=os.environ.get("PGPILOT_BENCH_DSN") or DEFAULT_DSN)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pairs", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument(
        "--overfetch-columns",
        type=int,
        help="detect()'s overfetch_columns (2: every load of the workload is one whose use "
        "the doctor follows, the cost for entities of six columns or more)",
    )
    parser.add_argument(
        "--read-columns",
        action="store_true",
        help="the request also reads a column of each customer and order it loads",
    )
    parser.add_argument("--out", help="also write the table to this file")
    args = parser.parse_args()
    trees: list[tuple[str, str]] = []
    for spec in args.trees:
        name, sep, path = spec.partition("=")
        if not sep or not name or not Path(path).is_dir():
            parser.error(f"expected NAME=PATH of an existing directory, got {spec!r}")
        trees.append((name, str(Path(path).resolve())))

    # bench/nplusone.py, for its schema (loaded by path: its name is the PyPI package's)
    spec = importlib.util.spec_from_file_location("bench_nplusone", BENCH_DIR / "nplusone.py")
    assert spec is not None and spec.loader is not None
    workload = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = workload
    spec.loader.exec_module(workload)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    workload.seed(args.dsn)
    lines = [
        "| code | run | wall without | wall overhead [95% CI] | client CPU without "
        "| CPU overhead [95% CI] |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    pooled: dict[str, dict[str, list[float]]] = {name: {} for name, _ in trees}
    try:
        for round_number in range(args.rounds):
            # alternate which tree runs first in a round
            order = trees if round_number % 2 == 0 else trees[::-1]
            for name, src in order:
                samples = run_child(
                    src, args.dsn, args.pairs, args.warmup, args.overfetch_columns,
                    args.read_columns,
                )
                for key, values in samples.items():
                    pooled[name].setdefault(key, []).extend(values)
                line = row(name, str(round_number + 1), samples)
                lines.append(line)
                print(line, file=sys.stderr, flush=True)
    finally:
        workload.drop(args.dsn)
    for name, _ in trees:
        lines.append(
            row(name, "all", pooled[name]).replace(f"| {name} | all |", f"| **{name}** | **all** |")
        )
    end_load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines.append("")
    lines.append(f"1-minute load average {load:.1f} at the start, {end_load:.1f} at the end.")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
