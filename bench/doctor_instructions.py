"""Benchmark: machine instructions the query doctor adds to bench/nplusone.py's ORM request.

``bench/doctor_opcodes.py`` counts Python bytecodes, which leaves out what runs in C (the
doctor's compiled helper ``nplusone/_stackwalk.c``, dict and string work, the drivers). This
counts every instruction of the process inside the measured requests, under valgrind's
callgrind: a child runs ``--requests`` requests detached and the same number inside
``detect()``, each batch inside ``sys.call_tracing`` (callgrind collects only within it,
``--toggle-collect``), one child per variant, for each source tree given.

A child's count repeats exactly for one hash seed (``PYTHONHASHSEED``; what the warm-up left
is frozen out of the garbage collector's way), but moves by up to half a million a request
from one seed, or one source tree, to another, in the doctor's absence too: CPython's method
cache (4,096 entries indexed by a type's version tag and the attribute name's hash) collides
differently with each seed and with each set of loaded classes, and a miss walks a SQLAlchemy
class's whole MRO. So each figure is the mean over ``--seeds`` seeds, run two children at a
time.

Usage: ``python bench/doctor_instructions.py --dsn URL [--requests 10] [--seeds 4]
NAME=SRC [NAME=SRC ...]`` (needs ``valgrind``; seeds and drops ``bench/nplusone.py``'s schema).
"""

from __future__ import annotations

import argparse
import gc
import os
import re
import statistics
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/test"
WARMUP = 5


def child(dsn: str, inside: bool, requests: int) -> None:
    """Runs under callgrind: warm-up requests, then ``requests`` measured ones."""
    from sqlalchemy import create_engine
    from sqlalchemy.orm import Session

    sys.path.insert(0, str(BENCH_DIR))
    from doctor_opcodes import load_workload

    from pgpilot.nplusone import detach, detect
    from pgpilot.nplusone.core import _install_feeds

    workload = load_workload()
    engine = create_engine(workload.sqlalchemy_url(dsn), pool_size=1)
    if inside:
        _install_feeds()
    else:
        detach()

    def one(n: int) -> None:
        with Session(engine) as session:
            session.connection()
            if inside:
                with detect():
                    workload.one_request(session, n)
            else:
                workload.one_request(session, n)

    def measured() -> None:
        for n in range(requests):
            one(WARMUP + n)

    for n in range(WARMUP):  # caches, compiled SQL
        one(n)
    # what the warm-up left is never collected: collections in the measured requests are of
    # what they allocate (the same from run to run)
    gc.collect()
    gc.freeze()
    sys.call_tracing(measured, ())
    engine.dispose()


def instructions(src: str, dsn: str, inside: bool, requests: int, seed: int) -> float:
    """Instructions per request, collected inside ``sys.call_tracing`` only."""
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "callgrind.out"
        command = [
            "valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
            "--collect-atstart=no", "--toggle-collect=sys_call_tracing",
            sys.executable, __file__, "--child", "inside" if inside else "without",
            "--dsn", dsn, "--requests", str(requests),
        ]
        env = {**os.environ, "PYTHONPATH": src, "PYTHONHASHSEED": str(seed)}
        run = subprocess.run(command, env=env, capture_output=True, text=True)
        if run.returncode:
            sys.exit(f"the child failed ({' '.join(command)}):\n{run.stderr[-3000:]}")
        summary = re.search(r"^(?:summary|totals): (\d+)", out.read_text(), re.MULTILINE)
        assert summary is not None, "callgrind wrote no total"
        return int(summary.group(1)) / requests


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", default=os.environ.get("PGPILOT_BENCH_DSN") or DEFAULT_DSN)
    parser.add_argument("--requests", type=int, default=10)
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--first-seed", type=int, default=1)
    parser.add_argument("--child", choices=("without", "inside"))
    parser.add_argument("trees", nargs="*", metavar="NAME=SRC")
    args = parser.parse_args()
    if args.child:
        child(args.dsn, args.child == "inside", args.requests)
        return
    trees: list[tuple[str, str]] = [
        (name, str(Path(src).resolve())) for name, _, src in (t.partition("=") for t in args.trees)
    ] or [("this", str(BENCH_DIR.parent / "src"))]
    sys.path.insert(0, str(BENCH_DIR))
    from doctor_opcodes import load_workload

    workload: Any = load_workload()
    workload.seed(args.dsn)
    try:
        print("| code | without | inside detect() | added |")
        print("| --- | ---: | ---: | ---: |")
        for name, src in trees:
            seeds = range(args.first_seed, args.first_seed + args.seeds)
            runs = [(inside, seed) for seed in seeds for inside in (False, True)]
            with ThreadPoolExecutor(2) as pool:  # two children at a time
                futures = [
                    pool.submit(instructions, src, args.dsn, inside, args.requests, seed)
                    for inside, seed in runs
                ]
                counts = [future.result() for future in futures]
            without = statistics.fmean(counts[0::2])
            inside = statistics.fmean(counts[1::2])
            added = inside - without
            spread = [b - a for a, b in zip(counts[0::2], counts[1::2], strict=True)]
            print(f"| {name} | {without / 1e6:.2f} M | {inside / 1e6:.2f} M | "
                  f"{added / 1e6:+.2f} M ({added / without * 100:+.1f}%; by seed "
                  f"{', '.join(f'{x / 1e6:+.2f}' for x in spread)}) |", flush=True)
    finally:
        workload.drop(args.dsn)


if __name__ == "__main__":
    main()
