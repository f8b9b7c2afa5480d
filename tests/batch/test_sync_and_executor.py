"""SyncDataLoader (threads and deferred style) and BatchExecutor (incl. real Redis)."""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from pgpilot.batch import BatchExecutor, BatchLoadError, BatchResultError, SyncDataLoader


class SyncRecorder:
    def __init__(self) -> None:
        self.calls: list[list[int]] = []
        self.lock = threading.Lock()

    def __call__(self, keys: list[int]) -> list[object]:
        with self.lock:
            self.calls.append(list(keys))
        return [k * 10 for k in keys]


def test_deferred_style_enqueue_then_dispatch() -> None:
    fetch = SyncRecorder()
    loader = SyncDataLoader(fetch)
    handles = [loader.load(k) for k in (1, 2, 3, 2)]
    assert not handles[0].done() and fetch.calls == []
    assert loader.dispatch() == 1
    assert [h.result() for h in handles] == [10, 20, 30, 20]
    assert fetch.calls == [[1, 2, 3]]  # the duplicate key was sent once
    assert loader.dispatch() == 0


def test_result_dispatches_the_pending_batch() -> None:
    fetch = SyncRecorder()
    loader = SyncDataLoader(fetch)
    many = loader.load_many([4, 5, 6])
    assert many.result() == [40, 50, 60]
    assert loader.load(5).result() == 50  # cached
    assert fetch.calls == [[4, 5, 6]]
    stats = loader.stats
    assert (stats.loads, stats.batches, stats.cache_hits) == (4, 1, 1)


def test_threads_within_window_share_one_batch() -> None:
    fetch = SyncRecorder()
    loader = SyncDataLoader(fetch, window=1.0)  # generous: the machine may be busy
    barrier = threading.Barrier(20)

    def worker(key: int) -> object:
        barrier.wait()
        return loader.load(key).result(timeout=30)

    with ThreadPoolExecutor(20) as pool:
        values = list(pool.map(worker, range(20)))
    assert values == [k * 10 for k in range(20)]
    assert len(fetch.calls) == 1 and sorted(fetch.calls[0]) == list(range(20))


def test_threads_with_max_batch_size_split_into_full_batches() -> None:
    fetch = SyncRecorder()
    # A window far longer than the test: only filling up can release a batch.
    loader = SyncDataLoader(fetch, window=60, max_batch_size=5)
    barrier = threading.Barrier(10)

    def worker(key: int) -> object:
        barrier.wait()
        return loader.load(key).result(timeout=30)

    with ThreadPoolExecutor(10) as pool:
        values = list(pool.map(worker, range(10)))
    assert values == [k * 10 for k in range(10)]
    assert sorted(len(c) for c in fetch.calls) == [5, 5]


def test_sync_errors_per_key_and_whole_batch() -> None:
    def per_key(keys: list[int]) -> list[object]:
        return [KeyError(k) if k < 0 else k for k in keys]

    loader = SyncDataLoader(per_key)
    ok, bad = loader.load(1), loader.load(-1)
    assert ok.result() == 1
    with pytest.raises(KeyError):
        bad.result()

    def broken_lookup(keys: list[int]) -> list[int]:
        raise OSError("gone")

    broken = SyncDataLoader(broken_lookup)
    a, b = broken.load(1), broken.load(2)
    for handle in (a, b):
        with pytest.raises(BatchLoadError, match=r"broken_lookup.*gone") as info:
            handle.result()
        assert isinstance(info.value.__cause__, OSError)

    short = SyncDataLoader(lambda keys: keys[:1])
    c, d = short.load(1), short.load(2)
    with pytest.raises(BatchResultError, match="1 values for 2 keys"):
        d.result()
    with pytest.raises(BatchResultError):
        c.result()


def test_sync_timeout_while_another_thread_runs_the_batch() -> None:
    release = threading.Event()
    started = threading.Event()

    def slow(keys: list[int]) -> list[int]:
        started.set()
        release.wait(30)
        return keys

    loader = SyncDataLoader(slow)
    handle = loader.load(1)
    runner = threading.Thread(target=handle.result)
    runner.start()
    assert started.wait(30)
    with pytest.raises(TimeoutError):
        handle.result(timeout=0.01)
    release.set()
    runner.join()
    assert handle.result() == 1


async def test_executor_coalesces_and_does_not_deduplicate() -> None:
    calls: list[list[tuple[str, int]]] = []

    async def bulk_write(items: list[tuple[str, int]]) -> list[str]:
        calls.append(items)
        return [f"{name}={value}" for name, value in items]

    executor = BatchExecutor(bulk_write, max_batch_size=3)
    results = await asyncio.gather(*(executor.submit(("x", i % 2)) for i in range(4)))
    assert results == ["x=0", "x=1", "x=0", "x=1"]
    assert [len(c) for c in calls] == [3, 1]
    assert executor.stats.loads == 4 and executor.stats.batches == 2


@pytest.fixture
def redis_prefix(redis_url: str) -> Iterator[str]:
    import redis

    prefix = f"pgp_batch:{uuid.uuid4().hex}:"
    yield prefix
    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(f"{prefix}*"))
    if keys:
        client.delete(*keys)
    client.close()


async def test_executor_with_redis_mget_and_mset(redis_url: str, redis_prefix: str) -> None:
    import redis.asyncio

    client = redis.asyncio.Redis.from_url(redis_url)
    commands: list[str] = []

    async def mset(pairs: list[tuple[str, str]]) -> list[bool]:
        commands.append("MSET")
        await client.mset(dict(pairs))
        return [True] * len(pairs)

    async def mget(keys: list[str]) -> list[bytes | None]:
        commands.append("MGET")
        values: list[bytes | None] = await client.mget(keys)
        return values

    try:
        setter = BatchExecutor(mset)
        getter = BatchExecutor(mget, max_batch_size=50)
        await setter.submit_many((f"{redis_prefix}{i}", f"v{i}") for i in range(100))
        values = await asyncio.gather(*(getter.submit(f"{redis_prefix}{i}") for i in range(101)))
        assert values[:100] == [f"v{i}".encode() for i in range(100)]
        assert values[100] is None  # never set
        assert commands == ["MSET", "MGET", "MGET", "MGET"]  # 100 sets, 101 gets in 50s
    finally:
        await client.aclose()
