"""Stampede protection: one fill for many concurrent callers (threads, tasks, processes), and
early refresh keeping a hot key from ever expiring under load."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import redis

from pgpilot.cache import Cache, RedisBackend

MakeCache = Callable[..., Cache]


def test_200_threads_on_a_missing_key_run_the_function_once(make_cache: MakeCache) -> None:
    cache = make_cache()
    calls: list[int] = []
    start = threading.Barrier(200)

    @cache.cached(ttl=60)
    def hot() -> int:
        calls.append(1)
        time.sleep(0.2)  # a slow query
        return 42

    results: list[int] = []

    def worker() -> None:
        start.wait()
        results.append(hot())

    threads = [threading.Thread(target=worker) for _ in range(200)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [42] * 200
    assert len(calls) == 1
    stats = hot.stats()
    assert stats.fills == 1 and stats.stampede_waits == 199


def test_200_tasks_on_a_missing_key_run_the_coroutine_once(make_cache: MakeCache) -> None:
    cache = make_cache()
    calls: list[int] = []

    @cache.cached(ttl=60)
    async def hot() -> dict[str, int]:
        calls.append(1)
        await asyncio.sleep(0.1)
        return {"answer": 42}

    async def main() -> list[dict[str, int]]:
        return await asyncio.gather(*(hot() for _ in range(200)))

    results = asyncio.run(main())
    assert results == [{"answer": 42}] * 200
    assert len({id(r) for r in results}) > 1  # waiters get copies, not the leader's object
    assert len(calls) == 1 and hot.stats().stampede_waits == 199


class CountingRedis(RedisBackend):
    """The machine's Redis, counting the entry reads the cache sends it."""

    def __init__(self, url: str) -> None:
        super().__init__(url, timeout=2.0)
        self.reads = 0
        self._lock = threading.Lock()

    def get(self, key: str) -> bytes | None:
        with self._lock:
            self.reads += 1
        return super().get(key)

    async def aget(self, key: str) -> bytes | None:
        self.reads += 1
        return await super().aget(key)


