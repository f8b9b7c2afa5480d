"""DataLoader (asyncio): batching, scheduling, errors, cache, cancellation, scopes."""

from __future__ import annotations

import asyncio
import contextvars
import threading
from collections.abc import Mapping, Sequence

import pytest

from pgpilot.batch import (
    BatchLoadError,
    BatchResultError,
    DataLoader,
    current_scope,
    request_scope,
    scoped,
)


class Recorder:
    """An in-memory batch function that records every call's keys."""

    def __init__(self, delay: float = 0.0) -> None:
        self.calls: list[list[int]] = []
        self.delay = delay

    async def __call__(self, keys: list[int]) -> Sequence[object]:
        self.calls.append(list(keys))
        if self.delay:
            await asyncio.sleep(self.delay)
        return [key * 10 for key in keys]


async def test_200_concurrent_loads_make_one_batch() -> None:
    fetch = Recorder()
    loader = DataLoader(fetch)

    async def resolver(key: int) -> object:
        return await loader.load(key)

    values = await asyncio.gather(*(resolver(k) for k in range(200)))
    assert values == [k * 10 for k in range(200)]
    assert len(fetch.calls) == 1
    assert sorted(fetch.calls[0]) == list(range(200))
    stats = loader.stats
    assert (stats.loads, stats.batches, stats.keys_dispatched) == (200, 1, 200)
    assert stats.mean_batch_size == 200
    assert stats.coalescing_rate == pytest.approx(1 - 1 / 200)


async def test_450_loads_with_max_batch_size_100_make_five_batches() -> None:
    fetch = Recorder()
    loader = DataLoader(fetch, max_batch_size=100)
    values = await asyncio.gather(*(loader.load(k) for k in range(450)))
    assert values == [k * 10 for k in range(450)]
    assert [len(c) for c in fetch.calls] == [100, 100, 100, 100, 50]
    assert loader.stats.batches == 5


async def test_loads_from_tasks_woken_behind_gather_join_the_same_batch() -> None:
    """Second-level loads of tasks woken one, two or three hops after the first batch resolves
    (directly, behind a gather, behind nested gathers) all go out in one second batch."""
    fetch = Recorder()
    loader = DataLoader(fetch)

    async def direct(key: int) -> object:
        await loader.load(key)
        return await loader.load(key + 100)

    async def behind_gather(key: int) -> object:
        await asyncio.gather(loader.load(key), loader.load(key + 1000))
        return await loader.load(key + 100)

    async def behind_nested_gather(key: int) -> object:
        await asyncio.gather(asyncio.gather(loader.load(key), loader.load(key + 2000)))
        return await loader.load(key + 100)

    await asyncio.gather(
        direct(1), behind_gather(2), direct(3), behind_gather(4), behind_nested_gather(5)
    )
    assert len(fetch.calls) == 2
    assert sorted(fetch.calls[1]) == [101, 102, 103, 104, 105]


async def test_duplicate_keys_are_dispatched_once() -> None:
    fetch = Recorder()
    loader = DataLoader(fetch, cache=False)
    values = await asyncio.gather(*(loader.load(k % 3) for k in range(30)))
    assert values == [(k % 3) * 10 for k in range(30)]
    assert fetch.calls == [[0, 1, 2]]


async def test_sequential_ticks_make_separate_batches() -> None:
    fetch = Recorder()
    loader = DataLoader(fetch)
    assert await loader.load(1) == 10
    assert await loader.load(2) == 20
    assert fetch.calls == [[1], [2]]


async def test_window_coalesces_staggered_loads() -> None:
    async def staggered(loader: DataLoader[int, object], key: int) -> object:
        # Task k loads 20*k loop iterations after task 0: never in the same tick.
        for _ in range(20 * key):
            await asyncio.sleep(0)
        return await loader.load(key)

    tick_fetch = Recorder()
    tick_loader = DataLoader(tick_fetch)
    await asyncio.gather(*(staggered(tick_loader, k) for k in range(5)))
    assert len(tick_fetch.calls) == 5  # without a window: one batch per arrival

    fetch = Recorder()
    loader = DataLoader(fetch, window=0.5)  # generous: the machine may be busy
    values = await asyncio.gather(*(staggered(loader, k) for k in range(5)))
    assert values == [0, 10, 20, 30, 40]
    assert fetch.calls == [[0, 1, 2, 3, 4]]  # the bus waited at the stop


