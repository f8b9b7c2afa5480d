"""The Prometheus exporter: scrape /metrics while real clients use the pooler."""

from __future__ import annotations

import concurrent.futures
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families
from tests.proxy.conftest import RunningProxy, wait_until

from pgpilot.embedded import free_port

POOL = {"database": "test", "user": "postgres"}


class Scrape:
    def __init__(self, text: str) -> None:
        self.samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                key = (sample.name, frozenset(sample.labels.items()))
                self.samples[key] = sample.value

    def get(self, name: str, **labels: str) -> float:
        return self.samples.get((name, frozenset(labels.items())), 0.0)

    def has(self, name: str) -> bool:
        return any(n == name for n, _ in self.samples)


def scrape(port: int, path: str = "/metrics") -> Scrape:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        return Scrape(response.read().decode())


@pytest.fixture
def metered(proxy_factory: Callable[..., RunningProxy]) -> tuple[RunningProxy, int]:
    port = free_port()
    return proxy_factory(metrics_port=port, default_pool_size=1), port


def client(proxy: RunningProxy, **kwargs: Any) -> psycopg.Connection[Any]:
    return psycopg.connect(proxy.dsn(), autocommit=True, prepare_threshold=None, **kwargs)


def test_counters_follow_traffic(metered: tuple[RunningProxy, int]) -> None:
    proxy, port = metered
    with client(proxy) as conn:
        conn.execute("select 1")
        before = scrape(port)
        for i in range(10):
            conn.execute("select %s::int", [i])
        with pytest.raises(psycopg.errors.DivisionByZero):
            conn.execute("select 1/0")
        after = scrape(port)
    for name in ("pgpilot_queries_total", "pgpilot_transactions_total",
                 "pgpilot_received_bytes_total", "pgpilot_sent_bytes_total",
                 "pgpilot_server_assignments_total"):
        assert after.get(name, **POOL) > before.get(name, **POOL), name
    assert after.get("pgpilot_queries_total", **POOL) - before.get(
        "pgpilot_queries_total", **POOL) >= 10
    assert after.get("pgpilot_errors_total", **POOL) == before.get(
        "pgpilot_errors_total", **POOL) + 1
    assert after.get("pgpilot_wait_seconds_count", **POOL) >= 11
    assert after.get("pgpilot_wait_seconds_bucket", **POOL, le="+Inf") == after.get(
        "pgpilot_wait_seconds_count", **POOL)
    assert after.get("pgpilot_info", version=__import__("pgpilot").__version__) == 1


def test_clients_servers_and_waiting(metered: tuple[RunningProxy, int]) -> None:
    proxy, port = metered
    with client(proxy) as holder, client(proxy) as waiter, \
            concurrent.futures.ThreadPoolExecutor(1) as executor:
        holder.execute("select 1")
        idle = scrape(port)
        assert idle.get("pgpilot_clients", **POOL, state="idle") == 2
        assert idle.get("pgpilot_servers", **POOL, state="idle") == 1
        assert idle.get("pgpilot_pool_size", **POOL) == 1
        holder.execute("begin")
        holder.execute("select 1")
        blocked = executor.submit(lambda: waiter.execute("select 2").fetchone())
        busy = wait_until(lambda: (s := scrape(port)).get(
            "pgpilot_waiting_clients", **POOL) == 1 and s)
        assert busy.get("pgpilot_clients", **POOL, state="active") == 1
        assert busy.get("pgpilot_clients", **POOL, state="waiting") == 1
        assert busy.get("pgpilot_servers", **POOL, state="active") == 1
        wait_until(lambda: scrape(port).get("pgpilot_max_wait_seconds", **POOL) > 0)
        holder.execute("commit")
        assert blocked.result(10) == (2,)
        done = wait_until(lambda: (s := scrape(port)).get(
            "pgpilot_waiting_clients", **POOL) == 0 and s)
        assert done.get("pgpilot_max_wait_seconds", **POOL) == 0
        # The waiter's wait landed in a bucket above the smallest one.
        assert done.get("pgpilot_wait_seconds_sum", **POOL) > 0


def test_pins_and_pause_are_exported(metered: tuple[RunningProxy, int]) -> None:
    proxy, port = metered
    with client(proxy, application_name="svc") as conn:
        conn.execute("LISTEN svc_jobs")  # pins the client to its server
        conn.execute("SELECT 1")  # runs once the pooler has counted the pin
        pinned = scrape(port)
        conn.execute("UNLISTEN svc_jobs")
    assert pinned.get("pgpilot_pins_total", reason="listen") == 1
    assert pinned.get("pgpilot_pinned_clients", **POOL) == 1
    scraped = scrape(port)
    assert scraped.get("pgpilot_pinned_clients", **POOL) == 0
    assert scraped.get("pgpilot_paused") == 0
    with psycopg.connect(proxy.dsn(dbname="pgbouncer"), autocommit=True) as console:
        console.execute("PAUSE")
        paused = scrape(port)
        assert paused.get("pgpilot_paused") == 1
        assert paused.get("pgpilot_pool_paused", **POOL) == 1
        console.execute("RESUME")


def test_other_paths_and_methods(metered: tuple[RunningProxy, int]) -> None:
    _proxy, port = metered
    with pytest.raises(urllib.error.HTTPError) as missing:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/nothing", timeout=10)
    assert missing.value.code == 404
    request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", data=b"x",
                                     method="POST")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code == 405
    assert scrape(port).has("pgpilot_start_time_seconds")


def test_metrics_off_by_default(proxy: RunningProxy) -> None:
    assert proxy.call(lambda: proxy.pooler._metrics_server) is None
