"""The pool sizing advisor (proxy/advisor.py): Erlang C, and SHOW ADVICE under a known load."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
from tests.proxy.conftest import RunningProxy, wait_until

from pgpilot.proxy.advisor import erlang_c, smallest_pool, wait_exceeds


def test_erlang_c_known_values() -> None:
    assert erlang_c(2, 1.0) == pytest.approx(1 / 3)
    assert erlang_c(1, 0.5) == pytest.approx(0.5)  # M/M/1: the utilization
    assert erlang_c(3, 3.0) == 1.0  # saturated
    # More servers, less waiting; the smallest pool meets the target and one fewer does not.
    rate, service, target = 100.0, 0.05, 0.01
    size = smallest_pool(rate, service, target)
    assert wait_exceeds(size, rate * service, service, target) <= 0.05
    assert wait_exceeds(size - 1, rate * service, service, target) > 0.05
    assert size > rate * service
    assert smallest_pool(0.0, 0.01, 0.01) == 1


def show_advice(proxy: RunningProxy) -> list[dict[str, Any]]:
    with psycopg.connect(proxy.dsn(dbname="pgbouncer"), autocommit=True) as console:
        cur = console.execute("SHOW ADVICE")
        names = [d.name for d in cur.description or ()]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


def run_load(proxy: RunningProxy, clients: int, seconds: float, think: float) -> None:
    def one() -> None:
        with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                conn.execute("select pg_sleep(0.02)")
                if think:
                    time.sleep(think)

    threads = [threading.Thread(target=one) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "python"])
def test_advice_grows_a_pool_clients_wait_for(proxy_factory: Callable[..., RunningProxy],
                                              fast: bool) -> None:
    proxy = proxy_factory(default_pool_size=2, fast_path=int(fast), advisor_db_cores=8)
    run_load(proxy, clients=8, seconds=3.0, think=0.0)  # 8 clients, 2 servers: a queue
    rows = wait_until(lambda: (r := [x for x in show_advice(proxy) if x["database"] == "test"])
                      and r[0]["recommended"] is not None and r)
    row = rows[0]
    assert row["pool_size"] == 2
    assert row["recommended"] > 2, row["advice"]
    assert float(row["busy_pct"]) > 50
    assert float(row["wait_p95_ms"]) > 10  # clients did wait
    assert f"recommend default_pool_size = {row['recommended']}" in row["advice"]
    assert "p95" in row["advice"] and "busy" in row["advice"]


def test_advice_keeps_a_quiet_pool_small(proxy_factory: Callable[..., RunningProxy]) -> None:
    proxy = proxy_factory(default_pool_size=10)
    run_load(proxy, clients=1, seconds=3.0, think=0.05)  # one client, mostly thinking
    rows = wait_until(lambda: (r := [x for x in show_advice(proxy) if x["database"] == "test"])
                      and r[0]["recommended"] is not None and r)
    assert rows[0]["recommended"] <= 2, rows[0]["advice"]
    assert float(rows[0]["busy_pct"]) < 10