async def test_window_dispatches_a_full_batch_without_waiting_out_the_window() -> None:
    fetch = Recorder()
    loader = DataLoader(fetch, window=30.0, max_batch_size=3)
    # The window is far longer than the test timeout: only the size limit can dispatch.
    values = await asyncio.wait_for(asyncio.gather(*(loader.load(k) for k in range(3))), 10)
    assert values == [0, 10, 20]
    assert fetch.calls == [[0, 1, 2]]


async def test_mapping_result_missing_key_is_none() -> None:
    async def fetch(keys: list[int]) -> Mapping[int, str]:
        return {k: f"v{k}" for k in keys if k != 2}

    loader: DataLoader[int, str | None] = DataLoader(fetch)
    assert await loader.load_many([1, 2, 3]) == ["v1", None, "v3"]


async def test_exception_value_fails_only_that_key_and_is_not_cached() -> None:
    calls: list[list[int]] = []

    async def fetch(keys: list[int]) -> list[object]:
        calls.append(keys)
        return [ValueError(f"no {k}") if k == 2 else k for k in keys]

    loader = DataLoader(fetch)
    results = await asyncio.gather(*(loader.load(k) for k in (1, 2, 3)), return_exceptions=True)
    assert results[0] == 1 and results[2] == 3
    assert isinstance(results[1], ValueError) and str(results[1]) == "no 2"
    # 1 and 3 are cached; 2 failed, so it is fetched again.
    with pytest.raises(ValueError):
        await loader.load(2)
    assert calls == [[1, 2, 3], [2]]


async def test_batch_fn_raising_fails_every_load_naming_the_loader() -> None:
    attempts = 0

    async def flaky_users(keys: list[int]) -> list[int]:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            raise RuntimeError("database went away")
        return keys

    loader = DataLoader(flaky_users)
    results = await asyncio.gather(*(loader.load(k) for k in range(4)), return_exceptions=True)
    assert all(isinstance(r, BatchLoadError) for r in results)
    error = results[0]
    assert isinstance(error, BatchLoadError)
    assert "flaky_users" in str(error) and "database went away" in str(error)
    assert isinstance(error.__cause__, RuntimeError)
    # Failures are not cached: the next loads retry.
    assert await loader.load_many(range(4)) == [0, 1, 2, 3]


async def test_wrong_length_result_fails_the_batch() -> None:
    async def short_orders(keys: list[int]) -> list[int]:
        return keys[:-1]

    loader = DataLoader(short_orders)
    results = await asyncio.gather(*(loader.load(k) for k in range(3)), return_exceptions=True)
    assert all(isinstance(r, BatchResultError) for r in results)
    assert "short_orders" in str(results[0]) and "2 values for 3 keys" in str(results[0])


async def test_cache_prime_clear_and_cache_key_fn() -> None:
    fetch = Recorder()
    loader = DataLoader(fetch, cache_key_fn=lambda key: key % 100)
    assert await loader.load(1) == 10
    assert await loader.load(101) == 10  # same cache key: answered from the cache
    loader.prime(7, 777)
    assert await loader.load(7) == 777
    loader.prime(7, 0)  # prime does not overwrite
    assert await loader.load(7) == 777
    loader.clear(1)
    assert await loader.load(1) == 10
    loader.clear_all()
    assert await loader.load(7) == 70
    assert fetch.calls == [[1], [1], [7]]
    assert loader.stats.cache_hits == 3


async def test_clear_while_in_flight_does_not_cache_the_stale_value() -> None:
    fetch = Recorder(delay=0.02)
    loader = DataLoader(fetch)
    first = loader.load(5)
    await asyncio.sleep(0.005)  # the batch is now in flight
    loader.clear(5)
    second = loader.load(5)  # after clear: must not join the in-flight load
    assert await first == 50 and await second == 50
    assert fetch.calls == [[5], [5]]


