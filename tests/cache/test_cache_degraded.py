"""A Redis that is down or slow never becomes an error for the caller: the function answers,
with a warning and a metric; invalidations made meanwhile are sent when Redis is back."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from tests.conftest import EphemeralRedis

from pgpilot.cache import Cache, RedisBackend
from pgpilot.embedded import free_port


def test_nothing_listening_calls_the_function_with_a_warning(
        namespace: str, caplog: pytest.LogCaptureFixture) -> None:
    cache = Cache(RedisBackend(f"redis://127.0.0.1:{free_port()}/0", timeout=0.2),
                  namespace=namespace, retry_after=60)
    calls: list[int] = []

    @cache.cached(ttl=60)
    def f(n: int) -> int:
        calls.append(n)
        return n * 2

    @cache.cached(ttl=60)
    async def g(n: int) -> int:
        calls.append(-n)
        return n * 3

    with caplog.at_level(logging.WARNING, logger="pgpilot.cache"):
        assert [f(1), f(1), f(2)] == [2, 2, 4]
        assert asyncio.run(g(1)) == 3
    assert calls == [1, 1, 2, -1]
    stats = f.stats()
    assert stats.errors == 1  # the first call failed; the next ones did not even try
    assert stats.degraded == 3 and stats.hits == 0
    warnings = [r for r in caplog.records if "backend unavailable" in r.getMessage()]
    assert len(warnings) == 1  # one warning, not one per call


def test_with_redis_down_concurrent_callers_of_a_key_share_one_call(namespace: str) -> None:
    """While the backend is down the function answers, but once per key for the callers that
    ask at the same time (before, each of them called it: a stampede on the database exactly
    when the cache cannot help)."""
    cache = Cache(RedisBackend(f"redis://127.0.0.1:{free_port()}/0", timeout=0.2),
                  namespace=namespace, retry_after=60)
    calls: list[str] = []

    @cache.cached(ttl=60)
    def hot() -> int:
        calls.append("thread")
        time.sleep(1.0)  # long enough for every thread to arrive while it runs
        return 1

    @cache.cached(ttl=60)
    async def hot_task() -> int:
        calls.append("task")
        await asyncio.sleep(0.3)
        return 2

    assert hot() == 1  # the failure that marks the backend down
    calls.clear()
    start = threading.Barrier(50)
    results: list[int] = []

    def worker() -> None:
        start.wait()
        results.append(hot())

    threads = [threading.Thread(target=worker) for _ in range(50)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    async def tasks() -> list[int]:
        return await asyncio.gather(*(hot_task() for _ in range(100)))

    assert results == [1] * 50 and asyncio.run(tasks()) == [2] * 100
    assert calls == ["thread", "task"]
    assert hot.stats().degraded == 2 and hot.stats().stampede_waits == 49  # 1 + the leader


def test_a_slow_redis_is_cut_off_by_the_timeout(
        redis_server: Callable[..., EphemeralRedis], namespace: str) -> None:
    server = redis_server()
    cache = Cache(RedisBackend(server.url, timeout=0.2), namespace=namespace, retry_after=60)
    calls: list[int] = []

    @cache.cached(ttl=60)
    def f() -> int:
        calls.append(1)
        return 7

    assert f() == 7 and f() == 7 and len(calls) == 1  # cached while Redis answers
    admin = redis.Redis(port=server.port)
    admin.execute_command("CLIENT", "PAUSE", "3000", "ALL")  # Redis stops answering for 3 s
    f.invalidate()  # not sent: Redis is paused; kept for later
    assert f() == 7
    assert len(calls) == 2 and f.stats().degraded == 1
    # the call was answered while Redis still does not answer: the timeout cut it short
    probe = redis.Redis(port=server.port, socket_timeout=0.2, retry=Retry(NoBackoff(), 0))
    with pytest.raises(redis.TimeoutError):
        probe.ping()
    probe.close()
    assert cache.pending_invalidations == 1
    admin.close()


def test_invalidations_made_while_redis_is_down_are_sent_when_it_is_back(
        redis_server: Callable[..., EphemeralRedis], namespace: str) -> None:
    server = redis_server()
    cache = Cache(RedisBackend(server.url, timeout=0.2), namespace=namespace, retry_after=0.2)
    version = [1]

    @cache.cached(ttl=600, tags=["orders"])
    def orders() -> int:
        return version[0]

    assert orders() == 1
    # Redis becomes unreachable (the process is stopped, its data kept: a network cut)
    assert server.process is not None
    server.process.send_signal(19)  # SIGSTOP
    try:
        version[0] = 2  # a write commits...
        cache.invalidate_tags("orders")  # ...and its invalidation cannot be sent
        assert cache.pending_invalidations == 1
        assert orders() == 2  # answered by the function meanwhile
    finally:
        server.process.send_signal(18)  # SIGCONT: Redis is back with the old entry
    deadline = time.monotonic() + 10
    while cache.pending_invalidations and time.monotonic() < deadline:
        time.sleep(0.05)  # the background retry sends it
    assert cache.pending_invalidations == 0
    assert orders() == 2  # never the stale 1


def test_an_async_caller_is_answered_when_redis_dies_mid_run(
        redis_server: Callable[..., EphemeralRedis], namespace: str) -> None:
    server = redis_server()
    cache = Cache(RedisBackend(server.url, timeout=0.2), namespace=namespace, retry_after=60)

    @cache.cached(ttl=60)
    async def f(n: int) -> int:
        return n + 1

    async def main() -> list[int]:
        first = await f(1)
        server.stop()
        return [first, *await asyncio.gather(*(f(n) for n in range(5)))]

    assert asyncio.run(main()) == [2, 1, 2, 3, 4, 5]
    assert f.stats().errors >= 1
