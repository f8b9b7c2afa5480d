"""The pooler benchmark's round-by-round statistics: the paired ratio, its interval, the verdict."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "pooler.py"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_pooler", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_pooler"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def test_ratio_interval_is_a_geometric_mean_with_a_t_interval(bench: ModuleType) -> None:
    ratios = [1.09, 1.111, 1.091, 1.112, 1.121]
    logs = [math.log(r) for r in ratios]
    mean = sum(logs) / 5
    sd = math.sqrt(sum((x - mean) ** 2 for x in logs) / 4)
    half = 2.776 * sd / math.sqrt(5)  # t(0.975, 4 degrees of freedom)
    got = bench.ratio_interval(ratios)
    assert got == pytest.approx((math.exp(mean), math.exp(mean - half), math.exp(mean + half)))
    # A ratio and its inverse cancel: 1.1x one round and 1/1.1x the next is level, not 1.005x.
    assert bench.ratio_interval([1.1, 1 / 1.1])[0] == pytest.approx(1.0)


def test_ratio_interval_without_enough_rounds(bench: ModuleType) -> None:
    mean, lo, hi = bench.ratio_interval([1.2])
    assert mean == pytest.approx(1.2) and lo != lo and hi != hi
    assert all(v != v for v in bench.ratio_interval([float("nan")]))


@pytest.mark.parametrize(("lo", "hi", "higher_is_better", "expected"), [
    (1.01, 1.10, True, "ahead"), (1.01, 1.10, False, "behind"),
    (0.90, 0.99, True, "behind"), (0.90, 0.99, False, "ahead"),
    (0.98, 1.03, True, "level"), (0.98, 1.03, False, "level"),
    (float("nan"), float("nan"), True, "–"),
])
def test_verdict(bench: ModuleType, lo: float, hi: float, higher_is_better: bool,
                 expected: str) -> None:
    assert bench.verdict(lo, hi, higher_is_better) == expected


def run(bench: ModuleType, target: str, rnd: int, tps: float, p99: float,
        ok: bool = True) -> object:
    return bench.RunResult(target, rnd, ok=ok, tps=tps, lat_p99_ms=p99)


def test_paired_rounds_pairs_each_round_and_skips_failed_runs(bench: ModuleType) -> None:
    bouncer = [run(bench, "pgbouncer", r, 100.0, 2.0) for r in (1, 2, 3, 4)]
    pilot = [run(bench, "pgpilot", 1, 110.0, 1.8), run(bench, "pgpilot", 2, 112.0, 1.78),
             run(bench, "pgpilot", 3, 0.0, 9.0, ok=False), run(bench, "pgpilot", 4, 111.0, 1.82)]
    paired = bench.paired_rounds(bouncer, pilot)
    assert paired["rounds"] == 3
    assert paired["tps_ratios"] == [1.1, 1.12, 1.11]
    assert paired["tps_verdict"] == "ahead" and paired["tps_rounds_ahead"] == 3
    assert paired["p99_verdict"] == "ahead" and paired["p99_rounds_ahead"] == 3
    lo, hi = paired["tps_ci95"]
    assert lo < paired["tps_geomean"] < hi


def test_render_again_adds_the_intervals_to_an_old_report(bench: ModuleType,
                                                            tmp_path: Path) -> None:
    def as_dict(target: str, rnd: int, tps: float, p99: float) -> dict[str, object]:
        return {"target": target, "round": rnd, "ok": True, "tps": tps, "txns": 1000,
                "lat_avg_ms": 1.0, "lat_p99_ms": p99, "cpu_s": 1.0, "cpu_per_100k": 1.0,
                "peak_rss_kb": 1024, "rss_kb": 1024, "errors": 0, "error_text": "", "extra": {}}

    summary = {"runs": 3, "ok_runs": 3, "tps": 100.0, "lat_avg_ms": 1.0, "lat_p99_ms": 2.0,
               "cpu_per_100k": 1.0, "peak_rss_kb": 1024, "errors": 0, "failures": []}
    report = {
        "started": "then", "command": "python bench/pooler.py", "elapsed_s": 1.0,
        "environment": {"cpus": "2"},
        "settings": {"rounds": 3, "duration": 8.0, "warmup": 2.0},
        "cases": [{
            "name": "select-simple-10", "title": "t", "kind": "pgbench", "clients": 10,
            "pool_size": 20, "auth": "trust", "pgbench_args": [], "note": "",
            "summary": {"pgbouncer": summary, "pgpilot": summary},
            "ratios": {"tps": 1.0, "lat_avg_ms": 1.0, "lat_p99_ms": 1.0,
                       "cpu_per_100k": 1.0, "peak_rss_kb": 1.0},
            "paired": {"rounds": 3, "tps_ratio_median": 1.0, "tps_rounds_ahead": 2,
                       "p99_ratio_median": 1.0, "p99_rounds_ahead": 1},
            "runs": {"pgbouncer": [as_dict("pgbouncer", r, 100.0, 2.0) for r in (1, 2, 3)],
                     "pgpilot": [as_dict("pgpilot", r, t, 2.0)
                                 for r, t in ((1, 97.0), (2, 104.0), (3, 99.0))]},
        }],
    }
    path = tmp_path / "old.json"
    path.write_text(json.dumps(report))
    assert bench.render_again(path) == 0
    paired = json.loads(path.read_text())["cases"][0]["paired"]
    assert paired["tps_verdict"] == "level" and paired["tps_rounds_ahead"] == 1
    markdown = path.with_suffix(".md").read_text()
    assert "| select-simple-10 |" in markdown and " level, 1/3 |" in markdown