async def test_cancelling_one_waiter_does_not_affect_others() -> None:
    fetch = Recorder(delay=0.02)
    loader = DataLoader(fetch)

    async def waiter(key: int) -> object:
        return await loader.load(key)

    tasks = [asyncio.create_task(waiter(k)) for k in (1, 2, 2, 3)]
    await asyncio.sleep(0.005)  # batch dispatched, batch_fn sleeping
    tasks[1].cancel()  # one of the two waiters for key 2
    tasks[3].cancel()
    done = await asyncio.gather(*tasks, return_exceptions=True)
    assert done[0] == 10 and done[2] == 20
    assert isinstance(done[1], asyncio.CancelledError)
    assert isinstance(done[3], asyncio.CancelledError)
    assert fetch.calls == [[1, 2, 3]]
    # The value of the cancelled key 3 still arrived and was cached.
    assert await loader.load(3) == 30 and len(fetch.calls) == 1


async def test_cancelling_before_dispatch_keeps_the_batch_for_others() -> None:
    fetch = Recorder()
    loader = DataLoader(fetch)
    tasks = [asyncio.create_task(loader.load_many([k])) for k in range(3)]  # type: ignore[arg-type]
    await asyncio.sleep(0)
    tasks[0].cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert isinstance(results[0], asyncio.CancelledError)
    assert results[1:] == [[10], [20]]


def test_loader_is_not_bound_to_a_loop_at_construction() -> None:
    fetch = Recorder()
    created_elsewhere: list[DataLoader[int, object]] = []
    # Built in a thread with no event loop at all.
    thread = threading.Thread(target=lambda: created_elsewhere.append(DataLoader(fetch)))
    thread.start()
    thread.join()
    loader = created_elsewhere[0]
    assert asyncio.run(_gather(loader, [1, 2])) == [10, 20]
    # And usable in a second, different loop afterwards.
    loader.clear_all()
    assert asyncio.run(_gather(loader, [3])) == [30]
    assert fetch.calls == [[1, 2], [3]]


async def _gather(loader: DataLoader[int, object], keys: list[int]) -> list[object]:
    return await loader.load_many(keys)


async def test_request_scope_isolates_loaders() -> None:
    fetch = Recorder()

    def numbers() -> DataLoader[int, object]:
        return DataLoader(fetch)

    async def request(key: int) -> tuple[int, object]:
        with request_scope():
            loader = scoped(numbers)
            assert scoped(numbers) is loader  # same loader throughout the request
            # A task started inside the request sees the same scope.
            child = await asyncio.create_task(_load_in_child(numbers, key))
            return id(loader), child

    (id1, v1), (id2, v2) = await asyncio.gather(request(1), request(2))
    assert id1 != id2 and (v1, v2) == (10, 20)
    with pytest.raises(LookupError, match="request_scope"):
        current_scope()
    # Nothing leaked: a new request starts with an empty cache.
    with request_scope() as scope:
        assert len(scope) == 0
        assert await scoped(numbers).load(1) == 10
    assert [1] in fetch.calls and fetch.calls.count([1]) == 2


async def _load_in_child(factory: object, key: int) -> object:
    return await scoped(factory).load(key)  # type: ignore[arg-type]


def test_request_scope_is_per_context() -> None:
    with request_scope() as outer:
        seen = contextvars.copy_context().run(current_scope)
        assert seen is outer
        with request_scope() as inner:
            assert current_scope() is inner
        assert current_scope() is outer


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError):
        DataLoader(Recorder(), max_batch_size=0)
    with pytest.raises(ValueError):
        DataLoader(Recorder(), window=-1)
    with pytest.raises(TypeError):
        DataLoader("not callable")  # type: ignore[arg-type]


async def test_stats_as_dict_includes_derived_figures() -> None:
    loader = DataLoader(Recorder())
    await loader.load_many([1, 2, 1])
    await loader.load(2)
    figures = loader.stats.as_dict()
    assert figures["loads"] == 4 and figures["batches"] == 1 and figures["cache_hits"] == 1
    assert figures["keys_dispatched"] == 2 and figures["mean_batch_size"] == 2.0
    assert figures["coalescing_rate"] == 0.75


def test_a_batch_cut_short_by_the_loop_ending_does_not_wedge_the_loader() -> None:
    fetch = Recorder()
    loader = DataLoader(fetch)

    async def leave_a_load_behind() -> None:
        loader.load(1)  # queued, never awaited: asyncio.run() ends before the dispatch

    asyncio.run(leave_a_load_behind())
    assert asyncio.run(_gather(loader, [2, 3])) == [20, 30]
    assert fetch.calls == [[2, 3]]