def test_a_stampede_asks_the_backend_once_per_key(redis_url: str, namespace: str) -> None:
    """Callers of a key that another caller of this process is already reading or filling
    join it without a backend read of their own: 200 tasks, then 100 threads, each read Redis
    once (before, every caller sent its own GET first; on a loaded machine most then waited
    for a pooled connection past the timeout and the cache degraded to 20-80 fills)."""
    backend = CountingRedis(redis_url)
    cache = Cache(backend, namespace=namespace)
    calls: list[int] = []

    @cache.cached(ttl=60)
    async def hot_task() -> int:
        calls.append(1)
        await asyncio.sleep(0.2)
        return 42

    async def main() -> list[int]:
        return await asyncio.gather(*(hot_task() for _ in range(200)))

    @cache.cached(ttl=60)
    def hot_thread() -> int:
        calls.append(2)
        time.sleep(0.2)
        return 43

    try:
        assert asyncio.run(main()) == [42] * 200
        assert backend.reads == 1 and calls == [1]
        start = threading.Barrier(100)
        results: list[int] = []

        def worker() -> None:
            start.wait()
            results.append(hot_thread())

        threads = [threading.Thread(target=worker) for _ in range(100)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert results == [43] * 100
        assert backend.reads == 2 and calls == [1, 2]  # one read and one fill each
        for stats in (hot_task.stats(), hot_thread.stats()):
            assert stats.degraded == 0 and stats.errors == 0, stats
            assert stats.fills == 1 and stats.stampede_waits == stats.misses - 1, stats
        assert asyncio.run(main()) == [42] * 200  # now all hits: one read for the 200
        assert backend.reads == 3 and hot_task.stats().hits == 200 and calls == [1, 2]
    finally:
        cache.clear()
        backend.close()


def test_a_failing_fill_fails_its_waiters_and_is_not_cached(make_cache: MakeCache) -> None:
    cache = make_cache()
    calls: list[int] = []

    @cache.cached(ttl=60)
    async def broken() -> int:
        calls.append(1)
        await asyncio.sleep(0.05)
        raise LookupError("no such row")

    async def main() -> list[object]:
        return await asyncio.gather(*(broken() for _ in range(10)), return_exceptions=True)

    outcomes = asyncio.run(main())
    assert all(isinstance(o, LookupError) for o in outcomes)
    assert len(calls) == 1
    assert len(asyncio.run(main())) == 10 and len(calls) == 2  # nothing was cached


WORKER = """
import sys, time
import redis
from pgpilot.cache import Cache, RedisBackend

url, namespace, counter = sys.argv[1:4]
cache = Cache(RedisBackend(url, timeout=5), namespace=namespace, follow_writes=False)
raw = redis.Redis.from_url(url)

@cache.cached(ttl=60, name="stampede.hot")
def hot():
    raw.incr(counter)  # fills, counted across processes
    time.sleep(0.5)
    return "value"

raw.incr(counter + ":ready")  # imported and polling: the test gives the signal after all six
while not raw.exists(counter + ":go"):
    time.sleep(0.001)
values = {hot() for _ in range(3)}
print(values.pop(), hot.stats().fills, hot.stats().stampede_waits)
"""


def test_processes_on_a_missing_key_fill_it_once_through_the_redis_lock(
        redis_url: str, namespace: str) -> None:
    counter = f"{namespace}:fills"
    raw = redis.Redis.from_url(redis_url)
    workers = [subprocess.Popen([sys.executable, "-c", WORKER, redis_url, namespace, counter],
                                stdout=subprocess.PIPE, text=True) for _ in range(6)]
    try:
        # All six polling before the go signal (a fixed sleep let a slow starter, on a loaded
        # machine, come after the fill and find the value: no wait to count).
        deadline = time.monotonic() + 60
        while int(raw.get(counter + ":ready") or 0) < 6 and time.monotonic() < deadline:
            time.sleep(0.01)
        raw.set(counter + ":go", 1)
        outputs = [w.communicate(timeout=60)[0].split() for w in workers]
    finally:
        for w in workers:
            w.kill()
    assert all(w.returncode == 0 for w in workers)
    assert [o[0] for o in outputs] == ["value"] * 6
    assert int(raw.get(counter) or 0) == 1  # one process ran the function
    assert sum(int(o[1]) for o in outputs) == 1
    assert sum(int(o[2]) for o in outputs) >= 5  # the others waited for it
    raw.delete(counter, counter + ":go", counter + ":ready")
    Cache(RedisBackend(redis_url), namespace=namespace, follow_writes=False).clear()
    raw.close()


def test_early_refresh_recomputes_in_the_background_while_serving_the_old_value(
        make_cache: MakeCache) -> None:
    cache = make_cache()
    version = [0]
    refreshed = threading.Event()

    @cache.cached(ttl=1.0, early_refresh=0.9)  # refresh once less than 0.9 s remain
    def hot() -> int:
        version[0] += 1
        if version[0] > 1:
            refreshed.set()
        return version[0]

    assert hot() == 1
    time.sleep(0.15)  # now within the refresh window
    assert hot() == 1  # served at once from the cache...
    assert refreshed.wait(5)  # ...while a background fill ran
    deadline = time.monotonic() + 5
    while hot() == 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert hot() == 2
    stats = hot.stats()
    assert stats.early_refreshes >= 1 and stats.misses == 1  # never a miss after the first


def test_early_refresh_of_a_coroutine_keeps_the_hot_key_from_expiring(
        make_cache: MakeCache) -> None:
    cache = make_cache()
    fills: list[int] = []

    @cache.cached(ttl=0.5, early_refresh=0.5)
    async def hot() -> int:
        fills.append(1)
        await asyncio.sleep(0.01)
        return len(fills)

    async def main() -> None:
        await hot()
        finish = time.monotonic() + 1.5  # three TTLs of continuous load
        while time.monotonic() < finish:
            await asyncio.gather(*(hot() for _ in range(20)))
            await asyncio.sleep(0.01)
        for task in list(cache._tasks):
            await task

    asyncio.run(main())
    stats = hot.stats()
    assert stats.misses == 1  # only the very first call: the key never expired under load
    assert stats.early_refreshes >= 2 and len(fills) >= 3
