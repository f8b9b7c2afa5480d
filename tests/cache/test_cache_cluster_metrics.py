"""Redis Cluster (three redis-servers of the test's own), and the Prometheus metrics."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from collections.abc import Callable

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from tests.conftest import EphemeralRedis

from pgpilot.cache import Cache, MemoryBackend, RedisBackend


@pytest.mark.slow
def test_a_cache_on_redis_cluster(redis_server: Callable[..., EphemeralRedis],
                                  namespace: str) -> None:
    import redis
    from redis.cluster import RedisCluster

    if shutil.which("redis-cli") is None:
        pytest.skip("redis-cli is not on PATH")
    nodes = [redis_server("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                          "--cluster-node-timeout", "2000") for _ in range(3)]
    subprocess.run(["redis-cli", "--cluster", "create",
                    *(f"127.0.0.1:{n.port}" for n in nodes), "--cluster-replicas", "0",
                    "--cluster-yes"], check=True, capture_output=True, timeout=60)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        info = redis.Redis(port=nodes[0].port).cluster("info")
        if info.get("cluster_state") == "ok":
            break
        time.sleep(0.1)
    url = f"redis://127.0.0.1:{nodes[0].port}/0"
    cache = Cache(RedisBackend(url, cluster=True, timeout=2.0), namespace=namespace)
    calls: list[int] = []

    @cache.cached(ttl=60, tags=lambda n: ["orders", f"order:{n}"])
    def order(n: int) -> int:
        calls.append(n)
        return n

    @cache.cached(ttl=60, tags=["orders"])
    async def count() -> int:
        calls.append(-1)
        return 3

    for n in range(20):
        order(n)
    assert [order(n) for n in range(20)] == list(range(20)) and len(calls) == 20
    assert asyncio.run(count()) == 3 and asyncio.run(count()) == 3 and len(calls) == 21
    assert cache.invalidate_tags("order:7") == 1
    assert cache.invalidate_tags("orders") == 20  # 19 orders and the count, in one script
    order(7)
    assert len(calls) == 22
    assert cache.clear() >= 1
    # every key of the namespace is in one slot (its hash tag): the scripts are legal
    cluster = RedisCluster(host="127.0.0.1", port=nodes[0].port)
    order(1)
    keys = [k for k in cluster.scan_iter(match=f"pgc:{{{namespace}}}:*")]
    assert keys and len({cluster.keyslot(k) for k in keys}) == 1
    cluster.close()


def test_stats_are_exported_to_prometheus(namespace: str) -> None:
    cache = Cache(MemoryBackend(max_entries=1), namespace=namespace)

    @cache.cached(ttl=60, name="shop.profile")
    def profile(n: int) -> int:
        return n

    profile(1), profile(1), profile(2)
    registry = CollectorRegistry()
    registry.register(cache.metrics_collector())
    text = generate_latest(registry).decode()
    labels = f'function="shop.profile",namespace="{namespace}"'
    assert f"pgpilot_cache_hits_total{{{labels}}} 1.0" in text
    assert f"pgpilot_cache_misses_total{{{labels}}} 2.0" in text
    assert f"pgpilot_cache_fills_total{{{labels}}} 2.0" in text
    assert f"pgpilot_cache_evictions_total{{{labels}}} 1.0" in text
    assert f'pgpilot_cache_pending_invalidations{{namespace="{namespace}"}} 0.0' in text
    as_dict = cache.stats()["shop.profile"].as_dict()
    assert as_dict["hit_rate"] == pytest.approx(1 / 3)


def test_a_redis_backend_with_only_an_async_client_refuses_sync_use_politely(
        redis_url: str, namespace: str) -> None:
    import redis.asyncio

    cache = Cache(RedisBackend(async_client=redis.asyncio.Redis.from_url(redis_url)),
                  namespace=namespace, retry_after=60)

    @cache.cached(ttl=60)
    def f() -> int:
        return 1

    assert f() == 1 and f.stats().degraded == 1  # answered, with the error counted
