"""Benchmark: Python bytecodes the query doctor adds to bench/nplusone.py's ORM request.

A cost model that does not depend on the machine's load (wall and CPU time on a shared machine
move by more than the parts being compared): ``sys.settrace`` with opcode events counts the
bytecodes each function executes during requests without pgpilot (detached) and inside
``detect()``, and prints the difference per request, by function. It leaves out work in C
(the drivers, dict and string operations), so it ranks Python-level costs; the paired times of
``bench/doctor_overhead.py`` are the figure that counts.

Usage: ``PYTHONPATH=src python bench/doctor_opcodes.py --dsn URL [--requests 5] [--top 25]``
(seeds and drops ``bench/nplusone.py``'s schema).
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import os
import sys
from pathlib import Path
from types import FrameType
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/test"
Where = tuple[str, int, str]


def load_workload() -> Any:
    # bench/nplusone.py, loaded by path: its name is the PyPI package's
    spec = importlib.util.spec_from_file_location("bench_nplusone", BENCH_DIR / "nplusone.py")
    assert spec is not None and spec.loader is not None
    workload = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = workload
    spec.loader.exec_module(workload)
    return workload


def count_opcodes(workload: Any, dsn: str, inside: bool, requests: int) -> dict[Where, float]:
    """Bytecodes per request by function, without pgpilot or inside ``detect()``."""
    from sqlalchemy import create_engine
    from sqlalchemy.orm import Session

    from pgpilot.nplusone import detach, detect
    from pgpilot.nplusone.core import _install_feeds

    counts: collections.Counter[Where] = collections.Counter()

    def tracer(frame: FrameType, event: str, arg: Any) -> Any:
        frame.f_trace_opcodes = True
        if event == "opcode":
            code = frame.f_code
            counts[(code.co_filename, code.co_firstlineno, code.co_name)] += 1
        return tracer

    engine = create_engine(workload.sqlalchemy_url(dsn), pool_size=1)
    if inside:
        _install_feeds()
    else:
        detach()
    for n in range(3 + requests):  # three unmeasured first: caches, compiled SQL
        with Session(engine) as session:
            session.connection()
            if n >= 3:
                sys.settrace(tracer)
            if inside:
                with detect():
                    workload.one_request(session, n)
            else:
                workload.one_request(session, n)
            sys.settrace(None)
    engine.dispose()
    return {where: count / requests for where, count in counts.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--dsn", default=os.environ.get("PGPILOT_BENCH_DSN") or DEFAULT_DSN
    )
    parser.add_argument("--requests", type=int, default=5)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    workload = load_workload()
    workload.seed(args.dsn)
    try:
        without = count_opcodes(workload, args.dsn, False, args.requests)
        inside = count_opcodes(workload, args.dsn, True, args.requests)
    finally:
        workload.drop(args.dsn)
    added = {
        where: inside.get(where, 0.0) - without.get(where, 0.0)
        for where in set(without) | set(inside)
    }
    base, total = sum(without.values()), sum(added.values())
    print(f"bytecodes per request: {base:,.0f} without, {base + total:,.0f} inside detect() "
          f"({total:+,.0f}, {total / base * 100:+.1f}%)")
    for (filename, line, name), count in sorted(added.items(), key=lambda kv: -abs(kv[1]))[
        : args.top
    ]:
        short = filename.split("site-packages/")[-1].split("src/")[-1]
        print(f"{count:+9,.0f}  {short}:{line} {name}")


if __name__ == "__main__":
    main()
